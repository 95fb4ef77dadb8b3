"""A MANA vport and its data path (spec gdma.md §11, §12): TX WQEs → frames, frames → RX WQE buffers.

Per vport: at most one SQ and one RQ, each with its CQ (CREATE_WQ_OBJ), and a
`running` flag set by CONFIG_VPORT_RX (`rx_enable`). Work happens in batches:
an SQ doorbell processes every pending send WQE (the frames go to the backend
as one batch, then their completions in posting order, written as one batch
with at most one notification); an RQ doorbell fetches up to 256 receive WQEs
into the device (`EMU_MAX_RX_OUTSTANDING`); a batch of frames from the backend
fills the oldest ones in order and completes them as one batch. A batch
touches guest memory through `DmaWindow`s and `gdma.codec` records: one
mapping lookup per batch and region, no ctypes object per frame.

TX: the frame is the SGE buffers concatenated (one copy); a long-form OOB
with `inject_vlan_pri_tag` gets an 802.1Q tag inserted after the MAC
addresses; LSO WQEs are sent as one frame (no segmentation). Checksum
offload flags are not acted on. Completion types: CQE_TX_OKAY;
CQE_TX_GDMA_ERR for a malformed WQE, an LSO WQE breaking §12.1's rules or a
buffer outside the DMA-mapped ranges; CQE_TX_MTU_DROP for a frame above
`MAX_FRAME` bytes.

RX: bytes are written across the WQE's SGEs; CQE_RX_TRUNCATED when they do
not fit (`pkt_len` is still the full length). A receive WQE that is
malformed or whose buffer is outside the mapped ranges is completed with
`cqe_type` CQE_INVALID and `vendor_err` `VENDOR_ERR_MALFORMED_WQE` /
`VENDOR_ERR_DMA_FAULT` (the reference driver counts any non-OK type as an RX
error and recycles the buffer). A frame is dropped (never an exception) when:
the vport is not running (`in_errors_rx_vport_disabled`), its link is down
(`rx_dropped_link_down`), no receive WQE is posted (`in_discards_no_wqe`) or
the completion queue cannot be reached because no driver has memory mapped
(`rx_dropped_unmapped`; the WQE stays posted for later frames), or it is
empty (`rx_errors`: Linux's driver would not consume the WQE of a zero-length
completion). Each dropped frame is counted once, in exactly one of these.

FENCE_RQ (Linux only, gdma.md Appendix L.1): `fence_rq()` posts one
CQE_RX_OBJECT_FENCE on the RX CQ without taking a receive WQE.
"""
from __future__ import annotations

import collections
import ctypes
import itertools
import operator

import numpy as np

from vfkeep.gdma.constants import (
    CQE_INVALID,
    CQE_RX_OBJECT_FENCE,
    CQE_RX_OKAY,
    CQE_RX_TRUNCATED,
    CQE_TX_GDMA_ERR,
    CQE_TX_MTU_DROP,
    CQE_TX_OKAY,
    EMU_LSO_MAX_HEADER_SGE,
    EMU_MAX_RX_OUTSTANDING,
    GDMA_SQ,
    MANA_CQE_COMPLETION,
    MANA_LONG_PKT_FMT,
)
from vfkeep.gdma import codec
from vfkeep.gdma.datapath import ManaRxcompOob, ManaTxCompOob, ManaTxOob

from .dma import DmaFault, DmaWindow
from .queues import VENDOR_ERR_DMA_FAULT, VENDOR_ERR_MALFORMED_WQE, Cq, FetchedWqe, Wq

MAX_FRAME = 0xFFFF  # `pkt_len` is a u16
_TPID_8021Q = b"\x81\x00"
_TX_OOB_LONG = ctypes.sizeof(ManaTxOob)
_S_OOB, _L_OOB = codec.TX_SHORT_OOB, codec.TX_LONG_OOB
#: Fewest frames worth a block: a shorter one costs more than frame-by-frame batching, and ending the block path
#: there bounds its work however a driver spaces its buffers (blocks of two would make it quadratic).
_MIN_BLOCK = 8


def _tx_completion(cqe_type: int) -> bytes:
    oob = ManaTxCompOob()
    oob.cqe_hdr.cqe_type = cqe_type
    oob.cqe_hdr.client_type = MANA_CQE_COMPLETION
    return oob.to_bytes()


_TX_COMPLETIONS = {t: _tx_completion(t) for t in (CQE_TX_OKAY, CQE_TX_GDMA_ERR, CQE_TX_MTU_DROP)}


def rx_cqe_header(cqe_type: int, vendor_err: int = 0) -> int:
    """`ManaCqeHeader` word of an RX completion."""
    return codec.CQE_HDR.pack(cqe_type=cqe_type, client_type=MANA_CQE_COMPLETION, vendor_err=vendor_err)


_RX_OK, _RX_TRUNCATED = rx_cqe_header(CQE_RX_OKAY), rx_cqe_header(CQE_RX_TRUNCATED)
_RX_MALFORMED = rx_cqe_header(CQE_INVALID, VENDOR_ERR_MALFORMED_WQE)
_RX_DMA_FAULT = rx_cqe_header(CQE_INVALID, VENDOR_ERR_DMA_FAULT)


def _fence_completion() -> bytes:
    oob = ManaRxcompOob()
    oob.cqe_hdr.cqe_type = CQE_RX_OBJECT_FENCE
    oob.cqe_hdr.client_type = MANA_CQE_COMPLETION
    return oob.to_bytes()


_FENCE_COMPLETION = _fence_completion()


def vlan_tag(pcp: int, dei: int, vlan_id: int) -> bytes:
    return _TPID_8021Q + (pcp << 13 | dei << 12 | vlan_id).to_bytes(2, "big")


class Vport:
    """One vport: MAC, queues, steering settings and the data path."""

    def __init__(self, dev, index: int, mac: bytes):
        self.dev, self.index, self.mac = dev, index, mac
        self.link_up = True
        self.reset()

    def reset(self) -> None:
        """Power-on state (FLR); link state is the wire's, not the function's, and survives."""
        self.tx_config: dict | None = None
        self.sq: Wq | None = None
        self.tx_cq: Cq | None = None
        self.rq: Wq | None = None
        self.rx_cq: Cq | None = None
        self.running = False
        self.posted: collections.deque[FetchedWqe] = collections.deque()
        self.serial_no: int | None = None
        self.direction_to_vtl0 = 0
        self.rss_enable = False
        self.default_rxobj: int | None = None
        self.hashkey = bytes(40)
        self.indir_table: list[int] = []

    # -- queues ------------------------------------------------------------------------------
    def attach(self, wq_type: int, wq: Wq, cq: Cq) -> None:
        if wq_type == GDMA_SQ:
            self.sq, self.tx_cq = wq, cq
            wq.on_doorbell = self.sq_doorbell
        else:
            self.rq, self.rx_cq = wq, cq
            wq.on_doorbell = self.fetch_rx

    def queues(self, wq_type: int) -> tuple[Wq | None, Cq | None]:
        return (self.sq, self.tx_cq) if wq_type == GDMA_SQ else (self.rq, self.rx_cq)

    def detach(self, wq_type: int) -> None:
        if wq_type == GDMA_SQ:
            self.sq = self.tx_cq = None
        else:
            self.rq = self.rx_cq = None
            self.posted.clear()

    def start(self) -> None:
        self.running = True
        self.fetch_rx()
        self.sq_doorbell()

    def stop(self) -> None:
        self.running = False

    # -- TX ----------------------------------------------------------------------------------
    def sq_doorbell(self) -> None:
        """Every pending send WQE: the frames to the backend (one batch, read in place from the TX buffers), then
    their completions (one batch)."""
        if not self.running or self.sq is None:
            return
        dev, sq, cq = self.dev, self.sq, self.tx_cq
        params = cq.params(sq.id, True)
        ok = codec.CQE.pack(_TX_COMPLETIONS[CQE_TX_OKAY], params)
        try:
            while (run := sq.take_block(sq.mem.size, _TX_OOB_LONG)) is not None:
                win = DmaWindow(dev.dma)
                addresses, sizes = run
                while addresses:  # blocks of evenly spaced buffers of one size (a driver's buffers wrap once)
                    k = min(_even_prefix(addresses), _same_prefix(sizes))
                    rows = _block(win, addresses[:k], sizes[0]) if k >= _MIN_BLOCK else None
                    if rows is None:  # not one block of guest memory: the rest frame by frame
                        self._transmit(win, [(0, None, [(a, n)], 0, b"") for a, n in zip(addresses, sizes)], ok,
                                       params)
                        break
                    dev.transmit_block(self, rows)
                    self._complete_tx(ok * k, k)
                    addresses, sizes = addresses[k:], sizes[k:]
            wqes = sq.take_many(sq.mem.size, _TX_OOB_LONG)
        except DmaFault:
            dev.dma_fault("SQ", sq.id)
            return
        if wqes:
            self._transmit(DmaWindow(dev.dma), wqes, ok, params)

    def _transmit(self, win: DmaWindow, wqes: list[FetchedWqe], ok: bytes, params: int) -> None:
        """Send WQEs to the backend and complete them, WQE by WQE where a run of them cannot go at once."""
        dev = self.dev
        cqes = [ok] * len(wqes)
        frames = _gather_run(wqes, win)
        if frames is None:
            frames = self._tx_frames(wqes, win, cqes, params)
        if frames:
            dev.transmit_many(self, frames)
        self._complete_tx(b"".join(cqes), len(wqes))

    def _complete_tx(self, cqes: bytes, n: int) -> None:
        """After the backend has the frames: a completion hands the buffer back to the driver."""
        try:
            self.tx_cq.post_many(cqes)
        except DmaFault:
            self.dev.dma_fault("CQ", self.tx_cq.id, n)

    def _tx_frames(self, wqes: list[FetchedWqe], win: DmaWindow, cqes: list[bytes], params: int) -> list[bytes]:
        """The frames of a batch WQE by WQE; an error completion replaces the OK one in `cqes`."""
        frames = []
        for i, wqe in enumerate(wqes):
            sges = wqe[2]
            if len(sges) == 1 and not (wqe[3] or wqe[4]):  # the common WQE: one buffer, short OOB
                address, n = sges[0]
                if win.base <= address and address + n <= win.end and n <= MAX_FRAME:
                    frames.append(bytes(win.buf[address - win.base:address - win.base + n]))
                    continue
            result = self._tx_frame(wqe, win)
            if isinstance(result, int):
                self.dev.counters["tx_errors"] += 1
                cqes[i] = codec.CQE.pack(_TX_COMPLETIONS[result], params)
            else:
                frames.append(result)
        return frames

    def _tx_frame(self, wqe: FetchedWqe, win: DmaWindow) -> bytes | int:
        """The frame of one send WQE, or the error completion type."""
        dev = self.dev
        _, error, sges, oob_in_sgl, oob = wqe
        if error:
            return CQE_TX_GDMA_ERR
        if not sges:
            dev.counters["malformed_wqes"] += 1
            return CQE_TX_GDMA_ERR
        if oob_in_sgl and (len(sges) < 2 or sges[0][1] > EMU_LSO_MAX_HEADER_SGE):
            dev.counters["malformed_wqes"] += 1
            return CQE_TX_GDMA_ERR
        if sum(n for _, n in sges) > MAX_FRAME:
            dev.counters["out_errors_mtu_violation"] += 1
            return CQE_TX_MTU_DROP
        try:
            if len(sges) == 1:
                frame = bytes(win.view(*sges[0]))
            else:
                frame = b"".join([win.view(a, n) for a, n in sges])
        except DmaFault:
            dev.dma_fault("TX buffer", self.sq.id)
            return CQE_TX_GDMA_ERR
        if oob:  # long form: VLAN tag insertion
            s_word, l_word = codec.TX_OOB.unpack_from(oob)
            if _S_OOB.get(s_word, "pkt_fmt") == MANA_LONG_PKT_FMT and _L_OOB.get(l_word, "inject_vlan_pri_tag"):
                tag = vlan_tag(_L_OOB.get(l_word, "pcp"), _L_OOB.get(l_word, "dei"), _L_OOB.get(l_word, "vlan_id"))
                frame = frame[:12] + tag + frame[12:]
        return frame

    # -- RX ----------------------------------------------------------------------------------
    def fetch_rx(self) -> None:
        """Take posted receive WQEs into the device, up to `EMU_MAX_RX_OUTSTANDING`."""
        rq, dev = self.rq, self.dev
        if rq is None or not self.running:
            return
        try:
            self.posted.extend(rq.take_many(EMU_MAX_RX_OUTSTANDING - len(self.posted)))
        except DmaFault:
            dev.dma_fault("RQ", rq.id)

    def fence_rq(self) -> None:
        """FENCE_RQ (gdma.md Appendix L.1): one CQE_RX_OBJECT_FENCE on the RX CQ, with the usual
        notification, consuming no receive WQE. Frames are completed as they arrive, so every packet
        already taken from the RQ has its CQE before the fence. `DmaFault`: nothing was posted."""
        self.rx_cq.post(_FENCE_COMPLETION, self.rq.id, False)

    def receive_many(self, frames: list[bytes]) -> None:
        """Frames from the backend, in order, into the oldest posted receive WQEs; one batch of completions.
        Every frame that is not delivered is counted once (see the module docstring)."""
        dev = self.dev
        counters = dev.counters
        if not all(frames):  # Linux takes CQE_RX_OKAY with pkt_len 0 as an error and keeps the WQE (Appendix L.3)
            counters["rx_errors"] += sum(1 for f in frames if not f)
            frames = [f for f in frames if f]
        n = len(frames)
        if not self.running:
            counters["in_errors_rx_vport_disabled"] += n
            return
        if not self.link_up:
            counters["rx_dropped_link_down"] += n
            return
        posted, cq = self.posted, self.rx_cq
        if len(posted) < n:
            self.fetch_rx()
        if cq is None or not cq.reachable():  # completions cannot be written: every WQE stays posted
            counters["rx_dropped_unmapped" if posted else "in_discards_no_wqe"] += n
            return
        win = DmaWindow(dev.dma, write=True)
        params = cq.params(self.rq.id, False)
        pack = codec.RX_CQE.pack
        overstate = 4096 if "rx_len_overstated" in dev.hostile else 0  # hostile-device mode
        cqes = []
        delivered = []
        done = 0 if overstate else self._receive_run(frames, win, params, cqes, delivered)
        for frame in frames[done:] if done else frames:
            while True:  # the oldest usable receive WQE; malformed ones are completed with an error
                if not posted:
                    self.fetch_rx()
                    if not posted:
                        sges = None
                        break
                pos, error, sges, _, _ = posted.popleft()
                if not error:
                    break
                cqes.append(pack(_RX_MALFORMED, 0, pos, params))
                counters["rx_errors"] += 1
            if sges is None:
                counters["in_discards_no_wqe"] += 1
                continue
            length = len(frame)
            pkt_len = min(length + overstate, MAX_FRAME)
            if len(sges) == 1:  # the common WQE: one buffer it fits in, in the window's mapping
                address, size = sges[0]
                if size >= length and win.base <= address and address + length <= win.end:
                    o = address - win.base
                    win.buf[o:o + length] = frame
                    cqes.append(pack(_RX_OK, pkt_len, pos, params))
                    delivered.append(frame)
                    continue
            try:
                written = _scatter(win, sges, frame)
            except DmaFault:
                cqes.append(pack(_RX_DMA_FAULT, pkt_len, pos, params))
                dev.dma_fault("RX buffer", self.rq.id)
                counters["rx_errors"] += 1
                continue
            truncated = written < length
            cqes.append(pack(_RX_TRUNCATED if truncated else _RX_OK, pkt_len, pos, params))
            counters["rx_truncated"] += truncated
            delivered.append(frame)
        cq.post_many(b"".join(cqes))  # reachable: checked above, and nothing unmaps memory during a batch
        dev.count_frames("in", delivered)

    def receive_block(self, frames: np.ndarray) -> None:
        """`receive_many` for frames of one length, the rows of `frames`: while the oldest posted receive WQEs
        are well formed with one buffer each that the frame fits in, evenly spaced in one DMA mapping (how a
        driver posts its buffers; they wrap once, giving two blocks), the frames are written block by block,
        each as one copy completed by one array of CQEs; the rest frame by frame."""
        length = frames.shape[1]
        posted, cq, dev = self.posted, self.rx_cq, self.dev
        usable = self.running and self.link_up and length and "rx_len_overstated" not in dev.hostile
        while usable and len(frames) >= _MIN_BLOCK:
            if len(posted) < len(frames):
                self.fetch_rx()
            k = min(len(frames), len(posted))
            if k < _MIN_BLOCK or not cq.reachable():
                break
            run = self._oldest_posted(k)
            if run is None:
                break
            positions, addresses, sizes = run
            k = _even_prefix(addresses)
            rows = _block(DmaWindow(dev.dma, write=True), addresses[:k], length) \
                if k >= _MIN_BLOCK and min(sizes[:k]) >= length else None
            if rows is None:
                break
            rows[:] = frames[:k]
            for _ in range(k):
                posted.popleft()
            cqes = np.zeros(k, codec.RX_CQE_DTYPE)
            cqes["cqe_hdr"], cqes["pkt_len"], cqes["params"] = _RX_OK, length, cq.params(self.rq.id, False)
            cqes["rx_wqe_offset"] = positions[:k]
            cq.post_many(cqes.tobytes())
            dev.count_block("in", frames[:k])
            frames = frames[k:]
        if len(frames):
            self.receive_many([row.tobytes() for row in frames])

    def _receive_run(self, frames: list[bytes], win: DmaWindow, params: int, cqes: list[bytes],
                     delivered: list[bytes]) -> int:
        """The common case of `receive_many` without a step per frame in Python: the oldest posted WQEs are
        well formed with one buffer each that the frame fits in, all in one DMA mapping. Fills as many frames
        as such WQEs are posted (appending their completions and the frames); 0 if the first ones are not
        like that (the caller then goes frame by frame)."""
        posted = self.posted
        k = min(len(frames), len(posted))
        run = self._oldest_posted(k) if k >= 2 else None
        if run is None:
            return 0
        positions, addresses, sizes = run
        frames = frames[:k]
        lengths = list(map(len, frames))
        if not all(map(operator.ge, sizes, lengths)) or max(lengths) > MAX_FRAME:
            return 0
        low = min(addresses)
        try:
            buf = win.view(low, max(map(operator.add, addresses, lengths)) - low)
        except DmaFault:
            return 0
        for address, length, frame in zip(addresses, lengths, frames):
            o = address - low
            buf[o:o + length] = frame
        for _ in range(k):
            posted.popleft()
        cqes += map(codec.RX_CQE.pack, itertools.repeat(_RX_OK, k), lengths, positions, itertools.repeat(params, k))
        delivered += frames
        return k

    def _oldest_posted(self, k: int) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]] | None:
        """(ring positions, SGE addresses, SGE sizes) of the oldest `k` posted receive WQEs if all are well formed
        with one SGE (how a driver posts them: the batch paths need nothing else); None if any is not."""
        positions, errors, sges, _, _ = zip(*itertools.islice(self.posted, k))
        if errors.count(None) != k or set(map(len, sges)) != {1}:
            return None
        addresses, sizes = zip(*map(operator.itemgetter(0), sges))
        return positions, addresses, sizes

    def inspect(self) -> dict:
        def q(x):
            return x.inspect() if x is not None else None

        return {"index": self.index, "mac": self.mac.hex(":"), "link_up": self.link_up, "running": self.running,
                "tx_config": self.tx_config, "sq": q(self.sq), "tx_cq": q(self.tx_cq), "rq": q(self.rq),
                "rx_cq": q(self.rx_cq), "posted_rx": len(self.posted), "serial_no": self.serial_no,
                "direction_to_vtl0": self.direction_to_vtl0, "rss_enable": self.rss_enable,
                "default_rxobj": self.default_rxobj, "indir_entries": len(self.indir_table)}


__all__ = ["Vport", "rx_cqe_header", "vlan_tag", "MAX_FRAME", "VENDOR_ERR_MALFORMED_WQE", "VENDOR_ERR_DMA_FAULT"]


def _even_prefix(addresses: list[int] | tuple[int, ...]) -> int:
    """How many of the first `addresses` are evenly spaced (all of them, the usual case, in one comparison)."""
    n = len(addresses)
    if n < 3:
        return n
    low, stride = addresses[0], addresses[1] - addresses[0]
    if stride <= 0:  # (several WQEs on one buffer, or buffers in descending order: no block)
        return 1
    expected = range(low, low + n * stride, stride)
    if list(addresses) == list(expected):
        return n
    return next(i for i, (a, e) in enumerate(zip(addresses, expected)) if a != e)


def _same_prefix(values: list[int]) -> int:
    """How many of the first `values` equal the first one."""
    n = len(values)
    return n if values.count(values[0]) == n else next(i for i, v in enumerate(values) if v != values[0])


def _block(win: DmaWindow, addresses: list[int] | tuple[int, ...], length: int) -> np.ndarray | None:
    """The `length` bytes at each of `addresses` — evenly spaced (an `_even_prefix`) — as the rows of one uint8
    array (a view of guest memory: no copy), if they are at least `length` apart and inside one DMA mapping and
    a frame of `length` bytes is one the data path carries whole (12 to `MAX_FRAME` bytes); else None."""
    n, low = len(addresses), addresses[0]
    stride = addresses[1] - low if n > 1 else length
    if not 12 <= length <= MAX_FRAME or stride < length:
        return None
    try:
        buf = win.view(low, (n - 1) * stride + length)
    except DmaFault:
        return None
    return np.ndarray((n, length), np.uint8, buf, 0, (stride, 1))  # (as_strided's work without its Python steps)


def _gather_run(wqes: list[FetchedWqe], win: DmaWindow) -> list[memoryview] | None:
    """The frames of a batch of send WQEs that are all the common kind — well formed, one buffer, no OOB to
    act on, at most `MAX_FRAME` bytes, all in one DMA mapping — as views of their buffers (no copy: valid until
    the WQEs are completed), without a step per WQE in Python beyond the slice; None if any is not (the caller
    then goes WQE by WQE)."""
    _, errors, sges, in_sgl, oobs = zip(*wqes)
    n = len(wqes)
    if errors.count(None) != n or in_sgl.count(0) != n or oobs.count(b"") != n or set(map(len, sges)) != {1}:
        return None
    addresses, sizes = zip(*map(operator.itemgetter(0), sges))
    if max(sizes) > MAX_FRAME:
        return None
    low = min(addresses)
    try:
        buf = win.view(low, max(map(operator.add, addresses, sizes)) - low)
    except DmaFault:
        return None
    return [buf[a - low:a - low + size] for a, size in zip(addresses, sizes)]


def _scatter(win: DmaWindow, sges: list[tuple[int, int]], frame: bytes) -> int:
    """Write `frame` across the SGE buffers in order; returns the bytes that fit (DmaFault: unreachable)."""
    if len(sges) == 1:
        address, size = sges[0]
        n = min(size, len(frame))
        win.view(address, n)[:] = frame[:n] if n < len(frame) else frame
        return n
    mv, pos, total = memoryview(frame), 0, len(frame)
    for address, size in sges:
        if pos >= total:
            break
        n = min(size, total - pos)
        win.view(address, n)[:] = mv[pos:pos + n]
        pos += n
    return pos
