"""Guest memory file, regions, page allocator and DMA manager (DESIGN §2-3)."""
from .guest_memory import PAGE_SHIFT, PAGE_SIZE, POISON, GuestMemory, MemoryLayout, OutOfBounds, Region

__all__ = ["PAGE_SHIFT", "PAGE_SIZE", "POISON", "GuestMemory", "MemoryLayout", "OutOfBounds", "Region"]
