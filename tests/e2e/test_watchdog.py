#!/usr/bin/env python3
"""test_watchdog.py - nothing a test started outlives it, however it dies

A child Python process builds a world with the harness (a private
Postfix, the relays, archive-milter when $ARCHIVE_MILTER is set, and a
plain `sleep` through harness.Proc), prints the pids and its work
directory, and waits.  This test then kills it with SIGKILL, as meson
does to a test that overran its timeout, and checks that the harness's
watchdog stops every one of those processes by pid, unmounts the tmpfs it
mounted and removes the work directory, within a bounded time.

Exit status: 0 passed, 1 failed, 77 (skipped) when not root, 99 harness
error.
"""

import json
import os
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import harness as h  # noqa: E402

CHILD = r'''
import json, os, sys, time
sys.path.insert(0, %r)
import harness as h
h.install_signal_handlers()
w = h.World(milter_exe=os.environ.get("ARCHIVE_MILTER") or None)
w.start()
sleeper = h.Proc("sleeper", ["sleep", "600"],
                 os.path.join(w.workdir, "sleep.log"))
mnt = os.path.join(w.workdir, "mnt")
os.makedirs(mnt)
import subprocess
if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", mnt],
                  capture_output=True).returncode == 0:
    h.WATCHDOG.tell("umount", mnt)
else:
    mnt = None
print(json.dumps({"mount": mnt, "master": w.postfix.master_pid,
                  "kids": h.children_of(w.postfix.master_pid),
                  "milter": w.milter.proc.pid if w.milter else None,
                  "sleeper": sleeper.pid,
                  "workdir": w.workdir}), flush=True)
time.sleep(600)
''' % HERE


def is_mounted(path):
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path for line in f)


def main():
    if os.geteuid() != 0:
        print("1..0 # SKIP needs root (Postfix's master)")
        return 77
    child = subprocess.Popen([sys.executable, "-c", CHILD],
                             stdout=subprocess.PIPE, text=True)
    try:
        line = child.stdout.readline()
        info = json.loads(line)
    except ValueError:
        child.kill()
        print("Bail out! the child printed no pids: %r" % line)
        return 99
    pids = {"postfix master": info["master"], "sleep": info["sleeper"]}
    if info["milter"]:
        pids["archive-milter"] = info["milter"]
    for k in info["kids"]:
        pids["postfix child %d" % k] = k
    print("1..%d" % (len(pids) + 3))
    n = 0
    for name, pid in pids.items():
        n += 1
        ok = h.pid_alive(pid)
        print("%s %d - %s (pid %d) runs before the kill"
              % ("ok" if ok else "not ok", n, name, pid))
        if not ok:
            child.kill()
            return 1

    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline:
        left = [p for p in pids.values() if h.pid_alive(p)]
        if not left and not os.path.exists(info["workdir"]) and not (
                info["mount"] and is_mounted(info["mount"])):
            break
        time.sleep(0.2)
    failed = 0
    left = {name: pid for name, pid in pids.items() if h.pid_alive(pid)}
    n += 1
    if left:
        failed += 1
        print("not ok %d - processes outlive a SIGKILLed test: %s"
              % (n, ", ".join("%s (pid %d)" % kv for kv in left.items())))
        for pid in left.values():   # do not leave them behind ourselves
            h.kill_pid(pid, 2)
    else:
        print("ok %d - every process stopped after the SIGKILL" % n)
    n += 1
    if info["mount"] is None:
        print("ok %d - # SKIP mount -t tmpfs not permitted" % n)
    elif is_mounted(info["mount"]):
        failed += 1
        print("not ok %d - tmpfs %s still mounted" % (n, info["mount"]))
        subprocess.run(["umount", "-l", info["mount"]])
    else:
        print("ok %d - the test's tmpfs unmounted" % n)
    n += 1
    if os.path.exists(info["workdir"]):
        failed += 1
        print("not ok %d - work directory %s left behind"
              % (n, info["workdir"]))
    else:
        print("ok %d - work directory removed" % n)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
