#!/usr/bin/env python3
"""test_policy.py - issue 4's policy actions as Postfix applies them

The unit tests (tests/plugin/test-archive.c) check the verdict that
am_milter_archive() computes; this test checks what a real Postfix does
with it when cb_eom applies it.  One private Postfix, archive-milter in
sync mode with one rule per case, each rule selected by the envelope
recipient's local part, and an archive relay that refuses the address
refused@archive.example with "550 5.1.1":

  header      on_sent = accept+header: the original reaches the main
              relay with "X-Archive-Status: sent; id=ID" (one space after
              the colon, as any header), ID being the X-Archive-Id of the
              copy the archive relay took
  quarantine  relay down, on_unreachable = spool+quarantine+header: the
              original is accepted into Postfix's hold queue, carries
              "X-Archive-Status: unreachable; spooled; id=ID", and the
              copy ID waits in the spool's queue/
  reject      the copy refused at RCPT, on_all_refused = reject: the
              client gets 550 5.1.1 with the relay's text; nothing queued
  tempfail    relay down, default policy: 451 4.3.0 at end of DATA
  hold        the copy refused at RCPT, default policy (permanent):
              accepted, the copy in hold/, an error line naming it
  later-reject
              a second milter (here, in this process) rejects at end of
              message after ours accepted and the copy was sent.  Our
              milter cannot see that (Postfix 3.7 sends SMFIC_ABORT after
              every end of message, accepted or not, and libmilter does
              not call xxfi_abort after xxfi_eom; see plugin/milter.c),
              so what is checked is the documented way to match them
              up: Postfix's "QUEUEID: milter-reject: END-OF-MESSAGE"
              line and our decision line for the same QUEUEID, which
              names the copy's X-Archive-Id, the one the archive holds.

Output is TAP.  Exit 0 all passed, 1 a check failed, 77 skipped (not
root), 99 harness error.
"""

import json
import os
import re
import smtplib
import socket
import struct
import subprocess
import sys
import threading
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402

SENDER = "sender@origin.example"
REFUSED = "refused@archive.example"


Checks = h.Checks


# ------------------------------------------------------------------ #
# A second milter that rejects at end of message                      #
# ------------------------------------------------------------------ #


class RejectingMilter:
    """Speaks the milter protocol (version 6) itself: answers continue
    to everything, and at end of message rejects with 550 5.7.1 when a
    recipient's address contains `trigger`."""

    def __init__(self, trigger):
        self.trigger = trigger.encode()
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((h.LOOPBACK, 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.rejected = 0
        threading.Thread(target=self._accept, daemon=True).start()
        h.REGISTRY.add("rejecting-milter", self.stop)

    def stop(self):
        h.REGISTRY.remove(self.stop)
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,),
                             daemon=True).start()

    @staticmethod
    def _read(conn, n):
        buf = b""
        while len(buf) < n:
            chunk = conn.recv(n - len(buf))
            if not chunk:
                return None
            buf += chunk
        return buf

    @staticmethod
    def _send(conn, cmd, data=b""):
        conn.sendall(struct.pack(">I", len(data) + 1) + cmd + data)

    def _serve(self, conn):
        reject = False
        try:
            while True:
                head = self._read(conn, 4)
                if head is None:
                    return
                packet = self._read(conn, struct.unpack(">I", head)[0])
                if packet is None:
                    return
                cmd, data = packet[:1], packet[1:]
                if cmd in (b"D", b"A", b"K"):   # macros, abort: no reply
                    if cmd == b"A":
                        reject = False
                    continue
                if cmd == b"Q":
                    return
                if cmd == b"O":
                    self._send(conn, b"O", struct.pack(">III", 6, 0, 0))
                elif cmd == b"R" and self.trigger in data:
                    reject = True
                    self._send(conn, b"c")
                elif cmd == b"E" and reject:
                    self.rejected += 1
                    self._send(conn, b"y",
                               b"550 5.7.1 rejected by a later milter\0")
                else:
                    self._send(conn, b"c")
        except OSError:
            pass
        finally:
            conn.close()


# ------------------------------------------------------------------ #
# Sending                                                              #
# ------------------------------------------------------------------ #


def send(port, rcpt, tag):
    """One message to `rcpt`: (code, text) of the end of DATA."""
    msg = ("From: <%s>\r\nTo: <%s>\r\nSubject: policy %s\r\n"
           "Message-ID: <%s.%d@policy.test>\r\n\r\nbody of %s\r\n"
           % (SENDER, rcpt, tag, tag, os.getpid(), tag)).encode()
    c = smtplib.SMTP(h.LOOPBACK, port, timeout=60)
    try:
        c.sendmail(SENDER, [rcpt], msg)
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


def with_tag(messages, tag):
    return [m for m in messages
            if ("Subject: policy %s\r\n" % tag).encode() in m.content]


def header_value(content, name):
    head = content.split(b"\r\n\r\n", 1)[0].decode("utf-8", "replace")
    m = re.search(r"(?mi)^%s:(.*)$" % re.escape(name), head)
    return m.group(1).rstrip("\r") if m else None


def postqueue(postfix):
    r = subprocess.run(["postqueue", "-c", postfix.conf, "-j"],
                       capture_output=True, text=True)
    return [json.loads(line) for line in r.stdout.splitlines() if line]


def postcat_headers(postfix, qid):
    r = subprocess.run(["postcat", "-c", postfix.conf, "-hq", qid],
                       capture_output=True, text=True)
    return r.stdout


# ------------------------------------------------------------------ #
# The run                                                              #
# ------------------------------------------------------------------ #


def rules_conf(down_port):
    def rule(name, pairs):
        return "[rule:%s]\nmode = journal\n%s\n" % (
            name, "".join("%s = %s\n" % kv for kv in pairs))
    return ("[relay:down]\nhost = 127.0.0.1\nport = %d\ntimeout = 2\n\n"
            % down_port
            + rule("quarantine", [("relay", "down"),
                                  ("archive_to", "journal@archive.example"),
                                  ("match_recipient", "^quarantine@"),
                                  ("on_unreachable",
                                   "spool+quarantine+header")])
            + rule("reject", [("relay", "archive"), ("archive_to", REFUSED),
                              ("match_recipient", "^reject@"),
                              ("on_all_refused", "reject")])
            + rule("tempfail", [("relay", "down"),
                                ("archive_to", "journal@archive.example"),
                                ("match_recipient", "^tempfail@")])
            + rule("hold", [("relay", "archive"), ("archive_to", REFUSED),
                            ("match_recipient", "^hold@")])
            + rule("later", [("relay", "archive"),
                             ("archive_to", "journal@archive.example"),
                             ("match_recipient", "^later@")]))


def run(checks, milter_exe):
    down_port = h.free_port()     # nothing listens there
    milter_port = h.free_port()
    second = RejectingMilter("later@")
    world = h.World(
        milter_exe=milter_exe,
        milter_extra_conf=rules_conf(down_port),
        milter_opts={
            "port": milter_port,
            "on_failure": None,
            "policy": {"match_recipient": "^header@",
                       "on_sent": "accept+header"},
            "spool_dir": None,   # set below, inside the work directory
            "workers": 1,
            "spool_retry_min": 60,
        },
        postfix_extra={
            "smtpd_milters": "inet:%s:%d, inet:%s:%d" % (
                h.LOOPBACK, milter_port, h.LOOPBACK, second.port),
        })
    world.milter_opts["spool_dir"] = os.path.join(world.workdir, "spool")
    with world as w:
        w.archive.set_faults({"RCPT": {REFUSED: "550 5.1.1 no such archive"}})
        port = w.postfix.port

        # header
        code, text = send(port, "header@dest.example", "header")
        checks.ok(code == 250, "header: accepted", text)
        h.wait_for(lambda: with_tag(w.main.messages(), "header"), 30,
                   "the original at the main relay")
        orig = with_tag(w.main.messages(), "header")[0].content
        copy = with_tag(w.archive.messages(), "header")
        status = header_value(orig, "X-Archive-Status")
        cid = header_value(copy[0].content, "X-Archive-Id") if copy else None
        checks.ok(copy and status == " sent; id=%s" % cid.strip(),
                  "header: X-Archive-Status: sent; id=<the copy's id>",
                  "status %r, copy id %r" % (status, cid))

        # quarantine
        code, text = send(port, "quarantine@dest.example", "quarantine")
        checks.ok(code == 250, "quarantine: accepted", text)
        held = [q for q in postqueue(w.postfix)
                if q.get("queue_name") == "hold"]
        checks.ok(len(held) == 1, "quarantine: the original is in "
                  "Postfix's hold queue", postqueue(w.postfix))
        queued = w.milter.spool_files("queue")
        checks.ok(len(queued) == 1, "quarantine: the copy waits in queue/",
                  queued)
        if held and queued:
            heads = postcat_headers(w.postfix, held[0]["queue_id"])
            want = "X-Archive-Status: unreachable; spooled; id=%s" % queued[0]
            checks.ok(want in heads, "quarantine: the held original names "
                      "the spooled copy", heads)

        # reject
        code, text = send(port, "reject@dest.example", "reject")
        checks.ok(code == 550 and text.startswith("5.1.1 ")
                  and "no such archive" in text,
                  "reject: 550 5.1.1 with the relay's text",
                  "%d %s" % (code, text))

        # tempfail
        code, text = send(port, "tempfail@dest.example", "tempfail")
        checks.ok(code == 451 and text.startswith("4.3.0 archive copy "
                                                  "failed"),
                  "tempfail: 451 4.3.0 archive copy failed",
                  "%d %s" % (code, text))

        # hold
        code, text = send(port, "hold@dest.example", "hold")
        checks.ok(code == 250, "hold: accepted", text)
        hold = w.milter.spool_files("hold")
        checks.ok(len(hold) == 1, "hold: the copy is kept in hold/", hold)
        checks.ok(hold and re.search(
            r"error: \w+: archive=<%s>, rule=hold, X-Archive-Id=%s, "
            r"status=held \(550 5\.1\.1 no such archive"
            % (re.escape(REFUSED), re.escape(hold[0])), w.milter.log()),
            "hold: an error line names the address and the copy",
            w.milter.log())

        # later-reject
        code, text = send(port, "later@dest.example", "later")
        checks.ok(code == 550 and "later milter" in text,
                  "later-reject: the second milter's 550 reaches the "
                  "client", "%d %s" % (code, text))
        copy = with_tag(w.archive.messages(), "later")
        cid = (header_value(copy[0].content, "X-Archive-Id") or "").strip()
        checks.ok(len(copy) == 1 and cid,
                  "later-reject: the copy was sent before the rejection")
        m = re.search(r"(\w+): milter-reject: END-OF-MESSAGE .*later milter",
                      w.postfix.log())
        qid = m.group(1) if m else None
        checks.ok(qid and re.search(
            r"%s: action=accept, copies=1, failed=0 \(later: sent -> "
            r"accept, id=%s\)" % (qid, re.escape(cid)), w.milter.log()),
            "later-reject: Postfix's milter-reject line and our decision "
            "line share the queue id, and ours names the copy",
            "qid %s, id %s\n%s" % (qid, cid, w.milter.log()))
        time.sleep(0.5)
    second.stop()


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
        run(checks, milter_exe)
    except Exception:
        traceback.print_exc()
        print("Bail out! harness error")
        return 99
    print("1..%d" % checks.n)
    return 1 if checks.failed else 0


if __name__ == "__main__":
    sys.exit(main())
