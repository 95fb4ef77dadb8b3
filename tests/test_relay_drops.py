"""Forced relay drops: each drop counter of `paravisor/net_relay.py` counts the frames of its cause, exactly,
and every frame the guest sent is delivered or counted (issue 15 item 4: removing a counter must fail here).

A real relay thread over a real driver and the in-process emulator (loopback backend) and guest rings in
guest memory; the guest side is this test. Frames in flight are settled by `stop()` (the relay drains what
the vport holds), or by waiting for the tx ring to empty.
"""
from __future__ import annotations

import time

import pytest

from driver_helpers import InProcessBench, numbered_frames
from vfkeep.driver.mana import ManaDevice
from vfkeep.driver.vport import VportConfig
from vfkeep.guest.ring import SLOT_LEN_SIZE, ChannelLayout, NicChannel, Ring
from vfkeep.memory import DmaManager, MemoryLayout
from vfkeep.paravisor import net_relay
from vfkeep.paravisor.net_relay import NetRelay

LAYOUT = MemoryLayout(guest_pages=64, worker_pages=512, pool_pages=0)


@pytest.fixture
def relay_bench(mem):
    """Factory: (relay, channel, bench) for a ring geometry and a vport config; everything closed after."""
    made = []

    def make(slots: int = 16, slot_size: int = 2048, vport: VportConfig = VportConfig()):
        bench = InProcessBench(mem)
        dev = ManaDevice.new(bench.connect(DmaManager(mem), "nic0"), "nic0")
        data = dev.open_vport(0, vport).data
        channel = NicChannel.create(mem, ChannelLayout(nics=1, slots=slots, slot_size=slot_size), 0)
        relay = NetRelay(channel, data, "nic0")
        made.append((relay, channel, dev, bench))
        return relay, channel, bench

    yield make
    for relay, channel, dev, bench in made:
        relay.stop()
        dev.shutdown()
        channel.close()
        bench.device.close()


def wait_tx_taken(channel, timeout: float = 5.0) -> None:
    """The relay popped every frame of the guest's tx ring."""
    deadline = time.monotonic() + timeout
    while len(channel.tx):
        assert time.monotonic() < deadline, f"relay left {len(channel.tx)} frames in the tx ring"
        channel.tx.doorbell.ring()
        time.sleep(0.002)


def test_rx_dropped_ring_full(relay_bench):
    relay, channel, _ = relay_bench(slots=16)
    relay.start()
    sent = numbered_frames(40)
    for i in range(0, 40, 8):  # the guest never reads its rx ring
        assert channel.tx.push_many(sent[i:i + 8]) == 8
        channel.tx.doorbell.ring()
        wait_tx_taken(channel)
    relay.stop()
    room = len(channel.rx)
    assert 0 < room <= 16
    assert relay.stats.tx_frames == 40
    assert (relay.stats.rx_frames, relay.stats.rx_dropped_ring_full) == (room, 40 - room)
    assert relay.stats.rx_dropped_too_big == relay.stats.tx_dropped_bad_frame == 0


def test_rx_dropped_too_big(relay_bench):
    """A frame the vport received that exceeds the guest ring's slot payload (1020 bytes here)."""
    relay, channel, bench = relay_bench(slot_size=1024)
    limit = 1024 - SLOT_LEN_SIZE
    for size in (60, limit + 1, 1500, limit, 2048):
        bench.device.deliver(0, bytes([size & 0xFF]) * size)  # before the relay thread touches the device
    relay.start()
    relay.stop()
    got = channel.rx.pop_many(16)
    assert [len(f) for f in got] == [60, limit]
    assert (relay.stats.rx_frames, relay.stats.rx_dropped_too_big) == (2, 3)
    assert relay.stats.rx_dropped_ring_full == 0


def test_tx_dropped_bad_frame(relay_bench):
    """A guest frame larger than the vport's packet buffer (1024 bytes): dropped and counted, the rest of its
    batch still sent."""
    relay, channel, _ = relay_bench(slot_size=2048, vport=VportConfig(buffer_size=1024))
    frames = [bytes([1]) * 64, bytes([2]) * 1025, bytes([3]) * 1024, bytes([4]) * 2044, bytes([5]) * 100]
    assert channel.tx.push_many(frames) == 5
    relay.start()
    wait_tx_taken(channel)
    relay.stop()
    assert (relay.stats.tx_frames, relay.stats.tx_dropped_bad_frame) == (3, 2)
    assert [f[-1] for f in channel.rx.pop_many(16)] == [1, 3, 5]  # loopback brought the sent ones back
    assert relay.stats.rx_frames == 3


def test_tx_stranded_on_abandon(relay_bench):
    """Sends the device never completes (its vport stopped behind the driver's back), then the relay is
    abandoned: they are counted as stranded."""
    relay, channel, bench = relay_bench()
    bench.device.vports[0].stop()
    assert channel.tx.push_many(numbered_frames(6)) == 6
    relay.start()
    wait_tx_taken(channel)
    relay.abandon()
    assert relay.stats.tx_frames == 6
    assert relay.stats.tx_stranded == 6
    assert relay.stats.rx_frames == 0


def test_a_drain_that_finds_the_device_gone_still_hands_back_what_it_completed(relay_bench):
    """A device removed after it handled the relay's sends (chaos seed 1: a relay starved of CPU had not looked at
    their completions when the removal was found): its TX completions and the frames that came back are in
    memory, so the stop's drain reaps and hands them on before it reports the device gone; nothing is stranded."""
    relay, channel, bench = relay_bench(slots=16)
    sent = numbered_frames(12)
    assert channel.tx.push_many(sent) == 12
    assert relay._pump() == 12  # the relay's own pass, on this thread: the in-process loopback answers at once
    bench.device.removed = True
    relay._guarded(relay._drain)
    assert relay.device_missing and relay.datapath.tx_outstanding == 0
    assert [f[12:] for f in channel.rx.pop_many(16)] == [f[12:] for f in sent] and relay.stats.rx_frames == 12
    bench.device.removed = False  # (for the fixture's orderly shutdown)


def test_guest_frames_leave_the_tx_ring_after_their_copy_and_before_the_doorbell(relay_bench, monkeypatch):
    """The relay copies guest frames straight from their ring slots (no copy in between), so it may release the
    slots only once the frames are in TX buffers — and does so before the SQ doorbell: a worker killed between
    the two loses those frames (counted by the next worker as never sent), never sends them twice."""
    relay, channel, _ = relay_bench(slots=16)
    sq = relay.datapath.queues.sq
    at_doorbell = []
    commit = sq.commit
    monkeypatch.setattr(sq, "commit", lambda *a, **k: (at_doorbell.append(len(channel.tx)), commit(*a, **k))[1])
    sent = numbered_frames(12)
    assert channel.tx.push_many(sent) == 12
    assert relay._pump() == 12  # the relay's own pass, on this thread
    assert at_doorbell == [0] and relay.stats.tx_frames == 12
    relay._drain()  # hands the guest what came back (the in-process loopback answered the doorbell)
    assert [f[12:] for f in channel.rx.pop_many(16)] == [f[12:] for f in sent]



def _quiet_push(channel, frames) -> None:
    """Push guest frames without ringing the relay's doorbell: frames it has not taken when it is stopped (they
    came in during its last wait, or while its thread waited for the worker's GIL)."""
    assert Ring.attach(channel.tx.mem, channel.tx.gpa).push_many(frames) == len(frames)


@pytest.mark.parametrize("abandon", [False, True])
def test_a_stop_sends_what_the_guest_queued_as_a_last_batch_and_an_abandon_leaves_it(relay_bench, monkeypatch,
                                                                                        abandon):
    """The guest's blackout starts at the first frame the old relay does not take: on a stop for servicing the
    frames still in the tx ring go out as one last batch and come back before the save (the guest has them now,
    not after the whole servicing from the next relay). An abandoned vport is dropped: they stay in the ring, for
    the relay of the NIC's next vport."""
    monkeypatch.setattr(net_relay, "IDLE_WAIT_MS", 60_000)  # the relay sleeps until the stop
    relay, channel, _ = relay_bench(slots=32)
    relay.start()
    assert relay.resumed.wait(5)  # nothing to do: asleep (or about to be), the tx ring not looked at again
    sent = numbered_frames(12)
    _quiet_push(channel, sent)
    if abandon:
        relay.abandon()
        assert len(channel.tx) == 12 and len(channel.rx) == 0 and relay.stats.tx_stranded == 0
    else:
        relay.stop()
        assert len(channel.tx) == 0 and relay.stats.tx_frames == relay.stats.rx_frames == 12
        assert [f[12:] for f in channel.rx.pop_many(16)] == [f[12:] for f in sent]
