"""GDMA requests (spec gdma.md §9) and the DMA-region table they manage.

Each handler takes `(dev, GdmaReqHdr, body)` and returns the response body
bytes (b"" for empty responses); it raises `BadRequest` for a malformed
request (short body, bad sizes; counted `bad_requests`) or `Refused` for a
well-formed request the device state does not allow. Both answer status 1.

Beyond the reference emulator: DESTROY_DMA_REGION is implemented (frees the
handle, status 0; an unknown handle → status 1), as §9.12 asks. ADD_PAGES has
no defined layout and is refused. CREATE_QUEUE and DISABLE_QUEUE handle EQs
only (data CQs/WQs are created by MANA CREATE_WQ_OBJ), as in the reference.
Queue ids go back to their pool when a queue is destroyed.

Both drivers send these (Linux's `mana` also uses GENERATE_TEST_EQE on every
data EQ, with the MANA `dev_id`, and CREATE_DMA_REGION with exactly
`page_count` entries, both accepted). VERIFY_VF_DRIVER_VERSION advertises no
PF capability: without `GDMA_PF_CAP_FLAG_1_QUERY_HWC_TIMEOUT` Linux does not
send QUERY_HWC_TIMEOUT (84), which is not implemented (gdma.md Appendix L.3).
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Callable

from vfkeep.gdma.constants import (
    EMU_DMA_REGION_FIRST_HANDLE,
    EMU_LIST_DEVICES_COUNT,
    EMU_MAX_CQ_MOD_CTX,
    EMU_MAX_DB,
    EMU_MAX_MOD_CQ,
    EMU_MAX_MSIX,
    EMU_MAX_MST,
    EMU_NUM_CQ,
    EMU_NUM_EQ,
    EMU_NUM_RQ,
    EMU_NUM_SQ,
    EMU_REGISTER_DB_ID,
    EMU_REGISTER_GPA_MKEY,
    EMU_REGISTER_PDID,
    GDMA_CHANGE_MSIX_FOR_EQ,
    GDMA_CREATE_DMA_REGION,
    GDMA_CREATE_QUEUE,
    GDMA_DEREGISTER_DEVICE,
    GDMA_DESTROY_DMA_REGION,
    GDMA_DISABLE_QUEUE,
    GDMA_DMA_REGION_ADD_PAGES,
    GDMA_EQ,
    GDMA_EQE_HWC_RESET_REQUEST,
    GDMA_EQE_TEST_EVENT,
    GDMA_GENERATE_RESET_REQUEST_EQE,
    GDMA_GENERATE_TEST_EQE,
    GDMA_LIST_DEVICES,
    GDMA_PAGE_TYPE_4K,
    GDMA_QUERY_MAX_RESOURCES,
    GDMA_REGISTER_DEVICE,
    GDMA_VERIFY_VF_DRIVER_VERSION,
    HWC_DEV_ID,
    PAGE_SIZE,
    PCI_MSIX_VECTORS,
)
from vfkeep.gdma.hwc import GdmaDevId, GdmaReqHdr
from vfkeep.gdma.requests import (
    GdmaChangeMsixVectorIndexForEq,
    GdmaCreateDmaRegionReq,
    GdmaCreateDmaRegionResp,
    GdmaCreateQueueReq,
    GdmaCreateQueueResp,
    GdmaDestroyDmaRegionReq,
    GdmaDisableQueueReq,
    GdmaGenerateResetEventReq,
    GdmaGenerateTestEventReq,
    GdmaListDevicesResp,
    GdmaQueryMaxResourcesResp,
    GdmaRegisterDeviceResp,
    GdmaVerifyVerReq,
    GdmaVerifyVerResp,
)

from .hostile import BAD_DOORBELL_PAGE
from .queues import QueueError, QueueMemory, check_queue_memory

MAX_DMA_REGIONS = 4096
_U64_SIZE = 8


class BadRequest(Exception):
    """Malformed request: status 1 and `bad_requests` + 1."""


class Refused(Exception):
    """Well-formed request the device state does not allow: status 1."""


def parse(cls, body: bytes):
    """`cls` from the start of `body`; a short body is a BadRequest naming both sizes."""
    need = ctypes.sizeof(cls)
    if len(body) < need:
        raise BadRequest(f"{cls.__name__} needs {need} bytes, request body has {len(body)}")
    return cls.from_bytes(body)


@dataclass
class DmaRegion:
    """A GDMA memory region: page addresses, offset into the first page, length in bytes."""

    handle: int
    pages: list[int]
    offset: int
    length: int

    def queue_memory(self, kind: str, size: int) -> QueueMemory:
        """The region as the ring of a `kind` queue of `size` bytes (§6.1 rules, length == size)."""
        if self.length != size:
            raise Refused(f"region {self.handle} is {self.length} bytes, {kind} size is {size}")
        try:
            check_queue_memory(kind, self.offset, size)
            return QueueMemory(self.pages, self.offset, size)
        except QueueError as e:
            raise Refused(str(e)) from None

    def inspect(self) -> dict:
        return {"handle": self.handle, "pages": self.pages, "offset": self.offset, "length": self.length}


class DmaRegions:
    """`gdma_region` handles: 1-based slots, the most recently freed slot reused first (§9.11)."""

    def __init__(self) -> None:
        self.regions: dict[int, DmaRegion] = {}
        self._free: list[int] = []
        self._next = EMU_DMA_REGION_FIRST_HANDLE

    def add(self, pages: list[int], offset: int, length: int) -> int:
        if len(self.regions) >= MAX_DMA_REGIONS:
            raise Refused(f"{MAX_DMA_REGIONS} DMA regions already exist")
        if self._free:
            handle = self._free.pop()
        else:
            handle, self._next = self._next, self._next + 1
        self.regions[handle] = DmaRegion(handle, pages, offset, length)
        return handle

    def get(self, handle: int) -> DmaRegion:
        try:
            return self.regions[handle]
        except KeyError:
            raise Refused(f"no DMA region {handle}") from None

    def remove(self, handle: int) -> None:
        """Free a handle (destroyed, or consumed by a queue)."""
        self.get(handle)
        del self.regions[handle]
        self._free.append(handle)


def verify_vf_driver_version(dev, hdr: GdmaReqHdr, body: bytes) -> bytes:
    req = parse(GdmaVerifyVerReq, body)
    dev.driver_info = {"protocol_ver_min": req.protocol_ver_min, "protocol_ver_max": req.protocol_ver_max,
                       "gd_drv_cap_flags1": req.gd_drv_cap_flags1, "os_type": req.os_type,
                       "os_ver_str1": bytes(req.os_ver_str1).split(b"\0", 1)[0].decode("utf-8", "replace")}
    version = req.protocol_ver_max + 1 if "protocol_version" in dev.hostile else req.protocol_ver_min
    return GdmaVerifyVerResp(gdma_protocol_ver=version).to_bytes()


def query_max_resources(dev, hdr: GdmaReqHdr, body: bytes) -> bytes:
    return GdmaQueryMaxResourcesResp(
        status=0, max_sq=EMU_NUM_SQ, max_rq=EMU_NUM_RQ, max_cq=EMU_NUM_CQ, max_eq=EMU_NUM_EQ, max_db=EMU_MAX_DB,
        max_mst=EMU_MAX_MST, max_cq_mod_ctx=EMU_MAX_CQ_MOD_CTX, max_mod_cq=EMU_MAX_MOD_CQ, max_msix=EMU_MAX_MSIX,
    ).to_bytes()


def list_devices(dev, hdr: GdmaReqHdr, body: bytes) -> bytes:
    if "no_mana_device" in dev.hostile:
        resp = GdmaListDevicesResp(num_of_devs=1)
        resp.devs[0] = GdmaDevId.from_int(HWC_DEV_ID)
        return resp.to_bytes()
    resp = GdmaListDevicesResp(num_of_devs=EMU_LIST_DEVICES_COUNT)
    resp.devs[0] = GdmaDevId.from_int(HWC_DEV_ID)
    resp.devs[1] = GdmaDevId.from_int(dev.mana_dev_id)
    return resp.to_bytes()


def _require_mana(dev, hdr: GdmaReqHdr) -> None:
    if hdr.dev_id.to_int() != dev.mana_dev_id:
        raise Refused(f"dev_id {hdr.dev_id.to_int():#x} is not the MANA device {dev.mana_dev_id:#x}")


def register_device(dev, hdr: GdmaReqHdr, body: bytes) -> bytes:
    _require_mana(dev, hdr)
    if dev.registered:
        raise Refused("device already registered")
    dev.registered = True
    db_id = BAD_DOORBELL_PAGE if "register_doorbell_out_of_range" in dev.hostile else EMU_REGISTER_DB_ID
    return GdmaRegisterDeviceResp(pdid=EMU_REGISTER_PDID, gpa_mkey=EMU_REGISTER_GPA_MKEY, db_id=db_id).to_bytes()


def deregister_device(dev, hdr: GdmaReqHdr, body: bytes) -> bytes:
    _require_mana(dev, hdr)
    if not dev.registered:
        raise Refused("device not registered")
    dev.registered = False
    return b""


def _eq(dev, qid: int):
    eq = dev.eqs.get(qid)
    if eq is None:
        raise Refused(f"no EQ {qid}")
    return eq


def generate_test_eqe(dev, hdr: GdmaReqHdr, body: bytes) -> bytes:
    req = parse(GdmaGenerateTestEventReq, body)
    dev.post_eqe(_eq(dev, req.queue_index), GDMA_EQE_TEST_EVENT)
    return b""


def generate_reset_request_eqe(dev, hdr: GdmaReqHdr, body: bytes) -> bytes:
    req = parse(GdmaGenerateResetEventReq, body)
    dev.post_eqe(_eq(dev, req.queue_index), GDMA_EQE_HWC_RESET_REQUEST, req.data.to_bytes())
    return b""


def create_queue(dev, hdr: GdmaReqHdr, body: bytes) -> bytes:
    req = parse(GdmaCreateQueueReq, body)
    if req.queue_type != GDMA_EQ:
        raise Refused(f"CREATE_QUEUE supports EQs only, got queue_type {req.queue_type}")
    if req.eq_pci_msix_index >= PCI_MSIX_VECTORS:
        raise Refused(f"eq_pci_msix_index {req.eq_pci_msix_index} ≥ {PCI_MSIX_VECTORS}")
    region = dev.regions.get(req.gdma_region)
    mem = region.queue_memory("EQ", req.queue_size)
    eq = dev.create_eq(mem, req.eq_pci_msix_index)
    dev.regions.remove(region.handle)
    return GdmaCreateQueueResp(queue_index=eq.id).to_bytes()


def disable_queue(dev, hdr: GdmaReqHdr, body: bytes) -> bytes:
    req = parse(GdmaDisableQueueReq, body)
    if req.queue_type != GDMA_EQ:
        raise Refused(f"DISABLE_QUEUE supports EQs only, got queue_type {req.queue_type}")
    eq = _eq(dev, req.queue_index)
    if dev.hwc is not None and eq is dev.hwc.eq:
        raise Refused(f"EQ {eq.id} belongs to the HWC")
    dev.destroy_eq(eq)
    return b""


def create_dma_region(dev, hdr: GdmaReqHdr, body: bytes) -> bytes:
    req = parse(GdmaCreateDmaRegionReq, body)
    fixed = ctypes.sizeof(GdmaCreateDmaRegionReq)
    n = req.page_addr_list_len
    if fixed + n * _U64_SIZE > len(body):
        raise BadRequest(f"page list of {n} entries does not fit in a {len(body)}-byte body")
    if req.gdma_page_type != GDMA_PAGE_TYPE_4K:
        raise BadRequest(f"gdma_page_type {req.gdma_page_type} is not GDMA_PAGE_TYPE_4K")
    if n != req.page_count:
        raise BadRequest(f"page_addr_list_len {n} != page_count {req.page_count}")
    if req.length == 0 or req.offset_in_page >= PAGE_SIZE or n * PAGE_SIZE < req.length + req.offset_in_page:
        raise BadRequest(f"length {req.length} + offset {req.offset_in_page} does not fit {n} pages")
    pages = list((ctypes.c_uint64 * n).from_buffer_copy(body, fixed)) if n else []
    bad = [p for p in pages if p % PAGE_SIZE]
    if bad:
        raise BadRequest(f"page address {bad[0]:#x} is not 4096-aligned")
    handle = dev.regions.add(pages, req.offset_in_page, req.length)
    return GdmaCreateDmaRegionResp(gdma_region=handle).to_bytes()


def destroy_dma_region(dev, hdr: GdmaReqHdr, body: bytes) -> bytes:
    req = parse(GdmaDestroyDmaRegionReq, body)
    dev.regions.remove(req.gdma_region)
    return b""


def change_msix_for_eq(dev, hdr: GdmaReqHdr, body: bytes) -> bytes:
    req = parse(GdmaChangeMsixVectorIndexForEq, body)
    if req.msix >= PCI_MSIX_VECTORS:
        raise Refused(f"msix {req.msix} ≥ {PCI_MSIX_VECTORS}")
    _eq(dev, req.queue_index).msix = req.msix
    return b""


def add_pages(dev, hdr: GdmaReqHdr, body: bytes) -> bytes:
    raise Refused("GDMA_DMA_REGION_ADD_PAGES has no defined layout")


Handler = Callable[[object, GdmaReqHdr, bytes], bytes]
HANDLERS: dict[int, Handler] = {
    GDMA_VERIFY_VF_DRIVER_VERSION: verify_vf_driver_version,
    GDMA_QUERY_MAX_RESOURCES: query_max_resources,
    GDMA_LIST_DEVICES: list_devices,
    GDMA_REGISTER_DEVICE: register_device,
    GDMA_DEREGISTER_DEVICE: deregister_device,
    GDMA_GENERATE_TEST_EQE: generate_test_eqe,
    GDMA_GENERATE_RESET_REQUEST_EQE: generate_reset_request_eqe,
    GDMA_CREATE_QUEUE: create_queue,
    GDMA_DISABLE_QUEUE: disable_queue,
    GDMA_CREATE_DMA_REGION: create_dma_region,
    GDMA_DMA_REGION_ADD_PAGES: add_pages,
    GDMA_DESTROY_DMA_REGION: destroy_dma_region,
    GDMA_CHANGE_MSIX_FOR_EQ: change_msix_for_eq,
}

__all__ = ["HANDLERS", "BadRequest", "Refused", "DmaRegion", "DmaRegions", "parse", "MAX_DMA_REGIONS"]
