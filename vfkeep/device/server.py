"""The MANA emulator as a vfio-user device: a thin adapter from `VfioUserDevice` to `GdmaDevice`.

Regions: 0 = BAR0 (8192 bytes), 4 = BAR4 (MSI-X table + PBA, 4096 bytes),
7 = config space (256 bytes); all read/write, none mmap-able. 64 MSI-X
vectors. The server's DMA space, interrupt table and loop become the core's
`dma`, `irq` and `loop`; the control commands of `control.py` are registered
on the server's control channel. The server performs the FLR (`reset()`)
after a disconnect when `reset_method` is `flr` and on DEVICE_RESET.
"""
from __future__ import annotations

import functools

from vfkeep.gdma.constants import PCI_MSIX_BAR, PCI_MSIX_VECTORS
from vfkeep.vfio_user.device import VfioUserDevice, check_reset_method
from vfkeep.vfio_user.protocol import IRQ_MSIX, REGION_BAR0, REGION_CONFIG, REGION_INFO_READ, REGION_INFO_WRITE

from . import control
from .bar0 import Bar0
from .core import GdmaDevice
from .pci import BAR4_SIZE, CONFIG_SIZE


class ManaVfioDevice(VfioUserDevice):
    """Holds the `GdmaDevice` core once the server has attached (DMA, IRQs and loop exist then)."""

    def __init__(self, reset_method: str = "none", **core_kwargs):
        self.core: GdmaDevice | None = None
        self._core_kwargs = core_kwargs
        super().__init__(reset_method)

    @property
    def reset_method(self) -> str:
        """The core's once attached (one source of truth); changes are logged in its command log."""
        return self._reset_method if self.core is None else self.core.reset_method

    @reset_method.setter
    def reset_method(self, value: str) -> None:
        check_reset_method(value)
        if self.core is None:
            self._reset_method = value
        elif self.core.reset_method != value:
            self.core.reset_method = value
            self.core.command_log.add("event", "SET_RESET_METHOD", self.core.epoch, value=value)

    def attached(self, server) -> None:
        super().attached(server)
        self.core = GdmaDevice(server.dma, server.irqs, server.loop, reset_method=self.reset_method,
                               **self._core_kwargs)
        for name, fn in control.COMMANDS.items():
            server.control.register(name, functools.partial(fn, self.core))

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

    def reset(self) -> None:
        self.core.flr("device_reset" if self.server.connected else "disconnect")

    def client_connected(self, epoch: int) -> None:
        self.core.client_connected(epoch)

    def client_disconnected(self) -> None:
        self.core.client_disconnected(reset=False)

    def close(self) -> None:
        self.core.close()


__all__ = ["ManaVfioDevice"]
