#!/usr/bin/env python3
"""test_sendmail.py - archive-milter through a real Sendmail 8.17

The other end-to-end tests use Postfix; this one runs the real
archive-milter behind a real Sendmail (the Debian 12 packages unpacked by
packaging/setup-sendmail-root.sh, started by sendmail_harness.py in
namespaces of its own), with two storing relays on loopback: the main
relay (Sendmail's SMART_HOST) and the archive relay.  One Sendmail and
one milter serve every case; the milter's rules pick the case by
envelope recipient:

  corpus      a few messages of each corpus folder, plus one message of
              awkward header values (leading spaces, a tab, no space,
              folds, trailing blanks, an empty value), each with two
              header recipients and one envelope-only (BCC) recipient.
              The main relay gets each message once; the archive relay
              one copy each, with X-Envelope-From, one X-Envelope-To per
              envelope recipient (the BCC too) and an X-Archive-Id.
              The copy is the message as the client sent it, byte for
              byte (SMFIP_HDR_LEADSPC: Sendmail gives header values
              unchanged); its body equals what the main relay got, and
              its header fields are those of the main relay's message
              once the ones Sendmail adds or rewrites after the milter
              are set aside (SENDMAIL_ADDS, SENDMAIL_REWRITES).
  queue ids   the milter's "status=sent" line for each copy carries the
              Sendmail queue id that Sendmail's own log and its
              Received: header give that message, and names the copy's
              X-Archive-Id.
  header      on_sent = accept+header: the main relay's message carries
              "X-Archive-Status: sent; id=ID" (one space after the
              colon), ID being the archived copy's X-Archive-Id.
  sync-down   a sync rule whose relay is down: Sendmail answers 451
              4.3.0 at the end of DATA, keeps nothing in its queue, and
              the main relay gets nothing.
  spool-down  a spool rule whose relay is down: Sendmail accepts, the
              main relay gets the original, the copy waits in the
              spool's queue/; once the relay listens, the copy arrives
              with its envelope headers and queue/ empties.
  hold        the archive relay refuses the archive address with 550,
              default policy: accepted, relayed, the copy in hold/.
  quarantine  relay down, on_unreachable = spool+quarantine+header:
              smfi_quarantine puts the message into Sendmail's
              quarantine (its queue file becomes hfQUEUEID, with a "q"
              line holding our reason, listed by `mailq -qQ`), the main
              relay gets nothing, the held queue file carries
              X-Archive-Status; released with `sendmail -Q -qI`, it is
              delivered with that header.
  protocol    Sendmail reaches the milter through a tap (a loopback
              proxy in this process) that records both directions: one
              negotiation for all sessions, with SMFIP_HDR_LEADSPC, no
              command sent that the milter declined (SMFIP_NO*), and
              exactly one answer to each command owed one (none to the
              events of the SMFIP_NR_* flags negotiated).
  milter-down the milter killed: with F=T Sendmail answers 451 4.3.2 at
              MAIL and takes nothing.

Output is TAP.  Exit 0 all passed, 1 a check failed, 77 skipped (not
root, or no archive-milter), 99 harness error.
"""

import argparse
import difflib
import os
import re
import shutil
import smtplib
import sys
import tempfile
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402
import sendmail_harness as smh  # noqa: E402

SENDER = "sender@origin.example"
RCPTS = ["to1@dest.example", "to2@dest.example", "hidden-bcc@dest.example"]
ARCHIVE_TO = "journal@archive.example"
REFUSED = "refused@archive.example"

# What Sendmail 8.17.1.9 (this .mc, the esmtp mailer) does to a message
# after every milter has seen it, measured on the whole corpus: the
# milter, and so the archive copy, has the message as Sendmail received
# it, and the main relay gets it changed as follows.  Unlike Postfix,
# whose cleanup does most of this before its milters, Sendmail does it
# when it writes the queue file or when it delivers.
#
#   SENDMAIL_ADDS: its Received: (always, first), then Date:, From: and
#     Message-Id: when the client sent none (the .cf's H?D?, H?F? and
#     H?M? lines), in that order, before the client's fields.
#   SENDMAIL_DROPS: Return-Path:, Bcc: and Content-Length: are not
#     passed on to the next hop (the milter sees them: the archive copy
#     keeps the client's Bcc: line, where Postfix removes it before its
#     milters).
#   SENDMAIL_REWRITES: the address fields, which its header rulesets
#     rewrite (an unqualified "bob" gets "@mta.sendmail.test", an
#     address list is re-spaced, comments move, a display name gets
#     quotes).  Such a field may differ; the difference is printed as a
#     # line, not failed.  Every other field must be byte-equal.
#   The body of a multipart message goes through Sendmail's MIME walk
#     (mime_walk_changes): a missing closing boundary "--B--" is
#     written, and an embedded message/rfc822 part loses its mbox
#     "From " line.  Those are the only body changes seen; each is
#     allowed, and printed, only in exactly that form.
#   Not in the corpus, so not allowed here: a line longer than the
#     esmtp mailer's L=990 is broken at delivery with "!", CRLF and a
#     space (seen with a 1200-octet line), and the copy keeps it whole.
#
# Before the milter, Sendmail also drops blanks between a field name
# and its colon ("To    :" arrives as "To:") and ends the header block
# at the first line that is not a field, inserting an empty line there;
# the copy then differs from what the client sent (printed, not failed:
# checked only for messages whose header block is well formed).
SENDMAIL_ADDS = ["received", "date", "from", "message-id"]
SENDMAIL_DROPS = {"return-path", "bcc", "content-length"}
SENDMAIL_REWRITES = {"from", "to", "cc", "bcc", "reply-to", "sender",
                     "resent-from", "resent-to", "resent-cc", "resent-bcc",
                     "resent-reply-to", "resent-sender", "return-receipt-to",
                     "errors-to", "apparently-to",
                     "disposition-notification-to"}

# The copy's prepended envelope headers.

# Header values a milter without SMFIP_HDR_LEADSPC would change: no
# space, two spaces, a tab, a fold with a tab and one with spaces,
# trailing blanks, an empty value.
AWKWARD_HEADERS = (b"From: Awkward Sender <sender@origin.example>\r\n"
                   b"To: to1@dest.example, to2@dest.example\r\n"
                   b"Subject:  two spaces before\r\n"
                   b"Date: Fri, 04 Dec 2026 10:00:00 +0000\r\n"
                   b"Message-ID: <awkward.%d@sendmail.test>\r\n"
                   b"X-No-Space:value\r\n"
                   b"X-Tab:\tafter a tab\r\n"
                   b"X-Fold: first\r\n\tsecond after a tab\r\n"
                   b"   third after spaces\r\n"
                   b"X-Trailing: blanks  \t\r\n"
                   b"X-Empty:\r\n"
                   b"X-Spaces:    \r\n")
AWKWARD_BODY = (b"Body of the awkward message.\r\n"
                b".a line starting with a dot\r\n"
                b"\r\n"
                b"  leading blanks and \xc3\xa9 8-bit\r\n")


Checks = h.Checks


# ------------------------------------------------------------------ #
# Messages                                                             #
# ------------------------------------------------------------------ #


def corpus_sample(root, per_folder):
    """The first `per_folder` message files (sorted) of each folder under
    root; all of them when per_folder is 0.  README.md files are not
    messages."""
    out = []
    for d, dirs, files in os.walk(root):
        dirs.sort()
        names = sorted(f for f in files
                       if not f.lower().endswith(".md")
                       and not f.startswith("."))
        out += [os.path.join(d, f)
                for f in (names[:per_folder] if per_folder else names)]
    return out


def prepare(raw, seq):
    """The bytes to send: CRLF line ends, no mbox "From " line, and an
    X-Test-Seq header first, by which the relays' messages are matched
    (some corpus messages share a Message-ID)."""
    data = h.to_crlf(raw)
    if data.startswith(b"From "):
        data = data.split(b"\r\n", 1)[1] if b"\r\n" in data else b""
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    return b"X-Test-Seq: %d\r\n" % seq + data


def seq_of(content):
    header, _ = h.split_message(content)
    m = re.search(rb"(?m)^X-Test-Seq: (\d+)\r$", header)
    return int(m.group(1)) if m else None


def tagged(messages, tag):
    """Messages whose Subject is "sendmail-test TAG"."""
    want = ("Subject: sendmail-test %s\r\n" % tag).encode()
    return [m for m in messages if want in m.content]


def case_message(tag, rcpt):
    return ("From: <%s>\r\nTo: <%s>\r\nSubject: sendmail-test %s\r\n"
            "Message-ID: <%s.%d@sendmail.test>\r\n\r\nbody of %s\r\n"
            % (SENDER, rcpt, tag, tag, os.getpid(), tag)).encode()


def send_one(port, rcpt, tag):
    """One message of a policy case: (code, text) of the end of DATA
    (250 when accepted)."""
    c = smtplib.SMTP(h.LOOPBACK, port, timeout=60)
    try:
        c.sendmail(SENDER, [rcpt], case_message(tag, rcpt))
        return (250, "")
    except smtplib.SMTPDataError as e:
        return (e.smtp_code, e.smtp_error.decode("utf-8", "replace"))
    except smtplib.SMTPRecipientsRefused as e:
        code, text = list(e.recipients.values())[0]
        return (code, text.decode("utf-8", "replace"))
    finally:
        try:
            c.quit()
        except (smtplib.SMTPException, OSError):
            pass


def header_value(content, name):
    """The raw value of the first `name` field (after the colon, CRLF
    and folds kept), or None."""
    header, _ = h.split_message(content)
    for f in h.header_fields(header):
        if h.field_name(f) == name.lower():
            return f.split(b":", 1)[1].decode("utf-8", "replace")
    return None


split_copy = h.split_copy


def queue_id_of(content):
    """Sendmail's queue id from its Received: line."""
    m = re.search(rb"\(8\.[\d.]+/[\d.]+\) with E?SMTP id (%s)"
                  % smh.QUEUE_ID_RX.encode(), content)
    return m.group(1).decode() if m else None


# ------------------------------------------------------------------ #
# Comparing                                                            #
# ------------------------------------------------------------------ #


def check_envelope(env_fields, rcpts):
    return h.check_envelope(env_fields, SENDER, rcpts)


def well_formed(header):
    """True when every line of the header block is a field (a name of
    printable characters without blanks, then a colon) or a
    continuation line."""
    lines = header.split(b"\r\n")[:-1]
    return all(re.match(rb"[!-9;-~]+:", ln) or ln[:1] in (b" ", b"\t")
               for ln in lines)


def declared_boundaries(message):
    """The multipart boundaries a message declares, as Sendmail reads
    them: a quoted value whole, an unquoted one up to the first blank or
    tspecial (RFC 2045), so "boundary=----=_Part_1" declares "----"."""
    quoted = re.findall(rb'(?i)\bboundary\s*=\s*"([^"\r\n]*)"', message)
    bare = re.findall(rb'(?i)\bboundary\s*=\s*([^\s;()<>@,:\\"/\[\]?=]+)',
                      message)
    return set(quoted) | set(bare)


def mime_walk_changes(copy_message, copy_body, main_body):
    """When main_body differs from copy_body only as Sendmail's MIME
    walk at delivery changes a body, a list of those changes; else
    None.  The walk (mime8to7() in Sendmail's mime.c, which re-emits a
    multipart body part by part) writes a closing boundary "--B--" that
    the message lacks, for a boundary B it declares (in its header or
    a part's), and reads the
    header of an embedded message/rfc822 part as a header, dropping its
    mbox "From " line."""
    a = copy_body.split(b"\r\n")
    b = main_body.split(b"\r\n")
    boundaries = declared_boundaries(copy_message)
    changes = []
    sm = difflib.SequenceMatcher(None, a, b, autojunk=False)
    for op, i1, i2, j1, j2 in sm.get_opcodes():
        if op == "equal":
            continue
        if op == "insert" and all(
                ln.startswith(b"--") and ln.endswith(b"--")
                and ln[2:-2] in boundaries for ln in b[j1:j2]):
            changes += [b"+" + ln for ln in b[j1:j2]]
        elif op == "delete" and all(
                ln.startswith(b"From ") for ln in a[i1:i2]) \
                and i1 > 0 and a[i1 - 1] == b"":
            changes += [b"-" + ln for ln in a[i1:i2]]
        else:
            return None
    return changes or None


def compare_with_main(copy_rest, main, sent_names):
    """Problems (failures) and notes (Sendmail's own changes) found when
    the copy, without its envelope headers, is set beside what the main
    relay got."""
    problems, notes = [], []
    ch, cb = h.split_message(copy_rest)
    mh, mb = h.split_message(main)
    cb, mb = cb or b"", mb or b""
    if cb != mb:
        changes = mime_walk_changes(copy_rest, cb, mb)
        if changes:
            notes.append("Sendmail's MIME walk changed the body: %r"
                         % changes)
        else:
            i = next((k for k in range(min(len(cb), len(mb)))
                      if cb[k] != mb[k]), min(len(cb), len(mb)))
            problems.append("body differs at byte %d (lengths %d, %d): "
                            "copy %r, main relay %r"
                            % (i, len(cb), len(mb), cb[i:i + 60],
                               mb[i:i + 60]))

    # Sendmail's own fields lead: Received: always, then those of
    # Date:, From: and Message-Id: that the client did not send.
    cf = [f for f in h.header_fields(ch)
          if h.field_name(f) not in SENDMAIL_DROPS]
    mf = h.header_fields(mh or b"")
    if not (mf and h.field_name(mf[0]) == "received"
            and b"by mta.sendmail.test (8." in mf[0]):
        problems.append("main relay: no leading Received: from Sendmail "
                        "(%r)" % mf[:1])
    else:
        mf = mf[1:]
    while mf and h.field_name(mf[0]) in SENDMAIL_ADDS[1:] \
            and h.field_name(mf[0]) not in sent_names:
        mf = mf[1:]
    dropped = [f for f in mf if h.field_name(f) in SENDMAIL_DROPS]
    if dropped:
        problems.append("main relay has fields Sendmail drops: %r"
                        % dropped)
    if [h.field_name(f) for f in cf] != [h.field_name(f) for f in mf]:
        problems.append("header names differ: copy %r, main relay %r"
                        % ([h.field_name(f) for f in cf],
                           [h.field_name(f) for f in mf]))
        return problems, notes
    for x, y in zip(cf, mf):
        if x == y:
            continue
        if h.field_name(x) in SENDMAIL_REWRITES:
            notes.append("Sendmail rewrote %r -> %r" % (x, y))
        else:
            problems.append("header field differs: copy %r, main relay %r"
                            % (x, y))
    return problems, notes


# ------------------------------------------------------------------ #
# The world                                                            #
# ------------------------------------------------------------------ #


def rule(name, pairs):
    return "[rule:%s]\nmode = journal\n%s\n" % (
        name, "".join("%s = %s\n" % kv for kv in pairs))


def rules_conf(down_port, late_port):
    """The rules after the first (corpus, written by harness.Milter)."""
    return ("[relay:down]\nhost = 127.0.0.1\nport = %d\ntimeout = 2\n\n"
            "[relay:late]\nhost = 127.0.0.1\nport = %d\ntimeout = 5\n\n"
            % (down_port, late_port)
            + rule("header", [("relay", "archive"),
                              ("archive_to", ARCHIVE_TO),
                              ("match_recipient", "^header@"),
                              ("on_sent", "accept+header")])
            + rule("syncdown", [("relay", "down"),
                                ("archive_to", ARCHIVE_TO),
                                ("delivery", "sync"),
                                ("match_recipient", "^sync-down@")])
            + rule("spooldown", [("relay", "late"),
                                 ("archive_to", ARCHIVE_TO),
                                 ("delivery", "spool"),
                                 ("match_recipient", "^spool-down@")])
            + rule("hold", [("relay", "archive"), ("archive_to", REFUSED),
                            ("match_recipient", "^hold@")])
            + rule("quarantine", [("relay", "down"),
                                  ("archive_to", ARCHIVE_TO),
                                  ("match_recipient", "^quarantine@"),
                                  ("on_unreachable",
                                   "spool+quarantine+header")]))


# ------------------------------------------------------------------ #
# The cases                                                            #
# ------------------------------------------------------------------ #


def run_corpus(t, w, args, tmp):
    files = [f for f in corpus_sample(args.corpus, args.per_folder)
             if not args.only or re.search(args.only, f)]
    if not t.ok(files, "corpus sample (%d messages, %d per folder, from %s)"
                % (len(files), args.per_folder, args.corpus)):
        return
    msgs = {}       # seq -> (name, path, bytes sent)
    for seq, src in enumerate(files, 1):
        with open(src, "rb") as f:
            msgs[seq] = (os.path.relpath(src, args.corpus), None,
                         prepare(f.read(), seq))
    awkward = len(files) + 1
    msgs[awkward] = ("awkward header values", None,
                     b"X-Test-Seq: %d\r\n" % awkward
                     + AWKWARD_HEADERS % os.getpid() + b"\r\n"
                     + AWKWARD_BODY)
    for seq in msgs:
        path = os.path.join(tmp, "%04d.eml" % seq)
        with open(path, "wb") as f:
            f.write(msgs[seq][2])
        msgs[seq] = (msgs[seq][0], path, msgs[seq][2])

    # Step 1: through Sendmail, all over one connection.
    results = h.send_files(w.sendmail.port, SENDER, RCPTS,
                           [msgs[s][1] for s in sorted(msgs)],
                           args.smtp_send)
    accepted = set()
    for seq, r in zip(sorted(msgs), results):
        if r.ok and not r.refused:
            accepted.add(seq)
        else:
            t.ok(False, "%s: accepted by Sendmail" % msgs[seq][0],
                 "%r %r\n%s" % (r, r.refused, w.sendmail.log()[-2000:]))
    t.ok(len(accepted) == len(msgs), "Sendmail accepted %d of %d messages "
         "for all three recipients" % (len(accepted), len(msgs)))

    # Step 2: Sendmail delivers in the background; wait for all.
    try:
        h.wait_for(lambda: w.main.count() >= len(accepted)
                   and w.archive.count() >= len(accepted), 60,
                   "%d messages on both relays" % len(accepted))
        h.wait_for(lambda: not w.sendmail.queue_ids("qf"), 30,
                   "an empty Sendmail queue")
    except h.Timeout as e:
        t.ok(False, "main and archive relays received everything",
             "%s\n%s" % (e, w.sendmail.log()[-3000:]))
    mains, copies = {}, {}
    for m in w.main.messages():
        mains.setdefault(seq_of(m.content), []).append(m)
    for m in w.archive.messages():
        copies.setdefault(seq_of(m.content), []).append(m)

    # Step 3: one line per message.
    ids = {}
    qids = {}
    rewritten = []
    for seq in sorted(accepted):
        name, _, sent = msgs[seq]
        problems = []
        ms, cs = mains.get(seq, []), copies.get(seq, [])
        if len(ms) != 1:
            problems.append("%d messages on the main relay, want 1"
                            % len(ms))
        elif sorted(ms[0].envelope_rcpts()) != sorted(RCPTS):
            problems.append("main relay envelope %r"
                            % ms[0].envelope_rcpts())
        if len(cs) != 1:
            problems.append("%d archive copies, want 1" % len(cs))
        else:
            c = cs[0]
            if c.envelope_rcpts() != [ARCHIVE_TO] or c.envelope_sender():
                problems.append("copy's envelope %s -> %r, want <> -> %s"
                                % (c.mail_from, c.rcpts, ARCHIVE_TO))
            env, rest = split_copy(c.content)
            env_problems, aid = check_envelope(env, RCPTS)
            problems += env_problems
            if aid:
                ids.setdefault(aid, []).append(name)
            if rest != sent:
                diff = ("copy is not the message as sent: "
                        + first_difference(rest, sent))
                if well_formed(h.split_message(sent)[0]):
                    problems.append(diff)
                else:
                    rewritten.append("%s (header block not well "
                                     "formed): %s" % (name, diff))
            if len(ms) == 1:
                # The fields Sendmail took as the client's (a line
                # that is no field ends its header block).
                sent_names = {h.field_name(f) for f in h.header_fields(
                    h.split_message(rest)[0])}
                p, notes = compare_with_main(rest, ms[0].content,
                                             sent_names)
                problems += p
                rewritten += ["%s: %s" % (name, n) for n in notes]
                qid = queue_id_of(ms[0].content)
                if qid:
                    qids[seq] = (qid, aid)
                else:
                    problems.append("no Sendmail queue id in the main "
                                    "relay's Received:")
        t.ok(not problems, "%s: relayed once, one copy with the envelope, "
             "equal to the message sent and to the relayed one" % name,
             "\n".join(problems))
    for n in rewritten:
        t.note(n)
    dup = {a: n for a, n in ids.items() if len(n) > 1}
    t.ok(ids and not dup, "X-Archive-Id unique per copy", dup)
    stray = [s for s in copies if s not in accepted]
    t.ok(not stray, "no archive copy without its message", stray)

    # Step 4: the awkward headers, field by field, at both relays.
    if awkward in accepted and copies.get(awkward) and mains.get(awkward):
        sent_fields = h.header_fields(h.split_message(msgs[awkward][2])[0])
        copy_fields = h.header_fields(h.split_message(
            split_copy(copies[awkward][0].content)[1])[0])
        main_fields = h.header_fields(h.split_message(
            mains[awkward][0].content)[0])
        for f in sent_fields:
            nm = h.field_name(f)
            if nm in SENDMAIL_REWRITES or nm == "x-test-seq":
                continue
            t.ok(f in copy_fields and f in main_fields,
                 "header byte-exact in the copy and at the main relay: %r"
                 % f, "copy: %r\nmain relay: %r"
                 % ([x for x in copy_fields if h.field_name(x) == nm],
                    [x for x in main_fields if h.field_name(x) == nm]))

    # Step 5: queue ids.
    slog, mlog = w.sendmail.log(), w.milter.log()
    missing = []
    for seq, (qid, aid) in sorted(qids.items()):
        ours = re.search(r"(?m)^.*%s: archive=<%s>, relay=\S+, delay=[\d.]+,"
                         r" dsn=2\.\d\.\d, status=sent \(.*$"
                         % (re.escape(qid), re.escape(ARCHIVE_TO)), mlog)
        decision = re.search(r"%s: action=accept, copies=1, failed=0 \(\w+: "
                             r"sent -> accept, id=%s\)"
                             % (re.escape(qid), re.escape(aid or "?")),
                             mlog)
        theirs = re.search(r"%s: from=<%s>, .*daemon=MTA"
                           % (re.escape(qid), re.escape(SENDER)), slog)
        if not (ours and decision and theirs):
            missing.append("%s: queue id %s: ours %s, decision %s, "
                           "Sendmail's %s" % (msgs[seq][0], qid,
                                              bool(ours), bool(decision),
                                              bool(theirs)))
    t.ok(qids and not missing, "the milter's sent and decision lines "
         "carry Sendmail's queue id (%d messages) and the copy's id"
         % len(qids), "\n".join(missing[:10]) + "\n" + mlog[-1500:])


def first_difference(a, b):
    return h.first_difference(a, b, "copy", "other")


def run_header(t, w):
    code, text = send_one(w.sendmail.port, "header@case.example", "header")
    t.ok(code == 250, "header: accepted", "%d %s" % (code, text))
    try:
        h.wait_for(lambda: tagged(w.main.messages(), "header"), 30,
                   "the original at the main relay")
    except h.Timeout as e:
        t.ok(False, "header: relayed", "%s\n%s" % (e, w.sendmail.log()))
        return
    orig = tagged(w.main.messages(), "header")[0].content
    copy = tagged(w.archive.messages(), "header")
    cid = header_value(copy[0].content, "X-Archive-Id") if copy else None
    status = header_value(orig, "X-Archive-Status")
    t.ok(cid and status == " sent; id=%s\r\n" % cid.strip(),
         "header: the relayed original has X-Archive-Status: sent; "
         "id=<the copy's X-Archive-Id>, one space after the colon",
         "status %r, copy id %r" % (status, cid))
    # Sendmail appends a milter's header after the others.
    names = [h.field_name(f) for f in
             h.header_fields(h.split_message(orig)[0])]
    t.ok(names[-1:] == ["x-archive-status"],
         "header: Sendmail put it after the message's own fields", names)


def run_sync_down(t, w):
    before = w.main.count()
    code, text = send_one(w.sendmail.port, "sync-down@case.example",
                          "sync-down")
    t.ok(code == 451 and text.startswith("4.3.0 archive copy failed"),
         "sync-down: Sendmail answers 451 4.3.0 at the end of DATA",
         "%d %s" % (code, text))
    m = re.search(r"(%s): Milter: data, reject=451 4\.3\.0 archive copy "
                  r"failed" % smh.QUEUE_ID_RX, w.sendmail.log())
    qid = m.group(1) if m else None
    t.ok(qid and re.search(r"%s: action=tempfail, copies=1, failed=1 .*"
                           r"syncdown: unreachable -> tempfail"
                           % qid, w.milter.log()),
         "sync-down: Sendmail's reject line and our tempfail decision "
         "share the queue id", "qid %s\n%s" % (qid, w.milter.log()[-1500:]))
    left = [f for f in w.sendmail.queue_files() if qid and qid in f]
    t.ok(qid and not left, "sync-down: nothing of it in Sendmail's queue",
         left)
    time.sleep(1)
    t.ok(w.main.count() == before and not tagged(w.main.messages(),
                                                   "sync-down"),
         "sync-down: the main relay got nothing")


def run_spool_down(t, w, late):
    queued_before = set(w.milter.spool_files("queue"))
    code, text = send_one(w.sendmail.port, "spool-down@case.example",
                          "spool-down")
    t.ok(code == 250, "spool-down: accepted", "%d %s" % (code, text))
    try:
        h.wait_for(lambda: tagged(w.main.messages(), "spool-down"), 30,
                   "the original at the main relay")
        t.ok(True, "spool-down: the original reached the main relay")
    except h.Timeout as e:
        t.ok(False, "spool-down: the original reached the main relay", e)
    new = sorted(set(w.milter.spool_files("queue")) - queued_before)
    t.ok(len(new) == 1, "spool-down: one copy waits in the spool's "
         "queue/", new)

    # The relay comes back on its port; the worker's next try delivers.
    late.start()
    try:
        h.wait_for(lambda: tagged(late.messages(), "spool-down"), 30,
                   "the spooled copy at the relay")
    except h.Timeout as e:
        t.ok(False, "spool-down: copy delivered once the relay is back",
             "%s\n%s" % (e, w.milter.log()[-1500:]))
        return
    copy = tagged(late.messages(), "spool-down")
    env, _ = split_copy(copy[0].content)
    problems, aid = check_envelope(env, ["spool-down@case.example"])
    t.ok(len(copy) == 1 and not problems and new and aid == new[0],
         "spool-down: copy delivered once the relay is back, with its "
         "envelope and the spooled X-Archive-Id",
         "%d copies, %s, id %s, spooled %s" % (len(copy), problems, aid,
                                               new))
    h.wait_for(lambda: not set(w.milter.spool_files("queue"))
               & set(new), 10, "queue/ to let go of the copy")
    t.ok(True, "spool-down: the spool's queue/ let go of the copy")


def run_hold(t, w):
    code, text = send_one(w.sendmail.port, "hold@case.example", "hold")
    t.ok(code == 250, "hold: accepted", "%d %s" % (code, text))
    try:
        h.wait_for(lambda: tagged(w.main.messages(), "hold"), 30,
                   "the original at the main relay")
        t.ok(True, "hold: the original reached the main relay")
    except h.Timeout as e:
        t.ok(False, "hold: the original reached the main relay", e)
    held = w.milter.spool_files("hold")
    t.ok(len(held) == 1 and re.search(
        r"error: (%s): archive=<%s>, rule=hold, X-Archive-Id=%s, "
        r"status=held \(550 5\.1\.1 no such archive"
        % (smh.QUEUE_ID_RX, re.escape(REFUSED), re.escape(held[0])),
        w.milter.log()),
        "hold: the copy is in hold/, and an error line names it with "
        "Sendmail's queue id", "%s\n%s" % (held, w.milter.log()[-1500:]))


def run_quarantine(t, w):
    before = w.main.count()
    code, text = send_one(w.sendmail.port, "quarantine@case.example",
                          "quarantine")
    t.ok(code == 250, "quarantine: accepted", "%d %s" % (code, text))
    held = w.sendmail.queue_ids("hf")
    if not t.ok(len(held) == 1, "quarantine: one hf file (Sendmail's "
                "quarantined queue file)", w.sendmail.queue_files()):
        return
    qid = held[0]
    qf = w.sendmail.read_queue_file("hf" + qid)
    m = re.search(r"(?m)^q(.*)$", qf)
    spooled = [n for n in w.milter.spool_files("queue")
               if m and n in m.group(1)]
    t.ok(m and m.group(1).startswith("archive copy unreachable; spooled; "
                                      "X-Archive-Id=") and spooled,
         "quarantine: the reason (q line) names the spooled copy",
         "%s\nspool: %s" % (qf, w.milter.spool_files("queue")))
    t.ok(spooled and re.search(r"(?m)^H\?\?X-Archive-Status: unreachable; "
                               r"spooled; id=%s$" % re.escape(spooled[0]),
                               qf),
         "quarantine: the held message carries X-Archive-Status", qf)
    r = w.sendmail.run("-bp", "-qQ")
    t.ok(r.returncode == 0 and qid in r.stdout
         and "QUARANTINE: archive copy unreachable" in r.stdout,
         "quarantine: mailq -qQ lists it with our reason",
         "%d\n%s\n%s" % (r.returncode, r.stdout, r.stderr))
    r = w.sendmail.run("-bp")
    t.ok(qid not in r.stdout, "quarantine: not in the normal queue listing",
         r.stdout)
    t.ok(re.search(r"%s: milter=archive, quarantine=archive copy "
                   r"unreachable" % qid, w.sendmail.log()),
         "quarantine: Sendmail logs the milter's quarantine by queue id",
         w.sendmail.log()[-1500:])
    time.sleep(1)
    t.ok(w.main.count() == before, "quarantine: the main relay got "
         "nothing while it is held")

    # Released (-Q without a reason, on the quarantined queue: -qQ),
    # it is an ordinary queue file again; a queue run delivers it with
    # the status header.
    r = w.sendmail.run("-qQ", "-Q", "-qI" + qid)
    t.ok(r.returncode == 0 and not w.sendmail.queue_ids("hf"),
         "quarantine: `sendmail -qQ -Q -qI%s` releases it" % qid,
         "%d %s %s %s" % (r.returncode, r.stdout, r.stderr,
                          w.sendmail.queue_files()))
    r = w.sendmail.run("-qI" + qid)
    try:
        h.wait_for(lambda: tagged(w.main.messages(), "quarantine"), 30,
                   "the released message at the main relay")
    except h.Timeout as e:
        t.ok(False, "quarantine: released message delivered",
             "%s\n%s" % (e, w.sendmail.log()[-1500:]))
        return
    orig = tagged(w.main.messages(), "quarantine")[0].content
    status = header_value(orig, "X-Archive-Status") or ""
    t.ok(status.startswith(" unreachable; spooled; id="),
         "quarantine: released and delivered with its X-Archive-Status",
         status)


def run_protocol(t, w):
    """What Sendmail and the milter agreed, seen on the wire by the
    tap, and whether both kept to it in every session of the run."""
    pairs = w.tap.negotiated()
    for offer, answer in sorted(pairs):
        t.note("negotiated: Sendmail offered version %d, actions 0x%x, "
               "protocol 0x%x; the milter took actions 0x%x, protocol "
               "%s" % (offer[0], offer[1], offer[2], answer[1],
                       " ".join(smh.flag_names(answer[2]))))
    with w.tap.lock:
        cmds = b"".join(b"".join(x["cmds"]) for x in w.tap.sessions)
    # SMFIC_QUIT_NC (K) would start a session that libmilter does not
    # negotiate again (see plugin/milter.c); Sendmail 8.17 opens a new
    # milter connection per SMTP session instead, and keeps it for
    # every message of that session.
    t.note("protocol: %d sessions; commands seen: %s; SMFIC_QUIT_NC: %d"
           % (len(w.tap.sessions), " ".join(sorted(
               {chr(c) for c in cmds})), cmds.count(b"K")))
    t.ok(len(pairs) == 1, "protocol: every session negotiated the same "
         "way", pairs)
    t.ok(pairs and all(a[2] & smh.SMFIP["HDR_LEADSPC"] for _, a in pairs),
         "protocol: SMFIP_HDR_LEADSPC negotiated with Sendmail", pairs)
    problems = w.tap.problems()
    t.ok(not problems, "protocol: in %d sessions Sendmail sent nothing "
         "the milter declined and the milter answered exactly the "
         "commands owed an answer (NR flags kept)"
         % len(w.tap.sessions), "\n".join(problems[:10]))


def run_milter_down(t, w):
    """F=T: with the milter gone, Sendmail tempfails instead of taking
    mail that would have no copy (the README's recommended flag)."""
    before = w.main.count()
    w.milter.kill()
    c = smtplib.SMTP(h.LOOPBACK, w.sendmail.port, timeout=60)
    try:
        code, text = c.mail(SENDER)
        text = text.decode("utf-8", "replace")
    finally:
        try:
            c.quit()
        except (smtplib.SMTPException, OSError):
            pass
    t.ok(code == 451 and text.startswith("4.3.2"),
         "milter-down: Sendmail (F=T) answers 451 4.3.2 at MAIL",
         "%d %s" % (code, text))
    t.ok(w.main.count() == before and not w.sendmail.queue_ids("qf"),
         "milter-down: nothing queued or relayed")


def run(t, args):
    tmp = tempfile.mkdtemp(prefix="archive-sm-msgs-")
    args.cleanup.append(tmp)
    h.WATCHDOG.tell("rmtree", tmp)      # also if this test is SIGKILLed
    down_port = h.free_port()       # nothing ever listens there
    late_port = h.free_port()       # the spool case's relay, started late
    world = smh.SendmailWorld(
        args.root, args.milter, args.shim, workdir=args.workdir,
        milter_opts={
            "on_failure": None,
            "policy": {"match_recipient": r"@dest\.example$"},
            "extra_conf": rules_conf(down_port, late_port),
            "workers": 1,
            "spool_retry_min": 1,
            "spool_retry_max": 2,
        }, tap=True)
    with world as w:
        late = h.SinkRelay("late-relay", os.path.join(w.workdir, "late"),
                           port=late_port)
        t.note("workdir %s; sendmail :%d (%s), main relay :%d, archive "
               "relay :%d, milter :%d" % (
                   w.workdir, w.sendmail.port, args.root.versions(),
                   w.main.port, w.archive.port, w.milter.port))
        w.archive.set_faults({"RCPT": {REFUSED: "550 5.1.1 no such archive"}})
        start = time.monotonic()
        for name, fn, extra in (("corpus", run_corpus, (args, tmp)),
                                ("header", run_header, ()),
                                ("sync-down", run_sync_down, ()),
                                ("spool-down", run_spool_down, (late,)),
                                ("hold", run_hold, ()),
                                ("quarantine", run_quarantine, ()),
                                ("protocol", run_protocol, ()),
                                ("milter-down", run_milter_down, ())):
            t0 = time.monotonic()
            try:
                fn(t, w, *extra)
            except h.Timeout as e:
                t.ok(False, "%s: finished in time" % name, e)
            t.note("%s: %.1f s" % (name, time.monotonic() - t0))
        t.note("all cases: %.1f s" % (time.monotonic() - start))
        late.stop()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--milter", default=os.environ.get("ARCHIVE_MILTER"))
    p.add_argument("--smtp-send", default=os.environ.get("SMTP_SEND"))
    p.add_argument("--shim", default=smh.find_shim(),
                   help="the syslog shim (default $SENDMAIL_SYSLOG_SHIM)")
    p.add_argument("--sendmail-root", default=None,
                   help="default $ARCHIVE_SENDMAIL_ROOT or %s"
                   % smh.DEFAULT_ROOT)
    p.add_argument("--corpus", default=os.environ.get(
        "E2E_CORPUS", os.path.join(os.path.dirname(__file__),
                                   "../../../shared/corpus")))
    p.add_argument("--per-folder", type=int, default=3,
                   help="corpus messages per folder (0: all)")
    p.add_argument("--only", help="corpus messages whose path matches "
                   "this regular expression (after --per-folder)")
    p.add_argument("--workdir", help="keep everything in this directory")
    args = p.parse_args()
    args.corpus = os.path.abspath(args.corpus)

    if os.geteuid() != 0:
        print("1..0 # SKIP needs root (mount namespaces, Sendmail)")
        return 77
    if not args.milter or not os.access(args.milter, os.X_OK):
        print("1..0 # SKIP no archive-milter binary")
        return 77
    if args.smtp_send and not os.access(args.smtp_send, os.X_OK):
        args.smtp_send = None
    args.root = smh.SendmailRoot(args.sendmail_root)
    problem = args.root.problem()
    if problem or not args.shim:
        # Not a skip: run-all.sh prepares both, so their absence is a
        # broken setup, which must not look green.
        print("not ok 1 - a Sendmail root and the syslog shim")
        print("#   %s" % (problem or "no syslog shim: set "
                           "SENDMAIL_SYSLOG_SHIM (meson test does)"))
        print("#   run: sh packaging/setup-sendmail-root.sh")
        print("1..1")
        return 1

    h.install_signal_handlers()
    args.cleanup = []
    t = Checks()
    try:
        run(t, args)
    except Exception:
        t.ok(False, "harness completed", traceback.format_exc())
        print("1..%d" % t.n)
        return 99
    finally:
        h.REGISTRY.stop_all()
        for d in args.cleanup:
            shutil.rmtree(d, ignore_errors=True)
    print("1..%d" % t.n)
    return 1 if t.failed else 0


if __name__ == "__main__":
    sys.exit(main())
