"""Identify data structures (spec nvme.md §8, §16), 4096 bytes each, saved verbatim for keepalive.

Only the fields the spec names are spelled out; the bytes in between are
`rsvdNNN` arrays (NNN = offset) so every named field sits at its spec offset.
"""
from __future__ import annotations

import ctypes

from vfkeep.gdma.base import BitfieldWord, WireStruct, bits, u8, u16, u32, u64

from .constants import IDENTIFY_SIZE


def _fields(total: int, named: list[tuple[int, str, type]]) -> list[tuple[str, type]]:
    """`_fields_` placing each (offset, name, ctype) at its offset, reserved byte arrays in the gaps."""
    out, at = [], 0
    for offset, name, ty in named:
        if offset < at:
            raise TypeError(f"field {name} at {offset} overlaps the previous field (ends at {at})")
        if offset > at:
            out.append((f"rsvd{at}", u8 * (offset - at)))
        out.append((name, ty))
        at = offset + ctypes.sizeof(ty)
    if at < total:
        out.append((f"rsvd{at}", u8 * (total - at)))
    return out


class IdentifyController(WireStruct):
    """IDENTIFY CNS 1 (§8, §16 offsets)."""

    _fields_ = _fields(IDENTIFY_SIZE, [
        (0, "vid", u16), (2, "ssvid", u16), (4, "sn", u8 * 20), (24, "mn", u8 * 40), (64, "fr", u8 * 8),
        (72, "rab", u8), (73, "ieee", u8 * 3), (76, "cmic", u8), (77, "mdts", u8), (78, "cntlid", u16),
        (80, "ver", u32), (84, "rtd3r", u32), (88, "rtd3e", u32), (92, "oaes", u32), (96, "ctratt", u32),
        (111, "cntrltype", u8), (256, "oacs", u16), (258, "acl", u8), (259, "aerl", u8), (260, "frmw", u8),
        (261, "lpa", u8), (262, "elpe", u8), (263, "npss", u8), (512, "sqes", u8), (513, "cqes", u8),
        (514, "maxcmd", u16), (516, "nn", u32), (520, "oncs", u16), (522, "fuses", u16), (524, "fna", u8),
        (525, "vwc", u8), (526, "awun", u16), (528, "awupf", u16), (768, "subnqn", u8 * 256),
    ])


class LbaFormat(BitfieldWord):
    """§8 LBAF[i]: metadata size, LBA data size (2^lbads bytes), relative performance."""

    _fields_ = bits(u32, ("ms", 16), ("lbads", 8), ("rp", 2), ("rsvd", 6))


class IdentifyNamespace(WireStruct):
    """IDENTIFY CNS 0 (§8 offsets)."""

    _fields_ = _fields(IDENTIFY_SIZE, [
        (0, "nsze", u64), (8, "ncap", u64), (16, "nuse", u64), (24, "nsfeat", u8), (25, "nlbaf", u8),
        (26, "flbas", u8), (27, "mc", u8), (28, "dpc", u8), (29, "dps", u8), (30, "nmic", u8), (31, "rescap", u8),
        (32, "fpi", u8), (33, "dlfeat", u8), (34, "nawun", u16), (36, "nawupf", u16), (38, "nacwu", u16),
        (40, "nabsn", u16), (42, "nabo", u16), (44, "nabspf", u16), (46, "noiob", u16), (48, "nvmcap", u8 * 16),
        (64, "npwg", u16), (66, "npwa", u16), (68, "npdg", u16), (70, "npda", u16), (72, "nows", u16),
        (104, "nguid", u8 * 16), (120, "eui64", u8 * 8), (128, "lbaf", u32 * 16),
    ])

    def lba_format(self) -> LbaFormat:
        """The format FLBAS selects (bits 0-3)."""
        return LbaFormat.from_int(self.lbaf[self.flbas & 0xF])


#: ONCS bits the driver reads (§8).
ONCS_DSM = 1 << 2
ONCS_RESERVATIONS = 1 << 5
#: NSFEAT bit 4: NPDG and friends are valid.
NSFEAT_OPTPERF = 1 << 4
#: OAES bit 8: namespace attribute notices.
OAES_NS_ATTRIBUTE = 1 << 8

__all__ = ["IdentifyController", "IdentifyNamespace", "LbaFormat", "ONCS_DSM", "ONCS_RESERVATIONS",
           "NSFEAT_OPTPERF", "OAES_NS_ATTRIBUTE"]
