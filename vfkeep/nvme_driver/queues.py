"""Driver-side queue pair (spec nvme.md §4.3, §5, §11.1-11.3): SQ and CQ rings, the pending-command
table with its CIDs, and the page allocator, all in one contiguous DMA block.

Block layout (69 pages, `QUEUE_PAIR_MEM_LEN`): SQ at 0 (16 KiB, up to 256 × 64 B), CQ at 16 KiB (4 KiB,
up to 256 × 16 B), then 64 allocator pages for PRP lists and admin data. A queue pair is used from two
sides: submitters (any thread) under `lock`, and the driver's interrupt thread, which reaps completions.
`save()` returns the `QueuePairSavedState` and `QueuePair.restore()` rebuilds one from a validated state
on the same block: nothing is written to the device.
"""
from __future__ import annotations

import heapq
import struct
import threading
from typing import Callable

from vfkeep.nvme import (CID_KEY_BITS, CID_KEY_MASK, CID_SEQ_STEP, MAX_PENDING, CQ_BYTES, CQE_SIZE, INVALID_PAGE_ADDR, PAGE_SIZE,
                         PRP_ENTRIES_PER_PAGE, QUEUE_PAIR_ALLOCATOR_PAGES, SQ_BYTES, SQE_SIZE, Command,
                         doorbell_offset, status_of)
from vfkeep.proto import nvme_driver_pb2 as pb

from .errors import DriverStopped

#: Status handed to a callback whose command will never complete (driver stopped, device failed).
ABANDONED = -1
#: First allocator page inside the block.
ALLOCATOR_FIRST_PAGE = (SQ_BYTES + CQ_BYTES) // PAGE_SIZE

Callback = Callable[[int, int], None]  # (status, dw0)


class PageAllocator:
    """Single pages of the queue pair's allocator area (PRP lists, admin data). One page is kept back so a
    multi-page request cannot take the last one (reference: requests may use at most pages - 1)."""

    def __init__(self, first_pfn: int, pages: int = QUEUE_PAIR_ALLOCATOR_PAGES):
        self.first_pfn = first_pfn
        self.pages = pages
        self._free = set(range(pages))

    def alloc(self) -> int | None:
        """GPA of a free page, or None when all usable pages are taken."""
        if len(self._free) <= 1:
            return None
        index = min(self._free)
        self._free.discard(index)
        return (self.first_pfn + index) * PAGE_SIZE

    def free(self, gpa: int) -> None:
        self._free.add(gpa // PAGE_SIZE - self.first_pfn)

    def reserve(self, gpa: int) -> bool:
        """Mark a page a restored command still names as taken; False if `gpa` is not an allocator page."""
        index = gpa // PAGE_SIZE - self.first_pfn
        if gpa % PAGE_SIZE or not 0 <= index < self.pages or index not in self._free:
            return False
        self._free.discard(index)
        return True

    @property
    def free_pages(self) -> int:
        return len(self._free)


class Pending:
    __slots__ = ("cid", "command", "callback", "pages", "presave")

    def __init__(self, cid: int, command: bytes, callback: Callback | None, pages: list[int], presave: bool):
        self.cid, self.command, self.callback, self.pages, self.presave = cid, command, callback, pages, presave


class QueuePair:
    """One SQ/CQ pair with qid `qid` on `block` (a `MemoryBlock`: `base_pfn`, `len`, `view`, `free()`)."""

    def __init__(self, backing, block, qid: int, sq_entries: int, cq_entries: int, iv: int, cpu: int = 0):
        self.backing = backing
        self.block = block
        self.qid = qid
        self.iv = iv
        self.cpu = cpu
        self.sq_len = sq_entries
        self.cq_len = cq_entries
        view = block.view
        self.sq_mem = view[:SQ_BYTES]
        self.cq_mem = view[SQ_BYTES:SQ_BYTES + CQ_BYTES]
        self.allocator = PageAllocator(block.base_pfn + ALLOCATOR_FIRST_PAGE)
        self.sq_doorbell = doorbell_offset(qid, False)
        self.cq_doorbell = doorbell_offset(qid, True)
        self.lock = threading.Lock()
        self.space = threading.Condition(self.lock)  # submitters wait here for SQ room or CIDs
        self.sq_head = self.sq_tail = self.sq_committed_tail = 0
        self.cq_head = self.cq_committed_head = 0
        self.cq_phase = 1
        self.pending: dict[int, Pending] = {}  # slot (cid & 0x3FF) -> entry
        self._free_slots = list(range(MAX_PENDING))  # a heap: the lowest free slot is used first
        self.next_cid_high_bits = 0
        self.stopped: str | None = None
        self.completions = 0
        self.unknown_completions = 0

    @property
    def sq_base(self) -> int:
        return self.block.gpa

    @property
    def cq_base(self) -> int:
        return self.block.gpa + SQ_BYTES

    # -- submission -------------------------------------------------------------------------------
    def _has_room(self) -> bool:
        # Pending is also bounded by the SQ, so a saved table never exceeds its queue (spec §14 validation).
        return (self.sq_tail + 1) % self.sq_len != self.sq_head and len(self.pending) < self.sq_len - 1

    def submit(self, command: Command, callback: Callback | None, pages: list[int] = (),
               timeout: float | None = None) -> int:
        """Queue `command` (its CID is assigned here) and ring the SQ doorbell; returns the CID. `pages` are
        allocator pages freed at completion. Blocks while the SQ is full; DriverStopped once stopped."""
        with self.lock:
            if not self.space.wait_for(lambda: self.stopped or self._has_room(), timeout):
                raise TimeoutError(f"queue {self.qid}: no room in the SQ within {timeout} s")
            if self.stopped:
                raise DriverStopped(f"queue {self.qid} is stopped: {self.stopped}")
            slot = heapq.heappop(self._free_slots)
            cid = (self.next_cid_high_bits | slot) & 0xFFFF
            self.next_cid_high_bits = (self.next_cid_high_bits + CID_SEQ_STEP) & 0xFFFF
            command.cid = cid
            raw = bytes(command)
            self.pending[slot] = Pending(cid, raw, callback, list(pages), False)
            self.sq_mem[self.sq_tail * SQE_SIZE:(self.sq_tail + 1) * SQE_SIZE] = raw
            self.sq_tail = (self.sq_tail + 1) % self.sq_len
            self.sq_committed_tail = self.sq_tail
            self.backing.write32(self.sq_doorbell, self.sq_tail, posted=True)
            return cid

    def alloc_page(self) -> int | None:
        with self.lock:
            return self.allocator.alloc()

    def free_pages(self, pages: list[int]) -> None:
        with self.lock:
            for gpa in pages:
                self.allocator.free(gpa)

    # -- completion -------------------------------------------------------------------------------
    def reap(self) -> list[tuple[Pending, int, int]]:
        """Consume new CQEs (phase-tagged), ring the CQ head doorbell; returns (entry, status, dw0) for the
        caller to run the callbacks outside the lock. A CQE naming no pending command is counted and
        skipped (the reference panics; untrusted device input must not kill the driver)."""
        done = []
        with self.lock:
            if self.stopped:
                return done
            while True:
                off = self.cq_head * CQE_SIZE
                status_word, = struct.unpack_from("<H", self.cq_mem, off + 14)
                if status_word & 1 != self.cq_phase:
                    break
                dw0, _, sqhd, sqid, cid = struct.unpack_from("<IIHHH", self.cq_mem, off)
                self.cq_head += 1
                if self.cq_head == self.cq_len:
                    self.cq_head = 0
                    self.cq_phase ^= 1
                if sqhd < self.sq_len:
                    self.sq_head = sqhd
                entry = self.pending.get(cid & CID_KEY_MASK)
                if sqid != self.qid or entry is None or entry.cid != cid:
                    self.unknown_completions += 1
                    continue
                del self.pending[cid & CID_KEY_MASK]
                heapq.heappush(self._free_slots, cid & CID_KEY_MASK)
                for gpa in entry.pages:
                    self.allocator.free(gpa)
                self.completions += 1
                done.append((entry, status_of(status_word), dw0))
            if self.cq_head != self.cq_committed_head:
                self.cq_committed_head = self.cq_head
                self.backing.write32(self.cq_doorbell, self.cq_head, posted=True)
            if done:
                self.space.notify_all()
        return done

    def stop(self, why: str) -> list[Pending]:
        """No more submissions, completions or doorbells (save, shutdown); returns the pending entries."""
        with self.lock:
            self.stopped = why
            self.space.notify_all()
            return list(self.pending.values())

    # -- PRPs -----------------------------------------------------------------------------------
    def prps(self, gpa: int, length: int) -> tuple[int, int, list[int]]:
        """PRP1, PRP2 and the allocator pages used for a contiguous buffer at `gpa` (spec §5, driver table)."""
        if length <= 0:
            return INVALID_PAGE_ADDR, INVALID_PAGE_ADDR, []
        first_page = gpa & ~(PAGE_SIZE - 1)
        npages = (gpa + length - first_page + PAGE_SIZE - 1) // PAGE_SIZE
        if npages == 1:
            return gpa, INVALID_PAGE_ADDR, []
        if npages == 2:
            return gpa, first_page + PAGE_SIZE, []
        if npages - 1 > PRP_ENTRIES_PER_PAGE:
            raise ValueError(f"a {length}-byte transfer needs a chained PRP list; the driver never chains")
        list_page = self.alloc_page()
        if list_page is None:
            raise BufferError(f"queue {self.qid}: no allocator page for a PRP list")
        entries = [first_page + i * PAGE_SIZE for i in range(1, npages)]
        off = list_page - self.block.gpa
        struct.pack_into(f"<{len(entries)}Q", self.block.view, off, *entries)
        return gpa, list_page, [list_page]

    # -- save / restore ---------------------------------------------------------------------------
    def save(self, aer: pb.AerHandlerSavedState | None = None) -> pb.QueuePairSavedState:
        with self.lock:
            state = pb.QueuePairSavedState(mem_len=self.block.len, base_pfn=self.block.base_pfn, qid=self.qid,
                                           sq_entries=self.sq_len, cq_entries=self.cq_len)
            h = state.handler_data
            h.sq_state.CopyFrom(pb.SubmissionQueueSavedState(sqid=self.qid, head=self.sq_head, tail=self.sq_tail,
                                                             committed_tail=self.sq_committed_tail, len=self.sq_len))
            h.cq_state.CopyFrom(pb.CompletionQueueSavedState(cqid=self.qid, head=self.cq_head,
                                                             committed_head=self.cq_committed_head, len=self.cq_len,
                                                             phase=bool(self.cq_phase)))
            h.pending_cmds.next_cid_high_bits = self.next_cid_high_bits
            h.pending_cmds.cid_key_bits = CID_KEY_BITS
            for slot in sorted(self.pending):
                h.pending_cmds.commands.add(command=self.pending[slot].command)
            if aer is not None:
                h.aer_handler.CopyFrom(aer)
            return state

    @classmethod
    def restore(cls, backing, block, state: pb.QueuePairSavedState, iv: int, cpu: int = 0) -> "QueuePair":
        """Rebuild from a validated state; pending commands come back without responders (`presave`), and the
        allocator pages they name stay reserved until they complete."""
        qp = cls(backing, block, state.qid, state.sq_entries, state.cq_entries, iv, cpu)
        h = state.handler_data
        qp.sq_head, qp.sq_tail, qp.sq_committed_tail = h.sq_state.head, h.sq_state.tail, h.sq_state.committed_tail
        qp.cq_head, qp.cq_committed_head = h.cq_state.head, h.cq_state.committed_head
        qp.cq_phase = int(h.cq_state.phase)
        qp.next_cid_high_bits = h.pending_cmds.next_cid_high_bits
        for saved in h.pending_cmds.commands:
            cmd = Command.from_bytes(saved.command)
            pages = [p for p in (cmd.prp1, cmd.prp2) if qp.allocator.reserve(p)]
            qp.pending[cmd.cid & CID_KEY_MASK] = Pending(cmd.cid, bytes(saved.command), None, pages, True)
        qp._free_slots = [s for s in range(MAX_PENDING) if s not in qp.pending]
        return qp

    def peek_phantom(self) -> bool:
        """True if a completion already waits at the CQ head (written during the handover)."""
        status_word, = struct.unpack_from("<H", self.cq_mem, self.cq_head * CQE_SIZE + 14)
        return status_word & 1 == self.cq_phase

    def inspect(self) -> dict:
        with self.lock:
            return {"qid": self.qid, "iv": self.iv, "cpu": self.cpu, "base_pfn": self.block.base_pfn,
                    "sq": {"len": self.sq_len, "head": self.sq_head, "tail": self.sq_tail},
                    "cq": {"len": self.cq_len, "head": self.cq_head, "phase": self.cq_phase},
                    "pending": len(self.pending), "presave_pending": sum(p.presave for p in self.pending.values()),
                    "completions": self.completions, "unknown_completions": self.unknown_completions,
                    "allocator_free_pages": self.allocator.free_pages, "stopped": self.stopped}
