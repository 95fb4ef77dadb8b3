"""The data path of a MANA vport (gdma spec 12-13): its five queues, packet buffers, send and receive.

Every WQE position in the rings is written once when the vport opens (header, OOB, SGE address, key):
the device never modifies the rings, so posting a receive WQE is only a tail advance and sending a
frame is one copy into its packet buffer plus the SGE length. One doorbell covers a whole batch.
A data path belongs to one thread at a time; its vport's control plane (`vport.Vport`) builds it,
creates and destroys the device objects behind it, and never touches the queues while they are in use.
"""
from __future__ import annotations

import array
import ctypes
import itertools
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

import numpy as np

from vfkeep.gdma.constants import (CLIENT_OOB_8, CLIENT_OOB_24, CQE_RX_OKAY, CQE_TX_GDMA_ERR, CQE_TX_OKAY,
                                   DRV_RX_MAX_POSTED, GDMA_EQE_COMPLETION, MANA_LONG_PKT_FMT, MANA_SHORT_PKT_FMT)
from vfkeep.gdma import codec
from vfkeep.gdma.datapath import (ManaRxcompOob, ManaRxWqeOneSge, ManaTxCompOob, ManaTxLongOob, ManaTxOob,
                                  ManaTxShortOob, ManaTxWqeLongOneSge, ManaTxWqeShortOneSge)
from vfkeep.gdma.queues import Cqe, Sge, WqeHeader, WqeParams, wqe_length
from vfkeep.log import kv
from vfkeep.proto import mana_driver_pb2

from .backing import DmaBuffer, buffer_addresses
from .errors import BadFrame, DeviceMissing, TxHung, VportError
from .gdma_driver import ALL_ONES32
from .queues import CQE_SIZE, EQE_SIZE, CqEq, DoorbellPage, Wq

if TYPE_CHECKING:
    from .gdma_driver import GdmaDriver

log = logging.getLogger("vfkeep.driver.vport")

RX_WQE_LEN = ctypes.sizeof(ManaRxWqeOneSge)
_CQE_TYPE = codec.CQE_HDR.mask["cqe_type"]
assert codec.CQE_HDR.shift["cqe_type"] == 0
_EQE_TYPE = codec.EQE_PARAMS.mask["event_type"]
assert codec.EQE_PARAMS.shift["event_type"] == 0
_CQ_ID_SHIFT, _CQ_ID_MASK = codec.EQE_COMPLETION_DATA.shift["cq_id"], codec.EQE_COMPLETION_DATA.mask["cq_id"]
#: Byte offsets in a CQE of what the driver reads of an RX completion, as u32 and u16 columns: cqe_hdr, pkt_len.
(_RX_HDR_AT, _), (_RX_LEN_AT, _) = (codec.field_span(ManaRxcompOob, f, codec.field_span(Cqe, "data")[0])
                                    for f in ("cqe_hdr", "ppi.0.pkt_len"))
assert _RX_HDR_AT % 4 == 0 and _RX_LEN_AT % 2 == 0
#: Byte offset in a CQE of a TX completion's cqe_hdr, read as a u32 column.
_TX_HDR_AT = codec.field_span(ManaTxCompOob, "cqe_hdr", codec.field_span(Cqe, "data")[0])[0]
assert _TX_HDR_AT % 4 == 0


#: Sends outstanding this long without a TX completion: the device may never have seen their doorbell (written
#: while it was briefly removed: the posted write went nowhere and no read told the driver), so the SQ and RQ
#: doorbells are rung again with the current tails. Harmless if it had: a tail that adds no bytes is ignored
#: (gdma spec 4.3). The TX watchdog of a NIC driver, far shorter than Linux's 5 s as nothing here is slower.
TX_TIMEOUT_S = 1.0
#: Watchdog timeouts in a row (no completion in between) after which the send queue is hung: `prepare_wait`
#: raises TxHung, and the NIC resets the function (an FLR behind the driver's back leaves nothing else to see).
TX_HUNG_TIMEOUTS = 3


def _rows(view: memoryview, count: int, size: int) -> np.ndarray:
    """The first `count` buffers of `size` bytes of a packet-buffer block, as the rows of one uint8 array."""
    return np.frombuffer(view, np.uint8, count * size).reshape(count, size)


#: Byte offset of an SGE's u64 address in the SGE (`_format_ring` writes it as a column).
_SGE_ADDRESS_AT = codec.field_span(Sge, "address")[0]
assert codec.field_span(Sge, "address")[1] == 8
assert codec.field_span(Sge, "size")[1] == 4  # (a send rewrites it as a u32 word)


def _format_ring(ring: memoryview, wqe: bytes, positions: int, address_at: int, addresses: np.ndarray) -> None:
    """Write `wqe` at each of the `positions` WQE slots of `ring`, with position p's SGE address (at byte
    `address_at` of the WQE) set to addresses[p mod len(addresses)]: one array copy per column, not a WQE
    object per position (a vport's rings are formatted inside the servicing blackout)."""
    slots = np.frombuffer(ring, np.uint8, positions * len(wqe)).reshape(positions, len(wqe))
    slots[:] = np.frombuffer(wqe, np.uint8)
    slots[:, address_at:address_at + 8] = np.resize(addresses.astype("<u8"), positions).view(np.uint8).reshape(
        positions, 8)


def tx_wqe_len(short: bool) -> int:
    return wqe_length(CLIENT_OOB_8 if short else CLIENT_OOB_24, 1)


def buffer_counts(sq_size: int, tx_cq_size: int, rq_size: int, rx_cq_size: int, short: bool) -> tuple[int, int]:
    """(TX, RX) packet buffers of a vport: one per WQE position, capped so that at most one CQE per CQ slot
    is outstanding (or the device would lap the CQ), RX also at the reference's posting cap."""
    return (min(sq_size // tx_wqe_len(short), tx_cq_size // CQE_SIZE),
            min(rq_size // RX_WQE_LEN, rx_cq_size // CQE_SIZE, DRV_RX_MAX_POSTED))


@dataclass
class VportStats:
    tx_frames: int = 0
    tx_bytes: int = 0
    tx_errors: int = 0
    rx_frames: int = 0
    rx_bytes: int = 0
    rx_errors: int = 0


@dataclass
class VportQueues:
    """A vport's EQ and its TX and RX work queues with their CQs, in creation order."""

    eq: CqEq
    sq: Wq
    tx_cq: CqEq
    rq: Wq
    rx_cq: CqEq

    def ids(self) -> dict[str, int]:
        """Device ids of the queues (for inspect and logs)."""
        return {"eq": self.eq.id, "sq": self.sq.id, "tx_cq": self.tx_cq.id, "rq": self.rq.id, "rx_cq": self.rx_cq.id}

    @classmethod
    def restore(cls, state: mana_driver_pb2.VportSavedState, blocks: dict[str, DmaBuffer],
                doorbell: DoorbellPage) -> VportQueues:
        """The queues a previous driver saved, over their re-attached blocks (named as in `SAVED_BLOCKS`)."""
        return cls(CqEq.restore("eq", state.eq, blocks["eq"].view, doorbell),
                   Wq.restore("sq", state.sq, blocks["sq"].view, doorbell),
                   CqEq.restore("cq", state.tx_cq, blocks["tx_cq"].view, doorbell),
                   Wq.restore("rq", state.rq, blocks["rq"].view, doorbell),
                   CqEq.restore("cq", state.rx_cq, blocks["rx_cq"].view, doorbell))


class VportDataPath:
    """Send and receive on one vport. `format` writes every ring position (a new vport); a restored one
    (DESIGN D7) already holds them and takes its counters from the saved state."""

    def __init__(self, gdma: GdmaDriver, index: int, vector: int, queues: VportQueues, tx_buffers: DmaBuffer,
                 rx_buffers: DmaBuffer, *, buffer_size: int, short: bool, tx_vport_offset: int, format: bool):
        self.gdma = gdma
        self.index = index
        self.vector = vector
        self.queues = queues
        self._eq, self._sq, self._tx_cq, self._rq, self._rx_cq = (queues.eq, queues.sq, queues.tx_cq, queues.rq,
                                                                   queues.rx_cq)
        self.max_frame = buffer_size
        self.stats = VportStats()
        self.tx_failed = False
        self.tx_timeouts = 0  # sends outstanding without a completion for TX_TIMEOUT_S: doorbells rung again
        self._tx_timeouts_in_a_row = 0
        self.closed = False
        self._short = bool(short)
        self._tx_nbuf, self._rx_nbuf = buffer_counts(self._sq.size, self._tx_cq.size, self._rq.size,
                                                     self._rx_cq.size, short)
        self._format_tx(tx_buffers, tx_vport_offset, write=format)
        self._format_rx(rx_buffers, write=format)
        # Whether each queue is armed on the device as far as this driver knows (`prepare_wait`). Nothing is
        # known of a new or restored data path: the first wait arms all of them.
        self._eq_armed = self._rx_armed = self._tx_armed = False

    # -- buffer formatting -----------------------------------------------------------------------
    def _format_tx(self, buffers: DmaBuffer, tx_vport_offset: int, write: bool) -> None:
        """Write every SQ position once (`write`; a restored SQ already holds them): header, OOB, SGE address
        and key; only the length changes per frame."""
        short = self._short
        code = CLIENT_OOB_8 if short else CLIENT_OOB_24
        wqe_type = ManaTxWqeShortOneSge if short else ManaTxWqeLongOneSge
        self._tx_wqe_len = tx_wqe_len(short)
        assert self._tx_wqe_len == ctypes.sizeof(wqe_type)
        positions = self._sq.size // self._tx_wqe_len
        self._tx_view = buffers.view
        self._tx_rows = _rows(buffers.view, self._tx_nbuf, self.max_frame)
        if write:  # (a restored ring holds them: no ctypes objects built inside the restore's window)
            s_oob = ManaTxShortOob(pkt_fmt=MANA_SHORT_PKT_FMT if short else MANA_LONG_PKT_FMT,
                                   vcq_num=self._tx_cq.id, vsq_frame=(self._sq.id >> 10) & 0x3FFF)
            if short:
                s_oob.short_vp_offset = tx_vport_offset
                oob = s_oob
            else:
                oob = ManaTxOob(s_oob=s_oob, l_oob=ManaTxLongOob(long_vp_offset=tx_vport_offset))
            wqe = wqe_type(oob=oob, sge=Sge(mem_key=self.gdma.gpa_mkey),
                           header=WqeHeader(params=WqeParams(num_sgl_entries=1, inline_client_oob_size=code)))
            _format_ring(self._sq.mem, wqe.to_bytes(), positions, wqe_type.sge.offset + _SGE_ADDRESS_AT,
                         buffer_addresses(buffers, self.max_frame, self._tx_nbuf))
        self._tx_size_at = wqe_type.sge.offset + codec.SGE_SIZE_AT  # the one field a send rewrites
        assert self._tx_size_at % 4 == 0 and self._tx_wqe_len % 4 == 0
        self._sq_words = self._sq.mem.cast("I")
        self._tx_positions_mask = positions - 1
        self._tx_posted = 0
        self._tx_done = 0
        self._tx_progress_at = time.monotonic()  # the last TX completion, or posting with nothing outstanding

    def _format_rx(self, buffers: DmaBuffer, write: bool) -> None:
        """Write every RQ position once (`write`); position p receives into buffer p mod nbuf, in posting order."""
        self._rx_wqe_len = RX_WQE_LEN
        positions = self._rq.size // self._rx_wqe_len
        self._rx_view = buffers.view
        self._rx_rows = _rows(buffers.view, self._rx_nbuf, self.max_frame)
        if write:
            wqe = ManaRxWqeOneSge(sge=Sge(mem_key=self.gdma.gpa_mkey, size=self.max_frame),
                                  header=WqeHeader(params=WqeParams(num_sgl_entries=1,
                                                                    inline_client_oob_size=CLIENT_OOB_8)))
            _format_ring(self._rq.mem, wqe.to_bytes(), positions, ManaRxWqeOneSge.sge.offset + _SGE_ADDRESS_AT,
                         buffer_addresses(buffers, self.max_frame, self._rx_nbuf))
        self._rx_done = 0
        self._rx_cq_words, self._rx_cq_halves = self._rx_cq.mem.cast("I"), self._rx_cq.mem.cast("H")
        self._tx_cq_words = self._tx_cq.mem.cast("I")
        self._rx_unposted = 0  # buffers received and handed on, not yet posted again (`_post_rx`)

    def post_receive_buffers(self) -> None:
        """Post every receive buffer (a new vport, once RX is enabled: gdma spec 13.1 step 24)."""
        self._rq.advance_tail(self._rx_nbuf * self._rx_wqe_len)
        self._rq.commit(num_rwqe=self._rx_nbuf)

    # -- sending ---------------------------------------------------------------------------------
    @property
    def tx_outstanding(self) -> int:
        return self._tx_posted - self._tx_done

    @property
    def tx_free(self) -> int:
        return self._tx_nbuf - self.tx_outstanding

    def send(self, frames: Sequence[bytes | bytearray | memoryview],
             before_doorbell: Callable[[int], object] | None = None) -> int:
        """Queue as many frames as there are free TX buffers (one copy each, one doorbell for the batch).
        Returns how many were taken, from the front of `frames`; `before_doorbell(n)` runs once they are
        copied, before the doorbell (the caller may reuse their memory from then on)."""
        lengths = self._start_send(map(len, frames))
        n = len(lengths)
        if not n:
            return 0
        bs, view = self.max_frame, self._tx_view
        for done, p, b, count in self._tx_runs(n):
            run = lengths[done:done + count]
            for f, off, length in zip(frames[done:done + count], range(b * bs, (b + count) * bs, bs), run):
                view[off:off + length] = f
            self._tx_sizes(p, run)
        self._post_sends(n, sum(lengths), before_doorbell)
        return n

    def send_blocks(self, blocks: Sequence[tuple[np.ndarray, list[int]]],
                    before_doorbell: Callable[[int], object] | None = None) -> int:
        """`send` for frames given as blocks: the first `lengths[i]` bytes of row i of each block's rows (uint8,
        e.g. guest ring slots, `Ring.peek_blocks`). Each run of consecutive TX buffers is filled by one block copy
        of the run's longest frame (the bytes after a shorter frame are not part of it: its SGE size ends it)."""
        lengths = self._start_send(itertools.chain.from_iterable(run for _, run in blocks))
        n = len(lengths)
        if not n:
            return 0
        rows = blocks[0][0] if len(blocks) == 1 else np.concatenate([b for b, _ in blocks])
        for done, p, b, count in self._tx_runs(n):
            run = lengths[done:done + count]
            width = max(run)
            self._tx_rows[b:b + count, :width] = rows[done:done + count, :width]
            self._tx_sizes(p, run)
        self._post_sends(n, sum(lengths), before_doorbell)
        return n

    def _start_send(self, lengths: Iterable[int]) -> list[int]:
        """The start of `send` and `send_blocks`: the lengths of the frames the send takes (from the front, as many
        as there are free TX buffers), each checked to fit a buffer (BadFrame); if any, the received buffers are
        posted first (before the SQ doorbell: their replies (loopback) must find every buffer posted)."""
        self._check_open()
        self._reap_tx()
        taken = list(itertools.islice(lengths, max(self.tx_free, 0)))
        if taken:
            bs = self.max_frame
            if min(taken) <= 0 or max(taken) > bs:
                bad = next(x for x in taken if not 0 < x <= bs)
                raise BadFrame(f"frame of {bad} bytes does not fit a {bs}-byte buffer")
            self._post_rx()
        return taken

    def _tx_runs(self, n: int) -> list[tuple[int, int, int, int]]:
        """(frames before, SQ position, TX buffer, count) of the runs of consecutive SQ positions and buffers the
        next `n` sends take (two at most where either wraps)."""
        pos = self._sq.tail // self._tx_wqe_len
        positions, nbuf = self._tx_positions_mask + 1, self._tx_nbuf
        out, done = [], 0
        while done < n:
            p, b = (pos + done) % positions, (pos + done) % nbuf
            count = min(n - done, positions - p, nbuf - b)
            out.append((done, p, b, count))
            done += count
        return out

    def _tx_sizes(self, position: int, sizes: list[int]) -> None:
        """The SGE size of every WQE of a run from SQ `position`, as one strided column of the SQ."""
        wqe_len = self._tx_wqe_len
        at = (position * wqe_len + self._tx_size_at) // 4
        self._sq_words[at:at + len(sizes) * wqe_len // 4:wqe_len // 4] = array.array("I", sizes)

    def _post_sends(self, n: int, nbytes: int, before_doorbell: Callable[[int], object] | None) -> None:
        """Hand the `n` sends just written to the device: SQ tail, `before_doorbell(n)`, one doorbell."""
        sq = self._sq
        sq.advance_tail(n * self._tx_wqe_len)
        if self._tx_posted == self._tx_done:
            self._tx_progress_at = time.monotonic()
        self._tx_posted += n
        if before_doorbell is not None:
            before_doorbell(n)
        sq.commit()
        self.stats.tx_frames += n
        self.stats.tx_bytes += nbytes

    def _reap_tx(self) -> int:
        """Consume TX completions; each frees the oldest send WQE and its buffer (in-order completion)."""
        cq = self._tx_cq
        offsets = cq.poll_many(cq.size // CQE_SIZE)
        if not offsets:
            return 0
        for header in self._tx_completion_headers(offsets):
            cqe_type = header & _CQE_TYPE
            if cqe_type != CQE_TX_OKAY:
                self.stats.tx_errors += 1
                if cqe_type == CQE_TX_GDMA_ERR and not self.tx_failed:
                    self.tx_failed = True
                    kv(log, logging.ERROR, "tx queue disabled by the device", vport=self.index, sq=self._sq.id)
        done = len(offsets)
        self._tx_done += done
        self._tx_progress_at = time.monotonic()
        self._tx_timeouts_in_a_row = 0
        self._sq.advance_head(done * self._tx_wqe_len)
        return done

    def _tx_completion_headers(self, offsets: list[int]) -> list[int]:
        """The cqe_hdr words of the TX CQEs at `offsets` (`poll_many`), read as a strided column of the CQ, not a
        record per CQE; none for the usual batch, all with one CQE_TX_OKAY header."""
        headers = self._cqe_columns(self._tx_cq_words, offsets, _TX_HDR_AT)
        same = headers.count(headers[0]) == len(headers)
        return [] if same and headers[0] & _CQE_TYPE == CQE_TX_OKAY else headers

    @staticmethod
    def _cqe_columns(items: memoryview, offsets: list[int], at: int) -> list[int]:
        """The item (u32 or u16: `items` is the whole CQ cast to it) at byte `at` of each CQE at `offsets`
        (`poll_many`: consecutive, restarting at 0 at most once, where the ring wraps), read as one strided
        slice, or two: up to the ring end and from its start."""
        size, step = items.itemsize, CQE_SIZE // items.itemsize
        end = (offsets[-1] + CQE_SIZE) // size
        if offsets[-1] - offsets[0] == (len(offsets) - 1) * CQE_SIZE:
            return items[(offsets[0] + at) // size:end:step].tolist()
        return items[(offsets[0] + at) // size::step].tolist() + items[at // size:end:step].tolist()

    # -- receiving -------------------------------------------------------------------------------
    def receive_batch(self, consume: Callable[[list[memoryview]], object], max_frames: int = 256,
                      consume_rows: Callable[[np.ndarray, int], object] | None = None) -> int:
        """Hand up to `max_frames` received frames to `consume` as one list of views of the packet buffers
        (valid only during the call: the buffers are re-posted afterwards, with one doorbell); no waiting. With
        `consume_rows`, a batch of frames of one length in consecutive buffers goes to it instead, as
        (buffers as the rows of one array, the length): one block copy for the caller instead of one per frame."""
        self._check_open()
        return self._drain_rx(consume, max_frames, consume_rows)

    def receive_into(self, sink: Callable[[memoryview], object], max_frames: int = 64, timeout: float = 0.0) -> int:
        """Hand up to `max_frames` received frames to `sink` one by one as views of the packet buffers (valid
        only during the call); wait up to `timeout` seconds if none is ready."""
        self._check_open()

        def consume(views: list[memoryview]) -> None:
            for v in views:
                sink(v)
        n = self._drain_rx(consume, max_frames)
        self._post_rx()
        if n or timeout <= 0:
            return n
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return 0
            self.wait(remaining)
            n = self._drain_rx(consume, max_frames)
            self._post_rx()
            if n:
                return n

    def receive(self, max_frames: int = 64, timeout: float = 0.0) -> list[bytes]:
        """Up to `max_frames` received frames (copies); waits up to `timeout` seconds if none is ready."""
        frames: list[bytes] = []
        self.receive_into(lambda view: frames.append(bytes(view)), max_frames, timeout)
        return frames

    def _drain_rx(self, consume: Callable[[list[memoryview]], object], max_frames: int,
                  consume_rows: Callable[[np.ndarray, int], object] | None = None) -> int:
        cq = self._rx_cq
        offsets = cq.poll_many(max_frames)
        if not offsets:
            return 0
        view, bs, bmask, seq = self._rx_view, self.max_frame, self._rx_nbuf - 1, self._rx_done
        headers, lengths = self._rx_completions(offsets)
        if headers.count(headers[0]) == len(headers) and headers[0] & _CQE_TYPE == CQE_RX_OKAY \
                and max(lengths) <= bs:  # the common batch: every frame received whole
            first = seq & bmask
            if first + len(lengths) <= bmask + 1 and consume_rows is not None \
                    and lengths.count(lengths[0]) == len(lengths):  # one length, consecutive buffers: one block
                consume_rows(self._rx_rows[first:first + len(lengths)], lengths[0])
                self._rx_taken(len(offsets), len(lengths), lengths[0] * len(lengths))
                return len(lengths)
            if first + len(lengths) <= bmask + 1:  # no wrap: the buffers are consecutive
                views = [view[o:o + n] for o, n in zip(range(first * bs, (first + len(lengths)) * bs, bs), lengths)]
            else:
                views = [view[((seq + i) & bmask) * bs:((seq + i) & bmask) * bs + n] for i, n in enumerate(lengths)]
        else:
            views = [view[((seq + i) & bmask) * bs:((seq + i) & bmask) * bs + n]
                     for i, (header, n) in enumerate(zip(headers, lengths))
                     if header & _CQE_TYPE == CQE_RX_OKAY and n <= bs]
        if views:
            consume(views)
        self._rx_taken(len(offsets), len(views), sum(map(len, views)))
        return len(views)

    def _rx_taken(self, taken: int, frames: int, nbytes: int) -> None:
        """`taken` RX completions consumed, `frames` of them good frames of `nbytes` in all: their buffers are to
        be posted again (a quarter of them at once at most)."""
        self._rx_done += taken
        self._rq.advance_head(taken * self._rx_wqe_len)
        self._rx_unposted += taken
        if self._rx_unposted >= self._rx_nbuf // 4:
            self._post_rx()
        self.stats.rx_errors += taken - frames
        self.stats.rx_frames += frames
        self.stats.rx_bytes += nbytes

    def _rx_completions(self, offsets: list[int]) -> tuple[list[int], list[int]]:
        """(cqe_hdr, pkt_len) of the RX CQEs at `offsets` (`poll_many`), read as strided columns of the CQ, not a
        record per CQE."""
        return (self._cqe_columns(self._rx_cq_words, offsets, _RX_HDR_AT),
                self._cqe_columns(self._rx_cq_halves, offsets, _RX_LEN_AT))

    def _post_rx(self) -> None:
        """Post the received buffers again: the WQE at the new tail already points at each. Deferred from the
        receive to the next send, wait or save (or a quarter of the buffers), so the RQ doorbell reaches the device
        in the same burst of messages as the SQ doorbell or the arms (one device wake-up, not two)."""
        n = self._rx_unposted
        if n:
            self._rx_unposted = 0
            self._rq.advance_tail(n * self._rx_wqe_len)
            self._rq.commit(num_rwqe=n)

    def doorbells_batched(self):
        """Context in which the doorbells this data path rings reach the device together at its end, in order (the
        backing's `posted_batch`; at once where it has none): a pass of the relay — RQ doorbell, arms, SQ doorbell —
        is then one message burst and one device wake-up."""
        return self.gdma.posted_batch()

    # -- waiting ---------------------------------------------------------------------------------
    def fileno(self) -> int:
        """Eventfd that becomes readable when `prepare_wait()` armed the queues and work arrived."""
        return self.gdma.irq.fd(self.vector)

    def prepare_wait(self, need_tx: bool = True) -> bool:
        """Arm the CQs and the EQ for an interrupt (gdma spec 6.6); False if work is already waiting: do not
        sleep. Completion events are consumed first (the CQs are polled directly). A queue notifies once per
        arm and stays armed until it does (gdma spec 4.2), so only the queues that notified since their last
        arm are armed again: an EQ that delivered an EQE, a CQ named by a completion EQE. A wake-up by the
        guest ring then costs no doorbell at all. `need_tx=False`: the caller does not need to wake for TX
        completions (nothing waits for a TX buffer), so the TX CQ is not armed — they are reaped on the next
        send."""
        self._check_open()
        self.take_events()
        self._reap_tx()  # TX completions are the vport's own work: consume them, never report them as waiting
        if self._tx_posted != self._tx_done and time.monotonic() - self._tx_progress_at > TX_TIMEOUT_S:
            if self._tx_timeouts_in_a_row >= TX_HUNG_TIMEOUTS:
                raise TxHung(f"vport {self.index}: {self.tx_outstanding} sends without a completion after "
                             f"{self._tx_timeouts_in_a_row} TX timeouts")
            self._tx_timeout()
        if self._rx_cq.pending():
            return False
        arm_tx = need_tx and self._tx_posted != self._tx_done
        self._arm(arm_tx)
        return not (self._rx_cq.pending() or (arm_tx and self._tx_cq.pending()) or self._eq.pending())

    def arm_rx(self, tx: bool = False) -> None:
        """Make sure received frames interrupt (RX CQ and EQ armed), e.g. before a send whose frames may
        come back, without waiting: a caller that polls the guest ring for a while before `prepare_wait`
        (interrupt moderation) sends the arms with its next SQ doorbell. `tx`: TX completions interrupt too
        (the TX CQ armed), so a caller that waits for the answer to the send that follows needs no
        `prepare_wait`, and no second burst of doorbells, whichever completion the device sends first."""
        self._check_open()
        self.take_events()
        self._arm(tx)

    def rx_pending(self) -> bool:
        """Whether a received frame (or an RX error) waits in the RX CQ: one owner byte read, where a `receive_batch`
        that finds nothing costs a poll of the CQ and the batch's set-up."""
        self._check_open()
        return self._rx_cq.pending()

    def take_events(self) -> bool:
        """Consume a pending interrupt and the EQ's new events, noting which queues notified (they are disarmed
        now): `fileno()` is not readable again until the next interrupt. True if received frames wait."""
        self.gdma.irq.clear(self.vector)
        eq = self._eq
        events = eq.poll_many(eq.size // EQE_SIZE)
        if events:
            self._eq_armed = False  # the first EQE after an arm is the one that interrupted
            unpack, mem, rx_id, tx_id = codec.EQE_COMPLETION.unpack_from, eq.mem, self._rx_cq.id, self._tx_cq.id
            for off in events:
                data, params = unpack(mem, off)
                if params & _EQE_TYPE == GDMA_EQE_COMPLETION:
                    cq_id = data >> _CQ_ID_SHIFT & _CQ_ID_MASK
                    if cq_id == rx_id:
                        self._rx_armed = False
                    elif cq_id == tx_id:
                        self._tx_armed = False
        return self._rx_cq.pending()

    def _arm(self, arm_tx: bool) -> None:
        """Post received buffers, then arm what is not armed: CQs before the EQ (gdma spec 6.6)."""
        self._post_rx()
        if not self._rx_armed:
            self._rx_cq.arm()
            self._rx_armed = True
        if arm_tx and not self._tx_armed:
            self._tx_cq.arm()
            self._tx_armed = True
        if not self._eq_armed:
            self._eq.arm()
            self._eq_armed = True

    def _tx_timeout(self) -> None:
        """Sends outstanding and no completion for TX_TIMEOUT_S: ring the SQ and RQ doorbells again (a lost RQ
        doorbell starves the receive side the same way) and arm every queue again."""
        self.tx_timeouts += 1
        self._tx_timeouts_in_a_row += 1
        kv(log, logging.WARNING, "tx timeout: ringing the doorbells again", vport=self.index, sq=self._sq.id,
           tx_outstanding=self.tx_outstanding, timeouts=self.tx_timeouts)
        self._tx_progress_at = time.monotonic()
        self._post_rx()
        self._rq.commit()
        self._sq.commit()
        self.rearm()

    def rearm(self) -> None:
        """Forget what is armed: the next `prepare_wait` arms every queue again (after a wait that timed out,
        in case a notification was lost — e.g. a completion EQE the device could not write)."""
        self._eq_armed = self._rx_armed = self._tx_armed = False

    def wait(self, timeout: float) -> bool:
        """Sleep until RX or TX completions arrive or `timeout` passes; True if woken by work."""
        if not self.prepare_wait():
            return True
        return self.gdma.irq.wait(self.vector, timeout)

    def sync(self) -> None:
        """Return once the device has handled every doorbell rung so far: a register read is the barrier,
        as the device handles messages in order (frames in flight have completed, loopback ones are back).
        A read of all ones is a function that is gone: DeviceMissing."""
        if self.gdma.backing.read32(0) == ALL_ONES32:
            raise DeviceMissing("device not present: BAR0 reads all ones")

    def _check_open(self) -> None:
        if self.closed:
            raise VportError(f"vport {self.index} is closed")

    # -- data-path keepalive (DESIGN D7) -----------------------------------------------------------
    def save(self, state: mana_driver_pb2.VportSavedState) -> None:
        """Reap TX completions and record the queues, buffer layout and counters in the vport's `state`."""
        self._check_open()
        self._reap_tx()
        self._post_rx()  # the saved RQ tail is the one the device has
        self.record(state)

    def record(self, state: mana_driver_pb2.VportSavedState) -> None:
        """The queues, buffer layout and counters into `state`, changing nothing (`save` reaps and posts first)."""
        q = self.queues
        state.eq.CopyFrom(q.eq.save())
        state.tx_cq.CopyFrom(q.tx_cq.save())
        state.rx_cq.CopyFrom(q.rx_cq.save())
        state.sq.CopyFrom(q.sq.save())
        state.rq.CopyFrom(q.rq.save())
        state.buffer_size, state.tx_buffers, state.rx_buffers = self.max_frame, self._tx_nbuf, self._rx_nbuf
        state.short_form = self._short
        state.tx_posted, state.tx_done, state.rx_done = self._tx_posted, self._tx_done, self._rx_done

    @classmethod
    def restore(cls, gdma: GdmaDriver, state: mana_driver_pb2.VportSavedState,
                blocks: dict[str, DmaBuffer]) -> VportDataPath:
        """The data path a previous driver saved (state checked by `save_restore.validate_vport_state`), over
        its re-attached blocks: the rings are already formatted; counters continue."""
        queues = VportQueues.restore(state, blocks, gdma.doorbell_page(state.eq.doorbell.doorbell_id))
        dp = cls(gdma, state.vport_index, state.vector, queues, blocks["tx_buffers"], blocks["rx_buffers"],
                 buffer_size=state.buffer_size, short=state.short_form, tx_vport_offset=state.tx_vport_offset,
                 format=False)
        dp._tx_posted, dp._tx_done, dp._rx_done = state.tx_posted, state.tx_done, state.rx_done
        return dp
