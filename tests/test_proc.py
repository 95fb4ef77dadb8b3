"""`proc.spawn_ready`: a child is returned only once it says ready; otherwise it is ended and the caller
learns whether it exited (with its status) or timed out — and no pipe end leaks either way. `proc.spawn`: an
interrupt while a child is being started is raised once it exists, and it is ended."""
import os
import signal
import subprocess
import sys
import threading

import pytest

from servicing_helpers import pid_alive
from vfkeep.proc import Interrupted, NotReady, end, open_fd_count, signals_interrupt, spawn, spawn_ready

CHILD = """
import argparse, os, sys, time
p = argparse.ArgumentParser(); p.add_argument("mode"); p.add_argument("--ready-fd", type=int)
a = p.parse_args()
if a.mode == "ready":
    os.write(a.ready_fd, b"ready\\n"); time.sleep(60)
elif a.mode == "exit":
    sys.exit(7)
else:
    time.sleep(60)
"""


def child(mode: str) -> list[str]:
    return [sys.executable, "-c", CHILD, mode]


def test_ready_child_is_returned_running():
    fds = open_fd_count()
    proc = spawn_ready(child("ready"), timeout=10)
    try:
        assert proc.poll() is None and open_fd_count() == fds
    finally:
        end(proc)


@pytest.mark.parametrize("mode, returncode, timeout", [("exit", 7, 10), ("hang", None, 0.5)])
def test_child_that_never_says_ready_is_ended(mode, returncode, timeout, monkeypatch):
    started = []
    import vfkeep.proc as proc_mod
    real_spawn = proc_mod.spawn
    monkeypatch.setattr(proc_mod, "spawn", lambda *a, **k: started.append(real_spawn(*a, **k)) or started[-1])
    fds = open_fd_count()
    with pytest.raises(NotReady) as e:
        spawn_ready(child(mode), timeout=timeout)
    assert e.value.returncode == returncode
    (proc,) = started
    assert proc.returncode is not None and not pid_alive(proc.pid) and open_fd_count() == fds


def test_spawn_failure_leaks_no_pipe(monkeypatch):
    """The readiness pipe's both ends are closed when the child cannot even be spawned (EMFILE, ENOMEM...),
    or every failed `traffic start` costs the host a descriptor."""
    import vfkeep.proc as proc_mod

    def boom(*a, **k):
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(proc_mod, "spawn", boom)
    fds = open_fd_count()
    for _ in range(3):
        with pytest.raises(OSError):
            spawn_ready(child("ready"))
    assert open_fd_count() == fds


@pytest.mark.parametrize("session", [False, True])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupt_while_a_child_starts_ends_the_child(sig, session, monkeypatch):
    """The child exists (and can be seen) from its fork on, before `spawn` returns it: a signal then used to
    raise in a fork hook (swallowed: the command ran on, test_interrupts) or before the caller owned the child
    (left running: a smoke interrupted at its device's start; the `run --detach` host, started with a plain
    Popen, booted on in its session). Here it comes as soon as the child exists."""
    started = []

    def popen_then_signal(*a, **k):
        started.append(real_popen(*a, **k))
        signal.pthread_kill(threading.main_thread().ident, sig)  # (os.kill: another thread of the suite may take it)
        return started[-1]

    real_popen = subprocess.Popen
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        signals_interrupt()
        monkeypatch.setattr(subprocess, "Popen", popen_then_signal)
        with pytest.raises(Interrupted) as e:
            spawn([sys.executable, "-c", "import time; time.sleep(60)"], session=session)
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
    (proc,) = started
    assert e.value.signum == sig and proc.returncode is not None and not pid_alive(proc.pid)


def test_a_session_child_leads_its_own_session_and_takes_interrupts():
    """`spawn(session=True)` (the `run --detach` host): a session of its own, and the interrupts `spawn` held
    while starting it are not held in it (a host that ignored SIGTERM could not be stopped)."""
    child = spawn([sys.executable, "-c", "import time; time.sleep(60)"], session=True)
    try:
        assert os.getsid(child.pid) == child.pid
        with open(f"/proc/{child.pid}/status") as f:
            blocked = int(next(line for line in f if line.startswith("SigBlk:")).split()[1], 16)
        assert not [s for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP) if blocked & (1 << (s - 1))]
    finally:
        end(child)
    assert child.returncode == -signal.SIGTERM
