"""Guest memory: one memfd shared by host, devices and worker (DESIGN §2).

Regions, in file order: guest RAM ("VTL0", survives servicing), worker RAM
("VTL2", poisoned by the host at each servicing) and the private pool
(persistent DMA allocations). PFN = file offset / 4096 = GPA / 4096 = IOVA / 4096
in every process, because every process maps the same file from offset 0.
"""
from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import struct
from dataclasses import dataclass

PAGE_SIZE = 4096
PAGE_SHIFT = 12
#: The word the host writes over worker RAM at servicing: stale pointers read it. Four bytes, so `wmemset` writes it
#: (`scrub_worker_ram`, on the servicing's critical path: 10-15% faster than copying an 8-byte pattern's block).
POISON_WORD = bytes.fromhex("deadbeef")
POISON = POISON_WORD * (PAGE_SIZE // len(POISON_WORD))
#: What `zero` copies block by block (a `bytes(n)` of a fresh allocation's size costs page faults of its own).
ZERO_BLOCK = bytes(16 * PAGE_SIZE)
_wmemset = ctypes.CDLL(None).wmemset
_wmemset.argtypes = (ctypes.c_void_p, ctypes.c_int32, ctypes.c_size_t)
_wmemset.restype = ctypes.c_void_p


def _fill(view: memoryview, block: bytes) -> None:
    """Repeat `block` over `view`, copying it block by block: a 64 KiB block stays in the CPU's cache, so this
    runs close to memset speed, where copying the filled part onto the rest reads as much memory as it writes."""
    size, length = len(block), len(view)
    for off in range(0, length - size + 1, size):
        view[off:off + size] = block
    tail = length % size
    if tail:
        view[length - tail:] = block[:tail]


class MemoryError_(Exception):
    """Base of guest-memory errors."""


class OutOfBounds(MemoryError_):
    """An access outside the guest memory file (or outside the region asked for)."""


@dataclass(frozen=True)
class Region:
    name: str
    base_pfn: int
    pages: int

    @property
    def end_pfn(self) -> int:
        return self.base_pfn + self.pages

    @property
    def gpa(self) -> int:
        return self.base_pfn << PAGE_SHIFT

    @property
    def size(self) -> int:
        return self.pages << PAGE_SHIFT

    def contains_pfn(self, pfn: int, pages: int = 1) -> bool:
        return pages >= 0 and self.base_pfn <= pfn and pfn + pages <= self.end_pfn


@dataclass(frozen=True)
class MemoryLayout:
    """Page counts of the three regions; pool_pages may be 0 (no private pool)."""

    guest_pages: int = 1024
    worker_pages: int = 4096
    pool_pages: int = 512

    def __post_init__(self) -> None:
        for name in ("guest_pages", "worker_pages", "pool_pages"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {v!r}")
        if self.guest_pages == 0 or self.worker_pages == 0:
            raise ValueError("guest RAM and worker RAM need at least one page each")

    @property
    def guest(self) -> Region:
        return Region("guest", 0, self.guest_pages)

    @property
    def worker(self) -> Region:
        return Region("worker", self.guest_pages, self.worker_pages)

    @property
    def pool(self) -> Region:
        return Region("pool", self.guest_pages + self.worker_pages, self.pool_pages)

    @property
    def regions(self) -> tuple[Region, ...]:
        return (self.guest, self.worker, self.pool)

    @property
    def total_pages(self) -> int:
        return self.guest_pages + self.worker_pages + self.pool_pages

    @property
    def size(self) -> int:
        return self.total_pages << PAGE_SHIFT

    def to_str(self) -> str:
        """Compact form for command lines and env: `guest=1024,worker=4096,pool=512`."""
        return f"guest={self.guest_pages},worker={self.worker_pages},pool={self.pool_pages}"

    @classmethod
    def from_str(cls, text: str) -> "MemoryLayout":
        try:
            fields = dict(part.split("=", 1) for part in text.split(","))
            return cls(int(fields["guest"]), int(fields["worker"]), int(fields["pool"]))
        except (KeyError, ValueError) as e:
            raise ValueError(f"bad memory layout {text!r}: expected guest=N,worker=N,pool=N") from e


class GuestMemory:
    """A mapping of the shared guest memory file with bounds-checked access."""

    def __init__(self, fd: int, layout: MemoryLayout, *, owns_fd: bool = True, populate: bool = False):
        size = os.fstat(fd).st_size
        if size < layout.size:
            raise OutOfBounds(f"memory file is {size} bytes, layout needs {layout.size}")
        self.fd = fd
        self.layout = layout
        self.size = layout.size
        self._owns_fd = owns_fd
        flags = mmap.MAP_SHARED | (mmap.MAP_POPULATE if populate else 0)
        self._mmap = mmap.mmap(fd, self.size, flags, mmap.PROT_READ | mmap.PROT_WRITE)
        self._view = memoryview(self._mmap)

    @classmethod
    def create(cls, layout: MemoryLayout, name: str = "vfkeep-guest-memory") -> "GuestMemory":
        """New zeroed memfd of the layout's size (the host does this once)."""
        fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)  # children get it via pass_fds
        os.ftruncate(fd, layout.size)
        # Fix the size: a peer that shrank the file would turn device accesses into SIGBUS.
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
        return cls(fd, layout)

    @classmethod
    def attach(cls, fd: int, layout: MemoryLayout, *, populate: bool = False) -> "GuestMemory":
        """Map an existing memory file (inherited or received fd); the caller keeps its own fd. `populate`
        fills the page tables now (MAP_POPULATE) rather than a page fault at a time on first touch: a
        prelaunched worker does it before the servicing, so a restore that zeroes and formats a vport's
        memory takes no fault per page inside the guest's blackout."""
        return cls(os.dup(fd), layout, populate=populate)

    # -- addressing -------------------------------------------------------------------------
    def check(self, gpa: int, length: int) -> None:
        if gpa < 0 or length < 0 or gpa + length > self.size:
            raise OutOfBounds(f"access [{gpa:#x}, {gpa + length:#x}) outside guest memory of {self.size:#x} bytes")

    def view(self, gpa: int, length: int) -> memoryview:
        """Zero-copy writable view of [gpa, gpa+length)."""
        self.check(gpa, length)
        return self._view[gpa:gpa + length]

    def page_view(self, pfn: int, pages: int = 1) -> memoryview:
        return self.view(pfn << PAGE_SHIFT, pages << PAGE_SHIFT)

    def read(self, gpa: int, length: int) -> bytes:
        return bytes(self.view(gpa, length))

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        self.view(gpa, len(data))[:] = data

    def zero(self, gpa: int, length: int) -> None:
        """Zero [gpa, gpa+length) (`_fill`): writing a `bytes(length)` would first build (and fault in) a buffer
        of that size. New DMA memory is zeroed this way."""
        _fill(self.view(gpa, length), ZERO_BLOCK)

    def read_u32(self, gpa: int) -> int:
        self.check(gpa, 4)
        return struct.unpack_from("<I", self._mmap, gpa)[0]

    def write_u32(self, gpa: int, value: int) -> None:
        self.check(gpa, 4)
        struct.pack_into("<I", self._mmap, gpa, value)

    def read_u64(self, gpa: int) -> int:
        self.check(gpa, 8)
        return struct.unpack_from("<Q", self._mmap, gpa)[0]

    def write_u64(self, gpa: int, value: int) -> None:
        self.check(gpa, 8)
        struct.pack_into("<Q", self._mmap, gpa, value)

    # -- servicing --------------------------------------------------------------------------
    def scrub_worker_ram(self) -> None:
        """Fill worker RAM with the poison word (`wmemset`: it is on the servicing's critical path); guest RAM and
        pool are untouched."""
        view = self.view(self.layout.worker.gpa, self.layout.worker.size)
        buf = (ctypes.c_char * len(view)).from_buffer(view)
        try:
            _wmemset(buf, int.from_bytes(POISON_WORD, "little", signed=True), len(view) // len(POISON_WORD))
        finally:
            del buf
            view.release()

    def close(self) -> None:
        self._view.release()
        try:
            self._mmap.close()
        except BufferError:  # a view is still alive somewhere; the mapping dies with the process
            pass
        if self._owns_fd:
            os.close(self.fd)
            self._owns_fd = False

    def __enter__(self) -> "GuestMemory":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
