"""Guest channel rings (DESIGN §7): per NIC, two SPSC rings in guest RAM plus an eventfd each way.

The host formats the rings and owns their eventfds; the guest and the worker attach to them.
Everything a consumer needs to resume lives in guest memory, so when the worker is replaced at
servicing the new one continues exactly where the old one stopped: frames the guest pushed
while no worker ran are delivered afterwards, in order, none twice.

Ring format (all fields little-endian; the ring base is 64-byte aligned, inside guest RAM)::

    offset size  field          written by
    0x00   u32   magic 'VFRG'   host (create), last, so a half-formatted ring never validates
    0x04   u32   version (1)    host
    0x08   u32   slot_count     host; a power of two
    0x0c   u32   slot_size      host; a multiple of 64
    0x10   u32   data_offset    host; offset of slot 0 from the ring base (0x100)
    0x40   u64   tail           producer: frames ever published (free-running, wraps at 2**64)
    0x48   u64   dropped_full   producer: frames refused because the ring was full
    0x50   u64   bytes_pushed   producer
    0x80   u64   head           consumer: frames ever consumed (free-running)
    0x88   u64   bytes_popped   consumer
    0x100  slots slot i at data_offset + i * slot_size: u32 frame length, then the frame bytes

Producer and consumer fields sit on separate 64-byte cache lines so the two sides never
write the same line. Used slots = (tail - head) mod 2**64; slot of counter c = c & (slot_count - 1).

Memory ordering across processes. Each counter is read and written with one aligned 8-byte
access (a memoryview cast to native 'Q' is a single memcpy of 8 bytes, i.e. one load/store
instruction), so the other side never sees a torn counter. The producer writes the slot
payload, then publishes `tail`; the consumer reads `tail`, then the payloads, then publishes
`head`. On x86-64 (TSO) stores become visible in program order and loads are not reordered
with older loads or with younger stores, so that program order is enough. Weakly ordered CPUs
(arm64) may reorder both, so there `_fence()` is a real `atomic_thread_fence(seq_cst)` from
libatomic, placed between payload and counter on both sides.
"""
from __future__ import annotations

import array
import ctypes
import ctypes.util
import logging
import math
import os
import platform
import select
import struct
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterable

from ..log import kv
from ..memory.guest_memory import PAGE_SIZE, GuestMemory, MemoryLayout

log = logging.getLogger(__name__)

RING_MAGIC = 0x47524656  # b"VFRG" little-endian
RING_VERSION = 1
HEADER_SIZE = 0x100
RING_ALIGN = 64
SLOT_LEN_SIZE = 4
MIN_SLOT_SIZE = 64
MAX_SLOT_SIZE = 1 << 20
MAX_SLOTS = 1 << 20
_U64 = (1 << 64) - 1

_GEOMETRY = struct.Struct("<IIIII")  # magic, version, slot_count, slot_size, data_offset
# u64 indexes into the header (offset / 8).
_TAIL, _DROPPED_FULL, _BYTES_PUSHED = 0x40 // 8, 0x48 // 8, 0x50 // 8
_HEAD, _BYTES_POPPED = 0x80 // 8, 0x88 // 8
_U32 = struct.Struct("<I")  # slot length word, magic

if sys.byteorder != "little":  # native 'Q' accesses must match the little-endian format
    raise ImportError("vfkeep guest rings need a little-endian CPU")


def _load_fence():
    if platform.machine().lower() in ("x86_64", "amd64", "i386", "i686"):
        return lambda: None  # TSO: program order is visibility order (see module docstring)
    name = ctypes.util.find_library("atomic") or "libatomic.so.1"
    try:
        fence = ctypes.CDLL(name).atomic_thread_fence
    except (OSError, AttributeError) as e:
        raise ImportError(f"weakly ordered CPU {platform.machine()} needs libatomic's "
                          f"atomic_thread_fence for ring memory ordering: {e}") from e
    fence.argtypes, fence.restype = [ctypes.c_int], None
    return lambda: fence(5)  # memory_order_seq_cst


_fence = _load_fence()


class RingError(Exception):
    """Base of guest-ring errors."""


class BadRingHeader(RingError):
    """Attaching found no valid ring (wrong magic/version/geometry or location)."""


class RingCorrupt(RingError):
    """The counters or a slot length in guest memory are impossible (the other side is buggy or hostile)."""


def ring_size(slots: int, slot_size: int) -> int:
    """Bytes a ring of this geometry occupies in guest memory (header + slots)."""
    return HEADER_SIZE + slots * slot_size


def _check_geometry(slots: int, slot_size: int, exc: type[Exception]) -> None:
    if not (1 <= slots <= MAX_SLOTS) or slots & (slots - 1):
        raise exc(f"slot count {slots} must be a power of two in [1, {MAX_SLOTS}]")
    if not (MIN_SLOT_SIZE <= slot_size <= MAX_SLOT_SIZE) or slot_size % 64:
        raise exc(f"slot size {slot_size} must be a multiple of 64 in [{MIN_SLOT_SIZE}, {MAX_SLOT_SIZE}]")


def _check_location(mem: GuestMemory, gpa: int, size: int, exc: type[Exception]) -> None:
    """Rings live in guest RAM: worker RAM is poisoned at servicing and the pool is for DMA."""
    guest = mem.layout.guest
    if gpa % RING_ALIGN:
        raise exc(f"ring gpa {gpa:#x} is not {RING_ALIGN}-byte aligned")
    if gpa < guest.gpa or gpa + size > guest.gpa + guest.size:
        raise exc(f"ring [{gpa:#x}, {gpa + size:#x}) is outside guest RAM [{guest.gpa:#x}, {guest.gpa + guest.size:#x})")


class Doorbell:
    """One direction's wake-up: an eventfd (non-blocking) shared by producer and consumer.

    The eventfd counter persists until read, so a ring() that happens between the consumer's
    last empty check and its wait() is not lost: wait() returns at once.
    """

    def __init__(self, fd: int):
        os.set_blocking(fd, False)
        self.fd = fd

    @classmethod
    def create(cls) -> "Doorbell":
        """New eventfd (the host does this; children receive it through pass_fds)."""
        return cls(os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC))

    def fileno(self) -> int:
        return self.fd

    def ring(self) -> None:
        os.eventfd_write(self.fd, 1)

    def clear(self) -> int:
        """Consume pending rings without blocking (after a selector reported the fd readable)."""
        try:
            return os.eventfd_read(self.fd)
        except BlockingIOError:
            return 0

    def wait(self, timeout: float | None) -> bool:
        """Block until rung or `timeout` seconds pass (None: forever); True if a ring was consumed."""
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        ms = -1 if timeout is None else max(0, math.ceil(timeout * 1000))
        if not poller.poll(ms):
            return False
        return self.clear() > 0

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@dataclass(frozen=True)
class RingStats:
    slots: int
    slot_size: int
    head: int
    tail: int
    used: int
    free: int
    dropped_full: int
    bytes_pushed: int
    bytes_popped: int

    def to_dict(self) -> dict:
        return asdict(self)


class Ring:
    """Accessor for one SPSC ring in guest memory; guest memory is the only state.

    Nothing is cached in the object, so any process (or a fresh object after a worker
    restart) resumes from the counters. One producer and one consumer at a time.
    """

    def __init__(self, mem: GuestMemory, gpa: int, slots: int, slot_size: int, doorbell: Doorbell | None):
        self.mem = mem
        self.gpa = gpa
        self.slots = slots
        self.slot_size = slot_size
        self.max_frame = slot_size - SLOT_LEN_SIZE
        self.doorbell = doorbell
        self._mask = slots - 1
        self._buf = mem.view(gpa, ring_size(slots, slot_size))
        self._ctr = self._buf[:HEADER_SIZE].cast("Q")
        # Every slot's length word, as one strided array: a batch reads or writes all of them at once.
        self._slot_words = self._buf[HEADER_SIZE:].cast("I")
        self._stride = slot_size // SLOT_LEN_SIZE
        self._slot_rows = None  # `_rows()`

    @classmethod
    def create(cls, mem: GuestMemory, gpa: int, slots: int, slot_size: int,
               doorbell: Doorbell | None = None) -> "Ring":
        """Host: format an empty ring at `gpa` (zeroes header and slots, writes magic last)."""
        _check_geometry(slots, slot_size, ValueError)
        size = ring_size(slots, slot_size)
        _check_location(mem, gpa, size, ValueError)
        view = mem.view(gpa, size)
        view[:] = bytes(size)
        _GEOMETRY.pack_into(view, 0, 0, RING_VERSION, slots, slot_size, HEADER_SIZE)
        _fence()
        _U32.pack_into(view, 0, RING_MAGIC)
        view.release()
        kv(log, logging.INFO, "ring formatted", gpa=hex(gpa), slots=slots, slot_size=slot_size)
        return cls(mem, gpa, slots, slot_size, doorbell)

    @classmethod
    def attach(cls, mem: GuestMemory, gpa: int, doorbell: Doorbell | None = None) -> "Ring":
        """Attach to a ring the host formatted; validates the header and the counters."""
        _check_location(mem, gpa, HEADER_SIZE, BadRingHeader)
        magic, version, slots, slot_size, data_offset = _GEOMETRY.unpack(mem.read(gpa, _GEOMETRY.size))
        if magic != RING_MAGIC:
            raise BadRingHeader(f"no ring at gpa {gpa:#x}: magic {magic:#010x}, expected {RING_MAGIC:#010x}")
        if version != RING_VERSION:
            raise BadRingHeader(f"ring at gpa {gpa:#x} has version {version}, this build reads {RING_VERSION}")
        if data_offset != HEADER_SIZE:
            raise BadRingHeader(f"ring at gpa {gpa:#x} has data offset {data_offset:#x}, expected {HEADER_SIZE:#x}")
        _check_geometry(slots, slot_size, BadRingHeader)
        _check_location(mem, gpa, ring_size(slots, slot_size), BadRingHeader)
        ring = cls(mem, gpa, slots, slot_size, doorbell)
        try:
            used = len(ring)
        except RingCorrupt:
            ring.close()
            raise
        kv(log, logging.DEBUG, "ring attached", gpa=hex(gpa), slots=slots, slot_size=slot_size,
           head=ring._ctr[_HEAD], tail=ring._ctr[_TAIL], used=used)
        return ring

    # -- occupancy ---------------------------------------------------------------------------
    def _used(self, head: int, tail: int) -> int:
        used = (tail - head) & _U64
        if used > self.slots:
            raise RingCorrupt(f"ring at gpa {self.gpa:#x}: head {head} tail {tail} means {used} frames "
                              f"in {self.slots} slots")
        return used

    def __len__(self) -> int:
        return self._used(self._ctr[_HEAD], self._ctr[_TAIL])

    @property
    def head(self) -> int:
        """The consumer's position (frames taken so far), as `stats().head` without the rest of the stats."""
        return self._ctr[_HEAD]

    @property
    def tail(self) -> int:
        """The producer's position (frames published so far)."""
        return self._ctr[_TAIL]

    @property
    def free_slots(self) -> int:
        return self.slots - len(self)

    def stats(self) -> RingStats:
        c = self._ctr
        used = len(self)
        return RingStats(self.slots, self.slot_size, c[_HEAD], c[_TAIL], used, self.slots - used,
                         c[_DROPPED_FULL], c[_BYTES_PUSHED], c[_BYTES_POPPED])

    # -- producer ----------------------------------------------------------------------------
    def push(self, frame: bytes | bytearray | memoryview) -> bool:
        """Publish one frame; False (and dropped_full += 1) if the ring is full."""
        return self.push_many((frame,)) == 1

    def push_many(self, frames: Iterable[bytes | bytearray | memoryview]) -> int:
        """Publish frames in order until the ring is full; each refused frame counts in dropped_full.

        All sizes are checked first, so an oversized frame raises ValueError with nothing published.
        The doorbell (if any) is rung after every call that published something: ringing only on
        empty->non-empty would race with a consumer that is just emptying the ring.
        """
        frames = list(frames)
        lengths = list(map(len, frames))
        if lengths and max(lengths) > self.max_frame:
            raise ValueError(f"frame of {max(lengths)} bytes exceeds the ring's slot payload of {self.max_frame} bytes")
        c, buf, size = self._ctr, self._buf, self.slot_size
        tail = c[_TAIL]
        accepted = min(self.slots - self._used(c[_HEAD], tail), len(frames))
        done = 0
        for first, count in self._runs(tail, accepted):
            stride = self._stride
            self._slot_words[first * stride:(first + count) * stride:stride] = array.array(
                "I", lengths[done:done + count])
            off = HEADER_SIZE + first * size + SLOT_LEN_SIZE
            for f, n in zip(frames[done:done + count], lengths[done:done + count]):
                buf[off:off + n] = f
                off += size
            done += count
        self._publish(tail, accepted, sum(lengths[:accepted]), len(frames) - accepted)
        return accepted

    def _rows(self):
        """The slots as the rows of one numpy array, for batches copied as one block (`push_block`, `peek_blocks`).
        Made on first use: only the agent and the relay move blocks (numpy is theirs; the host formats rings)."""
        if self._slot_rows is None:
            import numpy as np
            self._slot_rows = np.frombuffer(self._buf, np.uint8, self.slots * self.slot_size,
                                            HEADER_SIZE).reshape(self.slots, self.slot_size)
        return self._slot_rows

    def push_block(self, frames) -> int:
        """`push_many` for frames of one length, the rows of `frames` (numpy, n x length uint8): each run of slots is
        written as one block copy, not a copy per frame."""
        n, length = frames.shape
        if length > self.max_frame:
            raise ValueError(f"frame of {length} bytes exceeds the ring's slot payload of {self.max_frame} bytes")
        c = self._ctr
        tail = c[_TAIL]
        accepted = min(self.slots - self._used(c[_HEAD], tail), n)
        done = 0
        for first, count in self._runs(tail, accepted):
            stride = self._stride
            self._slot_words[first * stride:(first + count) * stride:stride] = array.array("I", [length]) * count
            self._rows()[first:first + count, SLOT_LEN_SIZE:SLOT_LEN_SIZE + length] = frames[done:done + count]
            done += count
        self._publish(tail, accepted, accepted * length, n - accepted)
        return accepted

    def _publish(self, tail: int, accepted: int, nbytes: int, refused: int) -> None:
        """After the payloads of `accepted` frames (`nbytes` in all) are in their slots from counter `tail`: move
        the tail past them (fenced: a consumer never sees a tail before its payloads), count them and the
        `refused` ones, and ring the doorbell if anything was published."""
        c = self._ctr
        if accepted:
            _fence()
            c[_TAIL] = (tail + accepted) & _U64
            c[_BYTES_PUSHED] = (c[_BYTES_PUSHED] + nbytes) & _U64
        if refused:
            c[_DROPPED_FULL] = (c[_DROPPED_FULL] + refused) & _U64
        if accepted and self.doorbell is not None:
            self.doorbell.ring()

    def _runs(self, counter: int, n: int) -> list[tuple[int, int]]:
        """(first slot, count) of the slots of counters [counter, counter + n): one run, two at the wrap."""
        first = counter & self._mask
        run = min(n, self.slots - first)
        return [(first, run), (0, n - run)] if n > run else [(first, n)] if n else []

    # -- consumer ----------------------------------------------------------------------------
    def pop(self) -> bytes | None:
        """Oldest frame, or None if the ring is empty."""
        frames = self.pop_many(1)
        return frames[0] if frames else None

    def pop_many(self, max_frames: int) -> list[bytes]:
        """Up to `max_frames` oldest frames (copied out), then one `head` update for the batch."""
        out: list[bytes] = []
        self.pop_into(lambda views: out.extend(map(bytes, views)), max_frames)
        return out

    def pop_into(self, consume: Callable[[list[memoryview]], object], max_frames: int) -> int:
        """Hand up to `max_frames` oldest frames to `consume` as one list of views of their slots (valid only
        during the call: no copy), then release them (one `head` update); returns how many. If `consume` raises,
        the frames stay in the ring."""
        views = self.peek(max_frames)
        if views:
            consume(views)
            self.release(views)
        return len(views)

    def peek(self, max_frames: int) -> list[memoryview]:
        """Views of up to `max_frames` oldest frames in their slots; nothing is consumed. They stay valid until
        `release`: the producer does not reuse a slot before the head passes it."""
        buf, size = self._buf, self.slot_size
        views: list[memoryview] = []
        for first, count, lengths in self._checked_runs(max_frames):
            off = HEADER_SIZE + first * size + SLOT_LEN_SIZE
            views += [buf[o:o + length] for o, length in zip(range(off, off + count * size, size), lengths)]
        return views

    def peek_blocks(self, max_frames: int) -> list[tuple[object, list[int]]]:
        """`peek` as blocks: per run of consecutive slots (two at most, where the ring wraps), the payloads as the
        rows of one array (count x slot payload uint8, a view of the slots) and the frame lengths. Release with
        `release_count`."""
        return [(self._rows()[first:first + count, SLOT_LEN_SIZE:], lengths)
                for first, count, lengths in self._checked_runs(max_frames)]

    def _checked_runs(self, max_frames: int) -> list[tuple[int, int, list[int]]]:
        """Up to `max_frames` oldest frames as runs of consecutive slots (first, count, frame lengths), every
        length checked against the slot payload (a guest may write anything there)."""
        c = self._ctr
        head = c[_HEAD]
        n = min(max_frames, self._used(head, c[_TAIL]))
        if n <= 0:
            return []
        _fence()  # tail before payloads
        runs = []
        for first, count in self._runs(head, n):
            stride = self._stride
            lengths = self._slot_words[first * stride:(first + count) * stride:stride].tolist()
            if max(lengths) > self.max_frame:
                slot = first + next(i for i, length in enumerate(lengths) if length > self.max_frame)
                raise RingCorrupt(f"ring at gpa {self.gpa:#x}: slot {slot} holds length {max(lengths)}, slot "
                                  f"payload is {self.max_frame} bytes")
            runs.append((first, count, lengths))
        return runs

    def release_count(self, n: int, nbytes: int) -> None:
        """`release` of the `n` oldest frames, `nbytes` long together."""
        c = self._ctr
        _fence()  # payloads read before the producer may reuse the slots
        c[_HEAD] = (c[_HEAD] + n) & _U64
        c[_BYTES_POPPED] = (c[_BYTES_POPPED] + nbytes) & _U64

    def release(self, frames: list[memoryview]) -> None:
        """Consume the oldest frames, which a `peek` returned (`frames`, or its first ones): one `head` update;
        their slots are the producer's again, so their views must not be read afterwards."""
        self.release_count(len(frames), sum(map(len, frames)))

    def wait(self, timeout: float | None) -> bool:
        """Consumer: block until the ring holds a frame; False on timeout.

        Checks the ring before sleeping and after every wake-up, so neither a ring() racing
        with the check nor a stale ring() for frames already popped can mislead the caller.
        """
        if len(self):
            return True
        if self.doorbell is None:
            raise RingError(f"ring at gpa {self.gpa:#x} has no doorbell to wait on")
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self.doorbell.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if len(self):
                return True
            if deadline is not None and time.monotonic() >= deadline:
                return False

    def close(self) -> None:
        """Release the views into guest memory (the doorbell belongs to the caller)."""
        self._slot_rows = None  # an export of _buf: released before it
        self._slot_words.release()
        self._ctr.release()
        self._buf.release()


@dataclass(frozen=True)
class ChannelLayout:
    """Where every NIC's ring pair sits in guest RAM, computable by host, worker and guest alike.

    NIC i occupies `nic_pages` pages from `base_gpa + i * nic_pages * PAGE_SIZE`: its tx ring
    (guest -> worker) first, then its rx ring (worker -> guest), each page-aligned.
    """

    nics: int = 1
    slots: int = 256
    slot_size: int = 2048
    base_gpa: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.nics, int) or self.nics < 1:
            raise ValueError(f"nics must be a positive integer, got {self.nics!r}")
        _check_geometry(self.slots, self.slot_size, ValueError)
        if self.base_gpa < 0 or self.base_gpa % PAGE_SIZE:
            raise ValueError(f"channel base gpa {self.base_gpa:#x} must be page-aligned")

    @property
    def ring_bytes(self) -> int:
        return ring_size(self.slots, self.slot_size)

    @property
    def ring_pages(self) -> int:
        return -(-self.ring_bytes // PAGE_SIZE)

    @property
    def nic_pages(self) -> int:
        return 2 * self.ring_pages

    @property
    def total_pages(self) -> int:
        return self.nics * self.nic_pages

    @property
    def end_gpa(self) -> int:
        """First guest-RAM byte after all rings (guest buffers may start here)."""
        return self.base_gpa + self.total_pages * PAGE_SIZE

    def _nic_gpa(self, nic: int) -> int:
        if not 0 <= nic < self.nics:
            raise ValueError(f"nic index {nic} out of range [0, {self.nics})")
        return self.base_gpa + nic * self.nic_pages * PAGE_SIZE

    def tx_gpa(self, nic: int) -> int:
        return self._nic_gpa(nic)

    def rx_gpa(self, nic: int) -> int:
        return self._nic_gpa(nic) + self.ring_pages * PAGE_SIZE

    def check_fits(self, layout: MemoryLayout) -> None:
        guest = layout.guest
        if self.base_gpa < guest.gpa or self.end_gpa > guest.gpa + guest.size:
            raise ValueError(f"{self.nics} NIC channel(s) need guest RAM up to {self.end_gpa:#x} "
                             f"({self.total_pages} pages from {self.base_gpa:#x}); guest RAM has {guest.pages} pages")

    def to_str(self) -> str:
        """Compact form for command lines and env: `nics=1,slots=256,slot_size=2048,base=0`."""
        return f"nics={self.nics},slots={self.slots},slot_size={self.slot_size},base={self.base_gpa}"

    @classmethod
    def from_str(cls, text: str) -> "ChannelLayout":
        try:
            f = dict(part.split("=", 1) for part in text.split(","))
            return cls(int(f["nics"]), int(f["slots"]), int(f["slot_size"]), int(f["base"], 0))
        except (KeyError, ValueError) as e:
            raise ValueError(f"bad channel layout {text!r}: expected nics=N,slots=N,slot_size=N,base=GPA ({e})") from e


@dataclass
class NicChannel:
    """One NIC's guest channel: tx ring (guest -> worker) and rx ring (worker -> guest), each with its doorbell."""

    nic: int
    tx: Ring
    rx: Ring

    @classmethod
    def create(cls, mem: GuestMemory, layout: ChannelLayout, nic: int) -> "NicChannel":
        """Host: format both rings and create their eventfds."""
        layout.check_fits(mem.layout)
        return cls(nic, Ring.create(mem, layout.tx_gpa(nic), layout.slots, layout.slot_size, Doorbell.create()),
                   Ring.create(mem, layout.rx_gpa(nic), layout.slots, layout.slot_size, Doorbell.create()))

    @classmethod
    def attach(cls, mem: GuestMemory, layout: ChannelLayout, nic: int, tx_bell_fd: int, rx_bell_fd: int) -> "NicChannel":
        """Guest or worker: attach to the host's rings with the inherited eventfds (close() closes them);
        the geometry in memory must match the layout."""
        tx = Ring.attach(mem, layout.tx_gpa(nic), Doorbell(tx_bell_fd))
        rx = Ring.attach(mem, layout.rx_gpa(nic), Doorbell(rx_bell_fd))
        for ring in (tx, rx):
            if (ring.slots, ring.slot_size) != (layout.slots, layout.slot_size):
                tx.close()
                rx.close()
                raise BadRingHeader(f"ring at gpa {ring.gpa:#x} has {ring.slots}x{ring.slot_size} slots, "
                                    f"layout says {layout.slots}x{layout.slot_size}")
        return cls(nic, tx, rx)

    def block_views(self) -> None:
        """Make both rings' block views now (`Ring._rows`, 0.02 ms the first time in a process), e.g. before a
        restore, not in a relay's first passes."""
        self.tx._rows()
        self.rx._rows()

    def bell_fds(self) -> tuple[int, int]:
        """(tx, rx) eventfds, for pass_fds."""
        return self.tx.doorbell.fd, self.rx.doorbell.fd

    def close(self) -> None:
        for ring in (self.tx, self.rx):
            ring.close()
            ring.doorbell.close()
