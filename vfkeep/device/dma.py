"""In-process DMA space: the device's view of a `GuestMemory` restricted to mapped ranges.

The emulator core only needs `view/read/write(iova, ...)` raising `DmaFault`
outside the mapped ranges. Over vfio-user the server's DMA map provides that;
this class provides the same (raising the same `DmaFault`) for in-process use (unit tests, a driver tested
without the transport). IOVA = GPA = file offset, as everywhere in vfkeep.
"""
from __future__ import annotations

from vfkeep.memory import GuestMemory
from vfkeep.vfio_user.dma import DmaFault


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

    def read(self, iova: int, n: int) -> bytes:
        return bytes(self.view(iova, n))

    def write(self, iova: int, data) -> None:
        self.view(iova, len(data))[:] = data
