"""The driver's device backing over vfio-user: a `VfioDevice` with guest memory mapped and the DMA clients
the device's manager chose, plus the device's `reset_method` switch on its control channel (the stand-in
for sysfs, DESIGN D6).

This adapter is where transport errors stop: a vanished server is the driver's `DeviceMissing` (like a
BAR0 that reads all ones), a timeout its `BackingTimeout`, anything else the transport raises (an error
reply, a broken protocol, a control-channel failure, an OS error on the socket) its `BackingError`. The
driver and the paravisor never see a `vfkeep.vfio_user` error class.
"""
from __future__ import annotations

import contextlib
import os
from typing import Callable

from vfkeep import rpc
from vfkeep.driver.backing import DmaClients
from vfkeep.driver.errors import BackingError, BackingTimeout, DeviceMissing
from vfkeep.memory.guest_memory import GuestMemory

from .client import DEFAULT_TIMEOUT_S, PendingAttach, VfioClientError, VfioDevice, VfioTimeout
from .client import DeviceMissing as TransportGone
from .control import control_call
from .protocol import IRQ_MSIX, REGION_BAR0


#: What the transport can raise; `driver_error` turns each into the driver's own.
TRANSPORT_ERRORS = (VfioClientError, rpc.RpcError, OSError)


def driver_error(e: BaseException) -> Exception:
    """The driver's error for transport error `e` (raise it `from e`)."""
    if isinstance(e, TransportGone):
        return DeviceMissing(str(e))
    if isinstance(e, VfioTimeout):
        return BackingTimeout(str(e))
    return BackingError(f"{type(e).__name__}: {e}")


def _call(fn: Callable, *args):
    try:
        return fn(*args)
    except TRANSPORT_ERRORS as e:
        raise driver_error(e) from e


class VfioBacking:
    """`DeviceBacking` over one vfio-user connection (thread-safe: VfioDevice serialises requests)."""

    def __init__(self, dev: VfioDevice, dma: DmaClients | None, bar0_len: int, msix_count: int,
                 prefetched: tuple[int, bytes] | None = None, assigned: tuple[int, ...] = ()):
        self.dev = dev
        self.dma = dma
        self.bar0_len = bar0_len
        self.msix_count = msix_count
        #: (offset, bytes) of a BAR0 read the attach made for the driver (`open_vfio(prefetch=)`): its first read
        #: of exactly that range is answered from it, once.
        self._prefetched = prefetched
        #: MSI-X vectors the attach assigned for the driver (`open_vfio(irqs=)`): its first `set_irqs` of exactly
        #: these vectors (or `set_irq` of the one) takes their eventfds without an exchange with the device.
        self._assigned = list(assigned)

    def read(self, offset: int, size: int) -> bytes:
        prefetched, self._prefetched = self._prefetched, None
        if prefetched is not None and prefetched[0] == offset and len(prefetched[1]) == size:
            return prefetched[1]
        return _call(self.dev.region_read, REGION_BAR0, offset, size)

    def read32(self, offset: int) -> int:
        return _call(self.dev.read32, offset)

    def read64(self, offset: int) -> int:
        return _call(self.dev.read64, offset)

    def write32(self, offset: int, value: int, posted: bool = False) -> None:
        _call(self.dev.write32, offset, value, posted)

    def write64(self, offset: int, value: int, posted: bool = False) -> None:
        _call(self.dev.write64, offset, value, posted)

    def write64_posted_many(self, writes: list[tuple[int, int]]) -> None:
        _call(self.dev.write64_posted_many, writes)
    @contextlib.contextmanager
    def posted_batch(self):
        """Posted writes (doorbells) inside the block go to the device together at its end (`VfioDevice`)."""
        batch = self.dev.posted_batch()
        batch.__enter__()
        try:
            yield
        finally:
            _call(batch.__exit__, None, None, None)

    def set_irq(self, vector: int) -> int:
        return self.set_irqs([vector])[0]

    def set_irqs(self, vectors: list[int]) -> list[int]:
        assigned, self._assigned = self._assigned, []
        if assigned and list(vectors) == assigned:
            return self.dev.irq_fds(assigned)
        return _call(self.dev.set_irqs, vectors)

    def close(self) -> None:
        """Disconnect (never a reset from here), then release the DMA clients."""
        try:
            _call(self.dev.close)
        finally:
            if self.dma is not None:
                self.dma.close()


def open_vfio(path: str | os.PathLike, mem: GuestMemory, dma: DmaClients | None, *, restore: bool = False,
              timeout: float = DEFAULT_TIMEOUT_S, prefetch: tuple[int, int] | None = None,
              irqs: tuple[int, ...] = (), ahead: PendingAttach | None = None) -> VfioBacking:
    """Connect to the device and map guest memory. Fresh (`restore=False`) sends DEVICE_RESET when the
    device's reset_method is flr; restore never resets. `timeout` bounds the connect and every reply.
    The backing owns `dma` from here on: it is closed with the backing, or at once if opening fails
    (None: the device's driver is handed its DMA client some other way, as the NVMe driver is today).
    `prefetch` = (offset, size): the BAR0 read the driver makes first (its register map), sent in the mapping's
    round trip; the driver's read of that range is answered from it. `irqs`: the MSI-X vectors the driver
    assigns first, assigned in that round trip too (its `set_irqs` of them is then answered without another).
    `ahead`: a restore's attach of this device sent earlier (`attach_ahead`) with the same `prefetch` and `irqs`:
    its answers are read instead of connecting (one with others is cancelled first); the backing owns it."""
    dev = None
    try:
        if ahead is not None and not (restore and (ahead.read, ahead.irqs) == (prefetch, tuple(irqs))):
            _call(ahead.cancel)
            ahead = None
        if restore:  # nothing to wait for between handshake and mapping: one pipeline
            pending = ahead or _call(VfioDevice.attach_ahead, path, mem, REGION_BAR0, IRQ_MSIX, timeout, prefetch,
                                     tuple(irqs))
            ahead = None
            dev, bar0, msix, data = _call(pending.finish)
        else:  # VfioDevice.new resets the device, when it can, before memory is mapped: two round trips
            dev = _call(VfioDevice.new, path, timeout)
            bar0, msix, data = _call(dev.map_and_query, mem, REGION_BAR0, IRQ_MSIX, prefetch, tuple(irqs))
        prefetched = None if prefetch is None else (prefetch[0], data)
        return VfioBacking(dev, dma, bar0.size, msix.count, prefetched, tuple(irqs))
    except BaseException:
        try:
            if ahead is not None:
                ahead.cancel()
            if dev is not None:
                dev.close()
        finally:
            if dma is not None:
                dma.close()
        raise


def attach_ahead(path: str | os.PathLike, mem: GuestMemory, *, timeout: float = DEFAULT_TIMEOUT_S,
                 prefetch: tuple[int, int] | None = None, irqs: tuple[int, ...] = ()) -> PendingAttach:
    """A restore's attach (`open_vfio(restore=True)`) sent now, its answers read by the `open_vfio(ahead=)` that
    follows: the device serves it while the caller works (driver errors only)."""
    return _call(VfioDevice.attach_ahead, path, mem, REGION_BAR0, IRQ_MSIX, timeout, prefetch, tuple(irqs))


def control_path(path: str | os.PathLike) -> str:
    return os.fspath(path) + ".ctl"


def reset_method_setter(path: str | os.PathLike) -> Callable[[str], None]:
    """Writes the device's reset_method ("none" | "flr") through its control channel (driver errors only)."""
    ctl = control_path(path)

    def set_reset_method(method: str) -> None:
        _call(lambda: control_call(ctl, "set_reset_method", value=method))

    return set_reset_method


def presence_probe(path: str | os.PathLike, timeout: float = 1.0) -> Callable[[], bool]:
    """Whether the device is there (again): it answers a connection and its BAR0 does not read all ones.
    One short connection per call, never a reset; for a VF manager waiting for a hot-add."""
    def present() -> bool:
        try:
            dev = VfioDevice.restore(path, timeout)
        except TRANSPORT_ERRORS:
            return False
        try:
            return dev.read32(0) != 0xFFFFFFFF
        except TRANSPORT_ERRORS:
            return False
        finally:
            dev.close()

    return present
