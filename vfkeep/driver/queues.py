"""Driver side of GDMA queues (gdma spec 4, 6): doorbell pages, CQ/EQ consumers with owner counting,
WQ producers with free-running byte counters.

Queues live in DMA memory (a memoryview over guest memory); the device is told about them either by
ESTABLISH_HWC (the HWC's four pages) or by CREATE_QUEUE / CREATE_WQ_OBJ. Every counter is a u32 that
wraps like the hardware's, so the state saved at servicing (`save()`) can be taken over by the next driver
as is (`restore(...)`, on state that `save_restore` validated).
"""
from __future__ import annotations

from typing import Literal, Protocol

from vfkeep.gdma.constants import DB_CQ, DB_EQ, DB_RQ, DB_SQ, OWNER_MASK, WQE_ALIGNMENT
from vfkeep.gdma.queues import Cqe, Eqe, cq_eq_doorbell_tail, owner_state
from vfkeep.gdma.codec import CQ_EQ_DOORBELL, WQ_DOORBELL
from vfkeep.gdma.regs import doorbell_address
from vfkeep.proto import mana_driver_pb2

from .errors import QueueOverflow

U32 = 0xFFFFFFFF
CQE_SIZE = 64
EQE_SIZE = 16
#: Entries whose owner bytes `CqEq.poll_many` reads first (then twice as many while all are new).
POLL_RUN = 16
#: `bytes.translate` tables per consumer owner count: an entry's last byte -> b"n" new, b"e" empty, b"o" overflow.
_OWNER_STATES = [bytes(ord({"new": "n", "empty": "e", "overflow": "o"}[
    owner_state(b, cur * EQE_SIZE, EQE_SIZE)]) for b in range(256)) for cur in range(OWNER_MASK + 1)]


class Bar0(Protocol):
    """The part of a device backing a doorbell needs."""

    def write64(self, offset: int, value: int, posted: bool = False) -> None: ...

    def write64_posted_many(self, writes: list[tuple[int, int]]) -> None: ...


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


class DoorbellPage:
    """One doorbell page of BAR0 (gdma spec 4.1); every doorbell is one posted 64-bit write."""

    def __init__(self, bar0: Bar0, zone_offset: int, shift: int, page_id: int, page_count: int):
        if not 0 <= page_id < page_count:
            raise ValueError(f"doorbell page id {page_id} is not below the {page_count} doorbell pages of BAR0")
        self.bar0 = bar0
        self.page_id = page_id
        self.page_count = page_count
        self._zone_offset = zone_offset
        self._shift = shift

    def address(self, queue_offset: int) -> int:
        return doorbell_address(self._zone_offset, self.page_id, queue_offset, self._shift)

    def ring(self, address: int, value: int) -> None:
        # Posted: the server handles messages in order, so the next read or reply flushes it.
        self.bar0.write64(address, value, posted=True)

    def ring_many(self, writes: list[tuple[int, int]]) -> None:
        """Several doorbells (address, value), e.g. from `CqEq.arm_write` and `Wq.commit_write`, in this order as
        one burst of posted writes: the device takes them in one wake-up."""
        self.bar0.write64_posted_many(writes)

    def save(self) -> mana_driver_pb2.DoorbellSavedState:
        return mana_driver_pb2.DoorbellSavedState(doorbell_id=self.page_id, page_count=self.page_count)


class CqEq:
    """Consumer of a CQ (64-byte CQEs) or EQ (16-byte EQEs).

    `next` is the free-running byte counter of the next entry; it starts at the queue size so that the
    first pass expects owner count 1 while zeroed memory (owner 0) reads as empty (gdma spec 6.5).
    """

    def __init__(self, kind: Literal["cq", "eq"], mem: memoryview, queue_id: int, doorbell: DoorbellPage | None,
                 next_offset: int | None = None):
        size = len(mem)
        self.kind = kind
        self.entry_size = CQE_SIZE if kind == "cq" else EQE_SIZE
        if not is_power_of_two(size) or size < self.entry_size:
            raise ValueError(f"{kind} size {size} is not a power of two of at least {self.entry_size} bytes")
        self.mem = mem
        self.size = size
        self.doorbell_offset = DB_CQ if kind == "cq" else DB_EQ
        self.next = size if next_offset is None else next_offset
        self._entry = Cqe if kind == "cq" else Eqe
        self.bind(queue_id, doorbell)

    @classmethod
    def restore(cls, kind: Literal["cq", "eq"], state: mana_driver_pb2.CqEqSavedState, mem: memoryview,
                doorbell: DoorbellPage) -> CqEq:
        """The consumer a previous driver saved, over the same memory (its first `state.size` bytes)."""
        return cls(kind, mem[:state.size], state.id, doorbell, state.next)

    def save(self) -> mana_driver_pb2.CqEqSavedState:
        return mana_driver_pb2.CqEqSavedState(doorbell=self.doorbell.save(), doorbell_addr=self.doorbell_offset,
                                              id=self.id, next=self.next, size=self.size, shift=self.shift)

    def bind(self, queue_id: int, doorbell: DoorbellPage | None) -> None:
        """Set id and doorbell; the HWC EQ learns both only from its own first events."""
        self.id = queue_id
        self.doorbell = doorbell
        self._db_addr = None if doorbell is None else doorbell.address(self.doorbell_offset)

    @property
    def shift(self) -> int:
        return self.size.bit_length() - 1

    def poll_offset(self) -> int | None:
        """Byte offset of the next new entry in `mem` (and consume it), or None when the queue is empty."""
        off = self.next & (self.size - 1)
        state = owner_state(self.mem[off + self.entry_size - 1], self.next, self.size)
        if state == "empty":
            return None
        if state == "overflow":
            raise QueueOverflow(f"{self.kind} {self.id} overflowed: the device lapped the consumer at "
                                f"byte counter {self.next}")
        self.next = (self.next + self.entry_size) & U32
        return off

    def poll_many(self, max_entries: int) -> list[int]:
        """Byte offsets in `mem` of up to `max_entries` new entries, in order (all consumed): the owner bytes
        of a run are read at once (§6.5), so a batch costs a few slicing operations, not a poll per entry. The runs
        start at POLL_RUN entries and double while all are new: each owner byte is a cache line of the queue, and
        a poll usually finds a few entries or none (a run to the ring end read hundreds, cold, per poll)."""
        out: list[int] = []
        esz, size = self.entry_size, self.size
        chunk = POLL_RUN
        while len(out) < max_entries:
            off = self.next & (size - 1)
            # up to the ring end (the lap changes there)
            run = min(max_entries - len(out), (size - off) // esz, chunk)
            chunk *= 2
            cur = (self.next // size) & OWNER_MASK
            states = bytes(self.mem[off + esz - 1:off + run * esz:esz]).translate(_OWNER_STATES[cur])
            new = len(states) - len(states.lstrip(b"n"))
            out.extend(range(off, off + new * esz, esz))
            self.next = (self.next + new * esz) & U32
            if new < run:
                if states[new:new + 1] == b"o" and not out:  # entries before it are returned first, as by polls
                    raise QueueOverflow(f"{self.kind} {self.id} overflowed: the device lapped the consumer at "
                                        f"byte counter {self.next}")
                break
        return out

    def pending(self) -> bool:
        """True if a new entry is waiting (nothing consumed)."""
        off = self.next & (self.size - 1)
        return owner_state(self.mem[off + self.entry_size - 1], self.next, self.size) != "empty"

    def poll(self) -> Cqe | Eqe | None:
        """Copy of the next new entry, or None."""
        off = self.poll_offset()
        return None if off is None else self._entry.from_buffer_copy(self.mem, off)

    def ack(self) -> None:
        """Report consumption without asking for a notification (arm = 0)."""
        self._ring(0)

    def arm(self) -> None:
        """Ask for a notification; the device fires at once if unconsumed entries remain (gdma spec 4.2)."""
        self._ring(1)

    def arm_write(self) -> tuple[int, int]:
        """The (address, value) of `arm()`, for `DoorbellPage.ring_many`."""
        return self._db_addr, self._doorbell_value(1)

    def _ring(self, arm: int) -> None:
        self.doorbell.ring(self._db_addr, self._doorbell_value(arm))

    def _doorbell_value(self, arm: int) -> int:
        tail = cq_eq_doorbell_tail(self.next, self.size, self.entry_size)
        return CQ_EQ_DOORBELL.pack(id=self.id, tail=tail, arm=arm)


class Wq:
    """Producer of an SQ or RQ (gdma spec 6.2.2).

    `tail` is where the next WQE goes; `head` is the free-space limit (starts at the ring size and
    advances by a WQE's length once its completion has been consumed). Free bytes = head - tail.
    """

    def __init__(self, kind: Literal["sq", "rq"], mem: memoryview, queue_id: int, doorbell: DoorbellPage,
                 head: int | None = None, tail: int = 0):
        size = len(mem)
        if not is_power_of_two(size) or size < WQE_ALIGNMENT:
            raise ValueError(f"{kind} size {size} is not a power of two of at least {WQE_ALIGNMENT} bytes")
        self.kind = kind
        self.mem = mem
        self.size = size
        self.mask = size - 1
        self.id = queue_id
        self.doorbell = doorbell
        self.doorbell_offset = DB_SQ if kind == "sq" else DB_RQ
        self._db_addr = doorbell.address(self.doorbell_offset)
        self.head = size if head is None else head
        self.tail = tail

    @classmethod
    def restore(cls, kind: Literal["sq", "rq"], state: mana_driver_pb2.WqSavedState, mem: memoryview,
                doorbell: DoorbellPage) -> Wq:
        """The producer a previous driver saved, over the same memory (its first `state.mask + 1` bytes)."""
        return cls(kind, mem[:state.mask + 1], state.id, doorbell, state.head, state.tail)

    def save(self) -> mana_driver_pb2.WqSavedState:
        return mana_driver_pb2.WqSavedState(doorbell=self.doorbell.save(), doorbell_addr=self.doorbell_offset,
                                            id=self.id, head=self.head, tail=self.tail, mask=self.mask)

    @property
    def available(self) -> int:
        return (self.head - self.tail) & U32

    @property
    def in_flight(self) -> int:
        return self.size - self.available

    def write(self, wqe: bytes | bytearray | memoryview) -> None:
        """Copy one WQE to the tail (wrapping at the ring end) and advance the tail; the caller checked space."""
        n = len(wqe)
        off = self.tail & self.mask
        first = min(n, self.size - off)
        self.mem[off:off + first] = wqe[:first]
        if first < n:
            self.mem[0:n - first] = wqe[first:]
        self.tail = (self.tail + n) & U32

    def advance_tail(self, nbytes: int) -> None:
        self.tail = (self.tail + nbytes) & U32

    def advance_head(self, nbytes: int) -> None:
        self.head = (self.head + nbytes) & U32

    def commit(self, num_rwqe: int = 0) -> None:
        """Ring the doorbell with the current tail; `num_rwqe` (RQ only) is truncated to 8 bits."""
        self.doorbell.ring(*self.commit_write(num_rwqe))

    def commit_write(self, num_rwqe: int = 0) -> tuple[int, int]:
        """The (address, value) of `commit(num_rwqe)`, for `DoorbellPage.ring_many`."""
        return self._db_addr, WQ_DOORBELL.pack(id=self.id, num_rwqe=num_rwqe & 0xFF, tail=self.tail)
