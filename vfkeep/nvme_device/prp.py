"""PRP walking on the device side (spec nvme.md §5, emulator rules).

`PRP1 & 0xFFF` is the offset into the first page. If the transfer ends
within the first two pages (`offset + len <= 8192`) PRP1 and PRP2 are the
data pointers; otherwise PRP2 points at a PRP list (512 eight-byte entries
per page, starting at PRP2's own offset; the last entry of a full list page
chains to the next list page). Result: `(iova, length)` segments, adjacent
ones merged, so the disk I/O is one `preadv`/`pwritev` over few views.
"""
from __future__ import annotations

import struct

from vfkeep.nvme import PAGE_SIZE, PRP_ENTRY_SIZE

from .errors import DmaError


class PrpError(Exception):
    """A PRP entry or list cannot be read or is malformed: the command fails with DATA TRANSFER ERROR."""


def _append(segments: list[list[int]], iova: int, length: int) -> None:
    if segments and segments[-1][0] + segments[-1][1] == iova:
        segments[-1][1] += length
    else:
        segments.append([iova, length])


def prp_segments(dma, prp1: int, prp2: int, length: int) -> list[tuple[int, int]]:
    """Segments of a `length`-byte transfer described by PRP1/PRP2; reads PRP lists through `dma`."""
    if length <= 0:
        return []
    offset = prp1 & (PAGE_SIZE - 1)
    first = min(length, PAGE_SIZE - offset)
    segments: list[list[int]] = [[prp1, first]]
    remaining = length - first
    if remaining == 0:
        return [tuple(s) for s in segments]
    if offset + length <= 2 * PAGE_SIZE:
        if prp2 & (PAGE_SIZE - 1):
            raise PrpError(f"PRP2 {prp2:#x} is not page aligned")
        _append(segments, prp2, remaining)
        return [tuple(s) for s in segments]
    pages = (remaining + PAGE_SIZE - 1) // PAGE_SIZE
    list_addr = prp2
    if list_addr & (PRP_ENTRY_SIZE - 1):
        raise PrpError(f"PRP list pointer {list_addr:#x} is not 8-byte aligned")
    while pages:
        room = (PAGE_SIZE - (list_addr & (PAGE_SIZE - 1))) // PRP_ENTRY_SIZE
        # A full list page whose entries do not cover the rest chains through its last entry.
        take = pages if pages <= room else room - 1
        try:
            raw = bytes(dma.view(list_addr, (take + (pages > room)) * PRP_ENTRY_SIZE))
        except DmaError as e:
            raise PrpError(f"PRP list at {list_addr:#x} is not readable: {e}") from None
        entries = struct.unpack(f"<{len(raw) // 8}Q", raw)
        for entry in entries[:take]:
            if entry & (PAGE_SIZE - 1):
                raise PrpError(f"PRP list entry {entry:#x} is not page aligned")
            n = min(remaining, PAGE_SIZE)
            _append(segments, entry, n)
            remaining -= n
        pages -= take
        if pages:
            list_addr = entries[take]
            if list_addr & (PAGE_SIZE - 1):
                raise PrpError(f"chained PRP list pointer {list_addr:#x} is not page aligned")
    return [tuple(s) for s in segments]
