"""Validation of the NVMe driver saved state (spec nvme.md §14) before any use.

Saved state is untrusted input (DESIGN §6): every size, index, id and CID is
checked, and every queue pair must sit on a block the device's own
persistent DMA client re-attached, matched by exact (mem_len, base_pfn) —
so the restored driver can only ever write into the device's own pages. A
bad state is an `InvalidSavedState`; the NVMe manager then takes the fresh
path. (The reference panics on a missing admin queue or an unmatched block,
§19 N3; vfkeep refuses instead.)
"""
from __future__ import annotations

from vfkeep.nvme import CID_KEY_MASK, IDENTIFY_SIZE, MAX_NSID, MAX_QES, QUEUE_PAIR_MEM_LEN, SQE_SIZE
from vfkeep.proto import nvme_driver_pb2 as pb
from vfkeep.savestate import parse_saved

from .errors import InvalidSavedState, RestoredMemoryNotFound

#: qids are u16 and 0xFFFF is never a valid queue.
MAX_QID = 0xFFFE


def decode(state: pb.NvmeDriverSavedState | bytes) -> pb.NvmeDriverSavedState:
    return parse_saved(pb.NvmeDriverSavedState, state, "nvme driver saved state", InvalidSavedState)


def _check_queue_pair(name: str, qp: pb.QueuePairSavedState, qid: int | None) -> None:
    if qp.mem_len != QUEUE_PAIR_MEM_LEN:
        raise InvalidSavedState(f"{name}: mem_len {qp.mem_len} is not the {QUEUE_PAIR_MEM_LEN}-byte queue pair block")
    if qid is not None and qp.qid != qid:
        raise InvalidSavedState(f"{name}: qid {qp.qid}, expected {qid}")
    if not 1 <= qp.qid <= MAX_QID and qid != 0:
        raise InvalidSavedState(f"{name}: qid {qp.qid} is not in 1..{MAX_QID}")
    for what, n in (("sq_entries", qp.sq_entries), ("cq_entries", qp.cq_entries)):
        if not 2 <= n <= MAX_QES:
            raise InvalidSavedState(f"{name}: {what} {n} is not in 2..{MAX_QES}")
    h = qp.handler_data
    sq, cq = h.sq_state, h.cq_state
    if sq.sqid != qp.qid or cq.cqid != qp.qid:
        raise InvalidSavedState(f"{name}: sqid {sq.sqid} / cqid {cq.cqid} differ from qid {qp.qid}")
    if sq.len != qp.sq_entries or cq.len != qp.cq_entries:
        raise InvalidSavedState(f"{name}: ring lengths {sq.len}/{cq.len} differ from entries "
                                f"{qp.sq_entries}/{qp.cq_entries}")
    for what, value, limit in (("sq head", sq.head, sq.len), ("sq tail", sq.tail, sq.len),
                               ("sq committed_tail", sq.committed_tail, sq.len), ("cq head", cq.head, cq.len),
                               ("cq committed_head", cq.committed_head, cq.len)):
        if value >= limit:
            raise InvalidSavedState(f"{name}: {what} {value} is not below the ring length {limit}")
    commands = h.pending_cmds.commands
    if len(commands) > qp.sq_entries - 1:
        raise InvalidSavedState(f"{name}: {len(commands)} pending commands, more than the {qp.sq_entries - 1} a "
                                f"{qp.sq_entries}-entry queue holds (one entry stays empty)")
    if h.pending_cmds.next_cid_high_bits > 0xFFFF:
        raise InvalidSavedState(f"{name}: next_cid_high_bits {h.pending_cmds.next_cid_high_bits} is not a u16")
    slots = set()
    for c in commands:
        if len(c.command) != SQE_SIZE:
            raise InvalidSavedState(f"{name}: a pending command is {len(c.command)} bytes, not {SQE_SIZE}")
        cid = int.from_bytes(c.command[2:4], "little")
        # Slots are taken lowest free first and at most sq_entries - 1 commands are pending at a time, so a
        # saver never uses a slot at or beyond sq_entries - 1.
        if cid & CID_KEY_MASK >= qp.sq_entries - 1:
            raise InvalidSavedState(f"{name}: CID {cid:#06x} names slot {cid & CID_KEY_MASK}, beyond the "
                                    f"{qp.sq_entries - 1}-entry pending table")
        if cid & CID_KEY_MASK in slots:
            raise InvalidSavedState(f"{name}: two pending commands share CID slot {cid & CID_KEY_MASK}")
        slots.add(cid & CID_KEY_MASK)


def pending_cids(qp: pb.QueuePairSavedState) -> set[int]:
    return {int.from_bytes(c.command[2:4], "little") for c in qp.handler_data.pending_cmds.commands}


def validate(state: pb.NvmeDriverSavedState, *, msix_count: int, cpu_count: int) -> None:
    """Every field the restore uses, against this boot's MSI-X count and VP count."""
    if len(state.identify_ctrl) != IDENTIFY_SIZE:
        raise InvalidSavedState(f"identify_ctrl is {len(state.identify_ctrl)} bytes, not {IDENTIFY_SIZE}")
    nsids = set()
    for ns in state.namespaces:
        if not 1 <= ns.nsid <= MAX_NSID or ns.nsid in nsids:
            raise InvalidSavedState(f"namespace id {ns.nsid} is out of 1..{MAX_NSID} or repeated")
        if len(ns.identify_ns) != IDENTIFY_SIZE:
            raise InvalidSavedState(f"namespace {ns.nsid}: identify_ns is {len(ns.identify_ns)} bytes")
        nsids.add(ns.nsid)
    w = state.worker_data
    if not w.HasField("admin"):
        raise InvalidSavedState("saved state has no admin queue")
    if not 2 <= w.qsize <= MAX_QES:
        raise InvalidSavedState(f"qsize {w.qsize} is not in 2..{MAX_QES}")
    if not 1 <= w.max_io_queues <= MAX_QID or len(w.io) > w.max_io_queues:
        raise InvalidSavedState(f"{len(w.io)} IO queues with max_io_queues {w.max_io_queues}")
    _check_queue_pair("admin queue", w.admin, 0)
    aer = w.admin.handler_data.aer_handler
    if w.admin.handler_data.HasField("aer_handler") and aer.HasField("await_aen_cid"):
        if aer.await_aen_cid not in pending_cids(w.admin):
            raise InvalidSavedState(f"await_aen_cid {aer.await_aen_cid} names no pending admin command")
    qids = set()
    for q in w.io:
        name = f"IO queue {q.queue_data.qid}"
        _check_queue_pair(name, q.queue_data, None)
        if q.queue_data.qid in qids or q.queue_data.qid > w.max_io_queues:
            raise InvalidSavedState(f"{name}: qid repeated or above max_io_queues {w.max_io_queues}")
        if q.queue_data.handler_data.HasField("aer_handler"):
            raise InvalidSavedState(f"{name}: only the admin queue has an AER handler")
        if q.iv >= msix_count:
            raise InvalidSavedState(f"{name}: MSI-X vector {q.iv} is not below the device's {msix_count}")
        if q.cpu >= cpu_count:
            raise InvalidSavedState(f"{name}: cpu {q.cpu} is not below the saved cpu_count {cpu_count}")
        qids.add(q.queue_data.qid)


def match_blocks(state: pb.NvmeDriverSavedState, blocks: list) -> dict[int, object]:
    """qid -> the re-attached block with the queue pair's exact (len, base_pfn); each block used once."""
    by_key = {(b.len, b.base_pfn): b for b in blocks}
    out: dict[int, object] = {}
    pairs = [state.worker_data.admin] + [q.queue_data for q in state.worker_data.io]
    used = set()
    for qp in pairs:
        key = (qp.mem_len, qp.base_pfn)
        block = by_key.get(key)
        if block is None:
            raise RestoredMemoryNotFound(f"queue {qp.qid}: no re-attached block of {qp.mem_len} bytes at pfn "
                                         f"{qp.base_pfn} (a PFN outside the device's pool pages)")
        if key in used:
            raise InvalidSavedState(f"queue {qp.qid}: block at pfn {qp.base_pfn} already used by another queue")
        used.add(key)
        out[qp.qid] = block
    return out
