"""Self-describing disk blocks for verifying guest disk IO across servicing (issue 13 item 4).

Every block written carries its LBA, a generation and a CRC, so a read can tell a correct block from a
stale, misplaced or torn one without keeping a copy: header `magic u32, crc32 u32, lba u64, generation
u64` (24 bytes), then a payload derived from (lba, generation). A never-written block reads as zeros.
"""
from __future__ import annotations

import struct
import zlib

MAGIC = 0x4B4C4256  # "VBLK"
HEADER = struct.Struct("<IIQQ")


class BadBlock(ValueError):
    """A block that is not what was written at this LBA."""


def _payload(lba: int, generation: int, size: int) -> bytes:
    seed = struct.pack("<QQ", lba, generation)
    return (seed * (size // len(seed) + 1))[:size]


def make_block(lba: int, generation: int, size: int = 512) -> bytes:
    payload = _payload(lba, generation, size - HEADER.size)
    crc = zlib.crc32(struct.pack("<QQ", lba, generation) + payload)
    return HEADER.pack(MAGIC, crc, lba, generation) + payload


def make_blocks(lba: int, count: int, generation: int, size: int = 512) -> bytes:
    return b"".join(make_block(lba + i, generation, size) for i in range(count))


def check_block(data, lba: int) -> int:
    """The generation of a correct block at `lba` (0 for a never-written, all-zero block); BadBlock else."""
    magic, crc, got_lba, generation = HEADER.unpack_from(data)
    if magic == 0 and not any(data):
        return 0
    if magic != MAGIC:
        raise BadBlock(f"lba {lba}: no block header (magic {magic:#x})")
    if got_lba != lba:
        raise BadBlock(f"lba {lba}: holds the block written for lba {got_lba}")
    if zlib.crc32(bytes(data[8:24]) + bytes(data[HEADER.size:])) != crc:
        raise BadBlock(f"lba {lba}: checksum mismatch (torn or corrupted), generation {generation}")
    return generation
