"""The emulator writes only inside the DMA buffers it was given (issue 15 item 4): canary bytes around every
block the driver allocates (HWC queues and request/response pages, vport EQ, CQs, WQs, packet buffers) and
after every posted receive buffer's SGE, checked after each phase of traffic (`dma_canary.py`)."""
from __future__ import annotations

import pytest

from dma_canary import TAIL, Canaries
from driver_helpers import InProcessBench, loopback, numbered_frames
from vfkeep.device import control
from vfkeep.driver.mana import ManaDevice
from vfkeep.memory import DmaManager, MemoryLayout

LAYOUT = MemoryLayout(guest_pages=16, worker_pages=1024, pool_pages=0)


@pytest.fixture
def guarded(mem):
    """(device, driver vport, canaries, SGE size) with every receive buffer's SGE `TAIL` bytes short of its
    stride; the WQEs the device took before the change are used up first."""
    bench = InProcessBench(mem)
    canaries = Canaries()
    dev = ManaDevice.new(canaries.wrap(bench.connect(DmaManager(mem), "nic0")), "nic0")
    vport = dev.open_vport(0)
    sge = canaries.rx_tails(vport.data)
    nbuf = vport.data._rx_nbuf
    assert len(loopback(vport, numbered_frames(nbuf))) == nbuf
    canaries.check()
    yield bench.device, dev, vport, canaries, sge
    dev.shutdown()
    bench.device.close()
    canaries.check()  # freed blocks included


def test_traffic_hwc_and_events_stay_inside_their_buffers(guarded):
    device, dev, vport, canaries, sge = guarded
    sizes = [60, 61, 127, 1514, sge - 1, sge]
    for _ in range(6):  # every ring (TX/RX WQs and CQs, the EQ) wraps several times
        frames = [f[:n] for f, n in zip(numbered_frames(300, 2048), sizes * 50)]
        assert len(loopback(vport, frames)) == 300
    canaries.check()
    for _ in range(150):  # HWC: request page, response buffers, HWC CQ and EQ wrap
        dev.query_stats()
    for up in (False, True) * 40:  # link EQEs on the HWC EQ
        control.link(device, 0, up)
        dev.poll_events()
    canaries.check()


def test_frames_longer_than_the_receive_buffer_never_write_past_it(guarded):
    """A frame 1..16 bytes (and far) longer than the posted buffer: completed truncated (an RX error for the
    driver), nothing written after the buffer's SGE."""
    device, dev, vport, canaries, sge = guarded
    errors = vport.data.stats.rx_errors
    sizes = (sge + 1, sge + 15, sge + 16, sge + TAIL, 4000, 9000)
    for batch in [[n] * 30 for n in sizes] + [list(sizes) * 5]:  # the emulator's batched and per-frame paths
        device.deliver_many(0, [bytes([0xAB]) * n for n in batch])
        assert vport.data.receive(64) == []  # in-process: completed during deliver_many
        canaries.check()
    assert vport.data.stats.rx_errors - errors == 210
    assert device.counters["rx_truncated"] >= 210
    assert len(loopback(vport, numbered_frames(10))) == 10  # the buffers were re-posted and work
