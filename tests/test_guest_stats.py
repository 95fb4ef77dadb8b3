"""Traffic frames and statistics on synthetic timelines with known loss, duplication, reordering and blackout."""
import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vfkeep.guest.stats import (ETHERTYPE, MIN_FRAME, BadFrame, FrameRecord, TrafficStats, blackout, make_frame,
                                make_frames, parse_frame, parse_frames, percentile, windowed_delivery)

MS = 1_000_000
SRC, DST = bytes.fromhex("020000000001"), bytes.fromhex("020000000002")


def test_frame_roundtrip():
    f = make_frame(123456789, 128, 987654321012, SRC, DST)
    assert len(f) == 128 and f[:6] == DST and f[6:12] == SRC and int.from_bytes(f[12:14], "big") == ETHERTYPE
    p = parse_frame(f)
    assert (p.seq, p.send_ns, p.src_mac, p.dst_mac, p.size) == (123456789, 987654321012, SRC, DST, 128)
    assert parse_frame(memoryview(f)).seq == 123456789


def test_frame_errors():
    with pytest.raises(ValueError, match="minimum of 60"):
        make_frame(1, MIN_FRAME - 1, 0, SRC, DST)
    with pytest.raises(ValueError, match="6 bytes"):
        make_frame(1, 64, 0, SRC[:5], DST)
    arp = DST + SRC + b"\x08\x06" + bytes(46)
    assert parse_frame(arp) is None and parse_frame(b"short") is None
    f = bytearray(make_frame(7, 64, 5, SRC, DST))
    f[40] ^= 0xFF  # one flipped padding byte
    with pytest.raises(BadFrame, match="seq 7: CRC"):
        parse_frame(bytes(f))
    poison = make_frame(7, 64, 5, SRC, DST)[:14] + bytes.fromhex("deadbeefbaadf00d") * 6 + bytes(2)
    with pytest.raises(BadFrame, match="magic"):
        parse_frame(poison)
    with pytest.raises(BadFrame, match="shorter"):
        parse_frame(f[:20])


@given(first=st.integers(0, 2**63), n=st.integers(0, 20), size=st.integers(MIN_FRAME, 1500),
       now=st.integers(0, 2**63))
def test_a_burst_is_frames_of_consecutive_seqs_with_one_send_time(first, n, size, now):
    frames = make_frames(first, n, size, now, SRC, DST)
    assert [(p.seq, p.send_ns, p.size, p.src_mac, p.dst_mac) for p in map(parse_frame, frames)] == [
        (first + i, now, size, SRC, DST) for i in range(n)]
    for f in frames:  # the CRC as the frame format defines it, recomputed from scratch
        assert int.from_bytes(f[18:22], "big") == zlib.crc32(f[22:], zlib.crc32(f[12:18]))


def damaged(f: bytes, where: int) -> bytes:
    return f[:where % len(f)] + bytes([f[where % len(f)] ^ 0x5A]) + f[where % len(f) + 1:]


@given(st.lists(st.one_of(
    st.builds(make_frame, st.integers(0, 2**40), st.integers(MIN_FRAME, 200), st.integers(0, 2**40),
              st.just(SRC), st.just(DST)),
    st.builds(damaged, st.builds(make_frame, st.integers(0, 99), st.just(64), st.just(5), st.just(SRC),
                                 st.just(DST)), st.integers(12, 63)),
    st.binary(max_size=80)), max_size=12))
def test_parse_frames_agrees_with_parse_frame(frames):
    seqs, sends, other, bad = parse_frames(frames)
    good, n_other, n_bad = [], 0, []
    for f in frames:
        try:
            p = parse_frame(f)
        except BadFrame as e:
            n_bad.append(str(e))
            continue
        if p is None:
            n_other += 1
        else:
            good.append((p.seq, p.send_ns))
    assert list(zip(seqs, sends)) == good and other == n_other and [str(e) for e in bad] == n_bad
    # the agent parses frames in place in its ring (views): the same result
    v_seqs, v_sends, v_other, v_bad = parse_frames(list(map(memoryview, frames)))
    assert (v_seqs, v_sends, v_other, list(map(str, v_bad))) == (seqs, sends, other, list(map(str, bad)))


def test_percentile_nearest_rank():
    v = list(range(1, 101))
    assert [percentile(v, p) for p in (50, 90, 99, 100)] == [50, 90, 99, 100]
    assert percentile([7], 99) == 7 and percentile([], 50) is None


def synthetic():
    """100 frames sent every 1 ms from t=0, RTT 0.2 ms, except:
    seqs 40..59 lost (a 20 ms outage), seq 10 delivered twice, seqs 70 and 71 swapped,
    seq 80 takes 5 ms, and a frame nobody sent (seq 999) arrives."""
    sent = [(s, s * MS) for s in range(100)]
    recv = []
    for s in range(100):
        if 40 <= s < 60:
            continue
        rtt = 5 * MS if s == 80 else MS // 5
        recv.append((s, s * MS, s * MS + rtt))
    recv.sort(key=lambda r: r[2])  # arrival order (80 now arrives after 81..84)
    i = next(k for k, r in enumerate(recv) if r[0] == 70)
    recv[i], recv[i + 1] = recv[i + 1], recv[i]
    recv.insert(next(k for k, r in enumerate(recv) if r[0] == 11), (10, 10 * MS, 11 * MS))
    recv.append((999, 99 * MS, 99 * MS + 1))
    return sent, recv


def test_stats_on_synthetic_timeline():
    st = TrafficStats.from_records(*synthetic())
    assert st.sent == 100
    assert st.received == 80 + 1 + 1
    assert st.lost == 20 and st.lost_seqs == tuple(range(40, 60))
    assert st.duplicated == 1
    assert st.reordered == 2  # 70 after 71, and the slow 80 after 81..84
    assert st.unknown == 1
    assert st.rtt_ns["p50"] == MS // 5 and st.rtt_ns["max"] == 5 * MS
    # 40 (sent at 40 ms) is the first frame nothing answers; deliveries resume with 60 at 60.2 ms.
    assert (st.blackout_start_ns, st.blackout_end_ns) == (40 * MS, 60 * MS + MS // 5)
    assert st.blackout_ns == 20 * MS + MS // 5
    assert len(st.timeline) == 100
    assert st.timeline[45] == FrameRecord(45, 45 * MS, None)
    assert st.timeline[10] == FrameRecord(10, 10 * MS, 10 * MS + MS // 5)  # first arrival, not the duplicate
    d = st.to_dict()
    assert d["blackout_ms"] == 20.2 and d["lost"] == 20 and d["rtt_ms"]["max"] == 5.0


def test_clean_run():
    sent = [(s, s * MS) for s in range(10)]
    st = TrafficStats.from_records(sent, [(s, t, t + 100) for s, t in sent])
    assert (st.lost, st.duplicated, st.reordered, st.unknown) == (0, 0, 0, 0)
    assert st.blackout_ns == 100  # healthy: one RTT
    empty = TrafficStats.from_records([], [])
    assert empty.sent == 0 and empty.blackout_ns == 0 and empty.blackout_start_ns is None
    assert empty.rtt_ns == {"p50": None, "p90": None, "p99": None, "max": None}


def test_blackout_edges_and_sender_pauses():
    # Nothing ever arrives: the whole sending period.
    assert blackout([0, 5, 10], []) == (0, 10)
    # The path dies at the end: first send after the last delivery -> last send.
    assert blackout([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [0.5, 1.5]) == (2, 10)
    # Slow start: first send -> first delivery.
    assert blackout([0, 10, 11], [9, 10.5, 11.5]) == (0, 9)
    # A long gap between deliveries while the sender paused is not a blackout...
    assert blackout([0, 1, 60, 61], [0.5, 1.5, 60.5, 61.5]) == (0, 0.5)
    # ...but an outage right after the pause is, from the first send after it.
    assert blackout([0, 1, 60, 61, 62, 63], [0.5, 1.5, 63.5]) == (60, 63.5)
    # A send at the same instant as a delivery belongs to the interval that delivery opens.
    assert blackout([0, 1, 2], [1, 3]) == (1, 3)
    assert blackout([], [1]) is None


def test_windowed_delivery():
    st = TrafficStats.from_records(*synthetic())
    bins = windowed_delivery(st.timeline, 10)
    assert [b.start_ms for b in bins] == [0, 10, 20, 30, 40, 50, 60, 70, 80, 90]
    assert [b.sent for b in bins] == [10] * 10
    assert [b.lost for b in bins] == [0, 0, 0, 0, 10, 10, 0, 0, 0, 0]
    assert [b.delivered for b in bins] == [10, 10, 10, 10, 0, 0, 10, 10, 10, 10]  # late 80 still lands in its bin
    assert windowed_delivery([], 10) == []
    with pytest.raises(ValueError, match="positive"):
        windowed_delivery(st.timeline, 0)
