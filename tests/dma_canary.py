"""Canary bytes around the DMA memory the emulator writes (issue 15 item 4).

`Canaries.wrap(backing)` gives a driver DMA clients whose every block has a guard page of canary bytes on each
side (the driver sees only the middle: its queues, HWC pages, packet buffers); `rx_tails(datapath)` shrinks
every posted receive buffer by `TAIL` bytes (the SGE size the device is given; the buffer stride stays) and
paints those tails. `check()` fails naming every canary the device overwrote, including those of blocks
already freed. Only for drivers whose state is not saved: the guard pages change the block addresses.
"""
from __future__ import annotations

from vfkeep.driver.datapath import RX_WQE_LEN
from vfkeep.gdma.datapath import ManaRxWqeOneSge
from vfkeep.memory.guest_memory import PAGE_SIZE

CANARY = bytes.fromhex("c0ffee00d15ea5e5") * (PAGE_SIZE // 8)
TAIL = 64


class GuardedBlock:
    """A driver block (`DmaBuffer`) in the middle of a block two pages larger, whose first and last page are
    canaries."""

    def __init__(self, inner, owner: "Canaries", what: str):
        self.inner, self.owner, self.what = inner, owner, what
        self.base_pfn, self.pages = inner.base_pfn + 1, inner.pages - 2
        self.len, self.gpa = self.pages * PAGE_SIZE, inner.gpa + PAGE_SIZE
        self.pfns = inner.pfns[1:-1]
        self.persistent = inner.persistent
        self.view = inner.view[PAGE_SIZE:-PAGE_SIZE]
        inner.view[:PAGE_SIZE] = CANARY
        inner.view[-PAGE_SIZE:] = CANARY

    def broken(self) -> list[str]:
        out = []
        for side, guard in (("before", self.inner.view[:PAGE_SIZE]), ("after", self.inner.view[-PAGE_SIZE:])):
            if guard != CANARY:
                first = next(i for i in range(PAGE_SIZE) if guard[i] != CANARY[i])
                out.append(f"{self.what} at gpa {self.gpa:#x}: guard page {side} overwritten from byte {first}")
        return out

    def free(self) -> None:
        self.owner.freed_broken += self.broken()
        self.owner.blocks.remove(self)
        self.inner.free()


class WrappedClient:
    """A DMA client standing in for `inner`: a test wrapper overrides `allocate_dma_buffer` only."""

    def __init__(self, inner, owner):
        self.inner, self.owner = inner, owner
        self.persistent, self.region = inner.persistent, inner.region

    def attach_pending_buffers(self):
        return self.inner.attach_pending_buffers()

    def close(self) -> None:
        self.inner.close()


class GuardedClient(WrappedClient):
    """A `DmaClient` that hands out guarded blocks."""

    def allocate_dma_buffer(self, nbytes: int) -> GuardedBlock:
        block = GuardedBlock(self.inner.allocate_dma_buffer(nbytes + 2 * PAGE_SIZE), self.owner, f"{nbytes}-byte block")
        self.owner.blocks.append(block)
        return block


class Canaries:
    def __init__(self):
        self.blocks: list[GuardedBlock] = []
        self.freed_broken: list[str] = []
        self.tails: list[tuple[memoryview, int, str]] = []  # (buffer view, tail offset, what)

    def wrap(self, backing):
        """Make every DMA block the driver allocates through `backing` a guarded one; returns the backing."""
        dma = backing.dma
        dma.ephemeral = GuardedClient(dma.ephemeral, self)
        if dma.persistent is not None:
            dma.persistent = GuardedClient(dma.persistent, self)
        return backing

    def rx_tails(self, datapath) -> int:
        """Give the device `TAIL` bytes less of every receive buffer than its stride and paint those bytes;
        returns the size the device now sees (larger frames must complete truncated, or be refused)."""
        size = datapath.max_frame - TAIL
        rq = datapath.queues.rq
        for pos in range(rq.size // RX_WQE_LEN):
            wqe = ManaRxWqeOneSge.from_buffer(rq.mem, pos * RX_WQE_LEN)
            wqe.sge.size = size
        for i in range(datapath._rx_nbuf):
            buf = datapath._rx_view[i * datapath.max_frame:(i + 1) * datapath.max_frame]
            buf[size:] = CANARY[:TAIL]
            self.tails.append((buf, size, f"vport {datapath.index} receive buffer {i}"))
        return size

    def broken(self) -> list[str]:
        out = list(self.freed_broken)
        for block in self.blocks:
            out += block.broken()
        for buf, size, what in self.tails:
            if buf[size:] != CANARY[:TAIL]:
                out.append(f"{what}: {TAIL}-byte tail after its {size}-byte SGE overwritten")
        return out

    def check(self) -> None:
        broken = self.broken()
        assert not broken, "device wrote outside its DMA buffers:\n" + "\n".join(broken)
