"""A `vfkeep run --no-console` host (a foreground host without console, our child) in its own run directory, driven through `HostClient`.

The one harness for a host in another process: the tests (`tests/servicing_helpers.py` adds its
checks) and the benchmarks (`benchmarks/bench_servicing.py` adds its measurements) both start,
drive and stop hosts with it.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Iterator

from .. import proc, rpc
from .control import HostClient


class DetachedHost(HostClient):
    """Spawns `vfkeep run --no-console --run-dir RUN_DIR --nics N *run_args` and returns once it answers `status`.

    The host gets the caller's environment without OPENHCL_* / VFKEEP_* variables (so a developer's
    shell cannot change what a test or benchmark measures), plus `env`; its stdout/stderr go to
    `<run-dir>/host.stderr`.
    """

    #: The `vfkeep run` option that starts a host without a console (a host from before it took `--detach`).
    no_console_option = "--no-console"

    def __init__(self, run_dir: str, *run_args: str, nics: int = 1, env: dict[str, str] | None = None,
                 wait: float | None = 120.0, boot_timeout: float = 60.0, cwd: str | None = None):
        super().__init__(run_dir, wait)
        os.makedirs(self.run_dir, exist_ok=True)
        argv = proc.vfkeep_argv("run", self.no_console_option, "--run-dir", self.run_dir, "--nics", str(nics),
                                *run_args)
        full_env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENHCL_", "VFKEEP_"))}
        full_env.update(env or {})
        self._stderr = open(os.path.join(self.run_dir, "host.stderr"), "ab")
        self.child = proc.spawn(argv, env=full_env, stdout=self._stderr, stderr=self._stderr, cwd=cwd)
        deadline = time.monotonic() + boot_timeout
        while True:
            if self.child.poll() is not None:
                self._stderr.close()
                raise RuntimeError(f"host exited with {self.child.returncode} during boot:\n{self.logs()}")
            try:
                self.status(wait=5)
                return
            except rpc.Unavailable:
                if time.monotonic() > deadline:
                    self.kill()
                    raise RuntimeError(f"host not ready within {boot_timeout} s:\n{self.logs()}") from None
                time.sleep(0.05)  # the control socket appears once the host has booted

    @classmethod
    @contextlib.contextmanager
    def running(cls, *args, **kwargs) -> Iterator["DetachedHost"]:
        """A host in a temporary run dir (`cls(run_dir, *args, **kwargs)`), stopped on the way out however
        the caller's block ends."""
        with tempfile.TemporaryDirectory(prefix="vfkeep-host-") as tmp:
            host = cls(os.path.join(tmp, "run"), *args, **kwargs)
            try:
                yield host
            finally:
                try:
                    host.stop()
                except rpc.RpcError:
                    host.kill()

    @property
    def pid(self) -> int:
        return self.child.pid

    def stop(self, timeout: float = 60.0) -> int:
        """`stop` over the control socket; the host's exit status once it has ended its children."""
        super().stop()
        return self.reap(timeout)

    def reap(self, timeout: float = 60.0) -> int:
        """Wait for the host process to exit (TimeoutExpired otherwise) and return its status."""
        code = self.child.wait(timeout)
        self._stderr.close()
        return code

    def kill(self) -> None:
        proc.end(self.child)
        self._stderr.close()

    def logs(self) -> str:
        """The tail of every log and stderr file in the run dir, for failure messages."""
        out = []
        for name in sorted(os.listdir(self.run_dir)):
            if name.endswith((".log", ".stderr")):
                with open(os.path.join(self.run_dir, name), errors="replace") as f:
                    out.append(f"--- {name}\n{f.read()[-4000:]}")
        return "\n".join(out)
