"""Queue entries (§6): WQE/SGE, CQE, EQE with their bitfields and EQE payloads, plus ring arithmetic."""
from __future__ import annotations

from typing import Literal

from .base import BitfieldWord, WireStruct, bits, u8, u32, u64
from .constants import (
    CLIENT_OOB_24,
    CLIENT_OOB_32,
    OWNER_BITS,
    OWNER_COUNT_SHIFT_IN_LAST_BYTE,
    OWNER_MASK,
    WQE_ALIGNMENT,
    WQE_MAX_SIZE,
)


class WqeParams(BitfieldWord):
    """§6.2: dword 1 of the WQE header; `inline_client_oob_size` is an `OobSizeCode`."""

    _fields_ = bits(
        u32,
        ("num_sgl_entries", 8),
        ("inline_client_oob_size", 3),
        ("client_oob_in_sgl", 1),
        ("reserved", 4),
        ("gd_client_unit_data", 14),
        ("reserved2", 1),
        ("sgl_direct", 1),
    )


class WqeHeader(WireStruct):
    """§6.2: first 8 bytes of every WQE; the driver writes it last."""

    _fields_ = [("reserved", u8 * 3), ("last_vbytes", u8), ("params", WqeParams)]


class Wqe(WireStruct):
    """§6.2: the largest WQE (512 bytes): header + 504 bytes of OOB, padding and SGL."""

    _fields_ = [("header", WqeHeader), ("data", u8 * (WQE_MAX_SIZE - 8))]


class Sge(WireStruct):
    """§6.2: one scatter-gather entry."""

    _fields_ = [("address", u64), ("mem_key", u32), ("size", u32)]


def oob_size_from_code(code: int) -> int:
    """OOB bytes for an `inline_client_oob_size` code; unknown codes count as 8 (§6.2)."""
    return {CLIENT_OOB_24: 24, CLIENT_OOB_32: 32}.get(code, 8)


def round_up(value: int, align: int) -> int:
    return -(-value // align) * align


def sgl_offset_from_code(code: int) -> int:
    """WQE offset of the first SGE: the 16-byte boundary at or after 8 + OOB bytes (16, 32 or 48)."""
    return round_up(8 + oob_size_from_code(code), 16)


def wqe_length(code: int, num_sge: int) -> int:
    """WQE bytes with `num_sge` SGEs: round_up(sgl_offset + 16 n, 32) (§6.2)."""
    return round_up(sgl_offset_from_code(code) + 16 * num_sge, WQE_ALIGNMENT)


def wqe_length_from_params(params: WqeParams) -> int:
    """WQE bytes a device must fetch for a header's `params` (SGL-direct WQEs are not sized here)."""
    return wqe_length(params.inline_client_oob_size, params.num_sgl_entries)


class CqeParams(BitfieldWord):
    """§6.3: last dword of a CQE; `owner_count` is the phase (§6.5)."""

    _fields_ = bits(
        u32,
        ("wq_number", 24),
        ("is_send_wq", 1),
        ("cmpln", 1),
        ("reserved", 3),
        ("owner_count", OWNER_BITS),
    )


class Cqe(WireStruct):
    """§6.3: 64-byte completion; `data` holds `HwcRxOob` / `ManaTxCompOob` / `ManaRxcompOob`."""

    _fields_ = [("data", u8 * 60), ("params", CqeParams)]


class EqeParams(BitfieldWord):
    """§6.4: last dword of an EQE; `event_type` is a `GdmaEqeType`."""

    _fields_ = bits(u32, ("event_type", 8), ("reserved", 8), ("reserved2", 13), ("owner_count", OWNER_BITS))


class Eqe(WireStruct):
    """§6.4: 16-byte event; `data` holds one of the payloads below (or zeros)."""

    _fields_ = [("data", u8 * 12), ("params", EqeParams)]


class EqeCompletionData(BitfieldWord):
    """§6.4 payload of `GDMA_EQE_COMPLETION`: the CQ that got a CQE."""

    _fields_ = bits(u32, ("cq_id", 24), ("reserved", 8))


class EqeVfReset(BitfieldWord):
    """§6.4 payload of `GDMA_EQE_HWC_RESET_REQUEST` (also `GdmaGenerateResetEventReq.data`)."""

    _fields_ = bits(u32, ("revoke_vtl0_vf", 1), ("reserved1", 7), ("reserved2", 24))


class EqeDataReconfig(WireStruct):
    """§6.4 payload of `GDMA_EQE_HWC_RECONFIG_DATA`: `data` is a 24-bit little-endian value."""

    _fields_ = [("data", u8 * 3), ("data_type", u8), ("reserved1", u8 * 8)]


def owner_count(counter: int, capacity: int) -> int:
    """Producer side (§6.5): owner bits for the entry written at entry counter `counter` (starts at `capacity`)."""
    return (counter // capacity) & OWNER_MASK


OwnerState = Literal["empty", "new", "overflow"]


def owner_state(last_byte: int, next_offset: int, queue_bytes: int) -> OwnerState:
    """Consumer side (§6.5): classify the slot at byte counter `next_offset` (starts at `queue_bytes`) by its last byte."""
    cur = (next_offset // queue_bytes) & OWNER_MASK
    owner = (last_byte >> OWNER_COUNT_SHIFT_IN_LAST_BYTE) & OWNER_MASK
    if owner == (cur - 1) & OWNER_MASK:
        return "empty"
    if owner == cur:
        return "new"
    return "overflow"


def cq_eq_doorbell_tail(next_offset: int, queue_bytes: int, entry_size: int) -> int:
    """`CqEqDoorbellValue.tail` for a consumer byte counter (§4.2): (next mod (bytes × 8)) / entry_size."""
    return (next_offset % (queue_bytes * 8)) // entry_size


def unconsumed_entries(device_tail: int, doorbell_tail: int, capacity: int) -> int:
    """Device side of an armed CQ/EQ doorbell (§4.2): n = (device_tail − tail) mod (capacity × 8).

    0 → arm; 1..capacity → notify now; > capacity → overflow, ignore.
    """
    return (device_tail - doorbell_tail) % (capacity * 8)


__all__ = [
    "WqeParams", "WqeHeader", "Wqe", "Sge", "oob_size_from_code", "round_up", "sgl_offset_from_code",
    "wqe_length", "wqe_length_from_params", "CqeParams", "Cqe", "EqeParams", "Eqe", "EqeCompletionData",
    "EqeVfReset", "EqeDataReconfig", "owner_count", "owner_state", "cq_eq_doorbell_tail", "unconsumed_entries",
    "OwnerState",
]
