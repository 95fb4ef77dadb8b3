"""PCI identity of the emulated MANA VF (spec gdma.md §2): config space (vfio-user region 7) and BAR4.

Type-0 header with the reference emulator's ids, two 64-bit memory BARs
(BAR0 registers, BAR4 MSI-X table + PBA) and one MSI-X capability with 64
vectors. Only the command register, the BAR address bits (so BAR sizing by
writing all ones works) and the MSI-X enable/function-mask bits are
writable. With vfio-user the vectors are delivered through eventfds, so the
MSI-X table in BAR4 is plain storage and the pending-bit array reads zero.
"""
from __future__ import annotations

import struct

from vfkeep.gdma.constants import (
    EMU_BAR0_SIZE,
    PCI_CLASS_CODE,
    PCI_DEVICE_ID,
    PCI_MSIX_BAR,
    PCI_MSIX_PBA_OFFSET,
    PCI_MSIX_VECTORS,
    PCI_PROG_IF,
    PCI_REVISION_ID,
    PCI_SUBCLASS,
    PCI_SUBSYSTEM_ID,
    PCI_SUBSYSTEM_VENDOR_ID,
    PCI_VENDOR_ID,
)

CONFIG_SIZE = 256
BAR4_SIZE = 4096
MSIX_CAP_OFFSET = 0x40
_MSIX_CAP_ID = 0x11
_STATUS_CAP_LIST = 0x10
_BAR_MEM64 = 0x4
_MSIX_TABLE_BYTES = PCI_MSIX_VECTORS * 16


def _bar_offset(index: int) -> int:
    return 0x10 + 4 * index


class ConfigSpace:
    """256-byte type-0 configuration header with a write mask."""

    def __init__(self) -> None:
        cs = self.data = bytearray(CONFIG_SIZE)
        mask = self.mask = bytearray(CONFIG_SIZE)
        struct.pack_into("<HHHH", cs, 0x00, PCI_VENDOR_ID, PCI_DEVICE_ID, 0, _STATUS_CAP_LIST)
        cs[0x08:0x0C] = bytes((PCI_REVISION_ID, PCI_PROG_IF, PCI_SUBCLASS, PCI_CLASS_CODE))
        struct.pack_into("<HH", cs, 0x2C, PCI_SUBSYSTEM_VENDOR_ID, PCI_SUBSYSTEM_ID)
        cs[0x34] = MSIX_CAP_OFFSET
        struct.pack_into("<BBHII", cs, MSIX_CAP_OFFSET, _MSIX_CAP_ID, 0, PCI_MSIX_VECTORS - 1,
                         0 | PCI_MSIX_BAR, PCI_MSIX_PBA_OFFSET | PCI_MSIX_BAR)
        struct.pack_into("<H", mask, 0x04, 0x0546)  # memory, bus master, parity, SERR, INTx disable
        for index, size in ((0, EMU_BAR0_SIZE), (PCI_MSIX_BAR, BAR4_SIZE)):
            struct.pack_into("<II", cs, _bar_offset(index), _BAR_MEM64, 0)
            struct.pack_into("<II", mask, _bar_offset(index), ~(size - 1) & 0xFFFFFFF0, 0xFFFFFFFF)
        struct.pack_into("<H", mask, MSIX_CAP_OFFSET + 2, 0xC000)  # enable, function mask

    def read(self, offset: int, size: int) -> bytes:
        return bytes(self.data[offset:offset + size])

    def write(self, offset: int, data: bytes) -> None:
        for i, b in enumerate(data, offset):
            m = self.mask[i]
            self.data[i] = (self.data[i] & ~m) | (b & m)


class MsixBar:
    """BAR4: MSI-X table storage at 0 and the pending-bit array at `PCI_MSIX_PBA_OFFSET` (reads zero)."""

    def __init__(self) -> None:
        self.data = bytearray(BAR4_SIZE)

    def read(self, offset: int, size: int) -> bytes:
        return bytes(self.data[offset:offset + size])

    def write(self, offset: int, data: bytes) -> None:
        end = min(offset + len(data), _MSIX_TABLE_BYTES)
        if offset < end:
            self.data[offset:end] = data[:end - offset]


__all__ = ["ConfigSpace", "MsixBar", "CONFIG_SIZE", "BAR4_SIZE", "MSIX_CAP_OFFSET"]
