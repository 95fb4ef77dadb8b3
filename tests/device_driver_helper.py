"""A minimal test-side GDMA driver for the emulator tests (spec gdma.md §13.1), kept small and readable.

It talks to a "port" with `read32/read64/write32/write64(offset, value, posted)` and
`set_irq(vector) -> eventfd`: a `VfioDevice` (the emulator in its own process) or an
`InProcessBacking` (the emulator core in this process, from `driver_helpers`). Queues live
in a `GuestMemory`; IOVA = GPA. The real driver is `vfkeep.driver`; this one exists so the device tests do
not depend on it.
"""
from __future__ import annotations

import ctypes
import os
import select
import time

from driver_helpers import EventfdIrqs, InProcessBacking
from vfkeep.device.core import GdmaDevice
from vfkeep.device.dma import MappedMemory
from vfkeep.gdma.bnic import (ManaCfgRxSteerReqDriver, ManaConfigVportReq, ManaConfigVportResp, ManaCreateWqobjReq,
                              ManaCreateWqobjResp, ManaDestroyWqobjReq, ManaQueryDeviceCfgReq, ManaQueryVportCfgReq,
                              ManaQueryVportCfgResp)
from vfkeep.gdma.constants import (CFG_RX_INDIR_TAB_OFFSET, CLIENT_OOB_8, CLIENT_OOB_24, DB_CQ, DB_EQ, DB_RQ, DB_SQ,
                                   DRV_HWC_RWQE_PARAMS, DRV_HWC_SWQE_PARAMS, EMU_DB_ZONE_OFFSET, EMU_SHMEM_OFFSET,
                                   GDMA_CREATE_DMA_REGION, GDMA_CREATE_QUEUE, GDMA_DISABLE_QUEUE, GDMA_EQ,
                                   GDMA_EQE_HWC_INIT_DATA, GDMA_EQE_HWC_INIT_DONE, GDMA_EQE_HWC_INIT_EQ_ID_DB,
                                   GDMA_LIST_DEVICES, GDMA_PAGE_TYPE_4K, GDMA_QUERY_MAX_RESOURCES,
                                   GDMA_REGISTER_DEVICE, GDMA_RQ, GDMA_SQ, HWC_DEV_ID, HWC_INIT_DATA_CQID,
                                   HWC_INIT_DATA_GPA_MKEY, HWC_INIT_DATA_PDID, HWC_INIT_DATA_RQID,
                                   HWC_INIT_DATA_SQID, MANA_CONFIG_VPORT_RX, MANA_CONFIG_VPORT_TX,
                                   MANA_CREATE_WQ_OBJ, MANA_DESTROY_WQ_OBJ, MANA_QUERY_DEV_CONFIG,
                                   MANA_QUERY_VPORT_CONFIG, PAGE_SIZE, SMC_HDR_OFFSET, SMC_MSG_TYPE_DESTROY_HWC,
                                   Tristate)
from vfkeep.gdma.datapath import ManaRxcompOob, ManaRxWqeOneSge, ManaTxCompOob, ManaTxOob, ManaTxShortOob
from vfkeep.gdma.hwc import (GdmaDevId, GdmaRespHdr, HwcInitEqIdDb, HwcInitTypeData, HwcRecvWqe, HwcSendWqe,
                             HwcTxOobFlags3, HwcTxOobFlags4)
from vfkeep.gdma.messages import MESSAGES, request_header
from vfkeep.gdma.queues import (Cqe, CqeParams, Eqe, EqeParams, Sge, WqeHeader, WqeParams, cq_eq_doorbell_tail,
                                owner_state)
from vfkeep.gdma.regs import CqEqDoorbellValue, EstablishHwc, SmcProtoHdr, WqDoorbellValue
from vfkeep.gdma.requests import (GdmaCreateDmaRegionReqDriver, GdmaCreateQueueReq, GdmaCreateQueueResp,
                                  GdmaDisableQueueReq, GdmaRegisterDeviceResp)

MANA_DEV_ID = GdmaDevId(ty=2, instance=1).to_int()
SHMEM_HDR = EMU_SHMEM_OFFSET + SMC_HDR_OFFSET


# -- plumbing -----------------------------------------------------------------------------------
class Pages:
    """Bump allocator of zeroed pages in one guest-memory region."""

    def __init__(self, mem, region):
        self.mem, self.next, self.end = mem, region.base_pfn, region.end_pfn

    def alloc(self, n: int = 1) -> int:
        if self.next + n > self.end:
            raise MemoryError(f"test memory region exhausted ({n} pages wanted)")
        gpa = self.next * PAGE_SIZE
        self.next += n
        self.mem.view(gpa, n * PAGE_SIZE)[:] = bytes(n * PAGE_SIZE)
        return gpa


def in_process_device(mem, **kwargs) -> tuple[GdmaDevice, InProcessBacking]:
    """A `GdmaDevice` over `mem` (all of it DMA-mapped) and a connected port (epoch 1)."""
    irqs = EventfdIrqs()
    device = GdmaDevice(MappedMemory(mem), irqs, kwargs.pop("loop", None), **kwargs)
    return device, InProcessBacking(device, irqs, epoch=1)


def wait_eventfd(fd: int, timeout: float) -> bool:
    """Wait for an interrupt; consume it. False on timeout."""
    readable, _, _ = select.select([fd], [], [], max(0.0, timeout))
    if not readable:
        return False
    try:
        os.eventfd_read(fd)
    except BlockingIOError:
        return False
    return True


class ConsumerRing:
    """EQ or CQ as the driver sees it: owner-count polling (§6.5)."""

    def __init__(self, mem, gpa: int, size: int, entry: int, qid: int = 0):
        self.mem, self.gpa, self.size, self.entry, self.id = mem, gpa, size, entry, qid
        self.next = size

    def poll(self) -> bytes | None:
        off = self.next % self.size
        state = owner_state(self.mem.view(self.gpa + off + self.entry - 1, 1)[0], self.next, self.size)
        if state == "empty":
            return None
        assert state == "new", f"queue {self.id} overflowed"
        data = self.mem.read(self.gpa + off, self.entry)
        self.next += self.entry
        return data

    @property
    def tail(self) -> int:
        return cq_eq_doorbell_tail(self.next, self.size, self.entry)


class WqRing:
    """SQ or RQ as the driver sees it: a free-running byte tail."""

    def __init__(self, mem, gpa: int, size: int, qid: int = 0):
        self.mem, self.gpa, self.size, self.id = mem, gpa, size, qid
        self.tail = 0

    def put(self, wqe: bytes) -> int:
        """Write a WQE at the tail (wrapping); returns its ring position."""
        pos = self.tail
        off = pos % self.size
        first = min(len(wqe), self.size - off)
        self.mem.write(self.gpa + off, wqe[:first])
        if first < len(wqe):
            self.mem.write(self.gpa, wqe[first:])
        self.tail = (self.tail + len(wqe)) & 0xFFFFFFFF
        return pos


def eqe_type(raw: bytes) -> int:
    return EqeParams.from_bytes(raw, Eqe.params.offset).event_type


def cqe_params(raw: bytes) -> CqeParams:
    return CqeParams.from_bytes(raw, Cqe.params.offset)


class HwcError(Exception):
    def __init__(self, code, status):
        super().__init__(f"HWC request {code:#x} failed with status {status}")
        self.code, self.status = code, status


# -- the driver ---------------------------------------------------------------------------------
class TestDriver:
    __test__ = False

    def __init__(self, port, mem, pages: Pages, timeout: float = 5.0):
        self.port, self.mem, self.pages, self.timeout = port, mem, pages, timeout
        self.irq_fds: dict[int, int] = {}
        self.events: list[tuple[int, bytes]] = []  # HWC EQ events other than completions
        self.activity_id = 0x5A5A0000
        self.wakeups = 0  # interrupts received through eventfds

    def irq(self, vector: int) -> int:
        if vector not in self.irq_fds:
            self.irq_fds[vector] = self.port.set_irq(vector)
        return self.irq_fds[vector]

    def ring_wq(self, offset: int, ring: WqRing, num_rwqe: int = 0) -> None:
        value = WqDoorbellValue(id=ring.id, num_rwqe=num_rwqe & 0xFF, tail=ring.tail).to_int()
        self.port.write64(EMU_DB_ZONE_OFFSET + offset, value, posted=True)

    def ring_cq_eq(self, offset: int, ring: ConsumerRing, arm: bool) -> None:
        value = CqEqDoorbellValue(id=ring.id, tail=ring.tail, arm=int(arm)).to_int()
        self.port.write64(EMU_DB_ZONE_OFFSET + offset, value, posted=True)

    def drain_eq(self, eq: ConsumerRing, record: bool = True) -> int:
        n = 0
        while (e := eq.poll()) is not None:
            n += 1
            if record and eqe_type(e) != 3:
                self.events.append((eqe_type(e), e))
        if n:
            self.ring_cq_eq(DB_EQ, eq, arm=False)
        return n

    def wait_cqes(self, cq: ConsumerRing, n: int, eq: ConsumerRing, vector: int) -> list[bytes]:
        """Poll `cq` for `n` entries; when empty arm CQ and EQ and wait for the EQ's interrupt."""
        got: list[bytes] = []
        deadline = time.monotonic() + self.timeout
        while True:
            while len(got) < n and (e := cq.poll()) is not None:
                got.append(e)
            if len(got) >= n:
                return got
            self.drain_eq(eq)
            self.ring_cq_eq(DB_CQ, cq, arm=True)
            self.ring_cq_eq(DB_EQ, eq, arm=True)
            if (e := cq.poll()) is not None:
                got.append(e)
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{len(got)}/{n} completions on CQ {cq.id} within {self.timeout} s")
            self.wakeups += wait_eventfd(self.irq(vector), min(remaining, 0.5))

    def wait_event(self, event_type: int) -> bytes:
        """Wait for a non-completion EQE of `event_type` on the HWC EQ."""
        deadline = time.monotonic() + self.timeout
        while True:
            self.drain_eq(self.hwc_eq)
            for i, (ty, raw) in enumerate(self.events):
                if ty == event_type:
                    del self.events[i]
                    return raw
            self.ring_cq_eq(DB_EQ, self.hwc_eq, arm=True)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no EQE {event_type} within {self.timeout} s")
            self.wakeups += wait_eventfd(self.irq(self.hwc_msix), min(remaining, 0.5))

    def reattach(self, port) -> None:
        """A new connection (keepalive): new eventfds, re-arm the HWC EQ and CQ (§13.3)."""
        self.port, self.irq_fds = port, {}
        self.irq(self.hwc_msix)
        self.ring_cq_eq(DB_EQ, self.hwc_eq, arm=True)
        self.ring_cq_eq(DB_CQ, self.hwc_cq, arm=True)

    # -- SMC and HWC bring-up ---------------------------------------------------------------------
    def smc_write(self, raw: bytes) -> SmcProtoHdr:
        """Write the 7 payload dwords then the header; poll the header for the reply."""
        for off in range(0, 32, 4):
            self.port.write32(EMU_SHMEM_OFFSET + off, int.from_bytes(raw[off:off + 4], "little"))
        deadline = time.monotonic() + self.timeout
        while True:
            hdr = SmcProtoHdr.from_int(self.port.read32(SHMEM_HDR))
            if not hdr.owner_is_pf or time.monotonic() > deadline:
                return hdr

    def establish_hwc(self, msix: int = 0) -> SmcProtoHdr:
        self.hwc_pages = [self.pages.alloc() for _ in range(6)]
        eq, cq, rq, sq, self.req_page, self.resp_page = self.hwc_pages
        self.hwc_msix = msix
        self.irq(msix)
        hdr = self.smc_write(EstablishHwc.build(eq >> 12, cq >> 12, rq >> 12, sq >> 12, msix=msix).to_bytes())
        if hdr.status or not hdr.is_response:
            return hdr
        eq_ring = ConsumerRing(self.mem, eq, PAGE_SIZE, 16)
        ids: dict[int, int] = {}
        self.bringup_eqes = []
        deadline = time.monotonic() + self.timeout
        while True:
            raw = eq_ring.poll()
            if raw is None:
                assert time.monotonic() < deadline, "bring-up EQEs missing"
                wait_eventfd(self.irq(msix), 0.1)
                continue
            self.bringup_eqes.append(raw)
            ty, payload = eqe_type(raw), int.from_bytes(raw[:4], "little")
            if ty == GDMA_EQE_HWC_INIT_EQ_ID_DB:
                eq_ring.id = HwcInitEqIdDb.from_int(payload).eq_id
                self.db_id = HwcInitEqIdDb.from_int(payload).doorbell
            elif ty == GDMA_EQE_HWC_INIT_DATA:
                data = HwcInitTypeData.from_int(payload)
                ids[data.ty] = data.value
            elif ty == GDMA_EQE_HWC_INIT_DONE:
                break
        self.hwc_eq = eq_ring
        self.hwc_cq = ConsumerRing(self.mem, cq, PAGE_SIZE, 64, ids[HWC_INIT_DATA_CQID])
        self.hwc_rq = WqRing(self.mem, rq, PAGE_SIZE, ids[HWC_INIT_DATA_RQID])
        self.hwc_sq = WqRing(self.mem, sq, PAGE_SIZE, ids[HWC_INIT_DATA_SQID])
        self.hwc_pdid, self.hwc_mkey = ids[HWC_INIT_DATA_PDID], ids[HWC_INIT_DATA_GPA_MKEY]
        self.ring_cq_eq(DB_EQ, eq_ring, arm=False)
        self.post_hwc_rwqe()
        return hdr

    def hwc_ids(self) -> dict:
        return {"eq": self.hwc_eq.id, "cq": self.hwc_cq.id, "rq": self.hwc_rq.id, "sq": self.hwc_sq.id}

    def post_hwc_rwqe(self) -> None:
        wqe = HwcRecvWqe(header=WqeHeader(params=WqeParams.from_int(DRV_HWC_RWQE_PARAMS)),
                         sge=Sge(address=self.resp_page, mem_key=self.hwc_mkey, size=PAGE_SIZE))
        self.hwc_rq.put(wqe.to_bytes())
        self.ring_wq(DB_RQ, self.hwc_rq, num_rwqe=1)

    def destroy_hwc(self) -> SmcProtoHdr:
        hdr = SmcProtoHdr(msg_type=SMC_MSG_TYPE_DESTROY_HWC)
        return self.smc_write(bytes(28) + hdr.to_bytes())

    # -- HWC requests -----------------------------------------------------------------------------
    def send_request(self, code: int, body: bytes = b"", dev_id: int = HWC_DEV_ID, resp_size: int | None = None,
                     *, raw_hdr: bytes | None = None, sge_size: int | None = None,
                     vscq_id: int | None = None) -> tuple[GdmaRespHdr, bytes, list[bytes]]:
        """One HWC exchange (§8.3); returns (response header, response body, the two CQEs)."""
        spec = MESSAGES.get(code)
        if resp_size is None:
            resp_size = ctypes.sizeof(spec.response) if spec and spec.response else 0
        self.activity_id = (self.activity_id + 1) & 0xFFFFFFFF
        if raw_hdr is None:
            if spec is None:
                hdr = request_header(GDMA_QUERY_MAX_RESOURCES, dev_id, self.activity_id, req_body_size=len(body),
                                     resp_body_size=resp_size)
                hdr.req.msg_type = hdr.resp.msg_type = code
            else:
                hdr = request_header(code, dev_id, self.activity_id, req_body_size=len(body),
                                     resp_body_size=resp_size)
            raw_hdr = hdr.to_bytes()
        request = raw_hdr + body
        self.mem.write(self.req_page, request)
        self.mem.write(self.resp_page, bytes(32 + min(resp_size, PAGE_SIZE - 32)))
        wqe = HwcSendWqe(header=WqeHeader(params=WqeParams.from_int(DRV_HWC_SWQE_PARAMS)),
                         sge=Sge(address=self.req_page, mem_key=self.hwc_mkey,
                                 size=len(request) if sge_size is None else sge_size))
        wqe.oob.flags3 = HwcTxOobFlags3(vscq_id=self.hwc_cq.id if vscq_id is None else vscq_id)
        wqe.oob.flags4 = HwcTxOobFlags4(vsq_id=self.hwc_sq.id)
        self.hwc_sq.put(wqe.to_bytes())
        self.ring_wq(DB_SQ, self.hwc_sq)
        cqes = self.wait_cqes(self.hwc_cq, 2, self.hwc_eq, self.hwc_msix)
        self.post_hwc_rwqe()
        resp = GdmaRespHdr.from_bytes(self.mem.read(self.resp_page, 32))
        return resp, self.mem.read(self.resp_page + 32, min(resp_size, PAGE_SIZE - 32)), cqes

    def request(self, code: int, body: bytes = b"", dev_id: int = HWC_DEV_ID, resp_size: int | None = None,
                resp_cls=None):
        """Request that must succeed; returns the response body (parsed with `resp_cls` if given)."""
        resp, data, _ = self.send_request(code, body, dev_id, resp_size)
        if resp.status:
            raise HwcError(code, resp.status)
        return resp_cls.from_bytes(data) if resp_cls else data

    def mana(self, code: int, body: bytes = b"", resp_cls=None, resp_size: int | None = None):
        return self.request(code, body, MANA_DEV_ID, resp_size, resp_cls)

    def bring_up(self) -> None:
        """§13.1 steps 1–11 (HWC, resources, device list, register, device config)."""
        hdr = self.establish_hwc()
        assert hdr.is_response and hdr.status == 0, hdr
        self.request(GDMA_QUERY_MAX_RESOURCES)
        self.request(GDMA_LIST_DEVICES)
        reg = self.request(GDMA_REGISTER_DEVICE, dev_id=MANA_DEV_ID, resp_cls=GdmaRegisterDeviceResp)
        self.pdid, self.gpa_mkey, self.db_id = reg.pdid, reg.gpa_mkey, reg.db_id
        self.mana(MANA_QUERY_DEV_CONFIG, ManaQueryDeviceCfgReq(proto_major_ver=1).to_bytes())

    def create_dma_region(self, gpa: int, length: int) -> int:
        req = GdmaCreateDmaRegionReqDriver()
        n = (length + PAGE_SIZE - 1) // PAGE_SIZE
        req.req.length, req.req.offset_in_page, req.req.gdma_page_type = length, 0, GDMA_PAGE_TYPE_4K
        req.req.page_count = req.req.page_addr_list_len = n
        for i in range(n):
            req.page_addr_list[i] = gpa + i * PAGE_SIZE
        return int.from_bytes(self.request(GDMA_CREATE_DMA_REGION, req.to_bytes(), MANA_DEV_ID), "little")

    def create_eq(self, size: int = PAGE_SIZE, msix: int = 1) -> ConsumerRing:
        gpa = self.pages.alloc(size // PAGE_SIZE)
        region = self.create_dma_region(gpa, size)
        req = GdmaCreateQueueReq(queue_type=GDMA_EQ, pdid=self.pdid, doorbell_id=self.db_id, gdma_region=region,
                                 queue_size=size, eq_pci_msix_index=msix)
        qid = self.request(GDMA_CREATE_QUEUE, req.to_bytes(), MANA_DEV_ID, resp_cls=GdmaCreateQueueResp).queue_index
        self.irq(msix)
        return ConsumerRing(self.mem, gpa, size, 16, qid)

    def disable_eq(self, eq: ConsumerRing) -> None:
        self.request(GDMA_DISABLE_QUEUE, GdmaDisableQueueReq(queue_type=GDMA_EQ, queue_index=eq.id,
                                                             alloc_res_id_on_creation=1).to_bytes(), MANA_DEV_ID)


class VportQueues:
    """One vport with an EQ, a TX SQ/CQ and an RX RQ/CQ (§13.1 steps 12–24) and buffer slots."""

    def __init__(self, drv: TestDriver, index: int = 0, msix: int = 1, *, sq_size: int = 16384,
                 rq_size: int = 32768, cq_size: int = 16384, buf_size: int = 2048):
        self.drv, self.index, self.msix, self.buf_size = drv, index, msix, buf_size
        mem, pages = drv.mem, drv.pages
        cfg = drv.mana(MANA_QUERY_VPORT_CONFIG, ManaQueryVportCfgReq(vport_index=index).to_bytes(),
                       ManaQueryVportCfgResp)
        self.mac, self.handle = bytes(cfg.mac_addr), cfg.vport
        tx = drv.mana(MANA_CONFIG_VPORT_TX, ManaConfigVportReq(vport=self.handle, pdid=drv.pdid,
                                                                doorbell_pageid=drv.db_id).to_bytes(),
                      ManaConfigVportResp)
        self.tx_vport_offset = tx.tx_vport_offset
        self.eq = drv.create_eq(msix=msix)
        self.sq, self.tx_cq, self.tx_obj = self._create_wq(GDMA_SQ, sq_size, cq_size)
        self.rq, self.rx_cq, self.rx_obj = self._create_wq(GDMA_RQ, rq_size, cq_size)
        self.tx_slots, self.rx_slots = sq_size // 32, rq_size // 32
        self.tx_bufs = pages.alloc(self.tx_slots * buf_size // PAGE_SIZE)
        self.rx_bufs = pages.alloc(self.rx_slots * buf_size // PAGE_SIZE)
        self.tx_posted = 0
        self.rx_posted = 0
        self.rx_done = 0
        self.mem = mem

    def _create_wq(self, wq_type: int, wq_size: int, cq_size: int):
        drv = self.drv
        wq_gpa, cq_gpa = drv.pages.alloc(wq_size // PAGE_SIZE), drv.pages.alloc(cq_size // PAGE_SIZE)
        req = ManaCreateWqobjReq(vport=self.handle, wq_type=wq_type, wq_gdma_region=drv.create_dma_region(wq_gpa, wq_size),
                                 cq_gdma_region=drv.create_dma_region(cq_gpa, cq_size), wq_size=wq_size,
                                 cq_size=cq_size, cq_parent_qid=self.eq.id)
        resp = drv.mana(MANA_CREATE_WQ_OBJ, req.to_bytes(), ManaCreateWqobjResp)
        return (WqRing(drv.mem, wq_gpa, wq_size, resp.wq_id), ConsumerRing(drv.mem, cq_gpa, cq_size, 64, resp.cq_id),
                resp.wq_obj)

    def config_rx(self, enable: int = Tristate.TRUE, status_ok: bool = True):
        req = ManaCfgRxSteerReqDriver()
        req.req.vport, req.req.rx_enable = self.handle, enable
        req.req.rss_enable = Tristate.FALSE if enable == Tristate.TRUE else Tristate.UNKNOWN
        req.req.indir_tab_offset = CFG_RX_INDIR_TAB_OFFSET
        if enable == Tristate.TRUE:
            req.req.update_default_rxobj, req.req.default_rxobj = 1, self.rx_obj
        return self.drv.send_request(MANA_CONFIG_VPORT_RX, req.to_bytes(), MANA_DEV_ID)[0].status

    def start(self, rx_buffers: int = 256) -> None:
        assert self.config_rx() == 0
        self.post_rx(rx_buffers)

    def stop_and_destroy(self) -> None:
        assert self.config_rx(Tristate.FALSE) == 0
        for wq_type, obj in ((GDMA_RQ, self.rx_obj), (GDMA_SQ, self.tx_obj)):
            self.drv.mana(MANA_DESTROY_WQ_OBJ, ManaDestroyWqobjReq(wq_type=wq_type, wq_obj_handle=obj).to_bytes())
        self.drv.disable_eq(self.eq)

    # -- RX ---------------------------------------------------------------------------------------
    def rx_buf(self, n: int) -> int:
        return self.rx_bufs + (n % self.rx_slots) * self.buf_size

    def post_rx(self, count: int, *, address: int | None = None, size: int | None = None) -> None:
        for _ in range(count):
            wqe = ManaRxWqeOneSge(header=WqeHeader(params=WqeParams(num_sgl_entries=1,
                                                                     inline_client_oob_size=CLIENT_OOB_8)))
            wqe.sge = Sge(address=self.rx_buf(self.rx_posted) if address is None else address,
                          mem_key=self.drv.gpa_mkey, size=self.buf_size if size is None else size)
            self.rq.put(wqe.to_bytes())
            self.rx_posted += 1
        self.drv.ring_wq(DB_RQ, self.rq, num_rwqe=count)

    def poll_rx(self) -> list[tuple[int, bytes]]:
        """(cqe_type, frame bytes) of every new RX completion, oldest first."""
        out = []
        while (raw := self.rx_cq.poll()) is not None:
            oob = ManaRxcompOob.from_bytes(raw)
            n = oob.ppi[0].pkt_len
            out.append((oob.cqe_hdr.cqe_type, self.mem.read(self.rx_buf(self.rx_done), min(n, self.buf_size))))
            self.rx_done += 1
        return out

    def wait_rx(self, n: int) -> list[tuple[int, bytes]]:
        out = self.poll_rx()
        if len(out) < n:
            for raw in self.drv.wait_cqes(self.rx_cq, n - len(out), self.eq, self.msix):
                oob = ManaRxcompOob.from_bytes(raw)
                out.append((oob.cqe_hdr.cqe_type,
                            self.mem.read(self.rx_buf(self.rx_done), min(oob.ppi[0].pkt_len, self.buf_size))))
                self.rx_done += 1
        return out

    # -- TX ---------------------------------------------------------------------------------------
    def tx_wqe(self, address: int, size: int, *, long_oob: ManaTxOob | None = None) -> bytes:
        if long_oob is not None:
            params = WqeParams(num_sgl_entries=1, inline_client_oob_size=CLIENT_OOB_24)
            return (WqeHeader(params=params).to_bytes() + long_oob.to_bytes()
                    + Sge(address=address, mem_key=self.drv.gpa_mkey, size=size).to_bytes()).ljust(64, b"\0")
        params = WqeParams(num_sgl_entries=1, inline_client_oob_size=CLIENT_OOB_8)
        oob = ManaTxShortOob(pkt_fmt=0, vcq_num=self.tx_cq.id, vsq_frame=(self.sq.id >> 10) & 0x3FFF,
                             short_vp_offset=self.tx_vport_offset)
        return (WqeHeader(params=params).to_bytes() + oob.to_bytes()
                + Sge(address=address, mem_key=self.drv.gpa_mkey, size=size).to_bytes())

    def send(self, frames: list[bytes], **wqe_kwargs) -> None:
        """Copy frames into TX slots, one WQE each, one SQ doorbell for the batch."""
        for frame in frames:
            buf = self.tx_bufs + (self.tx_posted % self.tx_slots) * self.buf_size
            self.mem.write(buf, frame)
            self.sq.put(self.tx_wqe(buf, len(frame), **wqe_kwargs))
            self.tx_posted += 1
        self.drv.ring_wq(DB_SQ, self.sq)

    def send_raw_wqe(self, wqe: bytes) -> None:
        self.sq.put(wqe)
        self.drv.ring_wq(DB_SQ, self.sq)

    def poll_tx(self) -> list[int]:
        out = []
        while (raw := self.tx_cq.poll()) is not None:
            out.append(ManaTxCompOob.from_bytes(raw).cqe_hdr.cqe_type)
        return out

    def wait_tx(self, n: int) -> list[int]:
        out = self.poll_tx()
        if len(out) < n:
            out += [ManaTxCompOob.from_bytes(raw).cqe_hdr.cqe_type
                    for raw in self.drv.wait_cqes(self.tx_cq, n - len(out), self.eq, self.msix)]
        return out


def frame(dst: bytes, src: bytes, seq: int, size: int = 64) -> bytes:
    """An Ethernet frame (ethertype 0x88B5, local experimental) carrying a sequence number."""
    payload = seq.to_bytes(8, "little")
    return (dst + src + b"\x88\xb5" + payload).ljust(size, b"\xa5")
