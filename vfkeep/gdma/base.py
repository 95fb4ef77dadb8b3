"""ctypes bases shared by every wire definition.

`WireStruct` is a little-endian C-layout struct (natural alignment, spec §1)
with byte conversion; `BitfieldWord` is a struct of bitfields over one
integer whose fields pack from bit 0 upward, convertible to/from that int.
"""
from __future__ import annotations

import ctypes
from typing import Any, Self


class WireStruct(ctypes.LittleEndianStructure):
    """Base of every wire struct.

    Parse with `Cls.from_bytes(buf, offset=0)` (copy) or ctypes' own
    `Cls.from_buffer(writable_buf, offset)` (zero-copy view into guest memory);
    serialise with `to_bytes()`. Equality compares the wire bytes.
    """

    @classmethod
    def from_bytes(cls, data: Any, offset: int = 0) -> Self:
        """Copy `sizeof(cls)` bytes of `data` (any buffer) starting at `offset`."""
        return cls.from_buffer_copy(data, offset)

    def to_bytes(self) -> bytes:
        return bytes(self)

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and bytes(self) == bytes(other)

    __hash__ = None  # mutable

    def __repr__(self) -> str:
        parts = []
        for name, *_ in self._fields_:
            v = getattr(self, name)
            if isinstance(v, ctypes.Array):
                v = bytes(v).hex() if v._type_ is ctypes.c_uint8 else list(v)
            parts.append(f"{name}={v!r}")
        return f"{type(self).__name__}({', '.join(parts)})"


class BitfieldWord(WireStruct):
    """A u16/u32/u64 made of bitfields: `Cls(field=...)`, `Cls.from_int(v)`, `x.to_int()`.

    The constructor rejects values that do not fit their field (ctypes would
    silently truncate them, hiding id/tail overflows); plain attribute
    assignment after construction still truncates.
    """

    def __init__(self, *args: int, **kwargs: int) -> None:
        super().__init__(*args, **kwargs)
        names = [f[0] for f in self._fields_]
        for name, value in (*zip(names, args), *kwargs.items()):
            if getattr(self, name) != value:
                raise ValueError(
                    f"{type(self).__name__}.{name}={value!r} does not fit in {bit_width(type(self), name)} bits"
                )

    @classmethod
    def from_int(cls, value: int) -> Self:
        size = ctypes.sizeof(cls)
        if not 0 <= value < 1 << (8 * size):
            raise ValueError(f"{cls.__name__} value {value:#x} is not a {8 * size}-bit unsigned int")
        return cls.from_buffer_copy(value.to_bytes(size, "little"))

    def to_int(self) -> int:
        return int.from_bytes(bytes(self), "little")

    def __int__(self) -> int:
        return self.to_int()


def bit_position(cls: type[BitfieldWord], name: str) -> tuple[int, int]:
    """(lsb, width) of bitfield `name`, measured by setting it to all ones."""
    probe = cls.from_int(0)
    setattr(probe, name, -1)
    mask = probe.to_int()
    lsb = (mask & -mask).bit_length() - 1
    return lsb, mask.bit_count()


def bit_width(cls: type[BitfieldWord], name: str) -> int:
    return bit_position(cls, name)[1]


def struct_layout(cls: type[WireStruct]) -> dict[str, Any]:
    """`{"size", "fields": {name: {offset, size}}, "bitfields": {name: {bit, width}}}` of one struct."""
    fields: dict[str, dict[str, int]] = {}
    bitfields: dict[str, dict[str, int]] = {}
    for name, *_ in cls._fields_:
        if issubclass(cls, BitfieldWord):
            lsb, width = bit_position(cls, name)
            bitfields[name] = {"bit": lsb, "width": width}
        else:
            desc = getattr(cls, name)
            fields[name] = {"offset": desc.offset, "size": desc.size}
    return {"size": ctypes.sizeof(cls), "fields": fields, "bitfields": bitfields}


# Shorthands for field tables.
u8 = ctypes.c_uint8
u16 = ctypes.c_uint16
u32 = ctypes.c_uint32
u64 = ctypes.c_uint64


def bits(ty: type, *spec: tuple[str, int]) -> list[tuple[str, type, int]]:
    """Bitfield `_fields_` over integer type `ty` from (name, width) pairs, lsb first; widths must fill `ty`."""
    total = sum(w for _, w in spec)
    if total != 8 * ctypes.sizeof(ty):
        raise TypeError(f"bitfield widths sum to {total}, not {8 * ctypes.sizeof(ty)}")
    return [(name, ty, width) for name, width in spec]
