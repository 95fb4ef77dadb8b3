"""The emulator's DMA helpers: `MappedMemory` and the per-batch `DmaWindow` (one lookup per mapping)."""
import pytest

from vfkeep.device.dma import DmaFault, DmaWindow, MappedMemory
from vfkeep.memory import GuestMemory, MemoryLayout


@pytest.fixture
def mem():
    m = GuestMemory.create(MemoryLayout(4, 4, 0))
    yield m
    m.close()


class CountingDma(MappedMemory):
    lookups = 0

    def mapping(self, iova, n, write=False):
        self.lookups += 1
        return super().mapping(iova, n, write)


def test_window_looks_up_a_mapping_once_per_range(mem):
    dma = CountingDma(mem, [(0, 2 * 4096), (4 * 4096, 4096)])
    win = DmaWindow(dma, write=True)
    for off in range(0, 8000, 100):
        win.view(off, 64)[:2] = b"ok"
    assert dma.lookups == 1
    assert mem.read(100, 2) == b"ok"
    win.view(4 * 4096, 8)[:] = b"x" * 8  # another mapping: one more lookup
    bytes(win.view(4 * 4096 + 8, 8))
    assert dma.lookups == 2
    assert mem.read(4 * 4096, 8) == b"x" * 8


@pytest.mark.parametrize("iova,n", [(2 * 4096 - 4, 8), (3 * 4096, 1), (0, -1), (5 * 4096, 1)])
def test_window_faults_outside_the_mapped_ranges(mem, iova, n):
    win = DmaWindow(MappedMemory(mem, [(0, 2 * 4096), (4 * 4096, 4096)]))
    win.view(0, 8)  # a cached mapping does not make a neighbouring range reachable
    with pytest.raises(DmaFault):
        win.view(iova, n)
