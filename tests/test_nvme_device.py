"""The NVMe emulator core in-process (spec nvme.md §2-9, §16): registers, the enable/reset state machine,
admin and NVM commands, PRPs, AER, queue errors and the keepalive parking of DMA work."""
import struct
import time

import pytest

import vfkeep.nvme as nvme
from vfkeep.memory import GuestMemory, MemoryLayout
from vfkeep.nvme_device.core import NvmeController, make_timing
from vfkeep.nvme_device.dma import MemoryDma
from vfkeep.nvme_device.errors import RegisterAccessError
from vfkeep.nvme_device.namespace import Disk, make_namespaces
from vfkeep.nvme_device.prp import PrpError, prp_segments

PAGE = 4096


class Irqs:
    def __init__(self):
        self.raised = []

    def trigger(self, vector):
        self.raised.append(vector)


class Bench:
    """A controller over `mem` plus a tiny host: admin queue (16 entries) in guest pages 0/1."""

    ASQ, ACQ, IOSQ, IOCQ, DATA = 0, PAGE, 2 * PAGE, 3 * PAGE, 8 * PAGE

    def __init__(self, mem, **kw):
        self.mem = mem
        self.irqs = Irqs()
        self.dma = MemoryDma(mem)
        self.ctrl = NvmeController(self.dma, self.irqs, None, namespaces=make_namespaces(Disk(None, 1 << 20), 1,
                                                                                         1 << 20), **kw)
        self.sq_tail = {0: 0, 1: 0}
        self.cq_head = {0: 0, 1: 0}
        self.phase = {0: 1, 1: 1}
        self.cid = 0

    def w32(self, off, v):
        self.ctrl.write(off, v.to_bytes(4, "little"))

    def r32(self, off):
        return int.from_bytes(self.ctrl.read(off, 4), "little")

    def enable(self):
        self.w32(nvme.REG_AQA, 0x000F000F)
        self.ctrl.write(nvme.REG_ASQ, self.ASQ.to_bytes(8, "little"))
        self.ctrl.write(nvme.REG_ACQ, self.ACQ.to_bytes(8, "little"))
        self.w32(nvme.REG_CC, nvme.CC_ENABLE_VALUE)
        assert self.r32(nvme.REG_CSTS) & 1

    def submit(self, cmd, qid=0):
        size = 16
        self.cid += 1
        cmd.cid = self.cid
        base = self.ASQ if qid == 0 else self.IOSQ
        self.mem.write(base + self.sq_tail[qid] * 64, bytes(cmd))
        self.sq_tail[qid] = (self.sq_tail[qid] + 1) % size
        self.w32(nvme.doorbell_offset(qid, False), self.sq_tail[qid])
        return self.cid

    def completions(self, qid=0):
        out, base = [], (self.ACQ if qid == 0 else self.IOCQ)
        while True:
            raw = self.mem.read(base + self.cq_head[qid] * 16, 16)
            dw0, _, sqhd, sqid, cid, status = struct.unpack("<IIHHHH", raw)
            if status & 1 != self.phase[qid]:
                break
            out.append((cid, nvme.status_of(status), dw0))
            self.cq_head[qid] = (self.cq_head[qid] + 1) % 16
            if self.cq_head[qid] == 0:
                self.phase[qid] ^= 1
        if out:
            self.w32(nvme.doorbell_offset(qid, True), self.cq_head[qid])
        return out

    def admin(self, **fields):
        cid = self.submit(nvme.Command(**fields))
        [(got, status, dw0)] = self.completions()
        assert got == cid
        return status, dw0

    def io_queue(self):
        assert self.admin(cdw0=nvme.CREATE_IO_CQ, prp1=self.IOCQ, cdw10=(15 << 16) | 1, cdw11=0b11) == (0, 0)
        assert self.admin(cdw0=nvme.CREATE_IO_SQ, prp1=self.IOSQ, cdw10=(15 << 16) | 1, cdw11=(1 << 16) | 1) == (0, 0)


@pytest.fixture
def bench(mem):
    return Bench(mem)


def test_registers_and_access_rules(bench):
    cap = nvme.Cap.from_int(int.from_bytes(bench.ctrl.read(nvme.REG_CAP, 8), "little"))
    assert (cap.mqes, cap.cqr, cap.to_500ms, cap.css, cap.mpsmin, cap.dstrd) == (255, 1, 0xFF, 1, 0, 0)
    assert bench.r32(nvme.REG_VS) == 0x00020000
    assert int.from_bytes(bench.ctrl.read(nvme.REG_CAP + 4, 4), "little") == cap.to_int() >> 32
    for off, size, write in ((nvme.REG_CC + 1, 4, False), (nvme.REG_CC, 2, False), (nvme.REG_CSTS, 4, True),
                             (0x50, 4, False), (nvme.REG_CC, 8, False), (0x1002, 4, True), (0x1000, 4, False)):
        with pytest.raises(RegisterAccessError):
            bench.ctrl.write(off, bytes(size)) if write else bench.ctrl.read(off, size)
    assert bench.ctrl.counters["bad_register_accesses"] == 7
    bench.w32(nvme.REG_INTMS, 0b101)
    bench.w32(nvme.REG_INTMC, 0b001)
    assert bench.r32(nvme.REG_INTMS) == 0b100


def test_enable_disable_state_machine_with_modelled_times(mem):
    bench = Bench(mem, timing=make_timing("natural", enable_ms=30, disable_ms=20))
    bench.w32(nvme.REG_AQA, 0x000F000F)
    t0 = time.monotonic()
    bench.w32(nvme.REG_CC, nvme.CC_ENABLE_VALUE)
    while not bench.r32(nvme.REG_CSTS) & 1:
        assert time.monotonic() - t0 < 5
    assert time.monotonic() - t0 >= 0.03
    bench.w32(nvme.REG_CC, nvme.CC_ENABLE_VALUE)  # EN stays 1: nothing happens
    bench.w32(nvme.REG_CC, 0)
    assert bench.r32(nvme.REG_CSTS) & 1  # reset in progress for 20 ms
    while bench.r32(nvme.REG_CSTS) & 1:
        assert time.monotonic() - t0 < 5
    assert bench.r32(nvme.REG_CC) == 0 and bench.r32(nvme.REG_AQA) == 0x000F000F  # AQA kept
    c = bench.ctrl.counters
    assert (c["enables"], c["disables"], c["modelled_enable_ms_total"], c["modelled_disable_ms_total"]) == (1, 1, 30, 20)
    names = [e["name"] for e in bench.ctrl.command_log.since(0)]
    assert names == ["CC_ENABLE", "READY", "CC_DISABLE", "RESET_DONE"]


def test_bad_cc_sets_cfs(bench):
    bench.w32(nvme.REG_CC, nvme.CC_ENABLE_VALUE | (1 << 7))  # MPS 1
    assert nvme.Csts.from_int(bench.r32(nvme.REG_CSTS)).cfs == 1
    bench.w32(nvme.REG_CC, 0)  # a reset out of CFS is immediate
    assert bench.r32(nvme.REG_CSTS) == 0


def test_identify_features_and_queue_errors(bench):
    bench.enable()
    page = bench.DATA
    assert bench.admin(cdw0=nvme.IDENTIFY, cdw10=1, prp1=page) == (0, 0)
    ic = nvme.IdentifyController.from_bytes(bench.mem.read(page, 4096))
    assert (ic.vid, ic.mdts, ic.nn, ic.sqes, ic.cqes, bytes(ic.mn).rstrip()) == (
        0x1414, 6, 1024, 0x66, 0x44, b"MSFT NVMe Accelerator v1.0")
    assert bench.admin(cdw0=nvme.IDENTIFY, nsid=1, cdw10=0, prp1=page) == (0, 0)
    ns = nvme.IdentifyNamespace.from_bytes(bench.mem.read(page, 4096))
    assert ns.nsze == 2048 and ns.lba_format().lbads == 9
    assert bench.admin(cdw0=nvme.IDENTIFY, nsid=0, cdw10=0, prp1=page)[0] == nvme.SC_INVALID_NAMESPACE_OR_FORMAT
    assert bench.admin(cdw0=nvme.IDENTIFY, cdw10=9, prp1=page)[0] == nvme.SC_INVALID_FIELD
    assert bench.admin(cdw0=nvme.SET_FEATURES, cdw10=7, cdw11=(63 << 16) | 63) == (0, (15 << 16) | 15)
    assert bench.admin(cdw0=nvme.SET_FEATURES, cdw10=7 | (1 << 31))[0] == nvme.SC_FEATURE_NOT_SAVEABLE
    assert bench.admin(cdw0=nvme.CREATE_IO_CQ, prp1=bench.IOCQ, cdw10=(15 << 16), cdw11=3)[0] == \
        nvme.SC_INVALID_QUEUE_IDENTIFIER
    assert bench.admin(cdw0=nvme.CREATE_IO_CQ, prp1=bench.IOCQ, cdw10=1, cdw11=3)[0] == nvme.SC_INVALID_QUEUE_SIZE
    assert bench.admin(cdw0=nvme.CREATE_IO_CQ, prp1=bench.IOCQ, cdw10=(15 << 16) | 1, cdw11=2)[0] == \
        nvme.SC_INVALID_FIELD
    assert bench.admin(cdw0=nvme.CREATE_IO_CQ, prp1=bench.IOCQ, cdw10=(15 << 16) | 1, cdw11=(16 << 16) | 3)[0] == \
        nvme.SC_INVALID_INTERRUPT_VECTOR
    assert bench.admin(cdw0=nvme.CREATE_IO_SQ, prp1=bench.IOSQ, cdw10=(15 << 16) | 1, cdw11=(1 << 16) | 1)[0] == \
        nvme.SC_COMPLETION_QUEUE_INVALID
    bench.io_queue()
    assert bench.admin(cdw0=nvme.SET_FEATURES, cdw10=7, cdw11=0)[0] == nvme.SC_COMMAND_SEQUENCE_ERROR
    assert bench.admin(cdw0=nvme.DELETE_IO_CQ, cdw10=1)[0] == nvme.SC_INVALID_QUEUE_DELETION
    assert bench.admin(cdw0=0x7F)[0] == nvme.SC_INVALID_COMMAND_OPCODE
    assert bench.admin(cdw0=nvme.GET_LOG_PAGE, cdw10=0x00FF0099, prp1=page)[0] == nvme.SC_INVALID_LOG_PAGE
    assert bench.admin(cdw0=nvme.ABORT) == (0, 1)
    assert bench.admin(cdw0=nvme.DELETE_IO_SQ, cdw10=1) == (0, 0)
    assert bench.admin(cdw0=nvme.DELETE_IO_CQ, cdw10=1) == (0, 0)


def test_aer_limit_namespace_change_and_changed_list(bench):
    bench.enable()
    cids = [bench.submit(nvme.Command(cdw0=nvme.ASYNC_EVENT_REQUEST)) for _ in range(4)]
    assert bench.completions() == []
    assert bench.admin(cdw0=nvme.ASYNC_EVENT_REQUEST)[0] == nvme.SC_ASYNC_EVENT_LIMIT_EXCEEDED
    bench.ctrl.namespace_changed(1)
    assert bench.completions() == [(cids[-1], 0, 0x00040002)]  # the most recently submitted AER
    bench.ctrl.namespace_changed(1)
    assert bench.completions() == []  # masked until the log page is read with RAE=0
    assert bench.admin(cdw0=nvme.GET_LOG_PAGE, cdw10=nvme.CHANGED_NS_LOG_CDW10, prp1=bench.DATA) == (0, 0)
    assert struct.unpack_from("<2I", bench.mem.read(bench.DATA, 8)) == (1, 0)
    bench.ctrl.namespace_changed(1)
    assert bench.completions() == [(cids[-2], 0, 0x00040002)]
    assert bench.ctrl.inspect()["outstanding_aers"] == cids[:2]


def test_io_with_prp_list_errors_and_an_interrupt_per_completion(bench):
    bench.enable()
    bench.io_queue()
    data = bytes(range(256)) * 64  # 16 KiB = 4 pages: PRP1 + a list of 3
    bench.mem.write(bench.DATA, data)
    listpage = bench.DATA + 6 * PAGE
    bench.mem.write(listpage, struct.pack("<3Q", *(bench.DATA + i * PAGE for i in range(1, 4))))
    nlb = len(data) // 512 - 1
    bench.submit(nvme.Command(cdw0=nvme.NVM_WRITE, nsid=1, prp1=bench.DATA, prp2=listpage, cdw10=100, cdw12=nlb),
                 qid=1)
    bench.submit(nvme.Command(cdw0=nvme.NVM_READ, nsid=1, prp1=bench.DATA + 12 * PAGE, prp2=bench.DATA + 13 * PAGE,
                              cdw10=100, cdw12=15), qid=1)
    bench.submit(nvme.Command(cdw0=nvme.NVM_READ, nsid=1, prp1=bench.DATA, cdw10=2048, cdw12=0), qid=1)
    bench.submit(nvme.Command(cdw0=nvme.NVM_READ, nsid=5, prp1=bench.DATA, cdw12=0), qid=1)
    bench.submit(nvme.Command(cdw0=nvme.NVM_READ, nsid=1, prp1=1 << 40, cdw12=0), qid=1)
    statuses = [s for _, s, _ in bench.completions(qid=1)]
    assert statuses == [0, 0, nvme.SC_LBA_OUT_OF_RANGE, nvme.SC_INVALID_NAMESPACE_OR_FORMAT,
                        nvme.SC_DATA_TRANSFER_ERROR]
    assert bench.mem.read(bench.DATA + 12 * PAGE, 8192) == data[:8192]
    assert bench.irqs.raised.count(0) == 5 + 2  # vector 0: the two creates, then one per IO completion


def test_doorbell_beyond_the_queue_fails_the_queue(bench):
    bench.enable()
    bench.w32(nvme.doorbell_offset(0, False), 16)
    assert bench.ctrl.inspect()["sqs"][0]["failed"]
    assert bench.ctrl.counters["bad_doorbells"] == 1


def test_dma_work_parks_while_no_driver_memory_and_resumes_on_the_next_access(bench):
    """Keepalive model: a completion due while the driver is away is written once it is back."""
    bench.enable()
    bench.io_queue()
    bench.ctrl.set_io_stall(True)
    cid = bench.submit(nvme.Command(cdw0=nvme.NVM_READ, nsid=1, prp1=bench.DATA, cdw12=0), qid=1)
    bench.dma.available = False
    bench.ctrl.set_io_stall(False)  # the stall ends during the handover
    assert bench.ctrl.inspect()["parked"] == 1 and bench.completions(qid=1) == []
    bench.dma.available = True
    assert bench.r32(nvme.REG_CSTS) & 1  # the new driver's first access
    assert bench.completions(qid=1) == [(cid, 0, 0)]


def test_flr_wipes_everything_but_the_disk(bench):
    bench.enable()
    bench.io_queue()
    bench.mem.write(bench.DATA, b"\x5a" * 512)
    bench.submit(nvme.Command(cdw0=nvme.NVM_WRITE, nsid=1, prp1=bench.DATA, cdw10=7, cdw12=0), qid=1)
    assert bench.completions(qid=1)[0][1] == 0
    bench.ctrl.flr("test")
    assert bench.r32(nvme.REG_CSTS) == 0 and bench.r32(nvme.REG_AQA) == 0 and bench.ctrl.inspect()["sqs"] == []
    ns = bench.ctrl.namespaces[1]
    buf = bytearray(512)
    ns.disk.readv(ns.byte_offset(7), [memoryview(buf)])
    assert buf == b"\x5a" * 512


class _Dma:
    def __init__(self, mem):
        self.mem = mem

    def view(self, iova, n):
        return self.mem.view(iova, n)


def test_prp_segments(mem):
    dma = _Dma(mem)
    assert prp_segments(dma, 0x1200, 0, 0x100) == [(0x1200, 0x100)]
    assert prp_segments(dma, 0x1800, 0x5000, 0x1000) == [(0x1800, 0x800), (0x5000, 0x800)]
    assert prp_segments(dma, 0x1000, 0x2000, 0x2000) == [(0x1000, 0x2000)]  # merged
    # a chained list: the first list page's last entry points at the next list page
    entries = [0x10000 + i * PAGE for i in range(600)]
    mem.write(0x20000, struct.pack("<511Q", *entries[:511]) + struct.pack("<Q", 0x21000))
    mem.write(0x21000, struct.pack("<89Q", *entries[511:]))
    segs = prp_segments(dma, 0x3000, 0x20000, 601 * PAGE)
    assert segs == [(0x3000, PAGE), (0x10000, 600 * PAGE)]
    mem.write(0x22000, struct.pack("<2Q", 0x7001, 0x8000))
    with pytest.raises(PrpError):
        prp_segments(dma, 0x3000, 0x22000, 3 * PAGE)


@pytest.fixture
def mem():
    m = GuestMemory.create(MemoryLayout(guest_pages=1024, worker_pages=16, pool_pages=0))
    yield m
    m.close()


def test_work_due_while_the_next_driver_is_still_mapping_waits_for_its_first_register_access(bench):
    """A delayed completion firing between the new driver's DMA_MAPs (queues not mapped yet) must not fail
    the CQ: DMA work waits until the new connection has touched BAR0."""
    bench.enable()
    bench.io_queue()
    bench.ctrl.set_io_stall(True)
    cid = bench.submit(nvme.Command(cdw0=nvme.NVM_READ, nsid=1, prp1=bench.DATA, cdw12=0), qid=1)
    bench.ctrl.client_disconnected()
    bench.ctrl.client_connected(2)
    full = bench.dma.ranges
    bench.dma.ranges = [(bench.DATA, 16 * PAGE)]  # the data pages are mapped, the queues not yet
    bench.ctrl.set_io_stall(False)
    assert bench.ctrl.inspect()["parked"] == 1
    bench.dma.ranges = full
    assert bench.r32(nvme.REG_CSTS) & 1
    assert bench.completions(qid=1) == [(cid, 0, 0)]
    assert all(q["failed"] is None for q in bench.ctrl.inspect()["cqs"])
