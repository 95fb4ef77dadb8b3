"""GDMA driver: BAR0, the SMC mailbox, the hardware channel (HWC) and the GDMA requests (gdma spec 3-9).

One `GdmaDriver` owns one device handle. It is built either fresh (`new`: ESTABLISH_HWC and the HWC
bring-up events) or from saved state (`restore`: re-attach to the HWC the device kept alive). HWC
requests are serialised by a lock; one request is outstanding at a time, matched positionally.
"""
from __future__ import annotations

import ctypes
import logging
import os
import random
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from vfkeep import __version__
from vfkeep.gdma.base import WireStruct
from vfkeep.gdma.constants import (
    DRV_DISABLE_QUEUE_ALLOC_RES_ID, DRV_DMA_REGION_MAX_PAGES, DRV_GD_DRV_CAP_FLAGS1, DRV_GDMA_PROTOCOL_VER,
    DRV_HWC_CQ_PAGE, DRV_HWC_EQ_PAGE, DRV_HWC_MSIX, DRV_HWC_NUM_PAGES, DRV_HWC_REQUEST_PAGE, DRV_HWC_RESPONSE_PAGE,
    DRV_HWC_RQ_PAGE, DRV_HWC_RWQE_PARAMS, DRV_HWC_SQ_PAGE, DRV_HWC_SWQE_PARAMS, DRV_HWC_SWQE_SIZE,
    GDMA_CHANGE_MSIX_FOR_EQ, GDMA_CREATE_DMA_REGION, GDMA_CREATE_QUEUE, GDMA_DEREGISTER_DEVICE,
    GDMA_DESTROY_DMA_REGION, GDMA_DEVICE_MANA, GDMA_DISABLE_QUEUE, GDMA_EQ, GDMA_EQE_COMPLETION,
    GDMA_EQE_HWC_INIT_DATA, GDMA_EQE_HWC_INIT_DONE, GDMA_EQE_HWC_INIT_EQ_ID_DB, GDMA_EQE_HWC_RECONFIG_DATA,
    GDMA_EQE_HWC_RESET_REQUEST, GDMA_EQE_TEST_EVENT, GDMA_GENERATE_TEST_EQE, GDMA_LIST_DEVICES, GDMA_PAGE_TYPE_4K,
    GDMA_QUERY_MAX_RESOURCES, GDMA_REGISTER_DEVICE, GDMA_VERIFY_VF_DRIVER_VERSION, HWC_DATA_CONFIG_HWC_TIMEOUT,
    HWC_DATA_TYPE_HW_VPORT_LINK_CONNECT, HWC_DATA_TYPE_HW_VPORT_LINK_DISCONNECT, HWC_DEV_ID, HWC_INIT_DATA_CQID,
    HWC_INIT_DATA_GPA_MKEY, HWC_INIT_DATA_PDID, HWC_INIT_DATA_RQID, HWC_INIT_DATA_SQID,
    HWC_INTERRUPT_POLL_WAIT_MAX_MS, HWC_INTERRUPT_POLL_WAIT_MIN_MS, HWC_POLL_TIMEOUT_IN_MS,
    HWC_TIMEOUT_DEFAULT_IN_MS, HWC_WARNING_INCREASE_IN_MS, HWC_WARNING_TIME_IN_MS, OS_TYPE_OHCL, PAGE_SIZE,
    RWQE_SIZE, SMC_HDR_OFFSET, SMC_MSG_TYPE_DESTROY_HWC, SMC_MSG_TYPE_DESTROY_HWC_VERSION,
    SMC_MSG_TYPE_ESTABLISH_HWC, SMC_MSG_TYPE_REPORT_HWC_TIMEOUT, SMC_MSG_TYPE_REPORT_HWC_TIMEOUT_VERSION,
    request_name)
from vfkeep.gdma.codec import SGE_SIZE_AT
from vfkeep.gdma.hwc import (GdmaDevId, GdmaReqHdr, GdmaRespHdr, HwcInitEqIdDb, HwcInitTypeData, HwcRecvWqe,
                             HwcSendWqe)
from vfkeep.gdma.messages import RESP_HDR_SIZE, message_spec, request_header
from vfkeep.gdma.queues import EqeCompletionData, EqeDataReconfig, EqeVfReset, Sge, WqeParams
from vfkeep.gdma.regs import (EstablishHwc, RegMap, SmcProtoHdr, SmcReportHwcTimeout, SmcReportHwcTimeoutFlags,
                              doorbell_page_count, doorbell_shift)
from vfkeep.gdma.requests import (GdmaChangeMsixVectorIndexForEq, GdmaCreateDmaRegionReq,
                                  GdmaCreateDmaRegionReqDriver, GdmaCreateQueueReq, GdmaDestroyDmaRegionReq,
                                  GdmaDisableQueueReq, GdmaGenerateTestEventReq, GdmaListDevicesResp,
                                  GdmaRegisterDeviceResp, GdmaVerifyVerReq)
from vfkeep.log import kv
from vfkeep.proto import mana_driver_pb2

from .backing import DeviceBacking, DmaBuffer, Interrupts, contiguous, dma_address, posted_batch
from .errors import (DEVICE_ERRORS, BadRegisterMap, BringUpError, DeviceMissing, HwcFailure, HwcTimeout,
                     ResetRequestPending, SaveFailed, SaveRefusedHwcFailure, SaveRefusedResetPending, SmcError)
from .queues import U32, CqEq, DoorbellPage, Wq

log = logging.getLogger("vfkeep.driver.gdma")

ALL_ONES32 = 0xFFFFFFFF
REGMAP_SIZE = ctypes.sizeof(RegMap)
SMC_WINDOW_SIZE = 32
HWC_BUFFER_LEN = DRV_HWC_NUM_PAGES * PAGE_SIZE
PRODUCT_NAME = b"vfkeep"
_U32 = struct.Struct("<I")
#: Where a send WQE's SGE size and a request header's activity id are: the two fields a request patches into
#: its templates (`GdmaDriver._templates`).
_SWQE_SIZE_AT = HwcSendWqe.sge.offset + SGE_SIZE_AT
_ACTIVITY_ID_AT = GdmaReqHdr.activity_id.offset
#: After an HWC interrupt that came with the first CQE of an answer, how long to poll for the second (the
#: device posts it within the same step) before arming and sleeping again: two doorbells saved per request.
SECOND_CQE_SPIN_S = 0.0002


@dataclass(frozen=True)
class Bar0Layout:
    """What the register map says about BAR0 (gdma spec 3.4)."""

    bar0_len: int
    db_zone_offset: int
    db_shift: int
    db_page_count: int
    shmem_offset: int
    major_version: int


def map_bar0(backing: DeviceBacking) -> Bar0Layout:
    """Read `RegMap` and apply the reference driver's checks (gdma spec 3.4). One 40-byte read (3.2: any size
    inside the map; the reference driver's ten dword reads would be ten round trips here)."""
    bar0_len = backing.bar0_len
    if bar0_len < REGMAP_SIZE:
        raise BadRegisterMap(f"BAR0 is {bar0_len} bytes, the register map needs {REGMAP_SIZE}")
    return bar0_layout(bar0_len, backing.read(0, REGMAP_SIZE))


def bar0_layout(bar0_len: int, raw: bytes) -> Bar0Layout:
    """`map_bar0`'s checks of `raw`, the register map read from a BAR0 of `bar0_len` bytes: its layout, else
    BadRegisterMap (DeviceMissing when it reads all ones)."""
    if bar0_len < REGMAP_SIZE or len(raw) != REGMAP_SIZE:
        raise BadRegisterMap(f"a register map of {len(raw)} bytes in a BAR0 of {bar0_len}: it has {REGMAP_SIZE}")
    if int.from_bytes(raw[:4], "little") == ALL_ONES32:
        raise DeviceMissing("device not present: BAR0 register map reads all ones")
    regs = RegMap.from_bytes(raw)
    if regs.vf_gdma_sriov_shared_sz != SMC_WINDOW_SIZE:
        raise BadRegisterMap(f"vf_gdma_sriov_shared_sz is {regs.vf_gdma_sriov_shared_sz}, expected {SMC_WINDOW_SIZE}")
    start = regs.vf_gdma_sriov_shared_reg_start
    if start > bar0_len or bar0_len - start < SMC_WINDOW_SIZE:
        raise BadRegisterMap(f"shared memory window at {start:#x} does not fit BAR0 of {bar0_len:#x} bytes")
    try:
        shift = doorbell_shift(regs.vf_db_page_sz)
    except ValueError as e:
        raise BadRegisterMap(str(e)) from None
    if regs.major_version_number not in (0, 1):
        kv(log, logging.WARNING, "unexpected gdma interface major version", major=regs.major_version_number)
    return Bar0Layout(bar0_len, regs.vf_db_pages_zone_offset, shift,
                      doorbell_page_count(bar0_len, regs.vf_db_pages_zone_offset, shift), start,
                      regs.major_version_number)


@dataclass
class HwcQueues:
    """The four HWC queues on pages 0-3 of the HWC buffer."""

    eq: CqEq
    cq: CqEq
    rq: Wq
    sq: Wq


@dataclass
class EventState:
    """Asynchronous HWC EQ events the driver has seen and not yet handed on."""

    test_events: int = 0
    reset_pending: bool = False
    revoke_vtl0_vf: bool = False
    link_toggle: list[tuple[int, bool]] = field(default_factory=list)


class GdmaDriver:
    """Owns the device handle, the HWC and its memory; issues GDMA requests and forwards BNIC ones."""

    def __init__(self, backing: DeviceBacking, layout: Bar0Layout, hwc_mem: DmaBuffer):
        self.backing = backing
        self.layout = layout
        self.hwc_mem = hwc_mem
        self.irq = Interrupts(backing)
        self._lock = threading.RLock()
        page = hwc_mem.view
        self._req_page = page[DRV_HWC_REQUEST_PAGE * PAGE_SIZE:(DRV_HWC_REQUEST_PAGE + 1) * PAGE_SIZE]
        self._resp_page = page[DRV_HWC_RESPONSE_PAGE * PAGE_SIZE:(DRV_HWC_RESPONSE_PAGE + 1) * PAGE_SIZE]
        # Each of the six pages is addressed on its own: the buffer's pages need not be consecutive.
        self._req_addr = dma_address(hwc_mem, DRV_HWC_REQUEST_PAGE * PAGE_SIZE, PAGE_SIZE)
        self._resp_addr = dma_address(hwc_mem, DRV_HWC_RESPONSE_PAGE * PAGE_SIZE, PAGE_SIZE)
        self.hwc: HwcQueues | None = None
        self.established = False  # the device has an HWC on this buffer
        self.db_id = 0
        self.pdid = 0
        self.gpa_mkey = 0
        self.activity_id = 0
        self.num_msix = 1
        self.min_queue_avail = 0
        self.events = EventState()
        self.hwc_failure = False
        self.saved = False
        self.gone = False  # the function vanished (surprise removal): nothing is sent to it any more
        self.closed = False
        self.hwc_timeout_ms = HWC_TIMEOUT_DEFAULT_IN_MS
        self._warning_ms = HWC_WARNING_TIME_IN_MS
        self._wqe_key: tuple[int, int, int] | None = None
        self._send_wqe = self._recv_wqe = b""
        self._headers: dict[tuple[int, int], bytes] = {}

    # -- construction -----------------------------------------------------------------------
    @classmethod
    def new(cls, backing: DeviceBacking, *, num_vps: int) -> GdmaDriver:
        """Fresh init: validate BAR0, ESTABLISH_HWC on a new 6-page buffer from the device's default DMA
        client (the persistent one when it has one: that is what makes the driver savable), consume the
        bring-up events, post the first receive WQE and query the device's limits (gdma spec 7.3). On
        failure the backing is closed and the buffer freed."""
        try:
            layout = map_bar0(backing)
            mem = backing.dma.default.allocate_dma_buffer(HWC_BUFFER_LEN)
        except BaseException:
            backing.close()
            raise
        drv = cls(backing, layout, mem)
        try:
            drv._establish_hwc(num_vps)
            drv._query_max_resources(num_vps)
        except BaseException:
            drv.close()
            raise
        return drv

    @classmethod
    def restore(cls, backing: DeviceBacking, layout: Bar0Layout, hwc_mem: DmaBuffer,
                state: mana_driver_pb2.GdmaDriverSavedState, vectors: tuple[int, ...] = ()) -> GdmaDriver:
        """Re-attach to an HWC the device kept alive, from state `save_restore.validate_gdma_state` accepted:
        the four queues on pages 0-3 of `hwc_mem`, no ESTABLISH_HWC, no bring-up events, no new receive WQE
        (the posted one is in the saved RQ indices); map vector 0 and arm the EQ and CQ (spec 6.3, gdma 13.3).
        `vectors`: those of kept vports and of vports to be opened, mapped in the same exchange as vector 0."""
        drv = cls(backing, layout, hwc_mem)
        s = state
        eq = CqEq.restore("eq", s.eq, drv.queue_memory(DRV_HWC_EQ_PAGE), drv.doorbell_page(s.eq.doorbell.doorbell_id))
        cq = CqEq.restore("cq", s.cq, drv.queue_memory(DRV_HWC_CQ_PAGE), drv.doorbell_page(s.cq.doorbell.doorbell_id))
        rq = Wq.restore("rq", s.rq, drv.queue_memory(DRV_HWC_RQ_PAGE), drv.doorbell_page(s.rq.doorbell.doorbell_id))
        sq = Wq.restore("sq", s.sq, drv.queue_memory(DRV_HWC_SQ_PAGE), drv.doorbell_page(s.sq.doorbell.doorbell_id))
        drv.established = True
        drv.hwc = HwcQueues(eq, cq, rq, sq)
        drv.db_id, drv.pdid, drv.gpa_mkey = s.db_id, s.pdid, s.gpa_mkey
        drv.activity_id, drv.num_msix, drv.min_queue_avail = s.hwc_activity_id, s.num_msix, s.min_queue_avail
        drv.events.link_toggle = [(t.vport_index, t.link_up) for t in s.link_toggle]
        drv.irq.map(DRV_HWC_MSIX, *vectors)
        eq.doorbell.ring_many([eq.arm_write(), cq.arm_write()])
        kv(log, logging.INFO, "gdma driver restored", eq=eq.id, cq=cq.id, rq=rq.id, sq=sq.id,
           base_pfn=hwc_mem.base_pfn, activity_id=hex(drv.activity_id))
        return drv

    def queue_memory(self, page_index: int) -> memoryview:
        return self.hwc_mem.view[page_index * PAGE_SIZE:(page_index + 1) * PAGE_SIZE]

    def doorbell_page(self, page_id: int) -> DoorbellPage:
        return DoorbellPage(self.backing, self.layout.db_zone_offset, self.layout.db_shift, page_id,
                            self.layout.db_page_count)

    # -- SMC mailbox (gdma spec 5) ------------------------------------------------------------
    def _smc_header(self) -> SmcProtoHdr:
        value = self.backing.read32(self.layout.shmem_offset + SMC_HDR_OFFSET)
        if value == ALL_ONES32:
            raise DeviceMissing("device no longer present: SMC header reads all ones")
        return SmcProtoHdr.from_int(value)

    def _smc_wait_vf_owner(self, what: str) -> None:
        deadline = time.monotonic() + HWC_POLL_TIMEOUT_IN_MS / 1000
        delay = 0.0001
        while self._smc_header().owner_is_pf:
            if time.monotonic() >= deadline:
                raise SmcError(f"{what}: the PF still owns the SMC mailbox after {HWC_POLL_TIMEOUT_IN_MS} ms", 0)
            time.sleep(delay)
            delay = min(delay * 2, 0.01)

    def posted_batch(self):
        """Context in which the posted writes to this device reach it together at its end, in order (the backing's
        `posted_batch`; at once where it has none): one message burst, one device wake-up."""
        return posted_batch(self.backing)

    def _smc_send(self, msg_type: int, hdr: SmcProtoHdr, payload: bytes | None, what: str) -> None:
        """Write the payload dwords, then the header (the "go" signal), and wait for a successful reply. The writes
        are posted, as MMIO writes are, and leave as one burst: the header read that follows comes after them
        (the device takes its messages in order), so a message costs one round trip, not one per dword."""
        base = self.layout.shmem_offset
        with self.posted_batch():
            if payload is not None:
                for i in range(0, SMC_HDR_OFFSET, 4):
                    self.backing.write32(base + i, int.from_bytes(payload[i:i + 4], "little"), posted=True)
            self.backing.write32(base + SMC_HDR_OFFSET, hdr.to_int(), posted=True)
        deadline = time.monotonic() + HWC_POLL_TIMEOUT_IN_MS / 1000
        delay = 0.0
        while True:
            reply = self._smc_header()
            if not reply.owner_is_pf and reply.is_response:
                break
            if time.monotonic() >= deadline:
                raise SmcError(f"{what}: no SMC reply within {HWC_POLL_TIMEOUT_IN_MS} ms", msg_type)
            time.sleep(delay)
            delay = min(max(delay * 2, 0.0001), 0.01)
        if reply.status != 0:
            raise SmcError(f"{what} refused by the device (SMC status {reply.status})", msg_type, reply.status)

    # -- HWC bring-up (gdma spec 7) -----------------------------------------------------------
    def _establish_hwc(self, num_vps: int) -> None:
        pfns = self.hwc_mem.pfns
        # The HWC's vector and those the vports may use (at most one each: 1 .. num_vps - 1), in one exchange, not
        # one more round trip per vport opened.
        self.irq.map(DRV_HWC_MSIX, *range(1, min(num_vps, self.backing.msix_count)))
        msg = EstablishHwc.build(pfns[DRV_HWC_EQ_PAGE], pfns[DRV_HWC_CQ_PAGE], pfns[DRV_HWC_RQ_PAGE],
                                 pfns[DRV_HWC_SQ_PAGE], msix=DRV_HWC_MSIX)
        raw = msg.to_bytes()
        self._smc_send(SMC_MSG_TYPE_ESTABLISH_HWC, msg.hdr, raw[:SMC_HDR_OFFSET], "ESTABLISH_HWC")
        self.established = True
        eq = CqEq("eq", self.queue_memory(DRV_HWC_EQ_PAGE), 0, None)
        init = self._consume_init_events(eq)
        try:
            doorbell = self.doorbell_page(init["db"])
        except ValueError as e:
            raise BringUpError(f"HWC doorbell: {e}") from None
        eq.bind(init["eq"], doorbell)
        eq.ack()
        self.hwc = HwcQueues(
            eq,
            CqEq("cq", self.queue_memory(DRV_HWC_CQ_PAGE), init["cq"], doorbell),
            Wq("rq", self.queue_memory(DRV_HWC_RQ_PAGE), init["rq"], doorbell),
            Wq("sq", self.queue_memory(DRV_HWC_SQ_PAGE), init["sq"], doorbell),
        )
        self.pdid, self.gpa_mkey = init["pdid"], init["gpa_mkey"]
        self.activity_id = random.getrandbits(16) << 16
        self._post_receive_wqe()
        kv(log, logging.INFO, "hwc established", eq=init["eq"], cq=init["cq"], rq=init["rq"], sq=init["sq"],
           db=init["db"], base_pfn=self.hwc_mem.base_pfn, persistent=self.hwc_mem.persistent)

    def _consume_init_events(self, eq: CqEq) -> dict[str, int]:
        """Read EQEs 129/130/131 off the not-yet-identified HWC EQ, waiting on vector 0 when it is empty."""
        init: dict[str, int] = {}
        deadline = time.monotonic() + HWC_TIMEOUT_DEFAULT_IN_MS / 1000
        names = {HWC_INIT_DATA_CQID: "cq", HWC_INIT_DATA_RQID: "rq", HWC_INIT_DATA_SQID: "sq",
                 HWC_INIT_DATA_PDID: "pdid", HWC_INIT_DATA_GPA_MKEY: "gpa_mkey"}
        interval = HWC_INTERRUPT_POLL_WAIT_MIN_MS / 1000
        while True:
            eqe = eq.poll()
            if eqe is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise BringUpError(f"HWC init events incomplete after {HWC_TIMEOUT_DEFAULT_IN_MS} ms: "
                                       f"have {sorted(init)}")
                self.irq.wait(DRV_HWC_MSIX, min(interval, remaining))
                interval = min(interval * 2, HWC_INTERRUPT_POLL_WAIT_MAX_MS / 1000)
                continue
            kind = eqe.params.event_type
            if kind == GDMA_EQE_HWC_INIT_EQ_ID_DB:
                ids = HwcInitEqIdDb.from_bytes(eqe.data)
                init["eq"], init["db"] = ids.eq_id, ids.doorbell
            elif kind == GDMA_EQE_HWC_INIT_DATA:
                data = HwcInitTypeData.from_bytes(eqe.data)
                if data.ty in names:
                    init[names[data.ty]] = data.value
            elif kind == GDMA_EQE_HWC_INIT_DONE:
                break
            else:
                raise BringUpError(f"unexpected event type {kind} during HWC bring-up")
        missing = [k for k in ("eq", "db", "cq", "rq", "sq", "pdid", "gpa_mkey") if k not in init]
        if missing:
            raise BringUpError(f"HWC init events did not provide {', '.join(missing)}")
        return init

    def _templates(self) -> tuple[bytes, bytes]:
        """(send WQE, receive WQE) of this HWC (gdma spec 7.4): every field is fixed by the HWC's ids, gpa_mkey
        and pages except the send SGE's size, which a request patches in. Built once, not per request."""
        hwc = self.hwc
        key = (self.gpa_mkey, hwc.cq.id, hwc.sq.id)
        if key != self._wqe_key:
            send = HwcSendWqe()
            send.header.params = WqeParams.from_int(DRV_HWC_SWQE_PARAMS)
            send.oob.flags3.vscq_id = hwc.cq.id
            send.oob.flags4.vsq_id = hwc.sq.id
            send.sge = Sge(address=self._req_addr, mem_key=self.gpa_mkey)
            recv = HwcRecvWqe()
            recv.header.params = WqeParams.from_int(DRV_HWC_RWQE_PARAMS)
            recv.sge = Sge(address=self._resp_addr, mem_key=self.gpa_mkey, size=PAGE_SIZE)
            self._wqe_key, self._send_wqe, self._recv_wqe = key, send.to_bytes(), recv.to_bytes()
        return self._send_wqe, self._recv_wqe

    def _request_header(self, code: int, dev_id: int | GdmaDevId) -> bytearray:
        """The `GdmaReqHdr` of `code` to `dev_id` (from `gdma.messages`, built once per pair), with the next
        activity id."""
        key = (code, dev_id if isinstance(dev_id, int) else dev_id.to_int())
        raw = self._headers.get(key)
        if raw is None:
            raw = self._headers[key] = request_header(code, dev_id, 0).to_bytes()
        self.activity_id = (self.activity_id + 1) & U32
        hdr = bytearray(raw)
        _U32.pack_into(hdr, _ACTIVITY_ID_AT, self.activity_id)
        return hdr

    def _post_receive_wqe(self, ring: bool = True) -> tuple[int, int]:
        """One 32-byte receive WQE whose SGE covers the response page (gdma spec 7.4); rings the RQ doorbell
        unless `ring` is False (then the caller rings the returned (address, value) with others)."""
        self.hwc.rq.write(self._templates()[1])
        doorbell = self.hwc.rq.commit_write(num_rwqe=1)
        if ring:
            self.hwc.rq.doorbell.ring(*doorbell)
        return doorbell

    def _query_max_resources(self, num_vps: int) -> None:
        r = self.request(GDMA_QUERY_MAX_RESOURCES, HWC_DEV_ID)
        self.num_msix = max(1, min(num_vps, r.max_msix, self.backing.msix_count))
        self.min_queue_avail = min(r.max_eq, r.max_sq, r.max_rq)

    # -- events ---------------------------------------------------------------------------------
    def process_events(self, ack: bool = True) -> int:
        """Handle every new HWC EQE, then acknowledge the EQ (arm = 0). Returns the number handled. A caller
        about to arm the EQ passes `ack=False`: the arm's doorbell reports the same consumption."""
        with self._lock:
            eq = self.hwc.eq
            n = 0
            while (eqe := eq.poll()) is not None:
                n += 1
                self._handle_event(eqe)
            if n and ack:
                eq.ack()
            return n

    def _handle_event(self, eqe) -> None:
        kind = eqe.params.event_type
        if kind == GDMA_EQE_COMPLETION:
            cq_id = EqeCompletionData.from_bytes(eqe.data).cq_id
            if cq_id != self.hwc.cq.id:
                kv(log, logging.WARNING, "completion event for an unknown cq on the hwc eq", cq=cq_id)
        elif kind == GDMA_EQE_TEST_EVENT:
            self.events.test_events += 1
        elif kind == GDMA_EQE_HWC_RECONFIG_DATA:
            data = EqeDataReconfig.from_bytes(eqe.data)
            value = int.from_bytes(bytes(data.data), "little")
            if data.data_type == HWC_DATA_CONFIG_HWC_TIMEOUT:
                kv(log, logging.INFO, "hwc timeout changed by the device", timeout_ms=value)
                self.hwc_timeout_ms = value
            elif data.data_type in (HWC_DATA_TYPE_HW_VPORT_LINK_CONNECT, HWC_DATA_TYPE_HW_VPORT_LINK_DISCONNECT):
                up = data.data_type == HWC_DATA_TYPE_HW_VPORT_LINK_CONNECT
                kv(log, logging.INFO, "vport link toggled", vport=value, up=up)
                self.events.link_toggle.append((value, up))
            else:
                kv(log, logging.WARNING, "unknown hwc reconfig data type", data_type=data.data_type)
        elif kind == GDMA_EQE_HWC_RESET_REQUEST:
            reset = EqeVfReset.from_bytes(eqe.data)
            kv(log, logging.WARNING, "vf reset requested by the device", revoke_vtl0_vf=reset.revoke_vtl0_vf)
            self.events.reset_pending = True
            self.events.revoke_vtl0_vf = bool(reset.revoke_vtl0_vf)
        else:
            kv(log, logging.WARNING, "unexpected event on the hwc eq", event_type=kind)

    def arm_events(self) -> bool:
        """Arm the HWC EQ so the next device event raises vector 0; False if events already wait (poll
        them instead of sleeping)."""
        with self._lock:
            self.irq.clear(DRV_HWC_MSIX)
            if self.process_events():
                return False
            self.hwc.eq.arm()
            return not self.hwc.eq.pending()

    def take_link_toggles(self) -> list[tuple[int, bool]]:
        with self._lock:
            toggles, self.events.link_toggle = self.events.link_toggle, []
            return toggles

    @property
    def reset_pending(self) -> bool:
        return self.events.reset_pending

    @property
    def silent_teardown(self) -> bool:
        """Teardown sends no request and no DESTROY_HWC: a VF reset request is pending (gdma spec 6.4: the
        reset reclaims everything) or the device is gone."""
        return self.events.reset_pending or self.gone

    def mark_gone(self) -> None:
        """The device was surprise-removed: requests fail locally from now on and teardown is silent."""
        with self._lock:
            self.gone = True

    def _wait_hwc(self, deadline: float, interval: float) -> tuple[float, bool]:
        """Arm the HWC EQ, re-poll it, then sleep on vector 0 for at most `interval` (gdma spec 6.6, 8.4).
        Returns the next interval and whether the sleep ended without an interrupt."""
        eq = self.hwc.eq
        eq.arm()
        if self.process_events():
            return interval, False
        remaining = deadline - time.monotonic()
        if remaining > 0 and not self.irq.wait(DRV_HWC_MSIX, min(interval, remaining)):
            # Nothing arrived: a vanished device would read all ones here instead of hanging until timeout.
            self._smc_header()
            return min(interval * 2, HWC_INTERRUPT_POLL_WAIT_MAX_MS / 1000), True
        return min(interval * 2, HWC_INTERRUPT_POLL_WAIT_MAX_MS / 1000), False

    # -- HWC requests (gdma spec 8) -------------------------------------------------------------
    def request(self, code: int, dev_id: int | GdmaDevId, body: WireStruct | None = None, *,
                timeout_ms: int | None = None, meanwhile: Callable[[], object] | None = None) -> WireStruct | None:
        """Send one request over the HWC and return the response body (None for empty responses).

        Body and response types come from `vfkeep.gdma.messages`. A non-zero status or a timeout marks
        the HWC failed; from then on (and while a reset request is pending) requests fail locally.

        `meanwhile` runs once the request is on its way (doorbells rung) and before its answer is awaited: CPU
        work that does not depend on the answer, done inside the device's latency rather than after it. It must
        not use the HWC. If it raises, the request is still completed and checked; its own error comes first,
        then `meanwhile`'s is raised (the device state the request made is the caller's to undo).
        """
        spec = message_spec(code)
        name = request_name(code)
        with self._lock:
            if self.closed:
                raise HwcFailure(f"{name}: the gdma driver is closed", code, None)
            if self.gone:
                raise DeviceMissing(f"{name}: the device is gone")
            self.process_events(ack=False)  # the EQ is armed below
            if self.events.reset_pending:
                raise ResetRequestPending(f"{name}: HWC reset request pending")
            if self.hwc_failure:
                raise HwcFailure(f"{name}: cannot use the HWC after an earlier HWC failure", code, None)
            hwc = self.hwc
            req, resp_size = self._request_header(code, dev_id), spec.resp_msg_size
            if body is not None:
                req += body.to_bytes()
            self._req_page[:len(req)] = req
            self._resp_page[:resp_size] = bytes(resp_size)
            wqe = bytearray(self._templates()[0])
            _U32.pack_into(wqe, _SWQE_SIZE_AT, len(req))
            if hwc.sq.available < DRV_HWC_SWQE_SIZE or hwc.rq.in_flight < RWQE_SIZE or hwc.rq.available < RWQE_SIZE:
                self.hwc_failure = True
                raise HwcFailure(f"{name}: HWC queues out of step (sq free {hwc.sq.available}, rq posted "
                                 f"{hwc.rq.in_flight})", code, None)
            start = time.monotonic()
            try:
                hwc.sq.write(wqe)
                # Spec 8.3 step 4 (a receive WQE to replace the one this request consumes) is done here, before
                # the request instead of after it, so its doorbell rides in the request's burst: one message
                # per request, and at rest one receive WQE stays posted as before.
                self._arm_hwc(self._post_receive_wqe(ring=False), hwc.sq.commit_write(), consumed=True)
                meanwhile_error = None
                if meanwhile is not None:
                    try:
                        meanwhile()
                    except Exception as e:  # noqa: BLE001 - raised once the request is complete
                        meanwhile_error = e
                interrupt_lost = self._wait_completions(code, name, start,
                                                        (timeout_ms or self.hwc_timeout_ms) / 1000)
                hwc.sq.advance_head(DRV_HWC_SWQE_SIZE)
                hwc.rq.advance_head(RWQE_SIZE)
                self.process_events(ack=False)  # the completion event the arm produced; the next arm reports it
            except BaseException:
                # The exchange is out of step with the device now: never save or reuse this HWC.
                self.hwc_failure = True
                raise
            elapsed_ms = (time.monotonic() - start) * 1000
            slow = elapsed_ms > self._warning_ms
            if slow or interrupt_lost:
                kv(log, logging.WARNING, "slow hwc response", request=name, elapsed_ms=round(elapsed_ms),
                   interrupt_loss=interrupt_lost)
                if slow:
                    self._warning_ms += HWC_WARNING_INCREASE_IN_MS
                self._report_hwc_timeout(elapsed_ms, last_cmd_failed=False, interrupt_loss=interrupt_lost)

            resp = GdmaRespHdr.from_bytes(self._resp_page)
            if resp.status != 0:
                self.hwc_failure = True
                raise HwcFailure(f"{name} failed with status {resp.status}", code, resp.status)
            body_size = resp_size - RESP_HDR_SIZE
            if resp.response.msg_size < body_size:
                self.hwc_failure = True
                raise HwcFailure(f"{name}: response of {resp.response.msg_size} bytes is shorter than the "
                                 f"{body_size}-byte body", code, None)
            if meanwhile_error is not None:
                raise meanwhile_error
            if spec.response is None:
                return None
            return spec.response.from_bytes(self._resp_page, RESP_HDR_SIZE)

    def _arm_hwc(self, *then: tuple[int, int], consumed: bool = False) -> None:
        """Arm the HWC CQ and EQ: the next completion raises vector 0; `then`: doorbells rung right after (the
        SQ's, for a request). Arms and doorbell go to the device as one burst of posted writes, one wake-up,
        and no poll-arm-repoll is needed (the reference driver polls first, gdma spec 6.6: the same
        notifications for two more messages per request). Unconsumed events are consumed first (unless the caller
        just did: `consumed`), or the EQ would fire at once (an event that slips in between does that: the
        device fires on an arm that leaves entries unconsumed, gdma spec 4.2)."""
        self.irq.clear(DRV_HWC_MSIX)
        if not consumed:
            self.process_events(ack=False)
        hwc = self.hwc
        hwc.eq.doorbell.ring_many([hwc.cq.arm_write(), hwc.eq.arm_write(), *then])

    @staticmethod
    def _spin_for(cq: CqEq, budget_s: float) -> bool:
        """Poll `cq` (yielding the CPU between polls) for at most `budget_s`; True once an entry is pending."""
        deadline = time.monotonic() + budget_s
        while not cq.pending():
            if time.monotonic() >= deadline:
                return False
            os.sched_yield()
        return True

    def _wait_completions(self, code: int, name: str, start: float, timeout_s: float) -> bool:
        """Wait for the two HWC CQEs (send, then receive) without checking which is which (gdma spec 8.3); CQ
        and EQ are armed, with every event consumed. Events are consumed again (a reset request ends the wait)
        when the driver re-arms and after a sleep that no interrupt ended; with the EQ armed, any other event
        wakes it. Returns True if a completion was found only after a sleep that no interrupt ended."""
        cq = self.hwc.cq
        deadline = start + timeout_s
        interval = HWC_INTERRUPT_POLL_WAIT_MIN_MS / 1000
        got = 0
        armed = True
        slept_in_vain = interrupt_lost = False
        while got < 2:
            if cq.poll_offset() is not None:
                got += 1
                interrupt_lost |= slept_in_vain
                continue
            if not armed:  # the interrupt came with the first CQE: the second is usually a moment behind it
                if got and self._spin_for(cq, SECOND_CQE_SPIN_S):
                    continue
                self._arm_hwc()
                armed = True
                continue
            if slept_in_vain:
                self.process_events(ack=False)
            if self.events.reset_pending:
                raise ResetRequestPending(f"{name}: HWC reset request arrived while waiting for the response")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                elapsed_ms = (time.monotonic() - start) * 1000
                self._report_hwc_timeout(elapsed_ms, last_cmd_failed=True)
                raise HwcTimeout(f"{name}: no HWC response within {round(elapsed_ms)} ms", code)
            if self.irq.wait(DRV_HWC_MSIX, min(interval, remaining)):
                armed = slept_in_vain = False
            else:
                # Nothing arrived: a vanished device would read all ones here instead of hanging until timeout.
                self._smc_header()
                slept_in_vain = True
            interval = min(interval * 2, HWC_INTERRUPT_POLL_WAIT_MAX_MS / 1000)
        return interrupt_lost

    def _report_hwc_timeout(self, elapsed_ms: float, *, last_cmd_failed: bool, interrupt_loss: bool = False) -> None:
        """Diagnostic REPORT_HWC_TIMEOUT (gdma spec 5.6); skipped if the PF owns the mailbox or a reset is pending."""
        if self.events.reset_pending:
            return
        try:
            if self._smc_header().owner_is_pf:
                return
            hwc = self.hwc
            msg = SmcReportHwcTimeout(rq_tail=hwc.rq.tail, sq_tail=hwc.sq.tail, cq_next=hwc.cq.next,
                                      eq_next=hwc.eq.next)
            msg.flags_wait = SmcReportHwcTimeoutFlags(wait_ms=min(int(elapsed_ms), (1 << 24) - 1),
                                                      last_cmd_failed=int(last_cmd_failed),
                                                      interrupt_loss=int(interrupt_loss))
            msg.hdr = SmcProtoHdr(msg_type=SMC_MSG_TYPE_REPORT_HWC_TIMEOUT,
                                  msg_version=SMC_MSG_TYPE_REPORT_HWC_TIMEOUT_VERSION)
            self._smc_send(SMC_MSG_TYPE_REPORT_HWC_TIMEOUT, msg.hdr, msg.to_bytes()[:SMC_HDR_OFFSET],
                           "REPORT_HWC_TIMEOUT")
        except DEVICE_ERRORS as e:
            kv(log, logging.WARNING, "report hwc timeout failed", error=e)

    # -- GDMA requests (gdma spec 9) ------------------------------------------------------------
    def test_eq(self, timeout_ms: int | None = None) -> None:
        """GENERATE_TEST_EQE on the HWC EQ and wait until one more test event arrives (interrupt path works)."""
        timeout_ms = timeout_ms or self.hwc_timeout_ms
        with self._lock:
            before = self.events.test_events
            self.request(GDMA_GENERATE_TEST_EQE, HWC_DEV_ID, GdmaGenerateTestEventReq(queue_index=self.hwc.eq.id),
                         timeout_ms=timeout_ms)
            start = time.monotonic()
            deadline = start + timeout_ms / 1000
            interval = HWC_INTERRUPT_POLL_WAIT_MIN_MS / 1000
            while self.events.test_events <= before:
                if self.process_events():
                    continue
                if time.monotonic() >= deadline:
                    raise HwcTimeout(f"GDMA_GENERATE_TEST_EQE: no test event within {timeout_ms} ms",
                                     GDMA_GENERATE_TEST_EQE)
                interval, _ = self._wait_hwc(deadline, interval)

    def verify_vf_driver_version(self) -> None:
        req = GdmaVerifyVerReq(protocol_ver_min=DRV_GDMA_PROTOCOL_VER, protocol_ver_max=DRV_GDMA_PROTOCOL_VER,
                               gd_drv_cap_flags1=DRV_GD_DRV_CAP_FLAGS1, os_type=OS_TYPE_OHCL)
        major, minor, build = (int(p) for p in (__version__.split(".") + ["0", "0"])[:3])
        req.os_ver_major, req.os_ver_minor, req.os_ver_build = major, minor, build
        req.os_ver_str1[:len(PRODUCT_NAME)] = list(PRODUCT_NAME)
        rev = __version__.encode()[:127]
        req.os_ver_str2[:len(rev)] = list(rev)
        resp = self.request(GDMA_VERIFY_VF_DRIVER_VERSION, HWC_DEV_ID, req)
        if resp.gdma_protocol_ver != DRV_GDMA_PROTOCOL_VER:
            raise BringUpError(f"device speaks gdma protocol {resp.gdma_protocol_ver}, driver needs "
                               f"{DRV_GDMA_PROTOCOL_VER}")

    def list_devices(self) -> list[GdmaDevId]:
        resp: GdmaListDevicesResp = self.request(GDMA_LIST_DEVICES, HWC_DEV_ID)
        count = min(resp.num_of_devs, len(resp.devs))
        return [GdmaDevId.from_bytes(bytes(resp.devs[i])) for i in range(count)]

    def mana_dev_id(self) -> GdmaDevId:
        for dev in self.list_devices():
            if dev.ty == GDMA_DEVICE_MANA:
                return dev
        raise BringUpError("LIST_DEVICES reports no MANA device")

    def register_device(self, dev_id: GdmaDevId) -> None:
        """REGISTER_DEVICE: pdid, gpa_mkey and the data-path doorbell page come from here from now on."""
        resp: GdmaRegisterDeviceResp = self.request(GDMA_REGISTER_DEVICE, dev_id)
        if resp.db_id >= self.layout.db_page_count:
            raise BringUpError(f"REGISTER_DEVICE gave doorbell page {resp.db_id}, BAR0 has "
                               f"{self.layout.db_page_count}")
        self.pdid, self.gpa_mkey, self.db_id = resp.pdid, resp.gpa_mkey, resp.db_id
        kv(log, logging.INFO, "device registered", pdid=resp.pdid, gpa_mkey=resp.gpa_mkey, db_id=resp.db_id)

    def deregister_device(self, dev_id: GdmaDevId, timeout_ms: int) -> None:
        self.request(GDMA_DEREGISTER_DEVICE, dev_id, timeout_ms=timeout_ms)

    def create_dma_region(self, dev_id: GdmaDevId, block: DmaBuffer, length: int | None = None) -> int:
        """Describe contiguous DMA memory to the device as at most 16 page addresses (gdma spec 9.11)."""
        length = block.len if length is None else length
        pages = (length + PAGE_SIZE - 1) // PAGE_SIZE
        if pages > DRV_DMA_REGION_MAX_PAGES:
            raise ValueError(f"dma region of {pages} pages exceeds the {DRV_DMA_REGION_MAX_PAGES}-page limit")
        body = GdmaCreateDmaRegionReqDriver()
        body.req = GdmaCreateDmaRegionReq(length=length, offset_in_page=0, gdma_page_type=GDMA_PAGE_TYPE_4K,
                                          page_count=pages, page_addr_list_len=pages)
        for i, pfn in enumerate(block.pfns[:pages]):
            body.page_addr_list[i] = pfn * PAGE_SIZE
        return self.request(GDMA_CREATE_DMA_REGION, dev_id, body).gdma_region

    def destroy_dma_region(self, dev_id: GdmaDevId, region: int) -> None:
        self.request(GDMA_DESTROY_DMA_REGION, dev_id, GdmaDestroyDmaRegionReq(gdma_region=region))

    def create_eq(self, dev_id: GdmaDevId, region: int, size: int, msix: int) -> int:
        """CREATE_QUEUE for an EQ on a DMA region (consumed on success); returns the EQ id."""
        req = GdmaCreateQueueReq(queue_type=GDMA_EQ, pdid=self.pdid, doorbell_id=self.db_id, gdma_region=region,
                                 queue_size=size, eq_pci_msix_index=msix)
        return self.request(GDMA_CREATE_QUEUE, dev_id, req).queue_index

    def disable_eq(self, dev_id: GdmaDevId, eq_id: int) -> None:
        self.request(GDMA_DISABLE_QUEUE, dev_id, GdmaDisableQueueReq(
            queue_type=GDMA_EQ, queue_index=eq_id, alloc_res_id_on_creation=DRV_DISABLE_QUEUE_ALLOC_RES_ID))

    def change_msix(self, dev_id: GdmaDevId, eq_id: int, msix: int) -> None:
        self.irq.map(msix)
        self.request(GDMA_CHANGE_MSIX_FOR_EQ, dev_id, GdmaChangeMsixVectorIndexForEq(queue_index=eq_id, msix=msix))

    def inspect(self) -> dict:
        """Ids and state of the HWC and its buffer (a plain read, safe from any thread)."""
        hwc, mem = self.hwc, self.hwc_mem
        return {"pdid": self.pdid, "db_id": self.db_id, "gpa_mkey": self.gpa_mkey, "activity_id": hex(self.activity_id),
                "num_msix": self.num_msix,
                "hwc_buffer": {"base_pfn": mem.base_pfn, "pages": mem.pages, "persistent": mem.persistent},
                "hwc_queues": {q: getattr(hwc, q).id for q in ("eq", "cq", "rq", "sq")} if hwc else None,
                "reset_pending": self.reset_pending, "hwc_failure": self.hwc_failure, "gone": self.gone}

    # -- save and teardown (servicing spec 5.3) ------------------------------------------------
    def _check_savable(self) -> None:
        """Refuse save after an HWC failure or with a reset request pending (looks at new events first)."""
        with self._lock:
            if not self.hwc_failure and not self.closed:
                try:
                    self.process_events()
                except DeviceMissing:
                    self.hwc_failure = True
            if self.events.reset_pending:
                raise SaveRefusedResetPending("cannot save/restore with HWC reset request pending")
            if self.hwc_failure:
                raise SaveRefusedHwcFailure("cannot save/restore after HWC failure")
            if not self.hwc_mem.persistent:
                raise SaveFailed(f"HWC buffer at pfn {self.hwc_mem.base_pfn} is not from the private pool")
            if not contiguous(self.hwc_mem):  # the saved state names it by base pfn and length
                raise SaveFailed(f"HWC buffer at pfn {self.hwc_mem.base_pfn} is not on consecutive pages")

    def save(self) -> mana_driver_pb2.GdmaDriverSavedState:
        """Everything a new driver needs to re-attach to this HWC (servicing spec 7.2). Refused (`SaveFailed`
        subclasses) after an HWC failure or with a reset request pending; once saved, `close()` leaves the
        HWC running and its buffer allocated for the next driver."""
        self._check_savable()
        state = self.saved_state()
        self.saved = True
        return state

    def saved_state(self) -> mana_driver_pb2.GdmaDriverSavedState:
        """What `save` records, without its checks and without marking the driver saved (`ManaDevice.rehearse_save`)."""
        hwc = self.hwc
        state = mana_driver_pb2.GdmaDriverSavedState(
            eq=hwc.eq.save(), cq=hwc.cq.save(), rq=hwc.rq.save(), sq=hwc.sq.save(), db_id=self.db_id,
            gpa_mkey=self.gpa_mkey, pdid=self.pdid, hwc_activity_id=self.activity_id, num_msix=self.num_msix,
            min_queue_avail=self.min_queue_avail)
        state.mem.base_pfn, state.mem.len = self.hwc_mem.base_pfn, HWC_BUFFER_LEN
        for vport_index, up in self.events.link_toggle:
            state.link_toggle.add(vport_index=vport_index, link_up=up)
        return state

    def close(self) -> None:
        """Teardown by the table of servicing spec 5.3, then release the handle (never a reset from here).

        The HWC buffer returns to its allocator, also when the driver was saved and the device keeps using
        it (servicing spec 2.2): the live slot table reflects the save, so only a pool snapshot taken before
        it (as the worker does) still holds the buffer for the next driver.
        """
        with self._lock:
            if self.closed:
                return
            self.closed = True
            if self.events.reset_pending:
                kv(log, logging.INFO, "teardown: reset request pending, leaving the hwc to the device reset")
            elif self.gone:
                kv(log, logging.INFO, "teardown: device gone, nothing to destroy")
            elif self.saved:
                kv(log, logging.INFO, "teardown: driver saved, hwc left running")
            elif self.hwc_failure:
                kv(log, logging.INFO, "teardown: hwc failed, not destroying it")
            elif self.established:
                self._destroy_hwc()
            # No separate unmapping of the interrupts: releasing the handle drops them (the device latches what
            # it raises after that), a round trip less in a reset's window.
            try:
                self.backing.close()
            finally:
                self.hwc_mem.free()

    def _destroy_hwc(self) -> None:
        try:
            self._smc_wait_vf_owner("DESTROY_HWC")
            hdr = SmcProtoHdr(msg_type=SMC_MSG_TYPE_DESTROY_HWC, msg_version=SMC_MSG_TYPE_DESTROY_HWC_VERSION)
            self._smc_send(SMC_MSG_TYPE_DESTROY_HWC, hdr, None, "DESTROY_HWC")
            kv(log, logging.INFO, "hwc destroyed")
        except DEVICE_ERRORS as e:  # teardown errors are logged only (servicing spec 5.3)
            kv(log, logging.ERROR, "destroy hwc failed", error=e)
