"""Device control channel: JSON lines over a UNIX socket, served on the device's loop.

It stands in for what is not vfio-user: the sysfs `reset_method` attribute (DESIGN D6) and the
test hooks of a device (command log, fault injection). Request: one JSON object per line,
`{"cmd": NAME, ...args}`; reply: `{"ok": true, ...result}` or `{"ok": false, "error": "..."}`.
"""
from __future__ import annotations

import json
import logging
import os
import select
import socket
import subprocess
import time
from typing import Any, Callable

from vfkeep.log import kv

from .loop import EventLoop
from .protocol import wait_fd

log = logging.getLogger("vfkeep.vfio_user.control")

MAX_LINE = 1 << 20
SEND_TIMEOUT_S = 5.0


class ControlError(Exception):
    """The device answered ok=false (`.reply` holds the answer)."""

    def __init__(self, message: str, reply: dict | None = None):
        super().__init__(message)
        self.reply = reply


class ControlTimeout(ControlError):
    """No reply in time."""


class ControlUnavailable(ControlError):
    """Nobody listens on the control socket (device not started yet, or gone)."""


class ControlServer:
    """Accepts any number of clients; each request line is answered in order."""

    def __init__(self, path: str | os.PathLike, loop: EventLoop):
        self.path = os.fspath(path)
        self.loop = loop
        self._commands: dict[str, Callable[..., dict | None]] = {}
        self._clients: dict[int, tuple[socket.socket, bytearray]] = {}
        self._listener, self._inode = listen_unix(self.path)
        loop.add_reader(self._listener.fileno(), self._accept)

    def register(self, name: str, fn: Callable[..., dict | None]) -> None:
        """`fn(**args)` returns the reply fields (or None); ValueError/TypeError/KeyError/ControlError
        become ok=false replies naming the problem."""
        self._commands[name] = fn

    @property
    def commands(self) -> list[str]:
        return sorted(self._commands)

    def close(self) -> None:
        for fd in list(self._clients):
            self._drop(fd)
        self.loop.remove_reader(self._listener.fileno())
        unlink_if_ours(self.path, self._inode)
        self._listener.close()

    def _accept(self) -> None:
        try:
            conn, _ = self._listener.accept()
        except (BlockingIOError, ConnectionAbortedError):
            return
        conn.setblocking(False)
        self._clients[conn.fileno()] = (conn, bytearray())
        self.loop.add_reader(conn.fileno(), lambda fd=conn.fileno(): self._readable(fd))

    def _readable(self, fd: int) -> None:
        conn, buf = self._clients[fd]
        try:
            data = conn.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._drop(fd)
            return
        buf += data
        while b"\n" in buf:
            line, _, rest = bytes(buf).partition(b"\n")
            buf[:] = rest
            if not self._answer(conn, line):
                self._drop(fd)
                return
        if len(buf) > MAX_LINE:
            self._answer(conn, None)
            self._drop(fd)

    def _answer(self, conn: socket.socket, line: bytes | None) -> bool:
        reply = self._dispatch(line)
        try:
            _send_all(conn, (json.dumps(reply) + "\n").encode(), SEND_TIMEOUT_S)
        except (OSError, TimeoutError):
            return False
        return True

    def _dispatch(self, line: bytes | None) -> dict[str, Any]:
        if line is None:
            return {"ok": False, "error": f"request line longer than {MAX_LINE} bytes"}
        try:
            req = json.loads(line)
        except ValueError as e:
            return {"ok": False, "error": f"request is not JSON: {e}"}
        if not isinstance(req, dict) or not isinstance(req.get("cmd"), str):
            return {"ok": False, "error": 'request must be an object with a string "cmd"'}
        name = req.pop("cmd")
        fn = self._commands.get(name)
        if fn is None:
            return {"ok": False, "error": f"unknown command {name!r}; known: {', '.join(self.commands)}"}
        try:
            result = fn(**req) or {}
        except (TypeError, ValueError, KeyError, ControlError) as e:
            kv(log, logging.WARNING, "control command refused", cmd=name, error=e)
            return {"ok": False, "error": f"{name}: {e}"}
        except Exception as e:  # noqa: BLE001 - a hook bug must not take the device down
            log.error("control command failed", exc_info=True, extra={"kv": {"cmd": name}})
            return {"ok": False, "error": f"{name}: internal error: {e!r}"}
        kv(log, logging.DEBUG, "control command", cmd=name)
        return {"ok": True, **result}

    def _drop(self, fd: int) -> None:
        conn, _ = self._clients.pop(fd)
        self.loop.remove_reader(fd)
        conn.close()


def control_call(path: str | os.PathLike, cmd: str, timeout: float = 5.0, **args: Any) -> dict:
    """Send one command and return the reply dict (ok=true). Retries the connection until the
    socket exists within `timeout` (devices create it at start-up)."""
    deadline = time.monotonic() + timeout
    sock = connect_unix(path, deadline, ControlUnavailable)
    try:
        _send_all(sock, (json.dumps({"cmd": cmd, **args}) + "\n").encode(), max(0.0, deadline - time.monotonic()))
        buf = bytearray()
        while b"\n" not in buf:
            try:
                wait_fd(sock, select.POLLIN, deadline)
            except TimeoutError:
                raise ControlTimeout(f"control command {cmd!r} on {path}: no reply within {timeout} s") from None
            data = sock.recv(65536)
            if not data:
                raise ControlUnavailable(f"control socket {path} closed before replying to {cmd!r}")
            buf += data
    except TimeoutError:
        raise ControlTimeout(f"control command {cmd!r} on {path}: device does not read within {timeout} s") from None
    except OSError as e:
        raise ControlUnavailable(f"control socket {path}: {e}") from None
    finally:
        sock.close()
    reply = json.loads(buf.partition(b"\n")[0])
    if not reply.get("ok"):
        raise ControlError(reply.get("error", "command failed"), reply)
    return reply


def wait_until_answering(proc: subprocess.Popen, ctl_path: str | os.PathLike, timeout: float, what: str) -> None:
    """Wait until a just-spawned device process answers `ping` on its control socket; RuntimeError if it
    exits first or stays silent for `timeout` seconds (it is then killed)."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} during start-up")
        try:
            control_call(ctl_path, "ping", timeout=0.2)
            return
        except ControlError:
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                raise RuntimeError(f"{what} did not answer on {os.fspath(ctl_path)} within {timeout} s") from None


def connect_unix(path: str | os.PathLike, deadline: float, error: type[Exception]) -> socket.socket:
    """Non-blocking connected socket to `path`, retrying while the listener is not there yet."""
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.connect(os.fspath(path))
        except (FileNotFoundError, ConnectionRefusedError) as e:
            sock.close()
            if time.monotonic() >= deadline:
                raise error(f"cannot connect to {path}: {e.strerror}") from None
            time.sleep(0.01)  # retry back-off while the device starts
            continue
        except OSError:
            sock.close()
            raise
        sock.setblocking(False)
        return sock


def listen_unix(path: str) -> tuple[socket.socket, int]:
    """Listening socket at `path` and the inode of its file, replacing a stale socket file left
    by a dead process."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.bind(path)
    sock.listen(16)
    sock.setblocking(False)
    return sock, os.stat(path).st_ino


def unlink_if_ours(path: str, inode: int) -> None:
    """Remove the socket file unless another process has bound a new one there since."""
    try:
        if os.stat(path).st_ino == inode:
            os.unlink(path)
    except OSError:
        pass


def _send_all(sock: socket.socket, data: bytes, timeout: float) -> None:
    view, deadline = memoryview(data), time.monotonic() + timeout
    while view:
        try:
            view = view[sock.send(view, socket.MSG_NOSIGNAL):]
        except BlockingIOError:
            wait_fd(sock, select.POLLOUT, deadline)
