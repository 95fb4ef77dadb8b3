"""Validation of untrusted GDMA driver saved state (DESIGN §6): every bad field is a RestoreError."""
import pytest

from vfkeep.driver.errors import RestoreError
from vfkeep.driver.gdma_driver import Bar0Layout
from vfkeep.driver.save_restore import decode_device_state, validate_gdma_state
from vfkeep.memory import MemoryLayout
from vfkeep.proto import mana_driver_pb2

LAYOUT = Bar0Layout(bar0_len=8192, db_zone_offset=4096, db_shift=12, db_page_count=1, shmem_offset=40,
                    major_version=1)
POOL = MemoryLayout(guest_pages=16, worker_pages=64, pool_pages=64).pool


def good_state() -> mana_driver_pb2.GdmaDriverSavedState:
    """What a driver saves after bring-up and a few requests (reference emulator ids)."""
    s = mana_driver_pb2.GdmaDriverSavedState(hwc_activity_id=0x12340007, num_msix=2, min_queue_avail=64)
    s.mem.base_pfn, s.mem.len = POOL.base_pfn + 8, 24576
    for q, addr, nxt in ((s.eq, 0xFF8, 4096 + 16 * 20), (s.cq, 0x800, 4096 + 64 * 14)):
        q.doorbell.page_count, q.doorbell_addr, q.id, q.next, q.size, q.shift = 1, addr, 24, nxt, 4096, 12
    s.rq.doorbell.page_count, s.rq.doorbell_addr, s.rq.id = 1, 0x400, 24
    s.rq.head, s.rq.tail, s.rq.mask = 4096 + 7 * 32, 8 * 32, 4095
    s.sq.doorbell.page_count, s.sq.doorbell_addr, s.sq.id = 1, 0x000, 24
    s.sq.head, s.sq.tail, s.sq.mask = 4096 + 7 * 64, 7 * 64, 4095
    return s


def validate(s):
    validate_gdma_state(s, LAYOUT, POOL, 64)


def test_good_state_passes():
    validate(good_state())


def mutate(path: str, value):
    s = good_state()
    *parents, leaf = path.split(".")
    target = s
    for p in parents:
        target = getattr(target, p)
    setattr(target, leaf, value)
    return s


@pytest.mark.parametrize("path,value,match", [
    ("mem.len", 24575, "length 24575"),
    ("mem.base_pfn", 3, "outside the private pool"),
    ("mem.base_pfn", POOL.end_pfn - 5, "outside the private pool"),
    ("eq.size", 3000, "power of two"),
    ("cq.size", 8192, "power of two in \\[64, 4096\\]"),
    ("eq.shift", 11, "shift 11"),
    ("cq.next", 4096 + 32, "not a multiple"),
    ("eq.id", 1 << 24, "24 bits"),
    ("cq.doorbell_addr", 0xFF8, "doorbell_addr"),
    ("eq.doorbell.doorbell_id", 1, "doorbell page 1"),
    ("rq.mask", 3000, "power of two"),
    ("sq.mask", 8191, "power of two in \\[64, 4096\\]"),
    ("rq.tail", 9 * 32, "expected 32"),
    ("sq.tail", 8 * 64, "expected 0"),
    ("rq.head", 4096 + 7 * 32 + 1, "multiples of 32"),
    ("db_id", 1, "db_id 1"),
    ("num_msix", 0, "num_msix 0"),
    ("num_msix", 65, "num_msix 65"),
])
def test_bad_field_is_refused(path, value, match):
    with pytest.raises(RestoreError, match=match):
        validate(mutate(path, value))


def test_link_toggles_pass_and_an_impossible_vport_index_is_refused():
    s = good_state()
    s.link_toggle.add(vport_index=0, link_up=False)
    s.link_toggle.add(vport_index=(1 << 24) - 1, link_up=True)
    validate(s)
    s.link_toggle.add(vport_index=1 << 24, link_up=True)
    with pytest.raises(RestoreError, match="vport 16777216"):
        validate(s)


@pytest.mark.parametrize("part", ["mem", "eq", "cq", "rq", "sq"])
def test_missing_part_is_refused(part):
    s = good_state()
    s.ClearField(part)
    with pytest.raises(RestoreError, match=f"no {part}"):
        validate(s)


def test_truncated_or_garbage_blob_is_refused():
    blob = mana_driver_pb2.ManaDeviceSavedState(gdma=good_state()).SerializeToString()
    with pytest.raises(RestoreError, match="does not decode"):
        decode_device_state(blob[:-3])
    with pytest.raises(RestoreError, match="does not decode"):
        decode_device_state(b"\xff\xff\xff")
    with pytest.raises(RestoreError, match="must be a ManaDeviceSavedState or bytes"):
        decode_device_state("text")
    assert decode_device_state(blob).gdma == good_state()
