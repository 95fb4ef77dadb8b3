"""BNIC (MANA) requests over the HWC (gdma spec 11), addressed to the MANA device id."""
from __future__ import annotations

from typing import Callable

from vfkeep.gdma.bnic import (ManaCfgRxSteerReq, ManaCfgRxSteerReqDriver, ManaConfigVportReq, ManaConfigVportResp,
                              ManaCreateWqobjReq, ManaCreateWqobjResp, ManaDestroyWqobjReq, ManaQueryDeviceCfgReq,
                              ManaQueryDeviceCfgResp, ManaQueryFilterStateReq, ManaQueryStatisticsRequest,
                              ManaQueryStatisticsResponse, ManaQueryVportCfgReq, ManaQueryVportCfgResp,
)
from vfkeep.gdma.constants import (CFG_RX_INDIR_TAB_OFFSET, DRV_MANA_PROTO_MAJOR, DRV_MANA_PROTO_MICRO,
                                   DRV_MANA_PROTO_MINOR, MANA_CONFIG_VPORT_RX, MANA_CONFIG_VPORT_TX,
                                   MANA_CREATE_WQ_OBJ, MANA_DESTROY_WQ_OBJ, MANA_QUERY_DEV_CONFIG, MANA_QUERY_STATS,
                                   MANA_QUERY_VPORT_CONFIG, MANA_VTL2_QUERY_FILTER_STATE, STATISTICS_FLAGS_ALL,
                                   Tristate)
from vfkeep.gdma.hwc import GdmaDevId

from .gdma_driver import GdmaDriver


class BnicDriver:
    """Typed wrappers for the BNIC requests the driver uses."""

    def __init__(self, gdma: GdmaDriver, dev_id: GdmaDevId):
        self.gdma = gdma
        self.dev_id = dev_id

    def query_dev_config(self) -> ManaQueryDeviceCfgResp:
        req = ManaQueryDeviceCfgReq(proto_major_ver=DRV_MANA_PROTO_MAJOR, proto_minor_ver=DRV_MANA_PROTO_MINOR,
                                    proto_micro_ver=DRV_MANA_PROTO_MICRO)
        return self.gdma.request(MANA_QUERY_DEV_CONFIG, self.dev_id, req)

    def query_vport_config(self, vport_index: int,
                           meanwhile: Callable[[], object] | None = None) -> ManaQueryVportCfgResp:
        """`meanwhile`: see `GdmaDriver.request`."""
        return self.gdma.request(MANA_QUERY_VPORT_CONFIG, self.dev_id, ManaQueryVportCfgReq(vport_index=vport_index),
                                 meanwhile=meanwhile)

    def query_filter_state(self, vport: int) -> bool:
        """True if the vport's traffic is steered to the VTL0 VF."""
        resp = self.gdma.request(MANA_VTL2_QUERY_FILTER_STATE, self.dev_id, ManaQueryFilterStateReq(vport=vport))
        return bool(resp.direction_to_vtl0)

    def config_vport_tx(self, vport: int, pdid: int, doorbell_pageid: int) -> ManaConfigVportResp:
        req = ManaConfigVportReq(vport=vport, pdid=pdid, doorbell_pageid=doorbell_pageid)
        return self.gdma.request(MANA_CONFIG_VPORT_TX, self.dev_id, req)

    def create_wq_obj(self, vport: int, wq_type: int, wq_region: int, cq_region: int, wq_size: int, cq_size: int,
                      cq_parent_qid: int) -> ManaCreateWqobjResp:
        req = ManaCreateWqobjReq(vport=vport, wq_type=wq_type, wq_gdma_region=wq_region, cq_gdma_region=cq_region,
                                 wq_size=wq_size, cq_size=cq_size, cq_parent_qid=cq_parent_qid)
        return self.gdma.request(MANA_CREATE_WQ_OBJ, self.dev_id, req)

    def destroy_wq_obj(self, wq_type: int, wq_obj: int) -> None:
        self.gdma.request(MANA_DESTROY_WQ_OBJ, self.dev_id, ManaDestroyWqobjReq(wq_type=wq_type, wq_obj_handle=wq_obj))

    def config_vport_rx(self, vport: int, *, rx_enable: Tristate, rss_enable: Tristate,
                        default_rxobj: int | None = None, meanwhile: Callable[[], object] | None = None) -> None:
        """Start (default RX object, no RSS) or stop a vport's traffic (gdma spec 11.8); `meanwhile`: see
        `GdmaDriver.request`."""
        body = ManaCfgRxSteerReqDriver()
        body.req = ManaCfgRxSteerReq(vport=vport, num_indir_entries=0, indir_tab_offset=CFG_RX_INDIR_TAB_OFFSET,
                                     rx_enable=rx_enable, rss_enable=rss_enable,
                                     update_default_rxobj=int(default_rxobj is not None),
                                     default_rxobj=default_rxobj or 0)
        self.gdma.request(MANA_CONFIG_VPORT_RX, self.dev_id, body, meanwhile=meanwhile)

    def query_stats(self, mask: int = STATISTICS_FLAGS_ALL) -> ManaQueryStatisticsResponse:
        return self.gdma.request(MANA_QUERY_STATS, self.dev_id, ManaQueryStatisticsRequest(requested_statistics=mask))
