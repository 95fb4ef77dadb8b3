"""BAR0 of the emulated VF (spec gdma.md §3, §4): RegMap, SMC window, doorbell page.

| range | reads | writes |
|---|---|---|
| 0x0000–0x0027 `RegMap` | register bytes, any size | ignored |
| 0x0028–0x0047 SMC window | current contents (may complete a lazy DESTROY_HWC) | stored; touching the header dword starts processing |
| 0x0048–0x0FFF | all ones | ignored |
| 0x1000–0x1FFF doorbell page 0 | all ones | 8-byte writes only, others ignored (counted `bad_doorbells`) |

An access is served by a range only if it lies entirely inside it. Reads of
any size work inside `RegMap`: Linux's driver reads 0x08 and 0x18 as u64
(`readq`) and 0x10 as u32 (gdma.md Appendix L.2), OpenHCL's reads dwords. After a
surprise removal every read returns all ones and writes are dropped (§3.3).
"""
from __future__ import annotations

from vfkeep.gdma.constants import (
    EMU_BAR0_SIZE,
    EMU_DB_PAGE_SIZE,
    EMU_DB_ZONE_OFFSET,
    EMU_MAJOR_VERSION,
    EMU_MICRO_VERSION,
    EMU_MINOR_VERSION,
    EMU_REGMAP_OFFSET,
    EMU_REGMAP_SIZE,
    EMU_SHMEM_OFFSET,
    EMU_SHMEM_SIZE,
)
from vfkeep.gdma.regs import RegMap

REGMAP_BYTES = RegMap(
    micro_version_number=EMU_MICRO_VERSION,
    minor_version_number=EMU_MINOR_VERSION,
    major_version_number=EMU_MAJOR_VERSION,
    vf_db_pages_zone_offset=EMU_DB_ZONE_OFFSET,
    vf_db_page_sz=EMU_DB_PAGE_SIZE,
    vf_gdma_sriov_shared_reg_start=EMU_SHMEM_OFFSET,
    vf_gdma_sriov_shared_sz=EMU_SHMEM_SIZE,
).to_bytes()
assert len(REGMAP_BYTES) == EMU_REGMAP_SIZE

DOORBELL_BYTES = 8


def _inside(offset: int, size: int, start: int, length: int) -> bool:
    return start <= offset and offset + size <= start + length


class Bar0:
    """Decodes BAR0 accesses for a `GdmaDevice` (its `smc`, `doorbell()` and `removed` flag)."""

    size = EMU_BAR0_SIZE

    def __init__(self, dev):
        self.dev = dev

    def read(self, offset: int, size: int) -> bytes:
        dev = self.dev
        if not dev.removed:
            if _inside(offset, size, EMU_REGMAP_OFFSET, EMU_REGMAP_SIZE):
                start = offset - EMU_REGMAP_OFFSET
                return dev.hostile.regmap(REGMAP_BYTES)[start:start + size]
            if _inside(offset, size, EMU_SHMEM_OFFSET, EMU_SHMEM_SIZE):
                return dev.smc.read(offset - EMU_SHMEM_OFFSET, size)
        return b"\xff" * size

    def write(self, offset: int, data: bytes) -> None:
        dev = self.dev
        if dev.removed:
            return
        if _inside(offset, len(data), EMU_SHMEM_OFFSET, EMU_SHMEM_SIZE):
            dev.smc.write(offset - EMU_SHMEM_OFFSET, bytes(data))
        elif _inside(offset, len(data), EMU_DB_ZONE_OFFSET, EMU_DB_PAGE_SIZE):
            if len(data) == DOORBELL_BYTES:
                dev.doorbell(offset - EMU_DB_ZONE_OFFSET, int.from_bytes(data, "little"))
            else:
                dev.counters["bad_doorbells"] += 1


__all__ = ["Bar0", "REGMAP_BYTES"]
