#!/usr/bin/env python3
"""demo.py - archive-milter at work behind a real Postfix, on loopback

Starts a private Postfix (smtpd_milters = archive-milter), a main relay
that stands for the next hop, and an archive relay that receives the
journal copies; pushes a set of corpus messages through Postfix, each
to two To recipients and one envelope-only (BCC) recipient; shows what
the archive received (the envelope headers of every copy) and the
milter's log lines; then stops the archive relay to show that Postfix
answers 4xx instead of delivering unarchived mail.  Everything started
is stopped at the end.  Run through tests/demo.sh, as root.
"""

import argparse
import os
import re
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402
import test_journal as tj  # noqa: E402

SENDER = tj.SENDER
RCPTS = tj.RCPTS


def pick(corpus, per_folder):
    """A few messages from each corpus folder, in a stable order."""
    by_dir = {}
    for path in tj.corpus_files(corpus):
        by_dir.setdefault(os.path.dirname(path), []).append(path)
    out = []
    for d in sorted(by_dir):
        out += by_dir[d][:per_folder]
    return out


def subject_of(content):
    header, _ = h.split_message(content)
    for f in h.header_fields(header):
        if h.field_name(f) == "subject":
            return h.field_value(f)
    return "(no subject)"


def section(title):
    print()
    print("=== %s ===" % title)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--milter", required=True)
    p.add_argument("--smtp-send")
    p.add_argument("--corpus", required=True)
    p.add_argument("--per-folder", type=int, default=2,
                   help="messages taken from each corpus folder")
    p.add_argument("--keep", help="keep all files in this directory")
    args = p.parse_args()
    if os.geteuid() != 0:
        print("demo: run as root (a private Postfix needs it)",
              file=sys.stderr)
        return 1

    h.install_signal_handlers()
    files = pick(os.path.abspath(args.corpus), args.per_folder)
    tmp = tempfile.mkdtemp(prefix="archive-demo-msgs-")
    paths, names = [], {}
    for seq, src in enumerate(files, 1):
        path = os.path.join(tmp, "%03d.eml" % seq)
        with open(src, "rb") as f:
            data = tj.prepare(f.read(), seq)
        with open(path, "wb") as f:
            f.write(data)
        paths.append(path)
        names[seq] = os.path.relpath(src, args.corpus)

    try:
        with h.World(milter_exe=args.milter, workdir=args.keep) as w:
            section("started (all on 127.0.0.1)")
            print("postfix        port %d  (config %s)"
                  % (w.postfix.port, w.postfix.conf))
            print("archive-milter port %d  (config %s)"
                  % (w.milter.port, w.milter.conf_path))
            print("main relay     port %d" % w.main.port)
            print("archive relay  port %d  (copies to %s)"
                  % (w.archive.port, w.ARCHIVE_TO))

            section("sending %d corpus messages through Postfix" % len(paths))
            print("envelope: MAIL FROM:<%s>, RCPT TO: %s, %s and BCC %s"
                  % (SENDER, RCPTS[0], RCPTS[1], RCPTS[2]))
            results = h.send_files(w.postfix.port, SENDER, RCPTS, paths,
                                   args.smtp_send)
            ok = [r for r in results if r.ok]
            for seq, r in enumerate(results, 1):
                if not r.ok:
                    print("REFUSED %s: %s %s" % (names[seq], r.code, r.text))
            print("%d accepted by Postfix" % len(ok))
            h.wait_for(lambda: w.main.count() >= len(ok), 120,
                       "the main relay")

            section("archived copies (archive relay)")
            for m in w.archive.messages():
                env, _ = tj.split_copy(m.content)
                seq = tj.seq_of(m.content)
                print("copy %d: %s  (MAIL FROM:<%s> RCPT TO:<%s>, %d octets)"
                      % (m.index, names.get(seq, "?"), m.envelope_sender(),
                         ">,<".join(m.envelope_rcpts()), len(m.content)))
                print("    Subject: %s" % subject_of(m.content)[:70])
                for f in env:
                    print("    " + f.decode("utf-8", "replace").rstrip())

            section("main relay")
            print("%d messages relayed by Postfix, each to %d recipients"
                  % (w.main.count(), len(RCPTS)))

            section("archive-milter log")
            for line in w.milter.log().splitlines():
                print(line)

            section("archive relay stopped: Postfix must not deliver")
            w.archive.stop()
            r = h.send_files(w.postfix.port, SENDER, RCPTS, paths[:1],
                             args.smtp_send)[0]
            print("Postfix answered: %s %s" % (r.code, r.text))
            print("queued by Postfix: %d" % len(w.postfix.queue_ids()))
            for line in w.milter.log().splitlines()[-3:]:
                if re.search(r"status=", line):
                    print("milter: " + line)

            section("postfix log (last lines)")
            for line in w.postfix.log().splitlines()[-8:]:
                print(line)
            section("stopping everything")
        print("done")
    finally:
        h.REGISTRY.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
