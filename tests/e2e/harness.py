"""harness.py - a private Postfix, relays and archive-milter on loopback

The end-to-end tests and the demo build their world from this module:

  * Postfix: a private instance (own config directory, queue and data
    directory under a temporary directory, chroot off, log to a file),
    listening on 127.0.0.1 on a port picked at run time, relaying
    everything to the main relay (relayhost) and, optionally, one domain
    elsewhere (transport_maps); smtpd_milters points at the milter.
  * Relays: SinkRelay, an SMTP server in this process that stores each
    message byte-exact (the DATA payload un-dot-stuffed, as N.eml, and
    the envelope as N.json), or FakeSmtpdRelay, the project's
    `fake-smtpd --store DIR` in a process of its own.
  * Milter: `archive-milter -c FILE -f` with a generated configuration.

Every process is started through one Registry and stopped by its PID at
the end, pass or fail: World is a context manager, and atexit plus
SIGTERM/SIGINT/SIGHUP handlers cover the other ways out.  Waits poll a
condition with a deadline; there are no fixed sleeps.

Why not Postfix's own smtp-sink as the relay: its -d dump is lossy (lines
end in LF, a lone CR inside a line is dropped, an empty line is appended,
and generated X-Client-Addr/X-Rcpt-Args/Received lines precede the
message), so "byte-identical body" cannot be checked on it.

Only 127.0.0.1 is used.  Starting a private Postfix needs root.
"""

import atexit
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

LOOPBACK = "127.0.0.1"

# ------------------------------------------------------------------ #
# Waiting and ports                                                    #
# ------------------------------------------------------------------ #


class Timeout(Exception):
    pass


def wait_for(pred, timeout, what, interval=0.05):
    """Poll pred() until it returns a true value; return that value.
    Raise Timeout naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise Timeout("timed out after %.0f s waiting for %s"
                          % (timeout, what))
        time.sleep(interval)
        interval = min(interval * 1.5, 0.5)


# Sockets that keep the ports of free_port() reserved until this
# process ends.
_reserved_ports = []


def free_port():
    """A TCP port on 127.0.0.1 that nothing listens on, and that no
    other process can take until this one ends.

    A port let go at once could be taken by anything else on a busy
    machine (a connect() of a parallel test gets a free ephemeral port)
    before the server it is meant for binds it, and that server would
    fail to start.  So the port stays bound, with SO_REUSEADDR and never
    listening: the servers of these tests, which set SO_REUSEADDR too
    (Postfix's master, libmilter, fake-smtpd), can still bind and listen
    beside it, also when restarted, while no automatic choice of port
    (connect(), bind() to port 0) picks it."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((LOOPBACK, 0))
    _reserved_ports.append(s)
    return s.getsockname()[1]


# The copy's own header fields, which archive-milter puts first.
ENVELOPE_HEADERS = ("x-envelope-from", "x-envelope-to", "x-archive-id")


def split_copy(content):
    """(envelope fields, rest): the leading run of an archive copy's own
    X-Envelope-*/X-Archive-Id fields, and the bytes after it."""
    header, _ = split_message(content)
    env, pos = [], 0
    for f in header_fields(header):
        if field_name(f) not in ENVELOPE_HEADERS:
            break
        env.append(f)
        pos += len(f)
    return env, content[pos:]


def check_envelope(env_fields, sender, rcpts):
    """(problems, archive id) of a copy's envelope fields: one
    X-Envelope-From <sender> first, one X-Envelope-To per address of
    rcpts, exactly one X-Archive-Id.  problems is [] when fine."""
    problems = []
    names = [field_name(f) for f in env_fields]

    def values(name):
        return [field_value(f) for f in env_fields if field_name(f) == name]
    froms, tos = values("x-envelope-from"), values("x-envelope-to")
    ids = values("x-archive-id")
    if froms != ["<%s>" % sender]:
        problems.append("X-Envelope-From: %r, want [<%s>]" % (froms, sender))
    if sorted(tos) != sorted("<%s>" % r for r in rcpts):
        problems.append("X-Envelope-To: %r, want one for each of %r"
                        % (tos, rcpts))
    if len(ids) != 1 or not ids[0]:
        problems.append("X-Archive-Id: %r, want exactly one" % ids)
    if names and names[0] != "x-envelope-from":
        problems.append("envelope headers in order %r" % names)
    return problems, (ids[0] if len(ids) == 1 else None)


def first_difference(a, b, left="archive", right="main relay"):
    """A readable account of where two messages differ."""
    ha, ba = split_message(a)
    hb, bb = split_message(b)
    fa, fb = header_fields(ha), header_fields(hb or b"")
    for i in range(max(len(fa), len(fb))):
        x = fa[i] if i < len(fa) else None
        y = fb[i] if i < len(fb) else None
        if x != y:
            return "header field %d: %s %r != %s %r" % (i, left, x, right, y)
    if ba != bb:
        ba, bb = ba or b"", bb or b""
        i = next((k for k in range(min(len(ba), len(bb)))
                  if ba[k] != bb[k]), min(len(ba), len(bb)))
        return ("body differs at byte %d (lengths %d, %d): %s %r, %s %r"
                % (i, len(ba), len(bb), left, ba[i:i + 60], right,
                   bb[i:i + 60]))
    return "identical"


class Checks:
    """TAP output of the end-to-end tests: one "ok N - NAME" or "not ok
    N - NAME" line per check, a failed check followed by the last 40
    lines of its detail as comments (the first 40 with head=True: a
    diff shows its first difference first)."""

    def __init__(self, head=False):
        self.n = 0
        self.failed = 0
        self.head = head

    def ok(self, cond, name, detail=""):
        self.n += 1
        print("%s %d - %s" % ("ok" if cond else "not ok", self.n, name))
        if not cond:
            self.failed += 1
            lines = str(detail).splitlines()
            for line in lines[:40] if self.head else lines[-40:]:
                print("#   " + line)
        sys.stdout.flush()
        return cond

    def note(self, text):
        for line in str(text).splitlines():
            print("# " + line)
        sys.stdout.flush()


def port_open(port):
    try:
        with socket.create_connection((LOOPBACK, port), timeout=1):
            return True
    except OSError:
        return False


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours still answers kill(0): look at its state.
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def children_of(pid):
    """PIDs whose parent is `pid` (from /proc)."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % name) as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(name))
    return out


# ------------------------------------------------------------------ #
# Process registry                                                     #
# ------------------------------------------------------------------ #


class Registry:
    """Everything started, so that everything is stopped, by PID."""

    def __init__(self):
        self.stoppers = []      # (name, callable), stopped in reverse
        self.lock = threading.Lock()

    def add(self, name, stop):
        with self.lock:
            self.stoppers.append((name, stop))

    def remove(self, stop):
        with self.lock:
            self.stoppers = [(n, s) for n, s in self.stoppers if s != stop]

    def stop_all(self):
        with self.lock:
            todo = list(reversed(self.stoppers))
            self.stoppers = []
        for name, stop in todo:
            try:
                stop()
            except Exception as e:      # keep stopping the others
                print("# harness: stopping %s: %s" % (name, e),
                      file=sys.stderr)


REGISTRY = Registry()
atexit.register(REGISTRY.stop_all)


# ------------------------------------------------------------------ #
# Watchdog                                                             #
# ------------------------------------------------------------------ #
#
# The Registry, atexit and the signal handlers cover every way out but
# one: SIGKILL (meson's second step on a timeout, the OOM killer).  Then
# nothing of this process runs, and Postfix's master, which detaches
# itself into a session of its own, would keep running with its queue,
# ports and log.  So a second process, started once per test process,
# holds the read end of a pipe whose only write end is ours: when we
# die, however we die, the kernel closes it, the watchdog reads EOF and
# stops by pid everything we told it about, unmounts what we mounted and
# removes what we asked it to.  It is a fresh interpreter (fork + exec),
# not a bare fork of this threaded process, in a session of its own so
# that a signal to our process group does not take it with us, and its
# output goes to /dev/null so that meson does not wait for it.
#
# Its protocol, one line each on its standard input:
#   pid PID START   SIGTERM, then SIGKILL, PID if /proc still shows the
#                   same process (START: field 22 of /proc/PID/stat,
#                   so that a reused pid is left alone)
#   unpid PID       stopped by us already; forget it
#   postfix CONF QUEUE   stop that private Postfix (master pid from
#                   QUEUE/pid/master.pid, then its children)
#   unpostfix CONF  forget it
#   umount PATH     umount -l PATH
#   unumount PATH   forget it
#   rmtree PATH     remove PATH at the end
#   unrmtree PATH   forget it
#
# XXX: a watchdog killed itself (SIGKILL to its session, the OOM killer)
# cleans nothing up; and a process that a harness process forks without
# telling it (Postfix's own children are found through the master) is
# not known to it.


def _proc_start_time(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


class Watchdog:
    def __init__(self):
        self.popen = None
        self.lock = threading.Lock()

    def _ensure(self):
        if self.popen is not None and self.popen.poll() is None:
            return True
        try:
            self.popen = subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "--watchdog",
                 str(os.getpid())],
                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, start_new_session=True)
        except OSError as e:
            print("# harness: no watchdog: %s" % e, file=sys.stderr)
            self.popen = None
            return False
        return True

    def tell(self, *words):
        line = (" ".join(str(w) for w in words) + "\n").encode()
        with self.lock:
            if not self._ensure():
                return
            try:
                self.popen.stdin.write(line)
                self.popen.stdin.flush()
            except OSError as e:
                print("# harness: watchdog: %s" % e, file=sys.stderr)

    def watch_pid(self, pid):
        self.tell("pid", pid, _proc_start_time(pid) or "-")

    def forget_pid(self, pid):
        if self.popen is not None:
            self.tell("unpid", pid)


WATCHDOG = Watchdog()


def _watchdog_main(parent):
    """The watchdog process: collect orders until EOF, then carry out
    the ones not taken back, newest first."""
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP,
                signal.SIGPIPE):
        signal.signal(sig, signal.SIG_IGN)
    orders = []         # (kind, args), in order of arrival
    for raw in sys.stdin.buffer:
        words = raw.decode("utf-8", "replace").split()
        if not words:
            continue
        kind, args = words[0], words[1:]
        if kind.startswith("un"):
            orders = [(k, a) for k, a in orders
                      if not (k == kind[2:] and a[:1] == args[:1])]
        else:
            orders.append((kind, args))
    for kind, args in reversed(orders):
        try:
            if kind == "pid":
                pid = int(args[0])
                if args[1] != "-" and _proc_start_time(pid) != args[1]:
                    continue
                kill_pid(pid, 5)
            elif kind == "postfix":
                _watchdog_stop_postfix(args[0], args[1])
            elif kind == "umount":
                subprocess.run(["umount", "-l", args[0]],
                               stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, timeout=30)
            elif kind == "rmtree":
                shutil.rmtree(args[0], ignore_errors=True)
        except Exception:
            pass        # nobody to tell: do the rest
    return 0


def _watchdog_stop_postfix(conf, queue):
    try:
        with open(os.path.join(queue, "pid", "master.pid")) as f:
            master = int(f.read().strip())
    except (OSError, ValueError):
        return
    if not pid_alive(master):
        return
    kids = children_of(master)
    subprocess.run(["postfix", "-c", conf, "stop"],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   timeout=30)
    try:
        wait_for(lambda: not pid_alive(master), 10, "master exit")
    except Timeout:
        kids += children_of(master)
        kill_pid(master, 2)
    for k in kids:
        if pid_alive(k):
            kill_pid(k, 2)


def _on_signal(signum, frame):
    # Turn the signal into an exception so that finally blocks and
    # context managers run; atexit stops whatever is left.  A second
    # signal must not cut that cleanup short: ignore the rest.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    print("# harness: signal %d, stopping everything" % signum,
          file=sys.stderr)
    raise SystemExit(128 + signum)


def install_signal_handlers():
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, _on_signal)


def kill_pid(pid, grace=10.0, popen=None):
    """SIGTERM `pid`, wait up to `grace` s, then SIGKILL."""
    if not pid_alive(pid):
        if popen is not None:
            popen.poll()
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return

    def gone():
        if popen is not None:
            return popen.poll() is not None
        return not pid_alive(pid)
    try:
        wait_for(gone, grace, "pid %d to exit" % pid)
    except Timeout:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if popen is not None:
            popen.wait(timeout=10)


class Proc:
    """A child process with its output in a log file, stopped by PID."""

    def __init__(self, name, argv, log_path, grace=10.0, env=None):
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.grace = grace
        self.log = open(log_path, "ab")
        # A process started again on the same log: only what this one
        # writes counts for wait_output().
        self.log_start = self.log.seek(0, os.SEEK_END)
        self.popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                      stdout=self.log,
                                      stderr=subprocess.STDOUT, env=env)
        self.pid = self.popen.pid
        REGISTRY.add(name, self.stop)
        WATCHDOG.watch_pid(self.pid)

    def alive(self):
        return self.popen.poll() is None

    def output(self, all_runs=False):
        with open(self.log_path, "rb") as f:
            if not all_runs:
                f.seek(self.log_start)
            return f.read().decode("utf-8", "replace")

    def wait_output(self, pattern, timeout):
        """Wait until the log matches `pattern` (a regex); fail early if
        the process exits first."""
        rx = re.compile(pattern)

        def check():
            m = rx.search(self.output())
            if m:
                return m
            if not self.alive():
                raise RuntimeError("%s exited with status %s before "
                                   "printing /%s/; its output:\n%s"
                                   % (self.name, self.popen.returncode,
                                      pattern, self.output()))
            return None
        return wait_for(check, timeout, "%s to print /%s/"
                        % (self.name, pattern))

    def stop(self):
        REGISTRY.remove(self.stop)
        kill_pid(self.pid, self.grace, self.popen)
        WATCHDOG.forget_pid(self.pid)
        if not self.log.closed:
            self.log.close()

    def kill(self):
        """SIGKILL, as a crash would: no cleanup in the process."""
        REGISTRY.remove(self.stop)
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.popen.wait(timeout=30)
        WATCHDOG.forget_pid(self.pid)
        if not self.log.closed:
            self.log.close()


# ------------------------------------------------------------------ #
# Relays                                                               #
# ------------------------------------------------------------------ #


class StoredMessage:
    def __init__(self, index, mail_from, rcpts, content):
        self.index = index
        self.mail_from = mail_from      # argument of MAIL, e.g. FROM:<a>
        self.rcpts = rcpts              # arguments of accepted RCPTs
        self.content = content          # bytes, un-dot-stuffed

    def envelope_sender(self):
        m = re.match(r"(?i)FROM:\s*<([^>]*)>", self.mail_from)
        return m.group(1) if m else None

    def envelope_rcpts(self):
        out = []
        for r in self.rcpts:
            m = re.match(r"(?i)(?:TO:)?\s*<([^>]*)>", r)
            out.append(m.group(1) if m else r)
        return out


def _read_store(store_dir):
    """Messages of a store directory: N.eml plus N.json or N.env."""
    out = []
    for name in os.listdir(store_dir):
        m = re.fullmatch(r"(\d+)\.eml", name)
        if not m:
            continue
        n = int(m.group(1))
        base = os.path.join(store_dir, m.group(1))
        with open(base + ".eml", "rb") as f:
            content = f.read()
        mail_from, rcpts = "", []
        if os.path.exists(base + ".json"):
            with open(base + ".json") as f:
                env = json.load(f)
            mail_from, rcpts = env["mail_from"], env["rcpt_to"]
        elif os.path.exists(base + ".env"):
            # fake-smtpd: "MAIL FROM:<a> ..." and "RCPT TO:<b> ..." lines
            with open(base + ".env", "rb") as f:
                for line in f.read().decode("utf-8", "replace").splitlines():
                    verb, _, arg = line.partition(" ")
                    if verb.upper() == "MAIL":
                        mail_from = arg
                    elif verb.upper() == "RCPT":
                        rcpts.append(arg[3:] if arg[:3].upper() == "TO:"
                                     else arg)
        out.append(StoredMessage(n, mail_from, rcpts, content))
    out.sort(key=lambda m: m.index)
    return out


class SinkRelay:
    """An accepting ESMTP server in this process (one thread per
    connection) that stores every message byte-exact in store_dir.

    It advertises 8BITMIME, SMTPUTF8, SIZE, ENHANCEDSTATUSCODES and
    PIPELINING, so Postfix sends 8-bit mail unchanged.  A message file
    is written completely before the final 250, so "count of files" is
    "count of accepted messages"."""

    def __init__(self, name, store_dir, port=None):
        self.name = name
        self.store_dir = store_dir
        os.makedirs(store_dir, exist_ok=True)
        self.port = port or 0
        self.counter = 0
        self.lock = threading.Lock()
        self.sock = None
        self.conns = set()
        self.thread = None
        self.faults = {}
        self.n_conns = self.n_mails = self.n_dots = 0

    def start(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((LOOPBACK, self.port))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._accept_loop,
                                       name=self.name, daemon=True)
        self.thread.start()
        REGISTRY.add(self.name, self.stop)
        return self

    def stop(self):
        REGISTRY.remove(self.stop)
        if self.sock is None:
            return
        sock, self.sock = self.sock, None
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()
        with self.lock:
            conns = list(self.conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self.thread:
            self.thread.join(timeout=10)

    def running(self):
        return self.sock is not None

    def messages(self):
        return _read_store(self.store_dir)

    def count(self):
        return sum(1 for n in os.listdir(self.store_dir)
                   if n.endswith(".eml"))

    def _accept_loop(self):
        sock = self.sock
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            with self.lock:
                self.conns.add(conn)
            threading.Thread(target=self._serve, args=(conn,),
                             daemon=True).start()

    def _store(self, mail_from, rcpts, content):
        with self.lock:
            self.counter += 1
            n = self.counter
        base = os.path.join(self.store_dir, str(n))
        with open(base + ".json.tmp", "w") as f:
            json.dump({"mail_from": mail_from, "rcpt_to": rcpts}, f)
        os.rename(base + ".json.tmp", base + ".json")
        with open(base + ".eml.tmp", "wb") as f:
            f.write(content)
        os.rename(base + ".eml.tmp", base + ".eml")
        return n

    # Faults: set_faults() replaces the whole plan at once, so that a
    # connection sees one plan or the next, never half of each.  Keys:
    #   "greet": "none"      accept the connection, never greet
    #   "MAIL", "DATA": REPLY    the reply to every MAIL / DATA
    #   "RCPT": REPLY or {REGEX: REPLY}  every RCPT, or those whose
    #                        argument matches REGEX (others: 250)
    #   "DATA": "close-in-data"  354, then close after the first chunk
    #   "DOT": REPLY, "stall" (never answer the final dot, keep the
    #          connection until the client gives up), "store-stall"
    #          (store the message, then stall) or "close"
    # REPLY is "CODE TEXT".  A 2xx final-dot reply stores the message,
    # any other reply or action stores nothing.

    def set_faults(self, faults=None):
        self.faults = dict(faults or {})

    def stats(self):
        """(connections accepted, MAIL commands, final dots seen)."""
        with self.lock:
            return (self.n_conns, self.n_mails, self.n_dots)

    def _serve(self, conn):
        faults = self.faults
        try:
            conn.settimeout(120)
            f = conn.makefile("rb")

            def reply(text):
                conn.sendall(text.encode() + b"\r\n")

            def hold():
                # Keep the connection, answer nothing, until the client
                # closes it or stop() shuts it down.
                while conn.recv(65536):
                    pass
            with self.lock:
                self.n_conns += 1
            if faults.get("greet") == "none":
                hold()
                return
            reply("220 %s ESMTP sink" % self.name)
            mail_from, rcpts = None, []
            while True:
                line = f.readline(65536)
                if not line:
                    return
                cmd = line.rstrip(b"\r\n").decode("utf-8", "replace")
                verb = cmd[:4].upper()
                # The plan now, not the one at connect: a client that
                # keeps its connections open (a pool) meets the new one.
                faults = self.faults
                if verb == "EHLO":
                    reply("250-%s|250-PIPELINING|250-8BITMIME|"
                          "250-SMTPUTF8|250-SIZE 104857600|"
                          "250 ENHANCEDSTATUSCODES"
                          .replace("|", "\r\n") % self.name)
                elif verb == "HELO":
                    reply("250 %s" % self.name)
                elif verb == "MAIL":
                    with self.lock:
                        self.n_mails += 1
                    if "MAIL" in faults:
                        mail_from, rcpts = None, []
                        reply(faults["MAIL"])
                        if faults["MAIL"][:1] == "2":
                            mail_from = cmd[5:]
                        continue
                    mail_from, rcpts = cmd[5:], []
                    reply("250 2.1.0 Ok")
                elif verb == "RCPT":
                    if mail_from is None:
                        reply("503 5.5.1 need MAIL")
                        continue
                    arg = cmd[5:]
                    answer = "250 2.1.5 Ok"
                    rule = faults.get("RCPT")
                    if isinstance(rule, str):
                        answer = rule
                    elif isinstance(rule, dict):
                        for rx, text in rule.items():
                            if re.search(rx, arg):
                                answer = text
                                break
                    if answer[:1] == "2":
                        rcpts.append(arg[3:] if arg[:3].upper() == "TO:"
                                     else arg)
                    reply(answer)
                elif verb == "DATA":
                    if not rcpts:
                        reply("554 5.5.1 no valid recipients")
                        continue
                    data_fault = faults.get("DATA")
                    if data_fault and data_fault != "close-in-data":
                        reply(data_fault)
                        continue
                    reply("354 go ahead")
                    if data_fault == "close-in-data":
                        f.readline()
                        return
                    content = bytearray()
                    while True:
                        dl = f.readline()
                        if not dl:
                            return
                        if dl == b".\r\n":
                            break
                        if dl.startswith(b"."):
                            dl = dl[1:]
                        content += dl
                    with self.lock:
                        self.n_dots += 1
                    dot = faults.get("DOT")
                    if dot == "stall":
                        hold()
                        return
                    if dot == "store-stall":
                        # Taken, but the client never hears so: as if
                        # it crashed between our 250 and its records.
                        self._store(mail_from, rcpts, bytes(content))
                        hold()
                        return
                    if dot == "close":
                        return
                    if dot and dot[:1] != "2":
                        reply(dot)
                    else:
                        n = self._store(mail_from, rcpts, bytes(content))
                        reply("250 2.0.0 Ok: queued as S%d" % n)
                    mail_from, rcpts = None, []
                elif verb == "RSET":
                    mail_from, rcpts = None, []
                    reply("250 2.0.0 Ok")
                elif verb == "NOOP":
                    reply("250 2.0.0 Ok")
                elif verb == "QUIT":
                    reply("221 2.0.0 Bye")
                    return
                else:
                    reply("502 5.5.2 command not recognized")
        except OSError:
            pass
        finally:
            with self.lock:
                self.conns.discard(conn)
            try:
                conn.close()
            except OSError:
                pass


class FakeSmtpdRelay:
    """The project's fake-smtpd in a process of its own, storing each
    message as N.eml (content) and N.env (MAIL and RCPT lines)."""

    def __init__(self, name, exe, workdir, script=None):
        self.name = name
        self.exe = exe
        self.workdir = workdir
        self.store_dir = os.path.join(workdir, "store")
        os.makedirs(self.store_dir, exist_ok=True)
        self.script = script
        self.proc = None
        self.port = None

    def start(self):
        script_path = os.path.join(self.workdir, "script")
        with open(script_path, "w") as f:
            f.write(self.script or "")
        port_file = os.path.join(self.workdir, "port")
        pid_file = os.path.join(self.workdir, "pid")
        self.proc = Proc(self.name,
                         [self.exe, "--listen", LOOPBACK, "--script",
                          script_path, "--store", self.store_dir,
                          "--port-file", port_file, "--pid-file", pid_file],
                         os.path.join(self.workdir, "log"), grace=5)

        def port():
            if not self.proc.alive():
                raise RuntimeError("%s exited: %s"
                                   % (self.name, self.proc.output()))
            try:
                with open(port_file) as f:
                    text = f.read().strip()
                return int(text) if text else None
            except (OSError, ValueError):
                return None
        self.port = wait_for(port, 20, "%s port file" % self.name)
        wait_for(lambda: port_open(self.port), 20, "%s to listen"
                 % self.name)
        return self

    def stop(self):
        if self.proc:
            self.proc.stop()

    def running(self):
        return self.proc is not None and self.proc.alive()

    def messages(self):
        return _read_store(self.store_dir)

    def count(self):
        return sum(1 for n in os.listdir(self.store_dir)
                   if n.endswith(".eml"))


# ------------------------------------------------------------------ #
# Postfix                                                              #
# ------------------------------------------------------------------ #

POSTFIX_DIST_MASTER = "/usr/share/postfix/master.cf.dist"


class Postfix:
    """A private Postfix instance under `workdir`.

    relay_port: the main relay (relayhost=[127.0.0.1]:PORT).
    transports: {domain: port}, routed by transport_maps.
    milter_port: smtpd_milters=inet:127.0.0.1:PORT (None: no milter)."""

    def __init__(self, workdir, relay_port, milter_port=None,
                 transports=None, extra=None, port=None):
        self.workdir = workdir
        self.conf = os.path.join(workdir, "conf")
        self.queue = os.path.join(workdir, "queue")
        self.data = os.path.join(workdir, "data")
        self.maillog = os.path.join(workdir, "maillog")
        self.relay_port = relay_port
        self.milter_port = milter_port
        self.transports = transports or {}
        self.extra = extra or {}
        self.port = port
        self.master_pid = None

    def postconf(self, *args):
        r = subprocess.run(["postconf", "-c", self.conf] + list(args),
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError("postconf %s: %s" % (" ".join(args),
                                                     r.stderr.strip()))
        return r.stdout

    def configure(self):
        for d in (self.conf, self.queue, self.data):
            os.makedirs(d, exist_ok=True)
        # The queue and data directories are reached by the postfix user.
        os.chmod(self.workdir, 0o755)
        shutil.chown(self.data, "postfix")
        shutil.copy(POSTFIX_DIST_MASTER, os.path.join(self.conf,
                                                      "master.cf"))
        open(os.path.join(self.conf, "main.cf"), "w").close()
        self.port = self.port or free_port()
        settings = {
            "compatibility_level": "3.6",
            "queue_directory": self.queue,
            "data_directory": self.data,
            "maillog_file": self.maillog,
            "maillog_file_prefixes": self.workdir,
            "myhostname": "mta.e2e.test",
            "mydomain": "e2e.test",
            "myorigin": "e2e.test",
            "inet_interfaces": "loopback-only",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "mydestination": "",
            "alias_maps": "",
            "alias_database": "",
            "local_recipient_maps": "",
            "relayhost": "[%s]:%d" % (LOOPBACK, self.relay_port),
            "smtp_dns_support_level": "disabled",
            "smtp_tls_security_level": "none",
            "smtpd_tls_security_level": "none",
            "biff": "no",
            # Retry quickly: a test that tempfails must not leave mail
            # waiting minutes, and the queue is empty again at the end.
            "queue_run_delay": "5s",
            "minimal_backoff_time": "5s",
            "maximal_backoff_time": "10s",
            "message_size_limit": "52428800",
        }
        if self.transports:
            settings["transport_maps"] = "inline:{%s}" % ", ".join(
                "%s=smtp:[%s]:%d" % (d, LOOPBACK, p)
                for d, p in self.transports.items())
        if self.milter_port:
            settings.update({
                "smtpd_milters": "inet:%s:%d" % (LOOPBACK, self.milter_port),
                "milter_default_action": "tempfail",
                "milter_protocol": "6",
                "milter_connect_timeout": "10s",
                "milter_command_timeout": "30s",
                "milter_content_timeout": "60s",
            })
        settings.update(self.extra)
        self.postconf("-e", *["%s=%s" % kv for kv in settings.items()])

        # smtpd on our own port only (never 25), no chroot anywhere.
        self.postconf("-MX", "smtp/inet")
        self.postconf("-M", "%s:%d/inet=%s:%d inet n - n - - smtpd"
                      % (LOOPBACK, self.port, LOOPBACK, self.port))
        self.postconf("-F", "*/*/chroot=n")

    def _read_master_pid(self):
        try:
            with open(os.path.join(self.queue, "pid", "master.pid")) as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            return None

    def start(self, timeout=60):
        self.configure()
        REGISTRY.add("postfix", self.stop)
        WATCHDOG.tell("postfix", self.conf, self.queue)
        r = subprocess.run(["postfix", "-c", self.conf, "start"],
                           capture_output=True, text=True)
        if r.returncode != 0:
            check = subprocess.run(
                ["script", "-qc", "postfix -c %s check" % self.conf,
                 "/dev/null"], capture_output=True, text=True)
            raise RuntimeError("postfix start failed (%d): %s %s\n%s\n%s"
                               % (r.returncode, r.stdout, r.stderr,
                                  check.stdout, self.log()))
        self.master_pid = wait_for(self._read_master_pid, timeout,
                                   "postfix master.pid")
        wait_for(lambda: port_open(self.port), timeout,
                 "postfix smtpd on port %d" % self.port)
        return self

    def stop(self):
        REGISTRY.remove(self.stop)
        pid = self.master_pid or self._read_master_pid()
        subprocess.run(["postfix", "-c", self.conf, "stop"],
                       capture_output=True)
        if pid is None:
            WATCHDOG.tell("unpostfix", self.conf)
            return
        try:
            wait_for(lambda: not pid_alive(pid), 15, "postfix master exit")
        except Timeout:
            for child in children_of(pid):
                kill_pid(child, 2)
            kill_pid(pid, 2)
        self.master_pid = None
        WATCHDOG.tell("unpostfix", self.conf)

    def log(self):
        try:
            with open(self.maillog, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def queue_ids(self):
        """Queue ids still in the queue (any state)."""
        r = subprocess.run(["postqueue", "-c", self.conf, "-j"],
                           capture_output=True, text=True)
        ids = []
        for line in r.stdout.splitlines():
            try:
                ids.append(json.loads(line)["queue_id"])
            except (ValueError, KeyError):
                pass
        return ids

    def flush(self):
        subprocess.run(["postqueue", "-c", self.conf, "-f"],
                       capture_output=True)


# ------------------------------------------------------------------ #
# archive-milter                                                       #
# ------------------------------------------------------------------ #


class Milter:
    """archive-milter in the foreground with a generated config.

    on_failure: written as the rule's on_failure unless None (then the
    policy defaults of conf.h apply).  relay_timeout: the relay's
    `timeout` (seconds, decimals allowed); relay_keys: more [relay:archive]
    keys (timeout_final = 2 ...).  delivery: "sync" or "spool" (None:
    the key is not written, the default applies).  spool_dir: the spool
    (default: WORKDIR/spool, always, so that no test touches the
    system's /var/spool/archive-milter).  workers,
    spool_retry_min, spool_retry_max: [milter] keys, written when not
    None; milter_keys: more [milter] keys.  policy: {"on_timeout":
    "tempfail", ...} written into the rule.  extra_conf: raw text
    appended to the file.

    The spool survives stop(), kill() and start(): a test kills the
    milter with SIGKILL and starts it again on the same spool."""

    def __init__(self, exe, workdir, archive_port, archive_to,
                 on_failure="tempfail", relay_timeout=10, extra_conf="",
                 delivery=None, spool_dir=None, workers=None,
                 spool_retry_min=None, spool_retry_max=None, policy=None,
                 milter_keys=None, relay_keys=None, port=None):
        self.exe = exe
        self.workdir = workdir
        os.makedirs(workdir, exist_ok=True)
        self.port = port or free_port()
        self.archive_port = archive_port
        self.archive_to = archive_to
        self.on_failure = on_failure
        self.relay_timeout = relay_timeout
        self.extra_conf = extra_conf
        self.delivery = delivery
        # Always a spool of the test's own: the daemon opens one even
        # when every rule is sync, and the default is the system's.
        self.spool_dir = spool_dir or os.path.join(workdir, "spool")
        self.workers = workers
        self.spool_retry_min = spool_retry_min
        self.spool_retry_max = spool_retry_max
        self.policy = dict(policy or {})
        self.milter_keys = dict(milter_keys or {})
        self.relay_keys = dict(relay_keys or {})
        self.conf_path = os.path.join(workdir, "archive-milter.conf")
        self.key_path = os.path.join(workdir, "archive-id.key")
        self.log_path = os.path.join(workdir, "milter.log")
        self.proc = None

    def config_text(self):
        milter = [("socket", "inet:%d@%s" % (self.port, LOOPBACK)),
                  ("archive_id_key_file", self.key_path)]
        for key in ("spool_dir", "workers", "spool_retry_min",
                    "spool_retry_max"):
            if getattr(self, key) is not None:
                milter.append((key, getattr(self, key)))
        milter += list(self.milter_keys.items())
        relay = [("host", LOOPBACK), ("port", self.archive_port),
                 ("timeout", self.relay_timeout)]
        relay += list(self.relay_keys.items())
        rule = [("mode", "journal"), ("relay", "archive"),
                ("archive_to", self.archive_to)]
        if self.delivery is not None:
            rule.append(("delivery", self.delivery))
        if self.on_failure is not None:
            rule.append(("on_failure", self.on_failure))
        rule += list(self.policy.items())

        def group(name, pairs):
            return "[%s]\n%s\n" % (name, "".join(
                "%s = %s\n" % kv for kv in pairs))
        # No key file: the milter creates it (mode 0600, random) on start.
        return ("# generated by tests/e2e/harness.py\n"
                + group("milter", milter) + group("relay:archive", relay)
                + group("rule:everything", rule) + self.extra_conf)

    def write_config(self):
        with open(self.conf_path, "w") as f:
            f.write(self.config_text())

    def start(self, timeout=30):
        self.write_config()
        self.proc = Proc("archive-milter", [self.exe, "-c", self.conf_path,
                                            "-f"], self.log_path, grace=15)
        self.proc.wait_output(r"ready", timeout)
        wait_for(lambda: port_open(self.port), timeout,
                 "archive-milter to listen on %d" % self.port)
        return self

    def stop(self):
        if self.proc:
            self.proc.stop()

    def kill(self):
        """SIGKILL: no chance to finish or clean anything up."""
        if self.proc:
            self.proc.kill()

    def running(self):
        return self.proc is not None and self.proc.alive()

    def log(self):
        """The output of every run so far."""
        return self.proc.output(all_runs=True) if self.proc else ""

    def run_tool(self, *args, timeout=30):
        """archive-milter -c CONF ARGS... (e.g. --spool-list) as a
        separate process: (exit status, stdout, stderr)."""
        self.write_config()
        r = subprocess.run([self.exe, "-c", self.conf_path] + list(args),
                           capture_output=True, timeout=timeout)
        return (r.returncode, r.stdout.decode("utf-8", "replace"),
                r.stderr.decode("utf-8", "replace"))

    def spool_files(self, part):
        """Names in SPOOL/part (queue, hold, tmp), read directly: a
        cross-check of --spool-list that needs no parser of its output."""
        if not self.spool_dir:
            return []
        try:
            return sorted(n for n in os.listdir(os.path.join(
                self.spool_dir, part)) if not n.startswith("."))
        except FileNotFoundError:
            return []


# ------------------------------------------------------------------ #
# Sending                                                              #
# ------------------------------------------------------------------ #


def to_crlf(data):
    """Every lone CR and lone LF becomes CRLF."""
    return re.sub(rb"\r\n|\r|\n", b"\r\n", data)


class SendResult:
    def __init__(self, path, ok, code=0, text="", refused=None, stage=None):
        self.path = path
        self.stage = stage      # SMTP stage of the failure, if known
        self.ok = ok            # accepted for at least one recipient
        self.code = code        # failing reply code (0: none)
        self.text = text
        self.refused = refused or {}

    def __repr__(self):
        return ("SendResult(%s, ok=%s, code=%s, text=%r)"
                % (os.path.basename(self.path), self.ok, self.code,
                   self.text))


def send_files(port, sender, rcpts, paths, smtp_send=None, timeout=120):
    """Send each file as one message to 127.0.0.1:port; a list of
    SendResult in the order of `paths`.  With `smtp_send` (the path of
    the project's CLI) all go over one connection through it; without,
    through Python's smtplib, one connection for all."""
    if smtp_send:
        return _send_smtp_send(smtp_send, port, sender, rcpts, paths,
                               timeout)
    return _send_smtplib(port, sender, rcpts, paths, timeout)


def _send_smtp_send(exe, port, sender, rcpts, paths, timeout):
    argv = [exe, "--server", "%s:%d" % (LOOPBACK, port), "--from", sender,
            "--json", "--timeout", "60"]
    for r in rcpts:
        argv += ["--to", r]
    results = []
    # Batches keep one failure from hiding the rest and keep argv short.
    for i in range(0, len(paths), 50):
        batch = paths[i:i + 50]
        r = subprocess.run(argv + batch, capture_output=True,
                           timeout=timeout)
        objs = []
        for line in r.stdout.decode("utf-8", "replace").splitlines():
            line = line.strip()
            if line.startswith("{"):
                objs.append(json.loads(line))
        if len(objs) != len(batch):
            raise RuntimeError("smtp-send printed %d results for %d files "
                               "(exit %d): %s %s"
                               % (len(objs), len(batch), r.returncode,
                                  r.stdout[-2000:], r.stderr[-2000:]))
        for path, o in zip(batch, objs):
            err = o.get("error")
            refused = {a: tuple(v[:2]) for a, v in
                       (o.get("refused") or {}).items()}
            if o.get("status") == "sent":
                results.append(SendResult(path, True, refused=refused))
            else:
                results.append(SendResult(path, False, err.get("code", 0),
                                          "%s: %s" % (err.get("kind"),
                                                      err.get("text")),
                                          refused, err.get("stage")))
    return results


def _send_smtplib(port, sender, rcpts, paths, timeout):
    import smtplib
    results = []
    conn = None
    for path in paths:
        with open(path, "rb") as f:
            data = f.read()
        try:
            if conn is None:
                conn = smtplib.SMTP(LOOPBACK, port, timeout=timeout)
            refused = conn.sendmail(sender, rcpts, data)
            results.append(SendResult(path, True, refused=refused))
        except smtplib.SMTPRecipientsRefused as e:
            results.append(SendResult(path, False, 550, "all refused",
                                      e.recipients))
            conn = _rset_or_drop(conn)
        except smtplib.SMTPResponseException as e:
            text = e.smtp_error.decode("utf-8", "replace") \
                if isinstance(e.smtp_error, bytes) else str(e.smtp_error)
            stage = ("end-of-data"
                     if isinstance(e, smtplib.SMTPDataError) else None)
            results.append(SendResult(path, False, e.smtp_code, text,
                                      stage=stage))
            conn = _rset_or_drop(conn)
        except (OSError, smtplib.SMTPException) as e:
            results.append(SendResult(path, False, 0, str(e)))
            conn = None
    if conn is not None:
        try:
            conn.quit()
        except (OSError, smtplib.SMTPException):
            pass
    return results


def _rset_or_drop(conn):
    import smtplib
    try:
        conn.rset()
        return conn
    except (OSError, smtplib.SMTPException):
        try:
            conn.close()
        except OSError:
            pass
        return None


# ------------------------------------------------------------------ #
# Messages                                                             #
# ------------------------------------------------------------------ #


def split_message(data):
    """(header bytes, body bytes): the header block ends at the first
    empty line, which belongs to neither part.  No empty line: all
    header."""
    m = re.search(rb"\r\n\r\n", data)
    if data.startswith(b"\r\n"):
        return b"", data[2:]
    if not m:
        return data, None
    return data[:m.start() + 2], data[m.end():]


def header_fields(header):
    """The header block as a list of fields, each the raw bytes of one
    field including its continuation lines and final CRLF."""
    fields = []
    for line in re.findall(rb"[^\n]*\n|[^\n]+$", header):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line
        else:
            fields.append(line)
    return fields


def field_name(field):
    return field.split(b":", 1)[0].strip().lower().decode("ascii",
                                                          "replace")


def field_value(field):
    v = field.split(b":", 1)[1] if b":" in field else b""
    return re.sub(rb"\r?\n[ \t]", b" ", v).strip().decode("utf-8",
                                                          "replace")


# ------------------------------------------------------------------ #
# The whole world                                                      #
# ------------------------------------------------------------------ #


class World:
    """Postfix + main relay + archive relay + archive-milter.

    with World(milter_exe=...) as w:
        w.postfix.port, w.main.messages(), w.archive.messages() ...
    Everything is stopped on leaving the block."""

    ARCHIVE_TO = "journal@archive.example"

    def __init__(self, milter_exe=None, fake_smtpd=None, workdir=None,
                 keep=False, postfix_extra=None, milter_extra_conf="",
                 loop=False, milter_opts=None, archive_relay=None):
        """loop: the milter sends its copies back into Postfix, which
        routes the archive domain to the archive relay (transport_maps),
        as a site whose archive is a transport of the MTA itself does.
        milter_opts: more keyword arguments of Milter (delivery, policy
        ...).  archive_relay: a function of the work directory that
        returns the archive relay, not yet started (default: as the
        main relay)."""
        self.milter_exe = milter_exe
        self.fake_smtpd = fake_smtpd
        self.keep = keep or bool(workdir)
        self.workdir = workdir or tempfile.mkdtemp(prefix="archive-e2e-")
        os.makedirs(self.workdir, exist_ok=True)
        if not self.keep:
            WATCHDOG.tell("rmtree", self.workdir)
        # Postfix's own processes (user postfix) walk into it.
        os.chmod(self.workdir, 0o755)
        self.postfix_extra = postfix_extra or {}
        self.milter_extra_conf = milter_extra_conf
        self.loop = loop
        self.milter_opts = milter_opts or {}
        self.archive_relay = archive_relay
        self.main = self.archive = self.milter = self.postfix = None

    def _relay(self, name):
        d = os.path.join(self.workdir, name)
        os.makedirs(d, exist_ok=True)
        if self.fake_smtpd:
            return FakeSmtpdRelay(name + "-relay", self.fake_smtpd, d)
        return SinkRelay(name + "-relay", os.path.join(d, "store"))

    def start(self):
        install_signal_handlers()
        self.main = self._relay("main").start()
        if self.archive_relay:
            self.archive = self.archive_relay(self.workdir).start()
        else:
            self.archive = self._relay("archive").start()
        postfix_port = free_port()
        transports = {}
        if self.loop:
            transports[self.ARCHIVE_TO.split("@")[1]] = self.archive.port
        if self.milter_exe:
            opts = dict(self.milter_opts)
            archive_to = opts.pop("archive_to", self.ARCHIVE_TO)
            self.milter = Milter(self.milter_exe,
                                 os.path.join(self.workdir, "milter"),
                                 postfix_port if self.loop
                                 else self.archive.port, archive_to,
                                 extra_conf=self.milter_extra_conf,
                                 **opts)
            self.milter.start()
        self.postfix = Postfix(os.path.join(self.workdir, "postfix"),
                               self.main.port,
                               self.milter.port if self.milter else None,
                               transports=transports,
                               extra=self.postfix_extra, port=postfix_port)
        self.postfix.start()
        return self

    def stop(self):
        # Postfix first (it talks to the others), then the milter.
        for part in (self.postfix, self.milter, self.archive, self.main):
            if part is not None:
                try:
                    part.stop()
                except Exception as e:
                    print("# harness: stop: %s" % e, file=sys.stderr)
        if not self.keep:
            shutil.rmtree(self.workdir, ignore_errors=True)
            WATCHDOG.tell("unrmtree", self.workdir)

    def __enter__(self):
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc):
        self.stop()
        return False


if __name__ == "__main__" and sys.argv[1:2] == ["--watchdog"]:
    sys.exit(_watchdog_main(int(sys.argv[2])))
