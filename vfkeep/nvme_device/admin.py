"""Admin command set of the emulator (spec nvme.md §6, §16).

`execute(ctrl, cmd)` runs one admin command and returns `(status, dw0)`,
or `None` for an ASYNCHRONOUS EVENT REQUEST the controller holds until an
event. Implemented: IDENTIFY CNS 0/1/2/3, GET/SET FEATURES (Number of
Queues granted = min(request, max), refused once IO queues exist; the other
features of §16 stored), CREATE/DELETE IO CQ/SQ, AER (≤ 4 held; a namespace
change completes the most recently submitted, then no further namespace
AEN until GET LOG PAGE 4 with RAE=0), ABORT (always "not aborted"), GET LOG
PAGE 0-4. Not implemented (the driver never issues them): KEEP ALIVE,
DOORBELL BUFFER CONFIG — they answer INVALID COMMAND OPCODE.
"""
from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from vfkeep.nvme import (AEN_NS_CHANGED_DW0, CNS_ACTIVE_NAMESPACES, CNS_CONTROLLER, CNS_DESCRIPTOR_NAMESPACE,
                         CNS_NAMESPACE, FEAT_ARBITRATION, FEAT_ASYNC_EVENT_CONFIG, FEAT_ERROR_RECOVERY,
                         FEAT_INTERRUPT_COALESCING, FEAT_INTERRUPT_VECTOR_CONFIG, FEAT_NUMBER_OF_QUEUES,
                         FEAT_POWER_MGMT, FEAT_TEMP_THRESHOLD, FEAT_VOLATILE_WRITE_CACHE, IDENTIFY_SIZE,
                         IOCQES, IOSQES, LOG_CHANGED_NS_LIST, LOG_ERROR, LOG_FW_SLOT, LOG_HEALTH, LOG_SUPPORTED,
                         MAX_AERS, MAX_NSID, MAX_QES, NVME_VERSION, PAGE_SIZE, PCI_VENDOR_ID, SC_ASYNC_EVENT_LIMIT_EXCEEDED,
                         SC_COMMAND_SEQUENCE_ERROR, SC_COMPLETION_QUEUE_INVALID, SC_FEATURE_NOT_SAVEABLE,
                         SC_INVALID_COMMAND_OPCODE, SC_INVALID_FIELD, SC_INVALID_INTERRUPT_VECTOR, SC_INVALID_LOG_PAGE,
                         SC_INVALID_NAMESPACE_OR_FORMAT, SC_INVALID_QUEUE_DELETION, SC_INVALID_QUEUE_IDENTIFIER,
                         SC_INVALID_QUEUE_SIZE, SC_SUCCESS, AdminOpcode, Cc, Command, CreateIoCqCdw11,
                         CreateIoQueueCdw10, CreateIoSqCdw11, FeaturesCdw10, GetLogPageCdw10, IdentifyCdw10,
                         IdentifyController, NumberOfQueues, OAES_NS_ATTRIBUTE, ONCS_DSM, MDTS)

from .queues import Cq, Sq

if TYPE_CHECKING:
    from .core import NvmeController

#: Features stored as written (SET) and returned (GET); Number of Queues is handled apart.
STORED_FEATURES = (FEAT_ARBITRATION, FEAT_POWER_MGMT, FEAT_TEMP_THRESHOLD, FEAT_ERROR_RECOVERY,
                   FEAT_VOLATILE_WRITE_CACHE, FEAT_INTERRUPT_COALESCING, FEAT_INTERRUPT_VECTOR_CONFIG,
                   FEAT_ASYNC_EVENT_CONFIG)
FEATURE_DEFAULTS = {FEAT_VOLATILE_WRITE_CACHE: 1, FEAT_ASYNC_EVENT_CONFIG: OAES_NS_ATTRIBUTE}
SUBSYSTEM_NQN = "nqn.2014-08.org.nvmexpress:uuid:6c2b1e5e-8a55-4d6b-a4a1-7666b6565656"


def _ascii(text: str, size: int) -> bytes:
    return text.encode().ljust(size, b" ")[:size]


def identify_controller(max_nsid: int = MAX_NSID) -> bytes:
    """§16 identify-controller values."""
    ic = IdentifyController(vid=PCI_VENDOR_ID, ssvid=PCI_VENDOR_ID, mdts=MDTS, ver=NVME_VERSION, rtd3r=400000,
                            rtd3e=400000, oaes=OAES_NS_ATTRIBUTE, cntrltype=1, aerl=MAX_AERS - 1, frmw=0b11,
                            elpe=0, sqes=(IOSQES << 4) | IOSQES, cqes=(IOCQES << 4) | IOCQES, nn=max_nsid,
                            oncs=ONCS_DSM, vwc=0b101)
    ic.sn[:] = list(_ascii("SN: 000001", 20))
    ic.mn[:] = list(_ascii("MSFT NVMe Accelerator v1.0", 40))
    ic.fr[:] = list(_ascii("v1.00000", 8))
    ic.ieee[:] = [0x74, 0xE2, 0x8C]
    ic.subnqn[:] = list(SUBSYSTEM_NQN.encode().ljust(256, b"\0"))
    return ic.to_bytes()


def execute(ctrl: NvmeController, cmd: Command) -> tuple[int, int] | None:
    handler = _HANDLERS.get(cmd.opcode)
    if handler is None:
        return SC_INVALID_COMMAND_OPCODE, 0
    return handler(ctrl, cmd)


def _ok(dw0: int = 0) -> tuple[int, int]:
    return SC_SUCCESS, dw0


def _err(status: int) -> tuple[int, int]:
    return status, 0


def _identify(ctrl: NvmeController, cmd: Command):
    cns = IdentifyCdw10.from_int(cmd.cdw10).cns
    if cns == CNS_CONTROLLER:
        data = ctrl.identify_controller
    elif cns == CNS_NAMESPACE:
        if cmd.nsid == 0 or cmd.nsid > MAX_NSID:
            return _err(SC_INVALID_NAMESPACE_OR_FORMAT)
        ns = ctrl.namespaces.get(cmd.nsid)
        data = ns.identify() if ns else bytes(IDENTIFY_SIZE)  # inactive NSID: all zeros (NSZE 0)
    elif cns == CNS_ACTIVE_NAMESPACES:
        ids = [n for n in sorted(ctrl.namespaces) if n > cmd.nsid][:IDENTIFY_SIZE // 4]
        data = struct.pack(f"<{len(ids)}I", *ids).ljust(IDENTIFY_SIZE, b"\0")
    elif cns == CNS_DESCRIPTOR_NAMESPACE:
        if cmd.nsid not in ctrl.namespaces:
            return _err(SC_INVALID_NAMESPACE_OR_FORMAT)
        data = bytes(IDENTIFY_SIZE)  # no identifiers reported
    else:
        return _err(SC_INVALID_FIELD)
    status = ctrl.write_data(cmd, data)
    return _err(status) if status else _ok()


def _features(ctrl: NvmeController, cmd: Command):
    f = FeaturesCdw10.from_int(cmd.cdw10)
    if cmd.opcode == AdminOpcode.SET_FEATURES:
        if f.sv:
            return _err(SC_FEATURE_NOT_SAVEABLE)
        if f.fid == FEAT_NUMBER_OF_QUEUES:
            if len(ctrl.sqs) > 1 or len(ctrl.cqs) > 1:
                return _err(SC_COMMAND_SEQUENCE_ERROR)
            req = NumberOfQueues.from_int(cmd.cdw11)
            limit = ctrl.max_io_queues - 1
            if req.nsq == 0xFFFF or req.ncq == 0xFFFF:
                return _err(SC_INVALID_FIELD)
            ctrl.granted_queues = NumberOfQueues(nsq=min(req.nsq, limit), ncq=min(req.ncq, limit)).to_int()
            return _ok(ctrl.granted_queues)
        if f.fid == FEAT_POWER_MGMT and cmd.cdw11 & 0x1F:
            return _err(SC_INVALID_FIELD)  # power state 0 only
        if f.fid not in STORED_FEATURES:
            return _err(SC_INVALID_FIELD)
        ctrl.features[f.fid] = cmd.cdw11
        return _ok()
    if f.sel:
        return _err(SC_INVALID_FIELD)
    if f.fid == FEAT_NUMBER_OF_QUEUES:
        limit = ctrl.max_io_queues - 1
        return _ok(ctrl.granted_queues if ctrl.granted_queues is not None
                   else NumberOfQueues(nsq=limit, ncq=limit).to_int())
    if f.fid not in STORED_FEATURES:
        return _err(SC_INVALID_FIELD)
    return _ok(ctrl.features.get(f.fid, FEATURE_DEFAULTS.get(f.fid, 0)))


def _check_new_queue(ctrl: NvmeController, qid: int, qsize: int, table: dict, cc_field: str, expected: int) -> int:
    if qid == 0 or qid >= ctrl.max_io_queues + 1 or qid in table:
        return SC_INVALID_QUEUE_IDENTIFIER
    if qsize == 0 or qsize >= MAX_QES or getattr(Cc.from_int(ctrl.cc), cc_field) != expected:
        return SC_INVALID_QUEUE_SIZE
    return SC_SUCCESS


def _create_cq(ctrl: NvmeController, cmd: Command):
    q = CreateIoQueueCdw10.from_int(cmd.cdw10)
    c11 = CreateIoCqCdw11.from_int(cmd.cdw11)
    status = _check_new_queue(ctrl, q.qid, q.qsize, ctrl.cqs, "iocqes", IOCQES)
    if status:
        return _err(status)
    if not c11.pc:
        return _err(SC_INVALID_FIELD)
    if c11.iv >= ctrl.msix_count:
        return _err(SC_INVALID_INTERRUPT_VECTOR)
    ctrl.add_cq(Cq(q.qid, cmd.prp1 & ~(PAGE_SIZE - 1), q.qsize + 1, c11.iv, bool(c11.ien)))
    return _ok()


def _create_sq(ctrl: NvmeController, cmd: Command):
    q = CreateIoQueueCdw10.from_int(cmd.cdw10)
    c11 = CreateIoSqCdw11.from_int(cmd.cdw11)
    status = _check_new_queue(ctrl, q.qid, q.qsize, ctrl.sqs, "iosqes", IOSQES)
    if status:
        return _err(status)
    if not c11.pc:
        return _err(SC_INVALID_FIELD)
    if c11.cqid == 0 or c11.cqid not in ctrl.cqs:
        return _err(SC_COMPLETION_QUEUE_INVALID)
    ctrl.add_sq(Sq(q.qid, cmd.prp1 & ~(PAGE_SIZE - 1), q.qsize + 1, c11.cqid))
    return _ok()


def _delete_sq(ctrl: NvmeController, cmd: Command):
    qid = CreateIoQueueCdw10.from_int(cmd.cdw10).qid
    if qid == 0 or qid not in ctrl.sqs:
        return _err(SC_INVALID_QUEUE_IDENTIFIER)
    ctrl.delete_sq(qid)
    return _ok()


def _delete_cq(ctrl: NvmeController, cmd: Command):
    qid = CreateIoQueueCdw10.from_int(cmd.cdw10).qid
    if qid == 0 or qid not in ctrl.cqs:
        return _err(SC_INVALID_QUEUE_IDENTIFIER)
    if any(sq.cqid == qid for sq in ctrl.sqs.values()):
        return _err(SC_INVALID_QUEUE_DELETION)
    ctrl.delete_cq(qid)
    return _ok()


def _async_event(ctrl: NvmeController, cmd: Command):
    if len(ctrl.aers) >= MAX_AERS:
        return _err(SC_ASYNC_EVENT_LIMIT_EXCEEDED)
    if ctrl.pending_aens:
        return _ok(ctrl.pending_aens.pop(0))
    return None  # held until an event (the controller keeps the CID)


def _abort(ctrl: NvmeController, cmd: Command):
    return _ok(1)  # "command not aborted"


def _get_log_page(ctrl: NvmeController, cmd: Command):
    c10 = GetLogPageCdw10.from_int(cmd.cdw10)
    length = (((cmd.cdw11 & 0xFFFF) << 16 | c10.numdl) + 1) * 4
    if c10.lid == LOG_CHANGED_NS_LIST:
        ids = sorted(ctrl.changed_namespaces)
        body = struct.pack(f"<{len(ids)}I", *ids) if len(ids) <= 1024 else struct.pack("<I", 0xFFFFFFFF)
        if not c10.rae:
            ctrl.changed_namespaces.clear()
            ctrl.ns_aen_masked = False
    elif c10.lid in (LOG_SUPPORTED, LOG_ERROR, LOG_HEALTH, LOG_FW_SLOT):
        body = b""
    else:
        return _err(SC_INVALID_LOG_PAGE)
    data = body.ljust(length, b"\0")[:length]
    status = ctrl.write_data(cmd, data)
    return _err(status) if status else _ok()


def namespace_changed(ctrl: NvmeController, nsid: int) -> None:
    """§16: record the change; complete the most recently submitted AER unless notices are masked."""
    ctrl.changed_namespaces.add(nsid)
    if ctrl.ns_aen_masked or not ctrl.features.get(FEAT_ASYNC_EVENT_CONFIG,
                                                    FEATURE_DEFAULTS[FEAT_ASYNC_EVENT_CONFIG]) & OAES_NS_ATTRIBUTE:
        return
    ctrl.ns_aen_masked = True
    ctrl.post_aen(AEN_NS_CHANGED_DW0)


_HANDLERS = {
    AdminOpcode.IDENTIFY: _identify,
    AdminOpcode.SET_FEATURES: _features,
    AdminOpcode.GET_FEATURES: _features,
    AdminOpcode.CREATE_IO_CQ: _create_cq,
    AdminOpcode.CREATE_IO_SQ: _create_sq,
    AdminOpcode.DELETE_IO_SQ: _delete_sq,
    AdminOpcode.DELETE_IO_CQ: _delete_cq,
    AdminOpcode.ASYNC_EVENT_REQUEST: _async_event,
    AdminOpcode.ABORT: _abort,
    AdminOpcode.GET_LOG_PAGE: _get_log_page,
}
