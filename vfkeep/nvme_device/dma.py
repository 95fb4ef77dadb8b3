"""In-process DMA space for the NVMe emulator core: a `GuestMemory` seen through mapped ranges.

Same contract as the vfio-user adapter's: `view(iova, n)` (writable, zero copy) raising `DmaError`
outside the mapped ranges, and `available` (False models "no driver has memory mapped", as during
a servicing handover).
"""
from __future__ import annotations

from .errors import DmaError


class MemoryDma:
    def __init__(self, mem, ranges: list[tuple[int, int]] | None = None):
        self.mem = mem
        self.ranges = [(0, mem.size)] if ranges is None else list(ranges)
        self.available = True

    def view(self, iova: int, n: int) -> memoryview:
        if self.available and n >= 0:
            for base, size in self.ranges:
                if base <= iova and iova + n <= base + size:
                    return self.mem.view(iova, n)
        raise DmaError(f"DMA access [{iova:#x}, {iova + n:#x}) is outside every mapped range")
