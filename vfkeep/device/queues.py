"""Queues in guest memory (spec gdma.md §4.2, §4.3, §6): EQ, CQ, WQ, ring memory and id pools.

The device is the producer of CQEs/EQEs and the consumer of WQEs:

- EQ/CQ: producer counter `tail` in entries starts at the capacity; an entry
  is written at `tail mod cap` with owner count `(tail / cap) mod 8`, all but
  its last byte first, then the last byte (which holds the owner bits), so a
  reader never sees owner bits before the entry is complete. Queues start
  armed; posting to an armed queue notifies (CQ: completion EQE to its parent
  EQ; EQ: its MSI-X vector) and disarms it; a doorbell re-arms (§4.2).
- WQ: `head` (bytes consumed) and the last accepted doorbell `tail`, both
  u32 free-running; doorbells are accepted only under the §4.3 rule.

Deviation from the reference emulator (documented choice): a malformed WQE
(length > 512 or > the pending bytes, or SGL-direct) is consumed and handed to
the owner as an error (the caller completes it with an error status and counts
it) instead of stalling the queue, so one bad entry never wedges the device.

Every guest-memory access goes through the DMA space (`dev.dma`) and may raise
`DmaFault`; callers decide what a fault means for their queue.
"""
from __future__ import annotations

import ctypes
import functools
import heapq
from dataclasses import dataclass
from typing import Callable

from vfkeep.gdma import codec
from vfkeep.gdma.base import bit_position
from vfkeep.gdma.constants import GDMA_EQE_COMPLETION, OWNER_MASK, PAGE_SIZE, WQE_ALIGNMENT, WQE_MAX_SIZE
from vfkeep.gdma.queues import (
    Cqe,
    CqeParams,
    Eqe,
    EqeCompletionData,
    EqeParams,
    Sge,
    WqeHeader,
    WqeParams,
    owner_count,
    sgl_offset_from_code,
    unconsumed_entries,
    wqe_length_from_params,
)

from .dma import DmaFault

from .dma import DmaWindow

U32 = 0xFFFFFFFF
#: `vendor_err` of the completion of a WQE the device consumed without using it (RX data path and HWC RQ).
VENDOR_ERR_MALFORMED_WQE = 1
VENDOR_ERR_DMA_FAULT = 2
CQE_SIZE = ctypes.sizeof(Cqe)
EQE_SIZE = ctypes.sizeof(Eqe)
# CQEs and EQEs both end in a params dword whose top 3 bits are the owner count (§6.3-6.5).
assert Cqe.params.offset == CQE_SIZE - 4 and Eqe.params.offset == EQE_SIZE - 4
_OWNER_SHIFT = bit_position(CqeParams, "owner_count")[0]
assert _OWNER_SHIFT == bit_position(EqeParams, "owner_count")[0]
_WQE_HEADER_SIZE = ctypes.sizeof(WqeHeader)
_PARAMS_OFFSET = WqeHeader.params.offset
#: `bytes.translate` tables that put owner count o into an entry's last byte (whose owner bits are 0).
_WITH_OWNER = [bytes(b | o << codec.OWNER_SHIFT_IN_LAST_BYTE for b in range(256)) for o in range(OWNER_MASK + 1)]


class QueueError(Exception):
    """A queue or region request that breaks the §6.1 memory rules."""


class IdPool:
    """Queue ids of one kind: slot + 24, lowest free first (§6.1). Freed ids are reusable."""

    def __init__(self, slots: int, first: int):
        self.slots, self.first = slots, first
        self.reset()

    def reset(self) -> None:
        self._free = list(range(self.slots))
        self._used: set[int] = set()

    def alloc(self) -> int | None:
        if not self._free:
            return None
        slot = heapq.heappop(self._free)
        self._used.add(slot)
        return slot + self.first

    def release(self, qid: int) -> None:
        slot = qid - self.first
        if slot in self._used:
            self._used.remove(slot)
            heapq.heappush(self._free, slot)


class QueueMemory:
    """Ring bytes of one queue: a page-address list plus an offset into the first page.

    Ring offsets wrap at `size`; a contiguous page list takes one DMA view per
    access, a scattered one is split at page boundaries.
    """

    def __init__(self, pages: list[int], offset: int, size: int):
        if size <= 0 or (offset + size + PAGE_SIZE - 1) // PAGE_SIZE > len(pages):
            raise QueueError(f"queue of {size} bytes at offset {offset} does not fit in {len(pages)} pages")
        self.size = size
        self.pages = pages
        self.offset = offset
        contiguous = all(pages[i + 1] == pages[i] + PAGE_SIZE for i in range(len(pages) - 1))
        self.base = pages[0] + offset if contiguous else None

    def spans(self, off: int, n: int) -> list[tuple[int, int]]:
        """(iova, length) pieces covering ring bytes [off, off + n), wrapping at the ring end."""
        out = []
        off %= self.size
        while n > 0:
            chunk = min(n, self.size - off)
            if self.base is not None:
                out.append((self.base + off, chunk))
            else:
                pos, left = self.offset + off, chunk
                while left:
                    within = pos % PAGE_SIZE
                    c = min(left, PAGE_SIZE - within)
                    out.append((self.pages[pos // PAGE_SIZE] + within, c))
                    pos += c
                    left -= c
            n -= chunk
            off = 0
        return out

    def read(self, dma, off: int, n: int) -> bytes:
        if self.base is not None and off % self.size + n <= self.size:  # fast path: no wrap
            return dma.read(self.base + off % self.size, n)
        spans = self.spans(off, n)
        if len(spans) == 1:
            return dma.read(*spans[0])
        return b"".join(dma.read(a, c) for a, c in spans)

    def write(self, dma, off: int, data: bytes) -> None:
        if self.base is not None and off % self.size + len(data) <= self.size:
            dma.write(self.base + off % self.size, data)
            return
        mv = memoryview(data)
        pos = 0
        for a, c in self.spans(off, len(data)):
            dma.write(a, mv[pos:pos + c])
            pos += c

    def windows(self, dma, off: int, n: int) -> list[memoryview]:
        """Writable views covering ring bytes [off, off + n), each looked up once; DmaFault before anything
        is written if any part is unreachable."""
        win = DmaWindow(dma, write=True)
        return [win.view(a, c) for a, c in self.spans(off, n)]

    def write_entry(self, dma, off: int, entry: bytes) -> None:
        """Write a CQE/EQE: everything but the last byte, then the last byte (owner bits) (§6.5)."""
        self.write(dma, off, entry[:-1])
        self.write(dma, off + len(entry) - 1, entry[-1:])

    def inspect(self) -> dict:
        return {"size": self.size, "first_page": self.pages[0], "offset": self.offset, "pages": len(self.pages)}


def check_queue_memory(kind: str, offset: int, size: int) -> None:
    """§6.1 memory rules for a queue in a DMA region starting `offset` bytes into its first page."""
    if size <= 0 or size & (size - 1):
        raise QueueError(f"{kind} size {size} is not a power of two")
    align, minimum = {"WQ": (PAGE_SIZE, PAGE_SIZE), "CQ": (CQE_SIZE, 4096), "EQ": (EQE_SIZE, 4096)}[kind]
    if offset % align or size % align:
        raise QueueError(f"{kind} offset {offset} / size {size} not multiples of {align}")
    if size < minimum:
        raise QueueError(f"{kind} size {size} below the minimum {minimum}")


class _EntryRing:
    """Producer side of a CQ or EQ (§4.2, §6.5): entries written with owner counts, arm/disarm, notify.

    Subclasses set `entry_size` and implement `notify()` (CQ: completion EQE; EQ: MSI-X vector).
    """

    entry_size: int

    def __init__(self, dev, qid: int, mem: QueueMemory):
        self.dev, self.id, self.mem = dev, qid, mem
        self.cap = mem.size // self.entry_size
        self.tail = self.cap
        self.armed = True

    def _post(self, data: bytes, params: int) -> None:
        """Write one entry (`data` then the params dword with the owner bits); may raise `DmaFault`, then
        nothing changed. Notifies and disarms if the queue was armed."""
        params |= owner_count(self.tail, self.cap) << _OWNER_SHIFT
        entry = data.ljust(self.entry_size - 4, b"\0") + params.to_bytes(4, "little")
        self.mem.write_entry(self.dev.dma, (self.tail % self.cap) * self.entry_size, entry)
        self.tail += 1
        if self.armed:
            self.armed = False
            self.notify()

    def post_many(self, entries: bytes | bytearray) -> None:
        """Write a batch of entries (their params dwords without owner bits) with one notification at the end
        if the queue was armed (`stage_many`, published at once). May raise `DmaFault` before anything is
        written, then nothing changed."""
        self.stage_many(entries)()

    def stage_many(self, entries: bytes | bytearray) -> Callable[[], None]:
        """`post_many` in two halves: this one writes everything a reader cannot see yet and returns the other,
        which publishes the batch. Per lap, all bytes but each entry's last go first (that byte keeps the
        previous lap's owner count, so a reader sees nothing new); the returned call writes the last bytes in
        order (§6.5), advances the tail and notifies if the queue is armed then. Nothing else may post to this
        queue in between, and both halves run in one step of the device's loop (the views are not kept across
        a DMA unmap). May raise `DmaFault` before anything is written, then nothing changed."""
        size, cap = self.entry_size, self.cap
        n = len(entries) // size
        laps = []  # (views, entry bytes, owner count) per lap
        done = 0
        while done < n:
            counter = self.tail + done
            slot = counter % cap
            count = min(n - done, cap - slot)
            chunk = bytes(entries[done * size:(done + count) * size])
            laps.append((self.mem.windows(self.dev.dma, slot * size, count * size), chunk, owner_count(counter, cap)))
            done += count
        owner_bytes = []  # (view, its entries' last bytes with the new owner count)
        for views, chunk, owner in laps:
            body = bytearray(chunk)
            last = chunk[size - 1::size]
            body[size - 1::size] = last.translate(_WITH_OWNER[(owner - 1) & OWNER_MASK])
            final = last.translate(_WITH_OWNER[owner])
            pos = 0
            for v in views:
                k = len(v)
                v[:] = body[pos:pos + k]
                owner_bytes.append((v, final[pos // size:(pos + k) // size]))
                pos += k

        def publish() -> None:
            for v, final in owner_bytes:
                v[size - 1::size] = final
            self.tail += n
            if n and self.armed:
                self.armed = False
                self.notify()
        return publish

    def reachable(self) -> bool:
        """True if the whole ring can be written now (a batch checks this before it consumes anything)."""
        try:
            self.mem.windows(self.dev.dma, 0, self.mem.size)
        except DmaFault:
            return False
        return True

    def notify(self) -> None:
        raise NotImplementedError

    def doorbell(self, tail: int, arm: bool) -> None:
        """§4.2: disarm, arm, or notify at once if the driver left entries unconsumed (n > cap: ignored)."""
        if not arm:
            self.armed = False
            return
        n = unconsumed_entries(self.tail, tail, self.cap)
        if n == 0:
            self.armed = True
        elif n <= self.cap:
            self.armed = False
            self.notify()

    def inspect(self) -> dict:
        return {"id": self.id, "armed": self.armed, "tail": self.tail, "cap": self.cap, **self.mem.inspect()}


class Eq(_EntryRing):
    """Event queue: EQEs of 16 bytes; notification = the MSI-X vector `msix`."""

    kind = "EQ"
    entry_size = EQE_SIZE

    def __init__(self, dev, qid: int, mem: QueueMemory, msix: int):
        super().__init__(dev, qid, mem)
        self.msix = msix
        self.alive = True

    def post(self, event_type: int, payload: bytes = b"") -> None:
        """Write one EQE (may raise `DmaFault`, then nothing changed) and interrupt if armed."""
        self._post(payload, event_type)
        self.dev.counters["eqes_posted"] += 1

    def notify(self) -> None:
        self.dev.interrupt(self.msix)

    def inspect(self) -> dict:
        return {**super().inspect(), "msix": self.msix}


class Cq(_EntryRing):
    """Completion queue: CQEs of 64 bytes; notification = a completion EQE on `parent`."""

    kind = "CQ"
    entry_size = CQE_SIZE

    def __init__(self, dev, qid: int, mem: QueueMemory, parent: Eq):
        super().__init__(dev, qid, mem)
        self.parent = parent
        self._params: dict[tuple[int, int], int] = {}
        self._completion = EqeCompletionData(cq_id=qid).to_bytes()  # the payload of its every completion EQE

    def params(self, wq_number: int, is_send_wq: bool) -> int:
        """`CqeParams` (without owner bits) of a completion for that WQ."""
        key = (wq_number, int(is_send_wq))
        params = self._params.get(key)
        if params is None:
            params = self._params[key] = codec.CQE_PARAMS.pack(wq_number=wq_number, is_send_wq=int(is_send_wq))
        return params

    def post(self, data: bytes, wq_number: int, is_send_wq: bool) -> None:
        """Write one CQE with `data` (≤ 60 bytes); may raise `DmaFault` (then nothing changed)."""
        self._post(data, self.params(wq_number, is_send_wq))
        self.dev.counters["cqes_posted"] += 1

    def stage_many(self, entries: bytes | bytearray) -> Callable[[], None]:
        """Whole CQEs (`codec.CQE`/`codec.RX_CQE` packed, params from `params()`, or `entry()`); see
        `_EntryRing` (`post_many` is this published at once)."""
        publish = super().stage_many(entries)
        self.dev.counters["cqes_posted"] += len(entries) // CQE_SIZE
        return publish

    def entry(self, data: bytes, wq_number: int, is_send_wq: bool) -> bytes:
        """One CQE for `stage_many`/`post_many`: `data` (≤ 60 bytes) and the params of a completion for that WQ."""
        return data.ljust(CQE_SIZE - 4, b"\0") + self.params(wq_number, is_send_wq).to_bytes(4, "little")

    def notify(self) -> None:
        """Completion EQE (payload = CQ id) to the parent EQ; a lost notification is counted, not raised."""
        if not self.parent.alive:
            self.dev.counters["lost_notifications"] += 1
            return
        try:
            self.parent.post(GDMA_EQE_COMPLETION, self._completion)
        except DmaFault:
            self.dev.dma_fault("EQ", self.parent.id)

    def inspect(self) -> dict:
        return {**super().inspect(), "parent_eq": self.parent.id}


@dataclass
class WqeRef:
    """One fetched WQE: its ring position (device head before it), raw bytes, SGEs, or why it is malformed."""

    position: int
    raw: bytes
    sges: list[Sge]
    params: WqeParams | None = None
    sgl_offset: int = 0
    error: str | None = None

    def oob(self) -> bytes:
        """Inline OOB bytes (WQE offset 8 up to the SGL)."""
        return self.raw[_WQE_HEADER_SIZE:self.sgl_offset]


@functools.lru_cache(maxsize=1024)
def _wqe_shape(params_value: int) -> tuple[WqeParams, int, int, str | None]:
    """(params, WQE length, SGL offset, why it cannot be used) of a `WqeParams` value; drivers reuse a few."""
    params = WqeParams.from_int(params_value)
    length = wqe_length_from_params(params)
    error = None
    if params.sgl_direct:
        error = "SGL-direct WQEs are not supported"
    elif length > WQE_MAX_SIZE:
        error = f"WQE of {length} bytes exceeds {WQE_MAX_SIZE}"
    return params, length, sgl_offset_from_code(params.inline_client_oob_size), error


#: A WQE fetched by `Wq.take_many`: (ring position, error or None, [(address, size)] per SGE,
#: client_oob_in_sgl, inline OOB bytes — only when it is at least `oob_min` bytes, else b"").
FetchedWqe = tuple[int, "str | None", list[tuple[int, int]], int, bytes]


class Wq:
    """Send or receive work queue (§4.3, §6.2.2); `kind` is "SQ" or "RQ"."""

    def __init__(self, dev, qid: int, kind: str, mem: QueueMemory):
        self.dev, self.id, self.kind, self.mem = dev, qid, kind, mem
        self.head = 0
        self.tail = 0
        self.on_doorbell: Callable[[], None] = lambda: None  # set by the owner (HWC or vport)

    @property
    def pending(self) -> int:
        return (self.tail - self.head) & U32

    def doorbell(self, tail: int) -> bool:
        """Accept `tail` only if head is 32-aligned and it adds bytes without exceeding the ring (§4.3)."""
        new = (tail - self.head) & U32
        if self.head % WQE_ALIGNMENT or new <= self.pending or new > self.mem.size:
            return False
        self.tail = tail & U32
        return True

    def take(self) -> WqeRef:
        """Fetch and consume the WQE at head (call only with `pending`); `DmaFault` leaves it in place."""
        pos = self.head
        pending = self.pending
        # one read covers the largest WQE (or everything pending): cheaper than header-then-body
        chunk = self.mem.read(self.dev.dma, pos, min(pending, WQE_MAX_SIZE))
        params, length, sgl_offset, error = _wqe_shape(int.from_bytes(chunk[_PARAMS_OFFSET:_WQE_HEADER_SIZE],
                                                                      "little"))
        if error is None and length > pending:
            error = f"WQE of {length} bytes exceeds the {pending} pending bytes"
        if error:
            consume = length if length <= min(pending, WQE_MAX_SIZE) else pending
            self.head = (pos + consume) & U32
            self.dev.counters["malformed_wqes"] += 1
            return WqeRef(pos, b"", [], error=error)
        raw = chunk[:length]
        n = params.num_sgl_entries
        if n == 1:
            sges = [Sge.from_buffer_copy(raw, sgl_offset)]
        else:
            sges = list((Sge * n).from_buffer_copy(raw, sgl_offset)) if n else []
        self.head = (pos + length) & U32
        return WqeRef(pos, raw, sges, params, sgl_offset)

    def take_many(self, limit: int, oob_min: int = WQE_MAX_SIZE) -> list[FetchedWqe]:
        """Fetch and consume up to `limit` pending WQEs for the data path: the ring is looked up once and each
        WQE unpacked in place by one precompiled record of its shape; a WQE that wraps around the ring end,
        a scattered ring or a malformed WQE goes through `take()`. DmaFault only before anything was consumed."""
        out: list[FetchedWqe] = []
        mem, size = self.mem, self.mem.size
        ring = DmaWindow(self.dev.dma).view(mem.base, size) if mem.base is not None and limit else None
        unpack_params, append = _WQE_PARAMS.unpack_from, out.append
        while len(out) < limit and self.tail != self.head:
            if ring is not None and self._take_run(ring, out, limit - len(out), oob_min):
                continue
            pos = self.head
            off = pos % size
            if ring is not None and off + _WQE_HEADER_SIZE <= size:
                length, sges_of, oob_in_sgl, oob_end, error = _shape(unpack_params(ring, off)[0])
                if error is None and length <= (self.tail - pos) & U32 and off + length <= size:
                    self.head = (pos + length) & U32
                    append((pos, None, sges_of(ring, off), oob_in_sgl,
                            bytes(ring[off + _WQE_HEADER_SIZE:off + oob_end]) if oob_end - 8 >= oob_min else b""))
                    continue
            try:
                ref = self.take()
            except DmaFault:
                if out:
                    break
                raise
            if ref.error:
                append((ref.position, ref.error, [], 0, b""))
            else:
                oob = ref.oob()
                append((ref.position, None, [(sg.address, sg.size) for sg in ref.sges],
                        ref.params.client_oob_in_sgl, oob if len(oob) >= oob_min else b""))
        return out

    def _take_run(self, ring: memoryview, out: list[FetchedWqe], limit: int, oob_min: int) -> int:
        """Fetch a run of WQEs of one shape at head (`_run_at`), appending what `take()` would return for each;
        0 if the WQE at head does not start such a run."""
        run = self._run_at(ring, limit, oob_min)
        if run is None:
            return 0
        pos, length, oob_in_sgl, addresses, sizes = run
        out += [((pos + d) & U32, None, [(a, n)], oob_in_sgl, b"")
                for d, a, n in zip(range(0, len(sizes) * length, length), addresses, sizes)]
        return len(sizes)

    def take_block(self, limit: int, oob_min: int = WQE_MAX_SIZE) -> tuple[list[int], list[int]] | None:
        """Fetch and consume a run of WQEs of one shape at head (`_run_at`) — well formed, one SGE, not LSO
        (`client_oob_in_sgl` with one SGE breaks §12.1's rules: each is an error, left to `take_many`), no inline
        OOB of `oob_min` bytes or more, none crossing the ring end — without a record per WQE: (their SGE
        addresses, their SGE sizes), one WQE's when the next one differs; None, nothing consumed, if the WQE
        at head starts no such run. DmaFault if the ring is unreachable."""
        if self.mem.base is None or not limit or self.tail == self.head:
            return None
        ring = DmaWindow(self.dev.dma).view(self.mem.base, self.mem.size)
        run = self._run_at(ring, limit, oob_min, lso=False)
        return None if run is None else (run[3], run[4])

    def _run_at(self, ring: memoryview, limit: int, oob_min: int,
                lso: bool = True) -> tuple[int, int, int, list, list] | None:
        """Consume a run of WQEs of one shape at head — one SGE, an inline OOB shorter than `oob_min`, the same
        params word, none crossing the ring end, `client_oob_in_sgl` only if `lso` — read with a few strided
        slices of the ring instead of a record per WQE (a driver posts every WQE of a queue in one shape):
        (position of the first, WQE length, client_oob_in_sgl, SGE addresses, SGE sizes). The run is one WQE
        long when the params word of the next one differs; None, nothing consumed, if the WQE at head is not
        of that shape or fewer than two of its length are pending before the ring end."""
        pos, size = self.head, len(ring)
        off = pos % size
        if off + _WQE_HEADER_SIZE > size:
            return None
        word = _WQE_PARAMS.unpack_from(ring, off)[0]
        run = _run_shape(word)
        if run is None:
            return None
        length, sge_at, oob_in_sgl, oob_end = run
        count = min(limit, ((self.tail - pos) & U32) // length, (size - off) // length)
        if count < 2 or oob_end - _WQE_HEADER_SIZE >= oob_min or (oob_in_sgl and not lso):
            return None
        words, quads = ring.cast("I"), ring.cast("Q")
        end = off + count * length
        params = words[(off + _PARAMS_OFFSET) // 4:end // 4:length // 4].tolist()
        if params.count(word) != count:
            count = next(i for i, w in enumerate(params) if w != word)
            end = off + count * length
        addresses = quads[(off + sge_at + _SGE_ADDRESS[0]) // 8:end // 8:length // 8].tolist()
        sizes = words[(off + sge_at + _SGE_SIZE[0]) // 4:end // 4:length // 4].tolist()
        self.head = (pos + count * length) & U32
        return pos, length, oob_in_sgl, addresses, sizes

    def inspect(self) -> dict:
        return {"id": self.id, "head": self.head, "tail": self.tail, **self.mem.inspect()}


_WQE_PARAMS = codec.record(None, codec.field_span(WqeHeader, "params"))
_SGE_ADDRESS, _SGE_SIZE = (codec.field_span(Sge, f) for f in ("address", "size"))


@functools.lru_cache(maxsize=1024)
def _shape(params_value: int):
    """(length, sges_of(ring, off) -> [(address, size)], client_oob_in_sgl, OOB end, error) of a `WqeParams`
    value: `sges_of` unpacks every SGE of a WQE of that shape with one precompiled record."""
    params, length, sgl_offset, error = _wqe_shape(params_value)
    n = params.num_sgl_entries
    spans = [(sgl_offset + 16 * i + off, width) for i in range(n) for off, width in (_SGE_ADDRESS, _SGE_SIZE)]
    unpack = codec.record(None, *spans).unpack_from if n and error is None else None
    if n == 1 and unpack is not None:
        def sges_of(ring, off):
            return [unpack(ring, off)]
    else:
        def sges_of(ring, off):
            f = unpack(ring, off) if unpack is not None else ()
            return list(zip(f[::2], f[1::2]))
    return length, sges_of, params.client_oob_in_sgl, sgl_offset, error


__all__ = ["IdPool", "QueueMemory", "QueueError", "check_queue_memory", "Eq", "Cq", "Wq", "WqeRef", "FetchedWqe",
           "CQE_SIZE", "EQE_SIZE", "U32", "VENDOR_ERR_MALFORMED_WQE", "VENDOR_ERR_DMA_FAULT"]


assert _SGE_ADDRESS == (0, 8) and _SGE_SIZE[1] == 4 and _PARAMS_OFFSET % 4 == 0


@functools.lru_cache(maxsize=1024)
def _run_shape(params_value: int) -> tuple[int, int, int, int] | None:
    """(length, SGE offset, client_oob_in_sgl, OOB end) of a usable one-SGE `WqeParams` value whose SGE
    fields are aligned for strided reads (`Wq._take_run`); None for any other."""
    params, length, sgl_offset, error = _wqe_shape(params_value)
    if error or params.num_sgl_entries != 1 or length % 8 or sgl_offset % 8:
        return None
    return length, sgl_offset, params.client_oob_in_sgl, sgl_offset
