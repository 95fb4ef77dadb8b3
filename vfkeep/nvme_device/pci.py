"""PCI identity of the emulated NVMe controller (spec nvme.md §1): config space and BAR4 (MSI-X).

Type-0 header with the reference emulator's ids and class (mass storage /
NVM / NVMe), two 64-bit memory BARs (BAR0 registers + doorbells, BAR4 MSI-X
table + PBA) and one MSI-X capability; the PCI Express capability is left
out (the reference fault controller has none either). Built by `vfkeep.pci`
(what is writable, and why the PBA reads zero, is said there).
"""
from __future__ import annotations

from vfkeep import pci
from vfkeep.nvme import (BAR0_LEN, PCI_CLASS_CODE, PCI_DEVICE_ID, PCI_MSIX_BAR, PCI_PROG_IF, PCI_REVISION_ID,
                         PCI_SUBCLASS, PCI_VENDOR_ID)

CONFIG_SIZE = pci.CONFIG_SIZE


def bar4_size(msix_count: int) -> int:
    """MSI-X table (16 bytes per vector) then the PBA, rounded up to a page."""
    return max(4096, ((msix_count * 16 + (msix_count + 63) // 64 * 8) + 4095) // 4096 * 4096)

#: Base class, subclass and programming interface, as one 24-bit class code.
_CLASS_CODE = PCI_CLASS_CODE << 16 | PCI_SUBCLASS << 8 | PCI_PROG_IF


class ConfigSpace(pci.ConfigSpace):
    """The controller's configuration header, with `msix_count` vectors (PBA right after the table)."""

    def __init__(self, msix_count: int) -> None:
        super().__init__(PCI_VENDOR_ID, PCI_DEVICE_ID, class_code=_CLASS_CODE,
                         revision=PCI_REVISION_ID, bars={0: BAR0_LEN, PCI_MSIX_BAR: bar4_size(msix_count)},
                         msix=pci.Msix(PCI_MSIX_BAR, msix_count, msix_count * 16))


class MsixBar(pci.MsixBar):
    def __init__(self, msix_count: int) -> None:
        super().__init__(msix_count, bar4_size(msix_count))
