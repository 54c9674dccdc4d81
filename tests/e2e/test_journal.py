#!/usr/bin/env python3
"""test_journal.py - issue 2 section 5: journal copies through a real Postfix

Every message of the corpus goes through a private Postfix whose
smtpd_milters is archive-milter, with two recipients and one envelope-only
(BCC) recipient.  Postfix relays the original to the main relay; the
milter sends one journal copy, synchronously at end of message, to the
archive relay.  Checks (one output line each, TAP style):

  * every corpus message is accepted by Postfix; a message Postfix
    itself refuses is reported as such, by name and reply, never skipped
    silently;
  * each message has exactly one archive copy, addressed to the archive
    address, whose prepended X-Envelope-From is the sender, whose
    X-Envelope-To lines are exactly the three envelope recipients, and
    which carries one X-Archive-Id; X-Archive-Ids are unique;
  * the rest of the copy equals what the main relay received: the body
    byte-identical and the header fields identical, apart from the ones
    Postfix adds after the milter has seen the message (see
    AFTER_MILTER below);
  * the milter logs one "status=sent" line per copy, by queue id;
  * a message arriving with a forged X-Archive-Id is archived like any
    other (two forgeries: a free-form one, and one shaped like a real id
    with its last characters changed);
  * with the archive relay stopped, Postfix answers 4xx at the end of
    DATA, nothing is queued and the main relay receives nothing new;
  * loop: with the copies sent back into the same Postfix, which routes
    the archive domain to the archive relay (transport_maps), each
    message still has exactly one copy (the milter knows its own
    X-Archive-Id and does not copy the copy).

Messages are matched by an X-Test-Seq header this test prepends, since
some corpus messages share a Message-ID.  The corpus is read-only: each
message is copied to a temporary file first, with line endings converted
to CRLF (a few corpus files use bare LF; Postfix would convert them
anyway) and a leading mbox "From " separator line removed (it is not part
of an RFC 5322 message, and after the prepended header it would end the
header block early).

Exit status: 0 all checks passed, 1 a check failed, 77 (meson: skipped)
when not run as root, 99 harness error.
"""

import argparse
import os
import re
import shutil
import sys
import tempfile
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402

SENDER = "sender@origin.example"
RCPTS = ["to1@dest.example", "to2@dest.example", "hidden-bcc@dest.example"]

# Headers Postfix adds after the milter has seen the message, measured on
# Postfix 3.7 with a milter that records every header and body callback
# (SMFIP_HDR_LEADSPC negotiated):
#
#   * Received: the smtpd's own trace header ("from [127.0.0.1] (localhost
#     [127.0.0.1]) by HOST (Postfix) with ESMTP id QUEUEID; DATE") is
#     written as the first header of the queue file but never sent to
#     milters.  It is the only difference.
#
# Everything cleanup does before the milter is seen by the milter too:
# the Message-Id:, Date: and From: it adds when missing (for clients in
# local_header_rewrite_clients, which includes 127.0.0.1 by default), the
# bare addresses it qualifies in headers ("To: bob" -> "To: bob@DOMAIN"),
# and the Return-Path:/Bcc: headers it removes.  Milter-added headers
# (smfi_addheader) would also differ; archive-milter adds none to the
# original.  Folded header values reach the milter with a bare LF before
# each continuation line, so the milter has to restore the CRLF.
AFTER_MILTER = ["received"]

# The copy's prepended envelope headers, in this order.


def Checks():
    return h.Checks(head=True)


# ------------------------------------------------------------------ #
# Preparing the messages                                               #
# ------------------------------------------------------------------ #


def corpus_files(root):
    """Every message file under root: all files but the README.md ones
    (one message, sample_output_multipart, has no .eml suffix)."""
    out = []
    for d, _, files in os.walk(root):
        for f in files:
            if not f.lower().endswith(".md") and not f.startswith("."):
                out.append(os.path.join(d, f))
    return sorted(out)


def prepare(raw, seq, extra_headers=b""):
    data = h.to_crlf(raw)
    if data.startswith(b"From "):
        data = data.split(b"\r\n", 1)[1] if b"\r\n" in data else b""
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    return b"X-Test-Seq: %d\r\n" % seq + extra_headers + data


def seq_of(content):
    header, _ = h.split_message(content)
    m = re.search(rb"(?m)^X-Test-Seq: (\d+)\r$", header)
    return int(m.group(1)) if m else None


# ------------------------------------------------------------------ #
# Comparing a copy with what the main relay received                   #
# ------------------------------------------------------------------ #


split_copy = h.split_copy
first_difference = h.first_difference


def check_envelope(env_fields):
    """Problems with the copy's envelope headers ([] when fine)."""
    return h.check_envelope(env_fields, SENDER, RCPTS)


def strip_after_milter(content):
    """The main relay's copy without the headers Postfix adds after the
    milter (AFTER_MILTER), and those headers."""
    header, _ = h.split_message(content)
    fields = h.header_fields(header)
    dropped = []
    pos = 0
    # Postfix's Received: is the first field; only leading ones go.
    for f in fields:
        if h.field_name(f) not in AFTER_MILTER:
            break
        dropped.append(f)
        pos += len(f)
    return content[pos:], dropped


def queue_id_of(main_content):
    m = re.search(rb"\(Postfix\) with E?SMTPS?A? id ([0-9A-Za-z]+)",
                  main_content)
    return m.group(1).decode() if m else None


# ------------------------------------------------------------------ #
# The test                                                             #
# ------------------------------------------------------------------ #


def run(args, t):
    if args.workdir:
        tmp = os.path.join(args.workdir, "msgs")
        os.makedirs(tmp, exist_ok=True)
    else:
        tmp = tempfile.mkdtemp(prefix="archive-e2e-msgs-")
        args.cleanup.append(tmp)
    files = corpus_files(args.corpus)
    if not t.ok(len(files) > 0, "corpus has messages (%d in %s)"
                % (len(files), args.corpus)):
        return

    # 1. Copies of the corpus, each with its X-Test-Seq.
    msgs = {}           # seq -> (name, path, bytes sent)
    for seq, src in enumerate(files, 1):
        with open(src, "rb") as f:
            data = prepare(f.read(), seq)
        path = os.path.join(tmp, "%04d.eml" % seq)
        with open(path, "wb") as f:
            f.write(data)
        msgs[seq] = (os.path.relpath(src, args.corpus), path, data)

    # Two forgeries, sent after the corpus (the second is shaped after a
    # real id, so it is made once one exists).
    forged_seq = len(files) + 1
    with open(files[0], "rb") as f:
        sample = f.read()

    with h.World(milter_exe=args.milter, fake_smtpd=args.fake_smtpd,
                 workdir=args.workdir) as w:
        t.note("workdir %s; postfix :%d, main relay :%d, archive relay "
               ":%d, milter :%s" % (w.workdir, w.postfix.port, w.main.port,
                                    w.archive.port,
                                    w.milter.port if w.milter else "-"))

        # 2. Push the corpus through Postfix.
        paths = [msgs[s][1] for s in sorted(msgs)]
        results = h.send_files(w.postfix.port, SENDER, RCPTS, paths,
                               args.smtp_send)
        accepted = set()
        for seq, r in zip(sorted(msgs), results):
            name = msgs[seq][0]
            if r.ok:
                accepted.add(seq)
                if r.refused:
                    t.ok(False, "%s: no recipient refused" % name,
                         r.refused)
            else:
                # Reported, never skipped: a refusal by Postfix itself
                # (5xx and not the milter's) is a finding about the
                # corpus; anything else is a failure of the product.
                t.ok(False, "%s: accepted by Postfix (answer %s %s)"
                     % (name, r.code, r.text), w.postfix.log()[-3000:])
        t.ok(len(accepted) == len(msgs),
             "Postfix accepted %d of %d corpus messages"
             % (len(accepted), len(msgs)))

        # 3. The forged X-Archive-Id messages.
        forged = {}
        real_ids = []
        if w.milter:
            h.wait_for(lambda: w.archive.count() >= len(accepted), 60,
                       "archive copies")
            for m in w.archive.messages()[:1]:
                env, _ = split_copy(m.content)
                real_ids = [h.field_value(f) for f in env
                            if h.field_name(f) == "x-archive-id"]
        fakes = ["forged-by-a-stranger-0001"]
        if real_ids and len(real_ids[0]) > 4:
            rid = real_ids[0]
            tail = "".join("0" if c != "0" else "1" for c in rid[-4:])
            fakes.append(rid[:-4] + tail)
        for i, fake in enumerate(fakes):
            seq = forged_seq + i
            data = prepare(sample, seq, b"X-Archive-Id: %s\r\n"
                           % fake.encode())
            path = os.path.join(tmp, "forged-%d.eml" % i)
            with open(path, "wb") as f:
                f.write(data)
            msgs[seq] = ("forged X-Archive-Id %r" % fake, path, data)
            forged[seq] = fake
            r = h.send_files(w.postfix.port, SENDER, RCPTS, [path],
                             args.smtp_send)[0]
            if t.ok(r.ok, "message with forged X-Archive-Id %r accepted"
                    % fake, r):
                accepted.add(seq)

        # 4. Wait for the main relay (Postfix delivers asynchronously)
        # and for an empty queue.
        try:
            h.wait_for(lambda: w.main.count() >= len(accepted), 120,
                       "%d messages on the main relay" % len(accepted))
            h.wait_for(lambda: not w.postfix.queue_ids(), 60,
                       "an empty Postfix queue")
        except h.Timeout as e:
            t.ok(False, "main relay received everything", "%s\n%s"
                 % (e, w.postfix.log()[-3000:]))
        main_by_seq = {}
        for m in w.main.messages():
            main_by_seq.setdefault(seq_of(m.content), []).append(m)
        arch_by_seq = {}
        for m in w.archive.messages():
            arch_by_seq.setdefault(seq_of(m.content), []).append(m)

        # 5. One line per message.
        ids = {}
        for seq in sorted(accepted):
            name = msgs[seq][0]
            mains = main_by_seq.get(seq, [])
            copies = arch_by_seq.get(seq, [])
            problems = []
            if len(mains) != 1:
                problems.append("%d messages on the main relay, want 1"
                                % len(mains))
            elif sorted(mains[0].envelope_rcpts()) != sorted(RCPTS):
                problems.append("main relay envelope %r"
                                % mains[0].envelope_rcpts())
            if not w.milter:
                if mains:
                    body, dropped = strip_after_milter(mains[0].content)
                    if [h.field_name(f) for f in dropped] != AFTER_MILTER:
                        problems.append("no leading Postfix Received: %r"
                                        % dropped)
                t.ok(not problems, "%s: relayed" % name,
                     "\n".join(problems))
                continue
            if len(copies) != 1:
                problems.append("%d archive copies, want exactly 1"
                                % len(copies))
            else:
                c = copies[0]
                if c.envelope_rcpts() != [w.ARCHIVE_TO]:
                    problems.append("copy sent to %r, want [%s]"
                                    % (c.envelope_rcpts(), w.ARCHIVE_TO))
                if c.envelope_sender() != "":
                    problems.append("copy's MAIL FROM %r, want <>"
                                    % c.mail_from)
                env, rest = split_copy(c.content)
                env_problems, aid = check_envelope(env)
                problems += env_problems
                if aid:
                    ids.setdefault(aid, []).append(name)
                if seq in forged and aid == forged[seq]:
                    problems.append("the forged X-Archive-Id was kept "
                                    "as the copy's own")
                if len(mains) == 1:
                    want, dropped = strip_after_milter(mains[0].content)
                    if [h.field_name(f) for f in dropped] != AFTER_MILTER:
                        problems.append("main relay copy does not start "
                                        "with Postfix's Received: %r"
                                        % dropped[:1])
                    if rest != want:
                        problems.append("copy differs from the main "
                                        "relay's: "
                                        + first_difference(rest, want))
            t.ok(not problems, "%s: one archive copy, envelope headers, "
                 "content equal to the relayed message" % name,
                 "\n".join(problems))

        stray = [s for s in arch_by_seq if s not in accepted]
        if w.milter:
            t.ok(not stray, "no archive copy without a matching message",
                 stray)
            dup = {a: n for a, n in ids.items() if len(n) > 1}
            t.ok(not dup, "X-Archive-Id unique per copy", dup)

            # 6. One log line per copy, by queue id.
            log = w.milter.log()
            missing = []
            for seq in sorted(accepted):
                for m in main_by_seq.get(seq, [])[:1]:
                    qid = queue_id_of(m.content)
                    rx = (r"%s: archive=<%s>, relay=\S+, delay=[\d.]+, "
                          r"dsn=2\.\d+\.\d+, status=sent \("
                          % (re.escape(qid or "?"),
                             re.escape(w.ARCHIVE_TO)))
                    if not qid or not re.search(rx, log):
                        missing.append("%s (queue id %s)"
                                       % (msgs[seq][0], qid))
            t.ok(not missing, "milter logged one status=sent line per "
                 "copy", "missing: %s\nlog tail:\n%s"
                 % (", ".join(missing[:10]), log[-2000:]))

            # 7. Archive relay down: 4xx at end of DATA, nothing accepted.
            before_main = w.main.count()
            w.archive.stop()
            down = [msgs[1][1], msgs[max(s for s in msgs
                                         if s not in forged)][1]]
            rs = h.send_files(w.postfix.port, SENDER, RCPTS, down,
                              args.smtp_send)
            for r in rs:
                t.ok(not r.ok and 400 <= r.code < 500
                     and r.stage in ("end-of-data", None),
                     "archive relay down: Postfix answers 4xx at the end "
                     "of DATA for %s (got %s %s, stage %s)"
                     % (os.path.basename(r.path), r.code, r.text,
                        r.stage), r)
            queued = w.postfix.queue_ids()
            t.ok(not queued, "archive relay down: nothing queued by "
                 "Postfix", queued)
            w.postfix.flush()
            t.ok(w.main.count() == before_main,
                 "archive relay down: main relay received nothing new "
                 "(%d -> %d)" % (before_main, w.main.count()))
            t.ok(re.search(r"status=(deferred|bounced)", w.milter.log())
                 is not None, "archive relay down: milter logged the "
                 "failed copy", w.milter.log()[-1500:])

    if args.milter:
        run_loop(args, t, [msgs[s] for s in sorted(msgs)[:5]])


def run_loop(args, t, sample):
    """The archive is a transport of the same Postfix: the milter sends
    its copy back into Postfix, which routes archive.example to the
    archive relay.  The copy passes the milter again and must not be
    copied again (its X-Archive-Id is one the milter issued)."""
    with h.World(milter_exe=args.milter, fake_smtpd=args.fake_smtpd,
                 workdir=args.workdir and os.path.join(args.workdir,
                                                       "loop"),
                 loop=True) as w:
        t.note("loop: postfix :%d routes %s to the archive relay :%d; "
               "the milter sends copies to postfix"
               % (w.postfix.port, w.ARCHIVE_TO, w.archive.port))
        rs = h.send_files(w.postfix.port, SENDER, RCPTS,
                          [p for _, p, _ in sample], args.smtp_send)
        n = sum(1 for r in rs if r.ok)
        t.ok(n == len(sample), "loop: Postfix accepted %d of %d messages"
             % (n, len(sample)), rs)
        try:
            h.wait_for(lambda: w.main.count() >= n
                       and w.archive.count() >= n, 60,
                       "main and archive relays")
            h.wait_for(lambda: not w.postfix.queue_ids(), 60,
                       "an empty Postfix queue")
        except h.Timeout as e:
            t.ok(False, "loop: delivered", "%s\n%s"
                 % (e, w.postfix.log()[-3000:]))
        copies = w.archive.messages()
        per_seq = {}
        for c in copies:
            per_seq.setdefault(seq_of(c.content), []).append(c)
        problems = []
        for name, _, data in sample:
            seq = seq_of(data)
            got = per_seq.get(seq, [])
            if len(got) != 1:
                problems.append("%s: %d archive copies" % (name, len(got)))
                continue
            header, _ = h.split_message(got[0].content)
            names = [h.field_name(f) for f in h.header_fields(header)]
            if names.count("x-envelope-from") != 1:
                problems.append("%s: %d X-Envelope-From (a copy of a "
                                "copy?)" % (name, names.count(
                                    "x-envelope-from")))
        t.ok(not problems and len(copies) == n,
             "loop: one archive copy per message, none of the copies "
             "copied again (%d copies for %d messages)"
             % (len(copies), n), "\n".join(problems))
        sent = len(re.findall(r"status=sent", w.milter.log()))
        t.ok(sent == n, "loop: milter logged %d copies sent, want %d"
             % (sent, n), w.milter.log()[-2000:])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--milter", default=os.environ.get("ARCHIVE_MILTER"),
                   help="archive-milter binary (default $ARCHIVE_MILTER); "
                   "without one only Postfix and the relays are checked")
    p.add_argument("--smtp-send", default=os.environ.get("SMTP_SEND"),
                   help="smtp-send binary (default $SMTP_SEND; without "
                   "one Python's smtplib sends)")
    p.add_argument("--fake-smtpd", default=os.environ.get("E2E_FAKE_SMTPD"),
                   help="use fake-smtpd as the relays (default: the "
                   "harness's own storing sink)")
    p.add_argument("--corpus", default=os.environ.get(
        "E2E_CORPUS", os.path.join(os.path.dirname(__file__),
                                   "../../../shared/corpus")))
    p.add_argument("--workdir", help="keep everything in this directory")
    args = p.parse_args()
    for attr in ("milter", "smtp_send", "fake_smtpd"):
        v = getattr(args, attr)
        if v and not os.access(v, os.X_OK):
            print("# %s %s is not executable; not used" % (attr, v))
            setattr(args, attr, None)
    args.corpus = os.path.abspath(args.corpus)

    if os.geteuid() != 0:
        print("1..0 # SKIP a private Postfix instance needs root")
        return 77
    if not args.milter:
        print("# no archive-milter: checking Postfix and the relays only")
    print("# sending with %s" % (args.smtp_send or "Python smtplib"))
    print("# relays: %s" % (args.fake_smtpd or "the harness's storing sink"))

    h.install_signal_handlers()
    args.cleanup = []
    t = Checks()
    try:
        run(args, t)
    except Exception:
        t.ok(False, "harness completed", traceback.format_exc())
        print("1..%d" % t.n)
        return 99 if t.failed == 1 else 1
    finally:
        h.REGISTRY.stop_all()
        for d in args.cleanup:
            shutil.rmtree(d, ignore_errors=True)
    print("1..%d" % t.n)
    print("# %d checks, %d failed" % (t.n, t.failed))
    return 1 if t.failed else 0


if __name__ == "__main__":
    sys.exit(main())
