"""Precompiled codecs for the data path, derived from the ctypes wire structs (which stay the reference).

Building a ctypes object per WQE, CQE or doorbell costs more than the rest of a frame's work, so the data
path packs and unpacks queue entries with `struct` formats and shift/mask arithmetic instead. None of it is
written by hand: byte offsets come from the ctypes field descriptors (`field_span`), bit positions from
probing the ctypes bitfield words (`Bits`), so a layout change in `queues`/`datapath`/`regs` moves the codecs
with it; tests check every codec against the ctypes structs field by field.

- `Bits(cls)`: `pack(**fields) -> int`, `unpack(word) -> dict`, `get(word, name)`, and `shift`/`mask`
  per field for inner loops.
- `record(size, *spans)`: a little-endian `struct.Struct` holding the given `(offset, size)` fields in
  order with padding in between, e.g. the three fields of an RX completion the device fills in.
- `record_dtype(size, **spans)`: the same layout as a numpy structured dtype with named fields, for a batch of
  entries packed as one array (a column per field) instead of a record per entry.
- Named instances below: what the device and driver data paths read and write per frame or per batch.
"""
from __future__ import annotations

import ctypes
import struct

import numpy as np

from .base import BitfieldWord, WireStruct, bit_position
from .datapath import ManaCqeHeader, ManaRxcompOob, ManaTxLongOob, ManaTxOob, ManaTxShortOob
from .queues import Cqe, CqeParams, Eqe, EqeCompletionData, EqeParams, Sge, WqeHeader, WqeParams
from .regs import CqEqDoorbellValue, WqDoorbellValue

_FORMATS = {1: "B", 2: "H", 4: "I", 8: "Q"}


def field_span(cls: type[WireStruct], path: str, base: int = 0) -> tuple[int, int]:
    """(byte offset, size) of field `path` in `cls`, plus `base`: dotted names, array indexes as numbers
    (`"ppi.0.pkt_len"`). A bitfield word counts as one field (its whole integer)."""
    offset, ty = base, cls
    for part in path.split("."):
        if part.isdigit():
            ty = ty._type_  # array element
            offset += int(part) * ctypes.sizeof(ty)
        else:
            offset += getattr(ty, part).offset
            ty = next(t for name, t, *_ in ty._fields_ if name == part)
    return offset, ctypes.sizeof(ty)


def record(size: int | None, *spans: tuple[int, int]) -> struct.Struct:
    """Little-endian struct of `size` bytes (None: up to the last field) holding unsigned fields at the given
    `(offset, size)` spans, in order; widths other than 1/2/4/8 bytes are byte strings."""
    fmt, pos = "<", 0
    for off, n in spans:
        if off < pos:
            raise ValueError(f"field at {off} overlaps or precedes the previous one ending at {pos}")
        fmt += (f"{off - pos}x" if off > pos else "") + _FORMATS.get(n, f"{n}s")
        pos = off + n
    if size is not None:
        if size < pos:
            raise ValueError(f"fields end at {pos}, beyond the record size {size}")
        fmt += f"{size - pos}x" if size > pos else ""
    return struct.Struct(fmt)


def record_dtype(size: int, **spans: tuple[int, int]) -> np.dtype:
    """Little-endian numpy structured dtype of `size` bytes with unsigned fields named as given, at their
    `(offset, size)` spans (1, 2, 4 or 8 bytes); the bytes in between are zero in `np.zeros` arrays of it."""
    if max(off + n for off, n in spans.values()) > size:
        raise ValueError(f"fields end beyond the record size {size}")
    return np.dtype({"names": list(spans), "formats": [f"<u{n}" for _, n in spans.values()],
                     "offsets": [off for off, _ in spans.values()], "itemsize": size})


class Bits:
    """Shift/mask codec of one `BitfieldWord`, with every field's position measured from the ctypes class."""

    def __init__(self, cls: type[BitfieldWord]):
        self.cls = cls
        self.fields = {name: bit_position(cls, name) for name, *_ in cls._fields_}
        self.shift = {name: lsb for name, (lsb, _) in self.fields.items()}
        self.mask = {name: (1 << width) - 1 for name, (_, width) in self.fields.items()}

    def pack(self, **values: int) -> int:
        """The word with the given fields (others 0); a value that does not fit raises ValueError."""
        word = 0
        for name, value in values.items():
            mask = self.mask[name]
            if not 0 <= value <= mask:
                raise ValueError(f"{self.cls.__name__}.{name}={value} does not fit in {mask.bit_length()} bits")
            word |= value << self.shift[name]
        return word

    def get(self, word: int, name: str) -> int:
        return word >> self.shift[name] & self.mask[name]

    def unpack(self, word: int) -> dict[str, int]:
        return {name: word >> self.shift[name] & self.mask[name] for name in self.fields}


# -- bitfield words ------------------------------------------------------------------------------------
WQE_PARAMS = Bits(WqeParams)
CQE_PARAMS = Bits(CqeParams)
EQE_PARAMS = Bits(EqeParams)
CQE_HDR = Bits(ManaCqeHeader)
EQE_COMPLETION_DATA = Bits(EqeCompletionData)
TX_SHORT_OOB = Bits(ManaTxShortOob)
TX_LONG_OOB = Bits(ManaTxLongOob)
CQ_EQ_DOORBELL = Bits(CqEqDoorbellValue)
WQ_DOORBELL = Bits(WqDoorbellValue)

# -- records -----------------------------------------------------------------------------------------
CQE_SIZE = ctypes.sizeof(Cqe)
EQE_SIZE = ctypes.sizeof(Eqe)
#: Byte offset of the WQE header's params dword (num SGEs, OOB size code, ...).
WQE_PARAMS_AT = field_span(WqeHeader, "params")[0]
#: Byte offset of `size` inside an SGE (the driver rewrites only the length per frame).
SGE_SIZE_AT = field_span(Sge, "size")[0]
#: Long-form TX OOB as its two words (`ManaTxShortOob`, `ManaTxLongOob`).
TX_OOB = record(None, field_span(ManaTxOob, "s_oob"), field_span(ManaTxOob, "l_oob"))
#: A whole CQE: 60 data bytes and the params dword.
CQE = record(CQE_SIZE, field_span(Cqe, "data"), field_span(Cqe, "params"))
_DATA = field_span(Cqe, "data")[0]
_RX_CQE_SPANS = {"cqe_hdr": field_span(ManaRxcompOob, "cqe_hdr", _DATA),
                 "pkt_len": field_span(ManaRxcompOob, "ppi.0.pkt_len", _DATA),
                 "rx_wqe_offset": field_span(ManaRxcompOob, "rx_wqe_offset", _DATA),
                 "params": field_span(Cqe, "params")}
#: RX completion CQE as the device writes it: cqe_hdr, ppi[0].pkt_len, rx_wqe_offset, params.
RX_CQE = record(CQE_SIZE, *_RX_CQE_SPANS.values())
#: `RX_CQE` as a numpy dtype: a batch of RX completions packed as columns.
RX_CQE_DTYPE = record_dtype(CQE_SIZE, **_RX_CQE_SPANS)
#: A completion EQE: its payload (`EqeCompletionData` word) and params.
EQE_COMPLETION = record(EQE_SIZE, (field_span(Eqe, "data")[0], ctypes.sizeof(EqeCompletionData)),
                        field_span(Eqe, "params"))
#: Bit position of the owner count in the last dword of CQEs and EQEs (§6.5), and in their last byte.
OWNER_SHIFT = CQE_PARAMS.shift["owner_count"]
assert OWNER_SHIFT == EQE_PARAMS.shift["owner_count"] and OWNER_SHIFT >= 24
OWNER_SHIFT_IN_LAST_BYTE = OWNER_SHIFT - 24


__all__ = [
    "Bits", "field_span", "record", "record_dtype", "RX_CQE_DTYPE", "WQE_PARAMS", "CQE_PARAMS", "EQE_PARAMS", "CQE_HDR", "EQE_COMPLETION_DATA",
    "TX_SHORT_OOB", "TX_LONG_OOB", "CQ_EQ_DOORBELL", "WQ_DOORBELL", "CQE_SIZE", "EQE_SIZE", "WQE_PARAMS_AT",
    "SGE_SIZE_AT", "TX_OOB", "CQE", "RX_CQE", "EQE_COMPLETION", "OWNER_SHIFT",
    "OWNER_SHIFT_IN_LAST_BYTE",
]
