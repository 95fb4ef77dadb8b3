"""Every wire layout pinned against spec gdma.md.

The tables below are transcribed by hand from the spec (never derived from
vfkeep.gdma): STRUCTS name -> (size, {field: (offset, size)}); BITFIELDS
name -> (bytes, {field: (lsb, width)}); APPENDIX_B and BODY_CONSTANTS name -> value.
test_gdma_cli.py checks `vfkeep layout --json` against the same tables.
"""
import ctypes

import pytest

import vfkeep.gdma as gdma

STRUCTS: dict[str, tuple[int, dict[str, tuple[int, int]]]] = {
    # §3.1
    "RegMap": (40, {
        "micro_version_number": (0, 2), "minor_version_number": (2, 1), "major_version_number": (3, 1),
        "reserved": (4, 4), "vf_db_pages_zone_offset": (8, 8), "vf_db_page_sz": (16, 2), "reserved2": (18, 2),
        "reserved3": (20, 4), "vf_gdma_sriov_shared_reg_start": (24, 8), "vf_gdma_sriov_shared_sz": (32, 2),
        "reserved4": (34, 2), "reserved5": (36, 4),
    }),
    # §5.3
    "EstablishHwc": (32, {
        "eq": (0, 6), "cq": (6, 6), "rq": (12, 6), "sq": (18, 6), "high": (24, 2), "msix": (26, 2), "hdr": (28, 4),
    }),
    # §5.6 / Appendix A
    "SmcReportHwcTimeout": (32, {
        "rq_tail": (0, 4), "sq_tail": (4, 4), "cq_next": (8, 4), "eq_next": (12, 4), "reserved0": (16, 4),
        "reserved1": (20, 4), "flags_wait": (24, 4), "hdr": (28, 4),
    }),
    # §6.2
    "WqeHeader": (8, {"reserved": (0, 3), "last_vbytes": (3, 1), "params": (4, 4)}),
    "Wqe": (512, {"header": (0, 8), "data": (8, 504)}),
    "Sge": (16, {"address": (0, 8), "mem_key": (8, 4), "size": (12, 4)}),
    # §6.3, §6.4
    "Cqe": (64, {"data": (0, 60), "params": (60, 4)}),
    "Eqe": (16, {"data": (0, 12), "params": (12, 4)}),
    "EqeDataReconfig": (12, {"data": (0, 3), "data_type": (3, 1), "reserved1": (4, 8)}),
    # §7.4
    "HwcTxOob": (24, {"reserved": (0, 8), "flags1": (8, 4), "flags2": (12, 4), "flags3": (16, 4), "flags4": (20, 4)}),
    "HwcRxOob": (32, {
        "flags": (0, 8), "reserved2": (8, 4), "wqe_addr_low_or_offset": (12, 4), "wqe_addr_high": (16, 4),
        "client_data_unit": (20, 4), "tx_oob_data_size": (24, 4), "chunk_offset": (28, 4),
    }),
    # §8.1
    "GdmaMsgHdr": (16, {"hdr_type": (0, 4), "msg_type": (4, 4), "msg_version": (8, 2), "hwc_msg_id": (10, 2),
                        "msg_size": (12, 4)}),
    "GdmaDevId": (4, {"ty": (0, 2), "instance": (2, 2)}),
    "GdmaReqHdr": (40, {"req": (0, 16), "resp": (16, 16), "dev_id": (32, 4), "activity_id": (36, 4)}),
    "GdmaRespHdr": (32, {"response": (0, 16), "dev_id": (16, 4), "activity_id": (20, 4), "status": (24, 4),
                         "reserved": (28, 4)}),
    # §9.3
    "GdmaVerifyVerReq": (600, {
        "protocol_ver_min": (0, 8), "protocol_ver_max": (8, 8), "gd_drv_cap_flags1": (16, 8),
        "gd_drv_cap_flags2": (24, 8), "gd_drv_cap_flags3": (32, 8), "gd_drv_cap_flags4": (40, 8),
        "drv_ver": (48, 8), "os_type": (56, 4), "reserved": (60, 4), "os_ver_major": (64, 4),
        "os_ver_minor": (68, 4), "os_ver_build": (72, 4), "os_ver_platform": (76, 4), "reserved_2": (80, 8),
        "os_ver_str1": (88, 128), "os_ver_str2": (216, 128), "os_ver_str3": (344, 128), "os_ver_str4": (472, 128),
    }),
    "GdmaVerifyVerResp": (40, {"gdma_protocol_ver": (0, 8), "pf_cap_flags1": (8, 8), "pf_cap_flags2": (16, 8),
                               "pf_cap_flags3": (24, 8), "pf_cap_flags4": (32, 8)}),
    # §9.4
    "GdmaQueryMaxResourcesResp": (40, {
        "status": (0, 4), "max_sq": (4, 4), "max_rq": (8, 4), "max_cq": (12, 4), "max_eq": (16, 4),
        "max_db": (20, 4), "max_mst": (24, 4), "max_cq_mod_ctx": (28, 4), "max_mod_cq": (32, 4),
        "max_msix": (36, 4),
    }),
    # §9.5 - 9.8
    "GdmaListDevicesResp": (264, {"num_of_devs": (0, 4), "reserved": (4, 4), "devs": (8, 256)}),
    "GdmaRegisterDeviceResp": (12, {"pdid": (0, 4), "gpa_mkey": (4, 4), "db_id": (8, 4)}),
    "GdmaGenerateTestEventReq": (4, {"queue_index": (0, 4)}),
    "GdmaGenerateResetEventReq": (8, {"queue_index": (0, 4), "data": (4, 4)}),
    # §9.9
    "GdmaCreateQueueReq": (56, {
        "queue_type": (0, 4), "reserved1": (4, 4), "pdid": (8, 4), "doorbell_id": (12, 4), "gdma_region": (16, 8),
        "reserved2": (24, 4), "queue_size": (28, 4), "log2_throttle_limit": (32, 4), "eq_pci_msix_index": (36, 4),
        "cq_mod_ctx_id": (40, 4), "cq_parent_eq_id": (44, 4), "rq_drop_on_overrun": (48, 1),
        "rq_err_on_wqe_overflow": (49, 1), "rq_chain_rec_wqes": (50, 1), "sq_hw_db": (51, 1), "reserved3": (52, 4),
    }),
    "GdmaCreateQueueResp": (4, {"queue_index": (0, 4)}),
    # §9.10 - 9.13
    "GdmaDisableQueueReq": (12, {"queue_type": (0, 4), "queue_index": (4, 4), "alloc_res_id_on_creation": (8, 4)}),
    "GdmaCreateDmaRegionReq": (24, {"length": (0, 8), "offset_in_page": (8, 4), "gdma_page_type": (12, 4),
                                    "page_count": (16, 4), "page_addr_list_len": (20, 4)}),
    "GdmaCreateDmaRegionResp": (8, {"gdma_region": (0, 8)}),
    "GdmaDestroyDmaRegionReq": (8, {"gdma_region": (0, 8)}),
    "GdmaChangeMsixVectorIndexForEq": (16, {"queue_index": (0, 4), "msix": (4, 4), "reserved1": (8, 4),
                                            "reserved2": (12, 4)}),
    # §11.2
    "ManaQueryDeviceCfgReq": (48, {
        "mn_drv_cap_flags1": (0, 8), "mn_drv_cap_flags2": (8, 8), "mn_drv_cap_flags3": (16, 8),
        "mn_drv_cap_flags4": (24, 8), "proto_major_ver": (32, 4), "proto_minor_ver": (36, 4),
        "proto_micro_ver": (40, 4), "reserved": (44, 4),
    }),
    "ManaQueryDeviceCfgResp": (48, {
        "pf_cap_flags1": (0, 8), "pf_cap_flags2": (8, 8), "pf_cap_flags3": (16, 8), "pf_cap_flags4": (24, 8),
        "max_num_vports": (32, 2), "reserved": (34, 2), "max_num_eqs": (36, 4), "adapter_mtu": (40, 2),
        "reserved2": (42, 2), "adapter_link_speed_mbps": (44, 4),
    }),
    # §11.3
    "ManaQueryVportCfgReq": (4, {"vport_index": (0, 4)}),
    "ManaQueryVportCfgResp": (32, {
        "max_num_sq": (0, 4), "max_num_rq": (4, 4), "num_indirection_ent": (8, 4), "reserved1": (12, 4),
        "mac_addr": (16, 6), "reserved2": (22, 2), "vport": (24, 8),
    }),
    # §11.4
    "ManaConfigVportReq": (16, {"vport": (0, 8), "pdid": (8, 4), "doorbell_pageid": (12, 4)}),
    "ManaConfigVportResp": (4, {"tx_vport_offset": (0, 2), "short_form_allowed": (2, 1), "reserved": (3, 1)}),
    # §11.5 - 11.7
    "ManaCreateWqobjReq": (48, {
        "vport": (0, 8), "wq_type": (8, 4), "reserved": (12, 4), "wq_gdma_region": (16, 8),
        "cq_gdma_region": (24, 8), "wq_size": (32, 4), "cq_size": (36, 4), "cq_moderation_ctx_id": (40, 4),
        "cq_parent_qid": (44, 4),
    }),
    "ManaCreateWqobjResp": (16, {"wq_id": (0, 4), "cq_id": (4, 4), "wq_obj": (8, 8)}),
    "ManaDestroyWqobjReq": (16, {"wq_type": (0, 4), "reserved": (4, 4), "wq_obj_handle": (8, 8)}),
    "ManaFenceRqReq": (8, {"wq_obj_handle": (0, 8)}),
    # §11.8
    "ManaCfgRxSteerReq": (72, {
        "vport": (0, 8), "num_indir_entries": (8, 2), "indir_tab_offset": (10, 2), "rx_enable": (12, 4),
        "rss_enable": (16, 4), "update_default_rxobj": (20, 1), "update_hashkey": (21, 1),
        "update_indir_tab": (22, 1), "reserved": (23, 1), "default_rxobj": (24, 8), "hashkey": (32, 40),
    }),
    # §11.9
    "ManaQueryStatisticsRequest": (8, {"requested_statistics": (0, 8)}),
    "ManaQueryStatisticsResponse": (216, {
        "reported_statistics": (0, 8), "in_discards_no_wqe": (8, 8), "in_errors_rx_vport_disabled": (16, 8),
        "hc_in_octets": (24, 8), "hc_in_ucast_pkts": (32, 8), "hc_in_ucast_octets": (40, 8),
        "hc_in_multicast_pkts": (48, 8), "hc_in_multicast_octets": (56, 8), "hc_in_broadcast_pkts": (64, 8),
        "hc_in_broadcast_octets": (72, 8), "out_errors_gf_disabled": (80, 8), "out_errors_vport_disabled": (88, 8),
        "out_errors_invalid_vport_offset_packets": (96, 8), "out_errors_vlan_enforcement": (104, 8),
        "out_errors_eth_type_enforcement": (112, 8), "out_errors_sa_enforcement": (120, 8),
        "out_errors_sqpdid_enforcement": (128, 8), "out_errors_cqpdid_enforcement": (136, 8),
        "out_errors_mtu_violation": (144, 8), "out_errors_invalid_oob": (152, 8), "hc_out_octets": (160, 8),
        "hc_out_ucast_pkts": (168, 8), "hc_out_ucast_octets": (176, 8), "hc_out_multicast_pkts": (184, 8),
        "hc_out_multicast_octets": (192, 8), "hc_out_broadcast_pkts": (200, 8), "hc_out_broadcast_octets": (208, 8),
    }),
    # §11.10
    "ManaQueryFilterStateReq": (8, {"vport": (0, 8)}),
    "ManaQueryFilterStateResponse": (8, {"direction_to_vtl0": (0, 1), "reserved": (1, 7)}),
    "ManaMoveFilterVTL2PrivilegedReq": (16, {"vport": (0, 8), "direction_to_vtl0": (8, 1), "reserved": (9, 3),
                                             "reserved2": (12, 4)}),
    "ManaSetVportSerialNo": (16, {"vport": (0, 8), "serial_no": (8, 4), "reserved": (12, 4)}),
    # §12.1 - 12.4
    "ManaTxOob": (24, {"s_oob": (0, 8), "l_oob": (8, 8), "reserved3": (16, 4), "reserved4": (20, 4)}),
    "ManaTxCompOob": (60, {"cqe_hdr": (0, 4), "tx_data_offset": (4, 4), "offsets": (8, 4), "reserved": (12, 48)}),
    "ManaRxcompPerpktInfo": (12, {"pkt_len": (0, 2), "reserved1": (2, 2), "reserved2": (4, 4), "pkt_hash": (8, 4)}),
    "ManaRxcompOob": (60, {"cqe_hdr": (0, 4), "flags": (4, 4), "ppi": (8, 48), "rx_wqe_offset": (56, 4)}),
    # Appendix A composites; `padding` is ours: the spec lists fields up to the SGE but gives size 64
    "GdmaCreateDmaRegionReqDriver": (152, {"req": (0, 24), "page_addr_list": (24, 128)}),
    "ManaCfgRxSteerReqDriver": (1096, {"req": (0, 72), "indir_table": (72, 1024)}),
    # Appendix L.3: CONFIG_VPORT_RX v2 (Linux), table at body offset 80
    "ManaCfgRxSteerReqV2": (80, {"req": (0, 72), "cqe_coalescing_enable": (72, 1), "reserved2": (73, 7)}),
    "HwcSendWqe": (64, {"header": (0, 8), "oob": (8, 24), "sge": (32, 16), "padding": (48, 16)}),
    "HwcRecvWqe": (32, {"header": (0, 8), "oob_unused": (8, 8), "sge": (16, 16)}),
    "ManaTxWqeShortOneSge": (32, {"header": (0, 8), "oob": (8, 8), "sge": (16, 16)}),
    "ManaTxWqeLongOneSge": (64, {"header": (0, 8), "oob": (8, 24), "sge": (32, 16), "padding": (48, 16)}),
    "ManaRxWqeOneSge": (32, {"header": (0, 8), "oob_unused": (8, 8), "sge": (16, 16)}),
}

BITFIELDS: dict[str, tuple[int, dict[str, tuple[int, int]]]] = {
    # §4.2, §4.3
    "CqEqDoorbellValue": (8, {"id": (0, 24), "reserved": (24, 8), "tail": (32, 31), "arm": (63, 1)}),
    "WqDoorbellValue": (8, {"id": (0, 24), "num_rwqe": (24, 8), "tail": (32, 32)}),
    # §5.1, §5.3, §5.6
    "SmcProtoHdr": (4, {
        "msg_type": (0, 3), "msg_version": (3, 3), "reserved_1": (6, 1), "is_response": (7, 1), "status": (8, 8),
        "reserved_2": (16, 8), "reset_vf": (24, 1), "reserved_3": (25, 6), "owner_is_pf": (31, 1),
    }),
    "EstablishHwcHigh": (2, {"eq_pfn_hi": (0, 4), "cq_pfn_hi": (4, 4), "rq_pfn_hi": (8, 4), "sq_pfn_hi": (12, 4)}),
    "SmcReportHwcTimeoutFlags": (4, {"wait_ms": (0, 24), "last_cmd_failed": (24, 1), "interrupt_loss": (25, 1),
                                     "reserved": (26, 6)}),
    # §6.2 - 6.4
    "WqeParams": (4, {
        "num_sgl_entries": (0, 8), "inline_client_oob_size": (8, 3), "client_oob_in_sgl": (11, 1),
        "reserved": (12, 4), "gd_client_unit_data": (16, 14), "reserved2": (30, 1), "sgl_direct": (31, 1),
    }),
    "CqeParams": (4, {"wq_number": (0, 24), "is_send_wq": (24, 1), "cmpln": (25, 1), "reserved": (26, 3),
                      "owner_count": (29, 3)}),
    "EqeParams": (4, {"event_type": (0, 8), "reserved": (8, 8), "reserved2": (16, 13), "owner_count": (29, 3)}),
    "EqeCompletionData": (4, {"cq_id": (0, 24), "reserved": (24, 8)}),
    "HwcInitEqIdDb": (4, {"eq_id": (0, 16), "doorbell": (16, 16)}),
    "HwcInitTypeData": (4, {"value": (0, 24), "ty": (24, 8)}),
    "EqeVfReset": (4, {"revoke_vtl0_vf": (0, 1), "reserved1": (1, 7), "reserved2": (8, 24)}),
    # §7.4
    "HwcTxOobFlags1": (4, {"vrq_id": (0, 24), "dest_vfid": (24, 8)}),
    "HwcTxOobFlags2": (4, {"vrcq_id": (0, 24), "reserved": (24, 8)}),
    "HwcTxOobFlags3": (4, {"vscq_id": (0, 24), "loopback": (24, 1), "lso_override": (25, 1), "dest_pf": (26, 1),
                           "reserved": (27, 5)}),
    "HwcTxOobFlags4": (4, {"vsq_id": (0, 24), "reserved": (24, 8)}),
    "HwcRxOobFlags": (8, {"ty": (0, 6), "eom": (6, 1), "som": (7, 1), "vendor_err": (8, 8), "reserved1": (16, 16),
                          "src_virt_wq": (32, 24), "src_vfid": (56, 8)}),
    # §11.2
    "BasicNicDriverFlags": (8, {"query_link_status": (0, 1), "ethertype_enforcement": (1, 1),
                                "query_filter_state": (2, 1), "reserved": (3, 61)}),
    # §12.1 - 12.4
    "ManaTxShortOob": (8, {
        "pkt_fmt": (0, 2), "is_outer_ipv4": (2, 1), "is_outer_ipv6": (3, 1), "comp_iphdr_csum": (4, 1),
        "comp_tcp_csum": (5, 1), "comp_udp_csum": (6, 1), "suppress_txcqe_gen": (7, 1), "vcq_num": (8, 24),
        "trans_off": (32, 10), "vsq_frame": (42, 14), "short_vp_offset": (56, 8),
    }),
    "ManaTxLongOob": (8, {
        "is_encap": (0, 1), "inner_is_ipv6": (1, 1), "inner_tcp_opt": (2, 1), "inject_vlan_pri_tag": (3, 1),
        "reserved1": (4, 12), "pcp": (16, 3), "dei": (19, 1), "vlan_id": (20, 12), "inner_frame_offset": (32, 10),
        "inner_ip_rel_offset": (42, 6), "long_vp_offset": (48, 12), "reserved2": (60, 4),
    }),
    "ManaCqeHeader": (4, {"cqe_type": (0, 6), "client_type": (6, 2), "vendor_err": (8, 24)}),
    "ManaTxCompOobOffsets": (4, {"tx_sgl_offset": (0, 5), "tx_wqe_offset": (5, 27)}),
    "ManaRxcompOobFlags": (4, {
        "rx_vlan_id": (0, 12), "rx_vlantag_present": (12, 1), "rx_outer_iphdr_csum_succeed": (13, 1),
        "rx_outer_iphdr_csum_fail": (14, 1), "reserved1": (15, 1), "rx_hashtype": (16, 9),
        "rx_iphdr_csum_succeed": (25, 1), "rx_iphdr_csum_fail": (26, 1), "rx_tcp_csum_succeed": (27, 1),
        "rx_tcp_csum_fail": (28, 1), "rx_udp_csum_succeed": (29, 1), "rx_udp_csum_fail": (30, 1),
        "reserved2": (31, 1),
    }),
}

# Appendix B, every name with its value.
APPENDIX_B: dict[str, int] = {
    "TRISTATE_FALSE": 0, "TRISTATE_TRUE": 1, "TRISTATE_UNKNOWN": 0xFFFFFFFF, "HWC_DEV_ID_TY": 1,
    "HWC_DEV_ID_INSTANCE": 0, "SMC_HDR_OFFSET": 28, "GDMA_DEVICE_SPECIFIC_MSG_SHIFT": 16, "WQE_MAX_SIZE": 512,
    "WQE_SGL_OFFSET_OOB8": 16, "WQE_SGL_OFFSET_OOB24": 32, "WQE_SGL_OFFSET_OOB32": 48,
    "OWNER_COUNT_SHIFT_IN_LAST_BYTE": 5, "CFG_RX_INDIR_TAB_OFFSET": 112,
    "PCI_VENDOR_ID": 0x1414, "PCI_DEVICE_ID": 0x00BA, "PCI_REVISION_ID": 1, "PCI_CLASS_CODE": 0x02,
    "PCI_SUBCLASS": 0x00, "PCI_PROG_IF": 0x00, "PCI_MSIX_BAR": 4, "PCI_MSIX_VECTORS": 64,
    "PCI_MSIX_PBA_OFFSET": 1024,
    "EMU_BAR0_SIZE": 8192, "EMU_REGMAP_OFFSET": 0, "EMU_REGMAP_SIZE": 40, "EMU_SHMEM_OFFSET": 40,
    "EMU_SHMEM_SIZE": 32, "EMU_DB_ZONE_OFFSET": 4096, "EMU_DB_PAGE_SIZE": 4096, "EMU_DB_PAGE_COUNT": 1,
    "EMU_MAJOR_VERSION": 1, "EMU_MINOR_VERSION": 0, "EMU_MICRO_VERSION": 1, "EMU_QUEUE_ID_OFFSET": 24,
    "EMU_NUM_SQ": 64, "EMU_NUM_RQ": 64, "EMU_NUM_CQ": 128, "EMU_NUM_EQ": 64, "EMU_MAX_DB": 1, "EMU_MAX_MST": 1,
    "EMU_MAX_CQ_MOD_CTX": 0, "EMU_MAX_MOD_CQ": 0, "EMU_MAX_MSIX": 64, "EMU_HWC_DOORBELL": 0,
    "EMU_HWC_QUEUE_DEPTH": 1, "EMU_HWC_MAX_REQUEST": 4096, "EMU_HWC_MAX_RESPONSE": 4096,
    "EMU_HWC_MAX_NUM_CQS": 128, "EMU_HWC_PDID": 0, "EMU_HWC_GPA_MKEY": 0, "EMU_HWC_INIT_EQE_COUNT": 11,
    "EMU_HWC_MAX_MSG_SIZE": 4096, "EMU_MANA_DEV_INSTANCE": 1, "EMU_LIST_DEVICES_COUNT": 2,
    "EMU_REGISTER_PDID": 0, "EMU_REGISTER_GPA_MKEY": 0, "EMU_REGISTER_DB_ID": 0, "EMU_MAX_NUM_EQS": 64,
    "EMU_VPORT_MAX_NUM_SQ": 1, "EMU_VPORT_MAX_NUM_RQ": 1, "EMU_NUM_INDIRECTION_ENT": 128,
    "EMU_TX_VPORT_OFFSET": 0, "EMU_SHORT_FORM_ALLOWED": 1, "EMU_MAX_RX_OUTSTANDING": 256,
    "EMU_LSO_MAX_HEADER_SGE": 256, "EMU_FAILURE_STATUS": 1, "EMU_DMA_REGION_FIRST_HANDLE": 1,
    "DRV_HWC_EQ_PAGE": 0, "DRV_HWC_CQ_PAGE": 1, "DRV_HWC_RQ_PAGE": 2, "DRV_HWC_SQ_PAGE": 3,
    "DRV_HWC_REQUEST_PAGE": 4, "DRV_HWC_RESPONSE_PAGE": 5, "DRV_HWC_NUM_PAGES": 6, "RWQE_SIZE": 32,
    "DRV_HWC_SWQE_SIZE": 64, "DRV_HWC_RWQE_PARAMS": 0x00000201, "DRV_HWC_SWQE_PARAMS": 0x00000601,
    "DRV_HWC_MSIX": 0, "HWC_WARNING_TIME_IN_MS": 3000, "HWC_WARNING_INCREASE_IN_MS": 1000,
    "HWC_TIMEOUT_DEFAULT_IN_MS": 10000, "HWC_TIMEOUT_FOR_SHUTDOWN_IN_MS": 100, "HWC_POLL_TIMEOUT_IN_MS": 10000,
    "HWC_INTERRUPT_POLL_WAIT_MIN_MS": 20, "HWC_INTERRUPT_POLL_WAIT_MAX_MS": 500, "MAX_RWQE_SIZE": 256,
    "MAX_SWQE_SIZE": 512, "DRV_TX_MAX_SGE_SHORT_OOB": 31, "DRV_TX_MAX_SGE_LONG_OOB": 30,
    "DRV_DMA_REGION_MAX_PAGES": 16, "DRV_INDIR_TABLE_ENTRIES": 128, "DRV_GDMA_PROTOCOL_VER": 1,
    "DRV_GD_DRV_CAP_FLAGS1": 0x08014068, "DRV_MANA_PROTO_MAJOR": 1, "DRV_MANA_PROTO_MINOR": 0,
    "DRV_MANA_PROTO_MICRO": 0, "DRV_DISABLE_QUEUE_ALLOC_RES_ID": 1, "DRV_DATA_EQ_SIZE": 4096,
    "DRV_DATA_TX_WQ_SIZE": 16384, "DRV_DATA_TX_CQ_SIZE": 16384, "DRV_DATA_RX_WQ_SIZE": 32768,
    "DRV_DATA_RX_CQ_SIZE": 16384, "DRV_RX_MAX_POSTED": 512, "DRV_DEFAULT_LINK_SPEED_BPS": 200000000000,
}

# Appendix L (Linux's mana driver): CONFIG_VPORT_RX v2 and the adapter MTU it needs.
APPENDIX_L: dict[str, int] = {
    "MANA_CONFIG_VPORT_RX_REQUEST_V2": 2, "CFG_RX_INDIR_TAB_OFFSET_V2": 120, "ADAPTER_MTU": 1514,
}

# Named values from the body sections (§1 - §12).
BODY_CONSTANTS: dict[str, int] = {
    "PAGE_SIZE": 4096, "PAGE_SIZE32": 4096, "PAGE_SIZE64": 4096,
    "DB_SQ": 0x000, "DB_RQ": 0x400, "DB_RQ_CLIENT_DATA": 0x408, "DB_CQ": 0x800, "DB_EQ": 0xFF8,
    "SMC_MSG_TYPE_ESTABLISH_HWC": 1, "SMC_MSG_TYPE_ESTABLISH_HWC_VERSION": 0, "SMC_MSG_TYPE_DESTROY_HWC": 2,
    "SMC_MSG_TYPE_DESTROY_HWC_VERSION": 0, "SMC_MSG_TYPE_REPORT_HWC_TIMEOUT": 4,
    "SMC_MSG_TYPE_REPORT_HWC_TIMEOUT_VERSION": 1,
    "GDMA_SQ": 1, "GDMA_RQ": 2, "GDMA_CQ": 3, "GDMA_EQ": 4, "ID_OFFSET": 24,
    "WQE_ALIGNMENT": 32, "CLIENT_OOB_8": 2, "CLIENT_OOB_24": 6, "CLIENT_OOB_32": 7,
    "GDMA_EQE_COMPLETION": 3, "GDMA_EQE_TEST_EVENT": 64, "GDMA_EQE_HWC_INIT_EQ_ID_DB": 129,
    "GDMA_EQE_HWC_INIT_DATA": 130, "GDMA_EQE_HWC_INIT_DONE": 131, "GDMA_EQE_HWC_RECONFIG_DATA": 133,
    "GDMA_EQE_HWC_RESET_REQUEST": 135,
    "HWC_DATA_CONFIG_HWC_TIMEOUT": 1, "HWC_DATA_TYPE_HW_VPORT_LINK_CONNECT": 2,
    "HWC_DATA_TYPE_HW_VPORT_LINK_DISCONNECT": 3,
    "OWNER_BITS": 3, "OWNER_MASK": 7,
    "HWC_INIT_DATA_CQID": 1, "HWC_INIT_DATA_RQID": 2, "HWC_INIT_DATA_SQID": 3, "HWC_INIT_DATA_QUEUE_DEPTH": 4,
    "HWC_INIT_DATA_MAX_REQUEST": 5, "HWC_INIT_DATA_MAX_RESPONSE": 6, "HWC_INIT_DATA_MAX_NUM_CQS": 7,
    "HWC_INIT_DATA_PDID": 8, "HWC_INIT_DATA_GPA_MKEY": 9,
    "GDMA_STANDARD_HEADER_TYPE": 0, "GDMA_MESSAGE_V1": 1,
    "GDMA_VERIFY_VF_DRIVER_VERSION": 1, "GDMA_QUERY_MAX_RESOURCES": 2, "GDMA_LIST_DEVICES": 3,
    "GDMA_REGISTER_DEVICE": 4, "GDMA_DEREGISTER_DEVICE": 5, "GDMA_GENERATE_TEST_EQE": 10,
    "GDMA_GENERATE_RESET_REQUEST_EQE": 11, "GDMA_CREATE_QUEUE": 12, "GDMA_DISABLE_QUEUE": 13,
    "GDMA_CREATE_DMA_REGION": 25, "GDMA_DMA_REGION_ADD_PAGES": 26, "GDMA_DESTROY_DMA_REGION": 27,
    "GDMA_CHANGE_MSIX_FOR_EQ": 81,
    "GDMA_DEVICE_NONE": 0, "GDMA_DEVICE_HWC": 1, "GDMA_DEVICE_MANA": 2, "HWC_DEV_ID": 0x00000001,
    "DRIVER_CAP_FLAG_1_HWC_TIMEOUT_RECONFIG": 0x08, "DRIVER_CAP_FLAG_1_VARIABLE_INDIRECTION_TABLE_SUPPORT": 0x20,
    "DRIVER_CAP_FLAG_1_HW_VPORT_LINK_AWARE": 0x40, "DRIVER_CAP_FLAG_1_SELF_RESET_ON_EQE_NOTIFICATION": 0x4000,
    "DRIVER_CAP_FLAG_1_VTL2_REVOKE_SUB_ON_RESET_EQE": 0x10000,
    "DRIVER_CAP_FLAG_1_VTL2_SELECTIVE_REVOKE_SUB_ON_RESET_EQE": 0x8000000,
    "GDMA_PF_CAP_FLAG_1_QUERY_HWC_TIMEOUT": 0x08, "GDMA_PF_CAP_FLAG_1_EQE_REQUEST_VF_SELF_RESET": 0x80,
    "OS_TYPE_OHCL": 0x60, "GDMA_PAGE_TYPE_4K": 0,
    "MANA_QUERY_DEV_CONFIG": 0x20001, "MANA_QUERY_STATS": 0x20002, "MANA_CONFIG_VPORT_TX": 0x20003,
    "MANA_CREATE_WQ_OBJ": 0x20004, "MANA_DESTROY_WQ_OBJ": 0x20005, "MANA_FENCE_RQ": 0x20006,
    "MANA_CONFIG_VPORT_RX": 0x20007, "MANA_QUERY_VPORT_CONFIG": 0x20008,
    "MANA_VTL2_ASSIGN_SERIAL_NUMBER": 0x27801, "MANA_VTL2_MOVE_FILTER": 0x27802,
    "MANA_VTL2_QUERY_FILTER_STATE": 0x27803,
    "MANA_QUERY_DEV_CONFIG_REQUEST_V1": 1, "MANA_QUERY_DEV_CONFIG_RESPONSE_V4": 4,
    "MANA_VTL2_MOVE_FILTER_REQUEST_V2": 2, "MANA_VTL2_MOVE_FILTER_RESPONSE_V1": 1,
    "MANA_VTL2_ASSIGN_SERIAL_NUMBER_REQUEST_V1": 1, "MANA_VTL2_ASSIGN_SERIAL_NUMBER_RESPONSE_V1": 1,
    "MANA_VTL2_QUERY_FILTER_STATE_REQUEST_V1": 1, "MANA_VTL2_QUERY_FILTER_STATE_RESPONSE_V1": 1,
    "STATISTICS_FLAGS_IN_DISCARDS_NO_WQE": 0x1, "STATISTICS_FLAGS_IN_ERRORS_RX_VPORT_DISABLED": 0x2,
    "STATISTICS_FLAGS_HC_IN_OCTETS": 0x4, "STATISTICS_FLAGS_HC_IN_UCAST_PACKETS": 0x8,
    "STATISTICS_FLAGS_HC_IN_UCAST_OCTETS": 0x10, "STATISTICS_FLAGS_HC_IN_MCAST_PACKETS": 0x20,
    "STATISTICS_FLAGS_HC_IN_MCAST_OCTETS": 0x40, "STATISTICS_FLAGS_HC_IN_BCAST_PACKETS": 0x80,
    "STATISTICS_FLAGS_HC_IN_BCAST_OCTETS": 0x100, "STATISTICS_FLAGS_OUT_ERRORS_GF_DISABLED": 0x200,
    "STATISTICS_FLAGS_OUT_ERRORS_VPORT_DISABLED": 0x400,
    "STATISTICS_FLAGS_OUT_ERRORS_INVALID_VPORT_OFFSET_PACKETS": 0x800,
    "STATISTICS_FLAGS_OUT_ERRORS_VLAN_ENFORCEMENT": 0x1000, "STATISTICS_FLAGS_OUT_ERRORS_ETH_TYPE_ENFORCEMENT": 0x2000,
    "STATISTICS_FLAGS_OUT_ERRORS_SA_ENFORCEMENT": 0x4000, "STATISTICS_FLAGS_OUT_ERRORS_SQPDID_ENFORCEMENT": 0x8000,
    "STATISTICS_FLAGS_OUT_ERRORS_CQPDID_ENFORCEMENT": 0x10000, "STATISTICS_FLAGS_OUT_ERRORS_MTU_VIOLATION": 0x20000,
    "STATISTICS_FLAGS_OUT_ERRORS_INVALID_OOB": 0x40000, "STATISTICS_FLAGS_HC_OUT_OCTETS": 0x80000,
    "STATISTICS_FLAGS_HC_OUT_UCAST_PACKETS": 0x100000, "STATISTICS_FLAGS_HC_OUT_UCAST_OCTETS": 0x200000,
    "STATISTICS_FLAGS_HC_OUT_MCAST_PACKETS": 0x400000, "STATISTICS_FLAGS_HC_OUT_MCAST_OCTETS": 0x800000,
    "STATISTICS_FLAGS_HC_OUT_BCAST_PACKETS": 0x1000000, "STATISTICS_FLAGS_HC_OUT_BCAST_OCTETS": 0x2000000,
    "STATISTICS_FLAGS_ALL": 0x3FFFFFF,
    "MANA_SHORT_PKT_FMT": 0, "MANA_LONG_PKT_FMT": 1, "MANA_CQE_COMPLETION": 1,
    "CQE_INVALID": 0, "CQE_RX_OKAY": 1, "CQE_RX_COALESCED_4": 2, "CQE_RX_OBJECT_FENCE": 3, "CQE_RX_TRUNCATED": 4,
    "CQE_TX_OKAY": 32, "CQE_TX_SA_DROP": 33, "CQE_TX_MTU_DROP": 34, "CQE_TX_INVALID_OOB": 35,
    "CQE_TX_INVALID_ETH_TYPE": 36, "CQE_TX_HDR_PROCESSING_ERROR": 37, "CQE_TX_VF_DISABLED": 38,
    "CQE_TX_VPORT_IDX_OUT_OF_RANGE": 39, "CQE_TX_VPORT_DISABLED": 40, "CQE_TX_VLAN_TAGGING_VIOLATION": 41,
    "CQE_TX_GDMA_ERR": 42,
}


@pytest.mark.parametrize("name", sorted(STRUCTS))
def test_struct_size_and_offsets(name):
    size, fields = STRUCTS[name]
    cls = getattr(gdma, name)
    assert ctypes.sizeof(cls) == size
    assert [f[0] for f in cls._fields_] == list(fields), "field names/order differ from the spec"
    for field, (offset, fsize) in fields.items():
        desc = getattr(cls, field)
        assert (desc.offset, desc.size) == (offset, fsize), field


@pytest.mark.parametrize("name", sorted(BITFIELDS))
def test_bitfield_positions(name):
    nbytes, fields = BITFIELDS[name]
    cls = getattr(gdma, name)
    assert issubclass(cls, gdma.BitfieldWord)
    assert ctypes.sizeof(cls) == nbytes
    assert [f[0] for f in cls._fields_] == list(fields)
    assert sum(w for _, w in fields.values()) == 8 * nbytes
    for field, (lsb, width) in fields.items():
        word = cls()
        setattr(word, field, (1 << width) - 1)
        assert word.to_int() == ((1 << width) - 1) << lsb, field
        assert cls.from_int(((1 << width) - 1) << lsb) == word
        assert getattr(cls.from_int(1 << lsb), field) == 1


def test_every_exported_struct_is_pinned():
    assert set(gdma.WIRE_STRUCTS) == set(STRUCTS) | set(BITFIELDS)


@pytest.mark.parametrize("table", [APPENDIX_B, APPENDIX_L, BODY_CONSTANTS], ids=["appendix_b", "appendix_l", "body"])
def test_constants(table):
    wrong = {n: (getattr(gdma, n, None), v) for n, v in table.items() if getattr(gdma, n, None) != v}
    assert not wrong


def test_natural_alignment_without_pack():
    for cls in gdma.WIRE_STRUCTS.values():
        assert not hasattr(cls, "_pack_"), cls.__name__
    # nested struct alignment follows its widest member (spec §1)
    assert ctypes.alignment(gdma.HwcRxOob) == 8 and ctypes.alignment(gdma.GdmaReqHdr) == 4
