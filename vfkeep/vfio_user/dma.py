"""Server-side DMA mappings (spec §3.2-3.3, §6 "Guest memory"): the device reaches guest memory
through shared mmaps of the client's memory file, addressed by IOVA.

A DMA_MAP without an fd (addendum A1: QEMU sends these for ROM/BIOS shadows) is accepted as a
*message-only* range: it takes part in the overlap, limit and unmap rules like any mapping, but
this server never uses DMA_READ/DMA_WRITE, so a device access to it is a `DmaFault` (the device
counts it, as for an unmapped address)."""
from __future__ import annotations

import bisect
import errno
import mmap
import os
from dataclasses import dataclass

from .protocol import DMA_MAP_MMAP, DMA_MAP_READ, DMA_MAP_WRITE, CommandError

_PAGE = mmap.ALLOCATIONGRANULARITY


class DmaFault(Exception):
    """A device access to an IOVA range that is not (fully) mapped or not permitted. Devices
    record it and drop the access; it never reaches the client."""


@dataclass
class DmaMapping:
    iova: int
    size: int
    file_offset: int
    flags: int
    file_id: tuple[int, int] | None  # (st_dev, st_ino): "the same file" for exact repeats; None: no fd
    mm: mmap.mmap | None  # None: message-only (no fd was sent)
    buf: memoryview | None

    @property
    def end(self) -> int:
        return self.iova + self.size

    def release(self) -> None:
        """Unmap now if nobody holds a view; otherwise the mapping dies with the last view
        (Python cannot revoke exported buffers; the range is already gone from the table)."""
        if self.mm is None:
            return
        self.buf.release()
        try:
            self.mm.close()
        except BufferError:
            pass


class DmaSpace:
    """IOVA -> mapping table. Ranges never overlap, so a sorted list and bisect find them."""

    def __init__(self, max_maps: int):
        self.max_maps = max_maps
        self._maps: list[DmaMapping] = []
        self._starts: list[int] = []
        #: The mappings of a client that left (`retire_all`): out of the table, so the device cannot reach them,
        #: but not unmapped yet. The next client's DMA_MAP of the same range of the same file takes one over
        #: (a servicing's new worker maps all of guest memory again), so neither that client's attach nor the
        #: device's first accesses after it pay for a fresh mapping (mmap, a page fault per page touched), and
        #: the old client's munmap is not in the window; `release_retired` unmaps the rest.
        self._retired: list[DmaMapping] = []
        #: Files mapped (mmap calls) over this space's life: a taken-over mapping is not one more.
        self.files_mapped = 0

    def __len__(self) -> int:
        return len(self._maps)

    # -- protocol side --------------------------------------------------------------------------
    def map(self, fd: int | None, file_offset: int, iova: int, size: int, flags: int) -> bool:
        """Map `size` bytes of `fd` at `file_offset` to `iova` (`fd` None: a message-only range, the
        offset ignored). Returns False for an exact repeat (a no-op); CommandError for bad arguments,
        overlap (EEXIST) or too many maps (ENOSPC). The caller keeps ownership of `fd` (the mmap holds
        the file)."""
        if flags & ~(DMA_MAP_READ | DMA_MAP_WRITE | DMA_MAP_MMAP):
            raise CommandError(errno.EINVAL, f"DMA_MAP flags {flags:#x}: only READ|WRITE|MMAP (0x7) are supported")
        if not flags & (DMA_MAP_READ | DMA_MAP_WRITE):
            raise CommandError(errno.EINVAL, f"DMA_MAP flags {flags:#x} grant neither READ nor WRITE")
        if size == 0 or iova + size > 1 << 64:
            raise CommandError(errno.EINVAL, f"DMA_MAP range iova={iova:#x} size={size:#x} is empty or wraps")
        file_id = None
        if fd is None:
            file_offset = 0
        else:
            st = os.fstat(fd)
            if file_offset + size > st.st_size:
                raise CommandError(errno.EINVAL, f"DMA_MAP file range [{file_offset:#x}, {file_offset + size:#x}) "
                                                 f"beyond the end of the {st.st_size:#x}-byte file")
            file_id = (st.st_dev, st.st_ino)
        for m in self._maps:
            if m.iova < iova + size and iova < m.end:
                if (m.iova, m.size, m.file_offset, m.flags, m.file_id) == (iova, size, file_offset, flags, file_id):
                    return False
                raise CommandError(errno.EEXIST, f"DMA_MAP [{iova:#x}, {iova + size:#x}) overlaps the mapping "
                                                 f"[{m.iova:#x}, {m.end:#x})")
        if len(self._maps) >= self.max_maps:
            raise CommandError(errno.ENOSPC, f"DMA_MAP: already {len(self._maps)} mappings, "
                                             f"max_dma_maps is {self.max_maps}")
        key = (iova, size, file_offset, flags, file_id)
        for i, m in enumerate(self._retired):
            if fd is not None and (m.iova, m.size, m.file_offset, m.flags, m.file_id) == key:
                self._insert(self._retired.pop(i))
                return True
        mm = view = None
        if fd is not None:
            base = file_offset - file_offset % _PAGE
            delta = file_offset - base
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if flags & DMA_MAP_WRITE else 0)
            try:
                mm = mmap.mmap(fd, delta + size, mmap.MAP_SHARED, prot, offset=base)
            except (OSError, ValueError, OverflowError) as e:
                raise CommandError(errno.EINVAL, f"DMA_MAP: cannot mmap the file: {e}") from None
            view = memoryview(mm)[delta:delta + size]
            self.files_mapped += 1
        self._insert(DmaMapping(iova, size, file_offset, flags, file_id, mm, view))
        return True

    def _insert(self, mapping: DmaMapping) -> None:
        i = bisect.bisect(self._starts, mapping.iova)
        self._maps.insert(i, mapping)
        self._starts.insert(i, mapping.iova)

    def unmap(self, iova: int, size: int) -> None:
        """Remove the mapping that matches exactly; ENOENT otherwise (no splitting)."""
        i = bisect.bisect_left(self._starts, iova)
        if i == len(self._maps) or self._maps[i].iova != iova or self._maps[i].size != size:
            raise CommandError(errno.ENOENT, f"DMA_UNMAP [{iova:#x}, +{size:#x}) matches no mapping")
        del self._starts[i]
        self._maps.pop(i).release()

    def unmap_all(self) -> None:
        maps, self._maps, self._starts = self._maps, [], []
        for m in maps:
            m.release()

    def retire_all(self) -> None:
        """A client left: every mapping leaves the table at once; those with a file wait in `_retired` for the
        next client to map them again (earlier retired ones are released now)."""
        self.release_retired()
        maps, self._maps, self._starts = self._maps, [], []
        self._retired = maps

    @property
    def retired(self) -> int:
        return len(self._retired)

    def release_retired(self) -> None:
        """Unmap the retired mappings nobody took over."""
        retired, self._retired = self._retired, []
        for m in retired:
            m.release()

    # -- device side ----------------------------------------------------------------------------
    def view(self, iova: int, n: int) -> memoryview:
        """Zero-copy view of [iova, iova+n) inside one mapping (read-only if the client did not
        grant WRITE). DmaFault if any byte is unmapped."""
        m = self._lookup(iova, n)
        return m.buf[iova - m.iova:iova - m.iova + n]

    def read(self, iova: int, n: int) -> bytes:
        m = self._lookup(iova, n)
        if not m.flags & DMA_MAP_READ:
            raise DmaFault(f"DMA read of [{iova:#x}, +{n:#x}): mapping is not readable")
        return bytes(m.buf[iova - m.iova:iova - m.iova + n])

    def write(self, iova: int, data: bytes | bytearray | memoryview) -> None:
        m = self._lookup(iova, len(data))
        if not m.flags & DMA_MAP_WRITE:
            raise DmaFault(f"DMA write of [{iova:#x}, +{len(data):#x}): mapping is not writable")
        m.buf[iova - m.iova:iova - m.iova + len(data)] = data

    def mapping(self, iova: int, n: int, write: bool = False) -> tuple[memoryview, int]:
        """(the whole mapping holding [iova, iova+n), its base IOVA): a batch of accesses slices it without
        looking the range up again. DmaFault if unmapped, or not readable / writable (`write`) as needed."""
        m = self._lookup(iova, n)
        if not m.flags & (DMA_MAP_WRITE if write else DMA_MAP_READ):
            raise DmaFault(f"DMA {'write' if write else 'read'} of [{iova:#x}, +{n:#x}): mapping does not allow it")
        return m.buf, m.iova

    def _lookup(self, iova: int, n: int) -> DmaMapping:
        i = bisect.bisect_right(self._starts, iova) - 1
        if n < 0 or iova < 0 or i < 0 or iova + n > self._maps[i].end:
            raise DmaFault(f"DMA access [{iova:#x}, +{n:#x}) is not inside a mapped range")
        m = self._maps[i]
        if m.mm is None:
            raise DmaFault(f"DMA access [{iova:#x}, +{n:#x}) to a range mapped without an fd (this server does "
                           f"not use DMA_READ/DMA_WRITE)")
        return m
