"""What the driver needs from a device: BAR0 access, MSI-X eventfds and the DMA clients for its memory.

The transport provides the backing (`vfkeep.vfio_user.backing.VfioBacking` over vfio-user, translating
every transport error into the driver's own); tests put the in-process emulator behind the same interface,
so the driver is exercised without sockets. Which DMA clients a device gets (persistent or not, their
names) is its manager's keepalive policy (servicing spec 4), not the driver's.
"""
from __future__ import annotations

import contextlib
import os
import select
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

from vfkeep.gdma.constants import PAGE_SIZE

from .errors import NoDmaClient

if TYPE_CHECKING:
    from vfkeep.memory.guest_memory import Region


class DmaBuffer(Protocol):
    """Zeroed DMA memory: `view` is contiguous for the driver, `pfns` its pages in order, which need not be
    consecutive (`vfkeep.memory.MemoryBlock`'s are; `base_pfn`/`gpa` are those of byte 0); pages return
    only through `free()`."""

    base_pfn: int
    pages: int
    len: int
    gpa: int
    pfns: list[int]
    view: memoryview
    persistent: bool

    def free(self) -> None: ...


def contiguous(block: DmaBuffer) -> bool:
    """All pages of `block` are physically consecutive (what a saved state's base pfn + length can name).
    (Compared as one list: a data-path keepalive save checks blocks of hundreds of pages in the window.)"""
    pfns = block.pfns
    return not pfns or pfns == list(range(pfns[0], pfns[0] + len(pfns)))


def buffer_addresses(block: DmaBuffer, size: int, count: int, start: int = 0) -> np.ndarray:
    """Device addresses (uint64) of `count` ranges of `size` bytes laid end to end in `block` from byte `start`.
    A block's pages need not be consecutive (the device learns queue memory as a page list, gdma spec 9.11),
    but a range handed to the device as one address (an SGE) must be: ValueError otherwise. Computed as
    arrays: a vport's rings take a thousand addresses, inside the servicing blackout."""
    pfns = np.asarray(block.pfns, dtype=np.int64)
    # breaks[i]: how many non-consecutive steps among pages 0..i; a range on pages first..last is on
    # consecutive pages iff no step breaks between them.
    breaks = np.concatenate(([0], np.cumsum(pfns[1:] != pfns[:-1] + 1)))
    offsets = np.arange(start, start + count * size, size, dtype=np.int64)
    first, last = offsets // PAGE_SIZE, (offsets + size - 1) // PAGE_SIZE
    bad = np.flatnonzero(breaks[last] != breaks[first])
    if bad.size:
        offset = int(offsets[bad[0]])
        raise ValueError(f"bytes [{offset}, {offset + size}) of a block cross non-consecutive pages")
    return (pfns[first] * PAGE_SIZE + offsets % PAGE_SIZE).astype(np.uint64)


def dma_address(block: DmaBuffer, offset: int, length: int) -> int:
    """Device address of bytes [offset, offset + length) of `block` (see `buffer_addresses`). One range: plain
    integers, no arrays (numpy's first calls in a new process cost a restore's window 0.3 ms)."""
    pfns = block.pfns
    first, last = offset // PAGE_SIZE, (offset + max(length, 1) - 1) // PAGE_SIZE
    if list(pfns[first:last + 1]) != list(range(pfns[first], pfns[first] + last - first + 1)):
        raise ValueError(f"bytes [{offset}, {offset + length}) of a block cross non-consecutive pages")
    return pfns[first] * PAGE_SIZE + offset % PAGE_SIZE


def posted_batch(backing: "DeviceBacking"):
    """Context in which posted writes to the device reach it together at its end, in order (the backing's
    `posted_batch`; at once where it has none): one message burst, one device wake-up."""
    batch = getattr(backing, "posted_batch", None)
    return batch() if batch is not None else contextlib.nullcontext()


class DmaClient(Protocol):
    """One device's allocator (`vfkeep.memory.DmaClient`): on the private pool (persistent, survives a
    servicing) or on worker RAM (ephemeral)."""

    persistent: bool
    region: Region  # the guest pages it allocates from

    def allocate_dma_buffer(self, nbytes: int) -> DmaBuffer: ...

    def attach_pending_buffers(self) -> list[DmaBuffer]:
        """The device's allocations saved by the previous worker (spec 6.2); persistent clients only."""
        ...

    def close(self) -> None: ...


@dataclass
class DmaClients:
    """The DMA clients a device's manager gives its backing: ephemeral always, persistent (private pool)
    when this device's memory may cross a servicing. The default client is the persistent one when it
    exists (servicing spec 4); asking for a kind the device does not have is an error, never a fallback."""

    ephemeral: DmaClient
    persistent: DmaClient | None = None

    @property
    def default(self) -> DmaClient:
        return self.persistent or self.ephemeral

    def kind(self, persistent: bool) -> DmaClient:
        if not persistent:
            return self.ephemeral
        if self.persistent is None:
            raise NoDmaClient("this device has no persistent dma client")
        return self.persistent

    def close(self) -> None:
        """Release the clients' names (their blocks stay live: the pool keeps what a save left behind)."""
        for client in (self.persistent, self.ephemeral):
            if client is not None:
                client.close()


class DeviceBacking(Protocol):
    """BAR0 registers, MSI-X vectors, DMA clients and the handle's lifetime. Raises only driver errors
    (`DeviceMissing` for a vanished device, `BackingError` for any other transport failure) or OSError."""

    dma: DmaClients

    @property
    def bar0_len(self) -> int: ...

    @property
    def msix_count(self) -> int: ...

    def read(self, offset: int, size: int) -> bytes:
        """`size` bytes of BAR0 at `offset` in one access (the register map is read this way)."""
        ...

    def read32(self, offset: int) -> int: ...

    def read64(self, offset: int) -> int: ...

    def write32(self, offset: int, value: int, posted: bool = False) -> None: ...

    def write64(self, offset: int, value: int, posted: bool = False) -> None: ...

    def write64_posted_many(self, writes: list[tuple[int, int]]) -> None:
        """Posted 64-bit writes (offset, value), applied in order; a transport sends them as one burst."""
        ...

    # Optional: `posted_batch()`, a context manager inside which posted writes may be held back and sent to the
    # device together at its end (one message burst per batch of doorbells); a backing without it sends each
    # at once.

    def set_irq(self, vector: int) -> int:
        """Assign an eventfd to MSI-X `vector` and return it (the device writes 1 to raise the vector)."""
        ...

    def set_irqs(self, vectors: list[int]) -> list[int]:
        """`set_irq` for each vector, in one exchange with the device."""
        ...

    def close(self) -> None:
        """Release the handle without resetting the device (a reset, if any, is the device's reset_method),
        then close the DMA clients."""
        ...


class Interrupts:
    """The MSI-X vectors this driver mapped, and waiting on them (gdma spec 6.6)."""

    def __init__(self, backing: DeviceBacking):
        self._backing = backing
        self._fds: dict[int, int] = {}

    def map(self, vector: int, *more: int) -> int:
        """Eventfd of `vector`, assigning it on first use; non-blocking so a stale wake-up never hangs a read.
        `more`: vectors the caller will need too, assigned in the same exchange with the device."""
        new = [v for v in dict.fromkeys((vector, *more)) if v not in self._fds]
        if new:
            for v, fd in zip(new, self._backing.set_irqs(new) if len(new) > 1 else [self._backing.set_irq(new[0])]):
                os.set_blocking(fd, False)
                self._fds[v] = fd
        return self._fds[vector]

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
