"""A restarted relay says when the guest's traffic is back (`NetRelay.resumed`), and the rest of the worker's start
waits for that: a data-path keepalive's deferred HWC probe, the monitors and the `started` reply (issue 10: the
probe's requests, and the host's work and the old worker's exit that the reply sets off, competed with the relay's
first frames for the CPUs inside the guest's blackout).

The relay runs over a real driver and the in-process emulator (loopback backend), as in test_relay_drops."""
from __future__ import annotations

import logging
import threading
import time

from driver_helpers import numbered_frames
from test_relay_drops import LAYOUT, relay_bench, wait_tx_taken  # noqa: F401 (the fixture and the memory it needs)
from vfkeep.gdma.codec import CQ_EQ_DOORBELL
from vfkeep.gdma.constants import DB_CQ, DB_EQ, DB_SQ, EMU_DB_PAGE_SIZE
from vfkeep.paravisor import mana_kind, net_relay
from vfkeep.paravisor.mana_kind import ManaKind
from vfkeep.paravisor.vf_manager import VfManager


def noting_the_wait(relay) -> threading.Event:
    """An event set when the relay starts waiting for the device's answer to its first send (`_await_answer`)."""
    waiting = threading.Event()
    await_answer = relay._await_answer

    def noting(answer):
        waiting.set()
        await_answer(answer)
    relay._await_answer = noting
    return waiting

def test_resumed_once_the_guest_frames_waiting_at_the_start_came_back(relay_bench):
    relay, channel, _ = relay_bench(slots=16)
    assert channel.tx.push_many(numbered_frames(12)) == 12  # the guest sent while no relay ran
    relay.start()
    assert relay.resumed.wait(5)
    assert len(channel.rx) > 0  # set by the pass that handed the looped-back frames to the guest
    relay.stop()


def test_resumed_when_there_is_nothing_to_relay(relay_bench):
    relay, channel, _ = relay_bench()
    relay.start()
    assert relay.resumed.wait(5)
    assert len(channel.rx) == 0 and relay.stats.tx_frames == 0
    relay.stop()


def test_not_resumed_while_its_sends_are_outstanding(relay_bench):
    """Nothing comes back (the vport stopped behind the driver's back): the relay goes idle with its sends
    outstanding, which is not a resumed data path (those frames are the guest's blackout end); whoever waits
    uses its timeout. Stopping sets it."""
    relay, channel, bench = relay_bench()
    bench.device.vports[0].stop()
    assert channel.tx.push_many(numbered_frames(4)) == 4
    relay.start()
    assert not relay.resumed.wait(0.3)
    assert relay.stats.tx_frames == 4 and len(channel.rx) == 0
    relay.abandon()
    assert relay.resumed.is_set()


def test_resumed_once_stopped_even_if_never_started(relay_bench):
    """Whoever waits for a relay stopped early must not wait for its timeout."""
    relay, _, _ = relay_bench()
    relay.stop()
    assert relay.resumed.is_set()


class _Relay:
    def __init__(self):
        self.resumed = threading.Event()


class _Vf:
    """A VF manager that records its calls in `events`, with its relay resuming after `resume_s` (never: None)."""

    def __init__(self, name: str, events: list, resume_s: float | None):
        self.name, self.events, self.resume_s = name, events, resume_s
        self.relay = _Relay()

    def start_traffic(self, channel_layout):
        self.events.append(("relay started", self.name))
        if self.resume_s is not None:
            threading.Timer(self.resume_s, self.relay.resumed.set).start()

    def wait_resumed(self, deadline):
        return VfManager.wait_resumed(self, deadline)

    def run(self):
        self.events.append(("probe", self.name, self.relay.resumed.is_set()))


def _kind(*vfs: _Vf) -> ManaKind:
    kind = ManaKind([], None, "unused")
    kind.vf_managers = list(vfs)
    return kind


def test_every_relay_starts_before_the_rest_of_the_start_which_waits_for_them():
    """Probes, monitors and the worker's `started` reply (ManaKind.start returns) come after every NIC's relay
    has handed the guest its first frames back: they would take the CPU from the relays' first passes."""
    events = []
    kind = _kind(_Vf("nic0", events, 0.05), _Vf("nic1", events, 0.02))
    kind.start()
    assert events == [("relay started", "nic0"), ("relay started", "nic1"), ("probe", "nic0", True),
                      ("probe", "nic1", True)]


def test_the_start_goes_on_when_a_relay_does_not_resume(monkeypatch):
    monkeypatch.setattr(mana_kind, "RESUME_WAIT_S", 0.01)
    events = []
    _kind(_Vf("nic0", events, None)).start()
    assert events == [("relay started", "nic0"), ("probe", "nic0", False)]


def test_the_first_send_takes_the_oldest_frames_alone_and_hands_them_back_before_the_rest(relay_bench,
                                                                                       monkeypatch):
    """A backlog the guest queued while no relay ran: the first SQ doorbell carries only FIRST_BATCH frames, the
    oldest; the relay waits for the device's answer and hands those frames to the guest (its blackout ends with
    them) before it copies the rest; every frame comes back, in order."""
    monkeypatch.setattr(net_relay, "MODERATION_MS", 10_000)  # the wait ends with the device's answer only
    relay, channel, bench = relay_bench(slots=32)
    vport = bench.device.vports[0]
    vport.stop()  # the device takes the sends once the test restarts the vport
    batches = []  # (frames the device transmitted, frames the guest had back by then)
    sq_doorbell = vport.sq_doorbell
    one_at_a_time = threading.Lock()  # the test's vport.start() and the relay's next doorbell (its answer wakes it)

    def recording():
        with one_at_a_time:
            before, back = bench.device.counters["frames_tx"], len(channel.rx)
            sq_doorbell()
            if bench.device.counters["frames_tx"] != before:
                batches.append((bench.device.counters["frames_tx"] - before, back))
    vport.sq_doorbell = vport.sq.on_doorbell = recording
    waiting = noting_the_wait(relay)
    sent = numbered_frames(30)
    assert channel.tx.push_many(sent) == 30
    relay.start()
    assert waiting.wait(5)
    assert relay.stats.tx_frames == net_relay.FIRST_BATCH  # the rest waits for the device's answer
    vport.start()
    assert relay.resumed.wait(5)
    wait_tx_taken(channel)
    relay.stop()
    assert batches == [(net_relay.FIRST_BATCH, 0), (30 - net_relay.FIRST_BATCH, net_relay.FIRST_BATCH)]
    got = channel.rx.pop_many(32)
    assert [f[12:] for f in got] == [f[12:] for f in sent]


class _Lines(logging.Handler):
    """The relay's log records as they are emitted."""

    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)

    def messages(self) -> list[str]:
        return [r.getMessage() for r in self.records]


def test_the_running_line_is_written_after_the_first_send_with_the_time_the_relay_started(relay_bench):
    """Formatting and writing "relay running" took the restarted relay 0.1-0.2 ms of CPU before its first send,
    inside the guest's blackout: it is written once the guest has frames back, with the time the relay started
    (`mono`, what trace_blackout reads), and once."""
    relay, channel, bench = relay_bench(slots=32)
    lines = _Lines()
    logger = logging.getLogger("vfkeep.worker.relay")
    logger.addHandler(lines)
    level = logger.level
    logger.setLevel(logging.INFO)
    vport = bench.device.vports[0]
    at_first_send = []
    sq_doorbell = vport.sq_doorbell

    def recording():
        if not at_first_send:
            at_first_send.append((time.monotonic_ns(), lines.messages()))
        sq_doorbell()
    vport.sq_doorbell = vport.sq.on_doorbell = recording
    try:
        assert channel.tx.push_many(numbered_frames(20)) == 20
        before = time.monotonic_ns()
        relay.start()
        assert relay.resumed.wait(5)
        wait_tx_taken(channel)
        relay.stop()
    finally:
        logger.removeHandler(lines)
        logger.setLevel(level)
    sent_at, written_by_then = at_first_send[0]
    assert "relay running" not in written_by_then
    running = [r for r in lines.records if r.getMessage() == "relay running"]
    assert len(running) == 1 and before <= running[0].mono <= sent_at
    assert lines.messages().index("relay running") < lines.messages().index("relay resumed")


def test_the_running_line_is_written_by_a_relay_that_never_resumed(relay_bench):
    relay, channel, bench = relay_bench()
    bench.device.vports[0].stop()  # nothing comes back
    lines = _Lines()
    logger = logging.getLogger("vfkeep.worker.relay")
    logger.addHandler(lines)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        assert channel.tx.push_many(numbered_frames(4)) == 4
        relay.start()
        assert not relay.resumed.wait(0.2)
        relay.stop()
    finally:
        logger.removeHandler(lines)
        logger.setLevel(level)
    assert lines.messages().count("relay running") == 1 and "relay resumed" not in lines.messages()


def test_the_first_send_arms_what_answers_it_and_the_wait_for_the_answer_sends_nothing(relay_bench, monkeypatch):
    """The restarted relay's first send goes with the arms of the RX CQ, the TX CQ and the EQ, before its SQ
    doorbell, in one burst: the relay then waits for the device's answer (frames back, or TX completions) without
    a `prepare_wait` — a second burst of doorbells for the device to handle, and 0.1 ms of the relay's CPU, in the
    guest's blackout. Nothing is rung between the first SQ doorbell and the device's answer."""
    monkeypatch.setattr(net_relay, "MODERATION_MS", 10_000)  # the wait ends with the device's answer only
    relay, channel, bench = relay_bench(slots=32)
    vport = bench.device.vports[0]
    vport.stop()  # the device takes the sends once the test restarts the vport
    data = relay.datapath
    ids = {data.queues.tx_cq.id: "tx_cq arm", data.queues.rx_cq.id: "rx_cq arm"}
    rung = []
    doorbell = bench.device.doorbell

    def recording(offset, value):
        queue_offset = offset % EMU_DB_PAGE_SIZE
        if queue_offset == DB_SQ:
            rung.append("sq")
        elif queue_offset in (DB_CQ, DB_EQ) and CQ_EQ_DOORBELL.get(value, "arm"):
            rung.append("eq arm" if queue_offset == DB_EQ else ids[CQ_EQ_DOORBELL.get(value, "id")])
        doorbell(offset, value)
    monkeypatch.setattr(bench.device, "doorbell", recording)
    waits = []
    monkeypatch.setattr(data, "prepare_wait", lambda *a, **k: waits.append(1))
    waiting = noting_the_wait(relay)
    assert channel.tx.push_many(numbered_frames(30)) == 30
    relay.start()
    assert waiting.wait(5)
    first = rung[:rung.index("sq") + 1]
    assert first[-1] == "sq" and {"tx_cq arm", "rx_cq arm", "eq arm"} <= set(first)
    vport.start()
    assert relay.resumed.wait(5)
    relay.stop()
    assert rung[len(first)] != "tx_cq arm" and not waits


def noting_the_guest_wait(relay) -> threading.Event:
    """An event set when the relay starts waiting for the guest to take its first frames back (`_await_guest`)."""
    waiting = threading.Event()
    await_guest = relay._await_guest

    def noting():
        waiting.set()
        await_guest()
    relay._await_guest = noting
    return waiting


def test_the_first_frames_back_go_alone_until_the_guest_has_taken_them(relay_bench, monkeypatch):
    """The guest's first frames back (its blackout end) are handed over alone: the relay sends nothing more — the
    rest of the backlog would keep it and the device busy on the two CPUs the just-woken guest needs — and is not
    `resumed` (the rest of the worker's start waits for that) until the guest has taken them."""
    monkeypatch.setattr(net_relay, "GUEST_TAKE_WAIT_S", 10_000)  # the wait ends when the guest takes them only
    relay, channel, bench = relay_bench(slots=32)
    waiting = noting_the_guest_wait(relay)
    sent = numbered_frames(30)
    assert channel.tx.push_many(sent) == 30
    relay.start()
    assert waiting.wait(5)
    assert len(channel.rx) == net_relay.FIRST_BATCH and len(channel.tx) == 30 - net_relay.FIRST_BATCH
    assert bench.device.counters["frames_tx"] == net_relay.FIRST_BATCH and not relay.resumed.is_set()
    got = channel.rx.pop_many(32)  # the guest takes them
    assert relay.resumed.wait(5)
    wait_tx_taken(channel)
    relay.stop()
    got += channel.rx.pop_many(32)
    assert [f[12:] for f in got] == [f[12:] for f in sent]


def test_a_guest_that_does_not_take_its_first_frames_back_holds_the_rest_only_briefly(relay_bench, monkeypatch):
    monkeypatch.setattr(net_relay, "GUEST_TAKE_WAIT_S", 0.01)
    relay, channel, bench = relay_bench(slots=32)
    assert channel.tx.push_many(numbered_frames(30)) == 30
    relay.start()
    assert relay.resumed.wait(5)
    wait_tx_taken(channel)
    relay.stop()
    assert bench.device.counters["frames_tx"] == 30 and len(channel.rx) == 30


def test_a_stop_ends_the_wait_for_the_guest(relay_bench, monkeypatch):
    """A relay stopped while it waits for the guest to take its first frames stops at once (the stop's eventfd
    ends the wait), and the stop's last batch still sends what the guest queued."""
    monkeypatch.setattr(net_relay, "GUEST_TAKE_WAIT_S", 10_000)
    relay, channel, bench = relay_bench(slots=32)
    waiting = noting_the_guest_wait(relay)
    assert channel.tx.push_many(numbered_frames(30)) == 30
    relay.start()
    assert waiting.wait(5)
    stopping = threading.Thread(target=relay.stop)
    stopping.start()
    stopping.join(5)
    assert not stopping.is_alive() and relay.resumed.is_set()
    assert bench.device.counters["frames_tx"] == 30 and len(channel.tx) == 0


def test_a_pass_with_nothing_received_goes_straight_to_its_send(relay_bench, monkeypatch):
    """A pass polls the RX CQ only when a completion waits in it (`VportDataPath.rx_pending`, one owner byte): a
    restarted relay's first pass — nothing received yet, the guest's backlog waiting — reaches its SQ doorbell
    without a receive's poll and set-up (cold after the handover, 0.05 ms of CPU in the guest's blackout); what
    the vport received meanwhile is still taken first."""
    relay, channel, bench = relay_bench(slots=32)
    data = relay.datapath
    calls = []
    receive_batch, send_blocks = data.receive_batch, data.send_blocks
    monkeypatch.setattr(data, "receive_batch", lambda *a, **k: calls.append("receive") or receive_batch(*a, **k))
    monkeypatch.setattr(data, "send_blocks", lambda *a, **k: calls.append("send") or send_blocks(*a, **k))
    assert channel.tx.push_many(numbered_frames(20)) == 20
    relay.start()
    assert relay.resumed.wait(5)
    wait_tx_taken(channel)
    relay.stop()
    assert calls[0] == "send" and "receive" in calls and len(channel.rx) == 20


def test_frames_the_vport_received_before_the_relay_started_go_first(relay_bench):
    relay, channel, bench = relay_bench(slots=32)
    wire = [bytes([0xEE]) * 60]
    bench.device.deliver(0, wire[0])  # waiting in the RX CQ before the relay's first pass
    assert channel.tx.push_many(numbered_frames(4)) == 4
    relay.start()
    assert relay.resumed.wait(5)
    wait_tx_taken(channel)
    relay.stop()
    got = channel.rx.pop_many(32)
    assert got[0] == wire[0] and len(got) == 5
