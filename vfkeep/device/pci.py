"""PCI identity of the emulated MANA VF (spec gdma.md §2): config space (vfio-user region 7) and BAR4.

Type-0 header with the reference emulator's ids, two 64-bit memory BARs (BAR0 registers, BAR4 MSI-X
table + PBA) and one MSI-X capability with 64 vectors; built by `vfkeep.pci` (what is writable, and
why the PBA reads zero, is said there).
"""
from __future__ import annotations

from vfkeep import pci
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

CONFIG_SIZE = pci.CONFIG_SIZE
BAR4_SIZE = 4096

#: Base class, subclass and programming interface, as one 24-bit class code.
_CLASS_CODE = PCI_CLASS_CODE << 16 | PCI_SUBCLASS << 8 | PCI_PROG_IF


class ConfigSpace(pci.ConfigSpace):
    """The MANA VF's configuration header."""

    def __init__(self) -> None:
        super().__init__(PCI_VENDOR_ID, PCI_DEVICE_ID, class_code=_CLASS_CODE,
                         revision=PCI_REVISION_ID, subsystem_vendor_id=PCI_SUBSYSTEM_VENDOR_ID,
                         subsystem_id=PCI_SUBSYSTEM_ID, bars={0: EMU_BAR0_SIZE, PCI_MSIX_BAR: BAR4_SIZE},
                         msix=pci.Msix(PCI_MSIX_BAR, PCI_MSIX_VECTORS, PCI_MSIX_PBA_OFFSET))


class MsixBar(pci.MsixBar):
    """BAR4: the MSI-X table of the 64 vectors, and the PBA at `PCI_MSIX_PBA_OFFSET`."""

    def __init__(self) -> None:
        super().__init__(PCI_MSIX_VECTORS, BAR4_SIZE)


__all__ = ["ConfigSpace", "MsixBar", "CONFIG_SIZE", "BAR4_SIZE"]
