"""Page allocator over one memory region: the slot table of OpenVMM's page pool (servicing spec 8.2, 7.3).

The same allocator backs the private pool (persistent DMA, saved across servicing) and worker RAM
(ephemeral DMA, never saved). Slots are first-fit, split on allocation and never merged on free,
exactly like the reference, so fragmentation behaves the same way.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Union

from vfkeep.proto import pagepool_pb2, topology_pb2

from .errors import DoubleFree, InvalidSize, OutOfPoolMemory, RestoreError, SaveFailed
from .guest_memory import PAGE_SHIFT, GuestMemory, Region


@dataclass(frozen=True)
class Free:
    pass


@dataclass(frozen=True)
class Allocated:
    device: str
    tag: str


@dataclass(frozen=True)
class Leaked:
    """Never reused; carried through later saves. Produced by a restore (a saved leaked slot) and by
    `quarantine`: pages a device that could not be reset may still reach by DMA."""
    device: str
    tag: str


@dataclass(frozen=True)
class PendingRestore:
    """A restored allocation waiting for its device to attach it (spec 6.2)."""
    device: str
    tag: str


SlotState = Union[Free, Allocated, Leaked, PendingRestore]
FREE = Free()
_STATE_NAMES = {Free: "free", Allocated: "allocated", Leaked: "leaked", PendingRestore: "pending_restore"}


@dataclass(frozen=True, eq=False)
class Slot:
    """One contiguous run of pages. Slots are immutable and compared by identity: a state change
    replaces the slot object, so a stale handle (e.g. a second free) no longer matches the table."""

    base_pfn: int
    size_pages: int
    state: SlotState

    @property
    def end_pfn(self) -> int:
        return self.base_pfn + self.size_pages


class PageAllocator:
    """Slot table over `region`; new allocations are zeroed through `mem` when given."""

    def __init__(self, region: Region, mem: GuestMemory | None = None, label: str | None = None):
        self.region = region
        self.label = label or region.name
        self._mem = mem
        self._lock = threading.RLock()  # inspect() takes usage() under the same lock
        self._slots: list[Slot] = [Slot(region.base_pfn, region.pages, FREE)] if region.pages else []

    @property
    def slots(self) -> tuple[Slot, ...]:
        with self._lock:
            return tuple(self._slots)

    # -- allocation -----------------------------------------------------------------------
    def allocate(self, pages: int, device: str, tag: str) -> Slot:
        """First fit over free slots; the chosen slot is split, its head becomes the allocation."""
        if not isinstance(pages, int) or isinstance(pages, bool) or pages <= 0:
            raise InvalidSize(f"allocation for {device} must be a positive number of pages, got {pages!r}")
        with self._lock:
            for i, slot in enumerate(self._slots):
                if isinstance(slot.state, Free) and slot.size_pages >= pages:
                    new = Slot(slot.base_pfn, pages, Allocated(device, tag))
                    rest = [Slot(new.end_pfn, slot.size_pages - pages, FREE)] if slot.size_pages > pages else []
                    self._slots[i:i + 1] = [new, *rest]
                    break
            else:
                free, largest = self._free_stats()
                raise OutOfPoolMemory(f"unable to allocate {pages} pages for {device}: {self.label} has "
                                      f"{free} free pages (largest contiguous run {largest})")
            if self._mem is not None:
                self._mem.zero(new.base_pfn << PAGE_SHIFT, pages << PAGE_SHIFT)
            return new

    def free(self, slot: Slot) -> None:
        """Return a live allocation to Free (not merged with neighbours)."""
        with self._lock:
            i = self._index_of(slot)
            if i is None or not isinstance(slot.state, Allocated):
                raise DoubleFree(f"double free of {slot.size_pages} pages at pfn {slot.base_pfn} "
                                 f"in {self.label}: the allocation is no longer live")
            self._slots[i] = Slot(slot.base_pfn, slot.size_pages, FREE)

    def attach_pending(self, device: str) -> list[Slot]:
        """Turn every PendingRestore slot of `device` into a live allocation and return them."""
        with self._lock:
            attached = []
            for i, slot in enumerate(self._slots):
                if isinstance(slot.state, PendingRestore) and slot.state.device == device:
                    self._slots[i] = Slot(slot.base_pfn, slot.size_pages, Allocated(device, slot.state.tag))
                    attached.append(self._slots[i])
            return attached

    def pending_of(self, device: str) -> list[tuple[int, int]]:
        """(base_pfn, pages) of every slot pending restore for `device`."""
        with self._lock:
            return [(s.base_pfn, s.size_pages) for s in self._slots
                    if isinstance(s.state, PendingRestore) and s.state.device == device]

    def quarantine(self, ranges: list[tuple[int, int]], device: str, tag: str) -> int:
        """Mark Leaked (never reused) every free slot overlapping one of `ranges`; returns the pages marked.
        A slot allocated again meanwhile is someone else's and is left as it is."""
        with self._lock:
            marked = 0
            for i, s in enumerate(self._slots):
                if isinstance(s.state, Free) and any(s.base_pfn < b + n and b < s.end_pfn for b, n in ranges):
                    self._slots[i] = Slot(s.base_pfn, s.size_pages, Leaked(device, tag))
                    marked += s.size_pages
            return marked

    def release_quarantined(self, device: str, tag: str) -> int:
        """Free the slots `quarantine` marked for `device` (it has been reset since); returns the pages."""
        with self._lock:
            freed = 0
            for i, s in enumerate(self._slots):
                if isinstance(s.state, Leaked) and (s.state.device, s.state.tag) == (device, tag):
                    self._slots[i] = Slot(s.base_pfn, s.size_pages, FREE)
                    freed += s.size_pages
            return freed

    def pending(self) -> list[Slot]:
        with self._lock:
            return [s for s in self._slots if isinstance(s.state, PendingRestore)]

    def release_pending(self) -> list[Slot]:
        """Free every slot still pending restore; returns the slots as they were."""
        with self._lock:
            released = []
            for i, slot in enumerate(self._slots):
                if isinstance(slot.state, PendingRestore):
                    released.append(slot)
                    self._slots[i] = Slot(slot.base_pfn, slot.size_pages, FREE)
            return released

    def usage(self) -> dict:
        """Page counts by state and pages held per device (allocated, pending or leaked)."""
        with self._lock:
            counts = {Free: 0, Allocated: 0, PendingRestore: 0, Leaked: 0}
            devices: dict[str, int] = {}
            for s in self._slots:
                counts[type(s.state)] += s.size_pages
                if not isinstance(s.state, Free):
                    devices[s.state.device] = devices.get(s.state.device, 0) + s.size_pages
            free, largest = self._free_stats()
            return {
                "total_pages": self.region.pages,
                "free_pages": free,
                "allocated_pages": counts[Allocated],
                "pending_pages": counts[PendingRestore],
                "leaked_pages": counts[Leaked],
                "largest_free_run": largest,
                "slots": len(self._slots),
                "devices": devices,
            }

    def inspect(self) -> dict:
        """`usage()` plus the slot table: every slot's base PFN, pages, state and owner (device and tag)."""
        with self._lock:
            table = [{"base_pfn": s.base_pfn, "pages": s.size_pages, "state": _STATE_NAMES[type(s.state)],
                      "owner": getattr(s.state, "device", None), "tag": getattr(s.state, "tag", None)}
                     for s in self._slots]
            return {**self.usage(), "slot_table": table}

    # -- save / restore -------------------------------------------------------------------
    def save(self) -> pagepool_pb2.PagePoolState:
        """Full slot table plus the region's byte range (spec 7.3)."""
        with self._lock:
            msg = pagepool_pb2.PagePoolState()
            for s in self._slots:
                saved = msg.state.add(base_pfn=s.base_pfn, size_pages=s.size_pages)
                if isinstance(s.state, Free):
                    saved.state.free.SetInParent()
                elif isinstance(s.state, Allocated):
                    saved.state.allocated.device_id, saved.state.allocated.tag = s.state.device, s.state.tag
                elif isinstance(s.state, Leaked):
                    saved.state.leaked.device_id, saved.state.leaked.tag = s.state.device, s.state.tag
                else:
                    raise SaveFailed(f"cannot save {self.label}: slot at pfn {s.base_pfn} ({s.size_pages} pages, "
                                     f"device {s.state.device}) is still pending restore")
            msg.ranges.append(_region_range(self.region))
            return msg

    def restore(self, state: pagepool_pb2.PagePoolState | list[Slot]) -> None:
        """Replace a fresh table with a validated saved one (or the slots `slots_from_saved` made of it for this
        allocator's region); on any error nothing changes."""
        slots = state if isinstance(state, list) else slots_from_saved(state, self.region)
        with self._lock:
            if any(not isinstance(s.state, Free) for s in self._slots):
                raise RestoreError(f"existing allocations present in {self.label}, pool must be empty to restore")
            self._slots = slots

    # -- internals ------------------------------------------------------------------------
    def _index_of(self, slot: Slot) -> int | None:
        for i, s in enumerate(self._slots):
            if s is slot:
                return i
            if s.base_pfn > slot.base_pfn:
                return None
        return None

    def _free_stats(self) -> tuple[int, int]:
        """(free pages, largest free slot): slots are never merged, so one slot is the usable run."""
        sizes = [s.size_pages for s in self._slots if isinstance(s.state, Free)]
        return sum(sizes), max(sizes, default=0)


def _region_range(region: Region) -> topology_pb2.MemoryRange:
    return topology_pb2.MemoryRange(start=region.gpa, end=region.gpa + region.size)


def slots_from_saved(state: pagepool_pb2.PagePoolState, region: Region) -> list[Slot]:
    """Validate an untrusted saved slot table against this boot's region (spec 8.3).

    Slots must cover the region exactly, in order, without gaps or overlaps. Allocated slots come
    back as PendingRestore; Free and Leaked are kept.
    """
    ours = [(region.gpa, region.gpa + region.size)]
    saved = [(r.start, r.end) for r in state.ranges]
    if saved != ours:
        raise RestoreError(f"pool ranges do not match: saved {_fmt_ranges(saved)}, this boot {_fmt_ranges(ours)}")
    slots: list[Slot] = []
    next_pfn = region.base_pfn
    for i, s in enumerate(state.state):  # (the error texts are made only on an error: this runs in the blackout)
        base_pfn, size_pages = s.base_pfn, s.size_pages
        if size_pages == 0:
            raise RestoreError(f"{_where(i, s)}: size must be non-zero")
        if not region.contains_pfn(base_pfn, size_pages):
            raise RestoreError(f"{_where(i, s)} lies outside the pool pfns [{region.base_pfn}, {region.end_pfn})")
        if base_pfn < next_pfn:
            prev = slots[-1]
            raise RestoreError(f"{_where(i, s)} overlaps saved slot pfns [{prev.base_pfn}, {prev.end_pfn})")
        if base_pfn > next_pfn:
            raise RestoreError(f"missing slots in saved state: pfns [{next_pfn}, {base_pfn}) not covered")
        slots.append(Slot(base_pfn, size_pages, _state_from_saved(s, i)))
        next_pfn = base_pfn + size_pages
    if next_pfn != region.end_pfn:
        raise RestoreError(f"missing slots in saved state: pfns [{next_pfn}, {region.end_pfn}) not covered")
    return slots


def _where(i: int, s: pagepool_pb2.SlotSavedState) -> str:
    return f"saved slot {i} (base_pfn {s.base_pfn}, {s.size_pages} pages)"


def _state_from_saved(s: pagepool_pb2.SlotSavedState, i: int) -> SlotState:
    variant = s.state.WhichOneof("variant") if s.HasField("state") else None
    if variant is None:
        raise RestoreError(f"{_where(i, s)} has a missing or unknown slot state")
    if variant == "free":
        return FREE
    owner = getattr(s.state, variant)
    if not owner.device_id:
        raise RestoreError(f"{_where(i, s)} is {variant} but names no device")
    return PendingRestore(owner.device_id, owner.tag) if variant == "allocated" else Leaked(owner.device_id, owner.tag)


def _fmt_ranges(ranges: list[tuple[int, int]]) -> str:
    return "[" + ", ".join(f"{a:#x}..{b:#x}" for a, b in ranges) + "]"
