"""SMC shared-memory mailbox (spec gdma.md §5): ESTABLISH_HWC, DESTROY_HWC, REPORT_HWC_TIMEOUT.

A write touching the header dword (window offset 28–31) starts processing.
ESTABLISH_HWC and REPORT_HWC_TIMEOUT are answered synchronously inside that
write; DESTROY_HWC stops the HWC at once and is answered lazily by the next
read of the window, as the reference emulator does (§5.4). `owner_is_pf` is
never set. Failure status is 1 for: a header with `is_response` set, an
unknown type, a wrong version, ESTABLISH while an HWC exists, HWC pages the
device cannot reach through DMA, an MSI-X index ≥ 64, or an injected fault.
(The reference emulator's reaction to a write ending exactly at offset 28 is
not reproduced: it is documented as not to be relied on.)
"""
from __future__ import annotations

from vfkeep.gdma.constants import (
    EMU_FAILURE_STATUS,
    EMU_SHMEM_SIZE,
    PCI_MSIX_VECTORS,
    SMC_HDR_OFFSET,
    SMC_MSG_TYPE_DESTROY_HWC,
    SMC_MSG_TYPE_DESTROY_HWC_VERSION,
    SMC_MSG_TYPE_ESTABLISH_HWC,
    SMC_MSG_TYPE_ESTABLISH_HWC_VERSION,
    SMC_MSG_TYPE_REPORT_HWC_TIMEOUT,
    SMC_MSG_TYPE_REPORT_HWC_TIMEOUT_VERSION,
    request_name,
)
from vfkeep.gdma.regs import EstablishHwc, SmcProtoHdr, SmcReportHwcTimeout



class Smc:
    """The 32-byte mailbox of one device; HWC creation/teardown is delegated to the device."""

    def __init__(self, dev):
        self.dev = dev
        self.shmem = bytearray(EMU_SHMEM_SIZE)
        self.destroy_reply_pending = False

    def read(self, offset: int, size: int) -> bytes:
        if self.destroy_reply_pending and self.dev.hwc is None:
            self.destroy_reply_pending = False
            self._reply(SmcProtoHdr.from_bytes(self.shmem, SMC_HDR_OFFSET), 0)
        return bytes(self.shmem[offset:offset + size])

    def write(self, offset: int, data: bytes) -> None:
        self.shmem[offset:offset + len(data)] = data
        if offset + len(data) > SMC_HDR_OFFSET:
            self._process()

    def _reply(self, hdr: SmcProtoHdr, status: int) -> None:
        reply = SmcProtoHdr(msg_type=hdr.msg_type, msg_version=hdr.msg_version, is_response=1, status=status,
                            owner_is_pf=int("smc_pf_owned" in self.dev.hostile))
        self.shmem[SMC_HDR_OFFSET:SMC_HDR_OFFSET + 4] = reply.to_bytes()

    def _process(self) -> None:
        dev = self.dev
        hdr = SmcProtoHdr.from_bytes(self.shmem, SMC_HDR_OFFSET)
        msg_type, version = hdr.msg_type, hdr.msg_version
        dev.counters["smc_messages"] += 1
        if "smc_silent" in dev.hostile:  # hostile: the request stays in the window, never answered
            dev.command_log.add("smc", request_name(msg_type, smc=True), dev.epoch, code=msg_type, hostile=True)
            return
        details: dict = {}
        injected = False
        if hdr.is_response:
            status, details["error"] = EMU_FAILURE_STATUS, "request header has is_response set"
        elif dev.faults.should_fail(("smc", msg_type), dev.epoch):
            status, injected = EMU_FAILURE_STATUS, True
        elif msg_type == SMC_MSG_TYPE_ESTABLISH_HWC and version == SMC_MSG_TYPE_ESTABLISH_HWC_VERSION:
            status, details = self._establish()
        elif msg_type == SMC_MSG_TYPE_DESTROY_HWC and version == SMC_MSG_TYPE_DESTROY_HWC_VERSION:
            dev.destroy_hwc()
            self.destroy_reply_pending = True
            dev.command_log.add("smc", request_name(msg_type, smc=True), dev.epoch, code=msg_type, status=0)
            return
        elif msg_type == SMC_MSG_TYPE_REPORT_HWC_TIMEOUT and version >= SMC_MSG_TYPE_REPORT_HWC_TIMEOUT_VERSION:
            report = SmcReportHwcTimeout.from_bytes(self.shmem)
            flags = report.flags_wait
            status, details = 0, {"rq_tail": report.rq_tail, "sq_tail": report.sq_tail, "cq_next": report.cq_next,
                                  "eq_next": report.eq_next, "wait_ms": flags.wait_ms,
                                  "last_cmd_failed": flags.last_cmd_failed, "interrupt_loss": flags.interrupt_loss}
        else:
            status, details["error"] = EMU_FAILURE_STATUS, f"unknown SMC message type {msg_type} version {version}"
        if status:
            dev.counters["smc_failures"] += 1
        self._reply(hdr, status)
        dev.command_log.add("smc", request_name(msg_type, smc=True), dev.epoch, code=msg_type, status=status,
                            injected=injected, **details)

    def _establish(self) -> tuple[int, dict]:
        dev = self.dev
        if dev.hwc is not None:
            return EMU_FAILURE_STATUS, {"error": "an HWC is already established"}
        msg = EstablishHwc.from_bytes(self.shmem)
        if msg.msix >= PCI_MSIX_VECTORS:
            return EMU_FAILURE_STATUS, {"error": f"msix {msg.msix} ≥ {PCI_MSIX_VECTORS}"}
        error = dev.establish_hwc(*msg.addresses(), msix=msg.msix)
        if error:
            return EMU_FAILURE_STATUS, {"error": error}
        hwc = dev.hwc
        return 0, {"eq_id": hwc.eq.id, "cq_id": hwc.cq.id, "rq_id": hwc.rq.id, "sq_id": hwc.sq.id}


__all__ = ["Smc"]
