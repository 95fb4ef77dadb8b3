"""Hostile driver input to the MANA emulator (in-process, hypothesis): random HWC requests, random WQEs and
random BAR0 writes. The device never raises out of its handlers: every request is answered with status 0 or 1
(and counted), every consumed WQE gets a completion of a defined type, and the HWC keeps serving."""
from __future__ import annotations

import ctypes

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from device_driver_helper import MANA_DEV_ID, Pages, TestDriver, VportQueues, cqe_params, frame, in_process_device
from vfkeep.device.control import COMMANDS
from vfkeep.gdma.bnic import (ManaCfgRxSteerReq, ManaCfgRxSteerReqDriver, ManaConfigVportReq, ManaCreateWqobjReq,
                              ManaDestroyWqobjReq, ManaMoveFilterVTL2PrivilegedReq, ManaQueryDeviceCfgReq,
                              ManaQueryFilterStateReq, ManaQueryStatisticsRequest, ManaQueryVportCfgReq,
                              ManaSetVportSerialNo)
from vfkeep.gdma.constants import (CFG_RX_INDIR_TAB_OFFSET, CQE_INVALID, CQE_RX_OKAY, CQE_RX_TRUNCATED,
                                   CQE_TX_GDMA_ERR, CQE_TX_MTU_DROP, CQE_TX_OKAY, DB_RQ, DB_SQ, EMU_BAR0_SIZE,
                                   GDMA_EQ, GDMA_QUERY_MAX_RESOURCES, GDMA_RQ, GDMA_SQ, HWC_DEV_ID, PAGE_SIZE,
                                   STATISTICS_FLAGS_ALL, GdmaRequestType, ManaCommandCode, Tristate)
from vfkeep.gdma.datapath import ManaRxcompOob, ManaTxCompOob
from vfkeep.gdma.messages import MESSAGES
from vfkeep.gdma.queues import WqeHeader, WqeParams, sgl_offset_from_code
from vfkeep.gdma.requests import (GdmaChangeMsixVectorIndexForEq, GdmaCreateDmaRegionReq, GdmaCreateDmaRegionReqDriver,
                                  GdmaCreateQueueReq, GdmaDestroyDmaRegionReq, GdmaDisableQueueReq,
                                  GdmaGenerateResetEventReq, GdmaGenerateTestEventReq, GdmaVerifyVerReq)
from vfkeep.memory import GuestMemory, MemoryLayout

pytestmark = pytest.mark.usefixtures("quiet_vfkeep_logs")
SETTINGS = settings(max_examples=150, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
PEER = bytes.fromhex("020000000001")
RARELY = st.sampled_from([False] * 5 + [True])
CODES = [int(c) for c in GdmaRequestType] + [int(c) for c in ManaCommandCode]
#: Mostly the defined request codes, sometimes any u32.
CODE = st.sampled_from(CODES + [None] * 3).flatmap(lambda c: st.integers(0, 0xFFFFFFFF) if c is None else st.just(c))
#: Values that hit ids (24, 25), DMA-region handles (1-3), sizes and limits when written into a request field.
INTERESTING = [0, 1, 2, 3, 4, 16, 24, 25, 26, 64, 4096, 8192, 0x7FFFFFFF, 0xFFFFFFFF]
HWC_REQUESTS = {GdmaRequestType.GDMA_VERIFY_VF_DRIVER_VERSION, GdmaRequestType.GDMA_QUERY_MAX_RESOURCES,
                GdmaRequestType.GDMA_LIST_DEVICES, GdmaRequestType.GDMA_GENERATE_TEST_EQE,
                GdmaRequestType.GDMA_GENERATE_RESET_REQUEST_EQE}


@pytest.fixture(scope="module")
def mem():
    m = GuestMemory.create(MemoryLayout(guest_pages=16, worker_pages=1024, pool_pages=0))
    yield m
    m.close()


class Bench:
    """A device with two vports after §13.1 steps 1-11, vport 0 started, and DMA regions for requests to name."""

    def __init__(self, mem):
        self.mem = mem
        self.device, self.port = in_process_device(mem, vports=2)
        self.drv = TestDriver(self.port, mem, Pages(mem, mem.layout.worker), timeout=1.0)
        self.drv.bring_up()
        self.vport = VportQueues(self.drv, sq_size=4096, rq_size=4096, cq_size=4096, buf_size=1024)
        self.vport.start(rx_buffers=4)
        self.regions = [self.drv.create_dma_region(self.drv.pages.alloc(), PAGE_SIZE) for _ in range(2)]
        self.templates = _templates(self)

    def close(self):
        self.port.irqs.close()

    def safe_address(self, raw: int) -> int:
        """An SGE address that is either in guest RAM (mapped, unused by the test driver's rings) or unmapped."""
        guest = self.mem.layout.guest
        if raw & 1:
            return guest.gpa + raw % guest.size
        return self.mem.size + raw % (1 << 40)


def _templates(bench: Bench) -> dict[int, bytes]:
    """A well-formed body per request code that names this bench's objects (the fuzzer perturbs them)."""
    vp, guest_page, (r1, r2) = bench.vport, bench.mem.layout.guest.gpa, bench.regions
    region = GdmaCreateDmaRegionReqDriver()
    region.req = GdmaCreateDmaRegionReq(length=PAGE_SIZE, page_count=1, page_addr_list_len=1)
    region.page_addr_list[0] = guest_page
    rx = ManaCfgRxSteerReqDriver()
    rx.req = ManaCfgRxSteerReq(rx_enable=Tristate.FALSE, rss_enable=Tristate.UNKNOWN, update_default_rxobj=1,
                               indir_tab_offset=CFG_RX_INDIR_TAB_OFFSET, num_indir_entries=2, update_indir_tab=1)
    bodies = [
        (GdmaRequestType.GDMA_VERIFY_VF_DRIVER_VERSION, GdmaVerifyVerReq(protocol_ver_min=1, protocol_ver_max=1)),
        (GdmaRequestType.GDMA_GENERATE_TEST_EQE, GdmaGenerateTestEventReq(queue_index=vp.eq.id)),
        (GdmaRequestType.GDMA_GENERATE_RESET_REQUEST_EQE, GdmaGenerateResetEventReq(queue_index=vp.eq.id)),
        (GdmaRequestType.GDMA_CREATE_QUEUE, GdmaCreateQueueReq(queue_type=GDMA_EQ, gdma_region=r1,
                                                               queue_size=PAGE_SIZE, eq_pci_msix_index=2)),
        (GdmaRequestType.GDMA_DISABLE_QUEUE, GdmaDisableQueueReq(queue_type=GDMA_EQ, queue_index=vp.eq.id,
                                                                 alloc_res_id_on_creation=1)),
        (GdmaRequestType.GDMA_CREATE_DMA_REGION, region),
        (GdmaRequestType.GDMA_DESTROY_DMA_REGION, GdmaDestroyDmaRegionReq(gdma_region=r2)),
        (GdmaRequestType.GDMA_CHANGE_MSIX_FOR_EQ, GdmaChangeMsixVectorIndexForEq(queue_index=vp.eq.id, msix=3)),
        (ManaCommandCode.MANA_QUERY_DEV_CONFIG, ManaQueryDeviceCfgReq(proto_major_ver=1)),
        (ManaCommandCode.MANA_QUERY_STATS, ManaQueryStatisticsRequest(requested_statistics=STATISTICS_FLAGS_ALL)),
        (ManaCommandCode.MANA_CONFIG_VPORT_TX, ManaConfigVportReq(vport=0)),
        (ManaCommandCode.MANA_CREATE_WQ_OBJ, ManaCreateWqobjReq(vport=1, wq_type=GDMA_SQ, wq_gdma_region=r1,
                                                               cq_gdma_region=r2,
                                                               wq_size=PAGE_SIZE, cq_size=PAGE_SIZE,
                                                               cq_parent_qid=vp.eq.id)),
        (ManaCommandCode.MANA_DESTROY_WQ_OBJ, ManaDestroyWqobjReq(wq_type=GDMA_RQ, wq_obj_handle=vp.rx_obj)),
        (ManaCommandCode.MANA_CONFIG_VPORT_RX, rx),
        (ManaCommandCode.MANA_QUERY_VPORT_CONFIG, ManaQueryVportCfgReq(vport_index=0)),
        (ManaCommandCode.MANA_VTL2_ASSIGN_SERIAL_NUMBER, ManaSetVportSerialNo(vport=0, serial_no=7)),
        (ManaCommandCode.MANA_VTL2_MOVE_FILTER, ManaMoveFilterVTL2PrivilegedReq(vport=0, direction_to_vtl0=1)),
        (ManaCommandCode.MANA_VTL2_QUERY_FILTER_STATE, ManaQueryFilterStateReq(vport=0)),
    ]
    return {int(code): body.to_bytes() for code, body in bodies}


def _request(data, bench: Bench, code: int) -> tuple[bytes, int]:
    """(body, dev_id): the code's template addressed to its device, or anything; then a few dwords replaced
    by values that name objects, sizes or limits."""
    if data.draw(st.booleans(), label="from template"):
        spec = MESSAGES.get(code)
        body = bytearray(bench.templates.get(code, bytes(ctypes.sizeof(spec.request) if spec and spec.request
                                                          else 0)))
        dev_id = HWC_DEV_ID if code in HWC_REQUESTS else MANA_DEV_ID
    else:
        n = data.draw(st.integers(0, 1200), label="body size")
        body = bytearray(data.draw(st.binary(min_size=n, max_size=n), label="body"))
        dev_id = data.draw(st.sampled_from([HWC_DEV_ID, MANA_DEV_ID]) | st.integers(0, 0xFFFFFFFF), label="dev")
    if body and data.draw(RARELY, label="truncate"):
        del body[data.draw(st.integers(0, len(body) - 1), label="cut"):]
    for _ in range(data.draw(st.sampled_from([0, 0, 1, 2, 3]), label="fields")):
        if len(body) >= 4:
            at = data.draw(st.integers(0, len(body) // 4 - 1), label="field") * 4
            body[at:at + 4] = data.draw(st.sampled_from(INTERESTING), label="value").to_bytes(4, "little")
    return bytes(body), dev_id


@SETTINGS
@given(data=st.data())
def test_random_hwc_requests_are_answered_with_a_status(mem, data):
    bench = Bench(mem)
    device, drv = bench.device, bench.drv
    try:
        for _ in range(data.draw(st.integers(1, 4), label="requests")):
            code = data.draw(CODE, label="code")
            body, dev_id = _request(data, bench, code)
            kwargs = {"resp_size": data.draw(st.sampled_from([None, 0, 8, 4064, 5000]), label="resp size")}
            if data.draw(RARELY, label="raw header"):
                kwargs["raw_hdr"] = data.draw(st.binary(min_size=40, max_size=40), label="header")
            if data.draw(RARELY, label="sge size"):
                kwargs["sge_size"] = data.draw(st.integers(0, 2 * PAGE_SIZE), label="sge")
            before = dict(device.counters)
            _, _, cqes = drv.send_request(code, body, dev_id, **kwargs)  # both CQEs arrive, or TimeoutError
            entry = [e for e in device.command_log.since() if e["kind"] == "hwc"][-1]
            assert entry["status"] in (0, 1)
            event(f"{entry['name']} status {entry['status']}")
            assert device.counters["hwc_requests"] == before["hwc_requests"] + 1
            failed = device.counters["hwc_requests_failed"] - before["hwc_requests_failed"]
            assert failed == entry["status"]
            assert [cqe_params(c).is_send_wq for c in cqes] == [1, 0]
        assert drv.send_request(GDMA_QUERY_MAX_RESOURCES)[0].status == 0  # the HWC still serves
    finally:
        bench.close()


def _random_wqe(data, bench: Bench, max_size: int) -> bytes:
    """A WQE whose header, OOB and SGEs are random, with every SGE address made harmless (see `safe_address`)."""
    params = WqeParams.from_int(data.draw(st.integers(0, 0xFFFFFFFF) | st.sampled_from([0x201, 0x601, 0x202]),
                                          label="params"))
    if data.draw(st.booleans(), label="plausible"):
        params.num_sgl_entries %= 4
        params.sgl_direct = 0
    size = data.draw(st.integers(1, max_size), label="wqe size")
    wqe = bytearray(WqeHeader(params=params).to_bytes() + data.draw(st.binary(min_size=size, max_size=size)))
    sgl = sgl_offset_from_code(params.inline_client_oob_size)
    for i in range(params.num_sgl_entries):
        at = sgl + 16 * i
        if at + 16 > len(wqe):
            break
        raw = int.from_bytes(wqe[at:at + 8], "little")
        wqe[at:at + 8] = bench.safe_address(raw).to_bytes(8, "little")
        wqe[at + 12:at + 16] = (int.from_bytes(wqe[at + 12:at + 16], "little") % 3000).to_bytes(4, "little")
    return bytes(wqe)


@SETTINGS
@given(data=st.data())
def test_random_wqes_complete_with_defined_types(mem, data):
    bench = Bench(mem)
    device, drv, vp = bench.device, bench.drv, bench.vport
    try:
        before = dict(device.counters)
        for _ in range(data.draw(st.integers(1, 6), label="wqes")):
            if data.draw(st.booleans(), label="tx"):
                vp.sq.put(_random_wqe(data, bench, 512))
                vp.sq.tail = (vp.sq.tail + 32 * data.draw(st.integers(-1, 1), label="tail skew")) & 0xFFFFFFFF
                drv.ring_wq(DB_SQ, vp.sq)
            else:
                vp.rq.put(_random_wqe(data, bench, 256))
                drv.ring_wq(DB_RQ, vp.rq, num_rwqe=1)
                size = data.draw(st.sampled_from([14, 60, 1500, 4000]), label="frame size")
                device.deliver(0, frame(vp.mac, PEER, 1, size))
        tx = []
        while (raw := vp.tx_cq.poll()) is not None:
            assert (cqe_params(raw).wq_number, cqe_params(raw).is_send_wq) == (vp.sq.id, 1)
            tx.append(ManaTxCompOob.from_bytes(raw).cqe_hdr.cqe_type)
        assert set(tx) <= {CQE_TX_OKAY, CQE_TX_GDMA_ERR, CQE_TX_MTU_DROP}
        c = device.counters
        assert c["frames_tx"] - before["frames_tx"] == tx.count(CQE_TX_OKAY)
        assert c["tx_errors"] - before["tx_errors"] == len(tx) - tx.count(CQE_TX_OKAY)
        assert device.sqs[vp.sq.id].pending == 0  # everything the device accepted was consumed and completed
        rx = []
        while (raw := vp.rx_cq.poll()) is not None:
            assert (cqe_params(raw).wq_number, cqe_params(raw).is_send_wq) == (vp.rq.id, 0)
            rx.append(ManaRxcompOob.from_bytes(raw).cqe_hdr.cqe_type)
        assert set(rx) <= {CQE_RX_OKAY, CQE_RX_TRUNCATED, CQE_INVALID}
        assert drv.send_request(GDMA_QUERY_MAX_RESOURCES)[0].status == 0
    finally:
        bench.close()


@SETTINGS
@given(writes=st.lists(st.tuples(st.integers(0, EMU_BAR0_SIZE + 16), st.binary(min_size=1, max_size=16)),
                       min_size=1, max_size=12))
def test_random_bar0_accesses_never_raise(mem, writes):
    """Writes anywhere in BAR0 (register map, SMC window, doorbells with random ids, tails and arm bits, the
    unused ranges) are handled or dropped; reads always return as many bytes as asked."""
    bench = Bench(mem)
    device = bench.device
    try:
        for offset, raw in writes:
            device.bar0.write(offset, raw)
            assert len(device.bar0.read(offset, len(raw))) == len(raw)
        COMMANDS["state"](device)  # the state is still describable
    finally:
        bench.close()
