"""The data path's precompiled codecs (`vfkeep.gdma.codec`) equal the ctypes wire structs, field by field.

Property-based: random words and field values through both, for every bitfield word of the wire formats
and every record the data path packs or unpacks.
"""
import ctypes
import types

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import vfkeep.gdma as gdma
from vfkeep.gdma import codec
from vfkeep.driver import datapath
from vfkeep.gdma.base import BitfieldWord, bit_position

BITFIELD_WORDS = sorted((name, cls) for name, cls in gdma.WIRE_STRUCTS.items() if issubclass(cls, BitfieldWord))
CODEC_BITS = {name: obj for name, obj in vars(codec).items() if isinstance(obj, codec.Bits)}


def u(bits: int):
    return st.integers(0, (1 << bits) - 1)


def field_values(cls):
    """Strategy: a dict giving every field of bitfield word `cls` a value that fits."""
    return st.fixed_dictionaries({name: u(bit_position(cls, name)[1]) for name, *_ in cls._fields_})


@pytest.mark.parametrize("name,cls", BITFIELD_WORDS)
@given(data=st.data())
def test_bits_unpack_and_pack_equal_ctypes(name, cls, data):
    bits = codec.Bits(cls)
    word = data.draw(u(8 * ctypes.sizeof(cls)))
    ref = cls.from_int(word)
    assert bits.unpack(word) == {f: getattr(ref, f) for f, *_ in cls._fields_}
    for f, *_ in cls._fields_:
        assert bits.get(word, f) == getattr(ref, f)
    values = data.draw(field_values(cls))
    assert bits.pack(**values) == cls(**values).to_int()


def test_codec_bit_instances_cover_the_data_path_words():
    assert {b.cls.__name__ for b in CODEC_BITS.values()} == {
        "WqeParams", "CqeParams", "EqeParams", "ManaCqeHeader", "EqeCompletionData", "ManaTxShortOob",
        "ManaTxLongOob", "CqEqDoorbellValue", "WqDoorbellValue"}


def test_bits_pack_rejects_values_that_do_not_fit():
    with pytest.raises(ValueError, match="num_sgl_entries=256 does not fit in 8 bits"):
        codec.WQE_PARAMS.pack(num_sgl_entries=256)


@given(raw=st.binary(min_size=16, max_size=16))
def test_sge_size_offset(raw):
    ref = gdma.Sge.from_bytes(raw)
    assert int.from_bytes(raw[codec.SGE_SIZE_AT:codec.SGE_SIZE_AT + 4], "little") == ref.size


@given(raw=st.binary(min_size=8, max_size=8))
def test_wqe_params_offset(raw):
    ref = gdma.WqeHeader.from_bytes(raw)
    assert int.from_bytes(raw[codec.WQE_PARAMS_AT:codec.WQE_PARAMS_AT + 4], "little") == ref.params.to_int()


@given(raw=st.binary(min_size=24, max_size=24))
def test_tx_oob_words(raw):
    ref = gdma.ManaTxOob.from_bytes(raw)
    assert codec.TX_OOB.unpack_from(raw) == (ref.s_oob.to_int(), ref.l_oob.to_int())


@given(data=st.binary(min_size=60, max_size=60), params=field_values(gdma.CqeParams))
def test_cqe(data, params):
    p = codec.CQE_PARAMS.pack(**params)
    ref = gdma.Cqe(params=gdma.CqeParams(**params))
    ref.data[:] = data
    assert codec.CQE.pack(data, p) == ref.to_bytes()
    assert codec.CQE.unpack(ref.to_bytes()) == (data, p)


@given(hdr=field_values(gdma.ManaCqeHeader), pkt_len=u(16), wqe_offset=u(32), params=field_values(gdma.CqeParams),
       raw=st.binary(min_size=64, max_size=64))
def test_rx_completion(hdr, pkt_len, wqe_offset, params, raw):
    oob = gdma.ManaRxcompOob(cqe_hdr=gdma.ManaCqeHeader(**hdr), rx_wqe_offset=wqe_offset)
    oob.ppi[0].pkt_len = pkt_len
    ref = gdma.Cqe(params=gdma.CqeParams(**params))
    ref.data[:] = oob.to_bytes()
    packed = codec.RX_CQE.pack(codec.CQE_HDR.pack(**hdr), pkt_len, wqe_offset, codec.CQE_PARAMS.pack(**params))
    assert packed == ref.to_bytes()
    got = gdma.ManaRxcompOob.from_bytes(raw)
    assert codec.RX_CQE.unpack(raw) == (got.cqe_hdr.to_int(), got.ppi[0].pkt_len, got.rx_wqe_offset,
                                        gdma.Cqe.from_bytes(raw).params.to_int())


@given(cqes=st.lists(st.tuples(field_values(gdma.ManaCqeHeader), u(16), u(32), field_values(gdma.CqeParams)),
                    max_size=8))
def test_rx_completions_as_numpy_columns(cqes):
    """A batch of RX completions packed as one structured array (`RX_CQE_DTYPE`) equals the ctypes CQEs."""
    arr = np.zeros(len(cqes), codec.RX_CQE_DTYPE)
    refs = []
    for i, (hdr, pkt_len, wqe_offset, params) in enumerate(cqes):
        arr[i] = (codec.CQE_HDR.pack(**hdr), pkt_len, wqe_offset, codec.CQE_PARAMS.pack(**params))
        oob = gdma.ManaRxcompOob(cqe_hdr=gdma.ManaCqeHeader(**hdr), rx_wqe_offset=wqe_offset)
        oob.ppi[0].pkt_len = pkt_len
        ref = gdma.Cqe(params=gdma.CqeParams(**params))
        ref.data[:] = oob.to_bytes()
        refs.append(ref.to_bytes())
    assert arr.tobytes() == b"".join(refs)


def test_record_dtype_rejects_fields_beyond_the_size():
    with pytest.raises(ValueError, match="beyond"):
        codec.record_dtype(4, a=(2, 4))


CQ_SLOTS = 16


@given(cqes=st.lists(st.binary(min_size=64, max_size=64), min_size=CQ_SLOTS, max_size=CQ_SLOTS),
       first=st.integers(0, CQ_SLOTS - 1), n=st.integers(1, CQ_SLOTS))
def test_driver_reads_completions_as_strided_columns_as_ctypes_reads_them(cqes, first, n):
    """The driver reads the fields of a batch of CQEs as strided columns of the CQ (`_cqe_columns`), also for
    a batch that wraps around the ring end: TX cqe_hdr, RX cqe_hdr and ppi[0].pkt_len equal the ctypes
    structs' fields, CQE by CQE."""
    ring = memoryview(bytearray(b"".join(cqes)))
    offsets = [(first + i) % CQ_SLOTS * 64 for i in range(n)]
    data = [bytes(gdma.Cqe.from_bytes(ring, o).data) for o in offsets]
    rx = [gdma.ManaRxcompOob.from_bytes(d) for d in data]
    path = types.SimpleNamespace(_rx_cq_words=ring.cast("I"), _rx_cq_halves=ring.cast("H"),
                                 _cqe_columns=datapath.VportDataPath._cqe_columns)
    assert datapath.VportDataPath._rx_completions(path, offsets) == ([r.cqe_hdr.to_int() for r in rx],
                                                                     [r.ppi[0].pkt_len for r in rx])
    assert datapath.VportDataPath._cqe_columns(ring.cast("I"), offsets, datapath._TX_HDR_AT) == \
        [gdma.ManaTxCompOob.from_bytes(d).cqe_hdr.to_int() for d in data]


@given(cq_id=u(24), params=field_values(gdma.EqeParams))
def test_completion_eqe(cq_id, params):
    ref = gdma.Eqe(params=gdma.EqeParams(**params))
    payload = gdma.EqeCompletionData(cq_id=cq_id).to_bytes()
    ref.data[:len(payload)] = payload
    word = codec.EQE_COMPLETION_DATA.pack(cq_id=cq_id)
    assert codec.EQE_COMPLETION.pack(word, codec.EQE_PARAMS.pack(**params)) == ref.to_bytes()


def test_owner_bits_sit_in_the_last_byte_of_cqes_and_eqes():
    for cls, params in ((gdma.Cqe, gdma.CqeParams), (gdma.Eqe, gdma.EqeParams)):
        entry = cls(params=params(owner_count=5))
        assert entry.to_bytes()[-1] >> codec.OWNER_SHIFT_IN_LAST_BYTE == 5
        assert entry.params.to_int() >> codec.OWNER_SHIFT == 5


def test_record_rejects_overlaps_and_short_sizes():
    with pytest.raises(ValueError, match="overlaps"):
        codec.record(None, (0, 4), (2, 2))
    with pytest.raises(ValueError, match="beyond the record size"):
        codec.record(4, (0, 8))
