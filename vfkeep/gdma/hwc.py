"""HWC channel (§7, §8): bring-up EQE payloads, HWC WQE OOBs, message headers, HWC WQE shapes."""
from __future__ import annotations

from .base import BitfieldWord, WireStruct, bits, u8, u16, u32, u64
from .queues import Sge, WqeHeader


class HwcInitEqIdDb(BitfieldWord):
    """§6.4 payload of `GDMA_EQE_HWC_INIT_EQ_ID_DB`: HWC EQ id and the doorbell page of all HWC queues."""

    _fields_ = bits(u32, ("eq_id", 16), ("doorbell", 16))


class HwcInitTypeData(BitfieldWord):
    """§6.4 payload of `GDMA_EQE_HWC_INIT_DATA`: `ty` is an `HwcInitDataType`."""

    _fields_ = bits(u32, ("value", 24), ("ty", 8))


class HwcTxOobFlags1(BitfieldWord):
    _fields_ = bits(u32, ("vrq_id", 24), ("dest_vfid", 8))


class HwcTxOobFlags2(BitfieldWord):
    _fields_ = bits(u32, ("vrcq_id", 24), ("reserved", 8))


class HwcTxOobFlags3(BitfieldWord):
    """`vscq_id` must be the HWC CQ id (the device treats a mismatch as fatal)."""

    _fields_ = bits(u32, ("vscq_id", 24), ("loopback", 1), ("lso_override", 1), ("dest_pf", 1), ("reserved", 5))


class HwcTxOobFlags4(BitfieldWord):
    """`vsq_id` must be the HWC SQ id."""

    _fields_ = bits(u32, ("vsq_id", 24), ("reserved", 8))


class HwcTxOob(WireStruct):
    """§7.4: 24-byte OOB of the HWC send WQE (OOB code 6)."""

    _fields_ = [
        ("reserved", u64),
        ("flags1", HwcTxOobFlags1),
        ("flags2", HwcTxOobFlags2),
        ("flags3", HwcTxOobFlags3),
        ("flags4", HwcTxOobFlags4),
    ]


class HwcRxOobFlags(BitfieldWord):
    _fields_ = bits(
        u64,
        ("ty", 6),
        ("eom", 1),
        ("som", 1),
        ("vendor_err", 8),
        ("reserved1", 16),
        ("src_virt_wq", 24),
        ("src_vfid", 8),
    )


class HwcRxOob(WireStruct):
    """§7.4: `Cqe.data` of an HWC RQ completion; `tx_oob_data_size` = 32 + response body bytes."""

    _fields_ = [
        ("flags", HwcRxOobFlags),
        ("reserved2", u32),
        ("wqe_addr_low_or_offset", u32),
        ("wqe_addr_high", u32),
        ("client_data_unit", u32),
        ("tx_oob_data_size", u32),
        ("chunk_offset", u32),
    ]


class HwcSendWqe(WireStruct):
    """Appendix A: HWC send WQE (64 bytes, params `DRV_HWC_SWQE_PARAMS`); SGE covers the request page.

    `padding` (not named by the spec) fills the WQE to its 32-byte-aligned length.
    """

    _fields_ = [("header", WqeHeader), ("oob", HwcTxOob), ("sge", Sge), ("padding", u8 * 16)]


class HwcRecvWqe(WireStruct):
    """Appendix A: HWC receive WQE (32 bytes, params `DRV_HWC_RWQE_PARAMS`); SGE covers the response page."""

    _fields_ = [("header", WqeHeader), ("oob_unused", u8 * 8), ("sge", Sge)]


class GdmaMsgHdr(WireStruct):
    """§8.1: `msg_size` counts the whole message, header included."""

    _fields_ = [
        ("hdr_type", u32),
        ("msg_type", u32),
        ("msg_version", u16),
        ("hwc_msg_id", u16),
        ("msg_size", u32),
    ]


class GdmaDevId(WireStruct):
    """§8.1/§9.2: `{ty, instance}`; also usable as its dword via `from_int`/`to_int` (HWC = 0x00000001)."""

    _fields_ = [("ty", u16), ("instance", u16)]

    @classmethod
    def from_int(cls, value: int) -> GdmaDevId:
        return cls.from_buffer_copy(value.to_bytes(4, "little"))

    def to_int(self) -> int:
        return int.from_bytes(bytes(self), "little")


class GdmaReqHdr(WireStruct):
    """§8.1: starts every request; `resp` describes the response the driver expects."""

    _fields_ = [("req", GdmaMsgHdr), ("resp", GdmaMsgHdr), ("dev_id", GdmaDevId), ("activity_id", u32)]


class GdmaRespHdr(WireStruct):
    """§8.1: starts every response; the body follows at offset 32."""

    _fields_ = [
        ("response", GdmaMsgHdr),
        ("dev_id", GdmaDevId),
        ("activity_id", u32),
        ("status", u32),
        ("reserved", u32),
    ]


__all__ = [
    "HwcInitEqIdDb", "HwcInitTypeData", "HwcTxOobFlags1", "HwcTxOobFlags2", "HwcTxOobFlags3", "HwcTxOobFlags4",
    "HwcTxOob", "HwcRxOobFlags", "HwcRxOob", "HwcSendWqe", "HwcRecvWqe", "GdmaMsgHdr", "GdmaDevId",
    "GdmaReqHdr", "GdmaRespHdr",
]
