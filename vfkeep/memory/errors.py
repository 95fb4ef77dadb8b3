"""Typed errors of the page pool and DMA manager, so callers can recover (fallback, FLR) by type."""
from __future__ import annotations

from typing import TYPE_CHECKING

from vfkeep import savestate

if TYPE_CHECKING:
    from vfkeep.contract import UnclaimedAllocation


class DmaError(Exception):
    """Base of every page-pool / DMA-manager error."""


class NoPrivatePool(DmaError):
    """A persistent client was requested but this boot has no private pool (servicing spec 8.1, E6)."""


class OutOfPoolMemory(DmaError):
    """No free slot with a contiguous run large enough (pool or worker RAM)."""


class InvalidSize(DmaError, ValueError):
    """An allocation size that is not a positive number of bytes / pages."""


class DoubleFree(DmaError):
    """A block was freed twice; the slot table is left untouched."""


class DeviceNameInUse(DmaError):
    """A live client of the same kind already holds this device name (servicing spec 8.2)."""


class ClientClosed(DmaError):
    """The client was closed; its name may be taken by a new client."""


class NotPersistent(DmaError):
    """Pool-only operation (attach_pending_buffers) on an ephemeral, worker-RAM client (spec 6.2)."""


class SaveFailed(DmaError, savestate.SaveError):
    """The DMA manager cannot be saved in its current state (e.g. a slot still pending restore)."""


class RestoreError(DmaError, savestate.RestoreError):
    """Saved DMA-manager state is malformed, does not fit this boot's pool, or came too late."""


class UnrestoredAllocations(DmaError):
    """Strict post-restore validation: saved pool allocations nobody re-attached (DESIGN D3)."""

    def __init__(self, message: str, allocations: "list[UnclaimedAllocation]"):
        super().__init__(message)
        self.allocations = allocations
