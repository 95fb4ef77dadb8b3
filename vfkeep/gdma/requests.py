"""GDMA request and response bodies (§9); each follows `GdmaReqHdr` / `GdmaRespHdr`."""
from __future__ import annotations

from .base import WireStruct, u8, u32, u64
from .constants import DRV_DMA_REGION_MAX_PAGES
from .hwc import GdmaDevId
from .queues import EqeVfReset


class GdmaVerifyVerReq(WireStruct):
    """§9.3 VERIFY_VF_DRIVER_VERSION request (600 bytes); `os_ver_str*` are NUL-terminated."""

    _fields_ = [
        ("protocol_ver_min", u64),
        ("protocol_ver_max", u64),
        ("gd_drv_cap_flags1", u64),
        ("gd_drv_cap_flags2", u64),
        ("gd_drv_cap_flags3", u64),
        ("gd_drv_cap_flags4", u64),
        ("drv_ver", u64),
        ("os_type", u32),
        ("reserved", u32),
        ("os_ver_major", u32),
        ("os_ver_minor", u32),
        ("os_ver_build", u32),
        ("os_ver_platform", u32),
        ("reserved_2", u64),
        ("os_ver_str1", u8 * 128),
        ("os_ver_str2", u8 * 128),
        ("os_ver_str3", u8 * 128),
        ("os_ver_str4", u8 * 128),
    ]


class GdmaVerifyVerResp(WireStruct):
    """§9.3: the driver requires `gdma_protocol_ver == 1`."""

    _fields_ = [
        ("gdma_protocol_ver", u64),
        ("pf_cap_flags1", u64),
        ("pf_cap_flags2", u64),
        ("pf_cap_flags3", u64),
        ("pf_cap_flags4", u64),
    ]


class GdmaQueryMaxResourcesResp(WireStruct):
    """§9.4."""

    _fields_ = [
        ("status", u32),
        ("max_sq", u32),
        ("max_rq", u32),
        ("max_cq", u32),
        ("max_eq", u32),
        ("max_db", u32),
        ("max_mst", u32),
        ("max_cq_mod_ctx", u32),
        ("max_mod_cq", u32),
        ("max_msix", u32),
    ]


class GdmaListDevicesResp(WireStruct):
    """§9.5: only the first `num_of_devs` of `devs` are meaningful."""

    _fields_ = [("num_of_devs", u32), ("reserved", u32), ("devs", GdmaDevId * 64)]


class GdmaRegisterDeviceResp(WireStruct):
    """§9.6: pdid, gpa_mkey (goes into every data-path SGE), db_id (doorbell page of data queues)."""

    _fields_ = [("pdid", u32), ("gpa_mkey", u32), ("db_id", u32)]


class GdmaGenerateTestEventReq(WireStruct):
    """§9.7: device posts a `GDMA_EQE_TEST_EVENT` to EQ `queue_index`."""

    _fields_ = [("queue_index", u32)]


class GdmaGenerateResetEventReq(WireStruct):
    """§9.8: device posts a `GDMA_EQE_HWC_RESET_REQUEST` whose payload dword is `data`."""

    _fields_ = [("queue_index", u32), ("data", EqeVfReset)]


class GdmaCreateQueueReq(WireStruct):
    """§9.9 (56 bytes); the region named by `gdma_region` is consumed on success."""

    _fields_ = [
        ("queue_type", u32),
        ("reserved1", u32),
        ("pdid", u32),
        ("doorbell_id", u32),
        ("gdma_region", u64),
        ("reserved2", u32),
        ("queue_size", u32),
        ("log2_throttle_limit", u32),
        ("eq_pci_msix_index", u32),
        ("cq_mod_ctx_id", u32),
        ("cq_parent_eq_id", u32),
        ("rq_drop_on_overrun", u8),
        ("rq_err_on_wqe_overflow", u8),
        ("rq_chain_rec_wqes", u8),
        ("sq_hw_db", u8),
        ("reserved3", u32),
    ]


class GdmaCreateQueueResp(WireStruct):
    _fields_ = [("queue_index", u32)]


class GdmaDisableQueueReq(WireStruct):
    """§9.10: the driver always sends `alloc_res_id_on_creation` = 1."""

    _fields_ = [("queue_type", u32), ("queue_index", u32), ("alloc_res_id_on_creation", u32)]


class GdmaCreateDmaRegionReq(WireStruct):
    """§9.11 fixed part (24 bytes); `page_addr_list_len` u64 page *addresses* follow it."""

    _fields_ = [
        ("length", u64),
        ("offset_in_page", u32),
        ("gdma_page_type", u32),
        ("page_count", u32),
        ("page_addr_list_len", u32),
    ]


class GdmaCreateDmaRegionReqDriver(WireStruct):
    """Appendix A: the body the reference driver sends (fixed 16-entry list, unused entries zero)."""

    _fields_ = [("req", GdmaCreateDmaRegionReq), ("page_addr_list", u64 * DRV_DMA_REGION_MAX_PAGES)]


class GdmaCreateDmaRegionResp(WireStruct):
    _fields_ = [("gdma_region", u64)]


class GdmaDestroyDmaRegionReq(WireStruct):
    """§9.12: only for regions not consumed by CREATE_QUEUE / CREATE_WQ_OBJ."""

    _fields_ = [("gdma_region", u64)]


class GdmaChangeMsixVectorIndexForEq(WireStruct):
    """§9.13: retarget EQ `queue_index` to vector `msix`."""

    _fields_ = [("queue_index", u32), ("msix", u32), ("reserved1", u32), ("reserved2", u32)]


__all__ = [
    "GdmaVerifyVerReq", "GdmaVerifyVerResp", "GdmaQueryMaxResourcesResp", "GdmaListDevicesResp",
    "GdmaRegisterDeviceResp", "GdmaGenerateTestEventReq", "GdmaGenerateResetEventReq", "GdmaCreateQueueReq",
    "GdmaCreateQueueResp", "GdmaDisableQueueReq", "GdmaCreateDmaRegionReq", "GdmaCreateDmaRegionReqDriver",
    "GdmaCreateDmaRegionResp", "GdmaDestroyDmaRegionReq", "GdmaChangeMsixVectorIndexForEq",
]
