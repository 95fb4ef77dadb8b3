"""BAR0 register map (§3), doorbells (§4) and the SMC mailbox (§5)."""
from __future__ import annotations

from typing import Self

from .base import BitfieldWord, WireStruct, bits, u8, u16, u32, u64
from .constants import PAGE_SIZE, SMC_MSG_TYPE_ESTABLISH_HWC, SMC_MSG_TYPE_ESTABLISH_HWC_VERSION


class RegMap(WireStruct):
    """§3.1: read-only block at BAR0 offset 0 (40 bytes)."""

    _fields_ = [
        ("micro_version_number", u16),
        ("minor_version_number", u8),
        ("major_version_number", u8),
        ("reserved", u32),
        ("vf_db_pages_zone_offset", u64),
        ("vf_db_page_sz", u16),
        ("reserved2", u16),
        ("reserved3", u32),
        ("vf_gdma_sriov_shared_reg_start", u64),
        ("vf_gdma_sriov_shared_sz", u16),
        ("reserved4", u16),
        ("reserved5", u32),
    ]


class CqEqDoorbellValue(BitfieldWord):
    """§4.2: `tail` counts entries modulo capacity × 8; `arm = 1` requests a notification."""

    _fields_ = bits(u64, ("id", 24), ("reserved", 8), ("tail", 31), ("arm", 1))


class WqDoorbellValue(BitfieldWord):
    """§4.3: `tail` is the free-running producer byte count; `num_rwqe` only for RQs."""

    _fields_ = bits(u64, ("id", 24), ("num_rwqe", 8), ("tail", 32))


def doorbell_shift(vf_db_page_sz: int) -> int:
    """log2 of the doorbell page size (§3.4); the size must be a power of two."""
    if vf_db_page_sz <= 0 or vf_db_page_sz & (vf_db_page_sz - 1):
        raise ValueError(f"vf_db_page_sz {vf_db_page_sz} is not a power of two")
    return vf_db_page_sz.bit_length() - 1


def doorbell_page_count(bar0_len: int, vf_db_pages_zone_offset: int, shift: int) -> int:
    """Doorbell pages in BAR0 (§3.4); a page id ≥ this is invalid."""
    return max(bar0_len - vf_db_pages_zone_offset, 0) >> shift


def doorbell_address(vf_db_pages_zone_offset: int, page_id: int, queue_offset: int, shift: int = 12) -> int:
    """BAR0 offset of a doorbell (§4.1): zone + (page_id << shift) + DB_SQ/DB_RQ/DB_CQ/DB_EQ."""
    return vf_db_pages_zone_offset + (page_id << shift) + queue_offset


class SmcProtoHdr(BitfieldWord):
    """§5.1: mailbox header dword at window offset 28 (`SMC_HDR_OFFSET`); written last by the VF."""

    _fields_ = bits(
        u32,
        ("msg_type", 3),
        ("msg_version", 3),
        ("reserved_1", 1),
        ("is_response", 1),
        ("status", 8),
        ("reserved_2", 8),
        ("reset_vf", 1),
        ("reserved_3", 6),
        ("owner_is_pf", 1),
    )


class EstablishHwcHigh(BitfieldWord):
    """§5.3: PFN bits 48–51 of the four HWC queues, one nibble each."""

    _fields_ = bits(u16, ("eq_pfn_hi", 4), ("cq_pfn_hi", 4), ("rq_pfn_hi", 4), ("sq_pfn_hi", 4))


PFN_LIMIT = 1 << 52  # 48 low bits in the byte fields + 4 in `high`
_LOW48 = (1 << 48) - 1


class EstablishHwc(WireStruct):
    """§5.3: the whole 32-byte window for ESTABLISH_HWC; build with `EstablishHwc.build(...)`."""

    _fields_ = [
        ("eq", u8 * 6),
        ("cq", u8 * 6),
        ("rq", u8 * 6),
        ("sq", u8 * 6),
        ("high", EstablishHwcHigh),
        ("msix", u16),
        ("hdr", SmcProtoHdr),
    ]

    _QUEUES = ("eq", "cq", "rq", "sq")

    @classmethod
    def build(cls, eq_pfn: int, cq_pfn: int, rq_pfn: int, sq_pfn: int, msix: int = 0) -> Self:
        """Pack four 52-bit PFNs (low 48 bits in the byte fields, high nibbles in `high`) and the header."""
        msg = cls(msix=msix)
        msg.hdr = SmcProtoHdr(msg_type=SMC_MSG_TYPE_ESTABLISH_HWC, msg_version=SMC_MSG_TYPE_ESTABLISH_HWC_VERSION)
        high = EstablishHwcHigh()
        for name, pfn in zip(cls._QUEUES, (eq_pfn, cq_pfn, rq_pfn, sq_pfn)):
            if not 0 <= pfn < PFN_LIMIT:
                raise ValueError(f"{name} PFN {pfn:#x} exceeds the 52-bit limit {PFN_LIMIT:#x}")
            getattr(msg, name)[:] = list((pfn & _LOW48).to_bytes(6, "little"))
            setattr(high, f"{name}_pfn_hi", pfn >> 48)
        msg.high = high
        return msg

    def pfns(self) -> tuple[int, int, int, int]:
        """(eq, cq, rq, sq) PFNs; each HWC queue is one page at PFN × 4096."""
        return tuple(  # type: ignore[return-value]
            int.from_bytes(bytes(getattr(self, name)), "little") | (getattr(self.high, f"{name}_pfn_hi") << 48)
            for name in self._QUEUES
        )

    def addresses(self) -> tuple[int, int, int, int]:
        """(eq, cq, rq, sq) page addresses."""
        return tuple(pfn * PAGE_SIZE for pfn in self.pfns())  # type: ignore[return-value]


class SmcReportHwcTimeoutFlags(BitfieldWord):
    """§5.6 `flags_wait`."""

    _fields_ = bits(u32, ("wait_ms", 24), ("last_cmd_failed", 1), ("interrupt_loss", 1), ("reserved", 6))


class SmcReportHwcTimeout(WireStruct):
    """§5.6: REPORT_HWC_TIMEOUT window (diagnostic; header `msg_type` 4, `msg_version` 1)."""

    _fields_ = [
        ("rq_tail", u32),
        ("sq_tail", u32),
        ("cq_next", u32),
        ("eq_next", u32),
        ("reserved0", u32),
        ("reserved1", u32),
        ("flags_wait", SmcReportHwcTimeoutFlags),
        ("hdr", SmcProtoHdr),
    ]


__all__ = [
    "RegMap", "CqEqDoorbellValue", "WqDoorbellValue", "doorbell_shift", "doorbell_page_count",
    "doorbell_address", "SmcProtoHdr", "EstablishHwcHigh", "EstablishHwc", "SmcReportHwcTimeoutFlags",
    "SmcReportHwcTimeout", "PFN_LIMIT",
]
