"""Controller registers (spec nvme.md §2) and doorbell addresses (§3)."""
from __future__ import annotations

from vfkeep.gdma.base import BitfieldWord, bits, u32, u64

from .constants import DOORBELL_BASE


class Cap(BitfieldWord):
    """§2.2 CAP (64 bits). `to_500ms` is TO in 500 ms units; MQES and the queue sizes are 0-based."""

    _fields_ = bits(u64, ("mqes", 16), ("cqr", 1), ("ams", 2), ("rsvd0", 5), ("to_500ms", 8), ("dstrd", 4),
                    ("nssrs", 1), ("css", 8), ("bps", 1), ("cps", 2), ("mpsmin", 4), ("mpsmax", 4), ("pmrs", 1),
                    ("cmbs", 1), ("nsss", 1), ("crwms", 1), ("crims", 1), ("rsvd1", 3))


class Aqa(BitfieldWord):
    """§2.3 AQA: 0-based admin SQ and CQ sizes."""

    _fields_ = bits(u32, ("asqs", 12), ("rsvd0", 4), ("acqs", 12), ("rsvd1", 4))


class Cc(BitfieldWord):
    """§2.4 CC."""

    _fields_ = bits(u32, ("en", 1), ("rsvd0", 3), ("css", 3), ("mps", 4), ("ams", 3), ("shn", 2), ("iosqes", 4),
                    ("iocqes", 4), ("crime", 1), ("rsvd1", 7))


class Csts(BitfieldWord):
    """§2.5 CSTS."""

    _fields_ = bits(u32, ("rdy", 1), ("cfs", 1), ("shst", 2), ("nssro", 1), ("pp", 1), ("st", 1), ("rsvd", 25))


def doorbell_offset(qid: int, is_cq: bool, dstrd: int = 0) -> int:
    """§3: BAR0 offset of queue `qid`'s SQ tail (is_cq False) or CQ head doorbell."""
    return DOORBELL_BASE + ((2 * qid + int(is_cq)) << (2 + dstrd))


__all__ = ["Cap", "Aqa", "Cc", "Csts", "doorbell_offset"]
