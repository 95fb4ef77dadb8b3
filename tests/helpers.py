"""Child processes in tests, always under a deadline: a stuck or dead child fails the test instead of hanging it."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence

from vfkeep.log import setup as setup_process_log
from vfkeep.proc import end, spawn, vfkeep_argv

#: This environment without the caller's OPENHCL_/VFKEEP_ settings: a command under test takes its defaults.
CLEAN_ENV = {k: v for k, v in os.environ.items() if not k.startswith(("OPENHCL_", "VFKEEP_"))}


def vfkeep(*args: str, timeout: float = 60, cwd=None, env: dict | None = None) -> subprocess.CompletedProcess:
    """`vfkeep ARGS` to its end as a script runs it: output piped, no stdin, under a deadline."""
    return subprocess.run(vfkeep_argv(*args), capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env,
                          stdin=subprocess.DEVNULL)


def run_to_end(argv: Sequence[str], *, env: dict, cwd=None, timeout: float = 120) -> tuple[subprocess.Popen, str, str]:
    """ARGV to its end in a session of its own (so its leftovers can be looked up by it), ended by PID on a
    timeout; checked to exit 0. Returns (child, stdout, stderr)."""
    child = subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd,
                             start_new_session=True)
    try:
        stdout, stderr = child.communicate(timeout=timeout)
    finally:
        if child.poll() is None:
            end(child)
    assert child.returncode == 0, stderr + stdout
    return child, stdout, stderr


class LineChild:
    """A child whose stdout is read line by line under a deadline."""

    what = "child"

    def __init__(self, argv: Sequence[str], pass_fds: Sequence[int] = (), stderr=None):
        self.proc = spawn(argv, pass_fds=pass_fds, stdout=subprocess.PIPE, stderr=stderr)
        self._buf = b""

    def line(self, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([self.proc.stdout], [], [], remaining)[0]:
                raise AssertionError(f"{self.what} {self.proc.pid} printed no line within {timeout}s")
            chunk = os.read(self.proc.stdout.fileno(), 4096)
            if not chunk:
                raise AssertionError(f"{self.what} {self.proc.pid} exited: {self.proc.wait(5)} "
                                     f"{self.proc.stderr.read().decode() if self.proc.stderr else ''}")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode()


#: `vfkeep ARGS` (argv[3:]) as `python -m vfkeep.cli` runs it, but held once Python finalizes it: when the
#: finalization clears `__main__` (after it has put back the signals' default actions: their handlers no longer run)
#: it writes `finalizing` on fd argv[1] and waits until fd argv[2] is closed (a minute at most).
_HELD_AT_FINALIZATION = r"""
import os, select, sys


class _Held:
    def __del__(self, said=int(sys.argv[1]), go=int(sys.argv[2]), write=os.write, wait=select.select):
        write(said, b"finalizing\n")
        wait([go], [], [], 60)


_held = _Held()
from vfkeep.cli import main
main(sys.argv[3:], prog_name="vfkeep")
"""


class HeldAtFinalization:
    """A `vfkeep` command (`argv(...)`, started with `pass_fds`, then `started()`) that stops once Python is
    finalizing it, after its last line: `reached()` returns then, and a signal the test sends lands exactly there;
    `release()` (or leaving the block) lets it end."""

    def __init__(self):
        self._said_r, self._said_w = os.pipe()
        self._go_r, self._go_w = os.pipe()
        self.pass_fds = (self._said_w, self._go_r)

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-c", _HELD_AT_FINALIZATION, str(self._said_w), str(self._go_r), *args]

    def started(self) -> None:
        """The child has its ends of the pipes: ours of them go (its exit is then an end of file here)."""
        self._close("_said_w", "_go_r")

    def reached(self, child: subprocess.Popen, timeout: float = 60) -> None:
        assert select.select([self._said_r], [], [], timeout)[0], f"pid {child.pid} not finalizing within {timeout} s"
        assert os.read(self._said_r, 64) == b"finalizing\n", f"pid {child.pid} ended before its finalization"

    def release(self) -> None:
        self._close("_go_w")

    def _close(self, *names: str) -> None:
        for name in names:
            if getattr(self, name) is not None:
                os.close(getattr(self, name))
                setattr(self, name, None)

    def __enter__(self) -> "HeldAtFinalization":
        return self

    def __exit__(self, *exc) -> None:
        self._close("_said_r", "_said_w", "_go_r", "_go_w")


def run_json(argv: Sequence[str], pass_fds: Sequence[int], timeout: float) -> dict:
    """Run a worker process to the end: it must exit 0; returns the JSON it printed."""
    child = spawn(argv, pass_fds=pass_fds, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = child.communicate(timeout=timeout)
        assert child.returncode == 0, err.decode()
        return json.loads(out)
    finally:
        end(child)


def wait_for(what, timeout: float = 60, child: subprocess.Popen | None = None) -> None:
    """Poll `what()` until it is true; fail at the deadline (`child` ended by PID) or as soon as `child` has exited,
    with its output."""
    deadline = time.monotonic() + timeout
    while not what():
        if child is not None and child.poll() is not None:
            raise AssertionError(f"the child exited first ({child.returncode}): {child.communicate()}")
        if time.monotonic() >= deadline:
            if child is not None:
                end(child)
            raise AssertionError(f"not within {timeout} s" + (f": {child.communicate()}" if child else ""))
        time.sleep(0.05)


def interrupt(child: subprocess.Popen, sig: int) -> tuple[str, str]:
    """Send `sig` to `child` and read it to its end (ended by PID if it is still running after a minute)."""
    try:
        child.send_signal(sig)
        return child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            end(child)


@contextlib.contextmanager
def process_log(name: str, run_dir) -> Iterator[None]:
    """This test process logs as process `name` does (`vfkeep.log.setup`: RUN_DIR/NAME.log) until the block ends;
    then the root logger's handlers and level are put back and the block's handlers closed."""
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    try:
        setup_process_log(name, run_dir)
        yield
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
            h.close()
        for h in saved_handlers:
            root.addHandler(h)
        root.setLevel(saved_level)
