"""PCI identity of the emulated NVMe controller (spec nvme.md §1): config space and BAR4 (MSI-X).

Type-0 header with the reference emulator's ids and class (mass storage /
NVM / NVMe), two 64-bit memory BARs (BAR0 registers + doorbells, BAR4 MSI-X
table + PBA) and one MSI-X capability; the PCI Express capability is left
out (the reference fault controller has none either). Writable: the command
register, BAR address bits (BAR sizing) and the MSI-X enable/function-mask
bits. Vectors are delivered through eventfds, so the table is storage and the
PBA reads zero.
"""
from __future__ import annotations

import struct

from vfkeep.nvme import (BAR0_LEN, PCI_CLASS_CODE, PCI_DEVICE_ID, PCI_MSIX_BAR, PCI_PROG_IF, PCI_REVISION_ID,
                         PCI_SUBCLASS, PCI_VENDOR_ID)

CONFIG_SIZE = 256
MSIX_CAP_OFFSET = 0x40
_MSIX_CAP_ID = 0x11
_STATUS_CAP_LIST = 0x10
_BAR_MEM64 = 0x4


def bar4_size(msix_count: int) -> int:
    """MSI-X table (16 bytes per vector) then the PBA, rounded up to a page."""
    return max(4096, ((msix_count * 16 + (msix_count + 63) // 64 * 8) + 4095) // 4096 * 4096)


class ConfigSpace:
    def __init__(self, msix_count: int) -> None:
        cs = self.data = bytearray(CONFIG_SIZE)
        mask = self.mask = bytearray(CONFIG_SIZE)
        struct.pack_into("<HHHH", cs, 0x00, PCI_VENDOR_ID, PCI_DEVICE_ID, 0, _STATUS_CAP_LIST)
        cs[0x08:0x0C] = bytes((PCI_REVISION_ID, PCI_PROG_IF, PCI_SUBCLASS, PCI_CLASS_CODE))
        cs[0x34] = MSIX_CAP_OFFSET
        struct.pack_into("<BBHII", cs, MSIX_CAP_OFFSET, _MSIX_CAP_ID, 0, msix_count - 1, PCI_MSIX_BAR,
                         msix_count * 16 | PCI_MSIX_BAR)
        struct.pack_into("<H", mask, 0x04, 0x0546)  # memory, bus master, parity, SERR, INTx disable
        for index, size in ((0, BAR0_LEN), (PCI_MSIX_BAR, bar4_size(msix_count))):
            struct.pack_into("<II", cs, 0x10 + 4 * index, _BAR_MEM64, 0)
            struct.pack_into("<II", mask, 0x10 + 4 * index, ~(size - 1) & 0xFFFFFFF0, 0xFFFFFFFF)
        struct.pack_into("<H", mask, MSIX_CAP_OFFSET + 2, 0xC000)  # enable, function mask

    def read(self, offset: int, size: int) -> bytes:
        return bytes(self.data[offset:offset + size])

    def write(self, offset: int, data: bytes) -> None:
        for i, b in enumerate(data, offset):
            m = self.mask[i]
            self.data[i] = (self.data[i] & ~m) | (b & m)


class MsixBar:
    def __init__(self, msix_count: int) -> None:
        self.table_bytes = msix_count * 16
        self.data = bytearray(bar4_size(msix_count))

    def read(self, offset: int, size: int) -> bytes:
        return bytes(self.data[offset:offset + size])

    def write(self, offset: int, data: bytes) -> None:
        end = min(offset + len(data), self.table_bytes)
        if offset < end:
            self.data[offset:end] = data[:end - offset]
