"""Guest block channel (issue 13 item 4): per disk, a request ring (guest → worker), a completion ring
(worker → guest) and a data area, all in guest RAM, so they survive the worker's replacement.

The guest puts data in its data area and pushes a 32-byte request `tag u64, op u8, 3 reserved bytes,
nblocks u32, lba u64, gpa u64` (`gpa` inside the data area); the worker's block relay moves the data
between the disk and those pages (the controller DMAs straight into guest RAM) and pushes a 16-byte
completion `tag u64, status i32, reserved u32` (0 = success, > 0 = the NVMe status, < 0 = refused by
the relay). Rings are `vfkeep.guest.ring.Ring`s with 64-byte slots and one eventfd each way.

Layout of disk d, from `base_gpa`: request ring, completion ring (each `ring_size(slots, 64)`, rounded up
to a page), then `data_pages` pages of data.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

from ..memory.guest_memory import PAGE_SIZE, GuestMemory, MemoryLayout
from .ring import Doorbell, Ring, ring_size

REQUEST = struct.Struct("<QB3xIQQ")
COMPLETION = struct.Struct("<Qi4x")
SLOT_SIZE = 64
OP_READ, OP_WRITE, OP_FLUSH = 1, 2, 3
OPS = {OP_READ: "read", OP_WRITE: "write", OP_FLUSH: "flush"}
#: Relay refusals (negative statuses): malformed request, data outside the area, IO failed in the driver.
BAD_REQUEST, BAD_BUFFER, DRIVER_FAILED = -1, -2, -3


@dataclass(frozen=True)
class Request:
    tag: int
    op: int
    nblocks: int
    lba: int
    gpa: int

    def pack(self) -> bytes:
        return REQUEST.pack(self.tag, self.op, self.nblocks, self.lba, self.gpa)

    @classmethod
    def unpack(cls, raw: bytes) -> "Request":
        return cls(*REQUEST.unpack_from(raw))


@dataclass(frozen=True)
class BlockLayout:
    disks: int
    slots: int = 256
    data_pages: int = 256
    base_gpa: int = 0

    def __post_init__(self) -> None:
        if self.base_gpa % PAGE_SIZE or self.disks < 0 or self.data_pages < 1:
            raise ValueError(f"bad block layout {self}")

    @property
    def ring_pages(self) -> int:
        return (ring_size(self.slots, SLOT_SIZE) + PAGE_SIZE - 1) // PAGE_SIZE

    @property
    def disk_pages(self) -> int:
        return 2 * self.ring_pages + self.data_pages

    @property
    def total_pages(self) -> int:
        return self.disks * self.disk_pages

    @property
    def end_gpa(self) -> int:
        return self.base_gpa + self.total_pages * PAGE_SIZE

    def disk_gpa(self, disk: int) -> int:
        if not 0 <= disk < self.disks:
            raise ValueError(f"disk {disk} is not in 0..{self.disks - 1}")
        return self.base_gpa + disk * self.disk_pages * PAGE_SIZE

    def data_range(self, disk: int) -> tuple[int, int]:
        """(gpa, bytes) of disk `disk`'s data area."""
        return self.disk_gpa(disk) + 2 * self.ring_pages * PAGE_SIZE, self.data_pages * PAGE_SIZE

    def check_fits(self, layout: MemoryLayout) -> None:
        if not layout.guest.contains_pfn(self.base_gpa // PAGE_SIZE, self.total_pages):
            raise ValueError(f"block channels need guest pages [{self.base_gpa // PAGE_SIZE}, "
                             f"+{self.total_pages}) but guest RAM has {layout.guest.pages}")

    def to_str(self) -> str:
        return f"disks={self.disks},slots={self.slots},data_pages={self.data_pages},base={self.base_gpa}"

    @classmethod
    def from_str(cls, text: str) -> "BlockLayout":
        try:
            fields = dict(kv.split("=", 1) for kv in text.split(","))
            return cls(int(fields["disks"]), int(fields["slots"]), int(fields["data_pages"]), int(fields["base"]))
        except (KeyError, ValueError) as e:
            raise ValueError(f"bad block layout {text!r}: {e}") from None


class BlockChannel:
    """One disk's two rings and data area; `create` (host) formats, `attach` (guest, worker) joins."""

    def __init__(self, layout: BlockLayout, disk: int, requests: Ring, completions: Ring):
        self.layout, self.disk = layout, disk
        self.requests, self.completions = requests, completions
        self.data_gpa, self.data_bytes = layout.data_range(disk)

    @classmethod
    def create(cls, mem: GuestMemory, layout: BlockLayout, disk: int) -> "BlockChannel":
        base = layout.disk_gpa(disk)
        req = Ring.create(mem, base, layout.slots, SLOT_SIZE, Doorbell.create())
        cpl = Ring.create(mem, base + layout.ring_pages * PAGE_SIZE, layout.slots, SLOT_SIZE, Doorbell.create())
        return cls(layout, disk, req, cpl)

    @classmethod
    def attach(cls, mem: GuestMemory, layout: BlockLayout, disk: int, request_fd: int,
               completion_fd: int) -> "BlockChannel":
        base = layout.disk_gpa(disk)
        req = Ring.attach(mem, base, Doorbell(request_fd))
        cpl = Ring.attach(mem, base + layout.ring_pages * PAGE_SIZE, Doorbell(completion_fd))
        return cls(layout, disk, req, cpl)

    def bell_fds(self) -> tuple[int, int]:
        return self.requests.doorbell.fileno(), self.completions.doorbell.fileno()

    def contains(self, gpa: int, nbytes: int) -> bool:
        return self.data_gpa <= gpa and gpa + nbytes <= self.data_gpa + self.data_bytes

    def close(self) -> None:
        for ring in (self.requests, self.completions):
            ring.close()
            ring.doorbell.close()
