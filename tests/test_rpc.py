"""The JSON-lines RPC layer (vfkeep.rpc): codec and dispatch without sockets, both servers, the client."""
from __future__ import annotations

import json
import logging
import socket
import threading

import pytest

from vfkeep import rpc
from vfkeep.vfio_user.loop import EventLoop

log = logging.getLogger("test.rpc")


class Nope(Exception):
    pass


def _dispatcher() -> rpc.Dispatcher:
    def add(a: int, b: int = 0) -> int:
        if not isinstance(a, int):
            raise Nope(f"a {a!r} is not an integer")
        return a + b

    def boom():
        raise ZeroDivisionError("bug")

    return rpc.Dispatcher(log, {"add": add, "boom": boom, "none": lambda: None}, refused=(Nope,))


def handle(line: bytes | None) -> dict:
    return _dispatcher().handle(line)


def test_a_request_gets_its_result_and_its_id_back():
    assert handle(b'{"id": 7, "cmd": "add", "args": {"a": 2, "b": 3}}') == {"id": 7, "ok": True, "result": 5}
    assert handle(b'{"cmd": "add", "args": {"a": 1}}') == {"id": None, "ok": True, "result": 1}
    assert handle(b'{"cmd": "none"}') == {"id": None, "ok": True, "result": None}


@pytest.mark.parametrize("line, rid, error_type, text", [
    (b"not json", None, "BadRequest", "not JSON"),
    (b"\xff\xfe", None, "BadRequest", "not JSON"),
    (b"[1, 2]", None, "BadRequest", "JSON object"),
    (b'{"id": 1}', 1, "BadRequest", '"cmd": NAME'),
    (b'{"id": 2, "cmd": "add", "args": [1]}', 2, "BadRequest", '"args"'),
    (b'{"id": 3, "cmd": "add", "a": 1}', 3, "BadRequest", '"args"'),  # arguments belong in "args"
    (b'{"id": [3], "cmd": "add"}', None, "BadRequest", '"id"'),
    (b'{"id": 4, "cmd": "fly"}', 4, "UnknownCommand", "unknown command 'fly'; known: add, boom, none"),
    (b'{"id": 5, "cmd": "add", "args": {"c": 1}}', 5, "BadArguments", "add: missing a required argument: 'a'"),
    (b'{"id": 6, "cmd": "add", "args": {"a": 1, "z": 2}}', 6, "BadArguments", "unexpected keyword argument 'z'"),
    (b'{"id": 7, "cmd": "add", "args": {"a": "x"}}', 7, "Refused", "add: a 'x' is not an integer"),
    (b'{"id": 8, "cmd": "boom"}', 8, "InternalError", "boom: internal error: ZeroDivisionError('bug')"),
    (None, None, "RequestTooLarge", f"longer than {rpc.MAX_LINE} bytes"),
])
def test_every_failure_is_one_structured_error(line, rid, error_type, text):
    reply = handle(line)
    assert reply["id"] == rid and reply["ok"] is False and set(reply) == {"id", "ok", "error"}
    assert reply["error"]["type"] == error_type and text in reply["error"]["message"], reply


def test_a_commands_signature_is_taken_once_when_it_is_registered(monkeypatch):
    """Arguments are checked against the signature taken at registration, not one computed per request (a
    reset path's `set_reset_method` is in its window)."""
    import inspect
    dispatcher = _dispatcher()
    taken = []
    signature = inspect.signature
    monkeypatch.setattr(inspect, "signature", lambda fn: taken.append(fn) or signature(fn))
    assert dispatcher.handle(b'{"id": 1, "cmd": "add", "args": {"a": 1, "b": 2}}')["result"] == 3
    assert dispatcher.handle(b'{"id": 2, "cmd": "add", "args": {"c": 1}}')["error"]["type"] == "BadArguments"
    assert taken == []
    dispatcher.register("sub", lambda a, b: a - b)
    assert len(taken) == 1 and dispatcher.handle(b'{"cmd": "sub", "args": {"a": 3, "b": 1}}')["result"] == 2


@pytest.fixture
def threaded(tmp_path):
    server = rpc.ThreadedServer(str(tmp_path / "t.sock"), _dispatcher())
    server.start(poll_interval=0.05)
    yield server.path
    server.close()


@pytest.fixture
def looped(tmp_path):
    loop = EventLoop()
    server = rpc.LoopServer(tmp_path / "l.sock", loop, _dispatcher())
    thread = threading.Thread(target=loop.run, daemon=True)
    thread.start()
    yield server.path
    loop.stop()
    thread.join(5)
    server.close()
    loop.close()


@pytest.mark.parametrize("server", ["threaded", "looped"])
def test_both_servers_answer_pipelined_requests_in_order_and_close_on_an_oversized_line(server, request):
    path = request.getfixturevalue(server)
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(path)
        f = s.makefile("rwb")
        f.write(b'{"id": 1, "cmd": "add", "args": {"a": 1}}\n\n{"id": 2, "cmd": "fly"}\nnot json\n'
                b'{"id": 3, "cmd": "add", "args": {"a": 3}}\n')
        f.flush()
        replies = [json.loads(f.readline()) for _ in range(4)]
        assert [(r["id"], r["ok"]) for r in replies] == [(1, True), (2, False), (None, False), (3, True)]
        f.write(b"x" * rpc.MAX_LINE + b"\n")
        f.flush()
        assert json.loads(f.readline())["error"]["type"] == "RequestTooLarge"
        try:
            assert f.readline() == b""  # closed ...
        except ConnectionResetError:
            pass  # ... before it read the newline: AF_UNIX tells a peer whose bytes were left unread so
    with rpc.RpcClient(path) as c:  # the server goes on
        assert c.call("add", {"a": 4, "b": 5}) == 9


@pytest.mark.parametrize("server", ["threaded", "looped"])
def test_client_raises_the_error_type_of_the_reply(server, request):
    path = request.getfixturevalue(server)
    with rpc.RpcClient(path) as c:
        with pytest.raises(rpc.UnknownCommand, match="known: add"):
            c.call("fly")
        with pytest.raises(rpc.BadArguments):
            c.call("add")
        with pytest.raises(rpc.Refused, match="not an integer") as e:
            c.call("add", {"a": "x"})
        assert e.value.type == "Refused" and isinstance(e.value, rpc.RpcError)
        assert c.call("add", {"a": 1}) == 1  # same connection


def _fake_server(path: str, reply_lines: list[bytes]) -> threading.Thread:
    """Accepts one connection, reads one request, writes `reply_lines`, closes."""
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(1)

    def serve():
        conn, _ = srv.accept()
        conn.makefile("rb").readline()
        conn.sendall(b"".join(reply_lines))
        conn.close()
        srv.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return t


def test_client_skips_events_and_replies_that_are_not_its_own(tmp_path):
    """Room for issue 17: a greeting or an event line before the reply is not taken for the answer."""
    path = str(tmp_path / "f.sock")
    t = _fake_server(path, [b'{"event": "hello", "version": 2}\n', b'{"id": 99, "ok": true, "result": "late"}\n',
                            b'{"id": 1, "ok": true, "result": "mine"}\n'])
    assert rpc.call(path, "x") == "mine"
    t.join(5)


@pytest.mark.parametrize("lines", [[b'{"id": 1, "ok": true, "res'], [b"[1, 2]\n"], [b'{"id": 1, "ok": false}\n']])
def test_torn_or_malformed_reply_is_unavailable(tmp_path, lines):
    path = str(tmp_path / "f.sock")
    t = _fake_server(path, lines)
    with pytest.raises(rpc.Unavailable):
        rpc.call(path, "x", timeout=2)
    t.join(5)


def test_client_unavailable_and_timeout(tmp_path):
    with pytest.raises(rpc.Unavailable, match="cannot connect"):
        rpc.call(tmp_path / "none.sock", "ping")
    silent = socket.socket(socket.AF_UNIX)
    silent.bind(str(tmp_path / "silent.sock"))
    silent.listen(1)  # accepts (backlog) but never answers
    with pytest.raises(rpc.Timeout, match="no reply within 0.2 s"):
        rpc.call(tmp_path / "silent.sock", "ping", timeout=0.2)
    silent.close()
    assert issubclass(rpc.Timeout, rpc.Unavailable) and issubclass(rpc.Unavailable, rpc.RpcError)


def test_client_waits_for_a_server_that_is_starting(tmp_path):
    path = str(tmp_path / "late.sock")
    server: list[rpc.ThreadedServer] = []

    def start_later():
        server.append(rpc.ThreadedServer(path, _dispatcher()))
        server[0].start(poll_interval=0.05)

    timer = threading.Timer(0.2, start_later)
    timer.start()
    try:
        assert rpc.call(path, "add", {"a": 2}, connect_timeout=10) == 2
    finally:
        timer.join()
        server[0].close()
