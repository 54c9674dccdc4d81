#!/usr/bin/env python3
"""test_milter_raw.py - archive-milter over the raw milter protocol

Postfix cleans header values before a milter sees them, so the checks
that the milter refuses a forged header line cannot go through it.
Here a small MTA side of the Sendmail milter protocol (version 6, the
commands Postfix sends) talks to the real daemon, started on a free
loopback port with a relay of tests/e2e/harness.py (SinkRelay, in this
process) as its archive, and the test asserts what the relay received:

  * a header value with a line break that is not a fold (bare LF, lone
    CR, CRLF, each followed by a header name; a blank line) is answered
    451 4.3.0 at that header, naming it, and the relay receives nothing;
  * a real fold (bare LF or CRLF before white space) is copied as CRLF
    plus the white space, the copy otherwise byte-exact;
  * a NUL inside a value ends the value there (libmilter passes C
    strings): what follows it is in no header of the copy;
  * a recipient too long for a 998-octet X-Envelope-To line is refused
    with 451 for that RCPT alone; the message and its copy go on with
    the other recipients;
  * a header on which a rule's regular expression hits PCRE's
    backtracking limit tempfails the message at its end (a second
    milter, match = all, with such a rule), and no copy is sent.

No root, no Postfix.  Exit status: 0 all passed, 1 a check failed, 77
(meson: skipped) without $ARCHIVE_MILTER, 99 harness error.
"""

import os
import shutil
import socket
import struct
import sys
import tempfile
import traceback

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                "..", "e2e"))
import harness as h  # noqa: E402

ARCHIVE_TO = "journal@archive.example"
SENDER = "sender@origin.example"

# libmilter/mfdef.h: protocol version 6, and the bits used here.
SMFI_VERSION = 6
SMFIF_ALL = 0x1FF                 # every action an MTA may allow
SMFIP_NOHELO = 0x2
SMFIP_NOUNKNOWN = 0x100
SMFIP_NODATA = 0x200
SMFIP_HDR_LEADSPC = 0x100000
OFFERED = SMFIP_NOHELO | SMFIP_NOUNKNOWN | SMFIP_NODATA | SMFIP_HDR_LEADSPC

# Replies that end a command's answer; anything else before them is a
# modification (add header, quarantine...) and is collected.
FINAL = set(b"acdrty")


class MilterError(Exception):
    pass


class MtaSide:
    """One connection to the milter, as an MTA holds it."""

    def __init__(self, port, timeout=20):
        self.sock = socket.create_connection((h.LOOPBACK, port),
                                             timeout=timeout)
        self.f = self.sock.makefile("rb")

    def close(self):
        try:
            self.send(b"Q")
        except OSError:
            pass
        self.f.close()
        self.sock.close()

    def send(self, cmd, data=b""):
        self.sock.sendall(struct.pack(">I", len(data) + 1) + cmd + data)

    def read(self):
        head = self.f.read(4)
        if len(head) < 4:
            raise MilterError("milter closed the connection")
        (n,) = struct.unpack(">I", head)
        body = self.f.read(n)
        if len(body) < n or n == 0:
            raise MilterError("short packet from the milter")
        return body[:1], body[1:]

    def answer(self):
        """The final reply of one command: (code, data, modifications)."""
        mods = []
        while True:
            code, data = self.read()
            if code[0] in FINAL:
                return code, data, mods
            mods.append((code, data))

    def call(self, cmd, data=b""):
        self.send(cmd, data)
        return self.answer()

    def negotiate(self):
        self.send(b"O", struct.pack(">III", SMFI_VERSION, SMFIF_ALL,
                                    OFFERED))
        code, data = self.read()
        if code != b"O" or len(data) < 12:
            raise MilterError("bad negotiation reply %r" % code)
        _, _, proto = struct.unpack(">III", data[:12])
        if proto & ~OFFERED:
            raise MilterError("milter asks for 0x%x, never offered"
                              % (proto & ~OFFERED))
        self.proto = proto

    def macro(self, stage, **pairs):
        data = b"".join(k.encode() + b"\0" + v.encode() + b"\0"
                        for k, v in pairs.items())
        self.send(b"D", stage + data)

    def connect(self):
        self.macro(b"C", j="mta.example", _="client [127.0.0.1]")
        return self.call(b"C", b"client.example\0" + b"4"
                         + struct.pack(">H", 12345) + b"127.0.0.1\0")

    def mail(self, addr, qid):
        self.macro(b"M", i=qid)
        return self.call(b"M", b"<" + addr + b">\0")

    def rcpt(self, addr, qid):
        self.macro(b"R", i=qid)
        return self.call(b"R", b"<" + addr + b">\0")

    def header(self, name, value):
        """value: bytes exactly as sent, its own NUL included if any."""
        return self.call(b"L", name + b"\0" + value + b"\0")


def start_world(workdir):
    relay = h.SinkRelay("raw-archive",
                        os.path.join(workdir, "store")).start()
    milter = h.Milter(os.environ["ARCHIVE_MILTER"],
                      os.path.join(workdir, "milter"), relay.port,
                      ARCHIVE_TO, relay_timeout=5)
    milter.start()
    return relay, milter


class Checks:
    def __init__(self):
        self.n = 0
        self.failed = 0

    def ok(self, cond, what, detail=""):
        self.n += 1
        print("%s %d - %s" % ("ok" if cond else "not ok", self.n, what))
        if not cond:
            self.failed += 1
            for line in str(detail).splitlines():
                print("#   " + line)
        return cond


def message(port, qid, headers, rcpts=(b"to@dest.example",), body=b"b\r\n"):
    """One transaction; returns the replies: ("rcpt", [..]),
    ("header", i, reply) for the first header not continued, or
    ("eom", reply)."""
    mta = MtaSide(port)
    try:
        mta.negotiate()
        code, _, _ = mta.connect()
        if code != b"c":
            raise MilterError("connect answered %r" % code)
        code, _, _ = mta.mail(SENDER.encode(), qid)
        if code != b"c":
            raise MilterError("MAIL answered %r" % code)
        rcpt_replies = [mta.rcpt(r, qid) for r in rcpts]
        for i, (name, value) in enumerate(headers):
            reply = mta.header(name, value)
            if reply[0] != b"c":
                mta.send(b"A")
                return ("header", i, reply, rcpt_replies)
        mta.macro(b"N", i=qid)
        code, _, _ = mta.call(b"N")
        if code != b"c":
            raise MilterError("EOH answered %r" % code)
        code, _, _ = mta.call(b"B", body)
        if code != b"c":
            raise MilterError("BODY answered %r" % code)
        mta.macro(b"E", i=qid)
        return ("eom", mta.call(b"E"), rcpt_replies)
    finally:
        mta.close()


def is_tempfail(reply, *words):
    code, data, _ = reply
    text = data.rstrip(b"\0").decode("utf-8", "replace")
    if code == b"t":
        return not words
    return (code == b"y" and text.startswith("451 4.")
            and all(w in text for w in words))


FORGED = [
    ("bare LF + name", b" x\nX-Envelope-To: <evil@example>"),
    ("lone CR + name", b" x\rX-Envelope-To: <evil@example>"),
    ("CRLF + name", b" x\r\nX-Envelope-To: <evil@example>"),
    ("blank line", b" x\n\nforged body"),
    ("break at the end", b" x\n"),
]


def check_forged(c, port, relay):
    before = relay.count()
    for i, (what, value) in enumerate(FORGED):
        qid = "RAWF%d" % i
        try:
            got = message(port, qid, [(b"From", b" <a@origin.example>"),
                                      (b"Subject", value),
                                      (b"X-After", b" y")])
        except MilterError as e:
            c.ok(False, "forged header (%s)" % what, e)
            continue
        c.ok(got[0] == "header" and got[1] == 1
             and is_tempfail(got[2], "Subject", "line break"),
             "forged header (%s): 451 at that header, naming it" % what,
             got)
    c.ok(relay.count() == before,
         "no copy of any forged message reached the relay",
         "%d new" % (relay.count() - before))


def wait_copy(relay, qid_marker, timeout=15):
    def find():
        for m in relay.messages():
            if qid_marker in m.content:
                return m
        return None
    try:
        return h.wait_for(find, timeout, "the copy of %r" % qid_marker)
    except h.Timeout:
        return None


def check_folds(c, port, relay):
    headers = [(b"Subject", b" first\n second"),
               (b"X-Crlf", b" one\r\n\ttwo"),
               (b"X-Marker", b" folds-ok")]
    got = message(port, "RAWOK", headers)
    c.ok(got[0] == "eom" and got[1][0] in (b"c", b"a"),
         "folded headers: message accepted", got)
    copy = wait_copy(relay, b"folds-ok")
    want = (b"Subject: first\r\n second\r\nX-Crlf: one\r\n\ttwo\r\n"
            b"X-Marker: folds-ok\r\n\r\nb\r\n")
    c.ok(copy is not None and copy.content.endswith(want)
         and copy.envelope_rcpts() == [ARCHIVE_TO],
         "folds copied as CRLF + white space, byte-exact",
         copy.content if copy else "no copy")


def header_block(content):
    return content.split(b"\r\n\r\n", 1)[0].split(b"\r\n")


def check_nul(c, port, relay):
    value = b" cut\0\r\nX-Envelope-To: <evil@example>"
    got = message(port, "RAWNUL", [(b"Subject", value),
                                   (b"X-Marker", b" nul-case")])
    c.ok(got[0] == "eom" and got[1][0] in (b"c", b"a"),
         "NUL in a value: message accepted", got)
    copy = wait_copy(relay, b"nul-case")
    lines = header_block(copy.content) if copy else []
    c.ok(copy is not None and b"Subject: cut" in lines
         and not any(b"evil" in l for l in lines)
         and [l for l in lines if l.startswith(b"X-Envelope-To:")]
         == [b"X-Envelope-To: <to@dest.example>"],
         "NUL in a value: the value ends there, nothing after it forged",
         copy.content if copy else "no copy")


def check_long_rcpt(c, port, relay):
    long_rcpt = b"a" * (980 - len(b"@x.example")) + b"@x.example"
    got = message(port, "RAWLONG",
                  [(b"X-Marker", b" long-rcpt")],
                  rcpts=(long_rcpt, b"ok@dest.example"))
    rcpt_replies = got[-1]
    c.ok(is_tempfail(rcpt_replies[0], "979")
         and rcpt_replies[1][0] == b"c",
         "980-octet recipient: 451 for that RCPT alone", rcpt_replies)
    c.ok(got[0] == "eom" and got[1][0] in (b"c", b"a"),
         "980-octet recipient: the message goes on", got)
    copy = wait_copy(relay, b"long-rcpt")
    lines = header_block(copy.content) if copy else []
    c.ok([l for l in lines if l.startswith(b"X-Envelope-To:")]
         == [b"X-Envelope-To: <ok@dest.example>"]
         and max(len(l) for l in lines) <= 998,
         "980-octet recipient: the copy lists the others, no line > 998",
         copy.content if copy else "no copy")


EVIL_RULE = """
[rule:evil]
mode = journal
relay = archive
archive_to = %s
match_header = ^Subject: (a+)+$
""" % ARCHIVE_TO


def check_match_limit(c, workdir, relay):
    milter = h.Milter(os.environ["ARCHIVE_MILTER"],
                      os.path.join(workdir, "milter-limit"), relay.port,
                      ARCHIVE_TO, relay_timeout=5,
                      milter_keys={"match": "all"}, extra_conf=EVIL_RULE)
    milter.start()
    try:
        before = relay.count()
        got = message(milter.port, "RAWLIM",
                      [(b"Subject", b" " + b"a" * 40 + b"!")])
        c.ok(got[0] == "eom" and is_tempfail(got[1], "rules"),
             "regex limit on a header: 451 at end of message", got)
        c.ok(relay.count() == before and "rule evil" in milter.log(),
             "regex limit: no copy, the log names the rule",
             milter.log())
    finally:
        milter.stop()


def print_log(milter):
    if milter is not None:
        print("# milter log:\n" + "".join(
            "#   " + l + "\n" for l in milter.log().splitlines()))


def main():
    if not os.environ.get("ARCHIVE_MILTER"):
        print("1..0 # SKIP no $ARCHIVE_MILTER")
        return 77
    h.install_signal_handlers()
    workdir = tempfile.mkdtemp(prefix="archive-raw-")
    h.WATCHDOG.tell("rmtree", workdir)
    c = Checks()
    relay = milter = None
    status = 99
    try:
        relay, milter = start_world(workdir)
        check_forged(c, milter.port, relay)
        check_folds(c, milter.port, relay)
        check_nul(c, milter.port, relay)
        check_long_rcpt(c, milter.port, relay)
        check_match_limit(c, workdir, relay)
        print("1..%d" % c.n)
        status = 1 if c.failed else 0
    except Exception:
        traceback.print_exc()
    finally:
        if milter is not None:
            milter.stop()
        if status != 0:
            print_log(milter)
        if relay is not None:
            relay.stop()
        shutil.rmtree(workdir, ignore_errors=True)
        h.WATCHDOG.tell("unrmtree", workdir)
    return status


if __name__ == "__main__":
    sys.exit(main())
