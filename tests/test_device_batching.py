"""The emulator's batched data path: a batch of completions is byte-for-byte what posting them one at a time
writes (owner bits across laps included) with the same notifications, frames keep their order, and every
frame of an overloaded batch is either delivered or counted once."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from device_driver_helper import Pages, TestDriver, VportQueues, frame, in_process_device
from vfkeep.device.queues import Cq, Eq, QueueMemory, Wq
from vfkeep.gdma import codec
from vfkeep.gdma.constants import (CLIENT_OOB_8, CLIENT_OOB_24, CLIENT_OOB_32, CQE_RX_OKAY, DB_RQ, DB_SQ,
                                   PAGE_SIZE)
from vfkeep.gdma.datapath import ManaRxWqeOneSge
from vfkeep.gdma.queues import Sge, WqeHeader, WqeParams, wqe_length
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


WQ_BYTES = 4096
#: (OOB size code, SGEs, client_oob_in_sgl) of the WQE shapes a ring may mix: the one-SGE shapes drivers post
#: (short and long OOB), more SGEs, an LSO-style OOB in the SGL, and no SGE at all.
SHAPES = [(CLIENT_OOB_8, 1, 0), (CLIENT_OOB_24, 1, 0), (CLIENT_OOB_32, 1, 0), (CLIENT_OOB_8, 2, 0),
          (CLIENT_OOB_8, 2, 1), (CLIENT_OOB_8, 0, 0)]


def write_wqe(ring: memoryview, off: int, code: int, sges: list[tuple[int, int]], oob_in_sgl: int, seed: int) -> int:
    """One WQE at ring offset `off` (wrapping at the ring end) with a recognisable OOB; returns its length."""
    n = wqe_length(code, len(sges))
    wqe = bytearray(n)
    header = WqeHeader(params=WqeParams(num_sgl_entries=len(sges), inline_client_oob_size=code,
                                        client_oob_in_sgl=oob_in_sgl))
    wqe[:8] = header.to_bytes()
    sgl = 16 if code == CLIENT_OOB_8 else 32 if code == CLIENT_OOB_24 else 48
    wqe[8:sgl] = bytes((seed + i) & 0xFF for i in range(sgl - 8))
    for i, (address, size) in enumerate(sges):
        wqe[sgl + 16 * i:sgl + 16 * (i + 1)] = Sge(address=address, mem_key=seed, size=size).to_bytes()
    for i in range(n):
        ring[(off + i) % len(ring)] = wqe[i]
    return n


@settings(max_examples=80, deadline=None)
@given(head=st.integers(0, WQ_BYTES // 32 - 1).map(lambda i: i * 32 + (1 << 32) - WQ_BYTES),
       wqes=st.lists(st.tuples(st.sampled_from(SHAPES), st.integers(0, 1 << 40), st.integers(0, 1 << 16)),
                     min_size=1, max_size=60),
       limit=st.integers(1, 80), oob_min=st.sampled_from([1, 16, 24, 512]), runs=st.booleans())
def test_take_many_fetches_what_take_fetches_one_by_one(head, wqes, limit, oob_min, runs):
    """Runs of one shape are read with strided slices (`Wq._take_run`); every WQE, run or not, is what
    `take()` returns for it, in order, with the same head; positions wrap as the u32 counters do."""
    mem = GuestMemory.create(LAYOUT)
    try:
        dev = Recorder(mem)
        dev.counters["malformed_wqes"] = 0
        ring = mem.view(0, WQ_BYTES)
        tail = head
        for i, ((code, nsge, in_sgl), address, size) in enumerate(wqes if not runs else [wqes[0]] * len(wqes)):
            sges = [(address + 4096 * k, size) for k in range(nsge)]
            length = wqe_length(code, nsge)
            if ((tail - head) & 0xFFFFFFFF) + length > WQ_BYTES:
                break
            tail = (tail + write_wqe(ring, tail % WQ_BYTES, code, sges, in_sgl, i)) & 0xFFFFFFFF
        batch, single = (Wq(dev, 24, "SQ", QueueMemory([0], 0, WQ_BYTES)) for _ in range(2))
        for q in (batch, single):
            q.head, q.tail = head, tail
        got = batch.take_many(limit, oob_min)
        want = []
        while len(want) < limit and single.pending:
            ref = single.take()
            oob = ref.oob()
            want.append((ref.position, ref.error, [(sg.address, sg.size) for sg in ref.sges],
                         ref.params.client_oob_in_sgl if ref.params else 0, oob if len(oob) >= oob_min else b""))
        assert got == want
        assert batch.head == single.head
        ring.release()
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


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 40), posted=st.integers(0, 40), size=st.integers(22, 300),
       layout=st.sampled_from(["even", "wrapped", "reversed", "one_short", "one_malformed", "link_down"]))
def test_a_block_of_frames_lands_as_frame_by_frame_delivery_does(n, posted, size, layout):
    """Frames of one length from the backend as one block (`deliver_block`: one copy into evenly spaced buffers,
    CQEs as one array) write the same buffers, completions and counters as `deliver_many` — also where the posted
    buffers are not evenly spaced, one is too short or malformed, fewer are posted than frames arrive, or the
    link is down (every frame delivered or counted once)."""
    results = []
    for as_block in (False, True):
        with GuestMemory.create(LAYOUT) as mem:
            device, port = in_process_device(mem)
            drv = TestDriver(port, mem, Pages(mem, mem.layout.worker), timeout=1.0)
            drv.bring_up()
            vp = VportQueues(drv)
            vp.start(rx_buffers=0)
            for i in range(posted):
                if layout == "one_malformed" and i == posted // 2:
                    vp.rq.put(bytes(32))  # a zeroed WQE: no SGE
                    vp.rx_posted += 1
                    drv.ring_wq(DB_RQ, vp.rq, num_rwqe=1)
                    continue
                at = {"reversed": posted - i, "wrapped": (i + posted // 2) % posted}.get(layout, i)
                vp.post_rx(1, address=vp.rx_buf(at),
                           size=size - 1 if layout == "one_short" and i == posted // 2 else None)
            device.vports[0].link_up = layout != "link_down"
            frames = [frame(vp.mac, PEER, s, size) for s in range(n)]
            if as_block:
                device.deliver_block(0, np.frombuffer(b"".join(frames), np.uint8).reshape(n, size))
            else:
                device.deliver_many(0, frames)
            results.append((bytes(mem.view(vp.rx_cq.gpa, vp.rx_cq.size)),
                            bytes(mem.view(vp.rx_bufs, vp.rx_slots * vp.buf_size)), dict(device.counters)))
            port.irqs.close()
    assert results[0] == results[1]


def test_sends_across_the_end_of_the_tx_buffers_keep_order(up):
    """A batch of sends whose buffers wrap (evenly spaced up to the last buffer, then from the first again) goes
    out as two blocks, in order; so do mixed sizes (frame by frame)."""
    device, drv = up
    vp = VportQueues(drv)
    vp.start(rx_buffers=200)
    sizes = [64] * 600 + [60, 1500, 64] * 66  # the third batch of 200 wraps at TX buffer 512
    sent = [frame(PEER, vp.mac, s, n) for s, n in enumerate(sizes)]
    rx = []
    for i in range(0, len(sent), 200):
        vp.send(sent[i:i + 200])
        rx += vp.wait_rx(len(sent[i:i + 200]))
        assert vp.wait_tx(len(sent[i:i + 200])) == [32] * len(sent[i:i + 200])
        vp.post_rx(len(sent[i:i + 200]))
    assert seqs(rx) == list(range(len(sent))) and [len(f) for _, f in rx] == sizes
    assert all(f[12:] == g[12:] for (_, f), g in zip(rx, sent))
    assert device.counters["frames_tx"] == device.counters["frames_rx"] == len(sent)


def lso_wqe(vp: VportQueues, address: int, size: int) -> bytes:
    """A send WQE marked LSO (`client_oob_in_sgl`) with one SGE, which §12.1 says the device completes with
    CQE_TX_GDMA_ERR; the same shape as the common send WQE otherwise, so a run of them looks like a block."""
    wqe = bytearray(vp.tx_wqe(address, size))
    params = WqeParams(num_sgl_entries=1, inline_client_oob_size=CLIENT_OOB_8, client_oob_in_sgl=1)
    wqe[:8] = WqeHeader(params=params).to_bytes()
    return bytes(wqe)


@pytest.mark.parametrize("kinds", ["LLLL", "LN", "NNLLN", "NL"])
def test_lso_send_wqes_with_one_sge_are_each_completed_with_an_error_in_order(up, kinds):
    """Every send WQE gets one completion in posting order (the driver frees its FIFO by them), also where a run
    of one-SGE LSO WQEs (an error each: CQE_TX_GDMA_ERR, counted in malformed_wqes) sits among normal ones."""
    device, drv = up
    vp = VportQueues(drv)
    vp.start(rx_buffers=16)
    for i, kind in enumerate(kinds):
        buf = vp.tx_bufs + i * vp.buf_size
        vp.mem.write(buf, frame(PEER, vp.mac, i))
        vp.sq.put(lso_wqe(vp, buf, 64) if kind == "L" else vp.tx_wqe(buf, 64))
    drv.ring_wq(DB_SQ, vp.sq)
    want = [42 if kind == "L" else 32 for kind in kinds]  # CQE_TX_GDMA_ERR / CQE_TX_OKAY
    assert vp.wait_tx(len(kinds)) == want and vp.poll_tx() == []
    assert device.vports[0].sq.head == vp.sq.tail
    assert device.counters["malformed_wqes"] == kinds.count("L")
    assert device.counters["frames_tx"] == kinds.count("N")
    assert seqs(vp.wait_rx(kinds.count("N"))) == [i for i, kind in enumerate(kinds) if kind == "N"]


def test_a_large_block_into_receive_buffers_posted_in_evenly_spaced_pairs_is_all_delivered(mem):
    """A driver may post its receive buffers in pairs, each pair evenly spaced but the pairs not: a block of
    2,000 frames then fills them two at a time (no recursion per pair), every frame written to its buffer and
    completed — also when the block comes from the vport's own sends (loopback), each of which is completed."""
    n, size, stride = 2000, 64, 128
    device, port = in_process_device(mem)
    drv = TestDriver(port, mem, Pages(mem, mem.layout.worker), timeout=1.0)
    drv.bring_up()
    vp = VportQueues(drv, sq_size=65536, rq_size=65536, cq_size=65536, buf_size=256)
    vp.start(rx_buffers=0)
    bufs = drv.pages.alloc(3 * n // 2 * stride // PAGE_SIZE + 1)
    addresses = [bufs + (i // 2 * 3 + i % 2) * stride for i in range(n)]  # pairs: 0 1, 3 4, 6 7, ...

    def post():
        for address in addresses:
            wqe = ManaRxWqeOneSge(header=WqeHeader(params=WqeParams(num_sgl_entries=1,
                                                                     inline_client_oob_size=CLIENT_OOB_8)))
            wqe.sge = Sge(address=address, mem_key=drv.gpa_mkey, size=stride)
            vp.rq.put(wqe.to_bytes())
        drv.ring_wq(DB_RQ, vp.rq, num_rwqe=n)

    def received():
        return [bytes(mem.view(a, size)) for a in addresses]

    post()
    frames = [frame(vp.mac, PEER, s, size) for s in range(n)]
    device.deliver_block(0, np.frombuffer(b"".join(frames), np.uint8).reshape(n, size))
    rx_cq = device.vports[0].rx_cq
    assert device.counters["frames_rx"] == n and rx_cq.tail - rx_cq.cap == n
    assert received() == frames and not device.vports[0].posted

    post()  # the same buffers again, filled from the vport's own sends
    sent = [frame(PEER, vp.mac, s, size) for s in range(n, 2 * n)]
    vp.send(sent)
    tx_cq = device.vports[0].tx_cq
    assert device.counters["frames_tx"] == n and tx_cq.tail - tx_cq.cap == n  # every send completed
    assert device.counters["frames_rx"] == 2 * n and rx_cq.tail - rx_cq.cap == 2 * n
    assert [f[12:] for f in received()] == [f[12:] for f in sent]
    port.irqs.close()


def test_wqes_that_all_name_one_buffer_are_each_sent_and_received(up):
    """A driver may post several WQEs on one buffer (the same frame sent again, receive buffers reused): their
    addresses are then not evenly spaced with a positive stride, so the block paths leave them to the frame by
    frame ones; every send is still completed and every frame delivered (a zero stride once raised out of the
    doorbell, leaving the WQEs taken but never completed)."""
    device, drv = up
    vp = VportQueues(drv)
    vp.start(rx_buffers=0)
    n = 10
    for _ in range(n):
        vp.post_rx(1, address=vp.rx_buf(0))
    buf = vp.tx_bufs
    vp.mem.write(buf, frame(PEER, vp.mac, 7))
    for _ in range(n):
        vp.sq.put(vp.tx_wqe(buf, 64))
    drv.ring_wq(DB_SQ, vp.sq)
    assert vp.wait_tx(n) == [32] * n
    assert [kind for kind, _ in vp.wait_rx(n)] == [CQE_RX_OKAY] * n
    assert seqs([(None, vp.mem.read(vp.rx_buf(0), 64))]) == [7]  # (the helper reads buffers by index)
    assert device.counters["frames_tx"] == device.counters["frames_rx"] == n
    for _ in range(n):  # a block from the backend into them
        vp.post_rx(1, address=vp.rx_buf(0))
    device.deliver_block(0, np.frombuffer(b"".join(frame(vp.mac, PEER, 8) for _ in range(n)), np.uint8).reshape(n, 64))
    assert [kind for kind, _ in vp.wait_rx(n)] == [CQE_RX_OKAY] * n
    assert seqs([(None, vp.mem.read(vp.rx_buf(0), 64))]) == [8] and device.counters["frames_rx"] == 2 * n
