"""Hardware channel (spec gdma.md §7, §8): bring-up EQEs and the request/response exchange.

One request at a time: when a send WQE and a receive WQE are both available
the device takes both, reads `GdmaReqHdr` + body through the send WQE's SGEs,
dispatches (GDMA §9 by code; device-specific §11 only for the registered MANA
device), posts the SQ CQE, writes `GdmaRespHdr` + body into the receive WQE's
buffers (at most `resp.msg_size` bytes) and posts the RQ CQE with `HwcRxOob`.

Every request costs the modelled `timing.hwc_latency_ms`: the WQEs are taken
and the request runs at once, and it is answered (CQEs, response) that long
after its doorbell reached the device (`GdmaDevice.received_at`: the socket
read of the message), on the event loop so the data path keeps running; the
emulator's own work (the burst's other messages, the request) thus falls
inside the modelled time instead of adding to it (a firmware's work is part
of its latency). The interrupts of what the request
did (GENERATE_TEST_EQE's event) are raised with the answer: the driver learns
of a request's effects when it completes. `hwc_stall` stops taking requests.

The RQ completion (`HwcRxOob`) serves both drivers: OpenHCL's ignores it;
Linux's (gdma.md Appendix L.2) finds the response buffer through
`wqe_addr_low_or_offset` (ring byte position of the consumed receive WQE),
takes `tx_oob_data_size` as the response length (32 ≤ n ≤ `resp.msg_size`:
the response is cut at `resp.msg_size` and BNIC bodies are zero-filled up to
it) and matches the response by `response.hwc_msg_id`, echoed from
`req.hwc_msg_id`. Only status 0 succeeds for either driver; failures are 1.

Deviations from the reference emulator, chosen so a bad driver request never
kills the channel (each is answered with status 1 and counted, and the HWC
keeps serving): a send WQE whose TX OOB names other queues than the HWC's
(`malformed_wqes`), `req.msg_size`/`resp.msg_size` above 4096 or a request
shorter than its header (`bad_requests`); the reference treats those as fatal.
A malformed receive WQE (which the reference would stall on) is consumed
without running the request, since the answer has nowhere to go; its CQE
carries `vendor_err` `VENDOR_ERR_MALFORMED_WQE` and `tx_oob_data_size` 0.
"""
from __future__ import annotations

import ctypes
import time
from typing import Callable

from vfkeep.gdma.constants import (
    EMU_FAILURE_STATUS,
    EMU_HWC_DOORBELL,
    EMU_HWC_GPA_MKEY,
    EMU_HWC_MAX_MSG_SIZE,
    EMU_HWC_MAX_NUM_CQS,
    EMU_HWC_MAX_REQUEST,
    EMU_HWC_MAX_RESPONSE,
    EMU_HWC_PDID,
    EMU_HWC_QUEUE_DEPTH,
    GDMA_EQE_HWC_INIT_DATA,
    GDMA_EQE_HWC_INIT_DONE,
    GDMA_EQE_HWC_INIT_EQ_ID_DB,
    GDMA_EQE_TEST_EVENT,
    HWC_INIT_DATA_CQID,
    HWC_INIT_DATA_GPA_MKEY,
    HWC_INIT_DATA_MAX_NUM_CQS,
    HWC_INIT_DATA_MAX_REQUEST,
    HWC_INIT_DATA_MAX_RESPONSE,
    HWC_INIT_DATA_PDID,
    HWC_INIT_DATA_QUEUE_DEPTH,
    HWC_INIT_DATA_RQID,
    HWC_INIT_DATA_SQID,
    request_name,
)
from vfkeep.gdma.hwc import GdmaReqHdr, GdmaRespHdr, HwcInitEqIdDb, HwcInitTypeData, HwcRxOob, HwcTxOob
from vfkeep.gdma.messages import REQ_HDR_SIZE, RESP_HDR_SIZE, is_device_specific, response_header

from . import bnic, requests
from .dma import DmaFault
from .hostile import BAD_DOORBELL_PAGE
from .queues import VENDOR_ERR_MALFORMED_WQE, Cq, Eq, Wq, WqeRef
from .requests import BadRequest, Refused

_TX_OOB_SIZE = ctypes.sizeof(HwcTxOob)
#: A timer wakes the device late (the VM's wake-up, with 1 us timer slack: 30-70 us on a quiet machine; inside a
#: servicing window, 236 answers traced at load 2-3: 0.08 ms median, 0.13 ms p90), which would add to every
#: modelled latency. So an answer over a transport is scheduled this much before it is due, the device writes what
#: the driver cannot see yet (`Hwc._stage_answer`, 20-30 us) and spins the rest (at most this long, about 0.05 ms
#: per request): never early, rarely late.
ANSWER_EARLY_S = 0.00015


def _nothing() -> None:
    """The publication of an answer that could not be staged."""


class Hwc:
    """The HWC queue set of one device (EQ, CQ, RQ, SQ, one page each)."""

    def __init__(self, dev, eq: Eq, cq: Cq, rq: Wq, sq: Wq):
        self.dev, self.eq, self.cq, self.rq, self.sq = dev, eq, cq, rq, sq
        self.busy = False
        self.stopped = False

    def post_bringup_eqes(self) -> None:
        """§7.2 step 2: INIT_EQ_ID_DB, nine INIT_DATA, INIT_DONE (the first interrupts and disarms)."""
        eq = self.eq
        hostile = self.dev.hostile
        doorbell = BAD_DOORBELL_PAGE if "hwc_doorbell_out_of_range" in hostile else EMU_HWC_DOORBELL
        eq.post(GDMA_EQE_HWC_INIT_EQ_ID_DB, HwcInitEqIdDb(eq_id=eq.id, doorbell=doorbell).to_bytes())
        for ty, value in ((HWC_INIT_DATA_CQID, self.cq.id), (HWC_INIT_DATA_RQID, self.rq.id),
                          (HWC_INIT_DATA_SQID, self.sq.id), (HWC_INIT_DATA_QUEUE_DEPTH, EMU_HWC_QUEUE_DEPTH),
                          (HWC_INIT_DATA_MAX_REQUEST, EMU_HWC_MAX_REQUEST),
                          (HWC_INIT_DATA_MAX_RESPONSE, EMU_HWC_MAX_RESPONSE),
                          (HWC_INIT_DATA_MAX_NUM_CQS, EMU_HWC_MAX_NUM_CQS), (HWC_INIT_DATA_PDID, EMU_HWC_PDID),
                          (HWC_INIT_DATA_GPA_MKEY, EMU_HWC_GPA_MKEY)):
            if ty == HWC_INIT_DATA_GPA_MKEY and "init_event_missing" in hostile:
                continue
            eq.post(GDMA_EQE_HWC_INIT_DATA, HwcInitTypeData(value=value, ty=ty).to_bytes())
        if "bringup_stray_event" in hostile:
            eq.post(GDMA_EQE_TEST_EVENT)
        if "init_done_missing" not in hostile:
            eq.post(GDMA_EQE_HWC_INIT_DONE)

    def doorbell(self) -> None:
        """SQ or RQ doorbell: serve while both a request and a response buffer are posted."""
        dev = self.dev
        while not (self.busy or self.stopped or dev.hwc_stalled) and self.sq.pending and self.rq.pending:
            try:
                swqe = self.sq.take()
            except DmaFault:
                dev.dma_fault("SQ", self.sq.id)
                return
            try:
                rwqe = self.rq.take()
            except DmaFault:
                self.sq.head = swqe.position
                dev.dma_fault("RQ", self.rq.id)
                return
            delay_ms = dev.timing.hwc_latency_ms
            dev.counters["modelled_hwc_ms_total"] += delay_ms
            if not delay_ms:
                self.answer(rwqe, self._execute(swqe, rwqe))
                continue
            # The latency runs from the arrival of the doorbell that posted the request (the message's socket
            # read; a request rung while another was in flight arrived no later), not from the moment the device
            # got round to it; the request runs inside it (the loop is single threaded: the timer cannot fire
            # before `_execute` returns) and only the answer waits, with the interrupts the request's effects
            # raised (a test EQE): the driver is woken once, by the answer.
            delay_s, due = delay_ms / 1000, None
            if dev.received_at is not None:
                due = dev.received_at() + delay_s
                delay_s = max(0.0, due - ANSWER_EARLY_S - time.monotonic())
            self.busy = True
            in_flight = [rwqe, b"", [], due]
            dev.call_later(delay_s, lambda: self._answer_later(*in_flight))
            with dev.interrupts_held() as in_flight[2]:
                in_flight[1] = self._execute(swqe, rwqe)
            return

    def _answer_later(self, rwqe: WqeRef, response: bytes, interrupts: list[int], due: float | None) -> None:
        if self.stopped:  # destroyed or reset while the request was in flight: no answer
            return
        # The timer fired early on purpose (ANSWER_EARLY_S): what the driver cannot see yet is written now, and
        # at the due time only the CQEs' owner bytes, so the answer is not the emulator's work late.
        publish = self._stage_answer(rwqe, response)
        while due is not None and time.monotonic() < due:
            pass
        self.busy = False
        publish()
        for vector in interrupts:
            self.dev.interrupt(vector)
        self.doorbell()

    def answer(self, rwqe: WqeRef, response: bytes) -> None:
        """Complete a request `_execute` ran: send CQE, the response into the receive WQE's buffers, receive CQE."""
        self._stage_answer(rwqe, response)()

    def _stage_answer(self, rwqe: WqeRef, response: bytes) -> Callable[[], None]:
        """`answer` but its publication: the response is written into the receive WQE's buffers and the two CQEs
        (send, then receive) but their owner bytes into the CQ; the returned call writes those (the driver sees
        the answer from then on) and notifies. A DMA fault is counted: the response buffer's leaves the
        receive CQE out, the CQ's the whole answer."""
        dev = self.dev
        cq = self.cq
        entries = cq.entry(b"", self.sq.id, True)
        try:
            oob = HwcRxOob(wqe_addr_low_or_offset=rwqe.position)
            if rwqe.error:
                oob.flags.vendor_err = VENDOR_ERR_MALFORMED_WQE
            else:
                oob.tx_oob_data_size = dev.scatter(rwqe.sges, response)
            entries += cq.entry(oob.to_bytes(), self.rq.id, False)
        except DmaFault:
            dev.dma_fault("HWC", cq.id)
        try:
            return cq.stage_many(entries)
        except DmaFault:
            dev.dma_fault("HWC", cq.id)
            return _nothing

    def _execute(self, swqe: WqeRef, rwqe: WqeRef) -> bytes:
        """Run one request; returns the response bytes (header + body, at most `resp.msg_size`). A request
        whose receive WQE is unusable is not run: its answer would have nowhere to go."""
        dev = self.dev
        dev.counters["hwc_requests"] += 1
        if rwqe.error:
            request, error = b"", f"receive WQE: {rwqe.error}"
        else:
            request, error = self._gather(swqe)
        if error:
            dev.command_log.add("hwc", "MALFORMED", dev.epoch, status=EMU_FAILURE_STATUS, error=error)
            dev.counters["hwc_requests_failed"] += 1
            return GdmaRespHdr(status=EMU_FAILURE_STATUS).to_bytes()
        hdr = GdmaReqHdr.from_bytes(request)
        code = hdr.req.msg_type
        key = ("hwc", code)
        injected = False
        details: dict = {}
        body = b""
        if hdr.req.msg_size > EMU_HWC_MAX_MSG_SIZE or hdr.resp.msg_size > EMU_HWC_MAX_MSG_SIZE:
            status, details["error"] = EMU_FAILURE_STATUS, (
                f"msg_size {hdr.req.msg_size}/{hdr.resp.msg_size} exceeds {EMU_HWC_MAX_MSG_SIZE}")
            dev.counters["bad_requests"] += 1
        elif not REQ_HDR_SIZE <= hdr.req.msg_size <= len(request):
            status, details["error"] = EMU_FAILURE_STATUS, (
                f"req.msg_size {hdr.req.msg_size} outside [{REQ_HDR_SIZE}, {len(request)}] (bytes in the SGL)")
            dev.counters["bad_requests"] += 1
        elif dev.faults.should_fail(key, dev.epoch):
            status, injected = EMU_FAILURE_STATUS, True
        else:
            status, body, error = self._dispatch(hdr, request[REQ_HDR_SIZE:hdr.req.msg_size])
            if error:
                details["error"] = error
        if status:
            dev.counters["hwc_requests_failed"] += 1
            body = b""
        dev.command_log.add("hwc", request_name(code), dev.epoch, code=code, status=status, injected=injected,
                            dev_id=hdr.dev_id.to_int(), activity_id=hdr.activity_id, **details)
        resp = response_header(hdr, status)
        if body and "short_response" in dev.hostile:  # hostile: half the body, and a header saying so
            body = body[:len(body) // 2]
            resp.response.msg_size = RESP_HDR_SIZE + len(body)
        return (resp.to_bytes() + body)[:hdr.resp.msg_size]

    def _gather(self, swqe: WqeRef) -> tuple[bytes, str | None]:
        """Request bytes from the send WQE (at most 4096), or why it cannot be read."""
        dev = self.dev
        if swqe.error:
            return b"", swqe.error
        oob = swqe.oob()
        if len(oob) < _TX_OOB_SIZE:
            dev.counters["malformed_wqes"] += 1
            return b"", f"send WQE OOB of {len(oob)} bytes is shorter than HwcTxOob"
        tx_oob = HwcTxOob.from_bytes(oob)
        if tx_oob.flags3.vscq_id != self.cq.id or tx_oob.flags4.vsq_id != self.sq.id:
            dev.counters["malformed_wqes"] += 1
            return b"", (f"send WQE names CQ {tx_oob.flags3.vscq_id} / SQ {tx_oob.flags4.vsq_id}, "
                         f"HWC has CQ {self.cq.id} / SQ {self.sq.id}")
        try:
            request = dev.gather(swqe.sges, EMU_HWC_MAX_MSG_SIZE)
        except DmaFault:
            dev.dma_fault("HWC request", self.sq.id)
            return b"", "request buffer outside the DMA-mapped ranges"
        if len(request) < REQ_HDR_SIZE:
            dev.counters["bad_requests"] += 1
            return b"", f"request of {len(request)} bytes is shorter than GdmaReqHdr"
        return request, None

    def _dispatch(self, hdr: GdmaReqHdr, body: bytes) -> tuple[int, bytes, str | None]:
        dev = self.dev
        code = hdr.req.msg_type
        try:
            if not is_device_specific(code):
                handler = requests.HANDLERS.get(code)
                if handler is None:
                    raise BadRequest(f"unknown GDMA request {code}")
                return 0, handler(dev, hdr, body), None
            if hdr.dev_id.to_int() != dev.mana_dev_id or not dev.registered:
                raise Refused(f"device-specific request {code:#x} for device {hdr.dev_id.to_int():#x} "
                              f"(registered: {dev.registered})")
            handler = bnic.HANDLERS.get(code)
            if handler is None:
                raise BadRequest(f"unknown BNIC request {code:#x}")
            resp = handler(dev, hdr, body)
            space = min(max(hdr.resp.msg_size - RESP_HDR_SIZE, 0), EMU_HWC_MAX_MSG_SIZE - RESP_HDR_SIZE)
            return 0, resp[:space].ljust(space, b"\0"), None
        except BadRequest as e:
            dev.counters["bad_requests"] += 1
            return EMU_FAILURE_STATUS, b"", str(e)
        except Refused as e:
            return EMU_FAILURE_STATUS, b"", str(e)

    def inspect(self) -> dict:
        return {"eq_id": self.eq.id, "cq_id": self.cq.id, "rq_id": self.rq.id, "sq_id": self.sq.id,
                "msix": self.eq.msix, "busy": self.busy, "eq": self.eq.inspect(), "cq": self.cq.inspect(),
                "rq": self.rq.inspect(), "sq": self.sq.inspect()}


__all__ = ["Hwc"]
