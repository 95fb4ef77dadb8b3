"""Test hook: damage the servicing state before handing it to the next worker.

Saved state is untrusted input (DESIGN §6); these are the ways tests prove the worker treats it so.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ..log import kv

if TYPE_CHECKING:  # (the CLI's `service --tamper` takes TAMPER_MODES: no protobuf and guest memory for it)
    from ..memory import MemoryLayout
    from ..proto import nvme_driver_pb2

log = logging.getLogger("vfkeep.host.tamper")


def _admin(d: nvme_driver_pb2.NvmeDriverSavedState) -> nvme_driver_pb2.QueuePairSavedState:
    return d.worker_data.admin


def _pfn_outside_pool(d, layout: MemoryLayout) -> None:
    _admin(d).base_pfn = layout.pool.end_pfn + 16


def _mem_len(d, layout: MemoryLayout) -> None:
    from ..memory import PAGE_SIZE
    _admin(d).mem_len += PAGE_SIZE


def _qid_out_of_range(d, layout: MemoryLayout) -> None:
    q = d.worker_data.io[-1].queue_data
    q.qid = q.handler_data.sq_state.sqid = q.handler_data.cq_state.cqid = d.worker_data.max_io_queues + 1


def _with_cid(command: bytes, cid: int) -> bytes:
    return command[:2] + cid.to_bytes(2, "little") + command[4:]


def _slot_mask(qp: nvme_driver_pb2.QueuePairSavedState) -> int:
    """The CID bits that index the pending table, as the saver wrote them (`cid_key_bits`, 10)."""
    return (1 << qp.handler_data.pending_cmds.cid_key_bits) - 1


def _cid_out_of_range(d, layout: MemoryLayout) -> None:
    """The admin queue's first pending command (the outstanding AER; await_aen_cid follows it) gets a CID whose
    slot is the queue's entry count: past its pending table."""
    admin = _admin(d)
    h = admin.handler_data
    if not h.pending_cmds.commands:
        h.pending_cmds.commands.add(command=bytes(64))
    first = h.pending_cmds.commands[0]
    old = int.from_bytes(first.command[2:4], "little")
    new = old & ~_slot_mask(admin) | admin.sq_entries
    first.command = _with_cid(first.command, new)
    if h.aer_handler.HasField("await_aen_cid") and h.aer_handler.await_aen_cid == old:
        h.aer_handler.await_aen_cid = new


def _pending_overflow(d, layout: MemoryLayout) -> None:
    """The admin queue's pending table gets as many commands as the queue has entries (one more than fits)."""
    admin = _admin(d)
    cmds = admin.handler_data.pending_cmds.commands
    template = cmds[0].command if cmds else bytes(64)
    mask = _slot_mask(admin)
    used = {int.from_bytes(c.command[2:4], "little") & mask for c in cmds}
    free = (s for s in range(mask + 1) if s not in used)
    while len(cmds) < admin.sq_entries:
        cmds.add(command=_with_cid(template, next(free)))


#: Hostile NVMe saved queues, applied to every saved controller's driver state (field 10000).
NVME_QUEUE_TAMPERS = {"nvme-pfn-outside-pool": _pfn_outside_pool, "nvme-mem-len": _mem_len,
                      "nvme-qid-out-of-range": _qid_out_of_range, "nvme-cid-out-of-range": _cid_out_of_range,
                      "nvme-pending-overflow": _pending_overflow}
TAMPER_MODES = ("truncate", "corrupt", "firmware-missing", "firmware-unknown", "mana-pfn-outside-pool",
                "dma-pfn-outside-pool", "pool-all-leaked", *NVME_QUEUE_TAMPERS, "nvme-state-missing")
# Firmware variant 4 does not exist: a unit message under field 4 (key 0x22, length 0), kept as unknown.
_UNKNOWN_FIRMWARE_VARIANT = b"\x22\x00"


def tamper_blob(blob: bytes, mode: str, layout: MemoryLayout) -> bytes:
    """truncate: cut inside the top-level message; corrupt: an invalid wire type in the first key;
    firmware-missing / firmware-unknown: `init_state.firmware_type` without a variant / with variant 4;
    mana-pfn-outside-pool: every saved HWC buffer points past the pool; dma-pfn-outside-pool: the
    pool's last slot claims pages past the pool; pool-all-leaked: every pool slot is saved as Leaked
    (valid per servicing spec 8.3, but nothing is left to re-attach or allocate); for every saved NVMe
    controller — nvme-pfn-outside-pool: the admin queue pair points past the pool; nvme-mem-len: the admin
    queue pair's `mem_len` is a page too long; nvme-qid-out-of-range: the last IO queue's qid is above
    `max_io_queues`; nvme-cid-out-of-range: an admin pending command's CID slot is past the pending table;
    nvme-pending-overflow: the admin pending table holds as many commands as the queue has entries;
    nvme-state-missing: no field 10000, as in a previous release's blob."""
    if mode == "truncate":
        out = blob[:len(blob) // 2]
    elif mode == "corrupt":
        out = b"\x0f" + blob[1:]
    elif mode in TAMPER_MODES:
        from ..proto import underhill_pb2
        state = underhill_pb2.ServicingState.FromString(blob)
        init = state.init_state
        if mode.startswith("firmware-"):
            init.ClearField("firmware_type")
            if mode == "firmware-unknown":
                init.firmware_type.MergeFromString(_UNKNOWN_FIRMWARE_VARIANT)
        elif mode == "mana-pfn-outside-pool":
            for s in init.mana_state.states:
                s.mana_device.gdma.mem.base_pfn = layout.pool.end_pfn + 16
        elif mode in NVME_QUEUE_TAMPERS:
            for disk in init.nvme_state.nvme_state.nvme_disks:
                NVME_QUEUE_TAMPERS[mode](disk.driver_state, layout)
        elif mode == "nvme-state-missing":
            init.ClearField("nvme_state")
        elif mode == "pool-all-leaked":
            for slot in init.dma_manager_state.private_pool.state:
                slot.state.leaked.device_id, slot.state.leaked.tag = "hostile", "vfio dma"
        elif init.dma_manager_state.private_pool.state:  # dma-pfn-outside-pool
            init.dma_manager_state.private_pool.state[-1].size_pages += 64
        out = state.SerializeToString()
    else:
        raise ValueError(f"unknown tamper mode {mode!r}; known: {', '.join(TAMPER_MODES)}")
    kv(log, logging.WARNING, "test hook: servicing state tampered", mode=mode, bytes_in=len(blob), bytes_out=len(out))
    return out
