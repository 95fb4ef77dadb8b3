"""The emulator's batched data path: a batch of completions is byte-for-byte what posting them one at a time
writes (owner bits across laps included) with the same notifications, frames keep their order, and every
frame of an overloaded batch is either delivered or counted once."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from device_driver_helper import Pages, TestDriver, VportQueues, frame, in_process_device
from vfkeep.device.queues import Cq, Eq, QueueMemory
from vfkeep.gdma import codec
from vfkeep.memory import GuestMemory, MemoryLayout

LAYOUT = MemoryLayout(guest_pages=64, worker_pages=2048, pool_pages=0)
PEER = bytes.fromhex("020000000001")
CQ_BYTES = 4096  # 64 entries


class Recorder:
    """Just enough of a device for queues: DMA, counters, and the notifications they raise."""

    def __init__(self, mem):
        from vfkeep.device.dma import MappedMemory
        self.dma = MappedMemory(mem)
        self.counters = {"cqes_posted": 0, "eqes_posted": 0, "lost_notifications": 0, "dma_faults": 0}
        self.interrupts = 0

    def interrupt(self, vector):
        self.interrupts += 1


def fresh_cq(mem, gpa: int, tail: int):
    dev = Recorder(mem)
    mem.view(gpa, CQ_BYTES + 4096)[:] = bytes(CQ_BYTES + 4096)
    eq = Eq(dev, 24, QueueMemory([gpa + CQ_BYTES], 0, 4096), msix=0)
    cq = Cq(dev, 25, QueueMemory([gpa], 0, CQ_BYTES), eq)
    cq.tail = eq.tail = tail
    return dev, cq, eq


@settings(max_examples=60, deadline=None)
@given(start=st.integers(64, 64 * 9), batches=st.lists(st.integers(0, 80), min_size=1, max_size=6),
       arm_between=st.booleans(), data=st.data())
def test_post_many_writes_what_single_posts_write(start, batches, arm_between, data):
    mem = GuestMemory.create(LAYOUT)
    try:
        one_dev, one, one_eq = fresh_cq(mem, 0, start)
        many_dev, many, many_eq = fresh_cq(mem, 0x10000, start)
        for n in batches:
            entries = [data.draw(st.binary(min_size=60, max_size=60)) for _ in range(n)]
            params = one.params(0x123456, True)
            for e in entries:
                one.post(e, 0x123456, True)
            many.post_many(b"".join(codec.CQE.pack(e, params) for e in entries))
            assert bytes(mem.view(0, CQ_BYTES + 4096)) == bytes(mem.view(0x10000, CQ_BYTES + 4096))
            assert (one.tail, one.armed, one_eq.tail, one_eq.armed) == (many.tail, many.armed, many_eq.tail,
                                                                      many_eq.armed)
            assert one_dev.interrupts == many_dev.interrupts and one_dev.counters == many_dev.counters
            if arm_between:
                for q in (one, many):
                    q.doorbell(q.tail % (q.cap * 8), True)
                    q.parent.doorbell(q.parent.tail % (q.parent.cap * 8), True)
    finally:
        mem.close()


@pytest.fixture
def up(mem):
    device, port = in_process_device(mem)
    drv = TestDriver(port, mem, Pages(mem, mem.layout.worker), timeout=1.0)
    drv.bring_up()
    yield device, drv
    port.irqs.close()


def seqs(rx):
    return [int.from_bytes(f[14:22], "little") for _, f in rx]


def test_a_batch_larger_than_the_posted_buffers_keeps_order_and_counts_every_drop(up):
    device, drv = up
    vp = VportQueues(drv)
    vp.start(rx_buffers=100)
    vp.send([frame(PEER, vp.mac, s) for s in range(250)])  # one SQ doorbell, 250 WQEs
    rx = vp.wait_rx(100)
    assert seqs(rx) == list(range(100))  # the first 100 fill the buffers, in order
    c = device.counters
    assert c["frames_tx"] == 250 and c["frames_rx"] == 100 and c["in_discards_no_wqe"] == 150
    assert vp.wait_tx(250) == [32] * 250  # CQE_TX_OKAY, in posting order
    vp.post_rx(100)
    vp.send([frame(PEER, vp.mac, s) for s in range(250, 260)])
    assert seqs(vp.wait_rx(10)) == list(range(250, 260))


def test_a_batch_to_an_unmapped_completion_queue_counts_every_frame_and_keeps_the_buffers(up):
    device, drv = up
    vp = VportQueues(drv)
    vp.start(rx_buffers=8)
    ranges = list(device.dma.ranges)
    device.dma.unmap_all()  # the driver is gone: nothing can be written
    device.deliver_many(0, [frame(vp.mac, PEER, s) for s in range(5)])
    assert device.counters["rx_dropped_unmapped"] == 5 and device.counters["frames_rx"] == 0
    for r in ranges:
        device.dma.map(*r)
    device.deliver_many(0, [frame(vp.mac, PEER, s) for s in range(5, 15)])  # the 8 buffers are still posted
    assert seqs(vp.wait_rx(8)) == list(range(5, 13))
    assert device.counters["in_discards_no_wqe"] == 2 and device.counters["rx_dropped_unmapped"] == 5
