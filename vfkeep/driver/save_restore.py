"""Validators of MANA driver saved state (servicing spec 5.3, 6.3, 7.2; DESIGN D7 for kept vports).

Saved state is untrusted input (DESIGN §6): every PFN, id, size and index is checked against this boot's
pool and BAR0 before a single byte of guest memory is touched. A bad blob is an `InvalidSavedState`. Saving
and restoring themselves are the components' `save()` / `restore(...)` (queues, `GdmaDriver`, `Vport`,
`ManaDevice`), which only ever see state that passed here.
"""
from __future__ import annotations

from dataclasses import dataclass

from vfkeep.gdma.constants import DB_CQ, DB_EQ, DB_RQ, DB_SQ, DRV_HWC_NUM_PAGES, DRV_HWC_SWQE_SIZE, PAGE_SIZE
from vfkeep.gdma.constants import RWQE_SIZE, WQE_ALIGNMENT
from vfkeep.memory.guest_memory import Region
from vfkeep.proto import mana_driver_pb2
from vfkeep.savestate import parse_saved

from .backing import DmaBuffer
from .errors import InvalidSavedState
from .gdma_driver import HWC_BUFFER_LEN, Bar0Layout
from .queues import CQE_SIZE, EQE_SIZE, U32, is_power_of_two
from .datapath import RX_WQE_LEN, buffer_counts, tx_wqe_len
from .vport import MAX_QUEUE_SIZE, SAVED_BLOCKS

QUEUE_ID_LIMIT = 1 << 24
#: `EqeDataReconfig.data` (gdma spec 6.4) is 24 bits wide: no link event names a larger vport.
VPORT_INDEX_LIMIT = 1 << 24


def decode_device_state(state: mana_driver_pb2.ManaDeviceSavedState | bytes) -> mana_driver_pb2.ManaDeviceSavedState:
    """Accept the message or its serialised bytes; undecodable bytes are an InvalidSavedState."""
    return parse_saved(mana_driver_pb2.ManaDeviceSavedState, state, "mana saved state", InvalidSavedState)


# -- validate -----------------------------------------------------------------------------------
def _check_doorbell(name: str, q, expected_offset: int, layout: Bar0Layout) -> None:
    if q.doorbell_addr != expected_offset:
        raise InvalidSavedState(f"saved {name} doorbell_addr {q.doorbell_addr:#x} is not the {name} doorbell "
                                f"offset {expected_offset:#x}")
    if q.doorbell.doorbell_id >= layout.db_page_count:
        raise InvalidSavedState(f"saved {name} doorbell page {q.doorbell.doorbell_id} is not below the "
                                f"{layout.db_page_count} doorbell pages of BAR0")
    if q.id >= QUEUE_ID_LIMIT:
        raise InvalidSavedState(f"saved {name} id {q.id} does not fit 24 bits")


def _check_size(name: str, size: int, entry: int, max_size: int = PAGE_SIZE) -> None:
    if not is_power_of_two(size) or not entry <= size <= max_size:
        raise InvalidSavedState(f"saved {name} size {size} must be a power of two in [{entry}, {max_size}]")


def check_cq_eq(name: str, q: mana_driver_pb2.CqEqSavedState, entry: int, offset: int, layout: Bar0Layout,
                 min_size: int | None = None, max_size: int = PAGE_SIZE) -> None:
    _check_doorbell(name, q, offset, layout)
    _check_size(name, q.size, min_size or entry, max_size)
    if q.shift != q.size.bit_length() - 1:
        raise InvalidSavedState(f"saved {name} shift {q.shift} is not log2 of its size {q.size}")
    if q.next % entry:
        raise InvalidSavedState(f"saved {name} next {q.next} is not a multiple of the {entry}-byte entry")


def check_wq(name: str, q: mana_driver_pb2.WqSavedState, wqe: int, in_flight: int, offset: int,
              layout: Bar0Layout, min_size: int | None = None, max_size: int = PAGE_SIZE) -> None:
    _check_doorbell(name, q, offset, layout)
    size = q.mask + 1
    _check_size(name, size, min_size or wqe, max_size)
    if q.head % WQE_ALIGNMENT or q.tail % WQE_ALIGNMENT:
        raise InvalidSavedState(f"saved {name} head {q.head} / tail {q.tail} are not multiples of {WQE_ALIGNMENT}")
    free = (q.head - q.tail) & U32
    if free > size or size - free != in_flight:
        posted = size - free if free <= size else "?"
        raise InvalidSavedState(f"saved {name} head {q.head} and tail {q.tail} leave {posted} bytes posted in a "
                                f"{size}-byte ring; expected {in_flight}")


def validate_gdma_state(state: mana_driver_pb2.GdmaDriverSavedState, layout: Bar0Layout, pool: Region,
                        msix_count: int) -> None:
    """Reject any saved field that could make the driver touch memory or registers it must not."""
    for part in ("mem", "eq", "cq", "rq", "sq"):
        if not state.HasField(part):
            raise InvalidSavedState(f"saved gdma state has no {part}")
    if state.mem.len != HWC_BUFFER_LEN:
        raise InvalidSavedState(f"saved HWC buffer length {state.mem.len} is not {HWC_BUFFER_LEN}")
    if not pool.contains_pfn(state.mem.base_pfn, DRV_HWC_NUM_PAGES):
        raise InvalidSavedState(f"saved HWC base_pfn {state.mem.base_pfn} (+{DRV_HWC_NUM_PAGES} pages) lies outside "
                                f"the private pool pfns [{pool.base_pfn}, {pool.end_pfn})")
    check_cq_eq("eq", state.eq, EQE_SIZE, DB_EQ, layout)
    check_cq_eq("cq", state.cq, CQE_SIZE, DB_CQ, layout)
    # Between requests exactly one receive WQE is posted and no send WQE is outstanding.
    check_wq("rq", state.rq, RWQE_SIZE, RWQE_SIZE, DB_RQ, layout)
    check_wq("sq", state.sq, DRV_HWC_SWQE_SIZE, 0, DB_SQ, layout)
    if state.db_id >= layout.db_page_count:
        raise InvalidSavedState(f"saved db_id {state.db_id} is not below the {layout.db_page_count} doorbell pages")
    if not 1 <= state.num_msix <= msix_count:
        raise InvalidSavedState(f"saved num_msix {state.num_msix} is not in [1, {msix_count}]")
    for toggle in state.link_toggle:
        if toggle.vport_index >= VPORT_INDEX_LIMIT:
            raise InvalidSavedState(f"saved link toggle for vport {toggle.vport_index}: a link event carries a "
                                    f"24-bit vport index")


@dataclass(frozen=True)
class CheckedState:
    """A saved device state `check_device_state` accepted for a BAR0 layout, a pool and an MSI-X vector count: a
    restore of that same state object with the same three (`ManaDevice.restore(checked=)`) does not check it again."""

    state: mana_driver_pb2.ManaDeviceSavedState
    layout: Bar0Layout
    pool: Region
    msix_count: int

    def covers(self, state: mana_driver_pb2.ManaDeviceSavedState, layout: Bar0Layout, pool: Region,
               msix_count: int) -> bool:
        return self.state is state and (self.layout, self.pool, self.msix_count) == (layout, pool, msix_count)


def check_device_state(state: mana_driver_pb2.ManaDeviceSavedState, layout: Bar0Layout, pool: Region,
                       msix_count: int) -> CheckedState:
    """Every check of a saved device state (with gdma state) before anything of it is used: its GDMA driver state
    (`validate_gdma_state`) and each kept vport's (`validate_vport_state`); InvalidSavedState, else what passed."""
    validate_gdma_state(state.gdma, layout, pool, msix_count)
    for v in state.vports:
        validate_vport_state(v, layout, pool, state.gdma.db_id, state.gdma.num_msix)
    return CheckedState(state, layout, pool, msix_count)


def check_hwc_block(block: DmaBuffer) -> None:
    if block.len < HWC_BUFFER_LEN:
        raise InvalidSavedState(f"re-attached block at pfn {block.base_pfn} has {block.pages} pages, the HWC buffer "
                                f"needs {DRV_HWC_NUM_PAGES}")


def validate_vport_state(state: mana_driver_pb2.VportSavedState, layout: Bar0Layout, pool: Region, db_id: int,
                         num_msix: int) -> None:
    """Reject a kept vport (DESIGN D7) whose ids, sizes, counters or memory could make the driver touch
    anything it must not; `Vport.restore` then only trusts what passed. Block presence and size in the
    re-attached pool are checked when the blocks are attached."""
    name = f"vport {state.vport_index}"
    if state.vport_index >= VPORT_INDEX_LIMIT:
        raise InvalidSavedState(f"saved {name}: index does not fit 24 bits")
    for part in ("eq", "tx_cq", "rx_cq", "sq", "rq"):
        if not state.HasField(part):
            raise InvalidSavedState(f"saved {name} has no {part}")
        if getattr(state, part).doorbell.doorbell_id != db_id:
            raise InvalidSavedState(f"saved {name} {part} doorbell page is not the device's db_id {db_id}")
    if state.mac >> 48:
        raise InvalidSavedState(f"saved {name} mac {state.mac:#x} is wider than 48 bits")
    if not state.vector < num_msix:
        raise InvalidSavedState(f"saved {name} vector {state.vector} is not below the {num_msix} vectors in use")
    if not 64 <= state.buffer_size <= 65535:
        raise InvalidSavedState(f"saved {name} buffer size {state.buffer_size} is not in [64, 65535]")
    check_cq_eq(f"{name} eq", state.eq, EQE_SIZE, DB_EQ, layout, PAGE_SIZE, MAX_QUEUE_SIZE)
    check_cq_eq(f"{name} tx_cq", state.tx_cq, CQE_SIZE, DB_CQ, layout, PAGE_SIZE, MAX_QUEUE_SIZE)
    check_cq_eq(f"{name} rx_cq", state.rx_cq, CQE_SIZE, DB_CQ, layout, PAGE_SIZE, MAX_QUEUE_SIZE)
    tx_len = tx_wqe_len(state.short_form)
    ntx, nrx = buffer_counts(state.sq.mask + 1, state.tx_cq.size, state.rq.mask + 1, state.rx_cq.size,
                             state.short_form)
    if (state.tx_buffers, state.rx_buffers) != (ntx, nrx) or not (is_power_of_two(ntx) and is_power_of_two(nrx)):
        raise InvalidSavedState(f"saved {name} buffer counts {state.tx_buffers}/{state.rx_buffers} do not match its "
                                f"queues ({ntx}/{nrx}, powers of two)")
    outstanding = state.tx_posted - state.tx_done
    if not 0 <= outstanding <= ntx:
        raise InvalidSavedState(f"saved {name} has {outstanding} sends outstanding, not in [0, {ntx}]")
    check_wq(f"{name} sq", state.sq, tx_len, outstanding * tx_len, DB_SQ, layout, PAGE_SIZE, MAX_QUEUE_SIZE)
    check_wq(f"{name} rq", state.rq, RX_WQE_LEN, nrx * RX_WQE_LEN, DB_RQ, layout, PAGE_SIZE, MAX_QUEUE_SIZE)
    if state.sq.tail % tx_len or state.rq.tail % RX_WQE_LEN or state.rq.head % RX_WQE_LEN:
        raise InvalidSavedState(f"saved {name} ring positions are not whole WQEs")
    sq_positions = (state.sq.mask + 1) // tx_len
    if (state.sq.tail // tx_len - state.tx_posted) % sq_positions:
        raise InvalidSavedState(f"saved {name} sq tail {state.sq.tail} does not match {state.tx_posted} sends posted")
    if (state.rq.tail // RX_WQE_LEN - state.rx_done - nrx) % ((state.rq.mask + 1) // RX_WQE_LEN):
        raise InvalidSavedState(f"saved {name} rq tail {state.rq.tail} does not match {state.rx_done} receives done")
    sizes = vport_block_sizes(state)
    if len(state.mem) != len(sizes):
        raise InvalidSavedState(f"saved {name} has {len(state.mem)} memory blocks, expected {len(sizes)}")
    for part, m, size in zip(SAVED_BLOCKS, state.mem, sizes):
        pages = -(-size // PAGE_SIZE)
        if m.len != pages * PAGE_SIZE:
            raise InvalidSavedState(f"saved {name} {part} block length {m.len} is not {pages} pages")
        if not pool.contains_pfn(m.base_pfn, pages):
            raise InvalidSavedState(f"saved {name} {part} block pfn {m.base_pfn} (+{pages} pages) lies outside the "
                                    f"private pool pfns [{pool.base_pfn}, {pool.end_pfn})")


def vport_block_sizes(state: mana_driver_pb2.VportSavedState) -> list[int]:
    """Bytes each kept block must hold, in `SAVED_BLOCKS` order."""
    return [state.eq.size, state.sq.mask + 1, state.tx_cq.size, state.rq.mask + 1, state.rx_cq.size,
            state.tx_buffers * state.buffer_size, state.rx_buffers * state.buffer_size]
