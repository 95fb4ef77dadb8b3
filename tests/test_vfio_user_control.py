"""Control channel: JSON lines next to the vfio-user socket (DESIGN D6)."""
from __future__ import annotations

import json
import socket

import pytest

from vfkeep import rpc
from vfkeep.vfio_user import control_call


def test_builtin_commands(vfio_testdev):
    sock, proc = vfio_testdev(reset_method="flr")
    ctl = f"{sock}.ctl"
    assert control_call(ctl, "ping") == {"pid": proc.pid}
    assert control_call(ctl, "epoch") == {"epoch": 0, "connected": False}
    assert control_call(ctl, "get_reset_method")["value"] == "flr"


def test_errors_are_replies_and_the_connection_goes_on(vfio_testdev):
    sock, _ = vfio_testdev()
    s = socket.socket(socket.AF_UNIX)
    s.connect(f"{sock}.ctl")
    f = s.makefile("rwb")
    lines = [b"not json", b"[1, 2]", b'{"no": "cmd"}', b'{"cmd": "nope"}', b'{"cmd": "ping", "args": {"extra": 1}}',
             b'{"cmd": "set_reset_method", "args": {"value": 3}}', b'{"cmd": "raise_irq", "args": {"vector": 99}}',
             b'{"id": 8, "cmd": "ping"}']
    f.write(b"\n".join(lines) + b"\n")  # pipelined: answered in order
    f.flush()
    replies = [json.loads(f.readline()) for _ in lines]
    assert [r["ok"] for r in replies] == [False] * 7 + [True] and replies[7]["id"] == 8
    assert [r["error"]["type"] for r in replies[:7]] == ["BadRequest"] * 3 + ["UnknownCommand", "BadArguments",
                                                                              "Refused", "Refused"]
    assert "unknown command 'nope'" in replies[3]["error"]["message"] and "ping" in replies[3]["error"]["message"]
    assert "vector 99" in replies[6]["error"]["message"]
    s.close()


def test_several_clients_at_once(vfio_testdev):
    sock, _ = vfio_testdev()
    conns = [socket.socket(socket.AF_UNIX) for _ in range(5)]
    for c in conns:
        c.connect(f"{sock}.ctl")
    for i, c in enumerate(reversed(conns)):
        c.sendall(json.dumps({"cmd": "raise_irq", "args": {"vector": i % 4}}).encode() + b"\n")
    for c in conns:
        assert json.loads(c.makefile("rb").readline())["ok"]
        c.close()
    assert control_call(f"{sock}.ctl", "state")["pending"] == [0, 1, 2, 3]


def test_client_errors(tmp_path):
    with pytest.raises(rpc.Unavailable):
        control_call(tmp_path / "none.ctl", "ping", timeout=0.05)
    silent = socket.socket(socket.AF_UNIX)
    silent.bind(str(tmp_path / "silent.ctl"))
    silent.listen(1)  # accepts (backlog) but never answers
    with pytest.raises(rpc.Timeout):
        control_call(tmp_path / "silent.ctl", "ping", timeout=0.2)
    silent.close()
