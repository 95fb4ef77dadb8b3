"""The agent's frame blocks (`vfkeep.guest.blocks`) equal the frame format of `vfkeep.guest.stats`, the reference
built and checked frame by frame: property-based, every seq and time width and frame size, damaged frames."""
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from vfkeep.guest.blocks import make_frame_block, parse_frame_block
from vfkeep.guest.stats import HEADER_LEN, MIN_FRAME, make_frames, parse_frames

SRC, DST = bytes.fromhex("020000000001"), bytes.fromhex("020000000002")


@settings(deadline=None)
@given(first=st.integers(0, 2**63), n=st.integers(0, 20), size=st.integers(MIN_FRAME, 1500), now=st.integers(0, 2**63))
def test_a_block_is_the_frames_make_frames_builds(first, n, size, now):
    block = make_frame_block(first, n, size, now, SRC, DST)
    assert block.shape == (n, size) and [row.tobytes() for row in block] == make_frames(first, n, size, now, SRC, DST)


@settings(deadline=None)
@given(first=st.integers(0, 2**62), n=st.integers(1, 12), size=st.integers(MIN_FRAME, 300),
       sends=st.lists(st.integers(0, 2**63), min_size=12, max_size=12), slot=st.integers(0, 64))
def test_parsing_a_block_agrees_with_parse_frames(first, n, size, sends, slot):
    """Frames of one size with their own send times, in rows wider than the frames (ring slots)."""
    frames = [make_frames(first + i, 1, size, sends[i], SRC, DST)[0] for i in range(n)]
    rows = np.zeros((n, size + slot), np.uint8)
    rows[:, :size] = np.frombuffer(b"".join(frames), np.uint8).reshape(n, size)
    seqs, times, other, bad = parse_frames(frames)
    assert parse_frame_block(rows[:, :size], size) == (seqs, times) and not other and not bad


@settings(deadline=None)
@given(size=st.integers(MIN_FRAME, 200), where=st.integers(12, 199), flip=st.integers(1, 255), victim=st.integers(0, 4))
def test_a_block_with_any_damaged_or_foreign_frame_is_left_to_parse_frames(size, where, flip, victim):
    """One changed byte anywhere after the MACs (ethertype, magic, CRC, seq, time, padding): no block result, so
    the caller parses frame by frame and counts the frame as damaged or other traffic."""
    rows = make_frame_block(7, 5, size, 123, SRC, DST)
    rows[victim, 12 + where % (size - 12)] ^= flip
    assert parse_frame_block(rows, size) is None
    seqs, _, other, bad = parse_frames([row.tobytes() for row in rows])
    assert len(seqs) == 4 and other + len(bad) == 1


def test_frames_too_short_for_the_header_are_never_a_block():
    assert parse_frame_block(np.zeros((3, HEADER_LEN - 1), np.uint8), HEADER_LEN - 1) is None
