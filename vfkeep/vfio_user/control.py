"""Device control channel: a `vfkeep.rpc` socket (`<socket>.ctl` by default) served on the device's loop.

It stands in for what is not vfio-user: the sysfs `reset_method` attribute (DESIGN D6) and the
test hooks of a device (command log, fault injection). Commands run on the loop's thread, so they
see the device between two vfio-user messages and need no locks.
"""
from __future__ import annotations

import logging
import os
import subprocess
import time
from typing import Any

from .. import rpc
from ..proc import end, spawn, vfkeep_argv

log = logging.getLogger("vfkeep.vfio_user.control")


def control_server(path: str | os.PathLike, loop) -> rpc.LoopServer:
    """The control socket at `path` on `loop`; commands registered with `.register(name, fn)` say no by
    raising ValueError, TypeError or KeyError (a Refused reply naming the problem)."""
    return rpc.LoopServer(path, loop, rpc.Dispatcher(log, refused=(ValueError, TypeError, KeyError)))


def control_call(path: str | os.PathLike, cmd: str, timeout: float = 5.0, **args: Any) -> Any:
    """One command on a device's control socket; its result, or the `vfkeep.rpc` error. Retries the
    connection for up to `timeout` seconds while the socket does not exist yet (a device starting up)."""
    return rpc.call(path, cmd, args, timeout=timeout, connect_timeout=timeout)


def wait_until_answering(proc: subprocess.Popen, ctl_path: str | os.PathLike, timeout: float, what: str) -> None:
    """Wait until a just-spawned device process answers `ping` on its control socket; RuntimeError if it
    exits first or stays silent for `timeout` seconds (it is then killed). On an interrupt (or any other error)
    it is ended too: the caller, which never got it, cannot."""
    deadline = time.monotonic() + timeout
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{what} exited with {proc.returncode} during start-up")
            try:
                control_call(ctl_path, "ping", timeout=0.2)
                return
            except rpc.RpcError:
                if time.monotonic() > deadline:
                    proc.kill()
                    proc.wait()
                    raise RuntimeError(f"{what} did not answer on {os.fspath(ctl_path)} within {timeout} s") from None
    except BaseException:
        end(proc)
        raise


def start_device_process(command: str, socket_path: str | os.PathLike, args: tuple[str, ...],
                         control_path: str | os.PathLike | None, timeout: float, what: str,
                         **popen_kwargs) -> subprocess.Popen:
    """Run `vfkeep COMMAND --socket PATH [--control PATH] ARGS...` (a device emulator) as a child; return when it
    answers on its control socket (PATH.ctl unless given)."""
    argv = vfkeep_argv(command, "--socket", os.fspath(socket_path), *args)
    ctl = os.fspath(control_path) if control_path else f"{os.fspath(socket_path)}.ctl"
    if control_path:
        argv += ["--control", ctl]
    proc = spawn(argv, **popen_kwargs)
    wait_until_answering(proc, ctl, timeout, f"{what} ({' '.join(argv)})")
    return proc
