"""Guest traffic agent as a real process: pacing, loss accounting, a 'servicing' pause, control protocol, exit.

A reflector process stands in for worker + device: it pops the guest->worker ring and pushes each
frame back on the worker->guest ring with its MACs swapped, as the loopback backend does.
"""
import json
import os
import signal
import socket
import sys
import time

import pytest

from helpers import LineChild, wait_for
from vfkeep import rpc
from vfkeep.guest.agent import TXQUEUELEN, AgentClient, AgentError, guest_mac, spawn_agent
from vfkeep.guest.ring import ChannelLayout, NicChannel
from vfkeep.guest.stats import parse_frame
from vfkeep.memory import GuestMemory, MemoryLayout
from vfkeep.proc import end

LAYOUT = MemoryLayout(guest_pages=1040, worker_pages=4, pool_pages=0)
#: 4096 slots hold 2 s at 2k frames/s: the 300 ms pause below plus however late a loaded machine runs the
#: successor (1024 slots, 0.5 s, overflowed at load 10: the gap was 0.6 s).
CHANNEL = ChannelLayout(nics=1, slots=4096, slot_size=256)

REFLECTOR = r"""
import json, os, select, signal, sys, time
from vfkeep.guest.ring import ChannelLayout, NicChannel
from vfkeep.memory import GuestMemory, MemoryLayout

opt = json.loads(sys.argv[1])
wake_r, wake_w = os.pipe()
os.set_blocking(wake_w, False)
signal.set_wakeup_fd(wake_w)  # SIGTERM wakes the select below; the handler itself does nothing
signal.signal(signal.SIGTERM, lambda *_: None)
mem = GuestMemory.attach(opt["memfd"], MemoryLayout.from_str(opt["layout"]))
ch = NicChannel.attach(mem, ChannelLayout.from_str(opt["channel"]), 0, opt["tx_fd"], opt["rx_fd"])
print("ready", flush=True)
if opt.get("after_pid"):  # prelaunched successor: take over pause_ms after the predecessor exited
    pidfd = os.pidfd_open(opt["after_pid"])
    select.select([pidfd], [], [])
    time.sleep(opt["pause_ms"] / 1000)
    while opt.get("go_file") and not os.path.exists(opt["go_file"]):  # and once the test says so
        time.sleep(0.001)
    print("resumed", time.monotonic_ns(), flush=True)
handled = forwarded = dropped = 0
first_ns = last_ns = None
limit = opt.get("exit_after") or float("inf")
reported = not opt.get("report_after")

def relay(frames):
    global handled, forwarded, dropped, first_ns, last_ns
    out = []
    for f in frames:
        handled += 1
        if opt.get("drop_every") and handled % opt["drop_every"] == 0:
            dropped += 1
            continue
        out.append(f[6:12] + f[0:6] + f[12:])
    forwarded += ch.rx.push_many(out)
    last_ns = time.monotonic_ns()
    first_ns = first_ns or last_ns

while handled < limit:
    if select.select([wake_r], [], [], 0)[0]:
        relay(ch.tx.pop_many(ch.tx.slots))  # terminated: hand on what is queued, then stop
        break
    room = ch.rx.free_slots  # take no more than the guest's rx ring holds: this stand-in drops nothing there
    if not room:
        time.sleep(0.001)
        continue
    frames = ch.tx.pop_many(int(min(256, room, limit - handled)))
    if frames:
        relay(frames)
        if not reported and handled >= opt["report_after"]:
            reported = True
            print("report", flush=True)
        continue
    select.select([ch.tx.doorbell.fd, wake_r], [], [])
    ch.tx.doorbell.clear()
print(json.dumps({"handled": handled, "forwarded": forwarded, "dropped": dropped,
                  "first_ns": first_ns, "last_ns": last_ns}), flush=True)
"""


class Reflector(LineChild):
    """The reflector script in a child process, standing in for worker + device."""

    what = "reflector"

    def __init__(self, mem, ch, **opt):
        tx_fd, rx_fd = ch.bell_fds()
        opt.update(memfd=mem.fd, layout=LAYOUT.to_str(), channel=CHANNEL.to_str(), tx_fd=tx_fd, rx_fd=rx_fd)
        super().__init__([sys.executable, "-c", REFLECTOR, json.dumps(opt)], pass_fds=(mem.fd, tx_fd, rx_fd))

    def finish(self) -> dict:
        """SIGTERM, then its final counters; it hands on what is queued before exiting."""
        self.proc.send_signal(signal.SIGTERM)
        return self.counters()

    def counters(self) -> dict:
        result = json.loads(self.line())
        assert self.proc.wait(5) == 0
        return result


@pytest.fixture
def env(tmp_path):
    """Host side: guest memory, one NIC channel, the agent process and its client; every child ended by PID."""
    mem = GuestMemory.create(LAYOUT)
    ch = NicChannel.create(mem, CHANNEL, 0)
    sock = str(tmp_path / "agent.sock")
    agent = spawn_agent(mem, LAYOUT, CHANNEL, 0, *ch.bell_fds(), sock, str(tmp_path))
    client = AgentClient(sock)
    reflectors: list[Reflector] = []

    def reflector(**opt) -> Reflector:
        r = Reflector(mem, ch, **opt)
        reflectors.append(r)
        assert r.line() == "ready"
        return r

    yield mem, ch, agent, client, reflector, sock
    client.close()
    for r in reflectors:
        end(r.proc)
        r.proc.stdout.close()
    end(agent)
    ch.close()
    mem.close()


def test_steady_traffic_all_delivered(env):
    mem, ch, agent, client, reflector, _ = env
    r = reflector(report_after=2000)
    client.start(rate=2000, size=128)
    assert r.line() == "report"  # ~1 s of traffic went round
    client.stop()
    st = client.stats(settle_ms=5000)
    assert st["settled"] and st["sent"] >= 2000
    assert st["received"] == st["sent"] and st["lost"] == st["frames_lost"] == 0
    assert (st["duplicated"], st["reordered"], st["unknown"]) == (0, 0, 0)
    assert st["rtt_ms"]["p50"] > 0  # (how short the RTT and the longest gap are is for benchmarks/: load decides)
    assert st["agent"]["tx_ring_full"] == st["rings"]["tx"]["dropped_full"] == 0
    assert st["rings"]["tx"]["tail"] == st["rings"]["rx"]["head"] == st["sent"]
    tl = client.timeline(bin_ms=100)
    assert sum(b["sent"] for b in tl["bins"]) == st["sent"]
    assert sum(b["delivered"] for b in tl["bins"]) == st["received"]
    assert tl["bins"][0]["rtt_p50_ms"] is not None
    assert r.finish()["forwarded"] == st["sent"]


def test_servicing_pause_queues_frames_then_delivers_them(env, tmp_path):
    """The relay stops (its process exits), a prelaunched successor takes over 300 ms later: the
    guest's frames wait in the ring, arrive in order, nothing is lost, and the blackout is the pause.
    The successor also waits until the guest sent 400 frames into the pause (200 ms of its pacing): a sender
    starved of CPU for most of a fixed pause sent fewer, and its first frame came so late that the successor's
    deliveries fell into the pause's early bins."""
    mem, ch, agent, client, reflector, _ = env
    go = tmp_path / "go"
    old = reflector(exit_after=600)
    new = reflector(after_pid=old.proc.pid, pause_ms=300, report_after=600, go_file=str(go))
    client.start(rate=2000, size=128)
    stopped = old.counters()  # exits by itself after 600 frames (~0.3 s in)
    client.mark("service-start", t_ns=stopped["last_ns"])
    wait_for(lambda: client.stats(since_mark="service-start")["sent"] > 400, 30)
    go.touch()
    resumed_ns = int(new.line().split()[1])
    client.mark("service-end", t_ns=resumed_ns)
    assert new.line() == "report"  # traffic flows through the new one
    client.stop()
    st = client.stats(settle_ms=5000)
    assert st["settled"] and st["lost"] == 0 and st["received"] == st["sent"]
    assert st["duplicated"] == 0 and st["reordered"] == 0
    # The blackout is the relay's gap: at least the 300 ms pause, and it ends with the first delivery after the
    # successor resumed (how much longer than the pause depends on how late a loaded machine runs it).
    assert st["blackout_ms"] >= 250 and st["blackout_start_ns"] < resumed_ns <= st["blackout_end_ns"], st
    assert st["rings"]["tx"]["dropped_full"] == 0
    window = client.stats(since_mark="service-start", until_mark="service-end")
    assert window["sent"] > 400 and window["lost"] == 0  # sent while no relay ran, delivered afterwards
    assert window["blackout_ms"] >= 250 and window["blackout_start_ns"] >= stopped["last_ns"]
    assert window["blackout_end_ns"] >= resumed_ns
    assert [m["label"] for m in client.marks()] == ["service-start", "service-end"]
    tl = client.timeline(bin_ms=50, since_mark="service-start")
    assert tl["marks"][0]["t_ms"] <= 0 and tl["bins"][1]["delivered"] == 0  # the pause, seen in the plot data
    assert new.finish()["handled"] == st["sent"] - stopped["handled"]


def test_every_drop_is_counted(env):
    mem, ch, agent, client, reflector, _ = env
    r = reflector(drop_every=10, report_after=1000)
    client.start(rate=2000, size=96)
    assert r.line() == "report"
    client.stop()
    counted = r.finish()  # hands on everything still queued first
    # The dropped frames never come (each reading waits its whole 100 ms); the agent, starved on a loaded machine,
    # may take a while to record the last frames the reflector forwarded.
    deadline = time.monotonic() + 15
    while (st := client.stats(settle_ms=100))["received"] < counted["forwarded"]:
        assert time.monotonic() < deadline, (st, counted)
    assert not st["settled"]
    assert st["sent"] == counted["handled"] and st["received"] == counted["forwarded"]
    assert counted["dropped"] > 0 and st["frames_lost"] == counted["dropped"]
    assert all(seq % 10 == 9 for seq in st["lost_seqs"])
    assert st["lost_tx_ring_full"] == 0


def test_ring_full_is_counted_not_silent(env):
    """No relay: the ring fills, further frames are refused, counted by the ring and the agent and reported lost;
    once something drains the ring the queued frames arrive and stats does not wait for the refused ones."""
    mem, ch, agent, client, reflector, _ = env
    client.start(rate=20000, size=64)
    deadline = time.monotonic() + 10
    while client.status()["tx_ring_full"] < 100:
        assert time.monotonic() < deadline, "the ring never filled"
        time.sleep(0.01)
    client.stop()
    st = client.stats()
    refused = st["sent"] - CHANNEL.slots
    assert st["lost"] == st["sent"] and st["received"] == 0
    assert st["lost_tx_ring_full"] == st["agent"]["tx_ring_full"] == st["rings"]["tx"]["dropped_full"] == refused
    assert st["lost_seqs_truncated"] and len(st["lost_seqs"]) == 1000
    frames = ch.tx.pop_many(CHANNEL.slots)  # the test relays the queued frames back itself
    assert [parse_frame(f).seq for f in frames] == list(range(CHANNEL.slots))
    assert ch.rx.push_many(frames) == CHANNEL.slots
    t0 = time.monotonic()
    st = client.stats(settle_ms=10_000)
    assert st["settled"] and time.monotonic() - t0 < 5
    assert st["received"] == CHANNEL.slots and st["frames_lost"] == refused


def _blocked(client) -> dict:
    """Wait until the blocking sender is blocked: ring full, guest queue full, frames given up."""
    deadline = time.monotonic() + 10
    while (st := client.status())["backpressured"] == 0:
        assert time.monotonic() < deadline, "the blocking sender never blocked"
        time.sleep(0.01)
    return st


def test_blocking_sender_queues_then_delivers_everything_it_sent(env):
    """Backpressure: with no relay the tx ring fills, then the guest queue, then the sender blocks; nothing is
    refused. Once a relay drains the ring, every frame sent arrives, in order: the frames the blocked sender
    did not send are counted as backpressured (delayed), not lost."""
    mem, ch, agent, client, reflector, _ = env
    client.start(rate=20000, size=64, backpressure=True)
    st = _blocked(client)
    assert st["guest_queue"] == TXQUEUELEN and st["tx_ring_full"] == 0 and st["backpressure"]
    assert st["rings"]["tx"]["used"] == CHANNEL.slots and st["rings"]["tx"]["dropped_full"] == 0
    r = reflector()
    deadline = time.monotonic() + 10
    while client.status()["guest_queue"]:
        assert time.monotonic() < deadline, "the guest queue never drained"
        time.sleep(0.01)
    client.stop()
    st = client.stats(settle_ms=5000)
    assert st["settled"] and st["lost"] == st["frames_lost"] == 0 and st["received"] == st["sent"], \
        {k: st[k] for k in ("settled", "lost", "sent", "received", "lost_seqs", "agent", "rings")}
    assert st["reordered"] == st["duplicated"] == 0
    assert st["lost_tx_ring_full"] == st["lost_guest_queue"] == st["rings"]["tx"]["dropped_full"] == 0
    assert st["backpressured"] == st["agent"]["backpressured"] > 0
    assert r.finish()["forwarded"] == st["sent"]


def test_blocking_sender_stopped_on_a_stuck_ring_purges_its_queue_counted(env):
    """Stopping a blocked sender whose ring never drains discards its guest queue after STOP_FLUSH_S, as an
    interface reset purges a qdisc: those frames are lost and counted (`lost_guest_queue`), the newest seqs."""
    mem, ch, agent, client, reflector, _ = env
    client.start(rate=20000, size=64, backpressure=True)
    _blocked(client)
    client.stop()
    st = client.stats()
    assert st["agent"]["guest_queue"] == 0 and st["agent"]["guest_queue_purged"] == TXQUEUELEN
    assert st["lost_guest_queue"] == TXQUEUELEN and st["lost_tx_ring_full"] == 0
    assert st["sent"] == CHANNEL.slots + TXQUEUELEN
    frames = ch.tx.pop_many(CHANNEL.slots)  # the test relays the ring's frames back itself
    assert ch.rx.push_many(frames) == CHANNEL.slots
    st = client.stats(settle_ms=10_000)
    assert st["received"] == CHANNEL.slots and st["frames_lost"] == TXQUEUELEN
    assert st["lost_seqs_truncated"] is False and st["lost_seqs"] == list(range(CHANNEL.slots, st["sent"]))


def test_bad_control_input_gets_error_and_agent_keeps_running(env):
    mem, ch, agent, client, reflector, sock = env
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(sock)
        f = s.makefile("rwb")

        def ask(raw: bytes) -> dict:
            f.write(raw + b"\n")
            f.flush()
            return json.loads(f.readline())

        for raw, msg in [(b"not json", "not JSON"), (b"[1, 2]", "JSON object"), (b'{"cmd": "fly"}', "unknown command"),
                         (b'{"cmd": "start", "args": {"rate": -5, "size": 128}}', "rate -5"),
                         (b'{"cmd": "start", "args": {"rate": 100, "size": 10}}', "size 10"),
                         (b'{"cmd": "start", "args": {"rate": 100, "size": 4000}}', "slot payload"),
                         (b'{"cmd": "stats", "args": {"since_mark": "nope"}}', "no mark named 'nope'"),
                         (b'{"cmd": "stats", "args": {"since": 5}}', "unexpected keyword argument 'since'"),
                         (b'{"cmd": "stats", "args": {"settle_ms": "x"}}', "settle_ms"),
                         (b'{"cmd": "timeline", "args": {"bin_ms": 0}}', "bin_ms"),
                         (b'{"cmd": "mark", "args": {"label": ""}}', "label"), (b"\xff\xfe", "not JSON")]:
            reply = ask(raw)
            assert reply["ok"] is False and msg in reply["error"]["message"], (raw, reply)
        assert ask(b'{"cmd": "status"}')["ok"] is True  # same connection still served
    with pytest.raises(rpc.UnknownCommand, match="unknown command"):
        client.call("fly")
    assert client.mark("m1") > 0 and client.status()["running"] is False
    assert agent.poll() is None


def test_quit_exits_and_removes_socket(env, tmp_path):
    mem, ch, agent, client, reflector, sock = env
    client.start(rate=1000, size=64)
    client.quit()
    assert agent.wait(5) == 0
    assert not os.path.exists(sock)
    assert "traffic agent exited" in (tmp_path / "guest-agent-0.log").read_text()


def test_sigterm_exits_cleanly(env):
    mem, ch, agent, client, reflector, sock = env
    client.start(rate=1000, size=64)
    agent.send_signal(signal.SIGTERM)
    assert agent.wait(5) == 0
    assert not os.path.exists(sock)


def test_spawn_reports_an_agent_that_dies(tmp_path):
    mem = GuestMemory.create(LAYOUT)  # no channel formatted: attaching fails
    bells = (os.eventfd(0), os.eventfd(0))
    try:
        with pytest.raises(AgentError, match="exited with status 2"):
            spawn_agent(mem, LAYOUT, CHANNEL, 0, *bells, str(tmp_path / "a.sock"), str(tmp_path))
        assert "BadRingHeader" in (tmp_path / "guest-agent-0.log").read_text()
    finally:
        for fd in bells:
            os.close(fd)
        mem.close()


def test_frames_survive_the_loopback_mac_swap(env):
    mem, ch, agent, client, reflector, _ = env
    client.start(rate=500, size=64)
    assert ch.tx.wait(5)
    raw = ch.tx.pop()
    client.stop()
    sent = parse_frame(raw)
    assert sent.src_mac == guest_mac(0) and sent.size == 64
    back = parse_frame(raw[6:12] + raw[0:6] + raw[12:])  # the CRC leaves the MACs out
    assert back.dst_mac == guest_mac(0) and back.seq == sent.seq


def test_client_torn_reply_is_an_rpc_error(tmp_path):
    """An agent that dies mid-reply leaves a torn line: an RpcError (which the host's servicing window
    handles), not a ValueError escaping into the servicing result."""
    import threading

    path = str(tmp_path / "torn.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(2)

    def serve():
        for reply in (b'{"ok": true, "sent', b"[1, 2]\n"):
            conn, _ = srv.accept()
            conn.makefile("rb").readline()
            conn.sendall(reply)
            conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        for _ in range(2):
            with AgentClient(path, timeout=5) as c:
                with pytest.raises(rpc.RpcError):
                    c.call("status")
    finally:
        t.join(5)
        srv.close()
