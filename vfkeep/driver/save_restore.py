"""GDMA driver saved state (servicing spec 5.3, 6.3, 7.2): build it, and validate it before any use.

Saved state is untrusted input (DESIGN §6): every PFN, id, size and index is checked against this boot's
pool and BAR0 before a single byte of guest memory is touched. A bad blob is a `RestoreError`.
"""
from __future__ import annotations


from vfkeep.gdma.constants import DB_CQ, DB_EQ, DB_RQ, DB_SQ, DRV_HWC_CQ_PAGE, DRV_HWC_EQ_PAGE, DRV_HWC_NUM_PAGES
from vfkeep.gdma.constants import DRV_HWC_RQ_PAGE, DRV_HWC_SQ_PAGE, DRV_HWC_SWQE_SIZE, PAGE_SIZE, RWQE_SIZE
from vfkeep.gdma.constants import WQE_ALIGNMENT
from vfkeep.memory import MemoryBlock, Region
from vfkeep.proto import mana_driver_pb2, parse_saved

from .backing import DeviceBacking
from .errors import RestoreError
from .gdma_driver import HWC_BUFFER_LEN, Bar0Layout, GdmaDriver
from .queues import CQE_SIZE, EQE_SIZE, U32, CqEq, DoorbellPage, Wq, is_power_of_two

QUEUE_ID_LIMIT = 1 << 24
#: `EqeDataReconfig.data` (gdma spec 6.4) is 24 bits wide: no link event names a larger vport.
VPORT_INDEX_LIMIT = 1 << 24


def decode_device_state(state: mana_driver_pb2.ManaDeviceSavedState | bytes) -> mana_driver_pb2.ManaDeviceSavedState:
    """Accept the message or its serialised bytes; undecodable bytes are a RestoreError."""
    return parse_saved(mana_driver_pb2.ManaDeviceSavedState, state, "mana saved state", RestoreError)


# -- save ---------------------------------------------------------------------------------------
def _doorbell(page: DoorbellPage) -> mana_driver_pb2.DoorbellSavedState:
    return mana_driver_pb2.DoorbellSavedState(doorbell_id=page.page_id, page_count=page.page_count)


def save_cq_eq(q: CqEq) -> mana_driver_pb2.CqEqSavedState:
    return mana_driver_pb2.CqEqSavedState(doorbell=_doorbell(q.doorbell), doorbell_addr=q.doorbell_offset, id=q.id,
                                          next=q.next, size=q.size, shift=q.shift)


def save_wq(q: Wq) -> mana_driver_pb2.WqSavedState:
    return mana_driver_pb2.WqSavedState(doorbell=_doorbell(q.doorbell), doorbell_addr=q.doorbell_offset, id=q.id,
                                        head=q.head, tail=q.tail, mask=q.mask)


def save_gdma(drv: GdmaDriver) -> mana_driver_pb2.GdmaDriverSavedState:
    """Everything a new driver needs to re-attach to this HWC (servicing spec 7.2)."""
    hwc = drv.hwc
    state = mana_driver_pb2.GdmaDriverSavedState(
        eq=save_cq_eq(hwc.eq), cq=save_cq_eq(hwc.cq), rq=save_wq(hwc.rq), sq=save_wq(hwc.sq), db_id=drv.db_id,
        gpa_mkey=drv.gpa_mkey, pdid=drv.pdid, hwc_activity_id=drv.activity_id, num_msix=drv.num_msix,
        min_queue_avail=drv.min_queue_avail)
    state.mem.base_pfn, state.mem.len = drv.hwc_mem.base_pfn, HWC_BUFFER_LEN
    for vport_index, up in drv.events.link_toggle:
        state.link_toggle.add(vport_index=vport_index, link_up=up)
    return state


# -- validate -----------------------------------------------------------------------------------
def _check_doorbell(name: str, q, expected_offset: int, layout: Bar0Layout) -> None:
    if q.doorbell_addr != expected_offset:
        raise RestoreError(f"saved {name} doorbell_addr {q.doorbell_addr:#x} is not the {name} doorbell "
                           f"offset {expected_offset:#x}")
    if q.doorbell.doorbell_id >= layout.db_page_count:
        raise RestoreError(f"saved {name} doorbell page {q.doorbell.doorbell_id} is not below the "
                           f"{layout.db_page_count} doorbell pages of BAR0")
    if q.id >= QUEUE_ID_LIMIT:
        raise RestoreError(f"saved {name} id {q.id} does not fit 24 bits")


def _check_size(name: str, size: int, entry: int, max_size: int = PAGE_SIZE) -> None:
    if not is_power_of_two(size) or not entry <= size <= max_size:
        raise RestoreError(f"saved {name} size {size} must be a power of two in [{entry}, {max_size}]")


def check_cq_eq(name: str, q: mana_driver_pb2.CqEqSavedState, entry: int, offset: int, layout: Bar0Layout,
                 min_size: int | None = None, max_size: int = PAGE_SIZE) -> None:
    _check_doorbell(name, q, offset, layout)
    _check_size(name, q.size, min_size or entry, max_size)
    if q.shift != q.size.bit_length() - 1:
        raise RestoreError(f"saved {name} shift {q.shift} is not log2 of its size {q.size}")
    if q.next % entry:
        raise RestoreError(f"saved {name} next {q.next} is not a multiple of the {entry}-byte entry")


def check_wq(name: str, q: mana_driver_pb2.WqSavedState, wqe: int, in_flight: int, offset: int,
              layout: Bar0Layout, min_size: int | None = None, max_size: int = PAGE_SIZE) -> None:
    _check_doorbell(name, q, offset, layout)
    size = q.mask + 1
    _check_size(name, size, min_size or wqe, max_size)
    if q.head % WQE_ALIGNMENT or q.tail % WQE_ALIGNMENT:
        raise RestoreError(f"saved {name} head {q.head} / tail {q.tail} are not multiples of {WQE_ALIGNMENT}")
    free = (q.head - q.tail) & U32
    if free > size or size - free != in_flight:
        raise RestoreError(f"saved {name} head {q.head} and tail {q.tail} leave {size - free if free <= size else '?'} "
                           f"bytes posted in a {size}-byte ring; expected {in_flight}")


def validate_gdma_state(state: mana_driver_pb2.GdmaDriverSavedState, layout: Bar0Layout, pool: Region,
                        msix_count: int) -> None:
    """Reject any saved field that could make the driver touch memory or registers it must not."""
    for part in ("mem", "eq", "cq", "rq", "sq"):
        if not state.HasField(part):
            raise RestoreError(f"saved gdma state has no {part}")
    if state.mem.len != HWC_BUFFER_LEN:
        raise RestoreError(f"saved HWC buffer length {state.mem.len} is not {HWC_BUFFER_LEN}")
    if not pool.contains_pfn(state.mem.base_pfn, DRV_HWC_NUM_PAGES):
        raise RestoreError(f"saved HWC base_pfn {state.mem.base_pfn} (+{DRV_HWC_NUM_PAGES} pages) lies outside the "
                           f"private pool pfns [{pool.base_pfn}, {pool.end_pfn})")
    check_cq_eq("eq", state.eq, EQE_SIZE, DB_EQ, layout)
    check_cq_eq("cq", state.cq, CQE_SIZE, DB_CQ, layout)
    # Between requests exactly one receive WQE is posted and no send WQE is outstanding.
    check_wq("rq", state.rq, RWQE_SIZE, RWQE_SIZE, DB_RQ, layout)
    check_wq("sq", state.sq, DRV_HWC_SWQE_SIZE, 0, DB_SQ, layout)
    if state.db_id >= layout.db_page_count:
        raise RestoreError(f"saved db_id {state.db_id} is not below the {layout.db_page_count} doorbell pages")
    if not 1 <= state.num_msix <= msix_count:
        raise RestoreError(f"saved num_msix {state.num_msix} is not in [1, {msix_count}]")
    for toggle in state.link_toggle:
        if toggle.vport_index >= VPORT_INDEX_LIMIT:
            raise RestoreError(f"saved link toggle for vport {toggle.vport_index}: a link event carries a "
                               f"24-bit vport index")


def check_hwc_block(block: MemoryBlock) -> None:
    if block.len < HWC_BUFFER_LEN:
        raise RestoreError(f"re-attached block at pfn {block.base_pfn} has {block.pages} pages, the HWC buffer "
                           f"needs {DRV_HWC_NUM_PAGES}")


# -- restore ------------------------------------------------------------------------------------
def restore_gdma(backing: DeviceBacking, layout: Bar0Layout, hwc_mem: MemoryBlock,
                 state: mana_driver_pb2.GdmaDriverSavedState) -> GdmaDriver:
    """Rebuild the HWC queues on pages 0-3 of the validated state's buffer (gdma spec 13.3)."""
    def page(index: int, size: int) -> memoryview:
        return hwc_mem.view[index * PAGE_SIZE:index * PAGE_SIZE + size]

    def doorbell(q) -> DoorbellPage:
        return DoorbellPage(backing, layout.db_zone_offset, layout.db_shift, q.doorbell.doorbell_id,
                            layout.db_page_count)

    s = state
    return GdmaDriver.restore(
        backing, layout, hwc_mem,
        eq=CqEq("eq", page(DRV_HWC_EQ_PAGE, s.eq.size), s.eq.id, doorbell(s.eq), s.eq.next),
        cq=CqEq("cq", page(DRV_HWC_CQ_PAGE, s.cq.size), s.cq.id, doorbell(s.cq), s.cq.next),
        rq=Wq("rq", page(DRV_HWC_RQ_PAGE, s.rq.mask + 1), s.rq.id, doorbell(s.rq), s.rq.head, s.rq.tail),
        sq=Wq("sq", page(DRV_HWC_SQ_PAGE, s.sq.mask + 1), s.sq.id, doorbell(s.sq), s.sq.head, s.sq.tail),
        db_id=s.db_id, pdid=s.pdid, gpa_mkey=s.gpa_mkey, activity_id=s.hwc_activity_id, num_msix=s.num_msix,
        min_queue_avail=s.min_queue_avail, link_toggle=[(t.vport_index, t.link_up) for t in s.link_toggle])
