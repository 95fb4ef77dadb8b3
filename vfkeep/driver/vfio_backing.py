"""The driver's device backing over vfio-user: a `VfioDevice` with guest memory mapped, plus the
device's `reset_method` switch on its control channel (the stand-in for sysfs, DESIGN D6)."""
from __future__ import annotations

import os
from typing import Callable

from vfkeep.memory import GuestMemory
from vfkeep.vfio_user import DeviceMissing as TransportGone
from vfkeep.vfio_user import VfioDevice, control_call
from vfkeep.vfio_user.client import DEFAULT_TIMEOUT_S
from vfkeep.vfio_user.protocol import IRQ_MSIX, REGION_BAR0

from .errors import DeviceMissing


class VfioBacking:
    """`DeviceBacking` over one vfio-user connection (thread-safe: VfioDevice serialises requests).
    A vanished server is the driver's `DeviceMissing`, like a BAR0 that reads all ones."""

    def __init__(self, dev: VfioDevice):
        self.dev = dev
        self.bar0_len = dev.region_info(REGION_BAR0).size
        self.msix_count = dev.irq_info(IRQ_MSIX).count
        self.close = dev.close

    def read32(self, offset: int) -> int:
        return self._call(self.dev.read32, offset)

    def read64(self, offset: int) -> int:
        return self._call(self.dev.read64, offset)

    def write32(self, offset: int, value: int, posted: bool = False) -> None:
        self._call(self.dev.write32, offset, value, posted)

    def write64(self, offset: int, value: int, posted: bool = False) -> None:
        self._call(self.dev.write64, offset, value, posted)

    def set_irq(self, vector: int) -> int:
        return self._call(self.dev.set_irq, vector)

    def clear_irqs(self) -> None:
        self._call(self.dev.clear_irqs)

    @staticmethod
    def _call(fn: Callable, *args):
        try:
            return fn(*args)
        except TransportGone as e:
            raise DeviceMissing(str(e)) from e


def open_vfio(path: str | os.PathLike, mem: GuestMemory, *, restore: bool = False,
              timeout: float = DEFAULT_TIMEOUT_S) -> VfioBacking:
    """Connect to the device and map guest memory. Fresh (`restore=False`) sends DEVICE_RESET when the
    device's reset_method is flr; restore never resets. `timeout` bounds the connect and every reply."""
    dev = VfioDevice.restore(path, timeout) if restore else VfioDevice.new(path, timeout)
    try:
        dev.map_guest_memory(mem)
        return VfioBacking(dev)
    except BaseException:
        dev.close()
        raise


def control_path(path: str | os.PathLike) -> str:
    return os.fspath(path) + ".ctl"


def reset_method_setter(path: str | os.PathLike) -> Callable[[str], None]:
    """Writes the device's reset_method ("none" | "flr") through its control channel."""
    ctl = control_path(path)

    def set_reset_method(method: str) -> None:
        control_call(ctl, "set_reset_method", value=method)

    return set_reset_method
