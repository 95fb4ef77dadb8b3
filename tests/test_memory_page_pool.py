"""PageAllocator: first fit, split, no merge, zeroing, errors, and property tests of the slot table."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vfkeep.memory import (POISON, Allocated, DmaManager, DoubleFree, Free, GuestMemory, InvalidSize, Leaked,
                           MemoryLayout, OutOfPoolMemory, PageAllocator, PendingRestore, Region, RestoreError)

POOL = Region("pool", 100, 64)


def table(alloc):
    return [(s.base_pfn, s.size_pages, s.state) for s in alloc.slots]


def assert_covers(slots, region):
    pfn = region.base_pfn
    for s in slots:
        assert s.base_pfn == pfn and s.size_pages > 0
        pfn = s.end_pfn
    assert pfn == region.end_pfn


def test_first_fit_split_and_no_merge():
    a = PageAllocator(POOL)
    x = a.allocate(4, "d", "t")
    y = a.allocate(2, "d", "t")
    assert (x.base_pfn, y.base_pfn) == (100, 104)
    assert table(a)[-1] == (106, 58, Free())
    a.free(x)
    a.free(y)
    # freed neighbours stay separate slots: a 5-page request cannot use the 4+2 run at the front
    assert [(s.base_pfn, s.size_pages) for s in a.slots] == [(100, 4), (104, 2), (106, 58)]
    assert a.allocate(5, "d", "t").base_pfn == 106
    assert a.allocate(3, "d", "t").base_pfn == 100  # first fit: the first free slot big enough
    assert a.allocate(2, "d", "t").base_pfn == 104


def test_fragmentation_can_exhaust_a_pool_with_enough_free_pages():
    a = PageAllocator(Region("pool", 0, 4))
    blocks = [a.allocate(1, "d", "t") for _ in range(4)]
    for b in blocks:
        a.free(b)
    with pytest.raises(OutOfPoolMemory, match=r"unable to allocate 2 pages for d: pool has 4 free pages "
                                              r"\(largest contiguous run 1\)"):
        a.allocate(2, "d", "t")


def test_out_of_space_names_requested_free_and_largest_run():
    a = PageAllocator(Region("pool", 0, 512))
    before = table(a)
    with pytest.raises(OutOfPoolMemory) as e:
        a.allocate(600, "nic_x", "vfio dma")
    assert str(e.value) == "unable to allocate 600 pages for nic_x: pool has 512 free pages (largest contiguous run 512)"
    assert table(a) == before


@pytest.mark.parametrize("pages", [0, -1, 1.5, True, None])
def test_sizes_must_be_positive_whole_pages(pages):
    a = PageAllocator(POOL)
    with pytest.raises(InvalidSize):
        a.allocate(pages, "d", "t")
    assert len(a.slots) == 1


def test_double_free_leaves_table_and_new_owner_alone():
    a = PageAllocator(POOL)
    x = a.allocate(3, "d", "t")
    a.free(x)
    y = a.allocate(3, "e", "t")  # same pfns as x
    assert y.base_pfn == x.base_pfn
    before = table(a)
    with pytest.raises(DoubleFree, match="double free of 3 pages at pfn 100"):
        a.free(x)
    assert table(a) == before and table(a)[0][2] == Allocated("e", "t")


def test_new_memory_is_zeroed():
    layout = MemoryLayout(guest_pages=1, worker_pages=4, pool_pages=4)
    with GuestMemory.create(layout) as mem:
        mem.scrub_worker_ram()
        a = PageAllocator(layout.worker, mem)
        s = a.allocate(2, "d", "t")
        assert mem.read(s.base_pfn << 12, 2 * 4096) == bytes(2 * 4096)
        assert mem.read((s.base_pfn + 2) << 12, 4096) == POISON  # only the allocation is touched


@pytest.mark.parametrize("offset,length", [(0, 0), (0, 65536), (100, 70000), (4096, 17 * 4096 + 5)])
def test_zero_clears_exactly_the_range(offset, length):
    """`GuestMemory.zero` copies a 64 KiB zero block: whole blocks, then the tail; nothing outside the range."""
    layout = MemoryLayout(guest_pages=1, worker_pages=32, pool_pages=0)
    with GuestMemory.create(layout) as mem:
        mem.scrub_worker_ram()
        start = layout.worker.gpa + offset
        mem.zero(start, length)
        assert mem.read(start, length) == bytes(length)
        before, after = mem.read(layout.worker.gpa, offset), mem.read(start + length, 4096)
        assert before == (POISON * 32)[:offset] and after == (POISON * 2)[(start + length) % 4096:][:4096]


def test_restore_refuses_a_table_with_live_allocations():
    a = PageAllocator(POOL)
    saved = a.save()
    a.allocate(1, "d", "t")
    before = table(a)
    with pytest.raises(RestoreError, match="pool must be empty to restore"):
        a.restore(saved)
    assert table(a) == before


def test_leaked_slots_are_never_reused_and_survive_save():
    a = PageAllocator(POOL)
    msg = a.save()
    msg.state[0].size_pages = 8
    msg.state[0].state.leaked.device_id = "nvme_1"
    msg.state.add(base_pfn=108, size_pages=56).state.free.SetInParent()
    a.restore(msg)
    assert a.allocate(1, "d", "t").base_pfn == 108
    assert table(a)[0] == (100, 8, Leaked("nvme_1", ""))
    assert a.save().state[0].state.WhichOneof("variant") == "leaked"


def test_quarantined_pages_are_never_reused_survive_save_and_come_back_when_released():
    """A device that could not be reset may still write pages it was freed from: `quarantine` marks the free
    slots in those ranges Leaked (an allocation made meanwhile is left alone), `release_quarantined` frees
    only what it marked."""
    a = PageAllocator(POOL)
    x, y = a.allocate(4, "nvme_0", "t"), a.allocate(2, "other", "t")
    a.free(x)
    assert a.quarantine([(100, 4), (104, 2)], "nvme_0", "q") == 4  # y is someone else's live allocation
    assert table(a)[:2] == [(100, 4, Leaked("nvme_0", "q")), (104, 2, Allocated("other", "t"))]
    assert a.allocate(4, "d", "t").base_pfn == 106
    b = PageAllocator(POOL)
    b.restore(a.save())
    assert table(b)[0] == (100, 4, Leaked("nvme_0", "q"))
    assert b.release_quarantined("nvme_0", "other tag") == 0 and b.release_quarantined("nvme_0", "q") == 4
    assert table(b)[0] == (100, 4, Free())


# -- property tests ---------------------------------------------------------------------------

ops = st.lists(st.one_of(st.tuples(st.just("alloc"), st.integers(1, 20), st.sampled_from(["nic_a", "nic_b", "nvme"])),
                         st.tuples(st.just("free"), st.integers(0, 1000))), max_size=60)


@settings(max_examples=150, deadline=None)
@given(ops)
def test_random_alloc_free_keeps_table_exact(seq):
    a = PageAllocator(POOL)
    live = []
    for op in seq:
        if op[0] == "alloc":
            fits = any(isinstance(s.state, Free) and s.size_pages >= op[1] for s in a.slots)
            try:
                live.append(a.allocate(op[1], op[2], "vfio dma"))
                assert fits
            except OutOfPoolMemory:
                assert not fits
        elif live:
            a.free(live.pop(op[1] % len(live)))
        assert_covers(a.slots, POOL)
        owned = [p for s in live for p in range(s.base_pfn, s.end_pfn)]
        assert len(owned) == len(set(owned))  # never overlapping pages
        allocated = {p for s in a.slots if isinstance(s.state, Allocated) for p in range(s.base_pfn, s.end_pfn)}
        assert allocated == set(owned)


@settings(max_examples=60, deadline=None)
@given(ops)
def test_save_restore_round_trips_the_table(seq):
    layout = MemoryLayout(guest_pages=1, worker_pages=1, pool_pages=64)
    with GuestMemory.create(layout) as mem:
        old = DmaManager(mem, strict_pool=False)
        clients = {d: old.new_client(d, persistent=True) for d in ("nic_a", "nic_b", "nvme")}
        live = []
        for op in seq:
            if op[0] == "alloc":
                try:
                    live.append(clients[op[2]].allocate_dma_buffer(op[1] * 4096 - 1))
                except OutOfPoolMemory:
                    pass
            elif live:
                live.pop(op[1] % len(live)).free()
        blob = old.save().SerializeToString()
        old_table = old._pool.slots

        new = DmaManager(mem, strict_pool=False)
        new.restore(blob)
        expect = [(s.base_pfn, s.size_pages,
                   PendingRestore(s.state.device, s.state.tag) if isinstance(s.state, Allocated) else s.state)
                  for s in old_table]
        assert table(new._pool) == expect
        for d in clients:
            got = sorted((b.base_pfn, b.pages) for b in new.new_client(d, persistent=True).attach_pending_buffers())
            assert got == sorted((b.base_pfn, b.pages) for b in live if b.device == d)
        assert new.validate_restore() == []
        assert new.save().SerializeToString() == blob
