"""Queue entries (spec nvme.md §4) and the command dwords of §6-7.

`Command` is the 64-byte SQE, `Completion` the 16-byte CQE. The command
dwords that carry fields (CDW0, CDW10/11/12 of the commands the driver and
emulator use) are `BitfieldWord`s over a u32: build one and store its
`to_int()` in the SQE, or parse a dword with `from_int`.
"""
from __future__ import annotations

from vfkeep.gdma.base import BitfieldWord, WireStruct, bits, u16, u32, u64



class Cdw0(BitfieldWord):
    """§4.1 CDW0: opcode, FUSE, PSDT (0 = PRPs), command identifier."""

    _fields_ = bits(u32, ("opcode", 8), ("fuse", 2), ("rsvd", 4), ("psdt", 2), ("cid", 16))


class Command(WireStruct):
    """§4.1 submission queue entry (64 bytes)."""

    _fields_ = [
        ("cdw0", u32),
        ("nsid", u32),
        ("cdw2", u32),
        ("cdw3", u32),
        ("mptr", u64),
        ("prp1", u64),
        ("prp2", u64),
        ("cdw10", u32),
        ("cdw11", u32),
        ("cdw12", u32),
        ("cdw13", u32),
        ("cdw14", u32),
        ("cdw15", u32),
    ]

    @property
    def opcode(self) -> int:
        return self.cdw0 & 0xFF

    @property
    def cid(self) -> int:
        return self.cdw0 >> 16

    @cid.setter
    def cid(self, value: int) -> None:
        self.cdw0 = (self.cdw0 & 0xFFFF) | ((value & 0xFFFF) << 16)


class CompletionStatus(BitfieldWord):
    """§4.2 CQE status half-word: phase, SC, SCT, CRD, M, DNR. The driver's status is `(SCT << 8) | SC`."""

    _fields_ = bits(u16, ("p", 1), ("sc", 8), ("sct", 3), ("crd", 2), ("m", 1), ("dnr", 1))


class Completion(WireStruct):
    """§4.2 completion queue entry (16 bytes)."""

    _fields_ = [
        ("dw0", u32),
        ("dw1", u32),
        ("sqhd", u16),
        ("sqid", u16),
        ("cid", u16),
        ("status", u16),
    ]


def status_field(status: int, phase: int) -> int:
    """The CQE status half-word of an 11-bit `(SCT << 8) | SC` status with phase tag `phase`."""
    return ((status & 0x7FF) << 1) | (phase & 1)


def status_of(field: int) -> int:
    """The 11-bit `(SCT << 8) | SC` of a CQE status half-word (CRD, M, DNR ignored, as the driver does)."""
    return (field >> 1) & 0x7FF


# -- admin command dwords (§6) --------------------------------------------------------------------
class IdentifyCdw10(BitfieldWord):
    _fields_ = bits(u32, ("cns", 8), ("rsvd", 8), ("cntid", 16))


class CreateIoQueueCdw10(BitfieldWord):
    """CREATE IO CQ/SQ and DELETE IO CQ/SQ CDW10: queue id and 0-based size."""

    _fields_ = bits(u32, ("qid", 16), ("qsize", 16))


class CreateIoCqCdw11(BitfieldWord):
    _fields_ = bits(u32, ("pc", 1), ("ien", 1), ("rsvd", 14), ("iv", 16))


class CreateIoSqCdw11(BitfieldWord):
    _fields_ = bits(u32, ("pc", 1), ("qprio", 2), ("rsvd", 13), ("cqid", 16))


class FeaturesCdw10(BitfieldWord):
    """SET FEATURES (SV) / GET FEATURES (SEL) CDW10."""

    _fields_ = bits(u32, ("fid", 8), ("sel", 3), ("rsvd", 20), ("sv", 1))


class NumberOfQueues(BitfieldWord):
    """Feature 7: CDW11 of SET FEATURES (requested) and DW0 of its CQE (granted), both 0-based."""

    _fields_ = bits(u32, ("nsq", 16), ("ncq", 16))


class GetLogPageCdw10(BitfieldWord):
    """LID, LSP, RAE and NUMDL (0-based dword count, low 16 bits)."""

    _fields_ = bits(u32, ("lid", 8), ("lsp", 7), ("rae", 1), ("numdl", 16))


class AsyncEventDw0(BitfieldWord):
    """§6: DW0 of an AER completion."""

    _fields_ = bits(u32, ("event_type", 3), ("rsvd0", 5), ("info", 8), ("log_page", 8), ("rsvd1", 8))


# -- NVM command dwords (§7) ----------------------------------------------------------------------
class ReadWriteCdw12(BitfieldWord):
    """READ/WRITE CDW12: 0-based block count; FUA (bit 30), LR (bit 31)."""

    _fields_ = bits(u32, ("nlb", 16), ("rsvd", 14), ("fua", 1), ("lr", 1))


class DsmCdw10(BitfieldWord):
    _fields_ = bits(u32, ("nr", 8), ("rsvd", 24))


class DsmCdw11(BitfieldWord):
    _fields_ = bits(u32, ("idr", 1), ("idw", 1), ("ad", 1), ("rsvd", 29))


class DsmRange(WireStruct):
    """§7: one 16-byte DSM range."""

    _fields_ = [("context_attributes", u32), ("lba_count", u32), ("starting_lba", u64)]


__all__ = [
    "Cdw0", "Command", "CompletionStatus", "Completion", "status_field", "status_of", "IdentifyCdw10",
    "CreateIoQueueCdw10", "CreateIoCqCdw11", "CreateIoSqCdw11", "FeaturesCdw10", "NumberOfQueues",
    "GetLogPageCdw10", "AsyncEventDw0", "ReadWriteCdw12", "DsmCdw10", "DsmCdw11", "DsmRange",
]
