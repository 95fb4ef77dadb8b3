"""Traffic frames and statistics for the guest traffic agent (pure functions over records).

Frame format (an Ethernet II frame, multi-byte payload fields in network byte order)::

    offset size  field
    0      6     destination MAC
    6      6     source MAC
    12     2     ethertype 0x88B5 (IEEE 802 local experimental)
    14     4     magic 'VFKT'
    18     4     CRC-32 of the frame from the ethertype on, this field taken out (catches poison / torn
                 copies; the MACs are left out because the loopback backend swaps them)
    22     8     sequence number
    30     8     send time, CLOCK_MONOTONIC ns (system-wide, comparable across processes)
    38     ...   zero padding up to the requested size (>= 60, the Ethernet minimum without FCS)

Timestamps are integers in nanoseconds throughout; `to_dict()` converts to milliseconds.
"""
from __future__ import annotations

import bisect
import functools
import math
import struct
import zlib
from dataclasses import dataclass, field
from typing import Iterable

ETHERTYPE = 0x88B5
FRAME_MAGIC = b"VFKT"
MIN_FRAME = 60
_ETH = struct.Struct("!6s6sH")
_BODY = struct.Struct("!4sIQQ")  # magic, crc32, seq, send_ns
HEADER_LEN = _ETH.size + _BODY.size
_CRC_OFF = _ETH.size + 4
_SEQ_TIME = struct.Struct("!QQ")
_TAIL = struct.Struct("!H4sIQQ")  # ethertype, then the body
_CRC_HEAD = zlib.crc32(ETHERTYPE.to_bytes(2, "big") + FRAME_MAGIC)


class BadFrame(ValueError):
    """A frame with our ethertype whose contents are damaged."""


@dataclass(frozen=True)
class TrafficFrame:
    seq: int
    send_ns: int
    src_mac: bytes
    dst_mac: bytes
    size: int


def _crc(frame: bytes | memoryview) -> int:
    return zlib.crc32(frame[_CRC_OFF + 4:], zlib.crc32(frame[12:_CRC_OFF]))


#: Padding from which `_zero_run_crc`'s four lookups cost less than zlib's pass over the zero bytes.
_ZERO_RUN_MIN = 256


@functools.lru_cache(maxsize=16)
def _zero_run_crc(n: int) -> tuple[int, list[int], list[int], list[int], list[int]]:
    """`zlib.crc32(bytes(n), c)` as a function of the running CRC `c`, which it is affine in (CRC-32 is linear
    over GF(2) and zero bytes add no input): f(c) = f0 ^ t0[c & 255] ^ t1[c >> 8 & 255] ^ t2[c >> 16 & 255]
    ^ t3[c >> 24]. Returns (f0, t0, t1, t2, t3); a frame's zero padding then costs four lookups, not a pass
    over its bytes."""
    zeros = bytes(n)
    f0 = zlib.crc32(zeros, 0)
    tables = []
    for k in range(4):
        table = [0] * 256
        for bit in range(8):  # table[b] is the XOR of the images of b's bits
            image, step = zlib.crc32(zeros, 1 << (8 * k + bit)) ^ f0, 1 << bit
            for b in range(step, 2 * step):
                table[b] = table[b - step] ^ image
        tables.append(table)
    return (f0, *tables)


def make_frame(seq: int, size: int, now_ns: int, src_mac: bytes, dst_mac: bytes) -> bytes:
    """A traffic frame of exactly `size` bytes carrying `seq` and the send time `now_ns`."""
    return make_frames(seq, 1, size, now_ns, src_mac, dst_mac)[0]


def make_frames(first_seq: int, n: int, size: int, now_ns: int, src_mac: bytes, dst_mac: bytes) -> list[bytes]:
    """`n` traffic frames with consecutive seqs from `first_seq`, all sent at `now_ns` (a burst goes out at
    one instant); each is what `make_frame` builds. The constant parts and their CRC are computed once."""
    if size < MIN_FRAME:
        raise ValueError(f"frame size {size} is below the Ethernet minimum of {MIN_FRAME} bytes")
    if len(src_mac) != 6 or len(dst_mac) != 6:
        raise ValueError(f"MAC addresses must be 6 bytes, got {len(src_mac)} and {len(dst_mac)}")
    head = _ETH.pack(dst_mac, src_mac, ETHERTYPE) + FRAME_MAGIC
    crc_head = _CRC_HEAD  # over ethertype + magic
    pad = bytes(size - HEADER_LEN)
    seq_time, crc32 = _SEQ_TIME.pack, zlib.crc32
    out = []
    if len(pad) < _ZERO_RUN_MIN:
        for seq in range(first_seq, first_seq + n):
            body = seq_time(seq, now_ns)
            out.append(b"".join((head, crc32(pad, crc32(body, crc_head)).to_bytes(4, "big"), body, pad)))
        return out
    f0, t0, t1, t2, t3 = _zero_run_crc(len(pad))  # the CRC over the padding, from the CRC up to it
    for seq in range(first_seq, first_seq + n):
        body = seq_time(seq, now_ns)
        c = crc32(body, crc_head)
        crc = f0 ^ t0[c & 255] ^ t1[c >> 8 & 255] ^ t2[c >> 16 & 255] ^ t3[c >> 24]
        out.append(b"".join((head, crc.to_bytes(4, "big"), body, pad)))
    return out


def parse_frames(frames: list[bytes]) -> tuple[list[int], list[int], int, list[BadFrame]]:
    """(seqs, send times, frames of other traffic, errors of damaged ones) of a batch: `parse_frame` without
    an object per frame."""
    seqs: list[int] = []
    sends: list[int] = []
    other = 0
    bad: list[BadFrame] = []
    unpack, crc32, crc_head = _TAIL.unpack_from, zlib.crc32, _CRC_HEAD
    for f in frames:
        if len(f) >= HEADER_LEN:
            ethertype, magic, crc, seq, send_ns = unpack(f, _ETH.size - 2)
            # ethertype and magic checked: the CRC over them is the constant _CRC_HEAD
            if ethertype == ETHERTYPE and magic == FRAME_MAGIC and crc == crc32(f[_CRC_OFF + 4:], crc_head):
                seqs.append(seq)
                sends.append(send_ns)
                continue
        try:
            if parse_frame(f) is None:  # the slow path sorts other traffic from damaged frames
                other += 1
        except BadFrame as e:
            bad.append(e)
    return seqs, sends, other, bad


def parse_frame(frame: bytes | memoryview) -> TrafficFrame | None:
    """Decode a traffic frame; None for other traffic (ARP, IPv6, ...), BadFrame if ours but damaged."""
    if len(frame) < _ETH.size:
        return None
    dst, src, ethertype = _ETH.unpack_from(frame, 0)
    if ethertype != ETHERTYPE:
        return None
    if len(frame) < HEADER_LEN:
        raise BadFrame(f"traffic frame of {len(frame)} bytes is shorter than its {HEADER_LEN}-byte header")
    magic, crc, seq, send_ns = _BODY.unpack_from(frame, _ETH.size)
    if magic != FRAME_MAGIC:
        raise BadFrame(f"traffic frame magic {magic!r}, expected {FRAME_MAGIC!r}")
    if crc != _crc(frame):
        raise BadFrame(f"traffic frame seq {seq}: CRC {crc:#010x} does not match contents {_crc(frame):#010x}")
    return TrafficFrame(seq, send_ns, src, dst, len(frame))


@dataclass(frozen=True)
class FrameRecord:
    """One sent frame's fate: recv_ns is its first arrival, None if it never arrived."""

    seq: int
    send_ns: int
    recv_ns: int | None


@dataclass(frozen=True)
class DeliveryBin:
    start_ms: float
    sent: int
    delivered: int
    lost: int


def percentile(sorted_values: list[int], p: float) -> int | None:
    """Nearest-rank percentile (the smallest value with at least p% of values <= it); None if empty."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def blackout(send_times: Iterable[int], recv_times: Iterable[int]) -> tuple[int, int] | None:
    """The longest interval during which frames were being sent and nothing was delivered, as (start, end).

    Deliveries (every arrival, duplicates included) split time into intervals: before the first
    delivery, between consecutive deliveries, after the last one. In each interval that contains
    a send, the candidate runs from the first send in it (a delivery and a send at the same
    instant: the send belongs to the interval that the delivery opens) to the delivery that
    closes the interval — or, after the last delivery, to the last send. So:
      - an outage while the guest sends at a steady rate measures from the first frame that went
        unanswered until traffic flows again (a gap between deliveries, minus at most one send
        interval), and an outage that lasts until sending stops runs to the last send;
      - with nothing delivered at all it is the whole sending period;
      - a pause of the sender is never counted: the interval starts at the first send after it;
      - on a healthy path it is about one RTT (each send is followed by its own delivery).
    None when nothing was sent; the earliest of equally long candidates.
    """
    sends = sorted(send_times)
    if not sends:
        return None
    recvs = sorted(recv_times)
    best = None
    for lo, hi in zip([None, *recvs], [*recvs, None]):
        i = 0 if lo is None else bisect.bisect_left(sends, lo)
        if i == len(sends):
            break
        cand = (sends[i], sends[-1] if hi is None else hi)
        if cand[0] < cand[1] and (best is None or cand[1] - cand[0] > best[1] - best[0]):
            best = cand
    return best or (sends[0], sends[0])


@dataclass(frozen=True)
class TrafficStats:
    """Delivery statistics of one traffic run.

    sent: distinct sequence numbers sent. received: every arrival (duplicates included).
    lost: sent seqs that never arrived. duplicated: arrivals of a seq already received.
    reordered: first arrivals whose seq is lower than the highest seq received before them (in
    arrival order). unknown: arrivals of seqs that were never sent. RTT (recv - send) is taken
    from first arrivals of sent frames.
    """

    sent: int
    received: int
    lost: int
    duplicated: int
    reordered: int
    unknown: int
    rtt_ns: dict[str, int | None]
    blackout_ns: int
    blackout_start_ns: int | None
    blackout_end_ns: int | None
    lost_seqs: tuple[int, ...] = ()
    timeline: tuple[FrameRecord, ...] = field(default=(), repr=False)

    @classmethod
    def from_records(cls, sent: Iterable[tuple[int, int]],
                     received: Iterable[tuple[int, int, int]]) -> "TrafficStats":
        """`sent`: (seq, send_ns) per frame sent; `received`: (seq, send_ns, recv_ns) per arrival, in arrival order.

        A seq sent twice counts once, with its first send time.
        """
        send_ns: dict[int, int] = {}
        for seq, t in sent:
            send_ns.setdefault(seq, t)
        first_recv: dict[int, int] = {}
        received = list(received)
        duplicated = reordered = unknown = 0
        max_seen = -1
        rtts = []
        for seq, sent_at, recv_at in received:
            if seq in first_recv:
                duplicated += 1
                continue
            first_recv[seq] = recv_at
            if seq < max_seen:
                reordered += 1
            max_seen = max(max_seen, seq)
            if seq in send_ns:
                rtts.append(recv_at - sent_at)
            else:
                unknown += 1
        rtts.sort()
        timeline = tuple(FrameRecord(seq, t, first_recv.get(seq)) for seq, t in sorted(send_ns.items()))
        lost_seqs = tuple(r.seq for r in timeline if r.recv_ns is None)
        gap = blackout(send_ns.values(), (r[2] for r in received))
        return cls(
            sent=len(send_ns), received=len(received), lost=len(lost_seqs), duplicated=duplicated,
            reordered=reordered, unknown=unknown,
            rtt_ns={"p50": percentile(rtts, 50), "p90": percentile(rtts, 90), "p99": percentile(rtts, 99),
                    "max": rtts[-1] if rtts else None},
            blackout_ns=gap[1] - gap[0] if gap else 0,
            blackout_start_ns=gap[0] if gap else None, blackout_end_ns=gap[1] if gap else None,
            lost_seqs=lost_seqs, timeline=timeline)

    def to_dict(self) -> dict:
        """JSON-friendly summary in milliseconds (no timeline)."""
        return {
            "sent": self.sent, "received": self.received, "lost": self.lost,
            "duplicated": self.duplicated, "reordered": self.reordered, "unknown": self.unknown,
            "rtt_ms": {k: _ms(v) for k, v in self.rtt_ns.items()},
            "blackout_ms": _ms(self.blackout_ns),
            "lost_seqs": list(self.lost_seqs),
        }


def _ms(ns: int | None) -> float | None:
    return None if ns is None else ns / 1e6


def windowed_delivery(timeline: Iterable[FrameRecord], bin_ms: float) -> list[DeliveryBin]:
    """Per time bin from the first send: frames sent, frames delivered (by arrival time) and
    frames lost (by send time). Bins run until the last send or arrival, empty bins included."""
    if bin_ms <= 0:
        raise ValueError(f"bin width {bin_ms} ms must be positive")
    timeline = list(timeline)
    if not timeline:
        return []
    t0 = min(r.send_ns for r in timeline)
    width = bin_ms * 1e6
    last = max(max(r.send_ns for r in timeline), max((r.recv_ns for r in timeline if r.recv_ns is not None), default=t0))
    nbins = int((last - t0) // width) + 1
    sent, delivered, lost = [0] * nbins, [0] * nbins, [0] * nbins
    for r in timeline:
        b = int((r.send_ns - t0) // width)
        sent[b] += 1
        if r.recv_ns is None:
            lost[b] += 1
        else:
            delivered[max(0, int((r.recv_ns - t0) // width))] += 1
    return [DeliveryBin(i * bin_ms, sent[i], delivered[i], lost[i]) for i in range(nbins)]
