"""BNIC (MANA) request and response bodies (§11); sent over the HWC with the MANA `dev_id`.

Every `vport` field is the 64-bit handle returned by QUERY_VPORT_CONFIG.
"""
from __future__ import annotations

from .base import BitfieldWord, WireStruct, bits, u8, u16, u32, u64
from .constants import DRV_INDIR_TABLE_ENTRIES


class ManaQueryDeviceCfgReq(WireStruct):
    """§11.2 (request version 1)."""

    _fields_ = [
        ("mn_drv_cap_flags1", u64),
        ("mn_drv_cap_flags2", u64),
        ("mn_drv_cap_flags3", u64),
        ("mn_drv_cap_flags4", u64),
        ("proto_major_ver", u32),
        ("proto_minor_ver", u32),
        ("proto_micro_ver", u32),
        ("reserved", u32),
    ]


class BasicNicDriverFlags(BitfieldWord):
    """§11.2 `pf_cap_flags1`: `query_filter_state` makes the driver ask QUERY_FILTER_STATE per vport."""

    _fields_ = bits(
        u64, ("query_link_status", 1), ("ethertype_enforcement", 1), ("query_filter_state", 1), ("reserved", 61)
    )


class ManaQueryDeviceCfgResp(WireStruct):
    """§11.2 (response version 4); `adapter_link_speed_mbps` 0 means 200 Gbit/s to the driver."""

    _fields_ = [
        ("pf_cap_flags1", BasicNicDriverFlags),
        ("pf_cap_flags2", u64),
        ("pf_cap_flags3", u64),
        ("pf_cap_flags4", u64),
        ("max_num_vports", u16),
        ("reserved", u16),
        ("max_num_eqs", u32),
        ("adapter_mtu", u16),
        ("reserved2", u16),
        ("adapter_link_speed_mbps", u32),
    ]


class ManaQueryVportCfgReq(WireStruct):
    _fields_ = [("vport_index", u32)]


class ManaQueryVportCfgResp(WireStruct):
    """§11.3: `mac_addr` in transmission byte order; `vport` is the handle for later requests."""

    _fields_ = [
        ("max_num_sq", u32),
        ("max_num_rq", u32),
        ("num_indirection_ent", u32),
        ("reserved1", u32),
        ("mac_addr", u8 * 6),
        ("reserved2", u16),
        ("vport", u64),
    ]


class ManaConfigVportReq(WireStruct):
    """§11.4 CONFIG_VPORT_TX."""

    _fields_ = [("vport", u64), ("pdid", u32), ("doorbell_pageid", u32)]


class ManaConfigVportResp(WireStruct):
    """§11.4: `tx_vport_offset` goes into every TX OOB."""

    _fields_ = [("tx_vport_offset", u16), ("short_form_allowed", u8), ("reserved", u8)]


class ManaCreateWqobjReq(WireStruct):
    """§11.5: `wq_type` is `GDMA_SQ` (TX) or `GDMA_RQ` (RX); both regions are consumed."""

    _fields_ = [
        ("vport", u64),
        ("wq_type", u32),
        ("reserved", u32),
        ("wq_gdma_region", u64),
        ("cq_gdma_region", u64),
        ("wq_size", u32),
        ("cq_size", u32),
        ("cq_moderation_ctx_id", u32),
        ("cq_parent_qid", u32),
    ]


class ManaCreateWqobjResp(WireStruct):
    _fields_ = [("wq_id", u32), ("cq_id", u32), ("wq_obj", u64)]


class ManaDestroyWqobjReq(WireStruct):
    _fields_ = [("wq_type", u32), ("reserved", u32), ("wq_obj_handle", u64)]


class ManaFenceRqReq(WireStruct):
    _fields_ = [("wq_obj_handle", u64)]


class ManaCfgRxSteerReq(WireStruct):
    """§11.8 CONFIG_VPORT_RX fixed part; `rx_enable`/`rss_enable` are `Tristate`.

    `indir_tab_offset` counts from the start of the message, so it is
    `CFG_RX_INDIR_TAB_OFFSET` (40 + 72 = 112) when the table directly follows.
    """

    _fields_ = [
        ("vport", u64),
        ("num_indir_entries", u16),
        ("indir_tab_offset", u16),
        ("rx_enable", u32),
        ("rss_enable", u32),
        ("update_default_rxobj", u8),
        ("update_hashkey", u8),
        ("update_indir_tab", u8),
        ("reserved", u8),
        ("default_rxobj", u64),
        ("hashkey", u8 * 40),
    ]


class ManaCfgRxSteerReqDriver(WireStruct):
    """Appendix A: body as the reference driver sends it (always 128 table entries, 1096 bytes)."""

    _fields_ = [("req", ManaCfgRxSteerReq), ("indir_table", u64 * DRV_INDIR_TABLE_ENTRIES)]


class ManaCfgRxSteerReqV2(WireStruct):
    """Appendix L.3: CONFIG_VPORT_RX request version 2 (Linux); the v1 fields, then
    `cqe_coalescing_enable` (Linux 6.1/6.12 send 0); the table follows at body offset 80."""

    _fields_ = [("req", ManaCfgRxSteerReq), ("cqe_coalescing_enable", u8), ("reserved2", u8 * 7)]


class ManaQueryStatisticsRequest(WireStruct):
    """§11.9: `requested_statistics` is a `StatisticsFlags` mask."""

    _fields_ = [("requested_statistics", u64)]


class ManaQueryStatisticsResponse(WireStruct):
    """§11.9: counter i + 1 (after `reported_statistics`) is selected by mask bit i."""

    _fields_ = [
        ("reported_statistics", u64),
        ("in_discards_no_wqe", u64),
        ("in_errors_rx_vport_disabled", u64),
        ("hc_in_octets", u64),
        ("hc_in_ucast_pkts", u64),
        ("hc_in_ucast_octets", u64),
        ("hc_in_multicast_pkts", u64),
        ("hc_in_multicast_octets", u64),
        ("hc_in_broadcast_pkts", u64),
        ("hc_in_broadcast_octets", u64),
        ("out_errors_gf_disabled", u64),
        ("out_errors_vport_disabled", u64),
        ("out_errors_invalid_vport_offset_packets", u64),
        ("out_errors_vlan_enforcement", u64),
        ("out_errors_eth_type_enforcement", u64),
        ("out_errors_sa_enforcement", u64),
        ("out_errors_sqpdid_enforcement", u64),
        ("out_errors_cqpdid_enforcement", u64),
        ("out_errors_mtu_violation", u64),
        ("out_errors_invalid_oob", u64),
        ("hc_out_octets", u64),
        ("hc_out_ucast_pkts", u64),
        ("hc_out_ucast_octets", u64),
        ("hc_out_multicast_pkts", u64),
        ("hc_out_multicast_octets", u64),
        ("hc_out_broadcast_pkts", u64),
        ("hc_out_broadcast_octets", u64),
    ]


class ManaQueryFilterStateReq(WireStruct):
    _fields_ = [("vport", u64)]


class ManaQueryFilterStateResponse(WireStruct):
    """§11.10: `direction_to_vtl0` 1 = traffic steered to the VTL0 VF."""

    _fields_ = [("direction_to_vtl0", u8), ("reserved", u8 * 7)]


class ManaMoveFilterVTL2PrivilegedReq(WireStruct):
    """§11.10 (request version 2, response version 1)."""

    _fields_ = [("vport", u64), ("direction_to_vtl0", u8), ("reserved", u8 * 3), ("reserved2", u32)]


class ManaSetVportSerialNo(WireStruct):
    _fields_ = [("vport", u64), ("serial_no", u32), ("reserved", u32)]


__all__ = [
    "ManaQueryDeviceCfgReq", "BasicNicDriverFlags", "ManaQueryDeviceCfgResp", "ManaQueryVportCfgReq",
    "ManaQueryVportCfgResp", "ManaConfigVportReq", "ManaConfigVportResp", "ManaCreateWqobjReq",
    "ManaCreateWqobjResp", "ManaDestroyWqobjReq", "ManaFenceRqReq", "ManaCfgRxSteerReq",
    "ManaCfgRxSteerReqDriver", "ManaCfgRxSteerReqV2", "ManaQueryStatisticsRequest", "ManaQueryStatisticsResponse",
    "ManaQueryFilterStateReq", "ManaQueryFilterStateResponse", "ManaMoveFilterVTL2PrivilegedReq",
    "ManaSetVportSerialNo",
]
