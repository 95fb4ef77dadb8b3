"""DmaManager: clients, save/restore validation of untrusted state, D3 unclaimed allocations, scrub."""
import gc
import logging

import pytest

from vfkeep.memory import (POISON, ClientClosed, DeviceNameInUse, DmaManager, DoubleFree, GuestMemory, MemoryLayout,
                           NoPrivatePool, NotPersistent, OutOfPoolMemory, RestoreError, SaveFailed,
                           UnclaimedAllocation, UnrestoredAllocations)
from vfkeep.proto import dma_manager_pb2

LAYOUT = MemoryLayout(guest_pages=16, worker_pages=64, pool_pages=512)
POOL_BASE = LAYOUT.pool.base_pfn


@pytest.fixture
def mem():
    with GuestMemory.create(LAYOUT) as m:
        yield m


@pytest.fixture
def saved(mem):
    """A saved pool: nic_1 holds 6 + 2 pages, nvme_1 holds 4, with a freed hole in between."""
    dma = DmaManager(mem, strict_pool=False)
    nic, nvme = dma.new_client("nic_1", True), dma.new_client("nvme_1", True)
    hwc = nic.allocate_dma_buffer(6 * 4096)
    nic.allocate_dma_buffer(4096).free()
    nvme.allocate_dma_buffer(4 * 4096)
    nic.allocate_dma_buffer(5000)
    hwc.view[:4] = b"HWC!"
    return dma.save()


def fresh_usage(mem):
    return DmaManager(mem, strict_pool=False).inspect()["pool"]


def test_allocate_zeroed_contiguous_rounded_up(mem):
    dma = DmaManager(mem, strict_pool=False)
    mem.write(LAYOUT.pool.gpa, b"\xff" * 8192)
    b = dma.new_client("nic_1", True).allocate_dma_buffer(4097)
    assert (b.base_pfn, b.pfns, b.len, b.gpa) == (POOL_BASE, [POOL_BASE, POOL_BASE + 1], 8192, LAYOUT.pool.gpa)
    assert bytes(b.view) == bytes(8192) and b.tag == "vfio dma" and b.persistent
    e = dma.new_client("nic_1_ephemeral", False).allocate_dma_buffer(10)
    assert LAYOUT.worker.contains_pfn(e.base_pfn) and not e.persistent
    assert dma.inspect()["pool"]["devices"] == {"nic_1": 2} and dma.inspect()["worker_ram"]["devices"] == {"nic_1_ephemeral": 1}


def test_no_private_pool(mem):
    with GuestMemory.create(MemoryLayout(16, 64, 0)) as nopool:
        dma = DmaManager(nopool)
        with pytest.raises(NoPrivatePool, match="no sources available for private persistent allocations"):
            dma.new_client("nic_1", True)
        dma.new_client("nic_1_ephemeral", False).allocate_dma_buffer(4096)
        assert not dma.save().HasField("private_pool")
        with pytest.raises(RestoreError, match="saved state for private pool but no private pool"):
            DmaManager(nopool).restore(dma_manager_pb2.OpenhclDmaManagerState(
                private_pool=DmaManager(mem).save().private_pool))


def test_device_name_taken_once_per_kind_and_inherited_after_close(mem):
    dma = DmaManager(mem, strict_pool=False)
    c = dma.new_client("nic_1", True)
    dma.new_client("nic_1", False)  # other kind: separate name space
    with pytest.raises(DeviceNameInUse, match="'nic_1'.*persistent"):
        dma.new_client("nic_1", True)
    b = c.allocate_dma_buffer(4096)
    c.close()
    with pytest.raises(ClientClosed):
        c.allocate_dma_buffer(4096)
    c2 = dma.new_client("nic_1", True)
    assert dma.inspect()["pool"]["devices"] == {"nic_1": 1}  # outstanding allocation inherited by the name
    b.free()
    del c2
    gc.collect()
    dma.new_client("nic_1", True)  # a dropped client releases its name too


def test_double_free_is_typed_and_harmless(mem):
    dma = DmaManager(mem, strict_pool=False)
    c = dma.new_client("nic_1", True)
    b = c.allocate_dma_buffer(4096)
    b.free()
    other = c.allocate_dma_buffer(4096)
    before = dma.inspect()["pool"]
    with pytest.raises(DoubleFree):
        b.free()
    assert dma.inspect()["pool"] == before and other.base_pfn == b.base_pfn
    other.free()


def test_allocation_larger_than_pool(mem):
    dma = DmaManager(mem, strict_pool=False)
    c = dma.new_client("nic_x", True)
    c.allocate_dma_buffer(4096)
    before = dma.inspect()["pool"]
    with pytest.raises(OutOfPoolMemory, match=r"unable to allocate 600 pages for nic_x: pool has 511 free pages "
                                              r"\(largest contiguous run 511\)"):
        c.allocate_dma_buffer(600 * 4096)
    assert dma.inspect()["pool"] == before


def test_save_contains_only_pool_memory(mem):
    dma = DmaManager(mem, strict_pool=False)
    dma.new_client("nic_1_ephemeral", False).allocate_dma_buffer(8 * 4096)
    dma.new_client("nic_1", True).allocate_dma_buffer(6 * 4096)
    pool = dma.save().private_pool
    assert [(r.start, r.end) for r in pool.ranges] == [(LAYOUT.pool.gpa, LAYOUT.pool.gpa + LAYOUT.pool.size)]
    assert [(s.base_pfn, s.size_pages, s.state.WhichOneof("variant")) for s in pool.state] == [
        (POOL_BASE, 6, "allocated"), (POOL_BASE + 6, 506, "free")]
    assert pool.state[0].state.allocated.device_id == "nic_1" and pool.state[0].state.allocated.tag == "vfio dma"


def test_restore_attach_and_attach_twice(mem, saved):
    dma = DmaManager(mem, strict_pool=False)
    dma.restore(saved.SerializeToString())
    assert dma.inspect()["pool"]["pending_pages"] == 12
    with pytest.raises(SaveFailed, match="still pending restore"):
        dma.save()
    nic = dma.new_client("nic_1", True)
    blocks = nic.attach_pending_buffers()
    assert [(b.base_pfn, b.pages) for b in blocks] == [(POOL_BASE, 6), (POOL_BASE + 11, 2)]
    assert bytes(blocks[0].view[:4]) == b"HWC!"
    assert nic.attach_pending_buffers() == []  # second call: nothing pending any more
    with pytest.raises(NotPersistent):
        dma.new_client("nic_1_ephemeral", False).attach_pending_buffers()
    blocks[1].free()  # "attach then drop" releases unwanted saved memory
    assert dma.inspect()["pool"]["devices"]["nic_1"] == 6


def test_unclaimed_allocations_freed_and_reported(mem, saved, caplog):
    dma = DmaManager(mem, strict_pool=False)
    dma.restore(saved)
    dma.new_client("nic_1", True).attach_pending_buffers()
    with caplog.at_level(logging.WARNING, logger="vfkeep.memory.dma"):
        unclaimed = dma.validate_restore()
    assert unclaimed == [UnclaimedAllocation("nvme_1", POOL_BASE + 7, 4, "vfio dma")]
    assert [r.kv["device"] for r in caplog.records if r.levelno >= logging.WARNING] == ["nvme_1"]
    usage = dma.inspect()["pool"]
    assert usage["pending_pages"] == 0 and "nvme_1" not in usage["devices"] and usage["allocated_pages"] == 8
    assert dma.validate_restore() == []
    dma.save()  # nothing pending: save works again


def test_strict_pool_fails_naming_the_device(mem, saved, monkeypatch):
    monkeypatch.setenv("VFKEEP_STRICT_POOL", "1")
    dma = DmaManager(mem)
    dma.restore(saved)
    dma.new_client("nic_1", True).attach_pending_buffers()
    with pytest.raises(UnrestoredAllocations, match=r"^unrestored allocations found: nvme_1 ") as e:
        dma.validate_restore()
    assert "nic_1" not in str(e.value) and e.value.allocations[0].device == "nvme_1"


def _mutated(saved, mutate):
    msg = dma_manager_pb2.OpenhclDmaManagerState()
    msg.CopyFrom(saved)
    mutate(msg.private_pool)
    return msg


def _set(i, **fields):
    def mutate(p):
        for k, v in fields.items():
            setattr(p.state[i], k, v)
    return mutate


BAD = {
    "outside pool": (_set(0, base_pfn=POOL_BASE - 6), "lies outside the pool"),
    "beyond pool end": (_set(4, size_pages=10_000), "lies outside the pool"),
    "overlap": (_set(1, base_pfn=POOL_BASE + 2), rf"overlaps saved slot pfns \[{POOL_BASE}, {POOL_BASE + 6}\)"),
    "gap": (lambda p: p.state.pop(1), rf"missing slots in saved state: pfns \[{POOL_BASE + 6}, {POOL_BASE + 7}\)"),
    "short": (lambda p: p.state.pop(), "missing slots in saved state"),
    "no slots": (lambda p: p.ClearField("state"), "missing slots in saved state"),
    "zero size": (_set(1, size_pages=0), "size must be non-zero"),
    "no variant": (lambda p: p.state[0].state.ClearField("allocated"), "missing or unknown slot state"),
    "no state": (lambda p: p.state[0].ClearField("state"), "missing or unknown slot state"),
    "no device": (lambda p: setattr(p.state[0].state.allocated, "device_id", ""), "names no device"),
    "ranges": (lambda p: setattr(p.ranges[0], "end", p.ranges[0].end - 4096), "pool ranges do not match"),
    "two ranges": (lambda p: p.ranges.add(start=0, end=4096), "pool ranges do not match"),
}


@pytest.mark.parametrize("prepared", [False, True], ids=["restore", "prepared ahead"])
@pytest.mark.parametrize("case", BAD)
def test_restore_rejects_bad_saved_state_and_changes_nothing(mem, saved, case, prepared):
    """Also when the state was checked ahead (`prepare_restore`, before the go): its error comes with the restore."""
    mutate, message = BAD[case]
    dma = DmaManager(mem, strict_pool=False)
    before = dma.inspect()["pool"]
    bad = _mutated(saved, mutate)
    if prepared:
        dma.prepare_restore(bad)
        assert dma.inspect()["pool"] == before
    with pytest.raises(RestoreError, match=message):
        dma.restore(bad)
    assert dma.inspect()["pool"] == before == fresh_usage(mem)
    dma.restore(saved)  # still restorable: the failed attempt left nothing behind
    assert dma.inspect()["pool"]["pending_pages"] == 12


def test_a_restore_prepared_ahead_applies_nothing_and_only_to_the_state_it_checked(mem, saved):
    """`prepare_restore` (the new worker's, before the host's go) leaves the pool as it is; the restore of that same
    message installs the table it checked, the restore of any other message checks that one."""
    plain = DmaManager(mem, strict_pool=False)
    plain.restore(saved)
    dma = DmaManager(mem, strict_pool=False)
    dma.prepare_restore(saved)
    assert dma.inspect()["pool"] == fresh_usage(mem)
    dma.restore(saved)
    assert dma.inspect()["pool"] == plain.inspect()["pool"] and dma.inspect()["pool"]["pending_pages"] == 12
    other = DmaManager(mem, strict_pool=False)
    other.prepare_restore(saved)
    with pytest.raises(RestoreError, match="missing slots"):
        other.restore(_mutated(saved, BAD["gap"][0]))
    assert other.inspect()["pool"] == fresh_usage(mem)
    checked_bad = DmaManager(mem, strict_pool=False)
    checked_bad.prepare_restore(_mutated(saved, BAD["overlap"][0]))
    checked_bad.restore(saved)
    assert checked_bad.inspect()["pool"] == plain.inspect()["pool"]


def test_restore_rejects_truncated_and_garbage_bytes(mem, saved):
    blob = saved.SerializeToString()
    dma = DmaManager(mem, strict_pool=False)
    for n in range(1, len(blob)):
        with pytest.raises(RestoreError):
            dma.restore(blob[:n])
    for garbage in (b"\xff" * 7, b"\x12\x80", b"\x0a\x03abc\x12\x02\x0a", "text"):
        with pytest.raises(RestoreError, match="does not decode|must be a OpenhclDmaManagerState or bytes"):
            dma.restore(garbage)
    assert dma.inspect()["pool"] == fresh_usage(mem)


def test_restore_rejects_shared_pool_and_ranges_of_another_boot(mem, saved):
    msg = dma_manager_pb2.OpenhclDmaManagerState(shared_pool=saved.private_pool)
    with pytest.raises(RestoreError, match="saved state for shared pool but no shared pool"):
        DmaManager(mem).restore(msg)
    with GuestMemory.create(MemoryLayout(16, 64, 256)) as smaller:
        with pytest.raises(RestoreError, match="pool ranges do not match"):
            DmaManager(smaller).restore(saved)


def test_restore_only_before_any_client_and_once(mem, saved):
    dma = DmaManager(mem, strict_pool=False)
    dma.new_client("nic_1_ephemeral", False).close()
    with pytest.raises(RestoreError, match="existing allocators present, pool must be empty to restore"):
        dma.restore(saved)
    assert dma.inspect()["pool"] == fresh_usage(mem)
    dma2 = DmaManager(mem, strict_pool=False)
    dma2.restore(saved)
    with pytest.raises(RestoreError, match="already restored"):
        dma2.restore(saved)
    assert dma2.inspect()["pool"]["pending_pages"] == 12


def test_empty_saved_state_leaves_a_fresh_pool(mem):
    dma = DmaManager(mem, strict_pool=False)
    dma.restore(b"")
    assert dma.inspect()["pool"] == fresh_usage(mem) and dma.validate_restore() == []


def test_scrub_changes_worker_ram_only(mem):
    dma = DmaManager(mem, strict_pool=False)
    persistent = dma.new_client("nic_1", True).allocate_dma_buffer(2 * 4096)
    ephemeral = dma.new_client("nic_1_ephemeral", False).allocate_dma_buffer(4096)
    persistent.view[:] = b"\x5a" * persistent.len
    ephemeral.view[:] = b"\xa5" * ephemeral.len
    guest = bytes(range(256)) * (LAYOUT.guest.size // 256)
    mem.write(0, guest)
    mem.scrub_worker_ram()
    assert bytes(ephemeral.view) == POISON
    assert mem.read(LAYOUT.worker.gpa, LAYOUT.worker.size) == POISON * LAYOUT.worker_pages
    assert bytes(persistent.view) == b"\x5a" * persistent.len and mem.read(0, len(guest)) == guest
    assert mem.read(persistent.gpa + persistent.len, 4096) == bytes(4096)  # rest of the pool untouched


def test_guest_memory_file_size_is_sealed():
    """A process holding the memfd cannot shrink it under the devices' mappings."""
    import os

    from vfkeep.memory import GuestMemory, MemoryLayout

    with GuestMemory.create(MemoryLayout(1, 1, 1)) as mem:
        with pytest.raises(PermissionError):
            os.ftruncate(mem.fd, 4096)
