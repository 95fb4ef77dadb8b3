"""A MANA vport's control plane (gdma spec 11-13): the device objects behind one TX and one RX queue pair.

Opening a vport queries it, creates its EQ and work queues (each on DMA regions the queue consumes) and
starts RX; every device object created is recorded with the request that undoes it, and `close()` runs
those in reverse order of creation. Sending and receiving are the data path's (`datapath.VportDataPath`,
`vport.data`).

By default all data-path memory (EQ, CQs, WQs and packet buffers) comes from the device's ephemeral DMA
client (DESIGN D1): it is rebuilt after servicing, never saved. A `persistent` vport (data-path keepalive,
DESIGN D7) takes it from the private pool instead, so `save()` can hand the running queues to the next
worker and `Vport.restore` resumes them without a single queue command.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Callable

from vfkeep.gdma.constants import (DRV_DATA_EQ_SIZE, DRV_DATA_RX_CQ_SIZE, DRV_DATA_RX_WQ_SIZE, DRV_DATA_TX_CQ_SIZE,
                                   DRV_DATA_TX_WQ_SIZE, DRV_DMA_REGION_MAX_PAGES, GDMA_RQ, GDMA_SQ, PAGE_SIZE,
                                   Tristate)
from vfkeep import kill_points
from vfkeep.log import kv
from vfkeep.proto import mana_driver_pb2

from .backing import DmaBuffer, contiguous
from .datapath import VportDataPath, VportQueues, VportStats, buffer_counts
from .errors import DEVICE_ERRORS, SaveFailed, VportError
from .queues import CqEq, DoorbellPage, Wq, is_power_of_two

if TYPE_CHECKING:
    from .mana import ManaDevice

log = logging.getLogger("vfkeep.driver.vport")

DEFAULT_BUFFER_SIZE = 2048
MAX_SHORT_VP_OFFSET = 0xFF
#: Order of a kept vport's pool blocks, in its saved state and in `Vport._blocks` (allocation order).
SAVED_BLOCKS = ("eq", "sq", "tx_cq", "rq", "rx_cq", "tx_buffers", "rx_buffers")
#: A queue is one DMA region of at most 16 pages (gdma spec 9.11).
MAX_QUEUE_SIZE = DRV_DMA_REGION_MAX_PAGES * PAGE_SIZE


@dataclass(frozen=True)
class VportConfig:
    """Queue sizes (bytes, powers of two) and the packet buffer size, which is also the largest frame."""

    eq_size: int = DRV_DATA_EQ_SIZE
    tx_wq_size: int = DRV_DATA_TX_WQ_SIZE
    tx_cq_size: int = DRV_DATA_TX_CQ_SIZE
    rx_wq_size: int = DRV_DATA_RX_WQ_SIZE
    rx_cq_size: int = DRV_DATA_RX_CQ_SIZE
    buffer_size: int = DEFAULT_BUFFER_SIZE

    def __post_init__(self) -> None:
        for name in ("eq_size", "tx_wq_size", "tx_cq_size", "rx_wq_size", "rx_cq_size"):
            v = getattr(self, name)
            if not is_power_of_two(v) or v < 4096:
                raise ValueError(f"{name} {v} must be a power of two of at least 4096 bytes")
        if not 64 <= self.buffer_size <= 65535:
            raise ValueError(f"buffer_size {self.buffer_size} must be in [64, 65535]")


class Vport:
    """Opened by `ManaDevice.open_vport`; closed by `close()` (or the device's save/shutdown)."""

    def __init__(self, dev: ManaDevice, index: int, config: VportConfig, persistent: bool = False):
        self.dev = dev
        self.index = index
        self.config = config
        self.persistent = persistent
        self.closed = False
        self.vector = dev.data_vector(index)
        self.handle = 0
        self.mac = b""
        self.direction_to_vtl0 = False
        self.tx_vport_offset = 0
        self.data: VportDataPath | None = None
        self._blocks: list[DmaBuffer] = []
        #: What undoes each device object created so far, in creation order (a DMA region until a queue
        #: consumes it, then the queue).
        self._resources: list[Callable[[], None]] = []
        self._tx_obj = self._rx_obj = 0

    # -- open -------------------------------------------------------------------------------
    def _open(self) -> None:
        dev, gdma, bnic, cfg = self.dev, self.dev.gdma, self.dev.bnic, self.config
        mem: dict[str, DmaBuffer] = {}

        def allocate_queues() -> None:
            """The queues' memory (in `SAVED_BLOCKS` order) depends on no answer: allocated and zeroed while the
            device works on the first request, not between the requests that hand it to the device."""
            for name, size in (("eq", cfg.eq_size), ("sq", cfg.tx_wq_size), ("tx_cq", cfg.tx_cq_size),
                               ("rq", cfg.rx_wq_size), ("rx_cq", cfg.rx_cq_size)):
                mem[name] = self._alloc(size)

        vcfg = bnic.query_vport_config(self.index, meanwhile=allocate_queues)
        self.handle, self.mac = vcfg.vport, bytes(vcfg.mac_addr)
        if dev.dev_config.pf_cap_flags1.query_filter_state:
            self.direction_to_vtl0 = bnic.query_filter_state(self.handle)
        tx = bnic.config_vport_tx(self.handle, gdma.pdid, gdma.db_id)
        self.tx_vport_offset = tx.tx_vport_offset
        short = tx.short_form_allowed and tx.tx_vport_offset <= MAX_SHORT_VP_OFFSET

        doorbell = gdma.doorbell_page(gdma.db_id)
        eq_mem = mem["eq"]
        gdma.irq.map(self.vector)
        eq_id = gdma.create_eq(dev.dev_id, self._region(eq_mem), cfg.eq_size, self.vector)
        self._consumed(1, lambda: gdma.disable_eq(dev.dev_id, eq_id))
        eq = CqEq("eq", eq_mem.view, eq_id, doorbell)

        self._tx_obj, sq, tx_cq = self._create_wq_obj(GDMA_SQ, mem["sq"], cfg.tx_wq_size, mem["tx_cq"], cfg.tx_cq_size,
                                                      eq_id, doorbell)
        kill_points.reached("restore.vport")
        self._rx_obj, rq, rx_cq = self._create_wq_obj(GDMA_RQ, mem["rq"], cfg.rx_wq_size, mem["rx_cq"], cfg.rx_cq_size,
                                                      eq_id, doorbell)

        def build_data_path() -> None:
            """Packet buffers and formatted rings: needed only to post the receive buffers (gdma spec 13.1 step
            24, after CONFIG_VPORT_RX), so built while the device works on CONFIG_VPORT_RX."""
            ntx, nrx = buffer_counts(sq.size, tx_cq.size, rq.size, rx_cq.size, short)
            tx_buffers, rx_buffers = self._alloc(ntx * cfg.buffer_size), self._alloc(nrx * cfg.buffer_size)
            self.data = VportDataPath(gdma, self.index, self.vector, VportQueues(eq, sq, tx_cq, rq, rx_cq),
                                      tx_buffers, rx_buffers, buffer_size=cfg.buffer_size, short=short,
                                      tx_vport_offset=self.tx_vport_offset, format=True)

        try:
            bnic.config_vport_rx(self.handle, rx_enable=Tristate.TRUE, rss_enable=Tristate.FALSE,
                                 default_rxobj=self._rx_obj, meanwhile=build_data_path)
        finally:
            if not gdma.hwc_failure:  # RX is on (also when only building the data path failed): undo it first
                self._resources.append(self._stop_rx)
        # Then post the receive buffers, as the reference data path does (gdma spec 13.1 step 24).
        self.data.post_receive_buffers()
        kv(log, logging.INFO, "vport open", vport=self.index, mac=self.mac.hex(":"), **self.queue_ids(),
           vector=self.vector, short_form=bool(short))

    def _create_wq_obj(self, wq_type: int, wq_mem: DmaBuffer, wq_size: int, cq_mem: DmaBuffer, cq_size: int,
                       eq_id: int, doorbell: DoorbellPage) -> tuple[int, Wq, CqEq]:
        """A work queue and its CQ (parent: this vport's EQ) on the given memory; CREATE_WQ_OBJ consumes both
        regions. Returns (wq_obj, WQ, CQ)."""
        bnic = self.dev.bnic
        r = bnic.create_wq_obj(self.handle, wq_type, self._region(wq_mem), self._region(cq_mem), wq_size, cq_size,
                               eq_id)
        self._consumed(2, lambda: bnic.destroy_wq_obj(wq_type, r.wq_obj))
        kind = "sq" if wq_type == GDMA_SQ else "rq"
        return r.wq_obj, Wq(kind, wq_mem.view, r.wq_id, doorbell), CqEq("cq", cq_mem.view, r.cq_id, doorbell)

    def _alloc(self, nbytes: int) -> DmaBuffer:
        block = self.dev.dma.kind(self.persistent).allocate_dma_buffer(nbytes)
        self._blocks.append(block)
        return block

    def _region(self, block: DmaBuffer) -> int:
        dev = self.dev
        region = dev.gdma.create_dma_region(dev.dev_id, block)
        self._resources.append(lambda: dev.gdma.destroy_dma_region(dev.dev_id, region))
        return region

    def _consumed(self, regions: int, undo: Callable[[], None]) -> None:
        """The last `regions` DMA regions now belong to a queue (the device destroys them with it)."""
        del self._resources[len(self._resources) - regions:]
        self._resources.append(undo)

    def _stop_rx(self) -> None:
        self.dev.bnic.config_vport_rx(self.handle, rx_enable=Tristate.FALSE, rss_enable=Tristate.UNKNOWN)

    # -- control ----------------------------------------------------------------------------------
    def change_vector(self, vector: int) -> None:
        """Deliver this vport's interrupts on another MSI-X vector (CHANGE_MSIX_FOR_EQ), e.g. another CPU's."""
        self._check_open()
        gdma = self.dev.gdma
        if not 0 <= vector < gdma.num_msix:
            raise ValueError(f"vector {vector} is not below the {gdma.num_msix} vectors in use")
        if vector != self.vector:
            gdma.change_msix(self.dev.dev_id, self.data.queues.eq.id, vector)
            self.vector = self.data.vector = vector

    @property
    def link_up(self) -> bool:
        return self.dev.link_up(self.index)

    @property
    def stats(self) -> VportStats:
        return self.data.stats if self.data is not None else VportStats()

    def queue_ids(self) -> dict[str, int]:
        """Device ids of this vport's queues (for inspect and logs)."""
        return self.data.queues.ids()

    def inspect(self) -> dict:
        """Identity, queue ids and driver-side counters; a plain read, safe from another thread than the
        data path's (which owns the queues)."""
        return {"index": self.index, "handle": self.handle, "mac": self.mac.hex(":"), "persistent": self.persistent,
                **self.queue_ids(), "stats": asdict(self.stats),
                "tx_timeouts": self.data.tx_timeouts if self.data is not None else 0}

    def _check_open(self) -> None:
        if self.closed:
            raise VportError(f"vport {self.index} is closed")

    # -- data-path keepalive (DESIGN D7) ----------------------------------------------------------
    def save(self) -> mana_driver_pb2.VportSavedState:
        """Hand the running queues over: reap TX completions and record everything `Vport.restore` needs.
        Nothing is sent to the device (no CONFIG_VPORT_RX, DESTROY_WQ_OBJ or DISABLE_QUEUE); the vport is
        closed for this driver, and `release_kept()` returns its pool blocks (the device keeps using them: a
        pool snapshot taken before holds them for the next driver)."""
        self._check_open()
        if not all(contiguous(b) for b in self._blocks):  # the saved state names blocks by base pfn and length
            raise SaveFailed(f"vport {self.index} has queue memory on non-consecutive pages")
        state = self._saved_state()
        self.data.save(state)
        self.closed = self.data.closed = True
        self.dev._vport_closed(self)
        kv(log, logging.INFO, "vport kept for data-path keepalive", vport=self.index, **self.queue_ids(),
           tx_outstanding=self.data.tx_outstanding, rx_done=state.rx_done)
        return state

    def _saved_state(self) -> mana_driver_pb2.VportSavedState:
        """The vport's own part of its saved state (the data path adds its queues: `VportDataPath.save`/`record`)."""
        state = mana_driver_pb2.VportSavedState(
            vport_index=self.index, vport_handle=self.handle, tx_vport_offset=self.tx_vport_offset,
            mac=int.from_bytes(self.mac, "big"), vector=self.vector, tx_wq_obj=self._tx_obj, rx_wq_obj=self._rx_obj,
            direction_to_vtl0=self.direction_to_vtl0)
        for block in self._blocks:
            state.mem.add(base_pfn=block.base_pfn, len=block.len)
        return state

    def rehearse_save(self) -> mana_driver_pb2.VportSavedState:
        """What `save` would record now, changing nothing (no reaping, no posting, the vport stays open)."""
        state = self._saved_state()
        self.data.record(state)
        return state

    def release_kept(self) -> None:
        """Return the pool blocks of a vport `save()` kept to the pool (the saved state still names them)."""
        for block in self._blocks:
            block.free()
        self._blocks.clear()

    @classmethod
    def restore(cls, dev: ManaDevice, state: mana_driver_pb2.VportSavedState, blocks: list[DmaBuffer]) -> Vport:
        """Rebuild a kept vport over its re-attached pool blocks (state checked by
        `save_restore.validate_vport_state`, blocks in `SAVED_BLOCKS` order): re-map its MSI-X vector and
        re-arm its EQ and CQs; no queue command."""
        gdma = dev.gdma
        cfg = VportConfig(eq_size=state.eq.size, tx_wq_size=state.sq.mask + 1, tx_cq_size=state.tx_cq.size,
                          rx_wq_size=state.rq.mask + 1, rx_cq_size=state.rx_cq.size, buffer_size=state.buffer_size)
        v = cls(dev, state.vport_index, cfg, persistent=True)
        v.vector, v.handle, v.mac = state.vector, state.vport_handle, state.mac.to_bytes(6, "big")
        v.tx_vport_offset, v.direction_to_vtl0 = state.tx_vport_offset, state.direction_to_vtl0
        v._tx_obj, v._rx_obj = state.tx_wq_obj, state.rx_wq_obj
        v._blocks = list(blocks)
        eq_id = state.eq.id
        # dev.bnic and dev.dev_id are read when undone: a restore that defers the HWC probe has neither yet.
        v._resources = [lambda: gdma.disable_eq(dev.dev_id, eq_id),
                        lambda: dev.bnic.destroy_wq_obj(GDMA_SQ, v._tx_obj),
                        lambda: dev.bnic.destroy_wq_obj(GDMA_RQ, v._rx_obj), v._stop_rx]
        v.data = VportDataPath.restore(gdma, state, dict(zip(SAVED_BLOCKS, blocks)))
        dev.vports[v.index] = v
        gdma.irq.map(v.vector)
        v.data.prepare_wait()
        kv(log, logging.INFO, "vport restored from data-path keepalive", vport=v.index, mac=v.mac.hex(":"),
           **v.queue_ids(), vector=v.vector, tx_outstanding=v.data.tx_outstanding, rx_done=state.rx_done)
        return v

    # -- teardown (gdma spec 13.2) -------------------------------------------------------------
    def close(self) -> None:
        """Stop traffic and undo every device object in reverse order of creation, then free the memory.

        With a reset request pending the device reclaims everything itself, and a device that is gone has
        nothing to undo, so nothing is sent (`silent_teardown`). If a request fails the device may still own
        the queues, so their memory is not reused: it goes to the device's `leaked` until a reset.
        """
        if self.closed:
            return
        self.closed = True
        if self.data is not None:
            self.data.closed = True
        release = True
        if not self.dev.gdma.silent_teardown:
            try:
                for undo in reversed(self._resources):
                    undo()
            except DEVICE_ERRORS as e:
                release = False
                kv(log, logging.ERROR, "vport teardown failed; leaking its queue memory", vport=self.index, error=e)
        self._resources.clear()
        if release:
            for block in self._blocks:
                block.free()
        else:
            self.dev.leaked += self._blocks
        self._blocks.clear()
        self.dev._vport_closed(self)
        kv(log, logging.INFO, "vport closed", vport=self.index, released=release, **asdict(self.stats))
