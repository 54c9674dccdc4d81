#!/usr/bin/env python3
"""test_milter_nr.py - the milter's "no reply" events through real Postfix

archive-milter asks the MTA not to wait for its answer to connect, MAIL,
each header, the end of headers and each body chunk (SMFIP_NR_*); a
sender or a header that its capture refuses is then answered at the end
of the message.
Run twice, with Postfix speaking milter protocol 6 (which offers the NR
flags) and protocol 2 (which offers none; libmilter then answers
continue for us), each time:

  * a plain message is accepted and copied;
  * a message with more headers than the capture keeps
    (AM_CAPTURE_HEADERS_MAX, 10000) is refused with 451 4.3.0 at the end
    of DATA, naming the limit; the main relay and the archive receive
    nothing of it, and the milter logs the tempfail with its queue id;
  * a message whose sender is longer than the capture keeps
    (AM_ADDRESS_MAX, 979) gets 250 to MAIL and RCPT, then 451 4.3.0 at
    the end of DATA naming MAIL FROM, and nothing of it is relayed;
  * a plain message in the same SMTP session right after them is accepted
    and copied: Postfix and the milter are still in step;
  * Postfix logs no milter timeout or protocol error.

Exit status: 0 all passed, 1 a check failed, 77 (meson: skipped) when
not root or without $ARCHIVE_MILTER, 99 harness error.
"""

import os
import re
import smtplib
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402

SENDER = "sender@origin.example"
RCPT = "to@dest.example"
HEADERS_MAX = 10000   # plugin/capture.h AM_CAPTURE_HEADERS_MAX
ADDRESS_MAX = 979     # plugin/capture.h AM_ADDRESS_MAX
LONG_SENDER = "s" * (ADDRESS_MAX + 1 - len("@x.example")) + "@x.example"


Checks = h.Checks


def message(tag, extra=b""):
    return (b"From: <" + SENDER.encode() + b">\r\nTo: <" + RCPT.encode()
            + b">\r\nSubject: nr " + tag.encode() + b"\r\n" + extra
            + b"\r\nbody of " + tag.encode() + b"\r\n")


def send(c, msg, sender=SENDER):
    """(code, text) of the end of DATA on the open session c; MAIL and
    RCPT must be accepted (an exception otherwise)."""
    try:
        c.sendmail(sender, [RCPT], msg)
        return (250, "")
    except smtplib.SMTPDataError as e:
        c.rset()
        return (e.smtp_code, e.smtp_error.decode("utf-8", "replace"))


def tagged(messages, tag):
    return [m for m in messages
            if ("Subject: nr %s\r\n" % tag).encode() in m.content]


def run(checks, milter_exe, protocol):
    world = h.World(milter_exe=milter_exe,
                    postfix_extra={"milter_protocol": protocol})
    with world as w:
        what = "protocol %s" % protocol
        c = smtplib.SMTP(h.LOOPBACK, w.postfix.port, timeout=90)
        try:
            code, text = send(c, message("first"))
            checks.ok(code == 250, "%s: a plain message is accepted" % what,
                      text)
            many = b"".join(b"X-Many: %d\r\n" % i
                            for i in range(HEADERS_MAX + 1))
            code, text = send(c, message("many", many))
            checks.ok(code == 451 and text.startswith("4.3.0 ")
                      and "more than %d headers" % HEADERS_MAX in text,
                      "%s: %d headers: 451 4.3.0 at the end of DATA, "
                      "naming the limit" % (what, HEADERS_MAX + 1),
                      "%d %s" % (code, text))
            code, text = send(c, message("longsender"), LONG_SENDER)
            checks.ok(code == 451 and text.startswith("4.3.0 ")
                      and "MAIL FROM" in text,
                      "%s: a %d-octet sender: MAIL and RCPT accepted, 451 "
                      "4.3.0 at the end of DATA naming MAIL FROM"
                      % (what, len(LONG_SENDER)), "%d %s" % (code, text))
            code, text = send(c, message("after"))
            checks.ok(code == 250, "%s: the next message of the same "
                      "session is accepted" % what, text)
        finally:
            try:
                c.quit()
            except (smtplib.SMTPException, OSError):
                pass
        try:
            h.wait_for(lambda: len(tagged(w.archive.messages(), "first"))
                       == 1 and len(tagged(w.archive.messages(), "after"))
                       == 1, 30, "the two copies")
            h.wait_for(lambda: len(tagged(w.main.messages(), "after")) == 1,
                       30, "the last original")
        except h.Timeout:
            pass
        checks.ok(len(tagged(w.archive.messages(), "first")) == 1
                  and len(tagged(w.archive.messages(), "after")) == 1,
                  "%s: both plain messages are copied" % what,
                  [m.content[:200] for m in w.archive.messages()])
        checks.ok(not any(tagged(r.messages(), t)
                          for r in (w.archive, w.main)
                          for t in ("many", "longsender")),
                  "%s: nothing of the refused messages reached either "
                  "relay" % what)
        checks.ok(re.search(r"\w+: action=tempfail, copies=0, failed=0 "
                            r"\(more than %d headers\)" % HEADERS_MAX,
                            w.milter.log()),
                  "%s: the milter logs the tempfail with the queue id and "
                  "the reason" % what, w.milter.log())
        bad = [l for l in w.postfix.log().splitlines()
               if re.search(r"milter.*(timeout|timed out|can't read|"
                            r"unexpected|error)", l, re.I)]
        checks.ok(not bad, "%s: Postfix logs no milter error" % what,
                  "\n".join(bad))


def main():
    if os.geteuid() != 0:
        print("1..0 # SKIP needs root (Postfix's master)")
        return 77
    milter_exe = os.environ.get("ARCHIVE_MILTER")
    if not milter_exe:
        print("1..0 # SKIP ARCHIVE_MILTER not set")
        return 77
    checks = Checks()
    try:
        for protocol in ("6", "2"):
            run(checks, milter_exe, protocol)
    except Exception:
        traceback.print_exc()
        print("Bail out! harness error")
        return 99
    print("1..%d" % checks.n)
    return 1 if checks.failed else 0


if __name__ == "__main__":
    sys.exit(main())
