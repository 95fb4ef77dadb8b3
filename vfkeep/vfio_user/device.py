"""The device-model interface the vfio-user server drives (internals.md, spec §5.4)."""
from __future__ import annotations

import abc
import struct
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .server import VfioUserServer

RESET_NONE = "none"
RESET_FLR = "flr"
#: Stand-in for the sysfs `reset_method` attribute (DESIGN D6): "" in Linux is "none" here.
RESET_METHODS = (RESET_NONE, RESET_FLR)


def check_reset_method(value: str) -> str:
    """`value` if it is a reset method, else ValueError naming the accepted ones."""
    if value not in RESET_METHODS:
        raise ValueError(f"reset method must be one of {', '.join(RESET_METHODS)}, got {value!r}")
    return value

CONFIG_SPACE_SIZE = 256


class VfioUserDevice(abc.ABC):
    """A PCI function served over vfio-user. The server owns transport, DMA and interrupt plumbing;
    the device owns registers and state. `reset_method` decides whether a client disconnect
    or DEVICE_RESET wipes that state (flr) or not (none: keepalive)."""

    def __init__(self, reset_method: str = RESET_NONE):
        self.server: VfioUserServer | None = None
        self.reset_method = reset_method

    @property
    def reset_method(self) -> str:
        return self._reset_method

    @reset_method.setter
    def reset_method(self, value: str) -> None:
        self._reset_method = check_reset_method(value)

    @abc.abstractmethod
    def regions(self) -> dict[int, tuple[int, int]]:
        """Implemented regions: index -> (size, REGION_INFO_* flags). Index 7 is config space."""

    @abc.abstractmethod
    def irq_count(self, index: int) -> int:
        """Vectors of IRQ type `index` (2 = MSI-X); 0 = not implemented."""

    @abc.abstractmethod
    def region_read(self, index: int, offset: int, count: int) -> bytes:
        """Exactly `count` bytes; the server has checked range and permission. May raise
        CommandError to refuse the access."""

    @abc.abstractmethod
    def region_write(self, index: int, offset: int, data: bytes) -> None:
        """Apply a write; the server has checked range and permission."""

    @abc.abstractmethod
    def reset(self) -> None:
        """Function-level reset: back to power-on state, taking the modelled FLR time."""

    def attached(self, server: VfioUserServer) -> None:
        """Called once by the server so the device can reach `dma`, `irqs`, `loop`, `control`."""
        self.server = server

    def client_connected(self, epoch: int) -> None:
        """A client was accepted (before its VERSION)."""

    def client_disconnected(self) -> None:
        """The client is gone; its DMA mappings and eventfds are already dropped. An FLR follows
        when reset_method is flr."""


def config_space(vendor_id: int, device_id: int, *, revision: int = 0, class_code: int = 0x020000,
                 subsystem_vendor_id: int = 0, subsystem_id: int = 0) -> bytearray:
    """Type-0 PCI configuration header (256 bytes) with the identifying fields filled in."""
    cfg = bytearray(CONFIG_SPACE_SIZE)
    struct.pack_into("<HH", cfg, 0x00, vendor_id, device_id)
    struct.pack_into("<I", cfg, 0x08, (class_code << 8) | revision)
    struct.pack_into("<HH", cfg, 0x2C, subsystem_vendor_id, subsystem_id)
    return cfg
