"""One JSON-lines RPC layer for every control socket: the host's `host.sock`, a device's `<socket>.ctl`, a guest agent's.

Envelope: one JSON object per line (UTF-8), any number of requests per connection, answered in order::

    request  {"id": ID, "cmd": NAME, "args": {...}}        "id" (a JSON scalar) and "args" may be left out
    reply    {"id": ID, "ok": true, "result": RESULT}
             {"id": ID, "ok": false, "error": {"type": TYPE, "message": TEXT}}

The reply echoes the request's id (null when the request had none or could not be read). A client
skips every line that is not the reply it waits for, so later versions can add a greeting and
asynchronous events (lines without "ok") without breaking an older client.

Error types are the same on every socket (`RpcError` subclasses, `type` = class name):
`BadRequest` (not a JSON object with a string "cmd" and an object "args"), `RequestTooLarge` (a
line longer than MAX_LINE; the server answers, then closes the connection), `UnknownCommand`,
`BadArguments` (the args do not fit the command's parameters), `Refused` (the command said no: bad
value, wrong state) and `InternalError` (a bug; logged with its traceback). Client side only:
`Unavailable` (nobody listens, or the connection broke) and its subclass `Timeout`.

Codec (`parse_request`, `encode`) and dispatch (`Dispatcher`) know nothing of sockets; a
`ThreadedServer` (a thread per connection) and a `LoopServer` (on a selector loop such as the
device's) carry them; `RpcClient` / `call` is the one client.
"""
from __future__ import annotations

import inspect
import itertools
import json
import logging
import os
import select
import socket
import socketserver
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from .log import kv
from .sockets import bind_error, claim_socket_path, connect_unix, listen_unix, send_all, unlink_if_ours, wait_fd

#: Longest request line, newline included.
MAX_LINE = 1 << 20
SEND_TIMEOUT_S = 5.0
#: `timeout=` default of `RpcClient.call` (and HostClient's `wait=`): the client's own timeout.
DEFAULT_TIMEOUT: Any = object()
#: How often `RpcClient.call` calls its `patience` while a reply is awaited.
PATIENCE_S = 1.0


# -- errors --------------------------------------------------------------------------------------------
class RpcError(Exception):
    """An error reply (or, client side, no reply at all); `type` names the kind on the wire."""

    @property
    def type(self) -> str:
        return type(self).__name__

    def to_json(self) -> dict[str, str]:
        return {"type": self.type, "message": str(self)}


class BadRequest(RpcError):
    """The line is not a request: not JSON, not an object, no string "cmd", "args" not an object."""

    def __init__(self, message: str, request_id: Any = None):
        super().__init__(message)
        self.request_id = request_id  # echoed in the reply when it could be read


class RequestTooLarge(RpcError):
    """The line is longer than MAX_LINE bytes."""


class UnknownCommand(RpcError):
    """No command of that name on this socket."""


class BadArguments(RpcError):
    """The args do not fit the command's parameters (missing, unexpected)."""


class Refused(RpcError):
    """The command refused: a bad value, or not in this state. Handlers may raise it."""


class InternalError(RpcError):
    """The command failed unexpectedly."""


class Unavailable(RpcError):
    """Client side: nobody listens on the socket, or the connection broke before the reply."""


class Timeout(Unavailable):
    """Client side: no reply in time."""


class _OtherError(RpcError):
    """An error reply of a type this client does not know."""

    def __init__(self, type_: str, message: str):
        super().__init__(message)
        self._type = type_

    @property
    def type(self) -> str:
        return self._type


_ERRORS = {cls.__name__: cls for cls in (BadRequest, RequestTooLarge, UnknownCommand, BadArguments, Refused,
                                         InternalError)}


# -- codec ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Request:
    id: Any
    cmd: str
    args: dict[str, Any]


def encode(obj: dict[str, Any]) -> bytes:
    """One line: the object as compact JSON and a newline."""
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def parse_request(line: bytes) -> Request:
    """The request on `line`; BadRequest (carrying the id when it could be read) otherwise."""
    try:
        obj = json.loads(line)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(f"request is not JSON: {e}") from None
    if not isinstance(obj, dict):
        raise BadRequest(f"a request is a JSON object, got {type(obj).__name__}")
    rid = obj.get("id")
    if not _scalar(rid):
        raise BadRequest('"id" must be a JSON scalar')
    cmd, args = obj.get("cmd"), obj.get("args", {})
    if not isinstance(cmd, str) or not isinstance(args, dict) or set(obj) - {"id", "cmd", "args"}:
        raise BadRequest('a request is {"id": ID, "cmd": NAME, "args": {...}} ("id" and "args" optional)', rid)
    return Request(rid, cmd, args)


def ok_reply(rid: Any, result: Any) -> dict[str, Any]:
    return {"id": rid, "ok": True, "result": result}


def error_reply(rid: Any, error: RpcError) -> dict[str, Any]:
    return {"id": rid, "ok": False, "error": error.to_json()}


# -- streams -------------------------------------------------------------------------------------------
class Stream:
    """A command result after which the connection carries pushed lines (events) until the source ends or
    the client goes away; only a `ThreadedServer` serves them. `source` has `next(timeout) -> dict | None`
    (None: nothing yet, or ended), `closed` and `close()`."""

    def __init__(self, result: Any, source: Any):
        self.result = result
        self.source = source


# -- dispatch ------------------------------------------------------------------------------------------
class Dispatcher:
    """Commands by name. `fn(**args)` returns the result (anything JSON, or a record with `to_json()`).

    `refused`: the exception types with which handlers say no (besides `Refused`); they become
    Refused replies "CMD: message". Any other exception is an InternalError reply and is logged.
    """

    def __init__(self, log: logging.Logger, commands: dict[str, Callable[..., Any]] | None = None,
                 refused: tuple[type[Exception], ...] = ()):
        self.log = log
        self._commands: dict[str, Callable[..., Any]] = {}
        #: Each command's signature, taken when it is registered: `inspect.signature` per request cost a device
        #: 0.05-0.1 ms of a reset path's `set_reset_method`, inside its window.
        self._signatures: dict[str, inspect.Signature] = {}
        self.refused = refused
        for name, fn in (commands or {}).items():
            self.register(name, fn)

    def register(self, name: str, fn: Callable[..., Any]) -> None:
        self._commands[name] = fn
        self._signatures[name] = inspect.signature(fn)

    @property
    def commands(self) -> list[str]:
        return sorted(self._commands)

    def handle(self, line: bytes | None) -> dict[str, Any]:
        """The reply to one request line (None: the line was longer than MAX_LINE)."""
        reply, stream = self.handle_stream(line)
        if stream is not None:  # this server cannot push lines
            stream.source.close()
            return error_reply(reply["id"], Refused("this socket does not stream"))
        return reply

    def handle_stream(self, line: bytes | None) -> tuple[dict[str, Any], Stream | None]:
        """As `handle`, plus the Stream when the command returned one (its result is in the reply)."""
        if line is None:
            return error_reply(None, RequestTooLarge(f"request line longer than {MAX_LINE} bytes")), None
        try:
            req = parse_request(line)
        except BadRequest as e:
            return error_reply(e.request_id, e), None
        try:
            result = self.dispatch(req)
        except RpcError as e:
            return error_reply(req.id, e), None
        if isinstance(result, Stream):
            return ok_reply(req.id, result.result), result
        return ok_reply(req.id, result), None

    def dispatch(self, req: Request) -> Any:
        fn = self._commands.get(req.cmd)
        if fn is None:
            raise UnknownCommand(f"unknown command {req.cmd!r}; known: {', '.join(self.commands)}")
        try:
            self._signatures[req.cmd].bind(**req.args)
        except TypeError as e:
            raise BadArguments(f"{req.cmd}: {e}") from None
        try:
            result = fn(**req.args)
        except RpcError:
            raise
        except self.refused as e:
            kv(self.log, logging.WARNING, "control request refused", cmd=req.cmd, error=str(e))
            raise Refused(f"{req.cmd}: {e}") from None
        except Exception as e:  # noqa: BLE001 - a bug in one command must not take the process down
            self.log.error("control request failed", exc_info=True, extra={"kv": {"cmd": req.cmd}})
            raise InternalError(f"{req.cmd}: internal error: {e!r}") from None
        kv(self.log, logging.DEBUG, "control request", cmd=req.cmd)
        return result


# -- servers -------------------------------------------------------------------------------------------
class _ThreadingUnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


class ThreadedServer:
    """Serves a Dispatcher on `path` with a thread per connection (a slow command does not hold up others).
    `start()` runs the accept loop on a daemon thread; `close()` stops it and removes the socket file.

    `greeting()`, when given, is sent as the first line of every connection (a line without "ok", which a
    client skips). A command that returns a `Stream` turns its connection into a one-way stream of the
    source's lines after the reply, until the source ends or the client closes its end."""

    def __init__(self, path: str, dispatcher: Dispatcher, name: str = "rpc",
                 greeting: Callable[[], dict[str, Any]] | None = None):
        self.path = path
        self.dispatcher = dispatcher
        self.name = name
        claim_socket_path(path)  # a stale socket of a dead process; never a live one

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                try:
                    if greeting is not None:
                        self.wfile.write(encode(greeting()))
                        self.wfile.flush()
                    while True:
                        line = self.rfile.readline(MAX_LINE)
                        if not line:
                            return
                        too_long = len(line) == MAX_LINE and not line.endswith(b"\n")
                        if not too_long and not line.strip():
                            continue
                        reply, stream = dispatcher.handle_stream(None if too_long else line)
                        self.wfile.write(encode(reply))
                        self.wfile.flush()
                        if stream is not None:
                            self.push(stream.source)
                            return
                        if too_long:
                            return
                except OSError:
                    return

            def push(self, source) -> None:
                """Write the source's lines until it ends or the client hangs up (EOF on its end). What the source
                holds when it ends is written first: the host's last event (host_stopping) was lost when this
                thread saw the end before it had written it."""
                try:
                    while True:
                        item = source.next(0.25)
                        if item is not None:
                            self.wfile.write(encode(item))
                            self.wfile.flush()
                        elif source.closed:
                            return
                        elif select.select([self.connection], [], [], 0)[0] and not self.connection.recv(1, socket.MSG_PEEK):
                            return
                finally:
                    source.close()

        try:
            self._server = _ThreadingUnixServer(path, Handler)
        except OSError as e:
            raise bind_error(path, e) from None
        self._inode = os.stat(path).st_ino
        self._thread: threading.Thread | None = None

    def register(self, name: str, fn: Callable[..., Any]) -> None:
        self.dispatcher.register(name, fn)

    def start(self, poll_interval: float = 0.5) -> None:
        self._thread = threading.Thread(target=self._server.serve_forever, args=(poll_interval,), name=self.name,
                                        daemon=True)
        self._thread.start()

    def close(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
        self._server.server_close()
        unlink_if_ours(self.path, self._inode)


class LoopServer:
    """Serves a Dispatcher on `path` from a single-threaded selector loop (`add_reader/remove_reader`), so
    commands run on the loop's thread and need no locks. Any number of clients."""

    def __init__(self, path: str | os.PathLike, loop, dispatcher: Dispatcher):
        self.path = os.fspath(path)
        self.loop = loop
        self.dispatcher = dispatcher
        self._clients: dict[int, tuple[socket.socket, bytearray]] = {}
        self._listener, self._inode = listen_unix(self.path)
        loop.add_reader(self._listener.fileno(), self._accept)

    def register(self, name: str, fn: Callable[..., Any]) -> None:
        self.dispatcher.register(name, fn)

    @property
    def commands(self) -> list[str]:
        return self.dispatcher.commands

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
        while (end := buf.find(b"\n")) >= 0:
            line = bytes(buf[:end])
            del buf[:end + 1]
            if end + 1 > MAX_LINE:
                break
            if line.strip() and not self._answer(conn, line):
                self._drop(fd)
                return
        else:
            if len(buf) < MAX_LINE:
                return
        self._answer(conn, None)  # longer than MAX_LINE: answered, then the connection is closed
        self._drop(fd)

    def _answer(self, conn: socket.socket, line: bytes | None) -> bool:
        try:
            send_all(conn, encode(self.dispatcher.handle(line)), time.monotonic() + SEND_TIMEOUT_S)
        except (OSError, TimeoutError):
            return False
        return True

    def _drop(self, fd: int) -> None:
        conn, _ = self._clients.pop(fd)
        self.loop.remove_reader(fd)
        conn.close()


# -- client --------------------------------------------------------------------------------------------
class RpcClient:
    """One connection to a control socket; requests in turn (thread-safe).

    `timeout`: seconds to wait for each reply (None = forever); `connect_timeout`: how long to retry
    connecting while nobody listens yet (a process starting up), 0 = fail at once.
    """

    def __init__(self, path: str | os.PathLike, timeout: float | None = 5.0, connect_timeout: float = 0.0):
        self.path = os.fspath(path)
        self.timeout = timeout
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._buf = bytearray()
        try:
            self.sock = connect_unix(self.path, time.monotonic() + connect_timeout, Unavailable)
        except OSError as e:
            raise Unavailable(f"cannot connect to {self.path}: {e}") from None

    def call(self, cmd: str, args: dict[str, Any] | None = None, timeout: float | None = DEFAULT_TIMEOUT,
             patience: Callable[[], None] | None = None) -> Any:
        """Send one request and return its result; the error reply raised as its RpcError subclass.
        `patience()` is called every PATIENCE_S while the reply is awaited; it may raise to stop waiting (a peer
        that cannot answer, say)."""
        timeout = self.timeout if timeout is DEFAULT_TIMEOUT else timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            rid = next(self._ids)
            try:
                send_all(self.sock, encode({"id": rid, "cmd": cmd, "args": args or {}}), deadline)
                while True:
                    if patience is None:
                        reply = self._read_line(deadline, cmd)
                    else:
                        glance = time.monotonic() + PATIENCE_S
                        try:
                            reply = self._read_line(glance if deadline is None else min(deadline, glance), cmd)
                        except TimeoutError:
                            if deadline is not None and time.monotonic() >= deadline:
                                raise
                            patience()
                            continue
                    if isinstance(reply, dict) and "ok" in reply and reply.get("id") in (rid, None):
                        break  # anything else (an event, a late reply) is not ours
            except TimeoutError:
                raise Timeout(f"{cmd} on {self.path}: no reply within {timeout} s") from None
            except OSError as e:
                raise Unavailable(f"{cmd} on {self.path}: {e}") from None
        if reply["ok"] is True:
            return reply.get("result")
        err = reply.get("error")
        if not isinstance(err, dict):
            raise Unavailable(f"{cmd} on {self.path}: malformed error reply {reply!r:.200}")
        cls = _ERRORS.get(err.get("type"))
        message = str(err.get("message", f"{cmd} failed"))
        raise cls(message) if cls else _OtherError(str(err.get("type")), message)

    def pushed(self, timeout: float | None = None, patience: Callable[[], None] | None = None) -> Any:
        """The next line the server pushed after a `Stream` reply (parsed); None once it closed the
        connection; Timeout when none came within `timeout` seconds. `patience` as for `call`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            try:
                while True:
                    glance = deadline if patience is None else time.monotonic() + PATIENCE_S
                    try:
                        return self._read_line(glance if deadline is None else min(deadline, glance), "stream")
                    except TimeoutError:
                        if patience is None or (deadline is not None and time.monotonic() >= deadline):
                            raise
                        patience()
            except TimeoutError:
                raise Timeout(f"{self.path}: nothing pushed within {timeout} s") from None
            except Unavailable:
                return None

    def _read_line(self, deadline: float | None, cmd: str) -> Any:
        while b"\n" not in self._buf:
            wait_fd(self.sock, select.POLLIN, deadline)
            data = self.sock.recv(65536)
            if not data:
                raise Unavailable(f"{self.path} closed the connection before replying to {cmd!r}")
            self._buf += data
        line, _, rest = bytes(self._buf).partition(b"\n")
        self._buf[:] = rest
        try:
            return json.loads(line)
        except (ValueError, UnicodeDecodeError):
            raise Unavailable(f"{cmd} on {self.path}: unreadable reply {line[:200]!r}") from None

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "RpcClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def call(path: str | os.PathLike, cmd: str, args: dict[str, Any] | None = None, *, timeout: float | None = 5.0,
         connect_timeout: float = 0.0) -> Any:
    """One request on a connection of its own."""
    with RpcClient(path, timeout, connect_timeout) as client:
        return client.call(cmd, args)
