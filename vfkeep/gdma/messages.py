"""Which body travels with which request code, and the §8.1 header rules built on that.

`MESSAGES[code]` gives the request/response body structs (as the reference
driver sends them) and the header versions; `request_header()` fills a
`GdmaReqHdr` from it and `response_header()` the device's echo.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass

from . import bnic, requests
from .base import WireStruct
from .constants import (
    GDMA_DEVICE_SPECIFIC_MSG_SHIFT,
    GDMA_MESSAGE_V1,
    GDMA_STANDARD_HEADER_TYPE,
    MANA_QUERY_DEV_CONFIG_REQUEST_V1,
    MANA_QUERY_DEV_CONFIG_RESPONSE_V4,
    MANA_VTL2_MOVE_FILTER_REQUEST_V2,
    MANA_VTL2_MOVE_FILTER_RESPONSE_V1,
    GdmaRequestType,
    ManaCommandCode,
)
from .hwc import GdmaDevId, GdmaMsgHdr, GdmaReqHdr, GdmaRespHdr

REQ_HDR_SIZE = ctypes.sizeof(GdmaReqHdr)
RESP_HDR_SIZE = ctypes.sizeof(GdmaRespHdr)


@dataclass(frozen=True)
class MessageSpec:
    """Bodies (None = empty) and header `msg_version`s of one request code."""

    request: type[WireStruct] | None
    response: type[WireStruct] | None
    req_version: int = GDMA_MESSAGE_V1
    resp_version: int = GDMA_MESSAGE_V1

    @property
    def req_msg_size(self) -> int:
        return REQ_HDR_SIZE + (ctypes.sizeof(self.request) if self.request else 0)

    @property
    def resp_msg_size(self) -> int:
        return RESP_HDR_SIZE + (ctypes.sizeof(self.response) if self.response else 0)


G, M = GdmaRequestType, ManaCommandCode
# GDMA_DMA_REGION_ADD_PAGES has no defined layout and is absent on purpose.
MESSAGES: dict[int, MessageSpec] = {
    G.GDMA_VERIFY_VF_DRIVER_VERSION: MessageSpec(requests.GdmaVerifyVerReq, requests.GdmaVerifyVerResp),
    G.GDMA_QUERY_MAX_RESOURCES: MessageSpec(None, requests.GdmaQueryMaxResourcesResp),
    G.GDMA_LIST_DEVICES: MessageSpec(None, requests.GdmaListDevicesResp),
    G.GDMA_REGISTER_DEVICE: MessageSpec(None, requests.GdmaRegisterDeviceResp),
    G.GDMA_DEREGISTER_DEVICE: MessageSpec(None, None),
    G.GDMA_GENERATE_TEST_EQE: MessageSpec(requests.GdmaGenerateTestEventReq, None),
    G.GDMA_GENERATE_RESET_REQUEST_EQE: MessageSpec(requests.GdmaGenerateResetEventReq, None),
    G.GDMA_CREATE_QUEUE: MessageSpec(requests.GdmaCreateQueueReq, requests.GdmaCreateQueueResp),
    G.GDMA_DISABLE_QUEUE: MessageSpec(requests.GdmaDisableQueueReq, None),
    G.GDMA_CREATE_DMA_REGION: MessageSpec(
        requests.GdmaCreateDmaRegionReqDriver, requests.GdmaCreateDmaRegionResp
    ),
    G.GDMA_DESTROY_DMA_REGION: MessageSpec(requests.GdmaDestroyDmaRegionReq, None),
    G.GDMA_CHANGE_MSIX_FOR_EQ: MessageSpec(requests.GdmaChangeMsixVectorIndexForEq, None),
    M.MANA_QUERY_DEV_CONFIG: MessageSpec(
        bnic.ManaQueryDeviceCfgReq,
        bnic.ManaQueryDeviceCfgResp,
        MANA_QUERY_DEV_CONFIG_REQUEST_V1,
        MANA_QUERY_DEV_CONFIG_RESPONSE_V4,
    ),
    M.MANA_QUERY_STATS: MessageSpec(bnic.ManaQueryStatisticsRequest, bnic.ManaQueryStatisticsResponse),
    M.MANA_CONFIG_VPORT_TX: MessageSpec(bnic.ManaConfigVportReq, bnic.ManaConfigVportResp),
    M.MANA_CREATE_WQ_OBJ: MessageSpec(bnic.ManaCreateWqobjReq, bnic.ManaCreateWqobjResp),
    M.MANA_DESTROY_WQ_OBJ: MessageSpec(bnic.ManaDestroyWqobjReq, None),
    M.MANA_FENCE_RQ: MessageSpec(bnic.ManaFenceRqReq, None),
    M.MANA_CONFIG_VPORT_RX: MessageSpec(bnic.ManaCfgRxSteerReqDriver, None),
    M.MANA_QUERY_VPORT_CONFIG: MessageSpec(bnic.ManaQueryVportCfgReq, bnic.ManaQueryVportCfgResp),
    M.MANA_VTL2_ASSIGN_SERIAL_NUMBER: MessageSpec(bnic.ManaSetVportSerialNo, None),
    M.MANA_VTL2_MOVE_FILTER: MessageSpec(
        bnic.ManaMoveFilterVTL2PrivilegedReq,
        None,
        MANA_VTL2_MOVE_FILTER_REQUEST_V2,
        MANA_VTL2_MOVE_FILTER_RESPONSE_V1,
    ),
    M.MANA_VTL2_QUERY_FILTER_STATE: MessageSpec(bnic.ManaQueryFilterStateReq, bnic.ManaQueryFilterStateResponse),
}
del G, M


def message_spec(code: int) -> MessageSpec:
    try:
        return MESSAGES[code]
    except KeyError:
        raise KeyError(f"no message layout for request code {code:#x}") from None


def message_sizes(code: int) -> tuple[int, int]:
    """(`req.msg_size`, `resp.msg_size`) for a request code as the reference driver sends it (§9.1)."""
    spec = message_spec(code)
    return spec.req_msg_size, spec.resp_msg_size


def is_device_specific(msg_type: int) -> bool:
    """§8.3 dispatch: GDMA requests have `msg_type >> 16 == 0`; anything else goes to the device (BNIC)."""
    return msg_type >> GDMA_DEVICE_SPECIFIC_MSG_SHIFT != 0


def request_header(
    code: int,
    dev_id: GdmaDevId | int,
    activity_id: int,
    *,
    req_body_size: int | None = None,
    resp_body_size: int | None = None,
) -> GdmaReqHdr:
    """`GdmaReqHdr` for `code` (§8.1): sizes and versions from `MESSAGES`, overridable body sizes."""
    spec = message_spec(code)
    req_size = REQ_HDR_SIZE + req_body_size if req_body_size is not None else spec.req_msg_size
    resp_size = RESP_HDR_SIZE + resp_body_size if resp_body_size is not None else spec.resp_msg_size
    hdr = GdmaReqHdr(activity_id=activity_id)
    hdr.req = GdmaMsgHdr(GDMA_STANDARD_HEADER_TYPE, code, spec.req_version, 0, req_size)
    hdr.resp = GdmaMsgHdr(GDMA_STANDARD_HEADER_TYPE, code, spec.resp_version, 0, resp_size)
    hdr.dev_id = dev_id if isinstance(dev_id, GdmaDevId) else GdmaDevId.from_int(dev_id)
    return hdr


def response_header(req: GdmaReqHdr, status: int) -> GdmaRespHdr:
    """The device's `GdmaRespHdr` (§8.1): echoes `resp`, `dev_id`, `activity_id`. `hwc_msg_id` comes from
    `req`: Linux sets only `req.hwc_msg_id` and matches the response by it (Appendix L.2); the reference
    driver sets both to 0."""
    resp = GdmaRespHdr(response=req.resp, dev_id=req.dev_id, activity_id=req.activity_id, status=status)
    resp.response.hwc_msg_id = req.req.hwc_msg_id
    return resp


__all__ = [
    "MessageSpec", "MESSAGES", "REQ_HDR_SIZE", "RESP_HDR_SIZE", "message_spec", "message_sizes",
    "is_device_specific", "request_header", "response_header",
]
