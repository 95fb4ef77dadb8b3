"""Worker DMA manager: persistent clients on the private pool, ephemeral ones on worker RAM (DESIGN §3).

Only the pool is saved. After a restore each device's persistent client calls
`attach_pending_buffers()` to take its saved allocations back; `validate_restore()` then applies
DESIGN D3 to whatever nobody attached.
"""
from __future__ import annotations

import logging
import os
import threading
import weakref
from typing import Mapping

from vfkeep.contract import STRICT_POOL_ENV, UnclaimedAllocation
from vfkeep.log import kv
from vfkeep.proto import dma_manager_pb2
from vfkeep.savestate import parse_saved

from .errors import (ClientClosed, DeviceNameInUse, InvalidSize, NoPrivatePool, NotPersistent, RestoreError,
                     UnrestoredAllocations)
from .guest_memory import PAGE_SHIFT, PAGE_SIZE, GuestMemory, Region
from .page_pool import PageAllocator, Slot, slots_from_saved

log = logging.getLogger("vfkeep.memory.dma")

#: Allocation tag of driver buffers (servicing spec 7.3).
VFIO_DMA_TAG = "vfio dma"
#: Tag of the Leaked slots `quarantine` makes.
QUARANTINE_TAG = "quarantined: device not reset"


def strict_pool_from_env(environ: Mapping[str, str]) -> bool:
    """`VFKEEP_STRICT_POOL=1` reproduces OpenHCL's strict post-restore validation (DESIGN D3)."""
    return environ.get(STRICT_POOL_ENV, "") == "1"


class MemoryBlock:
    """Contiguous DMA memory owned by a driver. Pages return to the allocator only through `free()`
    (Python has no reliable drop, so "attach then drop" from spec 6.2 is "attach then free")."""

    def __init__(self, mem: GuestMemory, allocator: PageAllocator, slot: Slot, persistent: bool):
        self._mem = mem
        self._allocator = allocator
        self._slot = slot
        self.persistent = persistent
        self.device: str = slot.state.device
        self.tag: str = slot.state.tag

    @property
    def base_pfn(self) -> int:
        return self._slot.base_pfn

    @property
    def pages(self) -> int:
        return self._slot.size_pages

    @property
    def pfns(self) -> list[int]:
        return list(range(self._slot.base_pfn, self._slot.end_pfn))

    @property
    def len(self) -> int:
        return self._slot.size_pages << PAGE_SHIFT

    @property
    def gpa(self) -> int:
        return self._slot.base_pfn << PAGE_SHIFT

    @property
    def view(self) -> memoryview:
        return self._mem.page_view(self._slot.base_pfn, self._slot.size_pages)

    def free(self) -> None:
        """Return the pages; a second call raises DoubleFree and changes nothing."""
        self._allocator.free(self._slot)

    def __repr__(self) -> str:
        kind = "pool" if self.persistent else "worker"
        return f"MemoryBlock({self.device}, {kind}, pfn {self.base_pfn}, {self.pages} pages)"


class DmaClient:
    """One device's allocator on the pool (persistent) or worker RAM (ephemeral)."""

    def __init__(self, mem: GuestMemory, allocator: PageAllocator, device_name: str, persistent: bool):
        self._mem = mem
        self._allocator = allocator
        self.device_name = device_name
        self.persistent = persistent
        self.closed = False

    @property
    def region(self) -> Region:
        """The guest pages this client allocates from (the pool or worker RAM)."""
        return self._allocator.region

    def allocate_dma_buffer(self, nbytes: int) -> MemoryBlock:
        """Zeroed, physically contiguous buffer of `nbytes` rounded up to whole pages."""
        self._check_open()
        if not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes <= 0:
            raise InvalidSize(f"dma buffer for {self.device_name} must be a positive number of bytes, got {nbytes!r}")
        pages = (nbytes + PAGE_SIZE - 1) // PAGE_SIZE
        slot = self._allocator.allocate(pages, self.device_name, VFIO_DMA_TAG)
        return MemoryBlock(self._mem, self._allocator, slot, self.persistent)

    def attach_pending_buffers(self) -> list[MemoryBlock]:
        """Take every saved allocation of this device back (spec 6.2). Already-live slots are never
        returned, so a second call returns []."""
        self._check_open()
        if not self.persistent:
            raise NotPersistent(f"attach_pending_buffers on ephemeral client {self.device_name}: "
                                f"only pool-backed clients have saved allocations")
        blocks = [MemoryBlock(self._mem, self._allocator, s, True)
                  for s in self._allocator.attach_pending(self.device_name)]
        kv(log, logging.INFO, "attached pending buffers", device=self.device_name, blocks=len(blocks),
           pages=sum(b.pages for b in blocks))
        return blocks

    def close(self) -> None:
        """Release the device name. Outstanding blocks stay live and pass to the name's next client."""
        self.closed = True

    def _check_open(self) -> None:
        if self.closed:
            raise ClientClosed(f"dma client {self.device_name} is closed")


class DmaManager:
    """Owns the private pool and worker-RAM allocators of one worker process."""

    def __init__(self, mem: GuestMemory, strict_pool: bool | None = None):
        self.mem = mem
        self.strict_pool = strict_pool_from_env(os.environ) if strict_pool is None else strict_pool
        self._pool = PageAllocator(mem.layout.pool, mem, "pool")
        self._worker = PageAllocator(mem.layout.worker, mem, "worker RAM")
        self._lock = threading.Lock()
        self._clients: dict[tuple[bool, str], weakref.ref[DmaClient]] = {}
        self._client_created = False
        self._restored = False
        #: (saved state message, its pool slots or the RestoreError it raises) checked by `prepare_restore`.
        self._prepared: tuple | None = None

    @property
    def has_pool(self) -> bool:
        return self.mem.layout.pool_pages > 0

    def new_client(self, device_name: str, persistent: bool) -> DmaClient:
        """A device name can be held by one live client per kind; a closed or dropped client's
        name can be taken again (servicing spec 8.2)."""
        if not device_name:
            raise ValueError("dma client needs a non-empty device name")
        if persistent and not self.has_pool:
            raise NoPrivatePool("no sources available for private persistent allocations")
        key = (persistent, device_name)
        with self._lock:
            ref = self._clients.get(key)
            holder = ref() if ref is not None else None
            if holder is not None and not holder.closed:
                kind = "persistent" if persistent else "ephemeral"
                raise DeviceNameInUse(f"device name {device_name!r} is already held by a live {kind} dma client")
            client = DmaClient(self.mem, self._pool if persistent else self._worker, device_name, persistent)
            self._clients[key] = weakref.ref(client)
            self._client_created = True
            return client

    # -- servicing ------------------------------------------------------------------------
    def save(self) -> dma_manager_pb2.OpenhclDmaManagerState:
        """Pool slot table and ranges; worker RAM is never saved. SaveFailed while a slot is still
        pending restore."""
        msg = dma_manager_pb2.OpenhclDmaManagerState()
        if self.has_pool:
            msg.private_pool.CopyFrom(self._pool.save())
        return msg

    def prepare_restore(self, state: dma_manager_pb2.OpenhclDmaManagerState) -> None:
        """Check `state` now for a later `restore` of the same message, which then only installs the slot table
        made here (or raises the error found here): a new worker does it with the state it decoded before the
        host's go, so the check is not in the guest's blackout. Nothing is applied: the pool stays as it is."""
        try:
            self._prepared = (state, self._saved_slots(state))
        except RestoreError as e:
            self._prepared = (state, e)

    def _saved_slots(self, state: dma_manager_pb2.OpenhclDmaManagerState | bytes) -> list | None:
        """The pool's slot table of untrusted saved `state`, checked against this boot (None: no pool state)."""
        msg = parse_saved(dma_manager_pb2.OpenhclDmaManagerState, state, "dma manager saved state", RestoreError)
        if msg.HasField("shared_pool"):
            raise RestoreError("saved state for shared pool but no shared pool")
        if not msg.HasField("private_pool"):
            return None
        if not self.has_pool:
            raise RestoreError("saved state for private pool but no private pool")
        return slots_from_saved(msg.private_pool, self._pool.region)

    def restore(self, state: dma_manager_pb2.OpenhclDmaManagerState | bytes) -> None:
        """Load untrusted saved state before any client exists; saved allocations become pending.
        Raises RestoreError and leaves the pool untouched on any problem."""
        prepared, self._prepared = self._prepared, None
        with self._lock:
            if self._client_created:
                raise RestoreError("existing allocators present, pool must be empty to restore")
            if self._restored:
                raise RestoreError("dma manager state was already restored")
            slots = prepared[1] if prepared is not None and prepared[0] is state else self._saved_slots(state)
            if isinstance(slots, RestoreError):
                raise slots
            if slots is not None:
                self._pool.restore(slots)
            self._restored = True
        usage = self._pool.usage()
        kv(log, logging.INFO, "dma manager restored", pending_pages=usage["pending_pages"],
           leaked_pages=usage["leaked_pages"], devices=",".join(sorted(usage["devices"])))

    def validate_restore(self) -> list[UnclaimedAllocation]:
        """DESIGN D3: free and return pool allocations nobody attached, or in strict mode raise
        UnrestoredAllocations (OpenHCL's behaviour) leaving them pending."""
        if self.strict_pool:
            unclaimed = [_unclaimed(s) for s in self._pool.pending()]
            if unclaimed:
                names = "; ".join(f"{u.device} (base_pfn {u.base_pfn}, {u.pages} pages, tag {u.tag!r})"
                                  for u in unclaimed)
                raise UnrestoredAllocations(f"unrestored allocations found: {names}", unclaimed)
            return []
        unclaimed = [_unclaimed(s) for s in self._pool.release_pending()]
        for u in unclaimed:
            kv(log, logging.WARNING, "freed unclaimed pool allocation", device=u.device, base_pfn=u.base_pfn,
               pages=u.pages, tag=u.tag)
        return unclaimed

    # -- a device that may still reach freed pages ----------------------------------------
    def saved_pages(self, device_name: str) -> list[tuple[int, int]]:
        """(base_pfn, pages) the pool holds pending restore for `device_name` (the pool's own record, not
        the device's untrusted saved state)."""
        return self._pool.pending_of(device_name) if self.has_pool else []

    def quarantine(self, device_name: str, ranges: list[tuple[int, int]]) -> int:
        """Never hand out again the free pool pages of `ranges`: a device that could not be reset may still
        write them (its queues were there). Carried through saves until `release_quarantined`."""
        pages = self._pool.quarantine(ranges, device_name, QUARANTINE_TAG) if ranges and self.has_pool else 0
        if pages:
            kv(log, logging.WARNING, "pool pages quarantined: the device was not reset", device=device_name,
               pages=pages)
        return pages

    def release_quarantined(self, device_name: str) -> int:
        """The device has been reset since: its quarantined pages are free again."""
        pages = self._pool.release_quarantined(device_name, QUARANTINE_TAG) if self.has_pool else 0
        if pages:
            kv(log, logging.INFO, "quarantined pool pages released: the device was reset", device=device_name,
               pages=pages)
        return pages

    def inspect(self) -> dict:
        """Both allocators: page totals, pages per device and the slot table (`PageAllocator.inspect`)."""
        return {"pool": self._pool.inspect(), "worker_ram": self._worker.inspect()}


def _unclaimed(slot: Slot) -> UnclaimedAllocation:
    return UnclaimedAllocation(slot.state.device, slot.base_pfn, slot.size_pages, slot.state.tag)
