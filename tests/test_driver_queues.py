"""Driver-side queues: owner counting across wraps, doorbell values, WQ ring arithmetic."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vfkeep.driver.errors import QueueOverflow
from vfkeep.driver.queues import POLL_RUN, CqEq, DoorbellPage, Wq
from vfkeep.gdma.constants import DB_CQ, DB_EQ, DB_RQ, DB_SQ, GDMA_EQE_TEST_EVENT
from vfkeep.gdma.queues import Cqe, CqeParams, Eqe, EqeParams, owner_count
from vfkeep.gdma.regs import CqEqDoorbellValue, WqDoorbellValue


class Bar0Log:
    def __init__(self):
        self.writes = []

    def write64(self, offset, value, posted=False):
        self.writes.append((offset, value, posted))

    def write64_posted_many(self, writes):
        self.writes.extend((offset, value, True) for offset, value in writes)


class Producer:
    """Device side of a CQ/EQ as gdma spec 6.5 describes it: counter starts at the capacity."""

    def __init__(self, mem, entry_size):
        self.mem, self.entry_size = mem, entry_size
        self.cap = len(mem) // entry_size
        self.t = self.cap

    def post(self, tag):
        off = (self.t % self.cap) * self.entry_size
        owner = owner_count(self.t, self.cap)
        if self.entry_size == 64:
            e = Cqe(params=CqeParams(wq_number=tag, owner_count=owner))
        else:
            e = Eqe(params=EqeParams(event_type=GDMA_EQE_TEST_EVENT, reserved=tag, owner_count=owner))
        self.mem[off:off + self.entry_size] = e.to_bytes()
        self.t += 1


def doorbell(bar0=None):
    return DoorbellPage(bar0 or Bar0Log(), 0x1000, 12, 0, 1)


@pytest.mark.parametrize("kind,entry", [("cq", 64), ("eq", 16)])
def test_cq_eq_consumes_in_order_across_many_wraps(kind, entry):
    mem = memoryview(bytearray(4096))
    q = CqEq(kind, mem, 24, doorbell())
    dev = Producer(mem, entry)
    seen = []
    for i in range(20 * dev.cap):  # 20 passes: owner count wraps 7 -> 0 twice
        dev.post(i & 0xFF)
        e = q.poll()
        seen.append(e.params.wq_number if kind == "cq" else e.params.reserved)
        assert q.poll() is None
    assert seen == [i & 0xFF for i in range(20 * dev.cap)]


@settings(max_examples=40, deadline=None)
@given(kind=st.sampled_from([("cq", 64), ("eq", 16)]), batches=st.lists(st.tuples(st.integers(0, 70),
                                                                                st.integers(1, 300)), max_size=30))
def test_poll_many_equals_polling_one_at_a_time(kind, batches):
    """A batch poll takes exactly the entries single polls would, in order, across laps and owner wraps."""
    name, entry = kind
    mems = [memoryview(bytearray(4096)) for _ in range(2)]
    one, many = (CqEq(name, m, 24, doorbell()) for m in mems)
    devs = [Producer(m, entry) for m in mems]
    outstanding = 0
    for posted, take in batches:
        posted = min(posted, devs[0].cap - outstanding)  # a producer that never laps the consumer
        for dev in devs:
            for _ in range(posted):
                dev.post(0)
        outstanding += posted
        singles = []
        while len(singles) < take and (off := one.poll_offset()) is not None:
            singles.append(off)
        assert many.poll_many(take) == singles and many.next == one.next
        outstanding -= len(singles)


class _ReadLog:
    """A queue's memory that counts the bytes read through slices (`poll_many` reads owner bytes so)."""

    def __init__(self, mem):
        self.mem, self.sliced = mem, 0

    def __len__(self):
        return len(self.mem)

    def __getitem__(self, key):
        if isinstance(key, slice):
            self.sliced += len(range(*key.indices(len(self.mem))))
        return self.mem[key]


def test_poll_many_of_a_few_new_entries_reads_few_owner_bytes():
    """Each owner byte is a cache line of the queue: a poll that finds 3 new entries (or none) of 512 reads
    POLL_RUN of them, not the whole ring; a run of many is still taken in one call."""
    mem = _ReadLog(memoryview(bytearray(32768)))
    q = CqEq("cq", mem, 24, doorbell())
    dev = Producer(mem.mem, 64)
    for _ in range(3):
        dev.post(0)
    assert q.poll_many(512) == [0, 64, 128] and mem.sliced == POLL_RUN
    mem.sliced = 0
    assert q.poll_many(512) == [] and mem.sliced == POLL_RUN
    for _ in range(300):
        dev.post(0)
    assert len(q.poll_many(512)) == 300


def test_poll_many_detects_overflow_where_single_polls_do():
    mem = memoryview(bytearray(4096))
    q = CqEq("eq", mem, 24, doorbell())
    dev = Producer(mem, 16)
    for _ in range(dev.cap + 1):
        dev.post(0)
    with pytest.raises(QueueOverflow):
        q.poll_many(10)


def test_eq_overflow_is_detected_not_consumed():
    mem = memoryview(bytearray(4096))
    q = CqEq("eq", mem, 24, doorbell())
    dev = Producer(mem, 16)
    for _ in range(dev.cap + 1):  # the device laps the consumer
        dev.post(0)
    with pytest.raises(QueueOverflow):
        q.poll()


def test_cq_eq_doorbell_values_match_spec_examples():
    bar0 = Bar0Log()
    mem = memoryview(bytearray(4096))
    eq = CqEq("eq", mem, 24, doorbell(bar0))
    dev = Producer(mem, 16)
    for _ in range(11):
        dev.post(0)
    while eq.poll() is not None:
        pass
    eq.ack()
    eq.arm()
    assert bar0.writes == [(0x1FF8, 0x0000_010B_0000_0018, True), (0x1FF8, 0x8000_010B_0000_0018, True)]
    cq = CqEq("cq", memoryview(bytearray(4096)), 25, doorbell(bar0))
    cq.arm()
    assert bar0.writes[-1] == (0x1000 + DB_CQ, CqEqDoorbellValue(id=25, tail=64, arm=1).to_int(), True)
    assert eq.doorbell_offset == DB_EQ


def test_wq_write_wraps_and_doorbell_carries_free_running_tail():
    bar0 = Bar0Log()
    mem = memoryview(bytearray(4096))
    rq = Wq("rq", mem, 24, doorbell(bar0))
    rq.write(bytes(range(32)))
    rq.commit(num_rwqe=1)
    assert bar0.writes[-1] == (0x1400, 0x0000_0020_0100_0018, True)
    sq = Wq("sq", mem, 24, doorbell(bar0), head=4096 + 4064, tail=4064)
    sq.write(b"\xaa" * 64)  # 32 bytes at the end, 32 at the start
    assert bytes(mem[4064:]) == b"\xaa" * 32 and bytes(mem[:32]) == b"\xaa" * 32
    sq.commit(num_rwqe=300)  # truncated to 8 bits; SQs pass 0
    assert bar0.writes[-1][0] == 0x1000 + DB_SQ
    assert WqDoorbellValue.from_int(bar0.writes[-1][1]).tail == 4128
    assert rq.doorbell_offset == DB_RQ


def test_wq_counters_wrap_at_32_bits():
    rq = Wq("rq", memoryview(bytearray(4096)), 24, doorbell(), head=(2**32 - 32 + 4096) % 2**32, tail=2**32 - 32)
    assert rq.available == 4096
    rq.advance_tail(64)
    assert rq.tail == 32 and rq.in_flight == 64
    rq.advance_head(64)
    assert rq.available == 4096


def test_doorbell_page_id_must_exist():
    with pytest.raises(ValueError, match="not below the 1 doorbell pages"):
        DoorbellPage(Bar0Log(), 0x1000, 12, 1, 1)
