#!/usr/bin/env python3
"""test_faults.py - issue 4's fault matrix, end to end through a real Postfix

One private Postfix, one main relay, one archive relay whose faults are
reconfigured between cases (harness.SinkRelay.set_faults), and
archive-milter with `delivery = MODE` for the whole run; run once per
mode (--mode sync, --mode spool).  The rule sends each copy to two
archive addresses, so that "some recipients refused" exists.  The
policy is the default of conf.h (no on_* key), which never loses a copy:

  temporary fault   sync: the original is tempfailed (4xx at end of
                    DATA); spool: accepted, the copy waits in queue/ and
                    is retried until the relay takes it
  permanent fault   accepted; the copy is kept in hold/ (and listed by
                    --spool-list) until `--spool-retry all`

Cases (each in both modes):
  relay-down, mail-4xx, mail-5xx, some-rcpt-4xx, some-rcpt-5xx,
  all-rcpt-4xx, all-rcpt-5xx, data-4xx, data-5xx, dot-4xx, dot-5xx,
  close-mid-data, no-greeting, stall-after-dot (these: the relay faulty,
  then healed), milter-sigkill (SIGKILL while copies are in the spool or
  one is in flight, then started again on the same spool),
  duplicate-after-crash (spool mode: the relay stores the copy but its
  250 is lost, the milter is killed; after the restart the copy comes
  again with the same X-Archive-Id),
  spool-unwritable and spool-full (a private size-limited tmpfs under the
  spool, remounted read-only or filled; skipped with the reason when
  mount is not permitted), policy-key (one on_OUTCOME key instead of
  the default: sync on_data_error = reject, spool on_data_error =
  tempfail), flood (200 concurrent SMTP sessions into Postfix while the
  relay flaps).

The invariant checked in every case, per message (identified by its
Message-ID, which the journal copy carries; copies by X-Archive-Id):
  * what the client was told (250 / 4xx) agrees with Postfix's log
    (qmgr picked it up, or a milter-reject line) and what the main relay
    received;
  * while the fault lasts, every accepted message has its copy at the
    archive relay or in the spool, for every archive address;
  * once the relay is healed (and held copies pushed with
    `--spool-retry all`), every accepted message has its copy at the
    archive relay for every archive address, nothing of it is left in
    the spool, and all copies of one message carry one X-Archive-Id;
  * the policy's expectation for the case (tempfail / accept / hold);
  * after the case a fresh message goes through with its copy (the
    milter recovered).

Known limits:
XXX: relay-down in spool mode waits a fixed RETRY_MIN + RELAY_TIMEOUT
for the workers' attempts, since a relay that is down sees nothing.
XXX: spool-unwritable and spool-full need mount(2) (tmpfs, remount);
without it they are skipped, with the reason in the TAP output.
XXX: the flood in sync mode can only require that some originals are
accepted between the relay's flaps; how many depends on timing.
XXX: the crash window between the spool write and the reply to Postfix
is not hit deliberately; milter-sigkill kills while copies wait or are
in flight, duplicate-after-crash while the relay's 250 is outstanding.

Output is TAP; each "not ok" line names the mode, the case and what was
missing.  Exit 0 all passed, 1 a check failed, 77 skipped (not root, no
Postfix), 99 harness error.
"""

import argparse
import os
import re
import secrets
import smtplib
import subprocess
import sys
import threading
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402

SENDER = "sender@origin.example"
RCPTS = ["to1@dest.example", "to2@dest.example"]
ARCHIVE = ["journal@archive.example", "journal2@archive.example"]

# Short relay limits: a stalled relay costs this much per copy.  Far
# below Postfix's milter_content_timeout (60 s in the harness).
RELAY_TIMEOUT = 3
RETRY_MIN, RETRY_MAX = 1, 2
WAIT = 40           # bound of every wait for the spool to drain
N = 3               # messages per case
FLOOD = 200         # concurrent sessions of the flood case
PER_SESSION = 3     # messages in each of them

RUN = secrets.token_hex(4)

# The whole mode must end well inside meson's timeout even when the
# product fails every case: once this budget is spent, every further
# wait is cut to a few seconds (the checks still run and fail).
BUDGET = 270
_T0 = time.monotonic()


def bound(seconds):
    left = _T0 + BUDGET - time.monotonic()
    return max(3.0, min(seconds, left))


class Checks:
    def __init__(self, mode):
        self.mode = mode
        self.n = 0
        self.failed = []

    def ok(self, cond, case, what, detail=""):
        self.n += 1
        name = "%s %s: %s" % (self.mode, case, what)
        if cond:
            print("ok %d - %s" % (self.n, name))
        else:
            self.failed.append(name)
            print("not ok %d - %s" % (self.n, name))
            for line in str(detail).splitlines()[:30]:
                print("#   " + line)
        sys.stdout.flush()
        return cond

    def skip(self, case, why):
        self.n += 1
        print("ok %d - %s %s # SKIP %s" % (self.n, self.mode, case, why))
        sys.stdout.flush()

    def note(self, text):
        for line in str(text).splitlines():
            print("# " + line)
        sys.stdout.flush()


# ------------------------------------------------------------------ #
# Messages and what became of them                                     #
# ------------------------------------------------------------------ #


class Msg:
    def __init__(self, case, mode, i, size=0):
        self.mid = "<%s.%s.%d.%s@faults.test>" % (case, mode, i, RUN)
        self.case = case
        body = b"Fault case %s, mode %s, message %d.\r\n" % (
            case.encode(), mode.encode(), i)
        if size:
            line = b"x" * 76 + b"\r\n"
            body += line * (size // len(line) + 1)
        self.data = (b"From: Sender <sender@origin.example>\r\n"
                     b"To: to1@dest.example, to2@dest.example\r\n"
                     b"Subject: fault %s %d\r\n"
                     b"Message-ID: %s\r\n"
                     b"Date: Fri, 04 Dec 2026 12:00:00 +0000\r\n"
                     b"\r\n" % (case.encode(), i, self.mid.encode())) + body
        self.code = None        # final reply code the client saw; 0: none
        self.text = ""

    @property
    def accepted(self):
        return self.code == 250

    def __repr__(self):
        return "%s -> %s %s" % (self.mid, self.code, self.text[:80])


def send(port, msg, timeout=90):
    """One message over its own connection; sets msg.code/text."""
    try:
        with smtplib.SMTP(h.LOOPBACK, port, timeout=timeout) as s:
            s.sendmail(SENDER, RCPTS, msg.data)
            msg.code, msg.text = 250, "accepted"
    except smtplib.SMTPRecipientsRefused as e:
        first = next(iter(e.recipients.values()))
        msg.code, msg.text = first[0], str(first[1])
    except smtplib.SMTPResponseException as e:
        msg.code = e.smtp_code
        msg.text = (e.smtp_error.decode("utf-8", "replace")
                    if isinstance(e.smtp_error, bytes) else str(e.smtp_error))
    except (OSError, smtplib.SMTPException) as e:
        msg.code, msg.text = 0, "%s: %s" % (type(e).__name__, e)
    return msg


def send_session(port, msgs, timeout=90, connected=None):
    """The messages one after the other over one connection (a 4xx
    for one does not end the session: RSET and go on).  connected: a
    function called once the server has greeted and answered EHLO,
    before the first message."""
    s = None
    if connected is not None:
        try:
            s = smtplib.SMTP(h.LOOPBACK, port, timeout=timeout)
            s.ehlo()
        except (OSError, smtplib.SMTPException):
            s = None
        connected(s is not None)
    for m in msgs:
        try:
            if s is None:
                s = smtplib.SMTP(h.LOOPBACK, port, timeout=timeout)
            s.sendmail(SENDER, RCPTS, m.data)
            m.code, m.text = 250, "accepted"
        except smtplib.SMTPResponseException as e:
            m.code = e.smtp_code
            m.text = (e.smtp_error.decode("utf-8", "replace")
                      if isinstance(e.smtp_error, bytes)
                      else str(e.smtp_error))
            try:
                s.rset()
            except (OSError, smtplib.SMTPException):
                s = None
        except smtplib.SMTPRecipientsRefused as e:
            m.code, m.text = 550, str(e.recipients)
            s = None
        except (OSError, smtplib.SMTPException) as e:
            m.code, m.text = 0, "%s: %s" % (type(e).__name__, e)
            s = None
    if s is not None:
        try:
            s.quit()
        except (OSError, smtplib.SMTPException):
            pass


def send_all(port, msgs):
    """Each message in a thread of its own, all at once."""
    threads = [threading.Thread(target=send, args=(port, m)) for m in msgs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return msgs


HDR_MID = re.compile(rb"(?im)^Message-ID:[ \t]*(<[^>\r\n]*>)")
HDR_AID = re.compile(rb"(?im)^X-Archive-Id:[ \t]*([^\r\n]*?)[ \t]*\r?$")


def header_of(content):
    header, _ = h.split_message(content)
    return header if header is not None else content


def relay_copies(relay):
    """{message-id: [(x-archive-id, [archive addresses])...]} of every
    copy the archive relay stored."""
    out = {}
    for m in relay.messages():
        hdr = header_of(m.content)
        mid = HDR_MID.search(hdr)
        aid = HDR_AID.search(hdr)
        if not mid:
            continue
        out.setdefault(mid.group(1).decode(), []).append(
            (aid.group(1).decode() if aid else None,
             [r.lower() for r in m.envelope_rcpts()]))
    return out


def relay_bodies(relay):
    """{message-id: [body of each copy]}: what follows the header."""
    out = {}
    for m in relay.messages():
        mid = HDR_MID.search(header_of(m.content))
        if mid:
            out.setdefault(mid.group(1).decode(), []).append(
                h.split_message(m.content)[1])
    return out


def spool_copies(milter, part):
    """{message-id: [spool file name...]} in SPOOL/part, found by the
    original's Message-ID inside the spooled copy."""
    out = {}
    for name in milter.spool_files(part):
        try:
            with open(os.path.join(milter.spool_dir, part, name), "rb") as f:
                data = f.read()
        except OSError:
            continue
        for mid in set(HDR_MID.findall(data)):
            out.setdefault(mid.decode(), []).append(name)
    return out


def archived_to(copies, mid):
    got = set()
    for _, rcpts in copies.get(mid, []):
        got.update(rcpts)
    return got


class PostfixLog:
    """What Postfix's log says of each message-id: queued (qmgr took it)
    or refused at end of message (milter-reject, with its code)."""

    def __init__(self, postfix):
        self.text = postfix.log()
        self.qid_of = {}
        for qid, mid in re.findall(
                r"postfix/cleanup\[\d+\]: (\w+): message-id=(<[^>]*>)",
                self.text):
            self.qid_of.setdefault(mid, []).append(qid)
        self.queued = set(re.findall(r"postfix/qmgr\[\d+\]: (\w+): from=<",
                                     self.text))
        self.refused = dict(re.findall(
            r"(\w+): milter-reject: END-OF-MESSAGE from [^:]*: (\d\.\d\.\d)",
            self.text))

    def state(self, mid):
        for qid in self.qid_of.get(mid, []):
            if qid in self.queued:
                return "queued"
        for qid in self.qid_of.get(mid, []):
            if qid in self.refused:
                return "refused " + self.refused[qid]
        return "absent"


# ------------------------------------------------------------------ #
# The world of one mode                                                #
# ------------------------------------------------------------------ #


class Env:
    def __init__(self, args, mode):
        self.args = args
        self.mode = mode
        self.world = None
        self.mount = None       # the private tmpfs, when mounted
        self.mount_why = None   # why not, when not

    def try_mount(self, workdir):
        """A 16 MB tmpfs for the spool: lets the test make it read-only
        or full.  Root ignores file modes, so chmod cannot."""
        d = os.path.join(workdir, "spoolfs")
        os.makedirs(d, exist_ok=True)
        r = subprocess.run(["mount", "-t", "tmpfs", "-o",
                            "size=16m,mode=0700", "tmpfs", d],
                           capture_output=True, text=True)
        if r.returncode != 0:
            self.mount_why = ("mount -t tmpfs not permitted here: %s"
                              % (r.stderr.strip() or r.returncode))
            return None
        h.WATCHDOG.tell("umount", d)
        self.mount = d
        return os.path.join(d, "spool")

    def umount(self):
        if self.mount:
            r = subprocess.run(["umount", self.mount], capture_output=True)
            if r.returncode != 0:
                subprocess.run(["umount", "-l", self.mount],
                               capture_output=True)
            h.WATCHDOG.tell("unumount", self.mount)
            self.mount = None

    def start(self):
        import tempfile
        workdir = tempfile.mkdtemp(prefix="archive-faults-")
        os.chmod(workdir, 0o755)
        if not self.args.keep:
            h.WATCHDOG.tell("rmtree", workdir)
        self.workdir = workdir
        spool = self.try_mount(workdir)
        milter_keys = {}
        if spool:
            # The floor below which new copies tempfail; small, for a
            # 16 MB file system.
            milter_keys["spool_min_free"] = "1M"
        opts = dict(delivery=self.mode, spool_dir=spool, workers=2,
                    spool_retry_min=RETRY_MIN, spool_retry_max=RETRY_MAX,
                    on_failure=None, relay_timeout=RELAY_TIMEOUT,
                    milter_keys=milter_keys, archive_to=", ".join(ARCHIVE))
        # 200 sessions at once: no per-client limits, enough smtpd
        # processes, no flow delay.
        pf = {"default_process_limit": "400",
              "smtpd_client_connection_count_limit": "0",
              "smtpd_client_connection_rate_limit": "0",
              "smtpd_client_message_rate_limit": "0",
              "smtpd_client_recipient_rate_limit": "0",
              "in_flow_delay": "0s",
              "smtpd_error_sleep_time": "0s",
              "smtpd_soft_error_limit": "1000",
              "smtpd_hard_error_limit": "1000",
              "smtpd_junk_command_limit": "1000",
              "smtp_destination_concurrency_limit": "50"}

        def archive_relay(wd):
            d = os.path.join(wd, "archive")
            return h.SinkRelay("archive-relay", os.path.join(d, "store"))
        self.world = h.World(milter_exe=self.args.milter, workdir=os.path.join(
            workdir, "world"), postfix_extra=pf, milter_opts=opts,
            archive_relay=archive_relay)
        self.world.keep = True      # removed with workdir, after umount
        self.world.start()
        return self

    def stop(self):
        if self.world:
            self.world.stop()
        self.umount()
        if not self.args.keep:
            import shutil
            shutil.rmtree(self.workdir, ignore_errors=True)
            h.WATCHDOG.tell("unrmtree", self.workdir)
        else:
            print("# kept %s" % self.workdir)

    @property
    def postfix(self):
        return self.world.postfix

    @property
    def relay(self):
        return self.world.archive

    @property
    def milter(self):
        return self.world.milter

    def heal(self):
        """The archive relay up and accepting."""
        self.relay.set_faults({})
        if not self.relay.running():
            self.relay.start()

    def restart_relay(self):
        """Drop every connection (the milter's pooled ones too)."""
        self.relay.stop()
        self.relay.start()

    def ensure_milter(self, c, case):
        if not self.milter.running():
            c.ok(False, case, "archive-milter still running",
                 "it exited; its log ends:\n" + self.milter.log()[-3000:])
            self.milter.start()

    def spool_list(self):
        return self.milter.run_tool("--spool-list")

    def spool_retry_all(self):
        return self.milter.run_tool("--spool-retry", "all")


# ------------------------------------------------------------------ #
# Checks shared by the cases                                           #
# ------------------------------------------------------------------ #


def check_postfix_agrees(env, c, case, msgs):
    """The client's answer agrees with Postfix's log, and the main relay
    gets exactly the accepted ones."""
    def settled():
        log = PostfixLog(env.postfix)
        return all(log.state(m.mid) != "absent" or not m.accepted
                   for m in msgs) and log
    try:
        log = h.wait_for(settled, bound(20), "Postfix to log every message")
    except h.Timeout:
        log = PostfixLog(env.postfix)
    bad = []
    for m in msgs:
        st = log.state(m.mid)
        if m.accepted and st != "queued":
            bad.append("%s: client got 250, Postfix log says %s" % (m, st))
        if not m.accepted and st == "queued":
            bad.append("%s: client got no 250, Postfix queued it" % m)
    c.ok(not bad, case, "client replies agree with Postfix's log",
         "\n".join(bad))

    want = {m.mid for m in msgs if m.accepted}

    def main_has():
        got = set()
        for s in env.world.main.messages():
            mm = HDR_MID.search(header_of(s.content))
            if mm:
                got.add(mm.group(1).decode())
        return (got,) if want <= got else None
    try:
        got, = h.wait_for(main_has, bound(30),
                          "main relay to receive the originals")
    except h.Timeout:
        got, = main_has() or (set(),)
    extra = {m.mid for m in msgs if not m.accepted} & got
    c.ok(want <= got, case, "main relay received every accepted original",
         "missing: %s" % sorted(want - got))
    c.ok(not extra, case, "main relay received nothing Postfix refused",
         "unexpected: %s" % sorted(extra))


def check_covered(env, c, case, msgs, when):
    """Every accepted message has, for every archive address, its copy
    at the relay, or a copy in the spool (queue/ or hold/)."""
    # The spool first, queue/ before hold/, then the relay: a copy
    # moves only from queue/ to the relay (removed after the relay's
    # 250, when the relay has stored it) or from queue/ to hold/, so in
    # this order a copy on the move is seen in one place or the next.
    spooled = {}
    for part in ("queue", "hold"):
        for mid, names in spool_copies(env.milter, part).items():
            spooled.setdefault(mid, []).extend(names)
    copies = relay_copies(env.relay)
    bad = []
    for m in msgs:
        if not m.accepted:
            continue
        missing = set(ARCHIVE) - archived_to(copies, m.mid)
        if missing and m.mid not in spooled:
            bad.append("%s accepted, no copy for %s at the relay and none "
                       "in the spool" % (m.mid, sorted(missing)))
    c.ok(not bad, case, "%s: every accepted message has its copy at the "
         "relay or in the spool" % when, "\n".join(bad))


def wait_drained(env, c, case, msgs, what="after the relay is healed"):
    """Bounded wait until every accepted message has its copies at the
    relay and none of it is left in the spool; then the checks."""
    acc = [m for m in msgs if m.accepted]

    def done():
        copies = relay_copies(env.relay)
        q = spool_copies(env.milter, "queue")
        hd = spool_copies(env.milter, "hold")
        return all(set(ARCHIVE) <= archived_to(copies, m.mid)
                   and m.mid not in q and m.mid not in hd for m in acc)
    limit = bound(WAIT)
    try:
        h.wait_for(done, limit, "spool to drain")
    except h.Timeout:
        pass
    copies = relay_copies(env.relay)
    q = spool_copies(env.milter, "queue")
    hd = spool_copies(env.milter, "hold")
    bodies = relay_bodies(env.relay)
    bad, ids, damaged = [], [], []
    for m in acc:
        missing = set(ARCHIVE) - archived_to(copies, m.mid)
        if missing:
            where = ("in queue/" if m.mid in q else
                     "in hold/" if m.mid in hd else "nowhere: LOST")
            bad.append("%s: no copy for %s at the relay within %.0f s (%s)"
                       % (m.mid, sorted(missing), limit, where))
        elif m.mid in q or m.mid in hd:
            bad.append("%s: delivered but still in the spool (%s)"
                       % (m.mid, q.get(m.mid) or hd.get(m.mid)))
        aids = {a for a, _ in copies.get(m.mid, [])}
        if len(aids) > 1 or None in aids:
            ids.append("%s: copies carry X-Archive-Id %s"
                       % (m.mid, sorted(map(str, aids))))
        want = h.split_message(m.data)[1]
        for body in bodies.get(m.mid, []):
            if body != want:
                damaged.append("%s: a copy's body differs from the "
                               "original's (%s octets, want %d)"
                               % (m.mid, len(body) if body is not None
                                  else "no", len(want)))
    c.ok(not bad, case, "%s every accepted message has its copy at the "
         "relay for every archive address, spool empty of it" % what,
         "\n".join(bad) + "\nmilter log tail:\n"
         + env.milter.log()[-1500:] if bad else "")
    c.ok(not ids, case, "one X-Archive-Id per message on every copy",
         "\n".join(ids))
    c.ok(not damaged, case, "every copy carries the original's body "
         "unchanged", "\n".join(damaged))


def check_recovered(env, c, case):
    m = send(env.postfix.port, Msg(case + "-after", env.mode, 0))
    c.ok(m.accepted, case, "a message after the case is accepted", repr(m))
    if m.accepted:
        wait_drained(env, c, case + "-after", [m], "after the case:")


def check_hold_listed(env, c, case, msgs):
    """Every held copy of these messages is named by --spool-list."""
    hd = spool_copies(env.milter, "hold")
    names = [n for m in msgs for n in hd.get(m.mid, [])]
    rc, out, err = env.spool_list()
    missing = [n for n in names if n not in out]
    c.ok(rc == 0 and not missing, case,
         "--spool-list exits 0 and names every held copy",
         "exit %d, not named: %s\nstdout: %s\nstderr: %s"
         % (rc, missing, out[-1500:], err[-1500:]))


def check_hold_logged(env, c, case, msgs):
    """A copy moved to hold/ is logged at error level: a line of the
    milter's log with "error" and the original's queue id or the
    copy's X-Archive-Id (the name of its file in hold/)."""
    log = PostfixLog(env.postfix)
    hd = spool_copies(env.milter, "hold")
    lines = [ln for ln in env.milter.log().splitlines()
             if re.search(r"(?i)\berror\b", ln)]
    bad = []
    for m in msgs:
        keys = log.qid_of.get(m.mid, []) + hd.get(m.mid, [])
        if not any(k in ln for k in keys for ln in lines):
            bad.append("%s (queue id or X-Archive-Id %s): no error line"
                       % (m.mid, ", ".join(keys) or "unknown"))
    c.ok(not bad, case, "each held copy has an error line in the log",
         "\n".join(bad))


def replies(msgs):
    return "\n".join(repr(m) for m in msgs)


# ------------------------------------------------------------------ #
# The relay-fault cases                                                #
# ------------------------------------------------------------------ #

# (name, faults, temporary?, partial?) -- partial: the first archive
# address is taken, only the second refused.
RELAY_CASES = [
    ("relay-down", None, True, False),
    ("mail-4xx", {"MAIL": "451 4.3.0 try again later"}, True, False),
    ("mail-5xx", {"MAIL": "550 5.7.1 sender refused"}, False, False),
    ("some-rcpt-4xx", {"RCPT": {"journal2@": "450 4.2.0 mailbox busy"}},
     True, True),
    ("some-rcpt-5xx", {"RCPT": {"journal2@": "550 5.1.1 no such user"}},
     False, True),
    ("all-rcpt-4xx", {"RCPT": "450 4.2.0 mailbox busy"}, True, False),
    ("all-rcpt-5xx", {"RCPT": "550 5.1.1 no such user"}, False, False),
    ("data-4xx", {"DATA": "451 4.3.0 try again later"}, True, False),
    ("data-5xx", {"DATA": "554 5.3.0 no data today"}, False, False),
    ("dot-4xx", {"DOT": "451 4.3.0 try again later"}, True, False),
    ("dot-5xx", {"DOT": "554 5.6.0 content refused"}, False, False),
    ("close-mid-data", {"DATA": "close-in-data"}, True, False),
    ("no-greeting", {"greet": "none"}, True, False),
    ("stall-after-dot", {"DOT": "stall"}, True, False),
]


def wait_attempts(env, name, before, n):
    """Until the relay has seen n more attempts (bounded).  A relay
    that is down sees nothing: then wait for the first retry."""
    if name == "relay-down":
        # Nothing to see at a relay that is down: give the workers one
        # connection attempt and one retry (a fixed, short wait).
        time.sleep(RETRY_MIN + RELAY_TIMEOUT)
        return True
    idx = 0 if name == "no-greeting" else 1

    def seen():
        return env.relay.stats()[idx] - before[idx] >= n
    try:
        h.wait_for(seen, bound(WAIT), "relay attempts")
        return True
    except h.Timeout:
        return False


def relay_case(env, c, name, faults, temporary, partial):
    mode = env.mode
    if faults is None:
        env.relay.stop()
    else:
        env.relay.set_faults(faults)
        if "greet" in faults:
            env.restart_relay()
    before = env.relay.stats()
    t0 = time.monotonic()
    msgs = send_all(env.postfix.port, [Msg(name, mode, i) for i in range(N)])
    c.note("%s: replies in %.1f s: %s" % (name, time.monotonic() - t0,
                                         "; ".join("%s %s" % (m.code,
                                                              m.text[:60])
                                                   for m in msgs)))
    env.ensure_milter(c, name)

    if mode == "sync" and temporary:
        c.ok(all(400 <= (m.code or 0) < 500 for m in msgs), name,
             "temporary fault: every original tempfailed (4xx)",
             replies(msgs))
    else:
        c.ok(all(m.accepted for m in msgs), name,
             "%s: every original accepted" % ("permanent fault, default "
                                              "policy" if not temporary
                                              else "spooled"),
             replies(msgs))
    check_postfix_agrees(env, c, name, msgs)

    if mode == "spool":
        # The workers try while the fault lasts.
        seen = wait_attempts(env, name, before, N)
        c.ok(seen, name, "the relay saw the workers' attempts",
             "stats before %s, now %s" % (before, env.relay.stats()))
    if not temporary:
        # A permanent refusal: the copy (for the refused address) is
        # kept in hold/, not retried, not dropped.
        def held():
            hd = spool_copies(env.milter, "hold")
            return all(m.mid in hd for m in msgs)
        try:
            h.wait_for(held, bound(WAIT), "copies in hold/")
        except h.Timeout:
            pass
        hd = spool_copies(env.milter, "hold")
        q = spool_copies(env.milter, "queue")
        c.ok(all(m.mid in hd for m in msgs), name,
             "permanent refusal: the copy is kept in hold/",
             "not in hold/: %s; in queue/: %s\nmilter log tail:\n%s"
             % ([m.mid for m in msgs if m.mid not in hd], sorted(q),
                env.milter.log()[-1500:]))
        check_hold_listed(env, c, name, msgs)
        check_hold_logged(env, c, name, msgs)
    elif mode == "spool":
        hd = spool_copies(env.milter, "hold")
        c.ok(not any(m.mid in hd for m in msgs), name,
             "temporary fault: no copy moved to hold/",
             "held: %s" % [m.mid for m in msgs if m.mid in hd])
    if partial and mode == "sync" and temporary:
        # The first address took its copy, the second tempfailed, so
        # the original was tempfailed: a copy the archive has for a
        # message the MTA did not accept.  The log must say so with the
        # copy's X-Archive-Id, so that the entry can be matched.
        def orphans_logged():
            copies = relay_copies(env.relay)
            log = PostfixLog(env.postfix)
            text = env.milter.log()
            bad = []
            for m in msgs:
                aids = [a for a, _ in copies.get(m.mid, []) if a]
                qids = log.qid_of.get(m.mid, [])
                if not aids:
                    bad.append("%s: no copy at the relay" % m.mid)
                elif not any(a in ln and any(q in ln for q in qids)
                             for a in aids for ln in text.splitlines()):
                    bad.append("%s (queue id %s): no log line with "
                               "X-Archive-Id %s" % (m.mid, qids, aids))
            return bad
        try:
            h.wait_for(lambda: not orphans_logged(), bound(10),
                       "the log line of each orphan copy")
        except h.Timeout:
            pass
        bad = orphans_logged()
        c.ok(not bad, name, "a copy the relay took for an original that "
             "was not accepted is logged with its X-Archive-Id",
             "\n".join(bad))
    if partial:
        def first_taken():
            copies = relay_copies(env.relay)
            return all(ARCHIVE[0] in archived_to(copies, m.mid)
                       for m in msgs if m.accepted)
        try:
            h.wait_for(first_taken, bound(WAIT), "the first address's copy")
        except h.Timeout:
            pass
        copies = relay_copies(env.relay)
        c.ok(all(ARCHIVE[0] in archived_to(copies, m.mid)
                 for m in msgs if m.accepted), name,
             "the address the relay took has its copy already",
             "copies: %s" % {m.mid: sorted(archived_to(copies, m.mid))
                             for m in msgs})
    check_covered(env, c, name, msgs, "during the fault")

    env.heal()
    if not temporary:
        rc, out, err = env.spool_retry_all()
        c.ok(rc == 0, name, "--spool-retry all exits 0",
             "exit %d\n%s%s" % (rc, out[-800:], err[-800:]))
    wait_drained(env, c, name, msgs)
    check_recovered(env, c, name)


# ------------------------------------------------------------------ #
# SIGKILL of the milter                                                #
# ------------------------------------------------------------------ #


def sigkill_case(env, c):
    name, mode = "milter-sigkill", env.mode
    msgs = []
    if mode == "sync":
        # Copies in the spool in sync mode are held ones.
        env.relay.set_faults({"DOT": "554 5.6.0 content refused"})
        msgs = send_all(env.postfix.port,
                        [Msg(name, mode, i) for i in range(N)])
        c.ok(all(m.accepted for m in msgs), name,
             "5xx: originals accepted, copies held", replies(msgs))
    # A copy in flight when the milter dies: the relay never answers
    # the final dot.  Sync: the milter is still waiting for the relay
    # when it dies, the client still waiting for Postfix.  Spool: the
    # originals are accepted once spooled; a worker is mid-copy.
    env.relay.set_faults({"DOT": "stall"})
    before = env.relay.stats()
    inflight = [Msg(name + "-inflight", mode, i) for i in range(N)]
    threads = [threading.Thread(target=send, args=(env.postfix.port, m))
               for m in inflight]
    for t in threads:
        t.start()
    if mode == "spool":
        for t in threads:
            t.join()
    try:
        h.wait_for(lambda: env.relay.stats()[2] > before[2], bound(WAIT),
                   "a copy in flight")
        inflight_seen = True
    except h.Timeout:
        inflight_seen = False
    queued_before = spool_copies(env.milter, "queue")
    held_before = spool_copies(env.milter, "hold")
    c.ok(inflight_seen, name, "a copy is in flight at the relay before "
         "the kill", "relay stats %s -> %s" % (before, env.relay.stats()))
    env.milter.kill()
    for t in threads:
        t.join()
    c.note("%s: in-flight replies: %s" % (name, "; ".join(
        "%s %s" % (m.code, m.text[:60]) for m in inflight)))
    if mode == "sync":
        c.ok(all(not m.accepted for m in inflight), name,
             "sync: a message whose copy was in flight when the milter "
             "died is not accepted", replies(inflight))
    else:
        c.ok(all(m.accepted for m in inflight), name,
             "spool: originals accepted once spooled", replies(inflight))
    # The spool as the dead milter left it: nothing accepted is lost.
    q = spool_copies(env.milter, "queue")
    hd = spool_copies(env.milter, "hold")
    lost = [m.mid for m in msgs + inflight if m.accepted
            and m.mid not in q and m.mid not in hd
            and set(ARCHIVE) - archived_to(relay_copies(env.relay), m.mid)]
    c.ok(not lost, name, "after SIGKILL every accepted copy is still in "
         "the spool", "lost: %s\nqueue before the kill: %s\nhold before: %s"
         % (lost, sorted(queued_before), sorted(held_before)))
    # Mail while the milter is down: Postfix must tempfail it
    # (milter_default_action = tempfail), never accept it uncopied.
    down = send(env.postfix.port, Msg(name + "-down", mode, 0))
    c.ok(not down.accepted and 400 <= (down.code or 0) < 500, name,
         "with the milter dead Postfix tempfails", repr(down))
    env.heal()
    env.milter.start()
    if mode == "sync":
        rc, out, err = env.spool_retry_all()
        c.ok(rc == 0, name, "--spool-retry all exits 0",
             "exit %d\n%s%s" % (rc, out[-800:], err[-800:]))
    check_postfix_agrees(env, c, name, msgs + inflight + [down])
    wait_drained(env, c, name, msgs + inflight,
                 "started again on the same spool:")
    check_recovered(env, c, name)


def duplicate_case(env, c):
    """The relay stores each copy but its 250 never arrives, and the
    milter is killed meanwhile: as a crash between 'relay said 250' and
    'spool file removed'.  After the restart every copy is sent again:
    the archive gets a duplicate with the same X-Archive-Id, which is
    how it can drop it.  A single copy would mean the spool file went
    before the relay's answer."""
    name, mode = "duplicate-after-crash", env.mode
    if mode == "sync":
        c.skip(name, "sync: no spool file to survive the crash; a relay "
               "that never answers the dot is stall-after-dot")
        return
    env.relay.set_faults({"DOT": "store-stall"})
    msgs = send_all(env.postfix.port, [Msg(name, mode, i) for i in range(N)])
    c.ok(all(m.accepted for m in msgs), name, "spooled: every original "
         "accepted", replies(msgs))

    def stored():
        copies = relay_copies(env.relay)
        return all(m.mid in copies for m in msgs if m.accepted)
    try:
        h.wait_for(stored, bound(WAIT), "the relay to store every copy")
    except h.Timeout:
        pass
    # Kill before the stage limit runs out, or the copy is simply
    # retried by the same process (also a duplicate, a weaker case).
    env.milter.kill()
    c.ok(stored(), name, "the relay stored every copy before the kill",
         "stored: %s" % sorted(relay_copies(env.relay)))
    q = spool_copies(env.milter, "queue")
    c.ok(all(m.mid in q for m in msgs if m.accepted), name,
         "unconfirmed copies are still in queue/ after the SIGKILL",
         "not in queue/: %s" % [m.mid for m in msgs if m.mid not in q])
    env.heal()
    env.milter.start()
    check_postfix_agrees(env, c, name, msgs)
    wait_drained(env, c, name, msgs, "started again:")
    copies = relay_copies(env.relay)
    single = [m.mid for m in msgs if m.accepted
              and len(copies.get(m.mid, [])) < 2]
    c.ok(not single, name, "each copy was sent again after the restart "
         "(a duplicate with the same X-Archive-Id)",
         "only one copy: %s" % single)
    check_recovered(env, c, name)


# ------------------------------------------------------------------ #
# The spool's file system                                              #
# ------------------------------------------------------------------ #


def make_readonly(env):
    """The spool's private tmpfs remounted read-only: every write, also
    through a descriptor opened before, fails with EROFS.  (A read-only
    bind mount over the spool would not do: the milter works relative
    to directory descriptors it opened at start, which keep the old,
    writable mount.)  The milter holds no file open for writing between
    copies; a copy being written at that moment makes the remount fail
    with EBUSY, so it is tried a few times."""
    d = env.mount
    for _ in range(50):
        r = subprocess.run(["mount", "-o", "remount,ro", d],
                           capture_output=True, text=True)
        if r.returncode == 0:
            return
        time.sleep(0.1)
    raise RuntimeError("remount,ro %s: %s" % (d, r.stderr))


def undo_readonly(env):
    subprocess.run(["mount", "-o", "remount,rw", env.mount],
                   capture_output=True, text=True)


def unwritable_case(env, c):
    name, mode = "spool-unwritable", env.mode
    if not env.mount:
        c.skip(name, env.mount_why)
        return
    msgs = []
    make_readonly(env)
    try:
        if mode == "spool":
            msgs = send_all(env.postfix.port,
                            [Msg(name, mode, i) for i in range(N)])
            c.ok(all(400 <= (m.code or 0) < 500 for m in msgs), name,
                 "a copy that cannot be spooled tempfails the original",
                 replies(msgs))
        else:
            # Sync needs the spool only for a copy refused for good:
            # that one must not be accepted if hold/ cannot take it.
            env.relay.set_faults({"DOT": "554 5.6.0 content refused"})
            msgs = send_all(env.postfix.port,
                            [Msg(name, mode, i) for i in range(N)])
            c.ok(all(400 <= (m.code or 0) < 500 for m in msgs), name,
                 "5xx and hold/ unwritable: the original is tempfailed, "
                 "not accepted without its copy", replies(msgs))
        env.ensure_milter(c, name)
    finally:
        undo_readonly(env)
        env.heal()
    check_postfix_agrees(env, c, name, msgs)
    check_covered(env, c, name, msgs, "spool read-only")
    wait_drained(env, c, name, msgs)
    check_recovered(env, c, name)


def statvfs_free(path):
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def fill(env, leave):
    """A filler file beside the spool so that `leave` octets stay free."""
    path = os.path.join(env.mount, "filler")
    free = statvfs_free(env.mount)
    cur = os.path.getsize(path) if os.path.exists(path) else 0
    want = max(0, cur + free - leave)
    with open(path, "ab") as f:
        if want < cur:
            f.truncate(want)
            cur = want
        chunk = b"\0" * 65536
        while cur < want:
            n = min(len(chunk), want - cur)
            try:
                f.write(chunk[:n])
                f.flush()
            except OSError:
                break
            cur += n
    return statvfs_free(env.mount)


def full_case(env, c):
    name, mode = "spool-full", env.mode
    if not env.mount:
        c.skip(name, env.mount_why)
        return
    msgs = []
    filler = os.path.join(env.mount, "filler")
    try:
        if mode == "spool":
            # Below the 1M floor: small copies tempfail.
            free = fill(env, 512 * 1024)
            low = send_all(env.postfix.port,
                           [Msg(name + "-floor", mode, i) for i in range(N)])
            c.ok(all(400 <= (m.code or 0) < 500 for m in low), name,
                 "free space below spool_min_free (%d octets free): "
                 "originals tempfailed" % free, replies(low))
            # Above the floor, but a 2 MB copy does not fit: ENOSPC
            # while writing (or the floor check counting its size).
            free = fill(env, 1024 * 1024 + 256 * 1024)
            big = send(env.postfix.port,
                       Msg(name + "-big", mode, 0, size=2 * 1024 * 1024))
            c.ok(400 <= (big.code or 0) < 500, name,
                 "a copy larger than the free space (%d octets) "
                 "tempfails the original" % free, repr(big))
            try:
                h.wait_for(lambda: not env.milter.spool_files("tmp"),
                           bound(5), "tmp/ to be empty")
            except h.Timeout:
                pass
            tmp = env.milter.spool_files("tmp")
            c.ok(not tmp, name, "the failed write leaves nothing in tmp/",
                 "tmp/: %s" % tmp)
            # Still above the floor: a small one fits.
            small = send(env.postfix.port, Msg(name + "-small", mode, 0))
            c.ok(small.accepted, name, "a small copy that fits above the "
                 "floor is accepted", repr(small))
            msgs = low + [big, small]
        else:
            free = fill(env, 512 * 1024)
            env.relay.set_faults({"DOT": "554 5.6.0 content refused"})
            msgs = send_all(env.postfix.port,
                            [Msg(name, mode, i) for i in range(N)])
            c.ok(all(400 <= (m.code or 0) < 500 for m in msgs), name,
                 "5xx and the spool full (%d octets free): originals "
                 "tempfailed, not accepted without a held copy" % free,
                 replies(msgs))
        env.ensure_milter(c, name)
    finally:
        try:
            os.unlink(filler)
        except FileNotFoundError:
            pass
        env.heal()
    check_postfix_agrees(env, c, name, msgs)
    check_covered(env, c, name, msgs, "spool full")
    wait_drained(env, c, name, msgs)
    check_recovered(env, c, name)


# ------------------------------------------------------------------ #
# A policy key instead of the defaults                                 #
# ------------------------------------------------------------------ #


def restart_milter(env, policy):
    """The milter again with another policy, on the same spool (SIGKILL:
    libmilter takes seconds to stop on SIGTERM)."""
    env.milter.policy = dict(policy)
    env.milter.kill()
    env.milter.start()


def policy_case(env, c):
    """sync: on_data_error = reject refuses the original with a 5xx and
    accepts nothing; spool: on_data_error = tempfail keeps a copy
    refused with 5xx in queue/ for retry instead of hold/."""
    name, mode = "policy-key", env.mode
    if mode == "sync":
        policy = {"on_data_error": "reject"}
    else:
        policy = {"on_data_error": "tempfail"}
    restart_milter(env, policy)
    msgs = []
    try:
        env.relay.set_faults({"DOT": "554 5.6.0 content refused"})
        before = env.relay.stats()
        msgs = send_all(env.postfix.port,
                        [Msg(name, mode, i) for i in range(N)])
        if mode == "sync":
            c.ok(all(500 <= (m.code or 0) < 600 for m in msgs), name,
                 "on_data_error = reject: every original refused (5xx)",
                 replies(msgs))
        else:
            c.ok(all(m.accepted for m in msgs), name,
                 "spooled: every original accepted", replies(msgs))
            seen = wait_attempts(env, "dot-5xx", before, N)
            c.ok(seen, name, "the relay saw the workers' attempts",
                 "stats before %s, now %s" % (before, env.relay.stats()))
            hd = spool_copies(env.milter, "hold")
            q = spool_copies(env.milter, "queue")
            c.ok(all(m.mid in q and m.mid not in hd for m in msgs), name,
                 "on_data_error = tempfail: a 5xx copy stays in queue/ "
                 "for retry, not in hold/",
                 "in queue/: %s\nin hold/: %s"
                 % ([m.mid for m in msgs if m.mid in q],
                    [m.mid for m in msgs if m.mid in hd]))
        check_postfix_agrees(env, c, name, msgs)
        check_covered(env, c, name, msgs, "during the fault")
        env.heal()
        wait_drained(env, c, name, msgs)
    finally:
        env.heal()
        restart_milter(env, {})
    check_recovered(env, c, name)


# ------------------------------------------------------------------ #
# 200 sessions while the relay flaps                                   #
# ------------------------------------------------------------------ #


def flood_case(env, c):
    name, mode = "flood", env.mode
    env.heal()
    stop = threading.Event()
    flaps = [0]

    def flapper():
        # Down 0.3 s in every 0.8 s, from the start of the flood.
        while not stop.is_set():
            if stop.wait(0.3):
                break
            env.relay.stop()
            flaps[0] += 1
            stop.wait(0.3)
            env.relay.start()
            stop.wait(0.2)
    sessions = [[Msg(name, mode, i * PER_SESSION + j)
                 for j in range(PER_SESSION)] for i in range(FLOOD)]
    msgs = [m for s in sessions for m in s]
    # Every session is open (greeted, EHLO answered) before any sends
    # its first message, so that all of them are in Postfix at once.
    barrier = threading.Barrier(FLOOD)
    lock = threading.Lock()
    open_now, open_max = [0], [0]

    def connected(ok):
        with lock:
            if ok:
                open_now[0] += 1
                open_max[0] = max(open_max[0], open_now[0])
        try:
            barrier.wait(timeout=bound(90))
        except threading.BrokenBarrierError:
            pass

    def one(session):
        send_session(env.postfix.port, session, timeout=120,
                     connected=connected)
    ft = threading.Thread(target=flapper)
    ft.start()
    t0 = time.monotonic()
    threads = [threading.Thread(target=one, args=(s,)) for s in sessions]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        stop.set()
        ft.join()
        env.heal()
    took = time.monotonic() - t0
    acc = sum(m.accepted for m in msgs)
    codes = {}
    for m in msgs:
        codes[m.code] = codes.get(m.code, 0) + 1
    c.note("%s: %d sessions (%d open at once), %d messages in %.1f s, "
           "%d relay flaps, replies %s" % (name, FLOOD, open_max[0],
                                           len(msgs), took, flaps[0], codes))
    env.ensure_milter(c, name)
    c.ok(open_max[0] == FLOOD, name, "%d SMTP sessions open in Postfix "
         "at the same time" % FLOOD, "at most %d were" % open_max[0])
    c.ok(flaps[0] >= 2, name, "the relay went down during the flood",
         "%d flaps in %.1f s" % (flaps[0], took))
    c.ok(all(m.accepted or 400 <= (m.code or 0) < 500 for m in msgs), name,
         "every session got 250 or 4xx, none a 5xx or a dropped "
         "connection", replies([m for m in msgs if not m.accepted
                                and not 400 <= (m.code or 0) < 500]))
    if mode == "spool":
        c.ok(acc == len(msgs), name, "spool: all %d originals accepted "
             "while the relay flaps (the spool does not need it)"
             % len(msgs),
             "accepted %d; replies %s" % (acc, codes))
    else:
        c.ok(acc > 0, name, "sync: some originals accepted between flaps",
             "replies %s" % codes)
    check_postfix_agrees(env, c, name, msgs)
    check_covered(env, c, name, msgs, "after the flapping")
    wait_drained(env, c, name, msgs)
    check_recovered(env, c, name)


# ------------------------------------------------------------------ #


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=("sync", "spool"), required=True)
    ap.add_argument("--milter", default=os.environ.get("ARCHIVE_MILTER"))
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--only", help="comma-separated case names")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("1..0 # SKIP needs root (Postfix's master)")
        return 77
    if not args.milter or not os.access(args.milter, os.X_OK):
        print("Bail out! no archive-milter ($ARCHIVE_MILTER)")
        return 99
    h.install_signal_handlers()
    only = set(args.only.split(",")) if args.only else None
    c = Checks(args.mode)
    env = Env(args, args.mode)
    t0 = time.monotonic()
    try:
        env.start()
        c.note("mode %s, spool %s%s" % (
            args.mode, env.milter.spool_dir,
            "" if env.mount else " (%s)" % env.mount_why))
        cases = [(n, (lambda n=n, f=f, t=t, p=p:
                      relay_case(env, c, n, f, t, p)))
                 for n, f, t, p in RELAY_CASES]
        cases += [("milter-sigkill", lambda: sigkill_case(env, c)),
                  ("duplicate-after-crash",
                   lambda: duplicate_case(env, c)),
                  ("spool-unwritable", lambda: unwritable_case(env, c)),
                  ("spool-full", lambda: full_case(env, c)),
                  ("policy-key", lambda: policy_case(env, c)),
                  ("flood", lambda: flood_case(env, c))]
        for cname, fn in cases:
            if only and cname not in only:
                continue
            ts = time.monotonic()
            try:
                fn()
            except Exception:
                c.ok(False, cname, "case ran to its end",
                     traceback.format_exc())
                try:
                    env.heal()
                    if not env.milter.running():
                        env.milter.start()
                except Exception:
                    c.note(traceback.format_exc())
            c.note("case %s took %.1f s" % (cname, time.monotonic() - ts))
    except Exception:
        print("Bail out! harness error:\n" + "\n".join(
            "# " + line for line in traceback.format_exc().splitlines()))
        env.stop()
        return 99
    env.stop()
    print("1..%d" % c.n)
    c.note("%s: %d checks, %d failed, %.0f s" % (args.mode, c.n,
                                                 len(c.failed),
                                                 time.monotonic() - t0))
    for f in c.failed:
        c.note("FAILED: " + f)
    return 1 if c.failed else 0


if __name__ == "__main__":
    sys.exit(main())
