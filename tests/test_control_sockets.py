"""The three control sockets (host, device, guest agent) speak one envelope and fail the same way (issue 9).

Each runs in its own real process; the raw lines below are what a foreign client could send.
"""
from __future__ import annotations

import json
import socket

import pytest

from servicing_helpers import HostRun
from vfkeep import rpc
from vfkeep.device.main import start_device
from vfkeep.guest.agent import spawn_agent
from vfkeep.guest.ring import ChannelLayout, NicChannel
from vfkeep.memory import GuestMemory, MemoryLayout
from vfkeep.proc import end


@pytest.fixture(scope="module")
def host_socket(tmp_path_factory):
    host = HostRun(tmp_path_factory.mktemp("sockets") / "run", nics=0)
    yield host.path
    host.stop()


@pytest.fixture(scope="module")
def device_socket(tmp_path_factory):
    sock = tmp_path_factory.mktemp("sockets") / "nic.sock"
    child = start_device(sock)
    yield f"{sock}.ctl"
    end(child)


@pytest.fixture(scope="module")
def agent_socket(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sockets")
    layout, channel = MemoryLayout(guest_pages=64, worker_pages=4, pool_pages=0), ChannelLayout(nics=1, slots=16)
    mem = GuestMemory.create(layout)
    ch = NicChannel.create(mem, channel, 0)
    child = spawn_agent(mem, layout, channel, 0, *ch.bell_fds(), str(tmp / "agent.sock"), str(tmp))
    yield str(tmp / "agent.sock")
    end(child)
    ch.close()
    mem.close()


SOCKETS = ["host_socket", "device_socket", "agent_socket"]


def exchange(path: str, data: bytes, then_wait: float = 0.3) -> tuple[dict, bytes | None]:
    """Send `data` on a fresh connection: the first reply (lines without "ok", such as the host's greeting, are
    not replies), and the next line within `then_wait` seconds (b"" = the server closed the connection, None =
    nothing came)."""
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(path)
        s.settimeout(10)
        try:
            s.sendall(data)
        except BrokenPipeError:  # an oversized line: the server answered and closed before reading it all
            pass
        f = s.makefile("rb")
        reply = json.loads(f.readline())
        while "ok" not in reply:  # a greeting (the host's): not a reply
            reply = json.loads(f.readline())
        s.settimeout(then_wait)
        try:
            rest = f.readline()
        except ConnectionResetError:  # closed with bytes of ours unread (Linux AF_UNIX says so with a reset)
            rest = b""
        except TimeoutError:
            rest = None
        return reply, rest


def normalized(reply: dict) -> dict:
    """The reply without the socket's own list of commands."""
    out = json.loads(json.dumps(reply))
    out["error"]["message"] = out["error"]["message"].partition("; known: ")[0]
    return out


@pytest.mark.parametrize("sock", SOCKETS)
def test_malformed_request(sock, request):
    path = request.getfixturevalue(sock)
    reply, rest = exchange(path, b"{not json\n")
    assert reply["id"] is None and reply["ok"] is False and reply["error"]["type"] == "BadRequest"
    assert reply == exchange(request.getfixturevalue("device_socket"), b"{not json\n")[0]
    assert rest is None  # the connection goes on
    reply, _ = exchange(path, b'{"id": 3, "cmd": "status", "rate": 1}\n')  # arguments outside "args"
    assert reply["id"] == 3 and reply["error"]["type"] == "BadRequest"


@pytest.mark.parametrize("sock", SOCKETS)
def test_unknown_command(sock, request):
    reply, _ = exchange(request.getfixturevalue(sock), b'{"id": "a", "cmd": "reboot", "args": {}}\n')
    assert normalized(reply) == {"id": "a", "ok": False,
                                 "error": {"type": "UnknownCommand", "message": "unknown command 'reboot'"}}
    assert "known: " in reply["error"]["message"]


@pytest.mark.parametrize("sock", SOCKETS)
def test_oversized_line_is_answered_then_the_connection_closed(sock, request):
    reply, rest = exchange(request.getfixturevalue(sock), b"x" * (rpc.MAX_LINE + 10) + b"\n", then_wait=10)
    assert reply == {"id": None, "ok": False,
                     "error": {"type": "RequestTooLarge", "message": f"request line longer than {rpc.MAX_LINE} bytes"}}
    assert rest == b""


@pytest.mark.parametrize("sock, cmd", [("host_socket", "status"), ("device_socket", "ping"),
                                       ("agent_socket", "status")])
def test_one_client_for_all_three(sock, cmd, request):
    with rpc.RpcClient(request.getfixturevalue(sock)) as c:
        assert isinstance(c.call(cmd), dict)
        with pytest.raises(rpc.BadArguments):
            c.call(cmd, {"no_such_argument": 1})
