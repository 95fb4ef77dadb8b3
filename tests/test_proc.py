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
from vfkeep.proc import Interrupted, NotReady, end, open_fd_count, signals_interrupt, spawn, spawn_ready, stat_fields

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


def test_only_the_first_interrupt_raises():
    """SIGINT, SIGTERM or SIGHUP ends the command once: the ones after it are noted, not raised (a second Ctrl-C cut
    `demo --network`'s cleanup short, its namespaces left while it said they were removed)."""
    main = threading.main_thread().ident
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        signals_interrupt()
        with pytest.raises(Interrupted) as e:
            signal.pthread_kill(main, signal.SIGTERM)
            signal.getsignal(signal.SIGTERM)  # (the handler runs by the time a call returns)
        raised = []
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            try:
                signal.pthread_kill(main, sig)
                signal.getsignal(sig)
            except Interrupted as later:
                raised.append(later.signum)
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
    assert e.value.signum == signal.SIGTERM and raised == []


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


#: A child as the guest agent is: SIGTERM sets an event its main thread waits on without a timeout, while other
#: threads run.
WAITS_FOR_SIGTERM = """
import signal, sys, threading, time
quit = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: quit.set())
for _ in range(4):
    threading.Thread(target=lambda: [time.sleep(0.0005) for _ in iter(int, 1)], daemon=True).start()
print("ready", flush=True)
quit.wait()
sys.exit(0)
"""


def test_end_continues_a_stopped_child_so_it_acts_on_sigterm():
    """A SIGTERM sent to a stopped child was taken, once it was continued, by whichever of its threads ran first, and
    Python runs handlers only on the main thread: a main thread waiting without a timeout never ran it, and the child
    ended only at the SIGKILL (the guest agent, at every `vfkeep stop` of a host whose agent was stopped)."""
    import time

    c = spawn([sys.executable, "-c", WAITS_FOR_SIGTERM], stdout=subprocess.PIPE)
    try:
        assert c.stdout.readline() == b"ready\n"
        os.kill(c.pid, signal.SIGSTOP)
        deadline = time.monotonic() + 30  # (stopped as a user's SIGSTOP leaves it: every thread)
        while not all((stat_fields(f"{c.pid}/task/{t}") or ["T"])[0] == "T" for t in os.listdir(f"/proc/{c.pid}/task")):
            assert time.monotonic() < deadline, "not stopped"
            time.sleep(0.01)
        t0 = time.monotonic()
        assert end(c, timeout=20) == 0  # (-9 after the 20 s when the handler never ran)
        assert time.monotonic() - t0 < 15
    finally:
        if c.poll() is None:
            os.kill(c.pid, signal.SIGKILL)
            c.wait()
        c.stdout.close()


#: A child as a `--worker-cmd` wrapper script is: it starts a process of its own (printed), then waits.
LEAVES_A_CHILD = "sleep 300 & echo $!; wait"


def _gone_within(pid: int, seconds: float) -> bool:
    import time
    deadline = time.monotonic() + seconds
    while pid_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


@pytest.mark.parametrize("how", ["end", "kill_group"])
def test_what_a_child_started_in_its_group_is_ended_with_it(how):
    """A child command's own children (a wrapper's) are in its process group but inherit neither its
    PR_SET_PDEATHSIG nor its SIGTERM: ended by PID only, the wrapper went and `sleep` ran on under init
    (`service --next-worker-cmd "sh -c 'sleep 1000'"` left it after the host gave up on the worker)."""
    c = spawn(["sh", "-c", LEAVES_A_CHILD], stdout=subprocess.PIPE)
    grandchild = int(c.stdout.readline())
    try:
        assert os.getpgid(grandchild) == c.pid
        if how == "end":
            end(c, timeout=10)
        else:
            from vfkeep.proc import kill_group
            kill_group(c)
            c.wait(10)
        assert c.returncode is not None
        assert _gone_within(grandchild, 10), "the child's own child outlived it"
    finally:
        if pid_alive(grandchild):
            os.kill(grandchild, signal.SIGKILL)
        if c.poll() is None:
            c.kill()
            c.wait()
        c.stdout.close()
