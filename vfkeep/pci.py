"""PCI function identity of the emulated devices: the type-0 configuration header and the MSI-X BAR.

One builder for every device model (MANA VF, NVMe controller, the vfio-user test device). Only what
a driver touches is writable: the command register, the address bits of the 64-bit memory BARs (so
sizing a BAR by writing all ones reads back its size) and the MSI-X enable/function-mask bits. With
vfio-user the vectors are delivered through eventfds, so the MSI-X table is plain storage and the
pending-bit array reads zero.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

CONFIG_SIZE = 256
MSIX_CAP_OFFSET = 0x40
_MSIX_CAP_ID = 0x11
_STATUS_CAP_LIST = 0x10
_BAR_MEM64 = 0x4
_COMMAND_WRITABLE = 0x0546  # memory space, bus master, parity, SERR, INTx disable
_MSIX_CONTROL_WRITABLE = 0xC000  # enable, function mask


@dataclass(frozen=True)
class Msix:
    """The MSI-X capability: `vectors` in BAR `bar`, table at offset 0, pending-bit array at `pba_offset`."""

    bar: int
    vectors: int
    pba_offset: int


class ConfigSpace:
    """256-byte type-0 header with a write mask. `class_code` is the 24-bit base class / subclass /
    programming interface; `bars` maps a BAR index to the size of its 64-bit memory BAR."""

    def __init__(self, vendor_id: int, device_id: int, *, class_code: int, revision: int = 0,
                 subsystem_vendor_id: int = 0, subsystem_id: int = 0, bars: dict[int, int] | None = None,
                 msix: Msix | None = None) -> None:
        cs = self.data = bytearray(CONFIG_SIZE)
        mask = self.mask = bytearray(CONFIG_SIZE)
        struct.pack_into("<HHHH", cs, 0x00, vendor_id, device_id, 0, _STATUS_CAP_LIST if msix else 0)
        struct.pack_into("<I", cs, 0x08, (class_code << 8) | revision)
        struct.pack_into("<HH", cs, 0x2C, subsystem_vendor_id, subsystem_id)
        if msix is not None:
            cs[0x34] = MSIX_CAP_OFFSET
            struct.pack_into("<BBHII", cs, MSIX_CAP_OFFSET, _MSIX_CAP_ID, 0, msix.vectors - 1, msix.bar,
                             msix.pba_offset | msix.bar)
            struct.pack_into("<H", mask, MSIX_CAP_OFFSET + 2, _MSIX_CONTROL_WRITABLE)
        if bars:  # a function without BARs has no memory space or DMA to enable
            struct.pack_into("<H", mask, 0x04, _COMMAND_WRITABLE)
        for index, size in (bars or {}).items():
            struct.pack_into("<II", cs, 0x10 + 4 * index, _BAR_MEM64, 0)
            struct.pack_into("<II", mask, 0x10 + 4 * index, ~(size - 1) & 0xFFFFFFF0, 0xFFFFFFFF)

    def read(self, offset: int, size: int) -> bytes:
        return bytes(self.data[offset:offset + size])

    def write(self, offset: int, data: bytes) -> None:
        for i, b in enumerate(data, offset):
            m = self.mask[i]
            self.data[i] = (self.data[i] & ~m) | (b & m)


class MsixBar:
    """The MSI-X BAR: table storage (16 bytes per vector) at 0; the rest, the pending-bit array, reads zero."""

    def __init__(self, vectors: int, size: int) -> None:
        self.table_bytes = vectors * 16
        self.data = bytearray(size)

    def read(self, offset: int, size: int) -> bytes:
        return bytes(self.data[offset:offset + size])

    def write(self, offset: int, data: bytes) -> None:
        end = min(offset + len(data), self.table_bytes)
        if offset < end:
            self.data[offset:end] = data[:end - offset]


__all__ = ["CONFIG_SIZE", "MSIX_CAP_OFFSET", "ConfigSpace", "Msix", "MsixBar"]
