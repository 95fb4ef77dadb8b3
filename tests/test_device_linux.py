"""What Linux's `mana` driver needs from the emulator beyond the reference driver (spec gdma.md Appendix L),
in-process: FENCE_RQ, HWC completion fields, CONFIG_VPORT_RX v2, adapter MTU, CQ and EQ ids, BAR0 reads."""
from __future__ import annotations

import pytest

from device_driver_helper import (MANA_DEV_ID, ConsumerRing, Pages, TestDriver, VportQueues, cqe_params, frame,
                                  in_process_device)
from vfkeep.gdma.bnic import (ManaCfgRxSteerReqV2, ManaFenceRqReq, ManaQueryDeviceCfgReq, ManaQueryDeviceCfgResp)
from vfkeep.gdma.constants import *  # noqa: F403 - spec names
from vfkeep.gdma.datapath import ManaRxcompOob
from vfkeep.gdma.hwc import HwcRxOob
from vfkeep.gdma.messages import request_header
from vfkeep.memory import MemoryLayout

LAYOUT = MemoryLayout(guest_pages=64, worker_pages=2048, pool_pages=0)
PEER = bytes.fromhex("020000000001")


@pytest.fixture
def up(mem):
    """(device, driver) after §13.1 steps 1-11."""
    device, port = in_process_device(mem)
    drv = TestDriver(port, mem, Pages(mem, mem.layout.worker), timeout=1.0)
    drv.bring_up()
    yield device, drv
    port.irqs.close()


def fence(drv, wq_obj: int) -> int:
    return drv.send_request(MANA_FENCE_RQ, ManaFenceRqReq(wq_obj_handle=wq_obj).to_bytes(), MANA_DEV_ID)[0].status


def linux_eq_doorbell(eq: ConsumerRing, arm: bool) -> int:
    """The EQ doorbell as Linux writes it (Appendix L.2): id in bits 0-15, bits 16-31 zero, tail, arm."""
    return eq.id | eq.tail << 32 | int(arm) << 63


# -- L.1 FENCE_RQ -----------------------------------------------------------------------------------
def test_fence_rq_posts_one_fence_cqe_consumes_no_receive_wqe_and_interrupts_when_armed(up):
    device, drv = up
    vp = VportQueues(drv)
    vp.start(rx_buffers=4)
    port, rq = device.vports[0], device.rqs[vp.rq.id]
    posted, head, interrupts = len(port.posted), rq.head, device.irq.count
    # RX CQ and the vport's EQ are armed (nothing posted since creation): CQE, then EQE, then MSI-X.
    assert fence(drv, vp.rx_obj) == 0
    raw = vp.rx_cq.poll()
    assert raw is not None and vp.rx_cq.poll() is None and vp.tx_cq.poll() is None  # exactly one, on the RX CQ
    oob = ManaRxcompOob.from_bytes(raw)
    assert (oob.cqe_hdr.cqe_type, oob.cqe_hdr.client_type, oob.cqe_hdr.vendor_err) == (CQE_RX_OBJECT_FENCE, 1, 0)
    assert raw[4:60] == bytes(56)
    params = cqe_params(raw)
    assert (params.wq_number, params.is_send_wq) == (vp.rq.id, 0)
    assert (len(port.posted), rq.head) == (posted, head)  # no receive WQE taken
    assert int.from_bytes(vp.eq.poll()[:4], "little") == vp.rx_cq.id and vp.eq.poll() is None
    assert device.irq.count == interrupts + 1
    # Disarmed CQ: the fence CQE is written but notifies nothing.
    assert fence(drv, vp.rx_obj) == 0
    assert ManaRxcompOob.from_bytes(vp.rx_cq.poll()).cqe_hdr.cqe_type == CQE_RX_OBJECT_FENCE
    assert vp.eq.poll() is None and device.irq.count == interrupts + 1
    # Re-armed CQ and EQ (the EQ doorbell as Linux writes it): the next fence interrupts again.
    drv.ring_cq_eq(DB_CQ, vp.rx_cq, arm=True)
    drv.port.write64(EMU_DB_ZONE_OFFSET + DB_EQ, linux_eq_doorbell(vp.eq, arm=True))
    assert device.eqs[vp.eq.id].armed
    assert fence(drv, vp.rx_obj) == 0
    assert device.irq.count == interrupts + 2 and vp.rx_cq.poll() is not None
    # The receive WQEs are all still there: a frame lands in the first posted buffer.
    vp.send([frame(PEER, vp.mac, 7)])
    (cqe_type, got), = vp.poll_rx()
    assert cqe_type == CQE_RX_OKAY and int.from_bytes(got[14:22], "little") == 7


def test_fence_rq_at_link_down_and_refusals(up):
    device, drv = up
    assert fence(drv, 0) == 1  # the vport has no RQ yet
    vp = VportQueues(drv)
    vp.start(rx_buffers=1)
    assert fence(drv, 5) == 1  # no such vport / wq_obj
    assert vp.config_rx(Tristate.FALSE) == 0  # Linux's link down: CONFIG_VPORT_RX FALSE, FENCE_RQ, DESTROY_WQ_OBJ
    assert fence(drv, vp.rx_obj) == 0
    assert ManaRxcompOob.from_bytes(vp.rx_cq.poll()).cqe_hdr.cqe_type == CQE_RX_OBJECT_FENCE
    vp.stop_and_destroy()


# -- L.2 HWC completion fields ------------------------------------------------------------------------
def test_hwc_rx_completion_fields_and_echoed_ids(up):
    device, drv = up
    hdr = request_header(MANA_FENCE_RQ, MANA_DEV_ID, 0x1234)
    hdr.req.hwc_msg_id = 3  # Linux sets only the request's id and matches the response by it
    vp = VportQueues(drv)
    positions = []
    for _ in range(2):
        resp, _, cqes = drv.send_request(MANA_FENCE_RQ, ManaFenceRqReq(wq_obj_handle=vp.rx_obj).to_bytes(),
                                         MANA_DEV_ID, raw_hdr=hdr.to_bytes() + b"")
        rx = HwcRxOob.from_bytes(cqes[1])
        assert resp.status == 0 and rx.tx_oob_data_size == 32  # header only, exactly 32 for FENCE_RQ
        assert (resp.response.hwc_msg_id, resp.response.msg_type, resp.response.msg_version) == (3, MANA_FENCE_RQ, 1)
        assert (resp.activity_id, resp.dev_id.to_int()) == (0x1234, MANA_DEV_ID)
        positions.append(rx.wqe_addr_low_or_offset)
    assert positions[1] - positions[0] == RWQE_SIZE  # the byte position of the consumed receive WQE
    # Every response length lies in [32, resp.msg_size].
    for code, body in ((GDMA_QUERY_MAX_RESOURCES, b""), (GDMA_LIST_DEVICES, b""),
                       (MANA_QUERY_DEV_CONFIG, ManaQueryDeviceCfgReq().to_bytes()), (0x77, b"")):
        dev_id = MANA_DEV_ID if code == MANA_QUERY_DEV_CONFIG else HWC_DEV_ID
        resp, _, cqes = drv.send_request(code, body, dev_id)
        assert 32 <= HwcRxOob.from_bytes(cqes[1]).tx_oob_data_size <= resp.response.msg_size, code


# -- L.3 requests ---------------------------------------------------------------------------------------
def test_query_dev_config_as_linux_asks_it(up):
    """Linux asks response version 2 and takes max MTU = adapter_mtu - 14."""
    device, drv = up
    hdr = request_header(MANA_QUERY_DEV_CONFIG, MANA_DEV_ID, 1)
    hdr.resp.msg_version = 2
    resp, body, _ = drv.send_request(MANA_QUERY_DEV_CONFIG, ManaQueryDeviceCfgReq(proto_minor_ver=1,
                                     proto_micro_ver=1).to_bytes(), MANA_DEV_ID, raw_hdr=hdr.to_bytes())
    cfg = ManaQueryDeviceCfgResp.from_bytes(body)
    assert resp.status == 0 and resp.response.msg_version == 2
    assert (cfg.adapter_mtu, cfg.max_num_vports) == (1514, 1)


def config_rx_v2(drv, vp, *, rx_enable, n: int, update_table: bool, offset: int = CFG_RX_INDIR_TAB_OFFSET_V2):
    req = ManaCfgRxSteerReqV2()
    r = req.req
    r.vport, r.rx_enable, r.rss_enable, r.num_indir_entries, r.indir_tab_offset = vp.handle, rx_enable, 0, n, offset
    if rx_enable == Tristate.TRUE:
        r.update_default_rxobj, r.default_rxobj, r.update_hashkey = 1, vp.rx_obj, 1
        r.update_indir_tab = int(update_table)
        r.hashkey[:] = list(range(40, 80))
    table = b"".join(vp.rx_obj.to_bytes(8, "little") if update_table else bytes(8) for _ in range(n))
    hdr = request_header(MANA_CONFIG_VPORT_RX, MANA_DEV_ID, 1, req_body_size=80 + len(table), resp_body_size=0)
    hdr.req.msg_version = MANA_CONFIG_VPORT_RX_REQUEST_V2
    return drv.send_request(MANA_CONFIG_VPORT_RX, req.to_bytes() + table, MANA_DEV_ID,
                            raw_hdr=hdr.to_bytes())[0].status


def test_config_vport_rx_version_2(up):
    device, drv = up
    vp = VportQueues(drv)
    port = device.vports[0]
    assert config_rx_v2(drv, vp, rx_enable=Tristate.TRUE, n=128, update_table=True) == 0
    assert port.running and port.indir_table == [vp.rx_obj] * 128 and port.hashkey == bytes(range(40, 80))
    # the v1 offset would put the table inside the v2 fields
    assert config_rx_v2(drv, vp, rx_enable=Tristate.TRUE, n=128, update_table=True,
                        offset=CFG_RX_INDIR_TAB_OFFSET) == 1
    # link down: rx_enable FALSE, no updates, the (zero) table and its size still sent
    assert config_rx_v2(drv, vp, rx_enable=Tristate.FALSE, n=128, update_table=False) == 0
    assert not port.running and port.indir_table == [vp.rx_obj] * 128


# -- ids, doorbells, data path ------------------------------------------------------------------------
def test_cq_ids_stay_below_max_num_cqs(up):
    device, drv = up
    pool = device.pools["CQ"]
    ids = []
    while (qid := pool.alloc()) is not None:
        ids.append(qid)
    assert [device.hwc.cq.id, *ids] == list(range(24, EMU_HWC_MAX_NUM_CQS))  # the HWC's CQ holds 24


def test_bar0_8_byte_reads(up):
    device, drv = up
    assert drv.port.read64(0x08) == EMU_DB_ZONE_OFFSET
    assert drv.port.read32(0x10) & 0xFFFF == EMU_DB_PAGE_SIZE
    assert drv.port.read64(0x18) == EMU_SHMEM_OFFSET


def test_no_zero_length_rx_completion(up):
    device, drv = up
    vp = VportQueues(drv)
    vp.start(rx_buffers=2)
    device.deliver(0, b"")
    assert vp.poll_rx() == [] and len(device.vports[0].posted) == 2 and device.counters["rx_errors"] == 1
