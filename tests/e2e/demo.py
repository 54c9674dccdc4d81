#!/usr/bin/env python3
"""demo.py - archive-milter at work behind a real Postfix, on loopback

Starts a private Postfix (smtpd_milters = archive-milter), a main relay
that stands for the next hop, and an archive relay that receives the
journal copies, all on 127.0.0.1 on ports picked at run time, with the
milter's spool inside the demo's own temporary work directory.  One
milter configuration holds three rules, chosen by envelope sender:

  everything  (sender@origin.example)  delivery = sync, on_failure =
              tempfail: the copy is made while Postfix waits;
  bulk        (bulk@origin.example)    delivery = spool: the copy is
              queued in the spool and sent by the milter's workers;
  legal       (legal@origin.example)   delivery = sync, default policy,
              archived to an address the archive relay may refuse.

Sections, in order:
  1. corpus messages through Postfix, each to two To recipients and one
     envelope-only (BCC) recipient; the archived copies with their
     X-Envelope-* and X-Archive-Id headers; the milter's log lines;
  2. the archive relay stopped: Postfix answers 4xx for the sync rule;
  3. spool mode, relay still down: Postfix accepts at once, the copies
     wait in the spool (--spool-list); the relay comes back, the spool
     drains and the copies arrive with the X-Archive-Id the spool showed;
  4. a permanent refusal (550 from the archive relay for the archive
     address), default policy: the original is accepted, the copy kept
     in hold/ (--spool-list, an error line in the log); the relay
     accepts again and --spool-retry all sends the held copy.

Every step the demo shows is checked: if something did not happen (a
copy did not arrive, Postfix answered otherwise) it says what, and
exits 1.  Everything started is stopped at the end, pass or fail.  Run
through tests/demo.sh, as root.
"""

import argparse
import os
import re
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402
import test_journal as tj  # noqa: E402

SENDER = tj.SENDER                      # rule "everything" (sync)
BULK_SENDER = "bulk@origin.example"     # rule "bulk" (spool)
LEGAL_SENDER = "legal@origin.example"   # rule "legal" (default policy)
LEGAL_ARCHIVE = "legal-archive@archive.example"
RCPTS = tj.RCPTS
REFUSAL = "550 5.1.1 <%s>: mailbox unavailable" % LEGAL_ARCHIVE

# Bounded waits (seconds).  The spool retries after 1 s, then at most
# every 2 s, and the milter scans its spool every 5 s: a copy that has
# not arrived after these is reported as missing.
WAIT_RELAYED = 60
WAIT_DRAIN = 30
WAIT_RELEASED = 30


def extra_rules():
    """The two rules after the harness's own rule "everything"."""
    return (
        "[rule:bulk]\n"
        "relay = archive\n"
        "archive_to = %s\n"
        "match_sender = ^bulk@origin\\.example$\n"
        "delivery = spool\n\n"
        "[rule:legal]\n"
        "relay = archive\n"
        "archive_to = %s\n"
        "match_sender = ^legal@origin\\.example$\n"
        % (h.World.ARCHIVE_TO, LEGAL_ARCHIVE))


class Checks:
    """What the demo claims, each checked; the failures are listed at
    the end and make the exit status 1."""

    def __init__(self):
        self.passed = 0
        self.failed = []

    def ok(self, cond, what, detail=None):
        if cond:
            self.passed += 1
            print("  ok: %s" % what)
        else:
            self.failed.append(what)
            print("  FAILED: %s" % what)
            if detail:
                for line in str(detail).splitlines()[:20]:
                    print("    | " + line)
        return bool(cond)

    def wait(self, pred, timeout, what):
        """Wait for pred(); a check that fails after `timeout` s."""
        try:
            h.wait_for(pred, timeout, what)
            return self.ok(True, what)
        except h.Timeout as e:
            return self.ok(False, what, e)


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


def archive_id_of(content):
    env, _ = tj.split_copy(content)
    for f in env:
        if h.field_name(f) == "x-archive-id":
            return h.field_value(f)
    return None


def section(title):
    print()
    print("=== %s ===" % title)
    sys.stdout.flush()


def spool_list(w):
    """--spool-list: (exit status, counts, {id: (state, line)}, text)."""
    rc, out, err = w.milter.run_tool("--spool-list")
    counts, entries = {}, {}
    for line in out.splitlines():
        m = re.fullmatch(r"(\w+): (\d+)", line)
        if m:
            counts[m.group(1)] = int(m.group(2))
            continue
        m = re.match(r"(\S+) (queued|held) ", line)
        if m:
            entries[m.group(1)] = (m.group(2), line)
    return rc, counts, entries, out + err


def show_spool_list(w, text):
    print("# archive-milter -c %s --spool-list" % w.milter.conf_path)
    for line in text.splitlines():
        print("  " + line)


def copies_from(w, sender, seqs):
    """Copies at the archive of messages sent by `sender` whose
    X-Test-Seq is in seqs."""
    out = []
    for m in w.archive.messages():
        if tj.seq_of(m.content) in seqs:
            env, _ = tj.split_copy(m.content)
            if ("X-Envelope-From: <%s>" % sender).encode() in b"".join(env):
                out.append(m)
    return out


def print_copy(m, names):
    print("copy %d: %s  (MAIL FROM:<%s> RCPT TO:<%s>, %d octets)"
          % (m.index, names.get(tj.seq_of(m.content), "?"),
             m.envelope_sender(), ">,<".join(m.envelope_rcpts()),
             len(m.content)))
    print("    Subject: %s" % subject_of(m.content)[:70])
    env, _ = tj.split_copy(m.content)
    for f in env:
        print("    " + f.decode("utf-8", "replace").rstrip())


def summary(text):
    print("In short: " + text)


def milter_log_since(w, start):
    return w.milter.log()[start:].splitlines()


# ------------------------------------------------------------------ #
# Sections                                                             #
# ------------------------------------------------------------------ #


def show_corpus(w, t, args, paths, names):
    section("1. corpus messages through Postfix (rule everything, sync)")
    print("Each message: MAIL FROM:<%s>, RCPT TO: %s, %s and BCC %s."
          % (SENDER, RCPTS[0], RCPTS[1], RCPTS[2]))
    print("The milter copies it to <%s> before Postfix answers."
          % w.ARCHIVE_TO)
    results = h.send_files(w.postfix.port, SENDER, RCPTS, paths,
                           args.smtp_send)
    ok = [r for r in results if r.ok]
    for seq, r in enumerate(results, 1):
        if not r.ok:
            print("REFUSED %s: %s %s" % (names[seq], r.code, r.text))
    print("Postfix accepted %d of %d messages." % (len(ok), len(results)))
    t.ok(len(ok) == len(results), "Postfix accepted every corpus message",
         "\n".join(repr(r) for r in results if not r.ok))
    t.wait(lambda: w.main.count() >= len(ok), WAIT_RELAYED,
           "the main relay received all %d originals" % len(ok))
    seqs = set(range(1, len(paths) + 1))
    copies = copies_from(w, SENDER, seqs)
    t.ok(len(copies) == len(ok),
         "the archive received one copy of each accepted message "
         "(%d copies)" % len(copies))

    section("1a. archived copies (what the archive relay stored)")
    bad = []
    for m in copies:
        print_copy(m, names)
        env, _ = tj.split_copy(m.content)
        problems, _ = tj.check_envelope(env)
        if problems:
            bad.append("copy %d: %s" % (m.index, "; ".join(problems)))
    t.ok(copies and not bad, "every copy records the sender, the 3 "
         "recipients (BCC included) and an X-Archive-Id", "\n".join(bad))
    summary("%d messages sent, Postfix accepted %d and relayed them; the "
            "archive received %d copies, each with the full envelope."
            % (len(results), len(ok), len(copies)))

    section("1b. main relay")
    print("%d messages relayed by Postfix, each to %d recipients"
          % (w.main.count(), len(RCPTS)))

    section("1c. archive-milter log")
    for line in w.milter.log().splitlines():
        print(line)


def show_relay_down_sync(w, t, args, paths):
    section("2. archive relay stopped: Postfix must not deliver "
            "(rule everything, sync)")
    w.archive.stop()
    print("The archive relay is stopped.  One more message from <%s>:"
          % SENDER)
    log_start = len(w.milter.log())
    queued_before = len(w.postfix.queue_ids())
    r = h.send_files(w.postfix.port, SENDER, RCPTS, paths[:1],
                     args.smtp_send)[0]
    # r.text is "KIND: TEXT", KIND being smtp-send's name for the step
    # that failed (data_error: the end of DATA); the milter's own
    # outcome is in its decision line below.
    print("Postfix answered at the end of DATA: %s %s"
          % (r.code, r.text.split(": ", 1)[-1]))
    queued = len(w.postfix.queue_ids()) - queued_before
    print("queued by Postfix: %d" % queued)
    for line in milter_log_since(w, log_start):
        if "status=" in line or " -> " in line:
            print("milter: " + line)
    t.ok(not r.ok and 400 <= r.code < 500,
         "Postfix answered 4xx: the sender keeps the message and retries",
         repr(r))
    t.ok(queued == 0, "Postfix queued nothing without its copy")
    summary("1 message sent, Postfix answered %s (try again later) and "
            "kept nothing: no mail is delivered without its copy."
            % r.code)

    section("postfix log (last lines)")
    for line in w.postfix.log().splitlines()[-8:]:
        print(line)


def show_spool(w, t, args, paths, names, first_seq):
    section("3. spool mode: relay down, mail accepted, copies queued "
            "(rule bulk, delivery = spool)")
    seqs = set(range(first_seq, first_seq + len(paths)))
    print("The archive relay is still stopped.  %d messages from <%s>:"
          % (len(paths), BULK_SENDER))
    main_before = w.main.count()
    start = time.monotonic()
    results = h.send_files(w.postfix.port, BULK_SENDER, RCPTS, paths,
                           args.smtp_send)
    took = time.monotonic() - start
    for seq, r in zip(sorted(seqs), results):
        print("  %s: %s" % (names[seq], "250 accepted" if r.ok
                            else "%s %s" % (r.code, r.text)))
    print("Postfix answered all %d in %.2f s, without waiting for the "
          "archive." % (len(results), took))
    t.ok(all(r.ok for r in results),
         "Postfix accepted every message with the archive down",
         "\n".join(repr(r) for r in results if not r.ok))
    # The relay's own timeout is 10 s: an answer well under it shows
    # that nobody waited for the archive.
    t.ok(took < 5, "the answers came at once (%.2f s for %d messages)"
         % (took, len(results)))
    t.wait(lambda: w.main.count() >= main_before + len(results),
           WAIT_RELAYED, "the originals went on to the main relay")

    rc, counts, entries, text = spool_list(w)
    show_spool_list(w, text)
    queued = {i for i, (s, _) in entries.items() if s == "queued"}
    t.ok(rc == 0 and counts.get("queued") == len(results)
         and len(queued) == len(results),
         "--spool-list shows %d copies queued" % len(results), text)
    t.ok(queued == set(w.milter.spool_files("queue")),
         "--spool-list names the files in the spool's queue/",
         "%s\n%s" % (sorted(queued), w.milter.spool_files("queue")))
    t.ok(not copies_from(w, BULK_SENDER, seqs),
         "the archive has none of them yet")
    print("Spool directory: %s" % w.milter.spool_dir)

    section("3a. the archive relay comes back: the spool drains")
    log_start = len(w.milter.log())
    w.archive.start()
    print("The archive relay listens again on port %d; the milter's "
          "workers retry (spool_retry_min = 1 s, spool_retry_max = 2 s)."
          % w.archive.port)
    start = time.monotonic()
    t.wait(lambda: len(copies_from(w, BULK_SENDER, seqs)) >= len(results),
           WAIT_DRAIN, "the archive received the %d spooled copies"
           % len(results))
    t.wait(lambda: not w.milter.spool_files("queue"), 10,
           "the spool's queue/ is empty")
    print("Drained in %.1f s." % (time.monotonic() - start))
    copies = copies_from(w, BULK_SENDER, seqs)
    for m in copies:
        print_copy(m, names)
    arrived = {archive_id_of(m.content) for m in copies}
    t.ok(arrived == queued, "the copies carry the X-Archive-Id the spool "
         "listed", "spool: %s\narchive: %s" % (sorted(queued),
                                               sorted(arrived)))
    for line in milter_log_since(w, log_start):
        print("milter: " + line)
    rc, counts, entries, text = spool_list(w)
    show_spool_list(w, text)
    summary("%d messages sent while the archive was down, Postfix accepted "
            "them at once; the copies waited in the spool and reached the "
            "archive %d of %d when it came back."
            % (len(results), len(copies), len(results)))


def show_refusal(w, t, args, path, names, seq):
    section("4. permanent refusal, default policy (rule legal): "
            "accepted, copy held")
    w.archive.set_faults({"RCPT": {re.escape(LEGAL_ARCHIVE): REFUSAL}})
    print("The archive relay now answers RCPT TO:<%s> with: %s"
          % (LEGAL_ARCHIVE, REFUSAL))
    print("One message from <%s> (%s):" % (LEGAL_SENDER, names[seq]))
    log_start = len(w.milter.log())
    main_before = w.main.count()
    r = h.send_files(w.postfix.port, LEGAL_SENDER, RCPTS, [path],
                     args.smtp_send)[0]
    print("Postfix answered: %s" % ("250 accepted" if r.ok
                                    else "%s %s" % (r.code, r.text)))
    t.ok(r.ok, "the original is accepted (a permanent refusal of the "
         "copy does not hold up mail by default)", repr(r))
    t.wait(lambda: w.main.count() > main_before, WAIT_RELAYED,
           "the original went on to the main relay")
    errors = [line for line in milter_log_since(w, log_start)
              if "status=held" in line]
    for line in milter_log_since(w, log_start):
        print("milter: " + line)

    rc, counts, entries, text = spool_list(w)
    show_spool_list(w, text)
    held = {i for i, (s, _) in entries.items() if s == "held"}
    held_line = next((entries[i][1] for i in held), "")
    t.ok(rc == 0 and counts.get("held") == 1 and len(held) == 1,
         "--spool-list shows the copy held", text)
    t.ok("rule=legal" in held_line and "550" in held_line,
         "the held copy names its rule and the relay's 550", held_line)
    t.ok(any("error:" in e and LEGAL_ARCHIVE in e for e in errors)
         and all(i in " ".join(errors) for i in held),
         "the milter logged an error line naming the address and the "
         "copy", "\n".join(errors) or "(no status=held line)")
    t.ok(not copies_from(w, LEGAL_SENDER, {seq}),
         "the archive has no copy of it yet")

    section("4a. the archive accepts again: --spool-retry all")
    w.archive.set_faults({})
    print("The archive relay accepts <%s> again." % LEGAL_ARCHIVE)
    log_start = len(w.milter.log())
    rc, out, err = w.milter.run_tool("--spool-retry", "all")
    print("# archive-milter -c %s --spool-retry all" % w.milter.conf_path)
    for line in (out + err).splitlines():
        print("  " + line)
    t.ok(rc == 0 and "released 1 held copy" in out,
         "--spool-retry released the held copy", out + err)
    start = time.monotonic()
    t.wait(lambda: copies_from(w, LEGAL_SENDER, {seq}), WAIT_RELEASED,
           "the archive received the released copy")
    print("Arrived %.1f s after --spool-retry (the milter scans its "
          "spool every few seconds)." % (time.monotonic() - start))
    copies = copies_from(w, LEGAL_SENDER, {seq})
    for m in copies:
        print_copy(m, names)
    t.ok(len(copies) == 1 and archive_id_of(copies[0].content) in held
         and copies[0].envelope_rcpts() == [LEGAL_ARCHIVE],
         "it went to <%s> with the X-Archive-Id that was held"
         % LEGAL_ARCHIVE)
    t.wait(lambda: not (w.milter.spool_files("hold")
                        or w.milter.spool_files("queue")), 10,
           "the spool is empty")
    for line in milter_log_since(w, log_start):
        print("milter: " + line)
    summary("1 message sent, the archive refused its copy with 550; Postfix "
            "accepted the original, the copy was held (logged as an error) "
            "and, after --spool-retry all, %s."
            % ("reached the archive" if copies else "did NOT reach the "
               "archive"))


# ------------------------------------------------------------------ #
# The run                                                              #
# ------------------------------------------------------------------ #


def write_messages(tmp, files, corpus, first_seq, names):
    paths = []
    for seq, src in enumerate(files, first_seq):
        path = os.path.join(tmp, "%03d.eml" % seq)
        with open(src, "rb") as f:
            data = tj.prepare(f.read(), seq)
        with open(path, "wb") as f:
            f.write(data)
        paths.append(path)
        names[seq] = os.path.relpath(src, corpus)
    return paths


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
    corpus = os.path.abspath(args.corpus)
    files = pick(corpus, args.per_folder)
    if not files:
        print("demo: no messages in %s (the shared corpus beside the "
              "repository, see README.md)" % corpus, file=sys.stderr)
        return 1
    tmp = tempfile.mkdtemp(prefix="archive-demo-msgs-")
    names = {}
    paths = write_messages(tmp, files, corpus, 1, names)
    bulk = write_messages(tmp, files[:3], corpus, 101, names)
    legal = write_messages(tmp, files[-1:], corpus, 201, names)

    t = Checks()
    try:
        world = h.World(
            milter_exe=args.milter, workdir=args.keep,
            milter_extra_conf=extra_rules(),
            milter_opts={
                # Only ordinary mail goes to the sync rule "everything".
                "policy": {"match_sender": "^sender@origin\\.example$"},
                "workers": 2,
                "spool_retry_min": 1,
                "spool_retry_max": 2,
            })
        # Never the system's /var/spool/archive-milter: the spool lives
        # in the demo's work directory and goes with it.
        world.milter_opts["spool_dir"] = os.path.join(world.workdir,
                                                      "milter", "spool")
        with world as w:
            section("started (all on 127.0.0.1)")
            print("postfix        port %d  (config %s)"
                  % (w.postfix.port, w.postfix.conf))
            print("archive-milter port %d  (config %s)"
                  % (w.milter.port, w.milter.conf_path))
            print("main relay     port %d" % w.main.port)
            print("archive relay  port %d" % w.archive.port)
            print("spool          %s" % w.milter.spool_dir)
            print()
            print("The milter's configuration:")
            with open(w.milter.conf_path) as f:
                for line in f:
                    if not line.startswith("#"):
                        print("    " + line.rstrip())

            show_corpus(w, t, args, paths, names)
            show_relay_down_sync(w, t, args, paths)
            show_spool(w, t, args, bulk, names, 101)
            show_refusal(w, t, args, legal[0], names, 201)
            section("stopping everything")
    except Exception as e:        # a step that could not run at all
        t.ok(False, "the demo ran to its end", "%s: %s"
             % (type(e).__name__, e))
    finally:
        h.REGISTRY.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    print()
    if t.failed:
        print("demo: FAILED: %d of %d checks did not hold:"
              % (len(t.failed), len(t.failed) + t.passed))
        for what in t.failed:
            print("  - " + what)
        return 1
    print("demo: all %d checks passed: sync copies with their envelope, "
          "4xx while the archive is down, spooled copies delivered when "
          "it came back, a refused copy held and sent again."
          % t.passed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
