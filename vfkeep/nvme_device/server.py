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
import functools

from vfkeep.nvme import BAR0_LEN, PCI_MSIX_BAR
from vfkeep.vfio_user.device import VfioUserDevice, check_reset_method
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


class NvmeVfioDevice(VfioUserDevice):
    """Holds the `NvmeController` once the server has attached (DMA, IRQs and loop exist then)."""

    def __init__(self, reset_method: str = "none", *, msix_count: int = 16, **core_kwargs):
        self.core: NvmeController | None = None
        self.msix_count = msix_count
        self._core_kwargs = core_kwargs
        self.config = ConfigSpace(msix_count)
        self.msix = MsixBar(msix_count)
        super().__init__(reset_method)

    @property
    def reset_method(self) -> str:
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
        self.core = NvmeController(ServerDma(server), server.irqs, server.loop, reset_method=self.reset_method,
                                   msix_count=self.msix_count, **self._core_kwargs)
        for name, fn in control.COMMANDS.items():
            server.control.register(name, functools.partial(fn, self.core))

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

    def reset(self) -> None:
        self.core.flr("device_reset" if self.server.connected else "disconnect")

    def client_connected(self, epoch: int) -> None:
        self.core.client_connected(epoch)

    def client_disconnected(self) -> None:
        self.core.client_disconnected()

    def close(self) -> None:
        self.core.close()
