"""DMA blocks on non-contiguous pages (issue 15 item 4): what an OS that hands a driver memory page by page
gives it. `ScatteredClients.wrap(backing)` makes every multi-page block the driver allocates out of single
pages in descending, non-adjacent order; the driver sees them through one contiguous mapping (each page of the
guest memory file mapped in turn with `MAP_FIXED`) and must describe them to the device by their page list.
Single-page blocks stay as they are. `close()` unmaps, after the driver is gone.
"""
from __future__ import annotations

import ctypes
import mmap

from dma_canary import WrappedClient
from vfkeep.memory.guest_memory import PAGE_SIZE

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_MAP_FIXED = 0x10
_PROT_NONE = 0
_MAP_FAILED = ctypes.c_void_p(-1).value


def _mmap(addr, length, prot, flags, fd, offset) -> int:
    got = _libc.mmap(addr, length, prot, flags, fd, offset)
    if got in (None, _MAP_FAILED):
        raise OSError(ctypes.get_errno(), "mmap failed")
    return got


class ScatteredBlock:
    """A `DmaBuffer` over the given one-page blocks, in their order."""

    def __init__(self, fd: int, pages: list, persistent: bool):
        self._pages = pages
        self.pfns = [p.base_pfn for p in pages]
        self.pages = len(pages)
        self.len = self.pages * PAGE_SIZE
        self.base_pfn, self.gpa = self.pfns[0], self.pfns[0] * PAGE_SIZE  # byte 0; the rest is elsewhere
        self.persistent = persistent
        self._addr = _mmap(None, self.len, _PROT_NONE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
        for i, pfn in enumerate(self.pfns):
            _mmap(self._addr + i * PAGE_SIZE, PAGE_SIZE, mmap.PROT_READ | mmap.PROT_WRITE,
                  mmap.MAP_SHARED | _MAP_FIXED, fd, pfn * PAGE_SIZE)
        self.view = memoryview((ctypes.c_ubyte * self.len).from_address(self._addr)).cast("B")
        self.freed = False

    def free(self) -> None:
        for p in self._pages:
            p.free()
        self.freed = True

    def unmap(self) -> None:
        _libc.munmap(self._addr, self.len)


class ScatteredClient(WrappedClient):
    def __init__(self, inner, fd: int, owner: "ScatteredClients"):
        super().__init__(inner, owner)
        self.fd = fd

    def allocate_dma_buffer(self, nbytes: int):
        n = -(-nbytes // PAGE_SIZE)
        if n == 1:
            return self.inner.allocate_dma_buffer(nbytes)
        singles = [self.inner.allocate_dma_buffer(PAGE_SIZE) for _ in range(2 * n)]
        kept = singles[1::2][::-1]  # every other page, last first: no two adjacent in either direction
        for p in singles[0::2]:
            p.free()
        block = ScatteredBlock(self.fd, kept, self.inner.persistent)
        self.owner.blocks.append(block)
        return block


class ScatteredClients:
    def __init__(self, mem):
        self.fd = mem.fd
        self.blocks: list[ScatteredBlock] = []

    def wrap(self, backing):
        dma = backing.dma
        dma.ephemeral = ScatteredClient(dma.ephemeral, self.fd, self)
        if dma.persistent is not None:
            dma.persistent = ScatteredClient(dma.persistent, self.fd, self)
        return backing

    def close(self) -> None:
        for b in self.blocks:
            b.unmap()
        self.blocks.clear()
