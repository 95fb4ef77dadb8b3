"""Test hook: damage the servicing state before handing it to the next worker.

Saved state is untrusted input (DESIGN §6); these are the ways tests prove the worker treats it so.
"""
from __future__ import annotations

import logging

from ..log import kv
from ..memory import MemoryLayout
from ..proto import underhill_pb2

log = logging.getLogger("vfkeep.host.tamper")

TAMPER_MODES = ("truncate", "corrupt", "firmware-missing", "firmware-unknown", "mana-pfn-outside-pool",
                "dma-pfn-outside-pool", "pool-all-leaked", "nvme-pfn-outside-pool")
# Firmware variant 4 does not exist: a unit message under field 4 (key 0x22, length 0), kept as unknown.
_UNKNOWN_FIRMWARE_VARIANT = b"\x22\x00"


def tamper_blob(blob: bytes, mode: str, layout: MemoryLayout) -> bytes:
    """truncate: cut inside the top-level message; corrupt: an invalid wire type in the first key;
    firmware-missing / firmware-unknown: `init_state.firmware_type` without a variant / with variant 4;
    mana-pfn-outside-pool: every saved HWC buffer points past the pool; nvme-pfn-outside-pool: every saved NVMe
    admin queue pair points past the pool; dma-pfn-outside-pool: the
    pool's last slot claims pages past the pool; pool-all-leaked: every pool slot is saved as Leaked
    (valid per servicing spec 8.3, but nothing is left to re-attach or allocate)."""
    if mode == "truncate":
        out = blob[:len(blob) // 2]
    elif mode == "corrupt":
        out = b"\x0f" + blob[1:]
    elif mode in ("firmware-missing", "firmware-unknown", "mana-pfn-outside-pool", "dma-pfn-outside-pool",
                  "pool-all-leaked", "nvme-pfn-outside-pool"):
        state = underhill_pb2.ServicingState.FromString(blob)
        init = state.init_state
        if mode.startswith("firmware-"):
            init.ClearField("firmware_type")
            if mode == "firmware-unknown":
                init.firmware_type.MergeFromString(_UNKNOWN_FIRMWARE_VARIANT)
        elif mode == "mana-pfn-outside-pool":
            for s in init.mana_state.states:
                s.mana_device.gdma.mem.base_pfn = layout.pool.end_pfn + 16
        elif mode == "nvme-pfn-outside-pool":
            for disk in init.nvme_state.nvme_state.nvme_disks:
                disk.driver_state.worker_data.admin.base_pfn = layout.pool.end_pfn + 16
        elif mode == "pool-all-leaked":
            for slot in init.dma_manager_state.private_pool.state:
                slot.state.leaked.device_id, slot.state.leaked.tag = "hostile", "vfio dma"
        elif init.dma_manager_state.private_pool.state:
            init.dma_manager_state.private_pool.state[-1].size_pages += 64
        out = state.SerializeToString()
    else:
        raise ValueError(f"unknown tamper mode {mode!r}; known: {', '.join(TAMPER_MODES)}")
    kv(log, logging.WARNING, "test hook: servicing state tampered", mode=mode, bytes_in=len(blob), bytes_out=len(out))
    return out
