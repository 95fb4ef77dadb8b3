"""The NVMe emulator as a vfio-user device: a thin adapter from `VfioUserDevice` to `NvmeController`.

Regions: 0 = BAR0 (64 KiB: registers + doorbells), 4 = BAR4 (MSI-X table +
PBA), 7 = config space; read/write, not mmap-able. The server's DMA space
(translated: its faults become the core's `DmaError`; `available` while a
client is connected with memory mapped), interrupt table and loop become the
core's `dma`, `irq` and `loop`; the commands of `control.py` are registered
on the server's control channel. The server performs the FLR (`reset()`)
after a disconnect when `reset_method` is `flr` and on DEVICE_RESET.
"""
from __future__ import annotations

import errno

from vfkeep.nvme import BAR0_LEN, PCI_MSIX_BAR
from vfkeep.vfio_user.device import CoreBackedDevice
from vfkeep.vfio_user.dma import DmaFault
from vfkeep.vfio_user.protocol import (IRQ_MSIX, REGION_BAR0, REGION_CONFIG, REGION_INFO_READ, REGION_INFO_WRITE,
                                       CommandError)

from . import control
from .core import NvmeController
from .errors import DmaError, RegisterAccessError
from .pci import CONFIG_SIZE, ConfigSpace, MsixBar, bar4_size


class ServerDma:
    """The server's DMA space in the core's terms."""

    def __init__(self, server):
        self._server = server
        self._space = server.dma

    @property
    def available(self) -> bool:
        return self._server.connected and len(self._space) > 0

    def view(self, iova: int, n: int) -> memoryview:
        try:
            view = self._space.view(iova, n)
        except DmaFault as e:
            raise DmaError(str(e)) from None
        if view.readonly:
            raise DmaError(f"DMA access [{iova:#x}, +{n:#x}) hits a mapping the client made read-only")
        return view


class NvmeVfioDevice(CoreBackedDevice):
    """Holds the `NvmeController` once the server has attached (DMA, IRQs and loop exist then)."""

    commands = control.COMMANDS

    def __init__(self, reset_method: str = "none", *, msix_count: int = 16, **core_kwargs):
        super().__init__(reset_method=reset_method, msix_count=msix_count, **core_kwargs)
        self.msix_count = msix_count
        self.config = ConfigSpace(msix_count)
        self.msix = MsixBar(msix_count)

    def make_core(self, server, **core_kwargs) -> NvmeController:
        return NvmeController(ServerDma(server), server.irqs, server.loop, **core_kwargs)

    def regions(self) -> dict[int, tuple[int, int]]:
        rw = REGION_INFO_READ | REGION_INFO_WRITE
        return {REGION_BAR0: (BAR0_LEN, rw), PCI_MSIX_BAR: (bar4_size(self.msix_count), rw),
                REGION_CONFIG: (CONFIG_SIZE, rw)}

    def irq_count(self, index: int) -> int:
        return self.msix_count if index == IRQ_MSIX else 0

    def region_read(self, index: int, offset: int, count: int) -> bytes:
        if self.core.removed:
            return b"\xff" * count
        if index == REGION_BAR0:
            try:
                return self.core.read(offset, count)
            except RegisterAccessError as e:
                raise CommandError(errno.EINVAL, str(e)) from None
        return (self.config if index == REGION_CONFIG else self.msix).read(offset, count)

    def region_write(self, index: int, offset: int, data: bytes) -> None:
        if self.core.removed:
            return
        if index == REGION_BAR0:
            try:
                self.core.write(offset, data)
            except RegisterAccessError as e:
                raise CommandError(errno.EINVAL, str(e)) from None
        else:
            (self.config if index == REGION_CONFIG else self.msix).write(offset, data)
