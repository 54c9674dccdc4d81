#!/usr/bin/env python3
"""test_milter_raw.py - archive-milter over the raw milter protocol

Postfix cleans header values before a milter sees them, so the checks
that the milter refuses a forged header line cannot go through it.
Here a small MTA side of the Sendmail milter protocol (version 6, the
commands Postfix sends) talks to the real daemon, started on a free
loopback port with a relay of tests/e2e/harness.py (SinkRelay, in this
process) as its archive, and the test asserts what the relay received:

  * negotiation: offered the NR flags, the milter asks for NR_CONN,
    NR_HDR, NR_EOH and NR_BODY and no other (MAIL and RCPT keep their
    answers); not offered, it asks for none;
  * a header value with a line break that is not a fold (bare LF, lone
    CR, CRLF, each followed by a header name; a blank line) is answered
    451 4.3.0 at the end of the message, naming it, with a log line
    under the queue id, and the relay receives nothing: under NR with
    no answer at all before (nothing owed is ever sent: the connection
    is read to its end after QUIT), without NR with continue (libmilter
    answers for us; see cb_header in plugin/milter.c);
  * under NR a good message gets answers to RCPT and the end of message
    only, and its copy is byte-exact;
  * offered SMFIP_NOEOH, the milter takes it, and a copy without the
    EOH event still has its blank line, with a body and without;
  * a real fold (bare LF or CRLF before white space) is copied as CRLF
    plus the white space, the copy otherwise byte-exact;
  * a NUL inside a value ends the value there (libmilter passes C
    strings): what follows it is in no header of the copy;
  * a recipient too long for a 998-octet X-Envelope-To line is refused
    with 451 for that RCPT alone; the message and its copy go on with
    the other recipients, with and without NR;
  * a sender too long for the copy's headers: with NR no answer to
    MAIL, without NR continue, every RCPT continued, then 451 at end of
    message naming it, and no copy;
  * a header on which a rule's regular expression hits PCRE's
    backtracking limit tempfails the message at its end (a second
    milter, match = all, with such a rule), and no copy is sent;
  * a rule's spool+quarantine on a sync copy the relay refused (451 to
    MAIL): when the MTA grants SMFIF_QUARANTINE the original is put on
    hold (a quarantine packet) and accepted, its copy queued and sent
    once the relay takes mail again; when it does not, the message is
    tempfailed ("cannot quarantine"), the decision line says tempfail,
    and no copy is left in the spool or ever reaches the relay;
  * the 451 texts the SMTP client reads name the condition only: a
    spool that cannot take the copy ("archive spool unavailable", no
    path, no X-Archive-Id), a relay nobody listens on ("archive copy
    failed: unreachable", not its address);
  * SIGTERM while a worker waits on a stalled relay: the daemon ends
    within its stop grace, the copies stay in queue/ and reach the
    relay after the next start.

No root, no Postfix.  Exit status: 0 all passed, 1 a check failed, 77
(meson: skipped) without $ARCHIVE_MILTER, 99 harness error.
"""

import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
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
SMFIP_NOEOH = 0x40
SMFIP_NOUNKNOWN = 0x100
SMFIP_NODATA = 0x200
SMFIP_HDR_LEADSPC = 0x100000
OFFERED = SMFIP_NOHELO | SMFIP_NOUNKNOWN | SMFIP_NODATA | SMFIP_HDR_LEADSPC
# The "no reply" bits, as Postfix 3.7 offers them with protocol 6.
SMFIP_NR_HDR = 0x80
SMFIP_NR_CONN = 0x1000
SMFIP_NR_HELO = 0x2000
SMFIP_NR_MAIL = 0x4000
SMFIP_NR_RCPT = 0x8000
SMFIP_NR_DATA = 0x10000
SMFIP_NR_UNKN = 0x20000
SMFIP_NR_EOH = 0x40000
SMFIP_NR_BODY = 0x80000
NR_ALL = (SMFIP_NR_HDR | SMFIP_NR_CONN | SMFIP_NR_HELO | SMFIP_NR_MAIL
          | SMFIP_NR_RCPT | SMFIP_NR_DATA | SMFIP_NR_UNKN | SMFIP_NR_EOH
          | SMFIP_NR_BODY)
# What the milter must ask for when offered: the events whose answer can
# only be continue (a MAIL that fails is answered at end of message);
# RCPT keeps its answer.
NR_WANTED = (SMFIP_NR_CONN | SMFIP_NR_MAIL | SMFIP_NR_HDR | SMFIP_NR_EOH
             | SMFIP_NR_BODY)

# Replies that end a command's answer; anything else before them is a
# modification (add header, quarantine...) and is collected.
FINAL = set(b"acdrty")


class MilterError(Exception):
    pass


class MtaSide:
    """One connection to the milter, as an MTA holds it.  offered: the
    protocol flags of SMFIC_OPTNEG; an event whose NR bit the milter
    asked for is sent without waiting for an answer, as Postfix does."""

    def __init__(self, port, offered=OFFERED, timeout=20, actions=SMFIF_ALL):
        self.sock = socket.create_connection((h.LOOPBACK, port),
                                             timeout=timeout)
        self.f = self.sock.makefile("rb")
        self.offered = offered
        self.actions = actions
        self.proto = 0

    def close(self):
        try:
            self.send(b"Q")
        except OSError:
            pass
        self.f.close()
        self.sock.close()

    def finish(self):
        """QUIT, then everything the milter still sends before it
        closes: a reply it owed no one shows up here."""
        self.send(b"Q")
        self.sock.shutdown(socket.SHUT_WR)
        return self.f.read()

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

    def call(self, cmd, data=b"", nr=0):
        """The answer, or None for an event sent under NR bit nr."""
        self.send(cmd, data)
        if self.proto & nr:
            return None
        return self.answer()

    def negotiate(self):
        self.send(b"O", struct.pack(">III", SMFI_VERSION, self.actions,
                                    self.offered))
        code, data = self.read()
        if code != b"O" or len(data) < 12:
            raise MilterError("bad negotiation reply %r" % code)
        _, _, proto = struct.unpack(">III", data[:12])
        if proto & ~self.offered:
            raise MilterError("milter asks for 0x%x, never offered"
                              % (proto & ~self.offered))
        self.proto = proto

    def macro(self, stage, **pairs):
        data = b"".join(k.encode() + b"\0" + v.encode() + b"\0"
                        for k, v in pairs.items())
        self.send(b"D", stage + data)

    def connect(self):
        self.macro(b"C", j="mta.example", _="client [127.0.0.1]")
        return self.call(b"C", b"client.example\0" + b"4"
                         + struct.pack(">H", 12345) + b"127.0.0.1\0",
                         SMFIP_NR_CONN)

    def mail(self, addr, qid):
        self.macro(b"M", i=qid)
        return self.call(b"M", b"<" + addr + b">\0", SMFIP_NR_MAIL)

    def rcpt(self, addr, qid):
        self.macro(b"R", i=qid)
        return self.call(b"R", b"<" + addr + b">\0", SMFIP_NR_RCPT)

    def header(self, name, value, qid):
        """value: bytes exactly as sent, its own NUL included if any.
        Postfix sends the EOH macros before each header."""
        self.macro(b"L", i=qid)
        return self.call(b"L", name + b"\0" + value + b"\0",
                         SMFIP_NR_HDR)


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


class Transaction:
    """The answers of one transaction: None where none was due (NR);
    eom is None when the milter refused earlier and the MTA aborted."""
    proto = 0
    connect = mail = eoh = body = eom = None
    stray = b""

    def __init__(self):
        self.rcpts = []
        self.headers = []

    def __repr__(self):
        return repr(self.__dict__)


def continued(reply):
    return reply is not None and reply[0] == b"c"


def message(port, qid, headers, rcpts=(b"to@dest.example",), body=b"b\r\n",
            offered=OFFERED, actions=SMFIF_ALL, sender=None):
    """One transaction as an MTA runs it; stops at the first answer
    from connect to body that is neither continue nor none.  actions:
    the SMFIF_* bits the MTA grants."""
    t = Transaction()
    mta = MtaSide(port, offered, actions=actions)
    try:
        mta.negotiate()
        t.proto = mta.proto
        t.connect = mta.connect()
        if t.connect is not None and not continued(t.connect):
            raise MilterError("connect answered %r" % (t.connect,))
        t.mail = mta.mail(sender or SENDER.encode(), qid)
        if t.mail is not None and not continued(t.mail):
            raise MilterError("MAIL answered %r" % (t.mail,))
        t.rcpts = [mta.rcpt(r, qid) for r in rcpts]
        for name, value in headers:
            reply = mta.header(name, value, qid)
            t.headers.append(reply)
            if reply is not None and not continued(reply):
                mta.send(b"A")
                return t
        mta.macro(b"N", i=qid)
        if not mta.proto & SMFIP_NOEOH:
            t.eoh = mta.call(b"N", nr=SMFIP_NR_EOH)
        if t.eoh is not None and not continued(t.eoh):
            mta.send(b"A")
            return t
        if body:
            mta.macro(b"B", i=qid)
            t.body = mta.call(b"B", body, SMFIP_NR_BODY)
        if t.body is not None and not continued(t.body):
            mta.send(b"A")
            return t
        mta.macro(b"E", i=qid)
        t.eom = mta.call(b"E")
        t.stray = mta.finish()
        return t
    finally:
        mta.close()


def is_tempfail(reply, *words):
    if reply is None:
        return False
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


def check_negotiation(c, port):
    with_nr = MtaSide(port, OFFERED | NR_ALL)
    without = MtaSide(port, OFFERED)
    try:
        with_nr.negotiate()
        without.negotiate()
    finally:
        with_nr.close()
        without.close()
    c.ok(with_nr.proto & NR_ALL == NR_WANTED,
         "NR offered: the milter asks for NR_CONN, NR_MAIL, NR_HDR, "
         "NR_EOH, NR_BODY and no other NR bit (RCPT keeps its answer)",
         "asked 0x%x" % with_nr.proto)
    c.ok(without.proto & NR_ALL == 0,
         "NR not offered: no NR bit asked for", "asked 0x%x" % without.proto)


def decision_logged(milter, qid, *words):
    return any(l for l in milter.log().splitlines()
               if "%s: action=tempfail" % qid in l
               and all(w in l for w in words))


def check_forged(c, milter, relay):
    """A header capture refuses: 451 at end of message, whether the MTA
    offers the NR flags or not.  Without them libmilter offers them
    anyway (and answers continue for us), so the header is continued
    in both cases; see cb_header in plugin/milter.c."""
    before = relay.count()
    for nr, offered in (("NR", OFFERED | NR_ALL), ("no NR", OFFERED)):
        for i, (what, value) in enumerate(FORGED):
            qid = "RAWF%d%s" % (i, "N" if offered & NR_ALL else "O")
            try:
                got = message(milter.port, qid,
                              [(b"From", b" <a@origin.example>"),
                               (b"Subject", value), (b"X-After", b" y")],
                              offered=offered)
            except MilterError as e:
                c.ok(False, "forged header (%s, %s)" % (what, nr), e)
                continue
            if offered & NR_ALL:
                quiet = (got.connect is None and got.eoh is None
                         and got.body is None
                         and got.headers == [None] * 3 and got.stray == b"")
            else:
                quiet = (continued(got.connect) and continued(got.eoh)
                         and continued(got.body)
                         and all(continued(r) for r in got.headers))
            c.ok(quiet and is_tempfail(got.eom, "Subject", "line break"),
                 "forged header (%s, %s): %s, then 451 at end of "
                 "message naming it" % (what, nr,
                                        "no answer before" if offered
                                        & NR_ALL else "continue before"),
                 got)
            c.ok(decision_logged(milter, qid, "Subject", "line break"),
                 "forged header (%s, %s): the tempfail line is logged "
                 "with the queue id and the reason" % (what, nr),
                 milter.log())
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
    c.ok(continued(got.eom) or (got.eom and got.eom[0] == b"a"),
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
    c.ok(continued(got.eom), "NUL in a value: message accepted", got)
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
    for nr, offered in (("no NR", OFFERED), ("NR", OFFERED | NR_ALL)):
        marker = "long-rcpt-" + nr.replace(" ", "")
        got = message(port, "RAWLONG",
                      [(b"X-Marker", b" " + marker.encode())],
                      rcpts=(long_rcpt, b"ok@dest.example"),
                      offered=offered)
        c.ok(is_tempfail(got.rcpts[0], "979")
             and continued(got.rcpts[1]),
             "980-octet recipient (%s): 451 for that RCPT alone" % nr,
             got)
        c.ok(continued(got.eom) and got.stray == b"",
             "980-octet recipient (%s): the message goes on" % nr, got)
        copy = wait_copy(relay, marker.encode())
        lines = header_block(copy.content) if copy else []
        c.ok([l for l in lines if l.startswith(b"X-Envelope-To:")]
             == [b"X-Envelope-To: <ok@dest.example>"]
             and max(len(l) for l in lines) <= 998,
             "980-octet recipient (%s): the copy lists the others, no "
             "line > 998" % nr, copy.content if copy else "no copy")


def check_long_sender(c, milter, relay):
    """A sender the capture refuses: with NR no answer to MAIL, every
    RCPT continued (not refused one by one), then 451 at end of
    message naming the sender, and no copy."""
    long_sender = b"s" * (980 - len(b"@x.example")) + b"@x.example"
    before = relay.count()
    for nr, offered in (("no NR", OFFERED), ("NR", OFFERED | NR_ALL)):
        qid = "RAWLONGS" + nr.replace(" ", "")
        got = message(milter.port, qid, [(b"X-Marker", b" long-sender")],
                      rcpts=(b"a@dest.example", b"b@dest.example"),
                      offered=offered, sender=long_sender)
        c.ok((got.mail is None if offered & NR_ALL else continued(got.mail))
             and all(continued(r) for r in got.rcpts),
             "980-octet sender (%s): %s MAIL, every RCPT continued"
             % (nr, "no answer to" if offered & NR_ALL else "continue for"),
             got)
        c.ok(is_tempfail(got.eom, "979") and got.stray == b"",
             "980-octet sender (%s): 451 at end of message naming the "
             "length" % nr, got)
        c.ok(decision_logged(milter, qid, "MAIL FROM"),
             "980-octet sender (%s): the tempfail line is logged with "
             "the queue id" % nr, milter.log())
    c.ok(relay.count() == before,
         "no copy of a message with a refused sender reached the relay",
         "%d new" % (relay.count() - before))


def check_noeoh(c, port, relay):
    """Offered SMFIP_NOEOH, the milter takes it; the copy still has its
    blank line after the headers, with a body and without one."""
    offered = OFFERED | NR_ALL | SMFIP_NOEOH
    for what, body in (("with a body", b"the body\r\n"), ("no body", b"")):
        marker = "noeoh-" + what.replace(" ", "-")
        got = message(port, "RAWNOEOH", [(b"X-Marker", b" " + marker.encode())],
                      body=body, offered=offered)
        c.ok(got.proto & SMFIP_NOEOH and got.eoh is None
             and continued(got.eom) and got.stray == b"",
             "NOEOH offered (%s): asked for, message accepted" % what, got)
        copy = wait_copy(relay, marker.encode())
        c.ok(copy is not None and copy.content.endswith(
            b"X-Marker: " + marker.encode() + b"\r\n\r\n" + body),
             "NOEOH (%s): the copy has its blank line, byte-exact" % what,
             copy.content if copy else "no copy")


def check_nr_accepted(c, port, relay):
    """Under NR a good message: no answer to connect, MAIL, headers, EOH
    and body, one to RCPT and the end, nothing more; copied whole."""
    got = message(port, "RAWNR",
                  [(b"Subject", b" folded\n here"),
                   (b"X-Marker", b" nr-accepted")],
                  body=b"line one\r\nline two\r\n",
                  offered=OFFERED | NR_ALL)
    c.ok(got.connect is None and got.headers == [None, None]
         and got.eoh is None and got.body is None
         and got.mail is None and continued(got.rcpts[0])
         and continued(got.eom) and got.stray == b"",
         "NR: answers for RCPT and the end only, none owed", got)
    copy = wait_copy(relay, b"nr-accepted")
    c.ok(copy is not None and copy.content.endswith(
        b"Subject: folded\r\n here\r\nX-Marker: nr-accepted\r\n\r\n"
        b"line one\r\nline two\r\n"),
         "NR: the copy is byte-exact", copy.content if copy else "no copy")


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
        c.ok(is_tempfail(got.eom, "rules"),
             "regex limit on a header: 451 at end of message", got)
        c.ok(relay.count() == before and "rule evil" in milter.log(),
             "regex limit: no copy, the log names the rule",
             milter.log())
    finally:
        milter.stop()


SMFIF_QUARANTINE = 0x20


def reply_text(reply):
    return reply[1].rstrip(b"\0").decode("utf-8", "replace") if reply else ""


def check_quarantine(c, workdir):
    """spool+quarantine on a failed sync copy, with and without
    SMFIF_QUARANTINE granted (break3 finding 1)."""
    relay = h.SinkRelay("raw-quarantine",
                        os.path.join(workdir, "store-q")).start()
    relay.set_faults({"MAIL": "451 4.3.0 down for now"})
    milter = h.Milter(os.environ["ARCHIVE_MILTER"],
                      os.path.join(workdir, "milter-q"), relay.port,
                      ARCHIVE_TO, relay_timeout=3, delivery="sync",
                      on_failure=None,
                      policy={"on_failure": "spool+quarantine"},
                      spool_retry_min=1, spool_retry_max=1)
    milter.start()
    try:
        # Not granted: 451, nothing left behind.
        got = message(milter.port, "RAWQNO",
                      [(b"X-Marker", b" quarantine-denied")],
                      actions=SMFIF_ALL & ~SMFIF_QUARANTINE)
        mods = got.eom[2] if got.eom else []
        c.ok(is_tempfail(got.eom, "cannot quarantine")
             and not any(m[0] == b"q" for m in mods),
             "quarantine not granted: 451 at end of message, no hold",
             got)
        c.ok(milter.spool_files("queue") == []
             and milter.spool_files("hold") == [],
             "quarantine not granted: the copy is withdrawn from the "
             "spool", "queue=%r hold=%r" % (milter.spool_files("queue"),
                                            milter.spool_files("hold")))
        c.ok(decision_logged(milter, "RAWQNO", "cannot quarantine",
                             "not quarantined"),
             "quarantine not granted: the decision line says tempfail",
             milter.log())

        # Granted: held, accepted, the copy queued.
        got = message(milter.port, "RAWQYES",
                      [(b"X-Marker", b" quarantine-granted")])
        mods = got.eom[2] if got.eom else []
        c.ok(continued(got.eom)
             and any(m[0] == b"q" and b"X-Archive-Id=am1." in m[1]
                     for m in mods),
             "quarantine granted: the original is held and accepted", got)
        c.ok(len(milter.spool_files("queue")) == 1,
             "quarantine granted: its copy waits in queue/",
             milter.spool_files("queue"))

        # The relay takes mail again: only the accepted one's copy.
        relay.set_faults({})
        copy = wait_copy(relay, b"quarantine-granted", timeout=15)
        h.wait_for(lambda: milter.spool_files("queue") == [], 10,
                   "queue/ to empty")
        c.ok(copy is not None
             and not any(b"quarantine-denied" in m.content
                         for m in relay.messages()),
             "the relay gets the held message's copy, never the "
             "tempfailed one's",
             [m.content[:200] for m in relay.messages()])
    finally:
        milter.stop()
        relay.stop()


def check_reply_texts(c, workdir, relay):
    """What the client reads of our failures: the condition, not our
    paths, ids or the relay's address (break3 finding 2)."""
    spool_milter = h.Milter(os.environ["ARCHIVE_MILTER"],
                            os.path.join(workdir, "milter-sp"), relay.port,
                            ARCHIVE_TO, relay_timeout=3, delivery="spool")
    down_milter = h.Milter(os.environ["ARCHIVE_MILTER"],
                           os.path.join(workdir, "milter-down"),
                           h.free_port(), ARCHIVE_TO, relay_timeout=3)
    spool_milter.start()
    down_milter.start()
    try:
        # The spool's tmp/ gone from under the daemon (it holds the
        # directory open): the copy cannot be written.
        os.rmdir(os.path.join(spool_milter.spool_dir, "tmp"))
        got = message(spool_milter.port, "RAWSPOOL",
                      [(b"X-Marker", b" spool-gone")])
        text = reply_text(got.eom)
        c.ok(got.eom is not None and got.eom[0] == b"y"
             and text == "451 4.3.0 archive spool unavailable",
             "spool unusable: 451 'archive spool unavailable', nothing "
             "more", got)
        c.ok(decision_logged(spool_milter, "RAWSPOOL",
                             "archive spool unavailable")
             and "cannot create %s" % os.path.join(
                 spool_milter.spool_dir, "tmp") in spool_milter.log(),
             "spool unusable: the log has the path and the reason",
             spool_milter.log())

        got = message(down_milter.port, "RAWDOWN",
                      [(b"X-Marker", b" relay-down")])
        text = reply_text(got.eom)
        c.ok(got.eom is not None and got.eom[0] == b"y"
             and text == "451 4.3.0 archive copy failed: unreachable",
             "relay down: 451 'archive copy failed: unreachable', no "
             "address", got)
        c.ok(h.LOOPBACK in down_milter.log(),
             "relay down: the log names the relay's address",
             down_milter.log())
    finally:
        spool_milter.stop()
        down_milter.stop()


def check_stop_bounded(c, workdir):
    """SIGTERM while a worker waits on a relay that stalls after the
    end marker, its limit (60 s) far beyond the daemon's stop grace
    (AM_STOP_GRACE_MS, 5 s, plugin/main.c): the daemon ends within the
    grace, plus up to 5 s that libmilter takes to see the signal (its
    listener polls with that timeout), says it left copies, and they
    are in queue/ and reach the relay after the next start (break3
    finding 8)."""
    relay = h.SinkRelay("raw-stop", os.path.join(workdir, "store-s")).start()
    relay.set_faults({"DOT": "stall"})
    milter = h.Milter(os.environ["ARCHIVE_MILTER"],
                      os.path.join(workdir, "milter-s"), relay.port,
                      ARCHIVE_TO, relay_timeout=60, delivery="spool",
                      workers=2)
    milter.start()
    try:
        for i in range(2):
            got = message(milter.port, "RAWSTOP%d" % i,
                          [(b"X-Marker", b" stop-%d" % i)])
            c.ok(continued(got.eom), "stop: copy %d spooled, message "
                 "accepted" % i, got)
        h.wait_for(lambda: relay.stats()[2] >= 1, 10,
                   "a copy stalled at the relay")
        t0 = time.monotonic()
        os.kill(milter.proc.pid, signal.SIGTERM)
        try:
            milter.proc.popen.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
        took = time.monotonic() - t0
        c.ok(not milter.running() and took < 13,
             "stop: SIGTERM with a worker on a stalled relay ends the "
             "daemon within the grace", "%.1f s, running %s"
             % (took, milter.running()))
        c.ok("still sending" in milter.log()
             and len(milter.spool_files("queue")) == 2,
             "stop: the log says copies were left; both are in queue/",
             "queue/: %s\n%s" % (milter.spool_files("queue"),
                                  milter.log()[-1500:]))
        relay.set_faults({})
        if milter.running():
            milter.stop()
        milter.start()
        for i in range(2):
            copy = wait_copy(relay, b"stop-%d" % i)
            c.ok(copy is not None, "stop: copy %d reaches the relay after "
                 "the next start" % i)
    finally:
        milter.stop()
        relay.stop()


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
        check_negotiation(c, milter.port)
        check_forged(c, milter, relay)
        check_nr_accepted(c, milter.port, relay)
        check_noeoh(c, milter.port, relay)
        check_folds(c, milter.port, relay)
        check_nul(c, milter.port, relay)
        check_long_rcpt(c, milter.port, relay)
        check_long_sender(c, milter, relay)
        check_match_limit(c, workdir, relay)
        check_quarantine(c, workdir)
        check_reply_texts(c, workdir, relay)
        check_stop_bounded(c, workdir)
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
