"""The driver's device backing over vfio-user: a `VfioDevice` with guest memory mapped, plus the
device's `reset_method` switch on its control channel (the stand-in for sysfs, DESIGN D6)."""
from __future__ import annotations

import os
from typing import Callable

from vfkeep.memory import GuestMemory
from vfkeep.vfio_user import VfioDevice, control_call
from vfkeep.vfio_user.protocol import IRQ_MSIX, REGION_BAR0


class VfioBacking:
    """`DeviceBacking` over one vfio-user connection (thread-safe: VfioDevice serialises requests)."""

    def __init__(self, dev: VfioDevice):
        self.dev = dev
        self.bar0_len = dev.region_info(REGION_BAR0).size
        self.msix_count = dev.irq_info(IRQ_MSIX).count
        self.read32, self.read64 = dev.read32, dev.read64
        self.write32, self.write64 = dev.write32, dev.write64
        self.set_irq, self.clear_irqs, self.close = dev.set_irq, dev.clear_irqs, dev.close

    @property
    def was_reset(self) -> bool:
        return self.dev.was_reset


def open_vfio(path: str | os.PathLike, mem: GuestMemory, *, restore: bool = False) -> VfioBacking:
    """Connect to the device and map guest memory. Fresh (`restore=False`) sends DEVICE_RESET when the
    device's reset_method is flr; restore never resets."""
    dev = VfioDevice.restore(path) if restore else VfioDevice.new(path)
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
