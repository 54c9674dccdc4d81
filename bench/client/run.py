#!/usr/bin/python3
"""bench/client/run.py - smtp-send against Python's smtplib (issue 3)

    python3 bench/client/run.py SMTP-SEND [--rounds N] [--messages N]
                                [--size OCTETS] [--big-mb N]

Starts Postfix's smtp-sink on a free loopback port and, in the same run,
sends the same messages (500 of 10 KB by default) over ONE connection
with smtp-send (every file as an argument: one SmtpClient, in order)
and with smtplib (one SMTP object, sendmail() per message).  The two
alternate for several rounds (7 by default), each round starting with
the other tool, so that a warm-up or a busy neighbour does not favour
one of them.  Each round gives a paired ratio (smtplib's time over
smtp-send's, measured back to back); the verdict is the median of
those, which a load that drifts over the run (this machine is shared)
moves much less than the ratio of the two median rates, also printed,
with the lowest and highest paired ratio as the spread.  Each timing
covers the whole job: for smtp-send the process (start, connect,
files, QUIT), for smtplib connect, reading each file, sendmail() and
QUIT.  Then the peak memory
(max RSS, from /usr/bin/time) of smtp-send sending one 100 MB message.

Targets: at least 3x smtplib's rate; under 16 MB peak for 100 MB.
Every number is printed with its target and PASS or MISS.  Each
client's CPU time per message is printed beside its rate: on a busy
machine the rates swing from round to round, the CPU times much less,
and they show how much of the wall time was the client's own work
(the rest is waiting for smtp-sink, mostly one round trip per reply
the client waits for).

Exit status: 0 when both targets are met, 1 on a MISS or when a send
failed, 77 (skip) when smtp-sink is missing.  smtp-sink is stopped by
its pid at the end whatever happened.  Traffic goes only to that
smtp-sink on 127.0.0.1, and every step has a time limit.

XXX: smtp-sink discards the data as it reads it; against a real MTA
both clients would wait on the server's disk, and the ratio shrinks.
That is intended here: the benchmark measures the client.
"""

import argparse
import os
import resource
import shutil
import smtplib
import socket
import statistics
import subprocess
import sys
import tempfile
import time

SENDER = "bench@example.org"
RECIPIENT = "sink@example.net"
RATE_TARGET = 3.0  # smtp-send / smtplib
RSS_TARGET_MB = 16.0
STEP_TIMEOUT = 300  # seconds for any one step
SKIP = 77


def reserve_port():
    """A port on 127.0.0.1 and the socket that holds it.

    The socket stays bound, with SO_REUSEADDR and never listening, until
    smtp-sink listens: smtp-sink sets SO_REUSEADDR too and can bind
    beside it, while no automatic choice of port (a connect() of a
    parallel test, a bind() to port 0) can take the port meanwhile.  The
    caller closes the socket once the server is up."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1], s


def start_sink(port):
    """Start smtp-sink on 127.0.0.1:PORT and wait until it accepts."""
    sink = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
    cmd = [sink]
    if os.geteuid() == 0:
        # smtp-sink refuses to run as root without a user to become.
        cmd += ["-u", "postfix"]
    cmd += ["127.0.0.1:%d" % port, "256"]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("smtp-sink exited with %d" % proc.returncode)
        try:
            socket.create_connection(("127.0.0.1", port), 1).close()
            return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    proc.wait()
    raise RuntimeError("smtp-sink did not start listening")


def stop_sink(proc):
    """Stop smtp-sink by its pid, politely first."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def message(i, size):
    """Message number I: headers and 76-column lines, SIZE octets, CRLF."""
    head = ("From: <%s>\r\nTo: <%s>\r\nSubject: bench message %d\r\n"
            "Message-ID: <bench-%d@example.org>\r\n\r\n"
            % (SENDER, RECIPIENT, i, i)).encode()
    line = (("%05d " % i) + "abcdefghijklmnopqrstuvwxyz0123456789" * 2
            )[:76].encode() + b"\r\n"
    body = bytearray(head)
    while len(body) + len(line) <= size:
        body += line
    body += b"x" * (size - len(body) - 2) + b"\r\n"
    return bytes(body[:size])


def write_messages(directory, count, size):
    paths = []
    for i in range(count):
        path = os.path.join(directory, "msg-%04d.eml" % i)
        with open(path, "wb") as f:
            f.write(message(i, size))
        paths.append(path)
    return paths


def write_big(path, megabytes):
    """A message of MEGABYTES MiB, written in 1 MiB blocks."""
    block = message(0, 1 << 20)
    block = block[block.index(b"\r\n\r\n") + 4:]  # body lines only
    with open(path, "wb") as f:
        f.write(b"Subject: big bench message\r\n\r\n")
        for _ in range(megabytes):
            f.write(block)


def smtp_send_cmd(smtp_send, port, files):
    return [smtp_send, "--server", "127.0.0.1:%d" % port,
            "--from", SENDER, "--to", RECIPIENT] + files


def cpu_seconds(who):
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def run_smtp_send(smtp_send, port, files):
    """Wall and CPU seconds of smtp-send sending FILES on one connection."""
    cpu = cpu_seconds(resource.RUSAGE_CHILDREN)
    start = time.monotonic()
    res = subprocess.run(smtp_send_cmd(smtp_send, port, files),
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, timeout=STEP_TIMEOUT)
    elapsed = time.monotonic() - start
    cpu = cpu_seconds(resource.RUSAGE_CHILDREN) - cpu
    sent = res.stdout.count(b": sent")
    if res.returncode != 0 or sent != len(files):
        raise RuntimeError("smtp-send: exit %d, %d of %d sent: %s"
                           % (res.returncode, sent, len(files),
                              res.stderr.decode(errors="replace")[-500:]))
    return elapsed, cpu


def run_smtplib(port, files):
    """Wall and CPU seconds of smtplib sending FILES on one SMTP object."""
    cpu = cpu_seconds(resource.RUSAGE_SELF)
    start = time.monotonic()
    with smtplib.SMTP("127.0.0.1", port, timeout=STEP_TIMEOUT) as smtp:
        for path in files:
            with open(path, "rb") as f:
                refused = smtp.sendmail(SENDER, [RECIPIENT], f.read())
            if refused:
                raise RuntimeError("smtplib: refused %r" % refused)
    return time.monotonic() - start, cpu_seconds(resource.RUSAGE_SELF) - cpu


def peak_rss_mb(smtp_send, port, path):
    """Max RSS in MiB of smtp-send sending PATH, and how it was measured.

    /usr/bin/time forks smtp-send from a small process.  The fallback,
    wait4() on a child of this script, is only an upper bound: Linux
    keeps the largest RSS a process had, and before its exec() the child
    was a copy of this Python interpreter (about 25 MB here).
    """
    cmd = smtp_send_cmd(smtp_send, port, [path])
    if os.access("/usr/bin/time", os.X_OK):
        out = path + ".rss"
        subprocess.run(["/usr/bin/time", "-f", "%M", "-o", out] + cmd,
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       check=True, timeout=STEP_TIMEOUT)
        with open(out) as f:
            return int(f.read().split()[-1]) / 1024.0, "/usr/bin/time"
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + STEP_TIMEOUT
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid == proc.pid:
            break
        if time.monotonic() > deadline:
            proc.kill()
            os.wait4(proc.pid, 0)
            proc.returncode = -9
            raise RuntimeError("smtp-send: big message timed out")
        time.sleep(0.02)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError("smtp-send: big message: exit %d"
                           % proc.returncode)
    return usage.ru_maxrss / 1024.0, "wait4(), an upper bound"  # KiB


def verdict(ok):
    return "PASS" if ok else "MISS"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("smtp_send")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--messages", type=int, default=500)
    ap.add_argument("--size", type=int, default=10 * 1024)
    ap.add_argument("--big-mb", type=int, default=100)
    args = ap.parse_args()

    if not (shutil.which("smtp-sink") or os.path.exists(
            "/usr/sbin/smtp-sink")):
        print("bench: smtp-sink not found (Debian package postfix)")
        return SKIP

    sink = None
    work = tempfile.mkdtemp(prefix="bench-client-")
    try:
        # Step 1: the server and the messages.
        port, hold = reserve_port()
        try:
            sink = start_sink(port)
        finally:
            hold.close()
        files = write_messages(work, args.messages, args.size)
        print("bench: smtp-sink on 127.0.0.1:%d (pid %d); %d messages of "
              "%d octets" % (port, sink.pid, len(files), args.size))

        # Step 2: alternate the clients, each round the other first.
        times = {"smtp-send": [], "smtplib": []}
        cpus = {"smtp-send": [], "smtplib": []}
        pairs = []
        for r in range(args.rounds):
            order = ["smtp-send", "smtplib"]
            if r % 2:
                order.reverse()
            for name in order:
                if name == "smtp-send":
                    t, cpu = run_smtp_send(args.smtp_send, port, files)
                else:
                    t, cpu = run_smtplib(port, files)
                times[name].append(t)
                cpus[name].append(cpu)
                print("bench: round %d %-9s %7.3f s  %8.1f msg/s  "
                      "(client CPU %5.1f us/msg)"
                      % (r + 1, name, t, len(files) / t,
                         cpu * 1e6 / len(files)))
            pairs.append(times["smtplib"][-1] / times["smtp-send"][-1])
            print("bench: round %d ratio %.2fx" % (r + 1, pairs[-1]))

        # Step 3: the median round of each, and the paired ratios.
        rate = {name: len(files) / statistics.median(ts)
                for name, ts in times.items()}
        ratio_of_medians = rate["smtp-send"] / rate["smtplib"]
        ratio = statistics.median(pairs)
        cpu_us = {name: statistics.median(c) * 1e6 / len(files)
                  for name, c in cpus.items()}

        # Step 4: peak memory for one big message.
        big = os.path.join(work, "big.eml")
        write_big(big, args.big_mb)
        for f in files:
            os.unlink(f)
        rss, how = peak_rss_mb(args.smtp_send, port, big)
    except (RuntimeError, OSError, ValueError, subprocess.SubprocessError,
            smtplib.SMTPException) as e:
        print("bench: FAILED: %s" % e)
        return 1
    finally:
        stop_sink(sink)
        shutil.rmtree(work, ignore_errors=True)

    rate_ok = ratio >= RATE_TARGET
    rss_ok = rss < RSS_TARGET_MB
    print()
    for name in ("smtp-send", "smtplib"):
        print("%-10s %8.1f msg/s (median of %d rounds; client CPU %.1f "
              "us/msg)" % (name, rate[name], args.rounds, cpu_us[name]))
    print("ratio      %8.2fx      target >= %.0fx     %s  (median of %d "
          "paired rounds, spread %.2fx to %.2fx; ratio of the median "
          "rates %.2fx)"
          % (ratio, RATE_TARGET, verdict(rate_ok), len(pairs), min(pairs),
             max(pairs), ratio_of_medians))
    print("peak RSS   %8.1f MB     target < %.0f MB    %s  (%d MB message, %s)"
          % (rss, RSS_TARGET_MB, verdict(rss_ok), args.big_mb, how))
    return 0 if rate_ok and rss_ok else 1


if __name__ == "__main__":
    sys.exit(main())
