"""What the driver needs from a device: BAR0 access and MSI-X eventfds.

`VfioDevice` (vfio-user client) satisfies `DeviceBacking` through `vfio_backing.VfioBacking`; tests can
put the in-process emulator behind the same interface, so the driver is exercised without sockets.
"""
from __future__ import annotations

import os
import select
from typing import Protocol


class DeviceBacking(Protocol):
    """BAR0 registers, MSI-X vectors and the handle's lifetime (the subset of VfioDevice the driver uses)."""

    @property
    def bar0_len(self) -> int: ...

    @property
    def msix_count(self) -> int: ...

    def read32(self, offset: int) -> int: ...

    def read64(self, offset: int) -> int: ...

    def write32(self, offset: int, value: int, posted: bool = False) -> None: ...

    def write64(self, offset: int, value: int, posted: bool = False) -> None: ...

    def set_irq(self, vector: int) -> int:
        """Assign an eventfd to MSI-X `vector` and return it (the device writes 1 to raise the vector)."""
        ...

    def clear_irqs(self) -> None: ...

    def close(self) -> None:
        """Release the handle without resetting the device (a reset, if any, is the device's reset_method)."""
        ...


class Interrupts:
    """The MSI-X vectors this driver mapped, and waiting on them (gdma spec 6.6)."""

    def __init__(self, backing: DeviceBacking):
        self._backing = backing
        self._fds: dict[int, int] = {}

    def map(self, vector: int) -> int:
        """Eventfd of `vector`, assigning it on first use; non-blocking so a stale wake-up never hangs a read."""
        fd = self._fds.get(vector)
        if fd is None:
            fd = self._backing.set_irq(vector)
            os.set_blocking(fd, False)
            self._fds[vector] = fd
        return fd

    def fd(self, vector: int) -> int:
        return self._fds[vector]

    def clear(self, vector: int) -> bool:
        """Consume a pending wake-up of `vector`; True if there was one."""
        try:
            os.read(self._fds[vector], 8)
            return True
        except BlockingIOError:
            return False

    def wait(self, vector: int, timeout_s: float) -> bool:
        """Sleep until `vector` fires (consuming the wake-up) or the timeout passes."""
        fd = self._fds[vector]
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        if poller.poll(max(0, int(timeout_s * 1000 + 0.999))):
            return self.clear(vector) or True
        return False

    def unmap_all(self) -> None:
        """Detach every eventfd from the device (the device latches interrupts until a new one arrives)."""
        if self._fds:
            self._backing.clear_irqs()
            self._fds.clear()
