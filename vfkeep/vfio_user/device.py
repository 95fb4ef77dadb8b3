"""The device-model interface the vfio-user server drives (internals.md, spec §5.4)."""
from __future__ import annotations

import abc
import functools
from typing import TYPE_CHECKING, Any, Callable

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


class VfioUserDevice(abc.ABC):
    """A PCI function served over vfio-user. The server owns transport, DMA and interrupt plumbing;
    the device owns registers and state, `reset_method` included: it decides whether a client
    disconnect or DEVICE_RESET wipes that state (flr) or not (none: keepalive)."""

    def __init__(self) -> None:
        self.server: VfioUserServer | None = None

    @property
    @abc.abstractmethod
    def reset_method(self) -> str:
        """`RESET_NONE` or `RESET_FLR`; read by the server once the device is attached."""

    @reset_method.setter
    @abc.abstractmethod
    def reset_method(self, value: str) -> None:
        """Set through the control channel; the device checks it (ValueError for anything else)."""

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


class CoreBackedDevice(VfioUserDevice):
    """A device model whose state is a transport-independent core (an emulator), built by `make_core` once
    the server attached (its DMA space, interrupts and loop exist then). The core is the one owner of
    `reset_method` (it checks a new value: ValueError), keeps a `command_log` and an `epoch`, and has
    `flr(reason)`, `client_connected(epoch)`, `client_disconnected()` and `close()`."""

    #: Control commands `name -> fn(core, **args)`, registered on the server's control channel.
    commands: dict[str, Callable[..., Any]] = {}

    def __init__(self, **core_kwargs: Any):
        super().__init__()
        self.core: Any = None
        self._core_kwargs = core_kwargs

    @abc.abstractmethod
    def make_core(self, server: VfioUserServer, **core_kwargs: Any) -> Any:
        """The core over the server's `dma`, `irqs` and `loop`, given the constructor's keyword arguments."""

    def attached(self, server: VfioUserServer) -> None:
        super().attached(server)
        self.core = self.make_core(server, **self._core_kwargs)
        for name, fn in self.commands.items():
            server.control.register(name, functools.partial(fn, self.core))

    @property
    def reset_method(self) -> str:
        return self.core.reset_method

    @reset_method.setter
    def reset_method(self, value: str) -> None:
        if self.core.reset_method != value:
            self.core.reset_method = value
            self.core.command_log.add("event", "SET_RESET_METHOD", self.core.epoch, value=value)

    def reset(self) -> None:
        self.core.flr("device_reset" if self.server.connected else "disconnect")

    def client_connected(self, epoch: int) -> None:
        self.core.client_connected(epoch)

    def client_disconnected(self) -> None:
        self.core.client_disconnected()

    def close(self) -> None:
        self.core.close()
