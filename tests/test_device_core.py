"""MANA emulator core, in-process (no transport): BAR0, SMC, HWC, GDMA and BNIC requests, queues, data path."""
from __future__ import annotations

import pytest

from device_driver_helper import (MANA_DEV_ID, SHMEM_HDR, ConsumerRing, Pages, TestDriver, VportQueues, cqe_params,
                                  eqe_type, frame, in_process_device)
from driver_helpers import HeldLoop
from vfkeep.device.control import COMMANDS
from vfkeep.device.vport import VENDOR_ERR_DMA_FAULT, VENDOR_ERR_MALFORMED_WQE
from vfkeep.gdma.bnic import (ManaCfgRxSteerReqDriver, ManaCreateWqobjReq, ManaDestroyWqobjReq,
                              ManaMoveFilterVTL2PrivilegedReq, ManaQueryDeviceCfgReq, ManaQueryDeviceCfgResp,
                              ManaQueryFilterStateReq, ManaQueryFilterStateResponse, ManaQueryStatisticsRequest,
                              ManaQueryStatisticsResponse, ManaQueryVportCfgReq, ManaSetVportSerialNo)
from vfkeep.gdma.constants import *  # noqa: F403 - spec names
from vfkeep.gdma.datapath import ManaRxcompOob, ManaTxOob
from vfkeep.gdma.hwc import GdmaReqHdr, HwcRxOob
from vfkeep.gdma.queues import EqeDataReconfig, EqeVfReset, WqeHeader, WqeParams
from vfkeep.gdma.regs import RegMap, SmcProtoHdr
from vfkeep.gdma.requests import (GdmaChangeMsixVectorIndexForEq, GdmaCreateDmaRegionReqDriver, GdmaCreateQueueReq,
                                  GdmaDestroyDmaRegionReq, GdmaGenerateResetEventReq, GdmaGenerateTestEventReq,
                                  GdmaListDevicesResp, GdmaQueryMaxResourcesResp, GdmaRegisterDeviceResp,
                                  GdmaVerifyVerReq, GdmaVerifyVerResp)
from vfkeep.memory import MemoryLayout

LAYOUT = MemoryLayout(guest_pages=64, worker_pages=2048, pool_pages=0)
PEER = bytes.fromhex("020000000001")


@pytest.fixture
def bench(mem):
    """(device, driver) with nothing set up yet."""
    device, port = in_process_device(mem)
    drv = TestDriver(port, mem, Pages(mem, mem.layout.worker), timeout=1.0)
    yield device, drv
    port.irqs.close()


@pytest.fixture
def up(bench):
    """(device, driver) after §13.1 steps 1-11."""
    device, drv = bench
    drv.bring_up()
    return device, drv


def ctl(device, name, **args):
    return COMMANDS[name](device, **args)


def status(drv, code, body=b"", dev_id=MANA_DEV_ID, **kw):
    return drv.send_request(code, body, dev_id, **kw)[0].status


# -- BAR0, config space ---------------------------------------------------------------------------
def test_bar0_regmap_and_unmapped_ranges(bench):
    device, drv = bench
    regmap = RegMap.from_bytes(b"".join(drv.port.read32(o).to_bytes(4, "little") for o in range(0, 40, 4)))
    assert (regmap.micro_version_number, regmap.minor_version_number, regmap.major_version_number) == (1, 0, 1)
    assert regmap.vf_db_pages_zone_offset == 0x1000 and regmap.vf_db_page_sz == 0x1000
    assert regmap.vf_gdma_sriov_shared_reg_start == 40 and regmap.vf_gdma_sriov_shared_sz == 32
    assert device.bar0.read(2, 1) == b"\x00" and device.bar0.read(3, 1) == b"\x01"  # any access size
    assert device.bar0.read(0x48, 4) == b"\xff" * 4  # unused
    assert device.bar0.read(36, 8) == b"\xff" * 8  # straddles RegMap and SMC window
    assert device.bar0.read(0x1000, 8) == b"\xff" * 8  # doorbells read all ones
    device.bar0.write(0x1000, b"\x18\x00\x00\x00")  # 4-byte doorbell: ignored
    assert device.counters["bad_doorbells"] == 1
    assert device.config.read(0, 4) == (0x1414 | 0x00BA << 16).to_bytes(4, "little")
    assert device.config.read(8, 4) == bytes((1, 0, 0, 2))
    device.config.write(0x10, b"\xff\xff\xff\xff")  # BAR sizing
    assert int.from_bytes(device.config.read(0x10, 4), "little") == 0xFFFFE004


# -- SMC and HWC bring-up -------------------------------------------------------------------------
def test_establish_hwc_posts_the_11_bringup_eqes(bench):
    device, drv = bench
    hdr = drv.establish_hwc()
    assert (hdr.msg_type, hdr.is_response, hdr.status, hdr.owner_is_pf) == (1, 1, 0, 0)
    assert drv.hwc_ids() == {"eq": 24, "cq": 24, "rq": 24, "sq": 24}
    payloads = [int.from_bytes(e[:4], "little") for e in drv.bringup_eqes]
    params = [int.from_bytes(e[12:16], "little") for e in drv.bringup_eqes]
    assert payloads == [0x18, 0x01000018, 0x02000018, 0x03000018, 0x04000001, 0x05001000, 0x06001000,
                        0x07000080, 0x08000000, 0x09000000, 0]
    assert params == [0x20000081] + [0x20000082] * 9 + [0x20000083]
    assert device.counters["interrupts"] == 1  # the first EQE, then the EQ is disarmed
    assert device.command_log.since()[-1]["name"] == "SMC_MSG_TYPE_ESTABLISH_HWC"


@pytest.mark.parametrize("header, why", [
    (SmcProtoHdr(msg_type=1, is_response=1), "is_response set"),
    (SmcProtoHdr(msg_type=3), "unknown type"),
    (SmcProtoHdr(msg_type=1, msg_version=1), "wrong version"),
    (SmcProtoHdr(msg_type=4, msg_version=0), "REPORT_HWC_TIMEOUT needs version >= 1"),
])
def test_smc_refusals(bench, header, why):
    device, drv = bench
    reply = drv.smc_write(bytes(28) + header.to_bytes())
    assert (reply.is_response, reply.status, reply.msg_type) == (1, 1, header.msg_type), why
    assert device.hwc is None


def test_establish_twice_and_unreachable_pages(bench, mem):
    device, drv = bench
    assert drv.establish_hwc().status == 0
    eq = drv.hwc_pages[0]
    from vfkeep.gdma.regs import EstablishHwc
    assert drv.smc_write(EstablishHwc.build(eq >> 12, eq >> 12, eq >> 12, eq >> 12).to_bytes()).status == 1
    drv.destroy_hwc()
    far = (mem.size + 4096) >> 12  # beyond every mapped range
    assert drv.smc_write(EstablishHwc.build(far, far, far, far).to_bytes()).status == 1
    assert device.counters["dma_faults"] == 1 and device.hwc is None


def test_destroy_hwc_is_answered_lazily_and_frees_the_ids(up):
    device, drv = up
    before = drv.hwc_ids()
    reply = drv.destroy_hwc()  # the poll read produces the reply
    assert (reply.msg_type, reply.is_response, reply.status) == (2, 1, 0)
    assert device.hwc is None and device.eqs.keys() == set()
    assert drv.establish_hwc().status == 0
    assert drv.hwc_ids() == before  # ids returned to their pools: no leak across re-establishment
    assert device.registered  # DESTROY_HWC does not deregister


def test_report_hwc_timeout_is_logged(up):
    device, drv = up
    from vfkeep.gdma.regs import SmcReportHwcTimeout, SmcReportHwcTimeoutFlags
    msg = SmcReportHwcTimeout(rq_tail=64, sq_tail=128, cq_next=4096 + 128, eq_next=4096 + 176,
                              flags_wait=SmcReportHwcTimeoutFlags(wait_ms=3500, interrupt_loss=1),
                              hdr=SmcProtoHdr(msg_type=4, msg_version=1))
    assert drv.smc_write(msg.to_bytes()).status == 0
    entry = device.command_log.since()[-1]
    assert entry["name"] == "SMC_MSG_TYPE_REPORT_HWC_TIMEOUT" and entry["wait_ms"] == 3500
    assert entry["interrupt_loss"] == 1 and entry["sq_tail"] == 128


# -- HWC exchange and GDMA requests ---------------------------------------------------------------
def test_hwc_exchange_cqes_and_echo(up):
    device, drv = up
    resp, body, cqes = drv.send_request(GDMA_QUERY_MAX_RESOURCES)
    sq_cqe, rq_cqe = (cqe_params(c) for c in cqes)
    assert (sq_cqe.wq_number, sq_cqe.is_send_wq) == (24, 1)  # SQ completion first
    assert (rq_cqe.wq_number, rq_cqe.is_send_wq) == (24, 0)
    rx_oob = HwcRxOob.from_bytes(cqes[1])
    assert rx_oob.tx_oob_data_size == 32 + 40
    assert resp.response.msg_type == GDMA_QUERY_MAX_RESOURCES and resp.response.msg_size == 72
    assert resp.activity_id == drv.activity_id and resp.dev_id.to_int() == HWC_DEV_ID and resp.status == 0
    r = GdmaQueryMaxResourcesResp.from_bytes(body)
    assert (r.max_sq, r.max_rq, r.max_cq, r.max_eq, r.max_db, r.max_mst, r.max_msix) == (64, 64, 128, 64, 1, 1, 64)


def test_gdma_requests(up):
    device, drv = up
    ver = GdmaVerifyVerReq(protocol_ver_min=1, protocol_ver_max=1, gd_drv_cap_flags1=DRV_GD_DRV_CAP_FLAGS1,
                           os_type=OS_TYPE_OHCL)
    resp = drv.request(GDMA_VERIFY_VF_DRIVER_VERSION, ver.to_bytes(), resp_cls=GdmaVerifyVerResp)
    assert resp.gdma_protocol_ver == 1 and resp.pf_cap_flags1 == 0
    assert device.driver_info["gd_drv_cap_flags1"] == DRV_GD_DRV_CAP_FLAGS1
    devs = drv.request(GDMA_LIST_DEVICES, resp_cls=GdmaListDevicesResp)
    assert devs.num_of_devs == 2 and [d.to_int() for d in devs.devs[:2]] == [HWC_DEV_ID, MANA_DEV_ID]
    # test EQE on the HWC EQ
    drv.request(GDMA_GENERATE_TEST_EQE, GdmaGenerateTestEventReq(queue_index=24).to_bytes())
    assert eqe_type(drv.wait_event(GDMA_EQE_TEST_EVENT)) == 64
    assert status(drv, GDMA_GENERATE_TEST_EQE, GdmaGenerateTestEventReq(queue_index=99).to_bytes()) == 1
    # reset-request EQE carries the data dword
    drv.request(GDMA_GENERATE_RESET_REQUEST_EQE, GdmaGenerateResetEventReq(
        queue_index=24, data=EqeVfReset(revoke_vtl0_vf=1)).to_bytes())
    raw = drv.wait_event(GDMA_EQE_HWC_RESET_REQUEST)
    assert EqeVfReset.from_bytes(raw).revoke_vtl0_vf == 1
    # register twice / deregister
    assert status(drv, GDMA_REGISTER_DEVICE) == 1
    assert status(drv, GDMA_REGISTER_DEVICE, dev_id=HWC_DEV_ID) == 1
    assert status(drv, GDMA_DEREGISTER_DEVICE) == 0 and not device.registered
    assert status(drv, GDMA_DEREGISTER_DEVICE) == 1
    assert status(drv, MANA_QUERY_DEV_CONFIG, ManaQueryDeviceCfgReq().to_bytes()) == 1  # BNIC needs registration
    reg = drv.request(GDMA_REGISTER_DEVICE, dev_id=MANA_DEV_ID, resp_cls=GdmaRegisterDeviceResp)
    assert (reg.pdid, reg.gpa_mkey, reg.db_id) == (0, 0, 0)
    assert status(drv, GDMA_DMA_REGION_ADD_PAGES, bytes(16)) == 1
    assert status(drv, 0x77) == 1 and device.counters["bad_requests"] >= 1


def test_dma_regions_and_eq_lifecycle(up):
    device, drv = up
    gpa = drv.pages.alloc(2)
    h1 = drv.create_dma_region(gpa, 8192)
    h2 = drv.create_dma_region(gpa, 4096)
    assert (h1, h2) == (1, 2)
    assert status(drv, GDMA_DESTROY_DMA_REGION, GdmaDestroyDmaRegionReq(gdma_region=h1).to_bytes()) == 0
    assert status(drv, GDMA_DESTROY_DMA_REGION, GdmaDestroyDmaRegionReq(gdma_region=h1).to_bytes()) == 1
    assert drv.create_dma_region(gpa, 4096) == 1  # most recently freed slot reused
    # region validation
    bad = GdmaCreateDmaRegionReqDriver()
    bad.req.length, bad.req.page_count, bad.req.page_addr_list_len = 4096, 1, 2
    assert status(drv, GDMA_CREATE_DMA_REGION, bad.to_bytes()) == 1
    bad.req.page_addr_list_len, bad.page_addr_list[0] = 1, gpa + 8  # unaligned page address
    assert status(drv, GDMA_CREATE_DMA_REGION, bad.to_bytes()) == 1
    # EQ: size must equal the region length; the region is consumed
    eq_req = GdmaCreateQueueReq(queue_type=GDMA_EQ, gdma_region=h2, queue_size=8192, eq_pci_msix_index=1)
    assert status(drv, GDMA_CREATE_QUEUE, eq_req.to_bytes()) == 1
    eq_req.queue_size = 4096
    assert status(drv, GDMA_CREATE_QUEUE, eq_req.to_bytes()) == 0
    assert h2 not in device.regions.regions and 25 in device.eqs
    eq_req.queue_type = GDMA_CQ
    assert status(drv, GDMA_CREATE_QUEUE, eq_req.to_bytes()) == 1  # EQ only
    ring = ConsumerRing(drv.mem, gpa, 4096, 16, 25)
    drv.irq(3)
    drv.request(GDMA_CHANGE_MSIX_FOR_EQ, GdmaChangeMsixVectorIndexForEq(queue_index=25, msix=3).to_bytes(),
                MANA_DEV_ID)
    assert device.eqs[25].msix == 3
    assert status(drv, GDMA_CHANGE_MSIX_FOR_EQ, GdmaChangeMsixVectorIndexForEq(queue_index=25, msix=64).to_bytes()) == 1
    drv.request(GDMA_GENERATE_TEST_EQE, GdmaGenerateTestEventReq(queue_index=25).to_bytes())
    assert eqe_type(ring.poll()) == 64 and device.irq.fds[3]
    drv.disable_eq(ring)
    assert 25 not in device.eqs
    assert drv.create_eq().id == 25  # the id went back to the pool


# -- BNIC ---------------------------------------------------------------------------------------
def test_bnic_requests(up):
    device, drv = up
    cfg = drv.mana(MANA_QUERY_DEV_CONFIG, ManaQueryDeviceCfgReq(proto_major_ver=1).to_bytes(),
                   ManaQueryDeviceCfgResp)
    assert (cfg.max_num_vports, cfg.max_num_eqs, cfg.adapter_link_speed_mbps) == (1, 64, 0)
    # the response fills the whole declared space (zeros after the structure)
    resp, body, _ = drv.send_request(MANA_QUERY_DEV_CONFIG, ManaQueryDeviceCfgReq().to_bytes(), MANA_DEV_ID,
                                     resp_size=100)
    assert resp.status == 0 and resp.response.msg_size == 132 and body[48:] == bytes(52)
    vp = VportQueues(drv)
    assert vp.mac == bytes.fromhex("00155d121212") and vp.handle == 0 and vp.tx_vport_offset == 0
    assert (vp.sq.id, vp.rq.id, vp.tx_cq.id, vp.rx_cq.id, vp.eq.id) == (25, 25, 25, 26, 25)
    assert status(drv, MANA_QUERY_VPORT_CONFIG, ManaQueryVportCfgReq(vport_index=1).to_bytes()) == 1
    # a second SQ on the vport is refused
    gpa = drv.pages.alloc(2)
    r1, r2 = drv.create_dma_region(gpa, 4096), drv.create_dma_region(gpa + 4096, 4096)
    dup = ManaCreateWqobjReq(vport=0, wq_type=GDMA_SQ, wq_gdma_region=r1, cq_gdma_region=r2, wq_size=4096,
                             cq_size=4096, cq_parent_qid=vp.eq.id)
    assert status(drv, MANA_CREATE_WQ_OBJ, dup.to_bytes()) == 1
    assert r1 in device.regions.regions  # not consumed on failure
    # filter state, serial number, move filter
    assert drv.mana(MANA_VTL2_QUERY_FILTER_STATE, ManaQueryFilterStateReq(vport=0).to_bytes(),
                    ManaQueryFilterStateResponse).direction_to_vtl0 == 0
    drv.mana(MANA_VTL2_ASSIGN_SERIAL_NUMBER, ManaSetVportSerialNo(vport=0, serial_no=77).to_bytes())
    drv.mana(MANA_VTL2_MOVE_FILTER, ManaMoveFilterVTL2PrivilegedReq(vport=0, direction_to_vtl0=1).to_bytes())
    assert drv.mana(MANA_VTL2_QUERY_FILTER_STATE, ManaQueryFilterStateReq(vport=0).to_bytes(),
                    ManaQueryFilterStateResponse).direction_to_vtl0 == 1
    assert device.vports[0].serial_no == 77
    assert status(drv, MANA_FENCE_RQ, bytes.fromhex("0100000000000000")) == 1  # no vport 1
    # CONFIG_VPORT_RX with an indirection table
    req = ManaCfgRxSteerReqDriver()
    req.req.vport, req.req.rx_enable, req.req.rss_enable = 0, Tristate.TRUE, Tristate.TRUE
    req.req.update_default_rxobj, req.req.default_rxobj = 1, vp.rx_obj
    req.req.update_hashkey, req.req.update_indir_tab, req.req.num_indir_entries = 1, 1, 128
    req.req.indir_tab_offset = CFG_RX_INDIR_TAB_OFFSET
    req.req.hashkey[:] = list(range(40))
    for i in range(128):
        req.indir_table[i] = vp.rx_obj
    assert status(drv, MANA_CONFIG_VPORT_RX, req.to_bytes()) == 0
    port = device.vports[0]
    assert port.running and port.rss_enable and len(port.indir_table) == 128 and port.hashkey == bytes(range(40))
    req.req.indir_tab_offset = 40 + 72 + 1024  # table beyond the request
    assert status(drv, MANA_CONFIG_VPORT_RX, req.to_bytes()) == 1
    # destroy refused while running
    assert status(drv, MANA_DESTROY_WQ_OBJ, ManaDestroyWqobjReq(wq_type=GDMA_RQ, wq_obj_handle=0).to_bytes()) == 1
    vp.stop_and_destroy()
    assert device.sqs.keys() == {24} and device.cqs.keys() == {24} and not port.running


def test_query_stats_reports_selected_adapter_counters(up):
    device, drv = up
    vp = VportQueues(drv)
    vp.start(rx_buffers=2)
    vp.send([frame(PEER, vp.mac, i, 100) for i in range(3)])  # the third finds no receive WQE
    mask = STATISTICS_FLAGS_IN_DISCARDS_NO_WQE | STATISTICS_FLAGS_HC_OUT_OCTETS | STATISTICS_FLAGS_HC_IN_UCAST_PACKETS
    stats = drv.mana(MANA_QUERY_STATS, ManaQueryStatisticsRequest(requested_statistics=mask).to_bytes(),
                     ManaQueryStatisticsResponse)
    assert stats.reported_statistics == mask
    assert (stats.in_discards_no_wqe, stats.hc_out_octets, stats.hc_in_ucast_pkts) == (1, 300, 2)
    assert stats.hc_out_ucast_pkts == 0  # not selected
    all_stats = drv.mana(MANA_QUERY_STATS, ManaQueryStatisticsRequest(requested_statistics=~0 & (1 << 64) - 1)
                         .to_bytes(), ManaQueryStatisticsResponse)
    assert all_stats.reported_statistics == STATISTICS_FLAGS_ALL and all_stats.hc_out_ucast_pkts == 3


# -- doorbells and queues -----------------------------------------------------------------------
def test_cq_and_eq_arm_semantics(up):
    device, drv = up
    vp = VportQueues(drv)
    vp.start(rx_buffers=8)
    irqs = device.irq
    vp.send([frame(PEER, vp.mac, 0)])  # TX CQ and RX CQ start armed: both notify, the EQ is armed
    assert len(vp.poll_tx()) == 1 and len(vp.poll_rx()) == 1
    eqes = []
    while (e := vp.eq.poll()) is not None:
        eqes.append(int.from_bytes(e[:4], "little"))
    # the loopback frame is received before its send completes (the TX buffer is read in place until then)
    assert eqes == [vp.rx_cq.id, vp.tx_cq.id] and irqs.count >= 2
    count = irqs.count
    vp.send([frame(PEER, vp.mac, 1)])  # everything disarmed now: no EQE, no interrupt
    assert vp.eq.poll() is None and irqs.count == count
    vp.poll_tx()
    drv.ring_cq_eq(DB_CQ, vp.tx_cq, arm=True)  # consumed everything: just armed
    assert vp.eq.poll() is None
    drv.ring_cq_eq(DB_CQ, vp.rx_cq, arm=True)  # one RX CQE unconsumed: notifies at once
    assert int.from_bytes(vp.eq.poll()[:4], "little") == vp.rx_cq.id
    drv.ring_cq_eq(DB_EQ, vp.eq, arm=True)  # the EQ was disarmed; arming with nothing pending
    assert irqs.count == count
    drv.ring_cq_eq(DB_EQ, ConsumerRing(None, 0, 4096, 16, vp.eq.id), arm=True)  # stale tail: entries pending
    assert irqs.count == count + 1


def test_wq_doorbell_rules(up):
    device, drv = up
    vp = VportQueues(drv)
    rq = device.rqs[vp.rq.id]
    drv.port.write64(0x1400, (64 << 32) | vp.rq.id)  # beyond what is useful but accepted (≤ ring size)
    assert rq.tail == 64
    drv.port.write64(0x1400, (32 << 32) | vp.rq.id)  # fewer pending bytes than before: ignored
    drv.port.write64(0x1400, ((32768 + 32) << 32) | vp.rq.id)  # more than the ring: ignored
    assert rq.tail == 64 and device.counters["ignored_doorbells"] == 2
    drv.port.write64(0x1400, (32 << 32) | 99)  # unknown queue
    drv.port.write64(0x1010, 0)  # not a doorbell offset
    assert device.counters["bad_doorbells"] == 2


# -- data path ----------------------------------------------------------------------------------
def test_loopback_swaps_macs_and_truncates(up):
    device, drv = up
    vp = VportQueues(drv, buf_size=2048)
    vp.start(rx_buffers=0)
    vp.post_rx(1, size=100)  # a small buffer: truncated
    vp.post_rx(1)
    vp.send([frame(PEER, vp.mac, 1, 300), frame(PEER, vp.mac, 2, 300)])
    assert vp.wait_tx(2) == [CQE_TX_OKAY] * 2
    (t1, f1), (t2, f2) = vp.poll_rx()
    assert t1 == CQE_RX_TRUNCATED and t2 == CQE_RX_OKAY
    assert f2[:6] == vp.mac and f2[6:12] == PEER and len(f2) == 300
    assert device.counters["rx_truncated"] == 1 and device.counters["frames_rx"] == 2


def test_vlan_insertion_with_long_oob(up):
    device, drv = up
    vp = VportQueues(drv)
    vp.start(rx_buffers=1)
    oob = ManaTxOob()
    oob.s_oob.pkt_fmt = MANA_LONG_PKT_FMT
    oob.l_oob.inject_vlan_pri_tag, oob.l_oob.pcp, oob.l_oob.vlan_id = 1, 5, 100
    vp.send([frame(PEER, vp.mac, 7)], long_oob=oob)
    (_, f), = vp.poll_rx()
    assert f[12:16] == bytes.fromhex("8100a064") and len(f) == 68


def test_rx_drops_are_counted(up):
    device, drv = up
    vp = VportQueues(drv)
    device.deliver(0, frame(vp.mac, PEER, 0))  # not running yet
    assert device.counters["in_errors_rx_vport_disabled"] == 1
    vp.start(rx_buffers=1)
    for i in range(3):
        device.deliver(0, frame(vp.mac, PEER, i))
    assert device.counters["in_discards_no_wqe"] == 2 and device.counters["frames_rx"] == 1


def test_ten_thousand_loopback_frames_in_process(up):
    device, drv = up
    vp = VportQueues(drv)
    vp.start(rx_buffers=256)
    batch, total = 128, 10_000
    seq = 0
    while seq < total:
        n = min(batch, total - seq)
        vp.send([frame(PEER, vp.mac, s) for s in range(seq, seq + n)])
        rx = vp.wait_rx(n)
        assert [int.from_bytes(f[14:22], "little") for _, f in rx] == list(range(seq, seq + n))
        vp.post_rx(n)
        assert vp.wait_tx(n) == [CQE_TX_OKAY] * n
        seq += n
    c = device.counters
    assert c["frames_tx"] == c["frames_rx"] == total and c["in_discards_no_wqe"] == 0


# -- bad input: error status + counter, and the device keeps serving ----------------------------
def test_oversize_and_short_requests(up):
    device, drv = up
    hdr = GdmaReqHdr.from_bytes(bytes(40))
    hdr.req.msg_type = hdr.resp.msg_type = GDMA_QUERY_MAX_RESOURCES
    hdr.req.msg_size, hdr.resp.msg_size = 8192, 72
    resp, _, _ = drv.send_request(GDMA_QUERY_MAX_RESOURCES, raw_hdr=hdr.to_bytes())
    assert resp.status == 1
    hdr.req.msg_size = 40
    resp, _, _ = drv.send_request(GDMA_QUERY_MAX_RESOURCES, raw_hdr=hdr.to_bytes(), sge_size=16)  # short SGL
    assert resp.status == 1
    assert status(drv, GDMA_CREATE_QUEUE, b"\x04\x00") == 1  # body shorter than the struct
    assert device.counters["bad_requests"] == 3
    assert drv.request(GDMA_QUERY_MAX_RESOURCES, resp_cls=GdmaQueryMaxResourcesResp).max_eq == 64


def test_send_wqe_with_wrong_queue_ids(up):
    device, drv = up
    resp, _, _ = drv.send_request(GDMA_QUERY_MAX_RESOURCES, vscq_id=99)
    assert resp.status == 1 and device.counters["malformed_wqes"] == 1
    assert device.command_log.since()[-1]["name"] == "MALFORMED"
    assert status(drv, GDMA_QUERY_MAX_RESOURCES, dev_id=HWC_DEV_ID) == 0


def test_request_buffer_outside_dma(up, mem):
    device, drv = up
    from vfkeep.gdma.hwc import HwcSendWqe
    wqe = HwcSendWqe.from_bytes(bytes(64))
    wqe.header.params = WqeParams.from_int(DRV_HWC_SWQE_PARAMS)
    wqe.oob.flags3.vscq_id, wqe.oob.flags4.vsq_id = 24, 24
    wqe.sge.address, wqe.sge.size = mem.size + 4096, 40
    drv.hwc_sq.put(wqe.to_bytes())
    drv.ring_wq(DB_SQ, drv.hwc_sq)
    cqes = drv.wait_cqes(drv.hwc_cq, 2, drv.hwc_eq, 0)
    drv.post_hwc_rwqe()
    assert len(cqes) == 2 and device.counters["dma_faults"] == 1
    assert status(drv, GDMA_QUERY_MAX_RESOURCES, dev_id=HWC_DEV_ID) == 0


def test_request_with_an_unusable_receive_wqe_is_not_executed(up):
    """The answer has nowhere to go, so the request must not run (here: no DEREGISTER): both WQEs complete,
    the RQ CQE with vendor_err, and the HWC keeps serving."""
    device, drv = up
    drv.hwc_rq.put(WqeHeader(params=WqeParams(num_sgl_entries=1, sgl_direct=1)).to_bytes().ljust(32, b"\0"))
    drv.ring_wq(DB_RQ, drv.hwc_rq, num_rwqe=1)  # a second, malformed receive WQE behind the good one
    assert status(drv, GDMA_QUERY_MAX_RESOURCES, dev_id=HWC_DEV_ID) == 0  # takes the good one
    failed = device.counters["hwc_requests_failed"]
    _, _, cqes = drv.send_request(GDMA_DEREGISTER_DEVICE, dev_id=MANA_DEV_ID)
    assert device.registered and device.counters["hwc_requests_failed"] == failed + 1
    assert device.command_log.since()[-1]["name"] == "MALFORMED"
    assert [cqe_params(c).is_send_wq for c in cqes] == [1, 0]
    assert HwcRxOob.from_bytes(cqes[1]).flags.vendor_err == VENDOR_ERR_MALFORMED_WQE
    assert status(drv, GDMA_QUERY_MAX_RESOURCES, dev_id=HWC_DEV_ID) == 0


def test_malformed_and_faulting_tx_wqes(up, mem):
    device, drv = up
    vp = VportQueues(drv)
    vp.start(rx_buffers=4)
    vp.send_raw_wqe(vp.tx_wqe(mem.size + 8192, 64))  # buffer outside DMA
    too_long = WqeHeader(params=WqeParams(num_sgl_entries=40, inline_client_oob_size=CLIENT_OOB_8)).to_bytes()
    vp.send_raw_wqe(too_long.ljust(32, b"\0"))  # 16 + 40*16 > 512
    lso = WqeHeader(params=WqeParams(num_sgl_entries=1, inline_client_oob_size=CLIENT_OOB_8,
                                     client_oob_in_sgl=1)).to_bytes()
    vp.send_raw_wqe(lso.ljust(32, b"\0"))  # LSO with one SGE
    assert vp.poll_tx() == [CQE_TX_GDMA_ERR] * 3
    assert device.counters["dma_faults"] == 1 and device.counters["malformed_wqes"] == 2
    vp.sq.tail = device.sqs[vp.sq.id].head  # re-sync the test ring with what the device consumed
    vp.send([frame(PEER, vp.mac, 1)])
    assert vp.poll_tx() == [CQE_TX_OKAY] and len(vp.poll_rx()) == 1


def test_rx_wqe_errors_complete_with_vendor_error(up, mem):
    device, drv = up
    vp = VportQueues(drv)
    vp.start(rx_buffers=0)
    vp.post_rx(1, address=mem.size + 4096)  # buffer outside DMA
    bad = WqeHeader(params=WqeParams(num_sgl_entries=1, sgl_direct=1, inline_client_oob_size=CLIENT_OOB_8))
    vp.rq.put(bad.to_bytes().ljust(32, b"\0"))
    vp.rx_posted += 1
    vp.post_rx(1)
    device.deliver(0, frame(vp.mac, PEER, 1))
    device.deliver(0, frame(vp.mac, PEER, 2))
    oobs = []
    while (raw := vp.rx_cq.poll()) is not None:
        oobs.append(ManaRxcompOob.from_bytes(raw))
    assert [(o.cqe_hdr.cqe_type, o.cqe_hdr.vendor_err) for o in oobs] == [
        (CQE_INVALID, VENDOR_ERR_DMA_FAULT), (CQE_INVALID, VENDOR_ERR_MALFORMED_WQE), (CQE_RX_OKAY, 0)]
    assert [o.rx_wqe_offset for o in oobs] == [0, 32, 64]
    assert device.counters["dma_faults"] == 1 and device.counters["malformed_wqes"] == 1


# -- reset and keepalive (in-process) -----------------------------------------------------------
def test_disconnect_with_none_keeps_state_and_flr_wipes_it(up):
    device, drv = up
    vp = VportQueues(drv)
    vp.start(rx_buffers=16)
    before = device.inspect()
    device.client_disconnected()
    device.client_connected(2)
    assert device.inspect()["hwc"] == before["hwc"] and device.inspect()["vports"] == before["vports"]
    assert device.counters["reset_count"] == 0
    device.reset_method = "flr"
    device.client_disconnected()
    state = device.inspect()
    assert not state["hwc_established"] and not state["registered"] and state["posted_rx"] == 0
    assert state["eqs"] == state["cqs"] == state["sqs"] == state["dma_regions"] == []
    assert device.counters["reset_count"] == 1 and device.command_log.since()[-1]["kind"] == "flr"


def test_flr_returns_every_vport_to_power_on(up):
    """An FLR forgets all the function set on a vport: filter direction (MOVE_FILTER), serial number, RSS,
    default RX object, TX config, queues, running flag and posted buffers; only the wire's link state stays.
    A driver bringing the function up again reads the filter direction as at power-on (toward VTL2)."""
    from vfkeep.device.vport import Vport

    device, drv = up
    vp = VportQueues(drv)
    vp.start(rx_buffers=8)
    drv.mana(MANA_VTL2_ASSIGN_SERIAL_NUMBER, ManaSetVportSerialNo(vport=0, serial_no=77).to_bytes())
    drv.mana(MANA_VTL2_MOVE_FILTER, ManaMoveFilterVTL2PrivilegedReq(vport=0, direction_to_vtl0=1).to_bytes())
    port = device.vports[0]
    port.rss_enable, port.hashkey, port.indir_table = True, bytes(range(40)), [vp.rx_obj] * 4
    port.link_up = False
    power_on = {k: v for k, v in vars(Vport(device, 0, port.mac)).items() if k not in ("dev", "link_up")}
    assert {k: v for k, v in vars(port).items() if k not in ("dev", "link_up")} != power_on
    device.flr("test")
    assert {k: v for k, v in vars(port).items() if k not in ("dev", "link_up")} == power_on
    assert port.link_up is False  # the wire's, not the function's
    drv.bring_up()
    assert drv.mana(MANA_VTL2_QUERY_FILTER_STATE, ManaQueryFilterStateReq(vport=0).to_bytes(),
                    ManaQueryFilterStateResponse).direction_to_vtl0 == 0


def test_rx_without_dma_mapping_is_dropped_and_keeps_the_buffer(up, mem):
    device, drv = up
    vp = VportQueues(drv)
    vp.start(rx_buffers=2)
    device.dma.unmap_all()  # the driver is gone: no mapping
    device.deliver(0, frame(vp.mac, PEER, 1))
    assert device.counters["rx_dropped_unmapped"] == 1 and device.counters["dma_faults"] == 0
    assert len(device.vports[0].posted) == 2
    device.dma.map(0, mem.size)  # a new driver maps memory again
    device.deliver(0, frame(vp.mac, PEER, 2))
    (t, f), = vp.poll_rx()
    assert t == CQE_RX_OKAY and int.from_bytes(f[14:22], "little") == 2


def test_realistic_timing_models_hwc_latency_and_flr(mem):
    loop = HeldLoop()
    device, port = in_process_device(mem, loop=loop, timing="realistic", reset_method="flr")
    drv = TestDriver(port, mem, Pages(mem, mem.layout.worker), timeout=0.2)
    drv.establish_hwc()
    drv.irq(0)
    drv.mem.write(drv.req_page, bytes(40))
    with pytest.raises(TimeoutError):  # the answer waits for the loop
        drv.send_request(GDMA_QUERY_MAX_RESOURCES)
    # The request ran at once (the emulator's work falls inside the modelled latency); only the answer waits.
    assert [d for d, _ in loop.timers] == [0.001] and drv.hwc_cq.poll() is None
    assert device.counters["hwc_requests"] == 1 and device.command_log.entries[-1]["name"] == "GDMA_QUERY_MAX_RESOURCES"
    loop.timers.pop()[1]()
    assert drv.hwc_cq.poll() is not None and device.counters["modelled_hwc_ms_total"] == 1
    device.flr("test")
    assert device.counters["modelled_flr_ms_total"] == 100 and device.counters["reset_count"] == 1


# -- test hooks ---------------------------------------------------------------------------------
def test_fault_injection_modes(up):
    device, drv = up
    ctl(device, "fail_request", type="QUERY_MAX_RESOURCES", mode="once")
    assert status(drv, GDMA_QUERY_MAX_RESOURCES, dev_id=HWC_DEV_ID) == 1
    assert status(drv, GDMA_QUERY_MAX_RESOURCES, dev_id=HWC_DEV_ID) == 0
    ctl(device, "fail_request", type=GDMA_LIST_DEVICES, mode="always")
    assert [status(drv, GDMA_LIST_DEVICES, dev_id=HWC_DEV_ID) for _ in range(2)] == [1, 1]
    assert ctl(device, "clear_faults") == {"cleared": 1}
    ctl(device, "fail_request", type="0x20001", mode="from_epoch", epoch=2)
    assert status(drv, MANA_QUERY_DEV_CONFIG, ManaQueryDeviceCfgReq().to_bytes()) == 0  # epoch 1
    device.client_connected(2)
    assert status(drv, MANA_QUERY_DEV_CONFIG, ManaQueryDeviceCfgReq().to_bytes()) == 1
    entry = device.command_log.since()[-1]
    assert entry["injected"] and entry["epoch"] == 2 and entry["name"] == "MANA_QUERY_DEV_CONFIG"
    ctl(device, "fail_request", type="ESTABLISH_HWC", mode="always")
    drv.destroy_hwc()
    assert drv.establish_hwc().status == 1 and device.hwc is None
    with pytest.raises(ValueError):
        ctl(device, "fail_request", type="NO_SUCH_REQUEST")
    with pytest.raises(ValueError):
        ctl(device, "fail_request", type="ESTABLISH_HWC", mode="from_epoch")


def test_hwc_stall_and_resume(up):
    device, drv = up
    ctl(device, "hwc_stall", on=True)
    drv.timeout = 0.1
    with pytest.raises(TimeoutError):
        drv.send_request(GDMA_QUERY_MAX_RESOURCES)
    before = device.counters["hwc_requests"]
    ctl(device, "hwc_stall", on=False)  # the pending request is answered now
    assert device.counters["hwc_requests"] == before + 1
    assert drv.hwc_cq.poll() is not None and drv.hwc_cq.poll() is not None


def test_surprise_removal_reads_all_ones(up):
    device, drv = up
    ctl(device, "surprise_removal")
    assert drv.port.read32(0) == 0xFFFFFFFF and drv.port.read32(SHMEM_HDR) == 0xFFFFFFFF
    device.deliver(0, b"x" * 60)
    assert device.counters["rx_dropped_removed"] == 1


def test_link_and_reset_request_events(up):
    device, drv = up
    assert ctl(device, "link", vport=0, up=False) == {"posted": True}
    raw = drv.wait_event(GDMA_EQE_HWC_RECONFIG_DATA)
    reconfig = EqeDataReconfig.from_bytes(raw)
    assert reconfig.data_type == HWC_DATA_TYPE_HW_VPORT_LINK_DISCONNECT and bytes(reconfig.data) == b"\0\0\0"
    ctl(device, "link", vport=0, up=True)
    assert EqeDataReconfig.from_bytes(drv.wait_event(133)).data_type == HWC_DATA_TYPE_HW_VPORT_LINK_CONNECT
    ctl(device, "raise_reset_request", revoke_vtl0_vf=True)
    assert EqeVfReset.from_bytes(drv.wait_event(GDMA_EQE_HWC_RESET_REQUEST)).revoke_vtl0_vf == 1
    with pytest.raises(ValueError):
        ctl(device, "link", vport=5, up=True)


def test_link_down_drops_traffic(up):
    device, drv = up
    vp = VportQueues(drv)
    vp.start(rx_buffers=4)
    ctl(device, "link", vport=0, up=False)
    vp.send([frame(PEER, vp.mac, 1)])
    assert vp.poll_tx() == [CQE_TX_OKAY] and vp.poll_rx() == []
    assert device.counters["tx_dropped_link_down"] == 1
    device.deliver(0, frame(vp.mac, PEER, 1))
    assert device.counters["rx_dropped_link_down"] == 1


def test_shared_wire_steers_by_destination_mac(mem):
    device, port = in_process_device(mem, vports=2)
    drv = TestDriver(port, mem, Pages(mem, mem.layout.worker), timeout=1.0)
    drv.bring_up()
    vps = [VportQueues(drv, index=i, msix=1 + i) for i in range(2)]
    for vp in vps:
        vp.start(rx_buffers=4)
    assert vps[1].mac == bytes.fromhex("00155d121213")
    device.deliver_wire([frame(vps[1].mac, PEER, 1)])
    device.deliver_wire([frame(b"\xff" * 6, PEER, 2)])
    device.deliver_wire([frame(bytes.fromhex("00155d999999"), PEER, 3)])
    seqs = [[int.from_bytes(f[14:22], "little") for _, f in vp.poll_rx()] for vp in vps]
    assert seqs == [[2], [1, 2]] and device.counters["rx_dropped_no_vport"] == 1
    assert device.counters["hc_in_broadcast_pkts"] == 2


def test_a_connect_a_disconnect_and_successful_requests_are_in_the_command_log_but_their_lines_are_debug(caplog):
    """The vfio-user server's "client connected" and "client disconnected" lines (the latter with the reset method)
    say them already (both are in a servicing's window: every line costs the device CPU there); an event that is
    neither keeps its INFO line."""
    import logging

    from vfkeep.device.faults import CommandLog
    log = CommandLog()
    with caplog.at_level(logging.INFO, logger="vfkeep.device.commands"):
        log.add("event", "CONNECT", 3)
        log.add("event", "DISCONNECT", 3, reset_method="none")
        log.add("event", "SET_RESET_METHOD", 3, value="flr")
        # Successful requests, HWC and SMC alike, are DEBUG too (a reset path's window has an SMC message at each
        # end); a failed one is a WARNING.
        log.add("smc", "SMC_MSG_TYPE_ESTABLISH_HWC", 3, code=1, status=0)
        log.add("hwc", "GDMA_LIST_DEVICES", 3, code=0x105, status=0)
        log.add("smc", "SMC_MSG_TYPE_DESTROY_HWC", 3, code=2, status=1)
    assert [e["name"] for e in log.since(0)] == ["CONNECT", "DISCONNECT", "SET_RESET_METHOD",
                                                 "SMC_MSG_TYPE_ESTABLISH_HWC", "GDMA_LIST_DEVICES",
                                                 "SMC_MSG_TYPE_DESTROY_HWC"]
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("INFO", "event SET_RESET_METHOD"), ("WARNING", "smc SMC_MSG_TYPE_DESTROY_HWC")]
