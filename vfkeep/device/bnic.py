"""BNIC (MANA) requests (spec gdma.md §11), accepted only while the MANA device is registered.

Handlers follow `requests.py`'s contract (return the response structure's
bytes; the HWC zero-fills the space the driver declared). Every vport /
handle field is a vport index and must be < the number of vports.

Two drivers are served (spec gdma.md §11 and Appendix L):
- OpenHCL's (and vfkeep's, `vfkeep.driver`): every request of the table in
  §11.1 except FENCE_RQ, CONFIG_VPORT_RX version 1 (table at message offset
  112), QUERY_DEV_CONFIG response version 4, the VTL2 filter/serial requests.
- Linux's `mana` (6.1+, Appendix L.3): QUERY_DEV_CONFIG asks response version
  2 and takes `adapter_mtu` − 14 as its MTU limit, so it is `ADAPTER_MTU`
  (1514; the reference's 0 breaks it); CONFIG_VPORT_RX version 2
  (`ManaCfgRxSteerReqV2`, table at 120: the table offset is always taken from
  the request); FENCE_RQ after every CONFIG_VPORT_RX; QUERY_STATS as
  QUERY_GF_STAT (its longer response is zero-filled past §11.9's counters).
  Linux needs `wq_obj` ≠ ~0 and accepts the vport index.

Beyond the reference emulator (documented choices):
- QUERY_STATS is implemented: adapter-wide counters since the device process
  started (not reset by FLR), reported for the bits set in the mask;
  `reported_statistics` echoes the mask limited to `STATISTICS_FLAGS_ALL`.
- MOVE_FILTER stores `direction_to_vtl0`, which QUERY_FILTER_STATE reports.
  There is no VTL0 VF in vfkeep, so the direction changes no traffic.
- CONFIG_VPORT_RX stores the hash key and indirection table (validated to
  lie inside the request); with one RQ per vport steering is trivial.
- CREATE_WQ_OBJ requires `cq_parent_qid` to name an existing EQ.
- FENCE_RQ answers status 0 only once it has posted one CQE_RX_OBJECT_FENCE on
  the RQ's CQ (no receive WQE consumed, usual EQE/MSI-X notification;
  Appendix L.1); the reference refuses it.
"""
from __future__ import annotations

import ctypes

from vfkeep.gdma.bnic import (
    ManaCfgRxSteerReq,
    ManaCfgRxSteerReqV2,
    ManaConfigVportReq,
    ManaConfigVportResp,
    ManaCreateWqobjReq,
    ManaCreateWqobjResp,
    ManaDestroyWqobjReq,
    ManaFenceRqReq,
    ManaMoveFilterVTL2PrivilegedReq,
    ManaQueryDeviceCfgReq,
    ManaQueryDeviceCfgResp,
    ManaQueryFilterStateReq,
    ManaQueryFilterStateResponse,
    ManaQueryStatisticsRequest,
    ManaQueryStatisticsResponse,
    ManaQueryVportCfgReq,
    ManaQueryVportCfgResp,
    ManaSetVportSerialNo,
)
from vfkeep.gdma.constants import (
    ADAPTER_MTU,
    EMU_MAX_NUM_EQS,
    EMU_NUM_INDIRECTION_ENT,
    EMU_SHORT_FORM_ALLOWED,
    EMU_TX_VPORT_OFFSET,
    EMU_VPORT_MAX_NUM_RQ,
    EMU_VPORT_MAX_NUM_SQ,
    GDMA_RQ,
    GDMA_SQ,
    MANA_CONFIG_VPORT_RX,
    MANA_CONFIG_VPORT_RX_REQUEST_V2,
    MANA_CONFIG_VPORT_TX,
    MANA_CREATE_WQ_OBJ,
    MANA_DESTROY_WQ_OBJ,
    MANA_FENCE_RQ,
    MANA_QUERY_DEV_CONFIG,
    MANA_QUERY_STATS,
    MANA_QUERY_VPORT_CONFIG,
    MANA_VTL2_ASSIGN_SERIAL_NUMBER,
    MANA_VTL2_MOVE_FILTER,
    MANA_VTL2_QUERY_FILTER_STATE,
    STATISTICS_FLAGS_ALL,
    Tristate,
)
from vfkeep.gdma.hwc import GdmaReqHdr
from vfkeep.gdma.messages import REQ_HDR_SIZE

from .dma import DmaFault
from .requests import BadRequest, Refused, parse
from .vport import Vport

STAT_NAMES = tuple(name for name, *_ in ManaQueryStatisticsResponse._fields_[1:])
_U64 = (1 << 64) - 1
_TRISTATES = frozenset(int(t) for t in Tristate)


def _vport(dev, handle: int) -> Vport:
    if handle >= len(dev.vports):
        raise Refused(f"vport {handle} ≥ {len(dev.vports)} vports")
    return dev.vports[handle]


def query_dev_config(dev, hdr: GdmaReqHdr, body: bytes) -> bytes:
    parse(ManaQueryDeviceCfgReq, body)
    return ManaQueryDeviceCfgResp(max_num_vports=len(dev.vports), max_num_eqs=EMU_MAX_NUM_EQS,
                                  adapter_mtu=ADAPTER_MTU).to_bytes()


def query_vport_config(dev, hdr: GdmaReqHdr, body: bytes) -> bytes:
    vport = _vport(dev, parse(ManaQueryVportCfgReq, body).vport_index)
    resp = ManaQueryVportCfgResp(max_num_sq=EMU_VPORT_MAX_NUM_SQ, max_num_rq=EMU_VPORT_MAX_NUM_RQ,
                                 num_indirection_ent=EMU_NUM_INDIRECTION_ENT, vport=vport.index)
    resp.mac_addr[:] = list(vport.mac)
    return resp.to_bytes()


def config_vport_tx(dev, hdr: GdmaReqHdr, body: bytes) -> bytes:
    req = parse(ManaConfigVportReq, body)
    _vport(dev, req.vport).tx_config = {"pdid": req.pdid, "doorbell_pageid": req.doorbell_pageid}
    return ManaConfigVportResp(tx_vport_offset=EMU_TX_VPORT_OFFSET,
                               short_form_allowed=EMU_SHORT_FORM_ALLOWED).to_bytes()


def create_wq_obj(dev, hdr: GdmaReqHdr, body: bytes) -> bytes:
    req = parse(ManaCreateWqobjReq, body)
    vport = _vport(dev, req.vport)
    if req.wq_type not in (GDMA_SQ, GDMA_RQ):
        raise BadRequest(f"wq_type {req.wq_type} is neither GDMA_SQ nor GDMA_RQ")
    if vport.queues(req.wq_type)[0] is not None:
        raise Refused(f"vport {vport.index} already has a work queue of type {req.wq_type}")
    parent = dev.eqs.get(req.cq_parent_qid)
    if parent is None:
        raise Refused(f"cq_parent_qid {req.cq_parent_qid} is not an EQ")
    if req.wq_gdma_region == req.cq_gdma_region:
        raise BadRequest(f"work queue and completion queue share region {req.wq_gdma_region}")
    wq_region, cq_region = dev.regions.get(req.wq_gdma_region), dev.regions.get(req.cq_gdma_region)
    wq_mem = wq_region.queue_memory("WQ", req.wq_size)
    cq_mem = cq_region.queue_memory("CQ", req.cq_size)
    wq, cq = dev.create_wq_cq("SQ" if req.wq_type == GDMA_SQ else "RQ", wq_mem, cq_mem, parent)
    dev.regions.remove(wq_region.handle)
    dev.regions.remove(cq_region.handle)
    vport.attach(req.wq_type, wq, cq)
    return ManaCreateWqobjResp(wq_id=wq.id, cq_id=cq.id, wq_obj=vport.index).to_bytes()


def destroy_wq_obj(dev, hdr: GdmaReqHdr, body: bytes) -> bytes:
    req = parse(ManaDestroyWqobjReq, body)
    vport = _vport(dev, req.wq_obj_handle)
    wq, cq = vport.queues(req.wq_type) if req.wq_type in (GDMA_SQ, GDMA_RQ) else (None, None)
    if wq is None:
        raise Refused(f"vport {vport.index} has no work queue of type {req.wq_type}")
    if vport.running:
        raise Refused(f"vport {vport.index} traffic is running (CONFIG_VPORT_RX rx_enable FALSE first)")
    vport.detach(req.wq_type)
    dev.destroy_wq_cq(wq, cq)
    return b""


def config_vport_rx(dev, hdr: GdmaReqHdr, body: bytes) -> bytes:
    fixed = ManaCfgRxSteerReqV2 if hdr.req.msg_version >= MANA_CONFIG_VPORT_RX_REQUEST_V2 else ManaCfgRxSteerReq
    req = parse(fixed, body)
    if fixed is ManaCfgRxSteerReqV2:
        req = req.req  # `cqe_coalescing_enable` is ignored: no coalesced CQEs are ever posted
    vport = _vport(dev, req.vport)
    for name in ("rx_enable", "rss_enable"):
        if getattr(req, name) not in _TRISTATES:
            raise BadRequest(f"{name} {getattr(req, name):#x} is not a Tristate")
    table = None
    if req.update_indir_tab:
        n = req.num_indir_entries
        start = req.indir_tab_offset - REQ_HDR_SIZE
        if n > EMU_NUM_INDIRECTION_ENT:
            raise BadRequest(f"num_indir_entries {n} > {EMU_NUM_INDIRECTION_ENT}")
        if start < ctypes.sizeof(fixed) or start + 8 * n > len(body):
            raise BadRequest(f"indirection table of {n} entries at message offset {req.indir_tab_offset} "
                             f"is outside the {REQ_HDR_SIZE + len(body)}-byte request")
        table = list((ctypes.c_uint64 * n).from_buffer_copy(body, start)) if n else []
    if req.rx_enable == Tristate.TRUE and (vport.sq is None or vport.rq is None):
        raise Refused(f"vport {vport.index} needs both an SQ and an RQ before rx_enable")
    if req.update_default_rxobj:
        vport.default_rxobj = req.default_rxobj
    if req.update_hashkey:
        vport.hashkey = bytes(req.hashkey)
    if table is not None:
        vport.indir_table = table
    if req.rss_enable != Tristate.UNKNOWN:
        vport.rss_enable = req.rss_enable == Tristate.TRUE
    if req.rx_enable == Tristate.TRUE:
        vport.start()
    elif req.rx_enable == Tristate.FALSE:
        vport.stop()
    return b""


def query_stats(dev, hdr: GdmaReqHdr, body: bytes) -> bytes:
    mask = parse(ManaQueryStatisticsRequest, body).requested_statistics & STATISTICS_FLAGS_ALL
    resp = ManaQueryStatisticsResponse(reported_statistics=mask)
    for bit, name in enumerate(STAT_NAMES):
        if mask >> bit & 1:
            setattr(resp, name, dev.counters[name] & _U64)
    return resp.to_bytes()


def query_filter_state(dev, hdr: GdmaReqHdr, body: bytes) -> bytes:
    vport = _vport(dev, parse(ManaQueryFilterStateReq, body).vport)
    return ManaQueryFilterStateResponse(direction_to_vtl0=vport.direction_to_vtl0).to_bytes()


def assign_serial_number(dev, hdr: GdmaReqHdr, body: bytes) -> bytes:
    req = parse(ManaSetVportSerialNo, body)
    _vport(dev, req.vport).serial_no = req.serial_no
    return b""


def move_filter(dev, hdr: GdmaReqHdr, body: bytes) -> bytes:
    req = parse(ManaMoveFilterVTL2PrivilegedReq, body)
    vport = _vport(dev, req.vport)
    if req.direction_to_vtl0 > 1:
        raise BadRequest(f"direction_to_vtl0 {req.direction_to_vtl0} is not 0 or 1")
    vport.direction_to_vtl0 = req.direction_to_vtl0
    return b""


def fence_rq(dev, hdr: GdmaReqHdr, body: bytes) -> bytes:
    """Success only with the fence CQE posted: Linux waits 10 s for a CQE that never comes."""
    vport = _vport(dev, parse(ManaFenceRqReq, body).wq_obj_handle)
    if vport.rq is None:
        raise Refused(f"vport {vport.index} has no RQ to fence")
    try:
        vport.fence_rq()
    except DmaFault:
        dev.dma_fault("RX CQ", vport.rx_cq.id)
        raise Refused(f"fence CQE for RQ {vport.rq.id}: RX CQ {vport.rx_cq.id} is not DMA-mapped") from None
    return b""


HANDLERS = {
    MANA_QUERY_DEV_CONFIG: query_dev_config,
    MANA_QUERY_STATS: query_stats,
    MANA_CONFIG_VPORT_TX: config_vport_tx,
    MANA_CREATE_WQ_OBJ: create_wq_obj,
    MANA_DESTROY_WQ_OBJ: destroy_wq_obj,
    MANA_FENCE_RQ: fence_rq,
    MANA_CONFIG_VPORT_RX: config_vport_rx,
    MANA_QUERY_VPORT_CONFIG: query_vport_config,
    MANA_VTL2_ASSIGN_SERIAL_NUMBER: assign_serial_number,
    MANA_VTL2_MOVE_FILTER: move_filter,
    MANA_VTL2_QUERY_FILTER_STATE: query_filter_state,
}

__all__ = ["HANDLERS", "STAT_NAMES"]
