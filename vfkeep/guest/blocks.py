"""Traffic frames as blocks: a batch of the agent's frames of one size as the rows of one numpy array.

The guest traffic agent sends and receives tens of thousands of frames per second; building or checking them
one by one in Python costs more than everything else it does per frame. Here a batch is built and checked
with a few column operations (`stats` defines the frame format and stays the reference, frame by frame):
the CRC-32 of a frame is affine in its seq and send-time bytes, so a batch's CRCs are table lookups per column.
Only the agent imports this module (and numpy).
"""
from __future__ import annotations

import functools
import zlib

import numpy as np

from .stats import _CRC_OFF, _ETH, ETHERTYPE, FRAME_MAGIC, HEADER_LEN, MIN_FRAME

#: Offset of the 16 bytes that differ between the frames of one size: seq and send time.
_VARIABLE = _ETH.size + 8
_ETH_MAGIC_AT = slice(12, _CRC_OFF)  # ethertype and magic: constant in every traffic frame


@functools.lru_cache(maxsize=16)
def _crc_by_byte(size: int) -> tuple[int, np.ndarray]:
    """The CRC of a `size`-byte traffic frame as a function of its 16 seq and send-time bytes, which it is affine
    in (CRC-32 is affine over GF(2) and the rest of the frame is fixed): crc = base ^ XOR over k of
    tables[k, byte k]. Returns (base, tables: 16 x 256 uint32); a batch's CRCs are then 16 table lookups per
    column, not a pass over every frame."""
    fixed = ETHERTYPE.to_bytes(2, "big") + FRAME_MAGIC
    pad = bytes(size - HEADER_LEN)
    base = zlib.crc32(pad, zlib.crc32(bytes(16), zlib.crc32(fixed)))
    tables = np.zeros((16, 256), np.uint32)
    for k in range(16):
        for bit in range(8):  # tables[k, b] is the XOR of the images of b's bits
            one = bytearray(16)
            one[k] = 1 << bit
            image, step = zlib.crc32(pad, zlib.crc32(bytes(one), zlib.crc32(fixed))) ^ base, 1 << bit
            tables[k, step:2 * step] = tables[k, :step] ^ image
    return base, tables


def _crcs(size: int, variable: np.ndarray) -> np.ndarray:
    """CRCs of `size`-byte traffic frames from their seq and send-time bytes (`variable`: n x 16 uint8)."""
    base, tables = _crc_by_byte(size)
    return np.bitwise_xor.reduce(tables[np.arange(16), variable], axis=1) ^ np.uint32(base)


def make_frame_block(first_seq: int, n: int, size: int, now_ns: int, src_mac: bytes, dst_mac: bytes) -> np.ndarray:
    """What `make_frames` builds, as the rows of one n x size uint8 array, with no step per frame in Python:
    the constant parts are broadcast, seqs and CRCs computed as columns."""
    if size < MIN_FRAME:
        raise ValueError(f"frame size {size} is below the Ethernet minimum of {MIN_FRAME} bytes")
    if len(src_mac) != 6 or len(dst_mac) != 6:
        raise ValueError(f"MAC addresses must be 6 bytes, got {len(src_mac)} and {len(dst_mac)}")
    out = np.zeros((n, size), np.uint8)
    out[:, :_CRC_OFF] = np.frombuffer(_ETH.pack(dst_mac, src_mac, ETHERTYPE) + FRAME_MAGIC, np.uint8)
    variable = out[:, _VARIABLE:HEADER_LEN]
    variable[:, :8] = np.arange(first_seq, first_seq + n, dtype=">u8").view(np.uint8).reshape(n, 8)
    variable[:, 8:] = np.frombuffer(now_ns.to_bytes(8, "big"), np.uint8)
    out[:, _CRC_OFF:_VARIABLE] = _crcs(size, variable).astype(">u4").view(np.uint8).reshape(n, 4)
    return out


def parse_frame_block(block: np.ndarray, size: int) -> tuple[list[int], list[int]] | None:
    """(seqs, send times) of a batch of `size`-byte frames, the rows of `block` (n x at least size uint8: e.g. ring
    slots), if every one is an undamaged traffic frame — as `parse_frames` would find them, with no step per
    frame in Python; None if any is not (the caller then parses them one by one)."""
    n = len(block)
    if size < HEADER_LEN or n == 0:
        return None
    head = np.frombuffer(ETHERTYPE.to_bytes(2, "big") + FRAME_MAGIC, np.uint8)
    if not (block[:, _ETH_MAGIC_AT] == head).all() or block[:, HEADER_LEN:size].any():
        return None  # not ours, or padding that is not zero: the slow path tells other traffic from damage
    variable = np.ascontiguousarray(block[:, _VARIABLE:HEADER_LEN])
    crcs = np.ascontiguousarray(block[:, _CRC_OFF:_VARIABLE]).view(">u4").ravel()
    if not (crcs == _crcs(size, variable)).all():
        return None
    both = variable.view(">u8")
    return both[:, 0].tolist(), both[:, 1].tolist()
