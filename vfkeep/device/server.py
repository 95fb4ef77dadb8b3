"""The MANA emulator as a vfio-user device: a thin adapter from `VfioUserDevice` to `GdmaDevice`.

Regions: 0 = BAR0 (8192 bytes), 4 = BAR4 (MSI-X table + PBA, 4096 bytes),
7 = config space (256 bytes); all read/write, none mmap-able. 64 MSI-X
vectors. The server's DMA space (its faults become the core's `DmaFault`),
interrupt table and loop become the core's `dma`, `irq` and `loop`; the
control commands of `control.py` are registered on the server's control
channel. The core owns `reset_method`; the server performs the FLR
(`reset()`) after a disconnect when it is `flr` and on DEVICE_RESET.
"""
from __future__ import annotations

from typing import Callable

from vfkeep.gdma.constants import PCI_MSIX_BAR, PCI_MSIX_VECTORS
from vfkeep.vfio_user.device import CoreBackedDevice
from vfkeep.vfio_user.dma import DmaFault as TransportDmaFault
from vfkeep.vfio_user.dma import DmaSpace
from vfkeep.vfio_user.protocol import IRQ_MSIX, REGION_BAR0, REGION_CONFIG, REGION_INFO_READ, REGION_INFO_WRITE

from . import control
from .bar0 import Bar0
from .core import GdmaDevice
from .dma import DmaFault
from .pci import BAR4_SIZE, CONFIG_SIZE


class ServerDma:
    """The server's DMA space as the core's `dma`: the same accesses, the device's own `DmaFault`."""

    def __init__(self, space: DmaSpace):
        self._space = space

    def view(self, iova: int, n: int) -> memoryview:
        return _device_fault(self._space.view, iova, n)

    def read(self, iova: int, n: int) -> bytes:
        return _device_fault(self._space.read, iova, n)

    def write(self, iova: int, data) -> None:
        _device_fault(self._space.write, iova, data)

    def mapping(self, iova: int, n: int, write: bool = False) -> tuple[memoryview, int]:
        return _device_fault(self._space.mapping, iova, n, write)


def _device_fault(access: Callable, *args):
    try:
        return access(*args)
    except TransportDmaFault as e:
        raise DmaFault(str(e)) from None


class ManaVfioDevice(CoreBackedDevice):
    """Holds the `GdmaDevice` core, built when the server attaches; the core owns `reset_method`."""

    commands = control.COMMANDS

    def __init__(self, reset_method: str = "none", **core_kwargs):
        super().__init__(reset_method=reset_method, **core_kwargs)

    def make_core(self, server, **core_kwargs) -> GdmaDevice:
        return GdmaDevice(ServerDma(server.dma), server.irqs, server.loop, received_at=server.received_at,
                          **core_kwargs)

    def regions(self) -> dict[int, tuple[int, int]]:
        rw = REGION_INFO_READ | REGION_INFO_WRITE
        return {REGION_BAR0: (Bar0.size, rw), PCI_MSIX_BAR: (BAR4_SIZE, rw), REGION_CONFIG: (CONFIG_SIZE, rw)}

    def irq_count(self, index: int) -> int:
        return PCI_MSIX_VECTORS if index == IRQ_MSIX else 0

    def _region(self, index: int):
        core = self.core
        if index == REGION_BAR0:  # doorbells: the data path
            return core.bar0
        return {PCI_MSIX_BAR: core.msix_bar, REGION_CONFIG: core.config}[index]

    def region_read(self, index: int, offset: int, count: int) -> bytes:
        if self.core.removed:
            return b"\xff" * count
        return self._region(index).read(offset, count)

    def region_write(self, index: int, offset: int, data: bytes) -> None:
        if not self.core.removed:
            self._region(index).write(offset, data)

    def client_disconnected(self) -> None:
        self.core.client_disconnected(reset=False)  # the server performs the FLR itself


__all__ = ["ManaVfioDevice", "ServerDma"]
