"""Guest channel rings: format, wrap-around, full/empty, attach validation, handover between real processes."""
import collections
import json
import os
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import LineChild
from vfkeep.guest.ring import (HEADER_SIZE, BadRingHeader, ChannelLayout, Doorbell, NicChannel, Ring, RingCorrupt,
                               ring_size)
from vfkeep.memory import PAGE_SIZE, GuestMemory, MemoryLayout
from vfkeep.proc import end

LAYOUT = MemoryLayout(guest_pages=64, worker_pages=4, pool_pages=0)


def frame(i: int, size: int = 16) -> bytes:
    return struct.pack("<Q", i) + bytes([i & 0xFF]) * (size - 8)


def test_wraparound_keeps_order(mem):
    ring = Ring.create(mem, 0, slots=8, slot_size=64)
    assert ring.push_many([frame(0), frame(1)]) == 2
    out = []
    for i in range(2, 100, 5):  # 2..7 frames in flight: slot indexes cross the boundary again and again
        assert ring.push_many([frame(j) for j in range(i, i + 5)]) == 5
        out += ring.pop_many(5)
    out += ring.pop_many(100)
    assert out == [frame(i) for i in range(102)]
    s = ring.stats()
    assert (s.head, s.tail, s.used, s.dropped_full) == (102, 102, 0, 0)
    assert s.bytes_pushed == s.bytes_popped == 102 * 16


def test_full_and_empty(mem):
    ring = Ring.create(mem, 0, slots=4, slot_size=64)
    assert ring.pop() is None and ring.pop_many(8) == [] and len(ring) == 0
    assert ring.push_many([frame(i) for i in range(3)]) == 3
    assert ring.free_slots == 1
    assert ring.push(frame(3)) is True
    assert ring.push(frame(4)) is False
    assert ring.push_many([frame(5), frame(6)]) == 0
    assert ring.stats().dropped_full == 3
    assert len(ring) == 4 and ring.free_slots == 0
    assert ring.pop_many(10) == [frame(i) for i in range(4)]
    assert ring.pop() is None


def test_pop_into_hands_views_and_keeps_the_frames_if_the_consumer_fails(mem):
    """The zero-copy consumer sees the slots themselves; head moves only after it returned."""
    ring = Ring.create(mem, 0, slots=4, slot_size=64)
    assert ring.push_many([frame(i) for i in range(3)]) == 3

    def fail(views):
        assert all(isinstance(v, memoryview) for v in views) and list(map(bytes, views)) == [frame(0), frame(1)]
        raise RuntimeError("consumer failed")
    with pytest.raises(RuntimeError):
        ring.pop_into(fail, 2)
    assert len(ring) == 3 and ring.stats().bytes_popped == 0
    assert ring.pop_into(lambda views: None, 8) == 3
    assert len(ring) == 0 and ring.stats().bytes_popped == 3 * 16 and ring.pop_into(fail, 8) == 0


def test_frame_sizes(mem):
    ring = Ring.create(mem, 0, slots=2, slot_size=64)
    assert ring.max_frame == 60
    assert ring.push(b"") and ring.push(b"x" * 60)
    assert ring.pop() == b"" and ring.pop() == b"x" * 60
    with pytest.raises(ValueError, match="61 bytes exceeds .* 60"):
        ring.push(b"x" * 61)
    with pytest.raises(ValueError):  # nothing of the batch is published
        ring.push_many([b"ok", b"x" * 61])
    assert len(ring) == 0


def test_counters_wrap_at_u64(mem):
    ring = Ring.create(mem, 0, slots=4, slot_size=64)
    start = (1 << 64) - 3
    mem.write_u64(0x40, start)  # tail
    mem.write_u64(0x80, start)  # head
    ring = Ring.attach(mem, 0)
    assert len(ring) == 0
    for i in range(10):
        assert ring.push_many([frame(i), frame(i + 100)]) == 2
        assert ring.pop_many(5) == [frame(i), frame(i + 100)]
    assert ring.stats().tail == (start + 20) % (1 << 64)


def test_attach_validates_header(mem):
    with pytest.raises(BadRingHeader, match="magic 0x00000000"):
        Ring.attach(mem, 0)
    mem.write(PAGE_SIZE, os.urandom(HEADER_SIZE))
    with pytest.raises(BadRingHeader, match="magic"):
        Ring.attach(mem, PAGE_SIZE)
    Ring.create(mem, 0, slots=8, slot_size=128)
    assert Ring.attach(mem, 0).slots == 8
    for off, value, msg in [(0x04, 2, "version 2"), (0x08, 6, "power of two"), (0x0C, 100, "multiple of 64"),
                            (0x10, 0x40, "data offset"), (0x08, 1 << 16, "outside guest RAM")]:
        good = mem.read(0, 0x14)
        mem.write_u32(off, value)
        with pytest.raises(BadRingHeader, match=msg):
            Ring.attach(mem, 0)
        mem.write(0, good)
    mem.write_u64(0x40, 9)  # tail 9, head 0: more frames than slots
    with pytest.raises(RingCorrupt, match="9 frames in 8 slots"):
        Ring.attach(mem, 0)
    with pytest.raises(BadRingHeader, match="aligned"):
        Ring.attach(mem, 8)
    with pytest.raises(BadRingHeader, match="outside guest RAM"):
        Ring.attach(mem, LAYOUT.worker.gpa)


def test_corrupt_slot_length_is_an_error(mem):
    ring = Ring.create(mem, 0, slots=2, slot_size=64)
    ring.push(b"abc")
    mem.write_u32(HEADER_SIZE, 1000)
    with pytest.raises(RingCorrupt, match="length 1000"):
        ring.pop()


def test_create_checks_geometry_and_location(mem):
    for kwargs, msg in [(dict(slots=3, slot_size=64), "power of two"), (dict(slots=4, slot_size=32), "multiple of 64"),
                        (dict(slots=1024, slot_size=4096), "outside guest RAM")]:
        with pytest.raises(ValueError, match=msg):
            Ring.create(mem, 0, **kwargs)


def test_channel_layout():
    cl = ChannelLayout(nics=3, slots=16, slot_size=256)
    assert cl.ring_bytes == ring_size(16, 256) == 0x100 + 4096
    assert cl.ring_pages == 2 and cl.nic_pages == 4
    assert [cl.tx_gpa(i) for i in range(3)] == [0, 4 * PAGE_SIZE, 8 * PAGE_SIZE]
    assert [cl.rx_gpa(i) for i in range(3)] == [2 * PAGE_SIZE, 6 * PAGE_SIZE, 10 * PAGE_SIZE]
    assert cl.end_gpa == 12 * PAGE_SIZE
    assert ChannelLayout.from_str(cl.to_str()) == cl
    cl.check_fits(LAYOUT)
    with pytest.raises(ValueError, match="guest RAM has 64 pages"):
        ChannelLayout(nics=20, slots=16, slot_size=256).check_fits(LAYOUT)
    with pytest.raises(ValueError, match="nic index 3"):
        cl.tx_gpa(3)
    with pytest.raises(ValueError, match="bad channel layout"):
        ChannelLayout.from_str("nics=1")


def test_nic_channel_rings_are_independent(mem):
    cl = ChannelLayout(nics=2, slots=16, slot_size=256)
    host = [NicChannel.create(mem, cl, i) for i in range(2)]
    try:
        peer = NicChannel.attach(mem, cl, 1, *(os.dup(fd) for fd in host[1].bell_fds()))
        host[1].tx.push(b"to-worker")
        host[0].rx.push(b"nic0")
        assert peer.tx.wait(5) and peer.tx.pop() == b"to-worker"
        assert peer.rx.pop() is None and host[0].rx.pop() == b"nic0"
        peer.close()
        with pytest.raises(BadRingHeader, match="layout says 8x512"):  # same placement, other geometry
            NicChannel.attach(mem, ChannelLayout(nics=2, slots=8, slot_size=512), 0, *host[0].bell_fds())
    finally:
        for ch in host:
            ch.close()


def test_doorbell_wait_times_out_and_counts():
    bell = Doorbell.create()
    try:
        assert bell.wait(0) is False
        bell.ring()
        bell.ring()
        assert bell.clear() == 2 and bell.clear() == 0
        bell.ring()
        assert bell.wait(0) is True and bell.wait(0.01) is False
    finally:
        bell.close()


def test_wait_ignores_stale_ring(mem):
    bell = Doorbell.create()
    ring = Ring.create(mem, 0, slots=4, slot_size=64, doorbell=bell)
    try:
        ring.push(b"a")
        assert ring.pop() == b"a"  # doorbell still holds the ring for "a"
        t0 = time.monotonic()
        assert ring.wait(0.05) is False
        assert time.monotonic() - t0 >= 0.05
    finally:
        bell.close()


@settings(max_examples=150, deadline=None)
@given(slots_log2=st.integers(0, 3),
       ops=st.lists(st.one_of(st.tuples(st.just("push"), st.integers(0, 60)),
                              st.tuples(st.just("push_many"), st.lists(st.integers(0, 60), max_size=10)),
                              st.tuples(st.just("pop"), st.none()),
                              st.tuples(st.just("pop_many"), st.integers(0, 10)),
                              st.tuples(st.just("pop_into"), st.integers(0, 10)),
                              st.tuples(st.just("push_block"), st.tuples(st.integers(0, 10), st.integers(0, 60))),
                              st.tuples(st.just("peek_blocks"), st.integers(0, 10))), max_size=60))
def test_ring_matches_deque_model(slots_log2, ops):
    """Every producer and consumer call, blocks (`push_block`, `peek_blocks` + `release_count`) included, against a
    deque, across wraps and full rings."""
    slots = 1 << slots_log2
    with GuestMemory.create(LAYOUT) as m:
        ring = Ring.create(m, 0, slots=slots, slot_size=64)
        model: collections.deque = collections.deque()
        dropped = counter = 0

        def fresh(size):
            nonlocal counter
            counter += 1
            return bytes([counter & 0xFF]) * size

        for op, arg in ops:
            if op == "push":
                f = fresh(arg)
                ok = len(model) < slots
                assert ring.push(f) is ok
                if ok:
                    model.append(f)
                else:
                    dropped += 1
            elif op == "push_many":
                fs = [fresh(n) for n in arg]
                room = slots - len(model)
                assert ring.push_many(fs) == min(room, len(fs))
                model.extend(fs[:room])
                dropped += max(0, len(fs) - room)
            elif op == "pop":
                assert ring.pop() == (model.popleft() if model else None)
            elif op == "pop_many":
                assert ring.pop_many(arg) == [model.popleft() for _ in range(min(arg, len(model)))]
            elif op == "push_block":
                n, size = arg
                fs = [fresh(size) for _ in range(n)]
                room = slots - len(model)
                assert ring.push_block(np.frombuffer(b"".join(fs), np.uint8).reshape(n, size)) == min(room, n)
                model.extend(fs[:room])
                dropped += max(0, n - room)
            elif op == "peek_blocks":
                blocks = ring.peek_blocks(arg)
                got = [bytes(row[:n]) for rows, lengths in blocks for row, n in zip(rows, lengths)]
                assert len(blocks) <= 2 and got == list(model)[:min(arg, len(model))]
                ring.release_count(len(got), sum(map(len, got)))
                for _ in got:
                    model.popleft()
                del blocks
            else:
                got: list[bytes] = []
                n = ring.pop_into(lambda views: got.extend(map(bytes, views)), arg)
                assert got == [model.popleft() for _ in range(min(arg, len(model)))] and n == len(got)
            assert len(ring) == len(model) and ring.free_slots == slots - len(model)
            assert ring.stats().dropped_full == dropped
        ring.close()


# -- real processes --------------------------------------------------------------------------------

CONSUMER = r"""
import json, sys, time
from vfkeep.guest.ring import Doorbell, Ring
from vfkeep.memory import GuestMemory, MemoryLayout
mem_fd, layout, gpa, bell_fd, count = sys.argv[1:]
mem = GuestMemory.attach(int(mem_fd), MemoryLayout.from_str(layout))
ring = Ring.attach(mem, int(gpa), Doorbell(int(bell_fd)))
got, deadline = [], time.monotonic() + 10
while len(got) < int(count) and time.monotonic() < deadline:
    print("waiting", flush=True)
    if ring.wait(deadline - time.monotonic()):
        got += [int.from_bytes(f[:8], "little") for f in ring.pop_many(int(count) - len(got))]
print(json.dumps(got), flush=True)
"""

PRODUCER = r"""
import struct, sys, time
from vfkeep.guest.ring import Doorbell, Ring
from vfkeep.memory import GuestMemory, MemoryLayout
mem_fd, layout, gpa, bell_fd, count = sys.argv[1:]
mem = GuestMemory.attach(int(mem_fd), MemoryLayout.from_str(layout))
ring = Ring.attach(mem, int(gpa), Doorbell(int(bell_fd)))
seq = 0
while seq < int(count):
    if ring.push(struct.pack("<Q", seq) + b"p" * 40):
        seq += 1
    else:
        time.sleep(0.0005)  # ring full: back off until the (next) consumer makes room
print("done", flush=True)
"""


class Child(LineChild):
    """A python script in a child process; `args` are its command line."""

    def __init__(self, script: str, *args, pass_fds=()):
        super().__init__([sys.executable, "-c", script, *map(str, args)], pass_fds=pass_fds, stderr=subprocess.PIPE)

    def result(self) -> list[int]:
        while True:
            line = self.line()
            if line != "waiting":
                return json.loads(line)

    def finish(self) -> int:
        rc = self.proc.wait(10)
        self.proc.stdout.close()
        self.proc.stderr.close()
        return rc

    def end(self) -> None:
        end(self.proc)
        self.proc.stdout.close()
        self.proc.stderr.close()


@pytest.fixture
def channel():
    mem = GuestMemory.create(LAYOUT)
    bell = Doorbell.create()
    ring = Ring.create(mem, 0, slots=16, slot_size=64, doorbell=bell)
    children: list[Child] = []
    yield mem, ring, bell, children
    for c in children:
        if c.proc.returncode is None:
            c.end()
    ring.close()
    bell.close()
    mem.close()


def consumer(mem, bell, count) -> Child:
    return Child(CONSUMER, mem.fd, LAYOUT.to_str(), 0, bell.fd, count, pass_fds=(mem.fd, bell.fd))


def test_consumer_restart_resumes_from_counters(channel):
    mem, ring, bell, children = channel
    a = consumer(mem, bell, 10)
    children.append(a)
    assert ring.push_many([frame(i) for i in range(14)]) == 14  # A takes 10, 4 stay
    assert a.result() == list(range(10))
    assert a.finish() == 0
    # No consumer runs: the guest keeps sending; the ring (16 slots) wraps and buffers them.
    assert ring.push_many([frame(i) for i in range(14, 26)]) == 12
    assert len(ring) == 16 and ring.push(frame(99)) is False  # full, and the drop is counted
    b = consumer(mem, bell, 20)
    children.append(b)
    assert b.line() == "waiting"  # attached, about to take what waited in the ring
    assert b.line() == "waiting"  # took all 16 in one batch; the ring is empty again
    assert len(ring) == 0
    assert ring.push_many([frame(i) for i in range(26, 30)]) == 4  # and the guest goes on sending
    assert b.result() == list(range(10, 30))
    assert b.finish() == 0
    assert ring.stats().dropped_full == 1


def test_producer_and_consumers_in_three_processes(channel):
    mem, ring, bell, children = channel
    producer = Child(PRODUCER, mem.fd, LAYOUT.to_str(), 0, bell.fd, 300, pass_fds=(mem.fd, bell.fd))
    children.append(producer)
    a = consumer(mem, bell, 100)
    children.append(a)
    got = a.result()
    assert a.finish() == 0
    b = consumer(mem, bell, 200)  # started while the producer keeps pushing (it stalls while the ring is full)
    children.append(b)
    got += b.result()
    assert b.finish() == 0
    assert producer.line() == "done" and producer.finish() == 0
    assert got == list(range(300))
    assert len(ring) == 0 and ring.stats().tail == 300


def test_doorbell_wakes_consumer_in_other_process(channel):
    mem, ring, bell, children = channel
    c = consumer(mem, bell, 1)
    children.append(c)
    assert c.line() == "waiting"  # the ring is empty: it is blocked in wait()
    t0 = time.monotonic()
    ring.push(frame(42))
    assert c.result() == [42]
    assert time.monotonic() - t0 < 5
    assert c.finish() == 0
