"""The emulator's DMA: `DmaFault`, an in-process DMA space and a per-batch window onto one.

The emulator core only needs `view/read/write(iova, ...)` and `mapping(iova, n, write)` raising `DmaFault`
outside the mapped ranges. Over vfio-user the server's DMA map provides that (`server.py` turns the
transport's fault into this one); `MappedMemory` provides the same for in-process use (unit tests, a driver
tested without the transport). IOVA = GPA = file offset, as everywhere in vfkeep.

`DmaWindow` is what a batch of data-path work uses: it looks a mapping up once and slices it for every
access that falls inside, so a batch of frames in one region costs one lookup, not one per access.
"""
from __future__ import annotations

from vfkeep.memory.guest_memory import GuestMemory


class DmaFault(Exception):
    """A device access to an IOVA range that is not (fully) mapped or not permitted. The device counts it
    and drops the access (or completes the request with an error); it never leaves the device."""


class MappedMemory:
    """`GuestMemory` seen through a list of mapped `(iova, size)` ranges (whole memory by default)."""

    def __init__(self, mem: GuestMemory, ranges: list[tuple[int, int]] | None = None):
        self.mem = mem
        self.ranges: list[tuple[int, int]] = [(0, mem.size)] if ranges is None else list(ranges)

    def map(self, iova: int, size: int) -> None:
        self.ranges.append((iova, size))

    def unmap_all(self) -> None:
        self.ranges.clear()

    def view(self, iova: int, n: int) -> memoryview:
        for base, size in self.ranges:
            if base <= iova and iova + n <= base + size and n >= 0:
                return self.mem.view(iova, n)
        raise DmaFault(f"DMA access [{iova:#x}, {iova + n:#x}) is outside every mapped range")

    def mapping(self, iova: int, n: int, write: bool = False) -> tuple[memoryview, int]:
        """(the mapped range holding [iova, iova+n) as one view, its base IOVA); DmaFault if there is none."""
        for base, size in self.ranges:
            if base <= iova and iova + n <= base + size and n >= 0:
                return self.mem.view(base, size), base
        raise DmaFault(f"DMA access [{iova:#x}, {iova + n:#x}) is outside every mapped range")

    def read(self, iova: int, n: int) -> bytes:
        return bytes(self.view(iova, n))

    def write(self, iova: int, data) -> None:
        self.view(iova, len(data))[:] = data


class DmaWindow:
    """Guest memory for one batch of accesses of one kind (read or `write`): `view(iova, n)` slices the
    mapping found by the last lookup and looks up again only for a range outside it (DmaFault if unmapped).
    Make a new one per batch: the DMA space may change between batches, never during one."""

    __slots__ = ("dma", "write", "buf", "base", "end")

    def __init__(self, dma, write: bool = False):
        self.dma, self.write = dma, write
        self.buf: memoryview | None = None
        self.base, self.end = 0, -1  # nothing cached

    def view(self, iova: int, n: int) -> memoryview:
        if not (self.base <= iova and iova + n <= self.end and n >= 0):
            self.buf, self.base = self.dma.mapping(iova, n, self.write)
            self.end = self.base + len(self.buf)
        off = iova - self.base
        return self.buf[off:off + n]
