"""Guest memory file, regions, page allocator and DMA manager (DESIGN §2-3)."""
from .dma_manager import (STRICT_POOL_ENV, VFIO_DMA_TAG, DmaClient, DmaManager, MemoryBlock, UnclaimedAllocation,
                          strict_pool_from_env)
from .errors import (ClientClosed, DeviceNameInUse, DmaError, DoubleFree, InvalidSize, NoPrivatePool, NotPersistent,
                     OutOfPoolMemory, RestoreError, SaveFailed, UnrestoredAllocations)
from .guest_memory import PAGE_SHIFT, PAGE_SIZE, POISON, GuestMemory, MemoryLayout, OutOfBounds, Region
from .page_pool import Allocated, Free, Leaked, PageAllocator, PendingRestore, Slot, SlotState, slots_from_saved
from .pool_config import HEURISTIC_POOL_PAGES, POOL_CONFIG_ENV, POOL_OVERRIDE_ENV, pool_pages_from_env

__all__ = [
    "PAGE_SHIFT", "PAGE_SIZE", "POISON", "GuestMemory", "MemoryLayout", "OutOfBounds", "Region",
    "Allocated", "Free", "Leaked", "PageAllocator", "PendingRestore", "Slot", "SlotState", "slots_from_saved",
    "STRICT_POOL_ENV", "VFIO_DMA_TAG", "DmaClient", "DmaManager", "MemoryBlock", "UnclaimedAllocation",
    "strict_pool_from_env",
    "ClientClosed", "DeviceNameInUse", "DmaError", "DoubleFree", "InvalidSize", "NoPrivatePool", "NotPersistent",
    "OutOfPoolMemory", "RestoreError", "SaveFailed", "UnrestoredAllocations",
    "HEURISTIC_POOL_PAGES", "POOL_CONFIG_ENV", "POOL_OVERRIDE_ENV", "pool_pages_from_env",
]
