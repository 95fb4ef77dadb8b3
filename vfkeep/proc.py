"""Child-process helpers: children die with their parent (PR_SET_PDEATHSIG), and are ended by PID, then what is
left of their process group."""
from __future__ import annotations

import atexit
import contextlib
import ctypes
import gc
import os
import select
import signal
import subprocess
import sys
from typing import Iterator, Sequence

_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


def die_with_parent() -> None:
    """Ask the kernel to SIGKILL this process when its parent thread exits (no orphans)."""
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def freeze_heap() -> None:
    """Once a long-running process has imported and set up what it keeps: those objects leave the cyclic
    collector's scans (`gc.freeze`). A full collection then looks only at what the process made since, not at the
    30,000 objects of its modules, whose scan paused a worker, device or guest agent for 10-25 ms at a time on a
    loaded machine (inside a servicing window: its blackout; in the guest agent: its measurement)."""
    gc.freeze()


class Interrupted(KeyboardInterrupt):
    """A signal ending a command as Ctrl-C does (`signals_interrupt`); in `vfkeep run`'s host, also `vfkeep stop`
    (signum None) asking it to stop. `cli.interrupted_line` reports it."""

    def __init__(self, signum: int | None):
        super().__init__(signum)
        self.signum = signum

    def describe(self) -> str:
        return "stop requested" if self.signum is None else signal.Signals(self.signum).name


#: The signals `signals_interrupt` turns into Interrupted.
INTERRUPTS = frozenset((signal.SIGINT, signal.SIGTERM, signal.SIGHUP))


def _interrupt(signum, frame):
    for sig in INTERRUPTS:
        signal.signal(sig, _noted)
    raise Interrupted(signum)


def _noted(signum, frame):
    """An interrupt after the first: the command is already ending, its cleanup runs to its end."""


def _ignored_from_exit() -> None:
    """At the interpreter's exit (atexit), the interrupt signals are ignored until the process is gone: Python's
    finalization then puts back their default actions (SIG_DFL, in place of the handlers it no longer runs), and one
    that came after that killed the command once it had said how it ended (status -2 instead of its own)."""
    for sig in INTERRUPTS:
        signal.signal(sig, signal.SIG_IGN)


def signals_interrupt() -> None:
    """SIGINT, SIGTERM and SIGHUP interrupt this command as Ctrl-C does: its cleanup runs, then exit 128 + N.
    SIGINT whatever the command inherited: a script's `&` (or nohup) passes it ignored, Python then installs no
    KeyboardInterrupt handler, and Ctrl-C or `kill -INT` would be lost on a long-running command.
    Only the first one interrupts: the cleanup it starts runs to its end whatever comes next, and so does the
    process's exit (a second Ctrl-C cut `demo --network`'s cleanup short: its host's network namespaces stayed, and
    it said they were removed; one that came while Python was finalizing killed it, status -2 after its line). (A
    no-op handler, not SIG_IGN, which the children its cleanup may still start would inherit; SIG_IGN only from the
    interpreter's exit on: `_ignored_from_exit`, registered again at each call so that it runs before the exit
    functions registered until then, logging's flush among them.)"""
    for sig in INTERRUPTS:
        signal.signal(sig, _interrupt)
    atexit.unregister(_ignored_from_exit)
    atexit.register(_ignored_from_exit)


def vfkeep_argv(*args: str) -> list[str]:
    """argv that runs the `vfkeep` CLI with the current interpreter."""
    return [sys.executable, "-m", "vfkeep.cli", *args]


@contextlib.contextmanager
def interrupts_held() -> Iterator[None]:
    """The interrupt signals wait until the block ends (on this thread), then act: one that arrives meanwhile is
    raised where the block ends, not in the middle of what it does."""
    held = signal.pthread_sigmask(signal.SIG_BLOCK, INTERRUPTS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def _take_interrupts() -> None:
    """In the forked child: take the interrupt signals again (`spawn` held them)."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, INTERRUPTS)


def _child_setup() -> None:
    """In the forked child: die with the parent, and take the interrupt signals again."""
    die_with_parent()
    _take_interrupts()


def spawn(argv: Sequence[str], *, pass_fds: Sequence[int] = (), env: dict[str, str] | None = None,
          stdout=None, stderr=None, cwd: str | None = None, session: bool = False) -> subprocess.Popen:
    """Start a child that is killed if we die, in a process group of its own: a terminal's Ctrl-C reaches
    only the process in the foreground group (the host), which ends its children in order. `session`: instead a
    session of its own that outlives us (a `run --detach` host).
    An interrupt that arrives while the child is being started (it is visible from its fork on, the caller owns
    it only once this returns) is held until the child exists and is then raised here, after the child is ended:
    it is never left running with nobody to end it (a smoke interrupted at its device's start left it behind).
    (Held by the spawning thread: the main thread of a command, where its handlers run and the signal lands.)"""
    held = signal.pthread_sigmask(signal.SIG_BLOCK, INTERRUPTS)
    how = {"start_new_session": True, "preexec_fn": _take_interrupts} if session else {
        "process_group": 0, "preexec_fn": _child_setup}
    try:
        child = subprocess.Popen(list(argv), pass_fds=tuple(pass_fds), env=env, stdout=stdout, stderr=stderr,
                                 cwd=cwd, stdin=subprocess.DEVNULL, **how)
    except BaseException:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)
        raise
    child.own_group = True  # (its pid is its process group's id: `end` and `kill_group` end the group too)
    try:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)  # (a held interrupt's handler runs here)
    except BaseException:
        end(child)
        raise
    return child


class NotReady(Exception):
    """A child started by `spawn_ready` did not report ready: `returncode` is its exit status, None when it
    was still running at the deadline (it has been ended)."""

    def __init__(self, returncode: int | None):
        super().__init__(f"exited with status {returncode}" if returncode is not None else "not ready in time")
        self.returncode = returncode


#: How long a child started with `spawn_ready` (or a device emulator) has to say it is ready: a Python start-up,
#: ~0.5 s of CPU, took many seconds on a loaded 2-CPU machine; a child that exits first is seen at once. As the
#: host's boot gives its devices and first worker (BOOT_TIMEOUT_S).
READY_TIMEOUT_S = 60.0


def spawn_ready(argv: Sequence[str], *, pass_fds: Sequence[int] = (),
                timeout: float = READY_TIMEOUT_S) -> subprocess.Popen:
    """`spawn` a child with `--ready-fd N` appended and return once it writes `ready` there (its sockets
    listen); otherwise end it and raise NotReady. No pipe end is left open on any path."""
    ready_r, ready_w = os.pipe()
    try:
        try:
            proc = spawn([*argv, "--ready-fd", str(ready_w)], pass_fds=(*pass_fds, ready_w))
        finally:
            os.close(ready_w)
        try:
            readable, _, _ = select.select([ready_r], [], [], timeout)
            if readable and os.read(ready_r, 64) == b"ready\n":
                return proc
        except BaseException:  # an interrupt: the caller never gets the child to end
            end(proc)
            raise
    finally:
        os.close(ready_r)
    try:
        rc = proc.wait(timeout) if readable else None  # EOF: the child is exiting
    except subprocess.TimeoutExpired:
        rc = None
    end(proc)
    raise NotReady(rc)


def end(proc: subprocess.Popen, timeout: float = 5.0) -> int | None:
    """End a child by PID: SIGTERM, then SIGKILL after `timeout`; reap it. A child stopped by SIGSTOP is continued:
    it ended only at the SIGKILL (`vfkeep stop` took 5 s more per stopped child). The SIGTERM is for the child's
    main thread itself: sent to the process, a continued child took it on whichever of its threads ran first, and
    Python runs its handlers on the main thread only: one waiting without a timeout (the guest agent) never did.
    Then what is left of a `spawn`ed child's process group is SIGKILLed (`_end_rest_of_group`)."""
    if proc.poll() is None:
        try:
            proc.send_signal(signal.SIGCONT)
            if _libc.tgkill(proc.pid, proc.pid, signal.SIGTERM) != 0:
                proc.send_signal(signal.SIGTERM)  # (it went meanwhile: as to any process)
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        except ProcessLookupError:
            pass
    _end_rest_of_group(proc)
    return proc.returncode


def exit_description(code: int | None) -> str:
    """An exit status as a person reads it: `exit status N`, `killed by SIGKILL` (Popen's negative codes)."""
    if code is None:
        return "still running"
    return f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"


def _end_rest_of_group(proc: subprocess.Popen) -> None:
    """SIGKILL whatever is left in the process group of a `spawn`ed child that has ended: the processes a child
    command started and left behind (a `--worker-cmd "sh -c '...'"` wrapper's own children: the wrapper ended by
    PID, `sleep 1000` ran on under init). They inherit neither the child's PR_SET_PDEATHSIG nor its signals.
    While any of them lives the group id (the child's pid) cannot be reused; once none does, killpg finds none."""
    if getattr(proc, "own_group", False):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL a `spawn`ed child that has not been reaped, with everything in its process group (any thread may
    call it; whoever reaps the child then finds it dead). A child not from `spawn`: the child alone."""
    if proc.returncode is not None:
        return
    try:
        if getattr(proc, "own_group", False):
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            os.kill(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def stat_fields(pid: int | str) -> list[str] | None:
    """/proc/<pid>/stat after the command name (state, ppid, pgrp, session, ...); None once the process is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()
    except OSError:
        return None


def process_state(pid: int) -> str | None:
    """`pid`'s state letter (R, S, D, T stopped, Z zombie, ...); None when there is no such process."""
    fields = stat_fields(pid)
    return fields[0] if fields else None


def stopped_line(who: str, pid: int, how: str = "SIGSTOP") -> str | None:
    """What to tell someone waiting for process `pid` (`who`, its name in the line) to answer when it is stopped by
    a signal (`how`): it answers nothing until continued, so waiting out a timeout only hides that. None while it is
    not stopped. Called as the `patience` of an rpc call (`vfkeep.rpc`), it names a stopped peer within a second."""
    if process_state(pid) != "T":
        return None
    return f"{who} is stopped ({how}) and answers nothing until continued: `kill -CONT {pid}`"


def age_s(pid: int | str = "self") -> float:
    """Seconds since the process started (for the current one: interpreter start-up and imports included)."""
    start_ticks = int(stat_fields(pid)[19])
    with open("/proc/uptime") as f:
        return float(f.read().split()[0]) - start_ticks / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    """PIDs of the live (not zombie) children of `pid`."""
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit() and (fields := stat_fields(name)) and int(fields[1]) == pid and fields[0] != "Z":
            out.append(int(name))
    return sorted(out)


def processes_mentioning(text: str) -> list[int]:
    """PIDs of the live (not zombie) processes other than this one whose command line contains `text`
    (e.g. a run dir): what a run left behind."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if text.encode() in cmdline and (fields := stat_fields(name)) and fields[0] != "Z":
            out.append(int(name))
    return out


def open_fd_count(pid: int | None = None) -> int:
    """Number of open file descriptors of a process (leak checks)."""
    return len(os.listdir(f"/proc/{pid or os.getpid()}/fd"))
