"""Namespaces backed by one sparse disk file (spec nvme.md §16).

Namespace `i` (nsid i, from 1) is the byte range `[(i-1)*size, i*size)` of
the file, so the file holds `count * size` bytes; it is created sparse and
never shrunk. Data lives only in the file: controller resets, FLRs and
servicings never touch it, and a file given again to a new emulator brings
its data back. Reads and writes go straight between the file and the
driver's DMA buffers (`preadv`/`pwritev` on memoryviews, no copy).
"""
from __future__ import annotations

import os

from vfkeep.nvme import IdentifyNamespace, LbaFormat, NSFEAT_OPTPERF

BLOCK_SIZES = (512, 4096)


class Disk:
    """The sparse backing file; `path=None` is an anonymous in-memory file (tests)."""

    def __init__(self, path: str | os.PathLike | None, size: int):
        if size <= 0:
            raise ValueError(f"disk size must be positive, got {size}")
        if path is None:
            self.path = None
            self.fd = os.memfd_create("vfkeep-nvme-disk", os.MFD_CLOEXEC)
        else:
            self.path = os.fspath(path)
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        if os.fstat(self.fd).st_size < size:
            os.ftruncate(self.fd, size)
        self.size = size

    def readv(self, offset: int, views: list[memoryview]) -> int:
        return os.preadv(self.fd, views, offset)

    def writev(self, offset: int, views: list[memoryview]) -> int:
        return os.pwritev(self.fd, views, offset)

    def zero(self, offset: int, length: int) -> None:
        """Deallocate: the range reads as zeros afterwards."""
        chunk = bytes(min(length, 1 << 20))
        while length > 0:
            n = min(length, len(chunk))
            os.pwrite(self.fd, chunk[:n], offset)
            offset += n
            length -= n

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Namespace:
    def __init__(self, nsid: int, disk: Disk, offset: int, size: int, block_size: int = 512):
        if block_size not in BLOCK_SIZES:
            raise ValueError(f"block size must be one of {BLOCK_SIZES}, got {block_size}")
        if size < block_size:
            raise ValueError(f"namespace size {size} is smaller than one {block_size}-byte block")
        self.nsid = nsid
        self.disk = disk
        self.offset = offset
        self.block_size = block_size
        self.block_shift = block_size.bit_length() - 1
        self.blocks = size // block_size

    def byte_offset(self, lba: int) -> int:
        return self.offset + (lba << self.block_shift)

    def identify(self) -> bytes:
        """IDENTIFY CNS 0: one LBA format, NSZE = NCAP = NUSE = block count, deallocate granularity 1."""
        ns = IdentifyNamespace(nsze=self.blocks, ncap=self.blocks, nuse=self.blocks, nlbaf=0, flbas=0,
                               nsfeat=NSFEAT_OPTPERF, npdg=1)
        ns.lbaf[0] = LbaFormat(lbads=self.block_shift).to_int()
        return ns.to_bytes()

    def inspect(self) -> dict:
        return {"nsid": self.nsid, "blocks": self.blocks, "block_size": self.block_size, "offset": self.offset}


def make_namespaces(disk: Disk, count: int, size: int, block_size: int = 512) -> list[Namespace]:
    """`count` namespaces of `size` bytes each, nsid 1..count, laid out back to back in `disk`."""
    if count * size > disk.size:
        raise ValueError(f"{count} namespaces of {size} bytes do not fit a {disk.size}-byte disk")
    return [Namespace(i + 1, disk, i * size, size, block_size) for i in range(count)]
