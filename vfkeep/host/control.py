"""Host control socket (`<run-dir>/host.sock`): JSON lines for `vfkeep service|inspect|stop` and tests.

Request `{"op": "service"|"inspect"|"status"|"probe"|"stop", ...args}`; reply
`{"ok": true, "result": ...}` or `{"ok": false, "error": "..."}`. One request per connection.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import socketserver
import threading
from typing import Any, Callable

from ..log import kv

log = logging.getLogger("vfkeep.host.control")

SOCKET_NAME = "host.sock"


class HostUnavailable(Exception):
    """No host is listening in the run directory."""


class HostRefused(Exception):
    """The host answered ok=false."""


def socket_path(run_dir: str) -> str:
    return os.path.join(run_dir, SOCKET_NAME)


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


class ControlServer:
    """Serves `handlers[op](**args)` on a background thread."""

    def __init__(self, run_dir: str, handlers: dict[str, Callable[..., Any]]):
        self.path = socket_path(run_dir)
        if os.path.exists(self.path):
            try:
                call(run_dir, "status", wait=2.0)
            except HostUnavailable:
                os.unlink(self.path)  # stale socket of a dead host
            else:
                raise HostRefused(f"a host is already running in {run_dir}")
        handlers_ = handlers

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                line = self.rfile.readline(1 << 20)
                try:
                    req = json.loads(line)
                    op = req.pop("op")
                    fn = handlers_[op]
                except (ValueError, KeyError, TypeError, AttributeError):
                    reply = {"ok": False, "error": f"bad request {line[:200]!r}; ops: {', '.join(sorted(handlers_))}"}
                else:
                    try:
                        reply = {"ok": True, "result": fn(**req)}
                    except TypeError as e:
                        reply = {"ok": False, "error": f"{op}: bad arguments: {e}"}
                    except Exception as e:  # noqa: BLE001 - every failure is answered, the host goes on
                        kv(log, logging.WARNING, "control request failed", op=op, error=repr(e))
                        reply = {"ok": False, "error": f"{op}: {e}"}
                try:
                    self.wfile.write((json.dumps(reply) + "\n").encode())
                except OSError:
                    pass

        self._server = _Server(self.path, Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="host-control", daemon=True)

    def start(self) -> None:
        self._thread.start()
        kv(log, logging.INFO, "control socket listening", path=self.path)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def call(run_dir: str, op: str, wait: float | None = None, **args) -> Any:
    """One request to the host in `run_dir` (`wait`: socket timeout, None = forever); returns its result or
    raises HostRefused/HostUnavailable."""
    path = socket_path(run_dir)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(wait)
    try:
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError) as e:
            raise HostUnavailable(f"no host running in {run_dir} ({e.strerror})") from None
        sock.sendall((json.dumps({"op": op, **args}) + "\n").encode())
        buf = bytearray()
        while not buf.endswith(b"\n"):
            chunk = sock.recv(1 << 16)
            if not chunk:
                raise HostUnavailable(f"host in {run_dir} closed the connection before answering {op!r}")
            buf += chunk
    except socket.timeout:
        raise HostUnavailable(f"host in {run_dir} did not answer {op!r} within {wait} s") from None
    finally:
        sock.close()
    reply = json.loads(buf)
    if not reply.get("ok"):
        raise HostRefused(reply.get("error", "request failed"))
    return reply["result"]
