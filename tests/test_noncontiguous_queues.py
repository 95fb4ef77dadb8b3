"""Queue memory on non-consecutive pages (issue 15 item 4): the device takes every queue as a page list
(gdma spec 9.11), and the driver describes its memory by page, never assuming a block's pages follow each
other. `scattered_dma.py` gives the driver blocks whose pages are in descending, non-adjacent order."""
from __future__ import annotations

import pytest

from driver_helpers import InProcessBench, loopback, numbered_frames, same_payloads
from scattered_dma import ScatteredClients
from vfkeep.device import control
from vfkeep.device.dma import MappedMemory
from vfkeep.device.queues import QueueMemory
from vfkeep.driver.errors import SaveFailed
from vfkeep.driver.mana import ManaDevice
from vfkeep.driver.vport import VportConfig
from vfkeep.memory import DmaManager, MemoryLayout
from vfkeep.memory.guest_memory import PAGE_SIZE

LAYOUT = MemoryLayout(guest_pages=16, worker_pages=1024, pool_pages=512)


def test_device_ring_on_scattered_pages_wraps_across_them(mem):
    """Ring bytes map to (page list[offset // 4096], offset % 4096), the first page from `offset`, and wrap at
    the ring size: a write straddling two pages and the ring end lands in three pages."""
    dma = MappedMemory(mem)
    base = mem.layout.worker.gpa
    pages = [base + 7 * PAGE_SIZE, base + 2 * PAGE_SIZE, base + 5 * PAGE_SIZE]
    ring = QueueMemory(pages, 0, 3 * PAGE_SIZE)
    assert ring.base is None  # the scattered path
    data = (bytes(range(251)) * 24)[:6000]  # from ring offset 8000: pages 1, 2, then 0 after the wrap
    ring.write(dma, 8000, data)
    assert mem.read(pages[1] + 8000 - PAGE_SIZE, 192) == data[:192]
    assert mem.read(pages[2], PAGE_SIZE) == data[192:192 + PAGE_SIZE]
    assert mem.read(pages[0], 6000 - 192 - PAGE_SIZE) == data[192 + PAGE_SIZE:]
    assert ring.read(dma, 8000, len(data)) == data
    views = ring.windows(dma, 3 * PAGE_SIZE - 16, 32)
    assert [len(v) for v in views] == [16, 16]


@pytest.fixture
def scattered(mem):
    bench = InProcessBench(mem)
    clients = ScatteredClients(mem)
    dma = DmaManager(mem)
    dev = ManaDevice.new(clients.wrap(bench.connect(dma, "nic0")), "nic0")
    yield bench.device, dev, clients
    dev.shutdown()
    bench.device.close()
    clients.close()
    assert dma.inspect()["pool"]["allocated_pages"] == 0


def test_driver_runs_every_queue_on_scattered_pages(scattered):
    device, dev, clients = scattered
    vport = dev.open_vport(0, VportConfig(rx_wq_size=16384, rx_cq_size=16384))
    rings = [q.mem for q in (*device.eqs.values(), *device.cqs.values(), *device.sqs.values(),
                             *device.rqs.values())]
    data_rings = [r for r in rings if r.size > PAGE_SIZE]
    assert len(data_rings) == 4 and all(r.base is None for r in data_rings)  # vport WQs and CQs: page lists
    hwc_pages = [q.mem.pages[0] for q in (device.hwc.eq, device.hwc.cq, device.hwc.rq, device.hwc.sq)]
    assert all(b != a + PAGE_SIZE for a, b in zip(hwc_pages, hwc_pages[1:]))  # HWC pages: apart
    for _ in range(4):  # every ring wraps
        frames = [f[:n] for f, n in zip(numbered_frames(400, 2048), [60, 1514, 2048, 333] * 100)]
        got = loopback(vport, frames)
        assert len(got) == 400 and same_payloads(got, frames)
    for _ in range(100):
        dev.query_stats()
    for up in (False, True) * 20:
        control.link(device, 0, up)
        dev.poll_events()
    assert device.counters["dma_faults"] == device.counters["malformed_wqes"] == 0


def test_memory_on_scattered_pages_is_never_saved(scattered):
    """The saved state names a block by its first pfn and length: memory on scattered pages cannot cross a
    servicing, and the save says so instead of naming the wrong pages."""
    _, dev, _ = scattered
    dev.open_vport(0, persistent=True)
    with pytest.raises(SaveFailed, match="not on consecutive pages|non-consecutive pages"):
        dev.save()


def test_one_address_agrees_with_the_address_arrays_on_any_page_order():
    """`dma_address` (one range, plain integers: used inside a restore's window) gives the address
    `buffer_addresses` gives for the same range, and refuses a range across non-consecutive pages."""
    from types import SimpleNamespace

    from vfkeep.driver.backing import buffer_addresses, dma_address
    block = SimpleNamespace(pfns=[90, 91, 40, 41, 42, 7])
    for offset, length in [(0, PAGE_SIZE), (5 * PAGE_SIZE, PAGE_SIZE), (2 * PAGE_SIZE + 8, 2 * PAGE_SIZE),
                           (2 * PAGE_SIZE + 100, 50), (PAGE_SIZE - 8, 8)]:
        got = dma_address(block, offset, length)
        assert type(got) is int and got == int(buffer_addresses(block, length, 1, offset)[0])
    for offset, length in [(PAGE_SIZE, 2 * PAGE_SIZE), (4 * PAGE_SIZE + 1, PAGE_SIZE), (2 * PAGE_SIZE - 8, 9)]:
        with pytest.raises(ValueError, match="non-consecutive"):
            dma_address(block, offset, length)
        with pytest.raises(ValueError, match="non-consecutive"):
            buffer_addresses(block, length, 1, offset)
