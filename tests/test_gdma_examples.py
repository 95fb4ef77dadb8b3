"""Worked examples of spec gdma.md and the pure helpers both peers use."""
import ctypes

import pytest

import vfkeep.gdma as gdma
from vfkeep.gdma import (
    CqEqDoorbellValue,
    EqeParams,
    EstablishHwc,
    GdmaDevId,
    HwcInitEqIdDb,
    HwcInitTypeData,
    SmcProtoHdr,
    WqDoorbellValue,
    WqeParams,
)


# §4.4
@pytest.mark.parametrize(
    "value, expected",
    [
        (WqDoorbellValue(id=24, num_rwqe=1, tail=32), 0x0000_0020_0100_0018),
        (CqEqDoorbellValue(id=24, tail=267, arm=0), 0x0000_010B_0000_0018),
        (CqEqDoorbellValue(id=24, tail=267, arm=1), 0x8000_010B_0000_0018),
    ],
)
def test_doorbell_examples(value, expected):
    assert value.to_int() == expected == int(value)
    assert type(value).from_int(expected) == value


def test_doorbell_addresses():
    # §4.1 with the reference emulator: zone 0x1000, page 0, shift 12
    shift = gdma.doorbell_shift(gdma.EMU_DB_PAGE_SIZE)
    assert shift == 12
    addr = [gdma.doorbell_address(gdma.EMU_DB_ZONE_OFFSET, 0, q, shift) for q in (gdma.DB_SQ, gdma.DB_RQ, gdma.DB_CQ, gdma.DB_EQ)]
    assert addr == [0x1000, 0x1400, 0x1800, 0x1FF8]
    assert gdma.doorbell_address(0x1000, 2, gdma.DB_CQ, 12) == 0x3800
    assert gdma.doorbell_page_count(gdma.EMU_BAR0_SIZE, gdma.EMU_DB_ZONE_OFFSET, shift) == gdma.EMU_DB_PAGE_COUNT
    with pytest.raises(ValueError, match="power of two"):
        gdma.doorbell_shift(3000)


def test_doorbell_tail_from_consumer_counter():
    # §4.2/§7.3: one-page EQ, 11 EQEs consumed -> tail 256 + 11
    assert gdma.cq_eq_doorbell_tail(4096 + 11 * 16, 4096, 16) == 267
    # modulo capacity x 8 (2048 entries for one page of EQEs)
    assert gdma.cq_eq_doorbell_tail(4096 * 8 + 16, 4096, 16) == 1


def test_unconsumed_entries():
    assert gdma.unconsumed_entries(267, 267, 256) == 0
    assert gdma.unconsumed_entries(267, 256, 256) == 11
    assert gdma.unconsumed_entries(1, 2047, 256) == 2  # wraps modulo 2048


# §7.2: the 11 bring-up EQEs: params dword and raw payload dword
BRINGUP = [
    (129, HwcInitEqIdDb(eq_id=24, doorbell=0), 0x00000018),
    (130, HwcInitTypeData(ty=1, value=24), 0x01000018),
    (130, HwcInitTypeData(ty=2, value=24), 0x02000018),
    (130, HwcInitTypeData(ty=3, value=24), 0x03000018),
    (130, HwcInitTypeData(ty=4, value=1), 0x04000001),
    (130, HwcInitTypeData(ty=5, value=4096), 0x05001000),
    (130, HwcInitTypeData(ty=6, value=4096), 0x06001000),
    (130, HwcInitTypeData(ty=7, value=128), 0x07000080),
    (130, HwcInitTypeData(ty=8, value=0), 0x08000000),
    (130, HwcInitTypeData(ty=9, value=0), 0x09000000),
    (131, None, 0x00000000),
]


@pytest.mark.parametrize("index", range(11))
def test_bringup_eqes(index):
    event_type, payload, raw = BRINGUP[index]
    assert gdma.EMU_HWC_INIT_EQE_COUNT == len(BRINGUP)
    # first pass over a 256-entry EQ: producer counter 256 + index -> owner 1
    owner = gdma.owner_count(256 + index, 256)
    assert owner == 1
    params = EqeParams(event_type=event_type, owner_count=owner)
    assert params.to_int() == 0x20000000 | event_type
    if payload is not None:
        assert payload.to_int() == raw
    eqe = gdma.Eqe(params=params)
    eqe.data[:4] = list(raw.to_bytes(4, "little"))
    wire = eqe.to_bytes()
    assert len(wire) == 16 and wire[15] >> gdma.OWNER_COUNT_SHIFT_IN_LAST_BYTE == 1
    parsed = gdma.Eqe.from_bytes(wire)
    assert parsed.params.event_type == event_type
    if event_type == gdma.GDMA_EQE_HWC_INIT_DATA:
        assert HwcInitTypeData.from_bytes(parsed.data) == payload
    # consumer side: byte counter of the same slot sees a new entry
    assert gdma.owner_state(wire[15], 4096 + 16 * index, 4096) == "new"


def test_bringup_params_first_example():
    assert EqeParams(event_type=gdma.GDMA_EQE_HWC_INIT_EQ_ID_DB, owner_count=1).to_int() == 0x20000081


def test_owner_counting():
    cap = 64
    assert [gdma.owner_count(t, cap) for t in (64, 127, 128, 7 * 64, 8 * 64, 9 * 64)] == [1, 1, 2, 7, 0, 1]
    q = 4096
    assert gdma.owner_state(0x00, q, q) == "empty"  # zeroed memory on the first pass
    assert gdma.owner_state(1 << 5, q, q) == "new"
    assert gdma.owner_state(2 << 5, q, q) == "overflow"
    assert gdma.owner_state(7 << 5, 8 * q, q) == "empty"  # cur 0 -> empty is 7
    assert gdma.owner_state(0x1F, q, q) == "empty"  # low bits are not owner bits


def test_smc_headers():
    establish = SmcProtoHdr(msg_type=gdma.SMC_MSG_TYPE_ESTABLISH_HWC, msg_version=gdma.SMC_MSG_TYPE_ESTABLISH_HWC_VERSION)
    assert establish.to_int() == 0x00000001
    destroy = SmcProtoHdr(msg_type=gdma.SMC_MSG_TYPE_DESTROY_HWC, msg_version=gdma.SMC_MSG_TYPE_DESTROY_HWC_VERSION)
    assert destroy.to_int() == 0x00000002
    report = SmcProtoHdr(msg_type=4, msg_version=gdma.SMC_MSG_TYPE_REPORT_HWC_TIMEOUT_VERSION)
    assert report.to_int() == 0x0000000C
    reply = SmcProtoHdr.from_int(0x00000001 | 1 << 7)
    assert (reply.is_response, reply.status, reply.owner_is_pf) == (1, 0, 0)
    assert SmcProtoHdr.from_int(0xFFFFFFFF).owner_is_pf == 1  # absent device reads all ones


def test_establish_hwc_pfn_packing():
    pfns = (0x1_2345_6789_ABCD, 0xF_0000_0000_0001, 0x42, 0xA_FFFF_FFFF_FFFF)
    msg = EstablishHwc.build(*pfns, msix=gdma.DRV_HWC_MSIX)
    raw = msg.to_bytes()
    assert len(raw) == 32
    assert raw[0:6] == (0x2345_6789_ABCD).to_bytes(6, "little")
    assert raw[18:24] == (0xFFFF_FFFF_FFFF).to_bytes(6, "little")
    high = int.from_bytes(raw[24:26], "little")
    assert high == 0x1 | 0xF << 4 | 0x0 << 8 | 0xA << 12
    assert int.from_bytes(raw[28:32], "little") == 0x00000001
    back = EstablishHwc.from_bytes(raw)
    assert back.pfns() == pfns
    assert back.addresses()[2] == 0x42 * 4096
    with pytest.raises(ValueError, match="52-bit"):
        EstablishHwc.build(1 << 52, 0, 0, 0)


def test_hwc_wqe_params():
    rwqe = WqeParams(num_sgl_entries=1, inline_client_oob_size=gdma.CLIENT_OOB_8)
    swqe = WqeParams(num_sgl_entries=1, inline_client_oob_size=gdma.CLIENT_OOB_24)
    assert rwqe.to_int() == gdma.DRV_HWC_RWQE_PARAMS == 0x201
    assert swqe.to_int() == gdma.DRV_HWC_SWQE_PARAMS == 0x601
    assert gdma.wqe_length_from_params(rwqe) == gdma.RWQE_SIZE == ctypes.sizeof(gdma.HwcRecvWqe)
    assert gdma.wqe_length_from_params(swqe) == gdma.DRV_HWC_SWQE_SIZE == ctypes.sizeof(gdma.HwcSendWqe)


def test_hwc_send_wqe_bytes():
    wqe = gdma.HwcSendWqe()
    wqe.header.params = WqeParams.from_int(gdma.DRV_HWC_SWQE_PARAMS)
    wqe.oob.flags3 = gdma.HwcTxOobFlags3(vscq_id=24)
    wqe.oob.flags4 = gdma.HwcTxOobFlags4(vsq_id=24)
    wqe.sge = gdma.Sge(address=0x5000, mem_key=0, size=40)
    raw = wqe.to_bytes()
    assert raw[4:8] == b"\x01\x06\x00\x00"
    assert raw[24:28] == (24).to_bytes(4, "little") and raw[28:32] == (24).to_bytes(4, "little")
    assert int.from_bytes(raw[32:40], "little") == 0x5000 and int.from_bytes(raw[44:48], "little") == 40


@pytest.mark.parametrize(
    "code, n, sgl, length",
    [
        (gdma.CLIENT_OOB_8, 1, 16, 32),
        (gdma.CLIENT_OOB_8, 2, 16, 64),
        (gdma.CLIENT_OOB_8, 15, 16, 256),  # MAX_RWQE_SIZE with 15 SGEs
        (gdma.CLIENT_OOB_8, 31, 16, 512),  # DRV_TX_MAX_SGE_SHORT_OOB
        (gdma.CLIENT_OOB_24, 1, 32, 64),
        (gdma.CLIENT_OOB_24, 30, 32, 512),  # DRV_TX_MAX_SGE_LONG_OOB
        (gdma.CLIENT_OOB_32, 1, 48, 64),
        (gdma.CLIENT_OOB_32, 2, 48, 96),
        (0, 1, 16, 32),  # unknown codes behave as code 2
        (5, 3, 16, 64),
    ],
)
def test_wqe_length_formula(code, n, sgl, length):
    assert gdma.sgl_offset_from_code(code) == sgl
    assert gdma.wqe_length(code, n) == length


def test_oob_and_sgl_constants():
    assert [gdma.oob_size_from_code(c) for c in (2, 6, 7, 1)] == [8, 24, 32, 8]
    assert [gdma.sgl_offset_from_code(c) for c in (2, 6, 7)] == [
        gdma.WQE_SGL_OFFSET_OOB8,
        gdma.WQE_SGL_OFFSET_OOB24,
        gdma.WQE_SGL_OFFSET_OOB32,
    ]
    assert gdma.wqe_length(gdma.CLIENT_OOB_8, gdma.DRV_TX_MAX_SGE_SHORT_OOB + 1) > gdma.MAX_SWQE_SIZE
    assert gdma.wqe_length(gdma.CLIENT_OOB_24, gdma.DRV_TX_MAX_SGE_LONG_OOB + 1) > gdma.MAX_SWQE_SIZE


@pytest.mark.parametrize(
    "code, req, resp",
    [
        (gdma.GDMA_QUERY_MAX_RESOURCES, 40, 72),
        (gdma.GDMA_VERIFY_VF_DRIVER_VERSION, 640, 72),
        (gdma.GDMA_LIST_DEVICES, 40, 296),
        (gdma.GDMA_REGISTER_DEVICE, 40, 44),
        (gdma.GDMA_DEREGISTER_DEVICE, 40, 32),
        (gdma.GDMA_CREATE_DMA_REGION, 192, 40),
        (gdma.GDMA_CREATE_QUEUE, 96, 36),
        (gdma.GDMA_DISABLE_QUEUE, 52, 32),
        (gdma.GDMA_GENERATE_TEST_EQE, 44, 32),
        (gdma.MANA_CONFIG_VPORT_RX, 1136, 32),
        (gdma.MANA_QUERY_DEV_CONFIG, 88, 80),
        (gdma.MANA_QUERY_STATS, 48, 248),
    ],
)
def test_message_sizes(code, req, resp):
    assert gdma.message_sizes(code) == (req, resp)


def test_message_sizes_unknown_code():
    with pytest.raises(KeyError, match="0x1a"):
        gdma.message_sizes(gdma.GDMA_DMA_REGION_ADD_PAGES)


def test_request_and_response_headers():
    hdr = gdma.request_header(gdma.MANA_QUERY_DEV_CONFIG, GdmaDevId(ty=2, instance=1), 0xABCD0001)
    raw = hdr.to_bytes()
    assert len(raw) == 40
    assert (hdr.req.msg_version, hdr.resp.msg_version) == (1, 4)
    assert (hdr.req.msg_type, hdr.resp.msg_type) == (0x20001, 0x20001)
    assert int.from_bytes(raw[32:36], "little") == 0x00010002
    assert gdma.is_device_specific(hdr.req.msg_type)
    assert not gdma.is_device_specific(gdma.GDMA_CREATE_QUEUE)
    move = gdma.request_header(gdma.MANA_VTL2_MOVE_FILTER, 0x00010002, 1)
    assert (move.req.msg_version, move.resp.msg_version) == (2, 1)
    sized = gdma.request_header(gdma.GDMA_CREATE_DMA_REGION, gdma.HWC_DEV_ID, 7, req_body_size=24 + 8 * 2)
    assert sized.req.msg_size == 80 and sized.dev_id.to_int() == 1
    resp = gdma.response_header(hdr, status=gdma.EMU_FAILURE_STATUS)
    assert resp.response == hdr.resp and resp.dev_id == hdr.dev_id
    assert (resp.activity_id, resp.status) == (0xABCD0001, 1)
    assert len(resp.to_bytes()) == 32


def test_dev_id_dwords():
    assert GdmaDevId.from_int(gdma.HWC_DEV_ID) == GdmaDevId(ty=gdma.HWC_DEV_ID_TY, instance=gdma.HWC_DEV_ID_INSTANCE)
    assert GdmaDevId(ty=gdma.GDMA_DEVICE_MANA, instance=gdma.EMU_MANA_DEV_INSTANCE).to_int() == 0x00010002


def test_indir_tab_offset_and_driver_composites():
    body = gdma.ManaCfgRxSteerReqDriver()
    body.req.indir_tab_offset = gdma.CFG_RX_INDIR_TAB_OFFSET
    body.req.rx_enable = gdma.TRISTATE_TRUE
    body.req.rss_enable = gdma.TRISTATE_UNKNOWN
    assert gdma.CFG_RX_INDIR_TAB_OFFSET == ctypes.sizeof(gdma.GdmaReqHdr) + ctypes.sizeof(gdma.ManaCfgRxSteerReq) == 112
    assert gdma.ManaCfgRxSteerReqDriver.indir_table.offset + ctypes.sizeof(gdma.GdmaReqHdr) == 112
    raw = body.to_bytes()
    assert raw[10:12] == b"\x70\x00" and raw[16:20] == b"\xff\xff\xff\xff"
    assert len(gdma.GdmaCreateDmaRegionReqDriver().page_addr_list) == gdma.DRV_DMA_REGION_MAX_PAGES


def test_capability_and_statistics_flags():
    assert gdma.DRV_GD_DRV_CAP_FLAGS1 == 0x08014068
    assert gdma.STATISTICS_FLAGS_ALL == 0x3FFFFFF == int(
        sum(gdma.StatisticsFlags)
    )
    # bit i selects the counter at response offset 8 * (i + 1)
    fields = [f[0] for f in gdma.ManaQueryStatisticsResponse._fields_]
    assert len(fields) == 27 and len(gdma.StatisticsFlags) == 26
    flags = gdma.BasicNicDriverFlags(query_filter_state=1)
    assert flags.to_int() == 4
    resp = gdma.ManaQueryDeviceCfgResp(pf_cap_flags1=flags)
    assert resp.to_bytes()[0] == 4


def test_tristate_and_enums():
    assert gdma.Tristate.UNKNOWN == 0xFFFFFFFF and gdma.TRISTATE_FALSE == 0
    assert gdma.GdmaRequestType(12) is gdma.GDMA_CREATE_QUEUE
    assert gdma.CqeType(42).name == "CQE_TX_GDMA_ERR"


def test_bitfield_constructor_rejects_overflow():
    with pytest.raises(ValueError, match="tail=2147483648 does not fit in 31 bits"):
        CqEqDoorbellValue(id=1, tail=1 << 31)
    with pytest.raises(ValueError, match="id"):
        WqDoorbellValue(id=-1)
    with pytest.raises(ValueError, match="64-bit"):
        CqEqDoorbellValue.from_int(1 << 64)


def test_tx_oob_and_completions():
    short = gdma.ManaTxShortOob(pkt_fmt=gdma.MANA_SHORT_PKT_FMT, vcq_num=25, vsq_frame=(25 >> 10) & 0x3FFF, short_vp_offset=0)
    assert short.to_int() == 25 << 8
    oob = gdma.ManaTxOob(s_oob=gdma.ManaTxShortOob(pkt_fmt=gdma.MANA_LONG_PKT_FMT), l_oob=gdma.ManaTxLongOob(long_vp_offset=0x123))
    raw = oob.to_bytes()
    assert raw[0] == 1 and int.from_bytes(raw[8:16], "little") == 0x123 << 48
    cqe = gdma.Cqe(params=gdma.CqeParams(wq_number=25, is_send_wq=1, owner_count=1))
    comp = gdma.ManaTxCompOob(cqe_hdr=gdma.ManaCqeHeader(cqe_type=gdma.CQE_TX_OKAY, client_type=gdma.MANA_CQE_COMPLETION))
    ctypes.memmove(cqe.data, comp.to_bytes(), ctypes.sizeof(comp))
    wire = cqe.to_bytes()
    assert wire[0] == 32 | 1 << 6 and wire[63] >> 5 == 1 and wire[60] == 25 and wire[63] & 1 == 1
    rx = gdma.ManaRxcompOob.from_bytes(gdma.Cqe.from_bytes(wire).data)
    assert rx.cqe_hdr.cqe_type == gdma.CQE_TX_OKAY
    rx.ppi[0].pkt_len = 1514
    assert rx.to_bytes()[8:10] == (1514).to_bytes(2, "little")


def test_smc_report_hwc_timeout():
    msg = gdma.SmcReportHwcTimeout(rq_tail=64, cq_next=4096 + 128)
    msg.flags_wait = gdma.SmcReportHwcTimeoutFlags(wait_ms=3500, interrupt_loss=1)
    msg.hdr = SmcProtoHdr(msg_type=gdma.SMC_MSG_TYPE_REPORT_HWC_TIMEOUT, msg_version=1)
    raw = msg.to_bytes()
    assert int.from_bytes(raw[24:28], "little") == 3500 | 1 << 25
    assert int.from_bytes(raw[28:32], "little") == 0x0C


def test_repr_is_readable():
    text = repr(gdma.RegMap(vf_db_page_sz=4096))
    assert text.startswith("RegMap(") and "vf_db_page_sz=4096" in text
    assert "mac_addr='000000000000'" in repr(gdma.ManaQueryVportCfgResp())
