#!/usr/bin/python3
"""bench/milter/run.py - what archive-milter costs Postfix (issue 4)

    python3 bench/milter/run.py --smtp-send EXE --null-milter EXE
                                [--archive-milter EXE] [--rounds N]
                                [--messages N] [--sessions N]
                                [--size OCTETS] [--warmup N]
                                [--workers N] [--only NAME,...]
                                [--profile] [--keep DIR]

Pushes the same messages (2,000 of 4 KB by default) over 20 concurrent
SMTP sessions through a private Postfix on 127.0.0.1, in the same run,
for each configuration:

  postfix      Postfix alone, relaying to smtp-sink
  always_bcc   Postfix with always_bcc to an archive smtp-sink
  null-milter  Postfix with bench/milter/null-milter.c, a milter that
               asks for every event and changes nothing: the milter
               protocol's own cost
  sync         Postfix with archive-milter, rule delivery = sync
  spool        Postfix with archive-milter, rule delivery = spool

Every configuration has its own Postfix instance, smtp-sinks and milter,
all started before the first round and kept for the whole run, so that
the milter's memory can be followed from start to end.  The rounds (3
by default, after a short warm-up of each configuration) run the
configurations one at a time, in an order that rotates from round to
round, so that a busy neighbour on the machine or a warm cache does not
favour one of them.

The load: SESSIONS processes of the project's smtp-send (C), each sending
its share of the messages over one connection; their CPU time is
printed so that one can see they are not the bottleneck.  For each
round and configuration:

  accepted   messages Postfix accepted / time from the first connection
             to the last client's exit (client side)
  delivered  messages / time from the first connection until every copy
             reached its smtp-sink (main relay, and archive relay where
             there is one) and Postfix's queue (and the milter's spool)
             is empty

Rates are the median over the rounds with their spread (min-max);
ratios to Postfix alone and to the null milter are the median of the
ratios within each round (both measured minutes apart at most).  The
milter's RSS is read from /proc at start, after each round and every
quarter second during the rounds; its CPU time per message too.  The
archive relay's smtp-sink counts the sessions that ended, and
/proc/net/tcp the ones still open (a milter's pooled connections): the
connections per copy.

Targets, printed with PASS or MISS: spool >= 0.95 x null-milter and
faster than always_bcc; sync >= 0.8 x null-milter (accepted and
delivered rates); the milter's RSS flat (end within 10% + 2 MiB of its
value after the first round).  A configuration that cannot run (spool
mode not built yet) is reported as "not available" and its targets as
MISS.

--spool-parent /dev/shm puts the spool on tmpfs: the difference to a
normal run is what the disk (fsync, inode allocation) costs spool mode.

--profile adds, after the timed rounds, one round per milter under
`perf record` and `perf stat` (syscalls: fsync, fdatasync, connect,
rename, ...), and prints the hottest symbols and the syscalls per
message.  It needs the linux-perf package; those rounds are not timed.

Exit status: 0 when every target is met, 1 on a MISS or a failure, 77
(skip) when not root, or Postfix or smtp-sink is missing.  Everything
started is stopped by its pid at the end, whatever happened (the
e2e harness's registry).  Traffic stays on 127.0.0.1, on ports picked at
run time.
"""

import argparse
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "tests", "e2e"))
import harness  # noqa: E402  (tests/e2e/harness.py)

LOOPBACK = harness.LOOPBACK
SENDER = "bench@origin.example"
RECIPIENT = "rcpt@dest.example"
ARCHIVE_TO = "journal@archive.example"
SKIP = 77

CONFIGS = ("postfix", "always_bcc", "null-milter", "sync", "spool")
ARCHIVED = ("always_bcc", "sync", "spool")  # an archive copy per message
MILTERS = ("null-milter", "sync", "spool")

# Targets: (configuration, reference, minimum ratio).  A ratio target
# with reference always_bcc means "faster than".
TARGETS = (
    ("spool", "null-milter", 0.95),
    ("spool", "always_bcc", 1.0),
    ("sync", "null-milter", 0.80),
)
RSS_GROWTH = 0.10  # fraction allowed from after round 1 to the end
RSS_SLACK_KB = 2048
DELIVERY_TIMEOUT = 300  # seconds after the last client exits
SEND_TIMEOUT = 600


def log(text=""):
    print(text, flush=True)


# ------------------------------------------------------------------ #
# Messages                                                             #
# ------------------------------------------------------------------ #


def message(i, size):
    """Message number I: a plain header block and 76-column lines, SIZE
    octets with CRLF line ends."""
    head = ("From: Bench <%s>\r\nTo: <%s>\r\nSubject: bench message %d\r\n"
            "Date: Fri, 04 Dec 2026 18:00:00 +0000\r\n"
            "Message-ID: <bench-%d@origin.example>\r\n\r\n"
            % (SENDER, RECIPIENT, i, i)).encode()
    line = (("%05d " % i) + "abcdefghijklmnopqrstuvwxyz0123456789" * 2
            )[:76].encode() + b"\r\n"
    body = bytearray(head)
    while len(body) + len(line) <= size - 3:
        body += line
    body += b"x" * max(0, size - len(body) - 2) + b"\r\n"
    return bytes(body[:size])


def write_messages(directory, count, size):
    os.makedirs(directory, exist_ok=True)
    paths = []
    for i in range(count):
        path = os.path.join(directory, "m%05d.eml" % i)
        with open(path, "wb") as f:
            f.write(message(i, size))
        paths.append(path)
    return paths


# ------------------------------------------------------------------ #
# /proc readings                                                       #
# ------------------------------------------------------------------ #


def rss_kb(pid):
    """VmRSS of PID in KiB; None when it is gone."""
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def cpu_s(pid):
    """User plus system CPU seconds of PID, all threads."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_times():
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]
    return sum(v) - idle, sum(v)


def fs_of(path):
    """"ext4 on /dev/vda (rw,relatime)": where PATH's writes go."""
    r = subprocess.run(["findmnt", "-n", "-o", "FSTYPE,SOURCE,OPTIONS",
                        "-T", path], capture_output=True, text=True)
    w = r.stdout.split()
    if r.returncode != 0 or len(w) < 3:
        return "an unknown file system"
    return "%s on %s (%s)" % (w[0], w[1], w[2])


def children_cpu_s():
    u = resource.getrusage(resource.RUSAGE_CHILDREN)
    return u.ru_utime + u.ru_stime


class RssSampler:
    """Peak RSS of some pids, sampled by a thread every quarter second
    while it runs (with-block)."""

    def __init__(self, pids):
        self.pids = [p for p in pids if p]
        self.peak = {p: 0 for p in self.pids}
        self.stop = threading.Event()
        self.thread = None

    def _run(self):
        while True:
            for p in self.pids:
                v = rss_kb(p)
                if v is not None and v > self.peak[p]:
                    self.peak[p] = v
            if self.stop.wait(0.25):
                return

    def __enter__(self):
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        return False


# ------------------------------------------------------------------ #
# The parts: smtp-sink, null milter, archive-milter                    #
# ------------------------------------------------------------------ #


class Sink:
    """Postfix's smtp-sink on a free port; -c writes running counters
    (sessions ended, QUITs, messages) to its output, which is read back
    from the log file."""

    RX = re.compile(rb"sess=(\d+) quit=(\d+) mesg=(\d+)")

    def __init__(self, name, workdir):
        self.name = name
        self.port = harness.free_port()
        self.log_path = os.path.join(workdir, name + ".log")
        exe = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
        argv = [exe, "-c", "-u", "postfix",
                "%s:%d" % (LOOPBACK, self.port), "256"]
        self.proc = harness.Proc(name, argv, self.log_path, grace=5)
        harness.wait_for(lambda: harness.port_open(self.port), 20,
                         "%s to listen" % name)

    def counts(self):
        """(sessions, messages) so far."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 256))
                tail = f.read()
        except OSError:
            return 0, 0
        found = self.RX.findall(tail)
        if not found:
            return 0, 0
        sess, _, mesg = found[-1]
        return int(sess), int(mesg)

    def open_sessions(self):
        """Connections to the sink that are open now (server side, from
        /proc/net/tcp): smtp-sink counts a session only when it ends."""
        n = 0
        try:
            with open("/proc/net/tcp") as f:
                next(f)
                for line in f:
                    local, state = line.split()[1], line.split()[3]
                    if (int(local.split(":")[1], 16) == self.port
                            and state == "01"):  # TCP_ESTABLISHED
                        n += 1
        except (OSError, ValueError, IndexError):
            pass
        return n

    def stop(self):
        self.proc.stop()


class NullMilter:
    def __init__(self, exe, workdir):
        self.port = harness.free_port()
        self.proc = harness.Proc("null-milter",
                                 [exe, "inet:%d@%s" % (self.port, LOOPBACK)],
                                 os.path.join(workdir, "null-milter.log"),
                                 grace=15)
        self.proc.wait_output(r"ready", 20)
        harness.wait_for(lambda: harness.port_open(self.port), 20,
                         "null-milter to listen")
        self.pid = self.proc.pid

    def stop(self):
        """Stop it; its event counts, as a dict, when it printed them."""
        self.proc.stop()
        m = re.search(r"null-milter: events (.*)", self.proc.output())
        if not m:
            return {}
        return {k: int(v) for k, v in
                (kv.split("=") for kv in m.group(1).split())}


class ArchiveMilter(harness.Milter):
    """archive-milter with a bench configuration: one journal rule to the
    archive smtp-sink, delivery = sync or spool, the policy defaults."""

    def __init__(self, exe, workdir, archive_port, delivery, workers=None,
                 spool_dir=None):
        super().__init__(exe, workdir, archive_port, ARCHIVE_TO,
                         on_failure=None, relay_timeout=30,
                         delivery=delivery, workers=workers,
                         spool_dir=spool_dir)
        self.pid = None

    def check(self):
        """(ok, text) of archive-milter --check on the configuration."""
        self.write_config()
        r = subprocess.run([self.exe, "-c", self.conf_path, "--check"],
                           capture_output=True, text=True, timeout=30)
        return r.returncode == 0, (r.stdout + r.stderr).strip()

    def start(self, timeout=30):
        super().start(timeout)
        self.pid = self.proc.pid
        return self


# ------------------------------------------------------------------ #
# One configuration: Postfix, its sinks, its milter                    #
# ------------------------------------------------------------------ #


class Setup:
    def __init__(self, name, workdir):
        self.name = name
        self.workdir = os.path.join(workdir, name)
        os.makedirs(self.workdir, exist_ok=True)
        os.chmod(self.workdir, 0o755)
        self.main = self.archive = self.milter = self.postfix = None
        self.unavailable = None  # why it cannot run, or None
        self.spool_mtime = None  # of SPOOL/queue at start
        self.note = None
        self.rss = []            # (label, KiB)
        self.events = {}         # null-milter's counts, after stop
        self.sent_total = 0      # messages accepted, every round
        self.sessions_total = 0  # SMTP sessions of the clients

    @property
    def milter_pid(self):
        return self.milter.pid if self.milter is not None else None

    def start(self, args):
        """Start everything this configuration needs; set
        self.unavailable instead of raising when the milter lacks it."""
        self.main = Sink(self.name + "-main-sink", self.workdir)
        extra, transports, milter_port = {}, {}, None
        if self.name in ARCHIVED:
            self.archive = Sink(self.name + "-archive-sink", self.workdir)
        if self.name == "always_bcc":
            extra["always_bcc"] = ARCHIVE_TO
            transports[ARCHIVE_TO.split("@")[1]] = self.archive.port
        elif self.name == "null-milter":
            self.milter = NullMilter(args.null_milter, self.workdir)
            milter_port = self.milter.port
        elif self.name in ("sync", "spool"):
            if not self._start_archive_milter(args):
                return
            milter_port = self.milter.port
        self.postfix = harness.Postfix(os.path.join(self.workdir, "postfix"),
                                       self.main.port, milter_port,
                                       transports=transports, extra=extra)
        self.postfix.start()
        if self.milter_pid:
            self.rss.append(("start", rss_kb(self.milter_pid)))

    def _start_archive_milter(self, args):
        if not args.archive_milter:
            self.unavailable = "archive-milter not built"
            return False
        spool_dir = None
        if args.spool_parent:
            spool_dir = tempfile.mkdtemp(prefix="bench-spool-",
                                         dir=args.spool_parent)
            harness.REGISTRY.add("spool dir", lambda: shutil.rmtree(
                spool_dir, ignore_errors=True))
        m = ArchiveMilter(args.archive_milter,
                          os.path.join(self.workdir, "milter"),
                          self.archive.port, self.name, args.workers,
                          spool_dir)
        ok, text = m.check()
        if not ok and self.name == "sync":
            # Before issue 4 there was no delivery key: sync was the
            # only mode, and no spool.
            m.delivery = m.spool_dir = None
            ok, text2 = m.check()
            if ok:
                self.note = ("archive-milter does not know the delivery "
                             "key; its only mode (sync) was used")
            else:
                text = text2
        if not ok:
            self.unavailable = ("archive-milter --check refuses the "
                                "configuration: %s"
                                % (text.splitlines() or ["?"])[0])
            return False
        m.start()
        self.milter = m
        if self.name == "spool":
            try:
                self.spool_mtime = os.stat(os.path.join(
                    m.spool_dir, "queue")).st_mtime_ns
            except OSError:
                self.unavailable = ("archive-milter accepted delivery = "
                                    "spool but opened no spool (no "
                                    "%s/queue)" % m.spool_dir)
                return False
        return True

    def check_spooled(self):
        """After the warm-up: did copies pass through SPOOL/queue?  Its
        mtime changes with every rename into it and every removal; a
        milter that takes delivery = spool but sends at end of message
        leaves it alone."""
        if self.name != "spool" or self.unavailable:
            return
        now = os.stat(os.path.join(self.milter.spool_dir,
                                   "queue")).st_mtime_ns
        if now == self.spool_mtime:
            self.unavailable = ("archive-milter takes delivery = spool, "
                                "but no copy of the warm-up went through "
                                "%s/queue: it sent them at end of message"
                                % self.milter.spool_dir)

    def queue_files(self):
        """Files in Postfix's queue, and in the milter's spool queue."""
        n = 0
        for sub in ("maildrop", "incoming", "active", "deferred", "hold"):
            for _, _, files in os.walk(os.path.join(self.postfix.queue,
                                                    sub)):
                n += len(files)
        if self.name == "spool":
            for _, _, files in os.walk(os.path.join(self.milter.spool_dir,
                                                    "queue")):
                n += len(files)
        return n

    def deferred(self):
        n = 0
        for _, _, files in os.walk(os.path.join(self.postfix.queue,
                                                "deferred")):
            n += len(files)
        return n

    def counts(self):
        """(main messages, archive messages, archive sessions begun: the
        ended ones plus the ones open now)."""
        _, main = self.main.counts()
        asess, amesg = self.archive.counts() if self.archive else (0, 0)
        if self.archive:
            asess += self.archive.open_sessions()
        return main, amesg, asess

    def stop(self):
        for part in (self.postfix, self.milter, self.archive, self.main):
            if part is None:
                continue
            try:
                if part is self.milter and isinstance(part, NullMilter):
                    self.events = part.stop()
                else:
                    part.stop()
            except Exception as e:  # keep stopping the others
                log("bench: stopping %s: %s" % (self.name, e))


# ------------------------------------------------------------------ #
# One round of one configuration                                       #
# ------------------------------------------------------------------ #


def push(name, port, files, sessions, smtp_send, outdir):
    """Send FILES over SESSIONS smtp-send processes at once; (seconds
    until the last exits, messages accepted, first failure or None,
    client CPU seconds)."""
    chunks = [files[i::sessions] for i in range(sessions)]
    argv = [smtp_send, "--server", "%s:%d" % (LOOPBACK, port),
            "--from", SENDER, "--to", RECIPIENT, "--json", "--timeout",
            "60"]
    outs = [os.path.join(outdir, "client-%02d.out" % i)
            for i in range(sessions)]
    cpu0 = children_cpu_s()
    t0 = time.monotonic()
    procs = []
    for chunk, out in zip(chunks, outs):
        with open(out, "wb") as f:
            procs.append(subprocess.Popen(argv + chunk,
                                          stdin=subprocess.DEVNULL,
                                          stdout=f,
                                          stderr=subprocess.STDOUT))
    for p in procs:
        try:
            p.wait(timeout=max(1, SEND_TIMEOUT - (time.monotonic() - t0)))
        except subprocess.TimeoutExpired:
            for q in procs:
                if q.poll() is None:
                    q.kill()
                    q.wait()
            raise RuntimeError("%s: clients still sending after %d s"
                               % (name, SEND_TIMEOUT))
    elapsed = time.monotonic() - t0
    cpu = children_cpu_s() - cpu0
    sent, failure = 0, None
    for out in outs:
        with open(out, "rb") as f:
            text = f.read().decode("utf-8", "replace")
        sent += text.count('"status": "sent"')
        if failure is None and '"status": "error"' in text:
            failure = next(line for line in text.splitlines()
                           if '"status": "error"' in line)[:300]
    return t0, elapsed, sent, failure, cpu


def wait_delivered(setup, t0, before, accepted):
    """Seconds from t0 until every copy of ACCEPTED messages reached its
    sink and the queues are empty."""
    main0, arch0, _ = before
    want_arch = accepted if setup.name in ARCHIVED else 0
    deadline = time.monotonic() + DELIVERY_TIMEOUT
    while True:
        main, arch, _ = setup.counts()
        if (main - main0 >= accepted and arch - arch0 >= want_arch
                and setup.queue_files() == 0):
            return time.monotonic() - t0
        if time.monotonic() > deadline:
            raise RuntimeError(
                "%s: not delivered after %d s: main sink %d of %d, archive "
                "sink %d of %d, %d queue files (%d deferred)"
                % (setup.name, DELIVERY_TIMEOUT, main - main0, accepted,
                   arch - arch0, want_arch, setup.queue_files(),
                   setup.deferred()))
        time.sleep(0.02)


def ceiling(sink, files, args, outdir):
    """The load generator alone, straight into an smtp-sink: (msg/s,
    client CPU us/msg).  What Postfix's rates are to be compared with:
    far above them, the clients are not what limits a round."""
    _, acc_s, sent, failure, ccpu = push("generator", sink.port, files,
                                         args.sessions, args.smtp_send,
                                         outdir)
    if failure:
        raise RuntimeError("generator into smtp-sink: %s" % failure)
    return sent / acc_s, ccpu * 1e6 / max(1, sent)


def run_round(setup, files, args, outdir):
    """One measured push through SETUP; a dict of what was seen."""
    before = setup.counts()
    pid = setup.milter_pid
    mcpu0 = cpu_s(pid) if pid else 0.0
    busy0, total0 = machine_times()
    with RssSampler([pid]) as sampler:
        t0, acc_s, sent, failure, ccpu = push(setup.name,
                                              setup.postfix.port, files,
                                              args.sessions, args.smtp_send,
                                              outdir)
        del_s = wait_delivered(setup, t0, before, sent)
    busy1, total1 = machine_times()
    after = setup.counts()
    setup.sent_total += sent
    setup.sessions_total += min(len(files), args.sessions)
    r = {
        "sent": sent,
        "failure": failure,
        "accepted": sent / acc_s,
        "delivered": sent / del_s,
        "client_cpu_us": ccpu * 1e6 / max(1, len(files)),
        "busy": (busy1 - busy0) / max(1, total1 - total0),
        "milter_cpu_us": ((cpu_s(pid) - mcpu0) * 1e6 / max(1, sent)
                          if pid else None),
        "rss_peak": sampler.peak.get(pid) if pid else None,
        "rss_end": rss_kb(pid) if pid else None,
        "archive_sessions": after[2] - before[2],
        "archive_copies": after[1] - before[1],
    }
    return r


# ------------------------------------------------------------------ #
# Profiling (--profile): perf record and perf stat on the milter       #
# ------------------------------------------------------------------ #

PERF_SYSCALLS = ("fsync", "fdatasync", "sync_file_range", "syncfs",
                 "rename", "renameat", "renameat2", "openat", "unlink",
                 "unlinkat", "socket", "connect", "close", "clone",
                 "clone3", "poll", "ppoll", "epoll_wait", "write",
                 "writev", "sendto", "sendmsg", "read", "recvfrom",
                 "recvmsg", "futex", "getrandom", "statfs", "fstatfs")
# Besides the syscalls: all of them, and the scheduler's view.
PERF_OTHER = ("raw_syscalls:sys_enter", "context-switches", "task-clock")


def perf_events():
    """The syscall tracepoints perf knows on this kernel."""
    r = subprocess.run(["perf", "list", "syscalls:sys_enter_*"],
                       capture_output=True, text=True, timeout=60)
    known = set(re.findall(r"syscalls:sys_enter_(\w+)", r.stdout))
    return list(PERF_OTHER) + ["syscalls:sys_enter_%s" % s
                               for s in PERF_SYSCALLS if s in known]


def stop_perf(proc):
    """perf writes its data on SIGINT."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def under_tools(setup, files, args, outdir, *argvs):
    """One round with each ARGV + ["-p", PID] (perf, strace) attached to
    the milter at the same time."""
    tools = [subprocess.Popen(argv + ["-p", str(setup.milter_pid)],
                              stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL) for argv in argvs]

    def stopper():
        for p in tools:
            stop_perf(p)
    harness.REGISTRY.add("perf", stopper)
    time.sleep(1)  # attached to every thread before we start
    try:
        r = run_round(setup, files, args, outdir)
    finally:
        stopper()
        harness.REGISTRY.remove(stopper)
    log("profile: %s: %d messages under %s (%.1f accepted msg/s, not a "
        "timed round)" % (setup.name, r["sent"],
                          " and ".join(" ".join(a[:2]) for a in argvs),
                          r["accepted"]))
    return r


# Syscalls that wait on the disk or the network: strace times them,
# following the threads that libmilter and the runner start (perf trace
# -p sees only the threads that exist when it attaches).
TIMED = ("fsync", "fdatasync", "sync_file_range", "connect", "rename",
         "renameat2", "openat", "unlink", "statfs")


def strace_summary(path):
    """{syscall: (calls, seconds)} from `strace -c -w` output."""
    out = {}
    try:
        with open(path) as f:
            for line in f:
                w = line.split()
                if len(w) >= 5 and w[-1] in TIMED:
                    try:
                        out[w[-1]] = (int(w[3]), float(w[1]))
                    except ValueError:
                        continue
    except OSError:
        pass
    return out


def profile(setup, files, args, outdir):
    """Three more rounds: perf stat counts the milter's syscalls (fsync,
    connect, ...); strace times the ones that wait; perf record samples
    where its CPU goes.  Apart, since each disturbs what the others
    measure."""
    data = os.path.join(outdir, "perf-%s.data" % setup.name)
    stat_out = os.path.join(outdir, "perf-%s.stat" % setup.name)

    # Syscalls per message.
    events = perf_events()
    if events:
        r = under_tools(setup, files, args, outdir,
                        ["perf", "stat", "-x", ",", "-e", ",".join(events),
                         "-o", stat_out])
        with open(stat_out) as f:
            for line in f:
                parts = line.strip().split(",")
                if len(parts) < 3 or not parts[2]:
                    continue
                try:
                    n = float(parts[0])
                except ValueError:
                    continue
                if n == 0:
                    continue
                name = parts[2].split("sys_enter_")[-1]
                if name == "raw_syscalls:sys_enter":
                    name = "(all syscalls)"
                if name == "task-clock":
                    name = "task-clock (ms)"
                log("profile: %s: %-16s %10.0f  %8.2f per message"
                    % (setup.name, name, n, n / max(1, r["sent"])))

    # How long the calls that wait on the disk took: strace stops the
    # milter at each traced call, so a round of its own.
    if shutil.which("strace"):
        trace_out = os.path.join(outdir, "strace-%s.txt" % setup.name)
        r = under_tools(setup, files, args, outdir,
                        ["strace", "-f", "-c", "-w", "-e",
                         "trace=" + ",".join(TIMED), "-o", trace_out])
        for name, (calls, secs) in sorted(strace_summary(
                trace_out).items()):
            log("profile: %s: %-16s %8d calls, %8.3f ms each, %6.3f ms "
                "per message (wall time in the call, strace -w)"
                % (setup.name, name, calls, secs * 1e3 / max(1, calls),
                   secs * 1e3 / max(1, r["sent"])))
        log("profile: %s: archive relay sessions %d for %d copies"
            % (setup.name, r["archive_sessions"], r["archive_copies"]))

    # The hottest symbols, self time, and the split per library.
    r = under_tools(setup, files, args, outdir,
                    ["perf", "record", "-q", "-F", "1999", "-g", "-o", data])
    log("profile: %s: milter CPU %.0f us/msg under perf record"
        % (setup.name, r["milter_cpu_us"]))
    # Self time per library, per symbol; then time including callees
    # (children), which names the call that leads into the kernel.
    for how, sort, limit in (("self", "dso", 1.0),
                             ("self", "dso,symbol", 0.7),
                             ("with callees", "symbol", 4.0)):
        rep = subprocess.run(["perf", "report", "-i", data, "--stdio",
                              "--children" if how != "self"
                              else "--no-children", "--sort", sort,
                              "--percent-limit", str(limit), "-g", "none"],
                             capture_output=True, text=True, timeout=300)
        lines = [ln for ln in rep.stdout.splitlines()
                 if ln.strip() and not ln.startswith("#")]
        log("profile: %s: CPU share, %s, by %s:" % (setup.name, how, sort))
        for ln in lines[:30]:
            log("profile: %s: %s" % (setup.name,
                                     re.sub(r"[\s-]+$", "", ln)))
    log("profile: %s: perf data kept in %s (perf report -i FILE)"
        % (setup.name, data))


# ------------------------------------------------------------------ #
# Reporting                                                            #
# ------------------------------------------------------------------ #


def spread(values, fmt="%.1f"):
    return (fmt + " (" + fmt + "-" + fmt + ")") % (
        statistics.median(values), min(values), max(values))


def ratio_rows(results, rounds, name, ref, key):
    """Per-round ratios NAME/REF of KEY; [] if either is missing."""
    out = []
    for r in range(rounds):
        a = results.get((name, r))
        b = results.get((ref, r))
        if a and b:
            out.append(a[key] / b[key])
    return out


def report(setups, results, rounds, args):
    ok = True
    avail = [s for s in setups if not s.unavailable]
    log()
    log("== rates: msg/s, median of %d rounds (min-max) ==" % rounds)
    log("%-12s %-24s %-24s" % ("config", "accepted", "delivered"))
    for s in setups:
        if s.unavailable:
            log("%-12s %s mode: not available (%s)"
                % (s.name, s.name, s.unavailable))
            continue
        rows = [results[(s.name, r)] for r in range(rounds)]
        log("%-12s %-24s %-24s" % (s.name,
                                   spread([x["accepted"] for x in rows]),
                                   spread([x["delivered"] for x in rows])))

    log()
    log("== ratios: median of the per-round ratios (min-max) ==")
    for ref in ("postfix", "null-milter"):
        if ref not in [s.name for s in avail]:
            continue
        for s in avail:
            if s.name == ref:
                continue
            acc = ratio_rows(results, rounds, s.name, ref, "accepted")
            dl = ratio_rows(results, rounds, s.name, ref, "delivered")
            log("%-12s / %-12s accepted %s   delivered %s"
                % (s.name, ref, spread(acc, "%.2f"), spread(dl, "%.2f")))

    log()
    log("== milters: RSS in KiB, CPU per message, archive connections ==")
    for s in avail:
        if not s.milter_pid:
            continue
        rows = [results[(s.name, r)] for r in range(rounds)]
        rss = dict(s.rss)
        mid = rows[(rounds - 1) // 2]["rss_end"]
        peak = max(x["rss_peak"] or 0 for x in rows)
        log("%-12s RSS start %s, after round 1 %s, middle %s, end %s, "
            "peak %s" % (s.name, rss.get("start"), rows[0]["rss_end"],
                         mid, rows[-1]["rss_end"], peak))
        log("%-12s RSS after each round: %s KiB" % (
            s.name, " ".join(str(x["rss_end"]) for x in rows)))
        log("%-12s CPU %s us/msg" % (
            s.name, spread([x["milter_cpu_us"] for x in rows], "%.0f")))
        if s.name in ("sync", "spool"):
            copies = sum(x["archive_copies"] for x in rows)
            sess = sum(x["archive_sessions"] for x in rows)
            log("%-12s archive relay: %d sessions opened for %d copies "
                "(%.3f per copy)" % (s.name, sess, copies,
                                     sess / max(1, copies)))
    log()
    log("== load generator: %d smtp-send processes; client CPU us/msg "
        "(median) and machine busy %% during the rounds ==" % args.sessions)
    for s in avail:
        rows = [results[(s.name, r)] for r in range(rounds)]
        log("%-12s client %5.0f us/msg   machine busy %s %%"
            % (s.name, statistics.median(x["client_cpu_us"] for x in rows),
               spread([100 * x["busy"] for x in rows], "%.0f")))

    log()
    log("== targets (per-round ratios, median) ==")
    names = {s.name: s for s in setups}
    for name, ref, minimum in TARGETS:
        if name not in names or ref not in names:
            log("%s vs %s: not run (--only)" % (name, ref))
            ok = False
            continue
        for key in ("accepted", "delivered"):
            what = ("%s %s >= %.2f x %s" % (name, key, minimum, ref)
                    if ref != "always_bcc" else
                    "%s %s > %s" % (name, key, ref))
            if names[name].unavailable or names[ref].unavailable:
                gone = name if names[name].unavailable else ref
                log("%-44s  n/a   MISS (%s mode: not available)"
                    % (what, gone))
                ok = False
                continue
            rr = ratio_rows(results, rounds, name, ref, key)
            v = statistics.median(rr)
            good = v >= minimum if ref != "always_bcc" else v > 1.0
            ok = ok and good
            log("%-44s  %.2f  %s  (rounds %s)"
                % (what, v, "PASS" if good else "MISS",
                   " ".join("%.2f" % x for x in rr)))
    for s in avail:
        if s.name not in ("sync", "spool"):
            continue
        rows = [results[(s.name, r)] for r in range(rounds)]
        first, end = rows[0]["rss_end"], rows[-1]["rss_end"]
        limit = first * (1 + RSS_GROWTH) + RSS_SLACK_KB
        good = end is not None and first is not None and end <= limit
        ok = ok and good
        log("%-44s  %s  (after round 1 %d KiB, end %d KiB, limit %d)"
            % ("%s milter RSS flat" % s.name, "PASS" if good else "MISS",
               first or 0, end or 0, limit))
    return ok


# ------------------------------------------------------------------ #
# Main                                                                 #
# ------------------------------------------------------------------ #


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smtp-send", required=True,
                    help="the load generator (build/smtpclient/smtp-send)")
    ap.add_argument("--null-milter", required=True,
                    help="the do-nothing milter (build/bench/null-milter)")
    ap.add_argument("--archive-milter",
                    help="build/plugin/archive-milter; without it the sync "
                    "and spool configurations are 'not available'")
    ap.add_argument("--rounds", type=int, default=3,
                    help="timed rounds after the warm-up (default 3)")
    ap.add_argument("--messages", type=int, default=2000,
                    help="messages per round and configuration")
    ap.add_argument("--sessions", type=int, default=20,
                    help="concurrent SMTP sessions (smtp-send processes)")
    ap.add_argument("--size", type=int, default=4096,
                    help="octets per message")
    ap.add_argument("--warmup", type=int, default=200,
                    help="messages per configuration before round 1")
    ap.add_argument("--workers", type=int, default=None,
                    help="[milter] workers for archive-milter (unset: "
                    "its default)")
    ap.add_argument("--spool-parent",
                    help="make the spool in a new directory under this "
                    "one (e.g. /dev/shm, to see what the disk costs); "
                    "default: the work directory")
    ap.add_argument("--only", default=",".join(CONFIGS),
                    help="configurations to run, comma-separated")
    ap.add_argument("--profile", action="store_true",
                    help="after the timed rounds, one untimed round per "
                    "milter under perf stat, strace -c and perf record "
                    "(needs linux-perf and strace)")
    ap.add_argument("--keep", help="work directory to keep")
    args = ap.parse_args()
    args.only = [c for c in args.only.split(",") if c]
    bad = [c for c in args.only if c not in CONFIGS]
    if bad:
        ap.error("unknown configuration(s): %s" % ", ".join(bad))
    if args.rounds < 1 or args.messages < 1 or args.sessions < 1:
        ap.error("rounds, messages and sessions must be positive")
    return args


def preflight():
    """Why this machine cannot run the bench, or None."""
    if os.geteuid() != 0:
        return "needs root (a private Postfix master)"
    for tool in ("postfix", "postconf", "smtp-sink"):
        if not (shutil.which(tool) or os.path.exists("/usr/sbin/" + tool)):
            return "%s not found (Debian package postfix)" % tool
    return None


def main():
    args = parse_args()
    why = preflight()
    if why:
        log("bench: skipped: %s" % why)
        return SKIP
    harness.install_signal_handlers()
    workdir = args.keep or tempfile.mkdtemp(prefix="bench-milter-")
    os.makedirs(workdir, exist_ok=True)
    os.chmod(workdir, 0o755)
    setups = [Setup(name, workdir) for name in args.only]
    results = {}
    ok = False
    try:
        # Step 1: messages, then every configuration, all kept running.
        files = write_messages(os.path.join(workdir, "msgs"),
                               args.messages, args.size)
        outdir = os.path.join(workdir, "out")
        os.makedirs(outdir, exist_ok=True)
        log("bench: %d messages of %d octets over %d sessions, %d rounds, "
            "%d CPUs; work directory (Postfix queues) %s, on %s"
            % (len(files), args.size, args.sessions, args.rounds,
               os.cpu_count(), workdir, fs_of(workdir)))
        for s in setups:
            s.start(args)
            if s.unavailable:
                log("bench: %s mode: not available (%s)"
                    % (s.name, s.unavailable))
            elif s.name == "spool":
                log("bench: spool: the spool %s is on %s"
                    % (s.milter.spool_dir, fs_of(s.milter.spool_dir)))
            if not s.unavailable:
                log("bench: %s: Postfix on %s:%d%s%s"
                    % (s.name, LOOPBACK, s.postfix.port,
                       ", milter pid %d" % s.milter_pid
                       if s.milter_pid else "",
                       "; note: " + s.note if s.note else ""))
        run = [s for s in setups if not s.unavailable]

        # Step 2: warm up each (processes forked, caches filled); the
        # spool configuration must show that it spools.
        for s in run:
            n = max(args.warmup, 20 if s.name == "spool" else 0)
            if n > 0:
                r = run_round(s, files[:n], args, outdir)
                if r["failure"]:
                    raise RuntimeError("%s: warm-up: %s"
                                       % (s.name, r["failure"]))
            s.check_spooled()
            if s.unavailable:
                log("bench: %s mode: not available (%s)"
                    % (s.name, s.unavailable))
        run = [s for s in run if not s.unavailable]

        # Step 3: the rounds, the order rotating from round to round,
        # each with the load generator's own ceiling.
        gen_sink = Sink("generator-sink", workdir)
        ceilings = []
        for rnd in range(args.rounds):
            rate, cpu = ceiling(gen_sink, files, args, outdir)
            ceilings.append((rate, cpu))
            log("round %d generator    %7.1f msg/s into smtp-sink, "
                "client CPU %.0f us/msg" % (rnd + 1, rate, cpu))
            k = rnd % max(1, len(run))
            for s in run[k:] + run[:k]:
                r = run_round(s, files, args, outdir)
                results[(s.name, rnd)] = r
                log("round %d %-12s accepted %7.1f msg/s  delivered %7.1f "
                    "msg/s  sent %d/%d  machine busy %3.0f%%%s%s"
                    % (rnd + 1, s.name, r["accepted"], r["delivered"],
                       r["sent"], len(files), 100 * r["busy"],
                       "  milter %4.0f us/msg RSS %d KiB"
                       % (r["milter_cpu_us"], r["rss_end"] or 0)
                       if s.milter_pid else "",
                       "  archive sessions %d" % r["archive_sessions"]
                       if s.name in ("sync", "spool") else ""))
                if r["failure"]:
                    raise RuntimeError("%s: %d of %d accepted; first "
                                       "failure: %s"
                                       % (s.name, r["sent"], len(files),
                                          r["failure"]))

        gen_sink.stop()
        ok = report(setups, results, args.rounds, args)
        log("load generator alone into smtp-sink: %s msg/s, client CPU "
            "%.0f us/msg" % (spread([c[0] for c in ceilings]),
                             statistics.median(c[1] for c in ceilings)))

        # Step 4: profiles, after the timed rounds.
        if args.profile:
            if not shutil.which("perf"):
                log("profile: perf not found (Debian package linux-perf)")
            else:
                log()
                for s in run:
                    if s.milter_pid:
                        profile(s, files, args, outdir)
    except (RuntimeError, OSError, ValueError, harness.Timeout,
            subprocess.SubprocessError) as e:
        log("bench: FAILED: %s" % e)
        return 1
    finally:
        for s in reversed(setups):
            s.stop()
        for s in setups:
            if s.milter is not None and isinstance(s.milter, NullMilter):
                ok = check_events(s) and ok
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0 if ok else 1


def check_events(setup):
    """The null milter saw each message at every stage: otherwise it
    was not the baseline it claims to be."""
    ev, n = setup.events, setup.sent_total
    log("bench: null-milter events: %s"
        % " ".join("%s=%d" % kv for kv in ev.items()))
    good = (bool(ev) and ev.get("eom") == n and ev.get("envfrom") == n
            and ev.get("envrcpt") == n and ev.get("eoh") == n
            and ev.get("connect", 0) >= setup.sessions_total
            and ev.get("helo", 0) >= setup.sessions_total
            and ev.get("body", 0) >= n and ev.get("header", 0) >= 5 * n)
    log("bench: null-milter saw every event of the %d messages: %s"
        % (n, "yes" if good else "NO"))
    return good


if __name__ == "__main__":
    sys.exit(main())
