"""A MANA vport with one TX and one RX queue pair (gdma spec 11-13) and its batched data path.

By default all data-path memory (EQ, CQs, WQs and packet buffers) comes from the device's ephemeral DMA
client (DESIGN D1): it is rebuilt after servicing, never saved. A `persistent` vport (data-path keepalive,
DESIGN D7) takes it from the private pool instead, so `save()` can hand the running queues to the next
worker and `Vport.restore` resumes them without a single queue command.

Every WQE position in the rings is written once when the vport opens (header, OOB, SGE address, key):
the device never modifies the rings, so posting a receive WQE is only a tail advance and sending a
frame is one copy into its packet buffer plus the SGE length. One doorbell covers a whole batch.
The data path of one vport belongs to one thread at a time; HWC requests may come from any thread.
"""
from __future__ import annotations

import ctypes
import logging
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Callable, Sequence

from vfkeep.gdma.constants import (CLIENT_OOB_8, CLIENT_OOB_24, CQE_RX_OKAY, CQE_TX_GDMA_ERR, CQE_TX_OKAY,
                                   DRV_DATA_EQ_SIZE, DRV_DATA_RX_CQ_SIZE, DRV_DATA_RX_WQ_SIZE, DRV_DATA_TX_CQ_SIZE,
                                   DRV_DATA_TX_WQ_SIZE, DRV_DMA_REGION_MAX_PAGES, DRV_RX_MAX_POSTED, GDMA_RQ, GDMA_SQ,
                                   MANA_LONG_PKT_FMT, MANA_SHORT_PKT_FMT, PAGE_SIZE, Tristate)
from vfkeep.gdma.datapath import (ManaRxcompOob, ManaRxWqeOneSge, ManaTxCompOob, ManaTxLongOob, ManaTxOob,
                                  ManaTxShortOob, ManaTxWqeLongOneSge, ManaTxWqeShortOneSge)
from vfkeep.gdma.queues import Sge, WqeHeader, WqeParams, wqe_length
from vfkeep.log import kv
from vfkeep.proto import mana_driver_pb2

from .backing import DmaBuffer
from .errors import DEVICE_ERRORS, BadFrame, VportError
from .queues import CQE_SIZE, CqEq, DoorbellPage, Wq, is_power_of_two

if TYPE_CHECKING:
    from .mana import ManaDevice

log = logging.getLogger("vfkeep.driver.vport")

DEFAULT_BUFFER_SIZE = 2048
MAX_SHORT_VP_OFFSET = 0xFF
RX_WQE_LEN = ctypes.sizeof(ManaRxWqeOneSge)
#: Order of a kept vport's pool blocks, in its saved state and in `Vport._blocks` (allocation order).
SAVED_BLOCKS = ("eq", "sq", "tx_cq", "rq", "rx_cq", "tx_buffers", "rx_buffers")
#: A queue is one DMA region of at most 16 pages (gdma spec 9.11).
MAX_QUEUE_SIZE = DRV_DMA_REGION_MAX_PAGES * PAGE_SIZE


def tx_wqe_len(short: bool) -> int:
    return wqe_length(CLIENT_OOB_8 if short else CLIENT_OOB_24, 1)


def buffer_counts(sq_size: int, tx_cq_size: int, rq_size: int, rx_cq_size: int, short: bool) -> tuple[int, int]:
    """(TX, RX) packet buffers of a vport: one per WQE position, capped so that at most one CQE per CQ slot
    is outstanding (or the device would lap the CQ), RX also at the reference's posting cap."""
    return (min(sq_size // tx_wqe_len(short), tx_cq_size // CQE_SIZE),
            min(rq_size // RX_WQE_LEN, rx_cq_size // CQE_SIZE, DRV_RX_MAX_POSTED))


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


@dataclass
class VportStats:
    tx_frames: int = 0
    tx_bytes: int = 0
    tx_errors: int = 0
    rx_frames: int = 0
    rx_bytes: int = 0
    rx_errors: int = 0


class Vport:
    """Opened by `ManaDevice.open_vport`; closed by `close()` (or the device's save/shutdown)."""

    def __init__(self, dev: ManaDevice, index: int, config: VportConfig, persistent: bool = False):
        self.dev = dev
        self.index = index
        self.config = config
        self.persistent = persistent
        self.max_frame = config.buffer_size
        self.stats = VportStats()
        self.closed = False
        self.vector = dev.data_vector(index)
        self.handle = 0
        self.mac = b""
        self.direction_to_vtl0 = False
        self.tx_vport_offset = 0
        self.tx_failed = False
        self._blocks: list[DmaBuffer] = []
        self._regions: list[int] = []  # created and not yet consumed by a queue
        self._eq_id: int | None = None
        self._tx_obj: int | None = None
        self._rx_obj: int | None = None
        self._rx_enabled = False

    # -- open -------------------------------------------------------------------------------
    def _open(self) -> None:
        dev, gdma, bnic, cfg = self.dev, self.dev.gdma, self.dev.bnic, self.config
        vcfg = bnic.query_vport_config(self.index)
        self.handle, self.mac = vcfg.vport, bytes(vcfg.mac_addr)
        if dev.dev_config.pf_cap_flags1.query_filter_state:
            self.direction_to_vtl0 = bnic.query_filter_state(self.handle)
        tx = bnic.config_vport_tx(self.handle, gdma.pdid, gdma.db_id)
        self.tx_vport_offset = tx.tx_vport_offset
        short = tx.short_form_allowed and tx.tx_vport_offset <= MAX_SHORT_VP_OFFSET

        doorbell = gdma.doorbell_page(gdma.db_id)
        eq_mem = self._alloc(cfg.eq_size)
        gdma.irq.map(self.vector)
        self._eq_id = gdma.create_eq(dev.dev_id, self._region(eq_mem), cfg.eq_size, self.vector)
        self._regions.clear()  # consumed by the EQ
        self._eq = CqEq("eq", eq_mem.view, self._eq_id, doorbell)

        self._tx_obj, self._sq, self._tx_cq = self._create_wq_obj(GDMA_SQ, cfg.tx_wq_size, cfg.tx_cq_size, doorbell)
        self._rx_obj, self._rq, self._rx_cq = self._create_wq_obj(GDMA_RQ, cfg.rx_wq_size, cfg.rx_cq_size, doorbell)

        ntx, nrx = self._counts(short)
        self._format_tx(short, self._alloc(ntx * self.max_frame), write=True)
        self._format_rx(self._alloc(nrx * self.max_frame), write=True)
        bnic.config_vport_rx(self.handle, rx_enable=Tristate.TRUE, rss_enable=Tristate.FALSE,
                             default_rxobj=self._rx_obj)
        self._rx_enabled = True
        # Then post the receive buffers, as the reference data path does (gdma spec 13.1 step 24).
        self._rq.advance_tail(self._rx_nbuf * self._rx_wqe_len)
        self._rq.commit(num_rwqe=self._rx_nbuf)
        kv(log, logging.INFO, "vport open", vport=self.index, mac=self.mac.hex(":"), eq=self._eq_id,
           sq=self._sq.id, tx_cq=self._tx_cq.id, rq=self._rq.id, rx_cq=self._rx_cq.id, vector=self.vector,
           short_form=bool(short))

    def _create_wq_obj(self, wq_type: int, wq_size: int, cq_size: int, doorbell: DoorbellPage) -> tuple[int, Wq, CqEq]:
        """A work queue and its CQ (parent: this vport's EQ) on new memory; CREATE_WQ_OBJ consumes both regions.
        Returns (wq_obj, WQ, CQ)."""
        wq_mem, cq_mem = self._alloc(wq_size), self._alloc(cq_size)
        r = self.dev.bnic.create_wq_obj(self.handle, wq_type, self._region(wq_mem), self._region(cq_mem), wq_size,
                                        cq_size, self._eq_id)
        self._regions.clear()
        kind = "sq" if wq_type == GDMA_SQ else "rq"
        return r.wq_obj, Wq(kind, wq_mem.view, r.wq_id, doorbell), CqEq("cq", cq_mem.view, r.cq_id, doorbell)

    def _counts(self, short: bool) -> tuple[int, int]:
        return buffer_counts(self._sq.size, self._tx_cq.size, self._rq.size, self._rx_cq.size, short)

    def _alloc(self, nbytes: int) -> DmaBuffer:
        block = self.dev.dma.kind(self.persistent).allocate_dma_buffer(nbytes)
        self._blocks.append(block)
        return block

    def _region(self, block: DmaBuffer) -> int:
        region = self.dev.gdma.create_dma_region(self.dev.dev_id, block)
        self._regions.append(region)
        return region

    def _format_tx(self, short: bool, buffers: DmaBuffer, write: bool) -> None:
        """Write every SQ position once (`write`; a restored SQ already holds them): header, OOB, SGE address
        and key; only the length changes per frame."""
        gdma = self.dev.gdma
        code = CLIENT_OOB_8 if short else CLIENT_OOB_24
        wqe_type = ManaTxWqeShortOneSge if short else ManaTxWqeLongOneSge
        self._short = bool(short)
        self._tx_wqe_len = tx_wqe_len(short)
        assert self._tx_wqe_len == ctypes.sizeof(wqe_type)
        positions = self._sq.size // self._tx_wqe_len
        self._tx_nbuf = self._counts(short)[0]
        self._tx_view = buffers.view
        s_oob = ManaTxShortOob(pkt_fmt=MANA_SHORT_PKT_FMT if short else MANA_LONG_PKT_FMT,
                               vcq_num=self._tx_cq.id, vsq_frame=(self._sq.id >> 10) & 0x3FFF)
        if short:
            s_oob.short_vp_offset = self.tx_vport_offset
            oob = s_oob
        else:
            oob = ManaTxOob(s_oob=s_oob, l_oob=ManaTxLongOob(long_vp_offset=self.tx_vport_offset))
        header = WqeHeader(params=WqeParams(num_sgl_entries=1, inline_client_oob_size=code))
        self._tx_sges: list[Sge] = []
        for pos in range(positions):
            wqe = wqe_type.from_buffer(self._sq.mem, pos * self._tx_wqe_len)
            if write:
                wqe.oob = oob
                wqe.sge = Sge(address=buffers.gpa + (pos % self._tx_nbuf) * self.max_frame, mem_key=gdma.gpa_mkey)
                wqe.header = header
            self._tx_sges.append(wqe.sge)
        self._tx_positions_mask = positions - 1
        self._tx_comps = [ManaTxCompOob.from_buffer(self._tx_cq.mem, i * CQE_SIZE)
                          for i in range(self._tx_cq.size // CQE_SIZE)]
        self._tx_posted = 0
        self._tx_done = 0

    def _format_rx(self, buffers: DmaBuffer, write: bool) -> None:
        """Write every RQ position once (`write`); position p receives into buffer p mod nbuf, in posting order."""
        gdma = self.dev.gdma
        self._rx_wqe_len = RX_WQE_LEN
        positions = self._rq.size // self._rx_wqe_len
        self._rx_nbuf = self._counts(self._short)[1]
        self._rx_view = buffers.view
        header = WqeHeader(params=WqeParams(num_sgl_entries=1, inline_client_oob_size=CLIENT_OOB_8))
        for pos in range(positions if write else 0):
            wqe = ManaRxWqeOneSge.from_buffer(self._rq.mem, pos * self._rx_wqe_len)
            wqe.sge = Sge(address=buffers.gpa + (pos % self._rx_nbuf) * self.max_frame, mem_key=gdma.gpa_mkey,
                          size=self.max_frame)
            wqe.header = header
        self._rx_comps = [ManaRxcompOob.from_buffer(self._rx_cq.mem, i * CQE_SIZE)
                          for i in range(self._rx_cq.size // CQE_SIZE)]
        self._rx_done = 0

    # -- data path ----------------------------------------------------------------------------
    @property
    def tx_outstanding(self) -> int:
        return self._tx_posted - self._tx_done

    @property
    def tx_free(self) -> int:
        return self._tx_nbuf - self.tx_outstanding

    def send(self, frames: Sequence[bytes | bytearray | memoryview]) -> int:
        """Queue as many frames as there are free TX buffers (one copy each, one doorbell for the batch).
        Returns how many were taken, from the front of `frames`."""
        self._check_open()
        self._reap_tx()
        n = min(len(frames), self._tx_nbuf - (self._tx_posted - self._tx_done))
        if n <= 0:
            return 0
        bs, view, sges = self.max_frame, self._tx_view, self._tx_sges
        for f in frames[:n]:
            if not 0 < len(f) <= bs:
                raise BadFrame(f"frame of {len(f)} bytes does not fit a {bs}-byte buffer")
        sq = self._sq
        pos = sq.tail // self._tx_wqe_len
        pmask, bmask = self._tx_positions_mask, self._tx_nbuf - 1
        nbytes = 0
        for f in frames[:n]:
            p = pos & pmask
            off = (p & bmask) * bs
            length = len(f)
            view[off:off + length] = f
            sges[p].size = length
            nbytes += length
            pos += 1
        sq.advance_tail(n * self._tx_wqe_len)
        self._tx_posted += n
        sq.commit()
        self.stats.tx_frames += n
        self.stats.tx_bytes += nbytes
        return n

    def _reap_tx(self) -> int:
        """Consume TX completions; each frees the oldest send WQE and its buffer (in-order completion)."""
        cq, comps = self._tx_cq, self._tx_comps
        done = 0
        while (off := cq.poll_offset()) is not None:
            cqe_type = comps[off // CQE_SIZE].cqe_hdr.cqe_type
            if cqe_type != CQE_TX_OKAY:
                self.stats.tx_errors += 1
                if cqe_type == CQE_TX_GDMA_ERR and not self.tx_failed:
                    self.tx_failed = True
                    kv(log, logging.ERROR, "tx queue disabled by the device", vport=self.index, sq=self._sq.id)
            done += 1
        if done:
            self._tx_done += done
            self._sq.advance_head(done * self._tx_wqe_len)
        return done

    def receive_into(self, sink: Callable[[memoryview], object], max_frames: int = 64, timeout: float = 0.0) -> int:
        """Hand up to `max_frames` received frames to `sink` as views of the packet buffers (valid only during
        the call: the buffers are re-posted afterwards); wait up to `timeout` seconds if none is ready."""
        self._check_open()
        n = self._drain_rx(sink, max_frames)
        if n or timeout <= 0:
            return n
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return 0
            self.wait(remaining)
            n = self._drain_rx(sink, max_frames)
            if n:
                return n

    def receive(self, max_frames: int = 64, timeout: float = 0.0) -> list[bytes]:
        """Up to `max_frames` received frames (copies); waits up to `timeout` seconds if none is ready."""
        frames: list[bytes] = []
        self.receive_into(lambda view: frames.append(bytes(view)), max_frames, timeout)
        return frames

    def _drain_rx(self, sink: Callable[[memoryview], object], max_frames: int) -> int:
        cq, comps, view, bs = self._rx_cq, self._rx_comps, self._rx_view, self.max_frame
        bmask = self._rx_nbuf - 1
        seq = self._rx_done
        taken = delivered = nbytes = 0
        while taken < max_frames and (off := cq.poll_offset()) is not None:
            comp = comps[off // CQE_SIZE]
            buf = ((seq + taken) & bmask) * bs
            taken += 1
            if comp.cqe_hdr.cqe_type == CQE_RX_OKAY:
                length = comp.ppi[0].pkt_len
                if length <= bs:
                    sink(view[buf:buf + length])
                    delivered += 1
                    nbytes += length
                    continue
            self.stats.rx_errors += 1
        if taken:
            # Re-post the same buffers: the WQE at the new tail already points at them.
            self._rx_done = seq + taken
            rq = self._rq
            rq.advance_head(taken * self._rx_wqe_len)
            rq.advance_tail(taken * self._rx_wqe_len)
            rq.commit(num_rwqe=taken)
            self.stats.rx_frames += delivered
            self.stats.rx_bytes += nbytes
        return delivered

    # -- waiting ------------------------------------------------------------------------------
    def fileno(self) -> int:
        """Eventfd that becomes readable when `prepare_wait()` armed the queues and work arrived."""
        return self.dev.gdma.irq.fd(self.vector)

    def prepare_wait(self) -> bool:
        """Arm CQs and EQ for an interrupt (gdma spec 6.6). False if work is already waiting: do not sleep."""
        self._check_open()
        self.dev.gdma.irq.clear(self.vector)
        eq = self._eq
        if self._drain_eq():
            return False
        self._reap_tx()  # TX completions are the vport's own work: consume them, never report them as waiting
        self._rx_cq.arm()
        tx_busy = self._tx_posted != self._tx_done
        if tx_busy:
            self._tx_cq.arm()
        eq.arm()
        return not (self._rx_cq.pending() or (tx_busy and self._tx_cq.pending()) or eq.pending())

    def wait(self, timeout: float) -> bool:
        """Sleep until RX or TX completions arrive or `timeout` passes; True if woken by work."""
        if not self.prepare_wait():
            return True
        return self.dev.gdma.irq.wait(self.vector, timeout)

    def _drain_eq(self) -> int:
        """Consume completion events (the CQs are polled directly, the events only say which one fired)."""
        n = 0
        while self._eq.poll_offset() is not None:
            n += 1
        if n:
            self._eq.ack()
        return n

    def change_vector(self, vector: int) -> None:
        """Deliver this vport's interrupts on another MSI-X vector (CHANGE_MSIX_FOR_EQ), e.g. another CPU's."""
        self._check_open()
        if not 0 <= vector < self.dev.gdma.num_msix:
            raise ValueError(f"vector {vector} is not below the {self.dev.gdma.num_msix} vectors in use")
        if vector != self.vector:
            self.dev.gdma.change_msix(self.dev.dev_id, self._eq_id, vector)
            self.vector = vector

    # -- status ---------------------------------------------------------------------------------
    @property
    def link_up(self) -> bool:
        return self.dev.link_up(self.index)

    def queue_ids(self) -> dict[str, int]:
        """Device ids of this vport's queues (for inspect and logs)."""
        return {"eq": self._eq_id, "sq": self._sq.id, "tx_cq": self._tx_cq.id, "rq": self._rq.id,
                "rx_cq": self._rx_cq.id}

    def inspect(self) -> dict:
        """Identity, queue ids and driver-side counters; a plain read, safe from another thread than the
        data path's (which owns the queues)."""
        return {"index": self.index, "handle": self.handle, "mac": self.mac.hex(":"), "persistent": self.persistent,
                **self.queue_ids(), "stats": asdict(self.stats)}

    def _check_open(self) -> None:
        if self.closed:
            raise VportError(f"vport {self.index} is closed")

    # -- data-path keepalive (DESIGN D7) ----------------------------------------------------------
    def save(self) -> mana_driver_pb2.VportSavedState:
        """Hand the running queues over: reap TX completions and record everything `Vport.restore` needs.
        Nothing is sent to the device (no CONFIG_VPORT_RX, DESTROY_WQ_OBJ or DISABLE_QUEUE); the vport is
        closed for this driver and its pool blocks stay allocated (`release_kept()` frees them)."""
        self._check_open()
        self._reap_tx()
        state = mana_driver_pb2.VportSavedState(
            vport_index=self.index, vport_handle=self.handle, tx_vport_offset=self.tx_vport_offset,
            mac=int.from_bytes(self.mac, "big"),
            vector=self.vector, eq=self._eq.save(), tx_cq=self._tx_cq.save(),
            rx_cq=self._rx_cq.save(), sq=self._sq.save(), rq=self._rq.save(), tx_wq_obj=self._tx_obj,
            rx_wq_obj=self._rx_obj, buffer_size=self.max_frame, tx_buffers=self._tx_nbuf,
            rx_buffers=self._rx_nbuf, short_form=self._short, tx_posted=self._tx_posted, tx_done=self._tx_done,
            rx_done=self._rx_done, direction_to_vtl0=self.direction_to_vtl0)
        for block in self._blocks:
            state.mem.add(base_pfn=block.base_pfn, len=block.len)
        self.closed = True
        self.dev._vport_closed(self)
        kv(log, logging.INFO, "vport kept for data-path keepalive", vport=self.index, **self.queue_ids(),
           tx_outstanding=self.tx_outstanding, rx_done=self._rx_done)
        return state

    def release_kept(self) -> None:
        """Free the pool blocks of a vport `save()` kept, when no next driver will take them."""
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
        v._blocks = list(blocks)
        blk = dict(zip(SAVED_BLOCKS, blocks))
        doorbell = gdma.doorbell_page(state.eq.doorbell.doorbell_id)
        v._eq, v._eq_id = CqEq.restore("eq", state.eq, blk["eq"].view, doorbell), state.eq.id
        v._sq = Wq.restore("sq", state.sq, blk["sq"].view, doorbell)
        v._tx_cq = CqEq.restore("cq", state.tx_cq, blk["tx_cq"].view, doorbell)
        v._rq = Wq.restore("rq", state.rq, blk["rq"].view, doorbell)
        v._rx_cq = CqEq.restore("cq", state.rx_cq, blk["rx_cq"].view, doorbell)
        v._tx_obj, v._rx_obj, v._rx_enabled = state.tx_wq_obj, state.rx_wq_obj, True
        v._format_tx(state.short_form, blk["tx_buffers"], write=False)
        v._format_rx(blk["rx_buffers"], write=False)
        v._tx_posted, v._tx_done, v._rx_done = state.tx_posted, state.tx_done, state.rx_done
        dev.vports[v.index] = v
        gdma.irq.map(v.vector)
        v.prepare_wait()
        kv(log, logging.INFO, "vport restored from data-path keepalive", vport=v.index, mac=v.mac.hex(":"),
           **v.queue_ids(), vector=v.vector, tx_outstanding=v.tx_outstanding, rx_done=v._rx_done)
        return v

    # -- teardown (gdma spec 13.2) -------------------------------------------------------------
    def close(self) -> None:
        """Stop traffic and destroy the queues in reverse order of creation, then free the memory.

        With a reset request pending the device reclaims everything itself, so nothing is sent. If a
        request fails the device may still own the queues, so their memory is leaked, not reused.
        """
        if self.closed:
            return
        self.closed = True
        gdma, bnic = self.dev.gdma, self.dev.bnic
        release = True
        if not gdma.reset_pending:
            try:
                if self._rx_enabled:
                    bnic.config_vport_rx(self.handle, rx_enable=Tristate.FALSE, rss_enable=Tristate.UNKNOWN)
                if self._rx_obj is not None:
                    bnic.destroy_wq_obj(GDMA_RQ, self._rx_obj)
                if self._tx_obj is not None:
                    bnic.destroy_wq_obj(GDMA_SQ, self._tx_obj)
                if self._eq_id is not None:
                    gdma.disable_eq(self.dev.dev_id, self._eq_id)
                for region in reversed(self._regions):
                    gdma.destroy_dma_region(self.dev.dev_id, region)
            except DEVICE_ERRORS as e:
                release = False
                kv(log, logging.ERROR, "vport teardown failed; leaking its queue memory", vport=self.index, error=e)
        if release:
            for block in self._blocks:
                block.free()
        self._blocks.clear()
        self.dev._vport_closed(self)
        kv(log, logging.INFO, "vport closed", vport=self.index, released=release, **asdict(self.stats))
