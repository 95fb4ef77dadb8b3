"""Guest disk IO engine (issue 13 item 4): verifiable reads and writes on a block channel, measured.

Requests go out at a set rate (0 = as fast as the queue depth allows) with up to `qd` in flight, each on
its own `io_blocks`-block chunk of the disk (never two at once on one chunk) and its own buffer slot in
the channel's data area. Every block written carries its LBA, a generation and a CRC
(`disk_blocks.make_block`); every read checks that each block holds exactly the generation the last
completed write of its chunk put there. Counted: completions, errors (non-zero status), verification
failures, completions for no outstanding request (a duplicate) — and, from the timestamps, IOPS,
latency percentiles and the IO blackout: the longest time with IO outstanding and nothing completing.
Times are CLOCK_MONOTONIC ns, comparable with the host's servicing marks.

`requeue(popped_before)`: a worker died with requests it had taken from the ring (popped: ring sequence
below `popped_before`) and no saved state reached its successor; once every completion it pushed has been
taken, those still outstanding are pushed again (same tag, same buffer), as a guest re-issues IO after a
controller reset.
"""
from __future__ import annotations

import collections
import logging
import queue
import random
import threading
import time

from ..log import kv
from .block import COMPLETION, OP_READ, OP_WRITE, BlockChannel, Request
from .disk_blocks import BadBlock, check_block, make_blocks

log = logging.getLogger("vfkeep.guest.disk_io")

#: Bad blocks kept (and logged one by one); the counter counts them all.
BAD_BLOCKS_KEPT = 100
#: Completions kept for windowed statistics (about 10 minutes at 5,000 IOPS).
DONE_KEPT = 3_000_000
#: Stretches without a completion shorter than this are not recorded (the blackout's resolution).
GAP_NS = 1_000_000


class DiskIo:
    def __init__(self, channel: BlockChannel, mem, *, lbas: int, block_size: int = 512, io_blocks: int = 8,
                 seed: int = 0):
        self.channel, self.mem = channel, mem
        self.block_size, self.io_blocks = block_size, io_blocks
        self.io_bytes = block_size * io_blocks
        self.chunks = lbas // io_blocks
        self.max_qd = min(channel.data_bytes // self.io_bytes, channel.requests.slots - 1,
                          channel.completions.slots - 1)
        if self.chunks < 1 or self.max_qd < 1:
            raise ValueError(f"{lbas} blocks / a {channel.data_bytes}-byte data area leave no room for "
                             f"{io_blocks}-block IO")
        self.rng = random.Random(seed)
        self.cv = threading.Condition()
        self.expected: dict[int, int] = {}  # chunk -> generation of its last completed write
        self.busy: set[int] = set()
        self.free_slots = list(range(self.max_qd))
        self.inflight: dict[int, list] = {}  # tag -> [op, chunk, generation, slot, submit ns, ring sequence]
        self.next_tag = 1
        self.done = collections.deque(maxlen=DONE_KEPT)  # (completion ns, latency ns, op)
        self.gaps: list[tuple[int, int]] = []  # (start, end ns): IO outstanding and none completing, > GAP_NS
        self._progress_ns = 0
        self.counters = {"submitted": 0, "completed": 0, "errors": 0, "verify_errors": 0, "duplicates": 0,
                         "ring_full": 0, "requeued": 0}
        self._producer = threading.Lock()  # the request ring has one producer at a time (submitter, requeue)
        self._requeues: queue.Queue = queue.Queue()
        self.bad_blocks: list[str] = []
        self._qd = 0
        self._stop = threading.Event()
        self._closing = False
        self._submitter: threading.Thread | None = None
        self._completer = threading.Thread(target=self._complete_loop, name="disk-io-completions", daemon=True)
        self._completer.start()

    # -- control ----------------------------------------------------------------------------------
    def start(self, rate: float = 0, qd: int = 8, read_pct: int = 50) -> dict:
        if not 1 <= qd <= self.max_qd:
            raise ValueError(f"qd {qd} is not in 1..{self.max_qd}")
        if not 0 <= read_pct <= 100 or rate < 0:
            raise ValueError(f"read_pct {read_pct} / rate {rate} out of range")
        self.stop()
        self._stop.clear()
        self._qd = qd
        self._submitter = threading.Thread(target=self._submit_loop, args=(float(rate), qd, read_pct),
                                           name="disk-io-submit", daemon=True)
        self._submitter.start()
        return {"rate": rate, "qd": qd, "read_pct": read_pct}

    @property
    def running(self) -> bool:
        return self._submitter is not None

    def stop(self) -> dict:
        """Stop submitting; requests in flight still complete."""
        self._stop.set()
        if self._submitter is not None:
            with self.cv:
                self.cv.notify_all()
            self._submitter.join(5)
            self._submitter = None
        return {"submitted": self.counters["submitted"]}

    def wait_idle(self, timeout: float) -> bool:
        with self.cv:
            return self.cv.wait_for(lambda: not self.inflight, timeout)

    def verify_all(self, qd: int = 8, timeout: float = 60.0) -> int:
        """Read back every chunk ever written (reads check the blocks as usual); the number read. TimeoutError
        when reads are still outstanding after `timeout` (the check did not finish)."""
        self.stop()
        chunks = sorted(self.expected)
        for chunk in chunks:
            slot = self._take(chunk, timeout)
            self._submit(OP_READ, chunk, slot)
        if not self.wait_idle(timeout):
            raise TimeoutError(f"verify: {len(self.inflight)} reads still outstanding after {timeout:g} s")
        return len(chunks)

    # -- submission ---------------------------------------------------------------------------------
    def _take(self, chunk: int, timeout: float) -> int:
        with self.cv:
            if not self.cv.wait_for(lambda: self.free_slots and chunk not in self.busy, timeout):
                raise TimeoutError(f"no buffer slot free for chunk {chunk} within {timeout} s")
            self.busy.add(chunk)
            return self.free_slots.pop()

    def _submit(self, op: int, chunk: int, slot: int) -> None:
        gpa = self.channel.data_gpa + slot * self.io_bytes
        lba = chunk * self.io_blocks
        with self.cv:
            generation = self.expected.get(chunk, 0) + (op == OP_WRITE)
            tag, self.next_tag = self.next_tag, self.next_tag + 1
        if op == OP_WRITE:
            self.mem.write(gpa, make_blocks(lba, self.io_blocks, generation, self.block_size))
        now = time.monotonic_ns()
        with self._producer:
            with self.cv:
                if not self.inflight:
                    self._progress_ns = now
                self.inflight[tag] = [op, chunk, generation, slot, now, self.channel.requests.stats().tail]
                self.counters["submitted"] += 1
            if not self.channel.requests.push(Request(tag, op, self.io_blocks, lba, gpa).pack()):
                with self.cv:  # cannot happen while qd < ring slots; counted, never silent
                    self.counters["ring_full"] += 1
                    self._release(tag)

    def _submit_loop(self, rate: float, qd: int, read_pct: int) -> None:
        interval = 1 / rate if rate else 0.0
        next_t = time.monotonic()
        while not self._stop.is_set():
            with self.cv:
                if not self.cv.wait_for(lambda: self._stop.is_set() or
                                        (len(self.inflight) < qd and self.free_slots), 1.0):
                    continue
                if self._stop.is_set():
                    return
                chunk = self.rng.randrange(self.chunks)
                while chunk in self.busy:
                    chunk = self.rng.randrange(self.chunks)
                op = OP_READ if chunk in self.expected and self.rng.randrange(100) < read_pct else OP_WRITE
                self.busy.add(chunk)
                slot = self.free_slots.pop()
            self._submit(op, chunk, slot)
            if interval:
                next_t += interval
                delay = next_t - time.monotonic()
                if delay > 0:
                    self._stop.wait(delay)
                else:
                    next_t = max(next_t, time.monotonic() - 0.01)  # make up at most 10 ms of lost time

    # -- completion ---------------------------------------------------------------------------------
    def _release(self, tag: int) -> tuple:
        entry = self.inflight.pop(tag)
        self.busy.discard(entry[1])
        self.free_slots.append(entry[3])
        self.cv.notify_all()
        return entry

    def requeue(self, popped_before: int, timeout: float = 10.0) -> int:
        """Re-push the outstanding requests a dead worker had popped (ring sequence < `popped_before`), after
        the completions it pushed are taken (the completion thread does it); returns how many."""
        done, out = threading.Event(), []
        self._requeues.put((popped_before, done, out))
        if not done.wait(timeout):
            raise TimeoutError(f"requeue not done within {timeout} s")
        return out[0]

    def _requeue(self, popped_before: int) -> int:
        with self._producer:
            with self.cv:
                lost = sorted((e[5], tag) for tag, e in self.inflight.items() if e[5] < popped_before)
            for _, tag in lost:
                with self.cv:
                    e = self.inflight[tag]
                    e[5] = self.channel.requests.stats().tail
                req = Request(tag, e[0], self.io_blocks, e[1] * self.io_blocks,
                              self.channel.data_gpa + e[3] * self.io_bytes)
                if not self.channel.requests.push(req.pack()):
                    with self.cv:
                        self.counters["ring_full"] += 1
                        self._release(tag)
            with self.cv:
                self.counters["requeued"] += len(lost)
        return len(lost)

    def _complete_loop(self) -> None:
        ring = self.channel.completions
        while not self._closing:
            if ring.wait(0.2):
                for raw in ring.pop_many(256):
                    tag, status = COMPLETION.unpack(raw)
                    self._completed(tag, status, time.monotonic_ns())
                if len(ring):
                    continue
            while not self._requeues.empty():  # every completion pushed so far is taken
                popped_before, done, out = self._requeues.get_nowait()
                out.append(self._requeue(popped_before))
                done.set()

    def _completed(self, tag: int, status: int, now: int) -> None:
        with self.cv:
            if tag not in self.inflight:
                self.counters["duplicates"] += 1
                return
            op, chunk, generation, slot, t0 = self.inflight[tag][:5]
            if now - self._progress_ns > GAP_NS:
                self.gaps.append((self._progress_ns, now))
            self._progress_ns = now
            self.counters["completed"] += 1
            self.done.append((now, now - t0, op))
            if status:
                self.counters["errors"] += 1
            elif op == OP_WRITE:
                self.expected[chunk] = generation
            else:
                self._verify(chunk, generation, slot)
            self._release(tag)

    def _verify(self, chunk: int, generation: int, slot: int) -> None:
        view = self.mem.view(self.channel.data_gpa + slot * self.io_bytes, self.io_bytes)
        for i in range(self.io_blocks):
            lba = chunk * self.io_blocks + i
            try:
                got = check_block(view[i * self.block_size:(i + 1) * self.block_size], lba)
            except BadBlock as e:
                got, why = None, str(e)
            else:
                why = f"lba {lba}: generation {got}, expected {generation}"
            if got != generation:
                self.counters["verify_errors"] += 1
                if len(self.bad_blocks) < BAD_BLOCKS_KEPT:
                    self.bad_blocks.append(why)
                    kv(log, logging.ERROR, "block verification failed", lba=lba, chunk=chunk, detail=why)

    # -- statistics ---------------------------------------------------------------------------------
    def stats(self, since_ns: int | None = None, until_ns: int | None = None) -> dict:
        """Counters for the whole run; IOPS (completions over [since, until]), latency percentiles and the
        blackout of [since, until]."""
        now = time.monotonic_ns()
        lo, hi = since_ns or 0, min(until_ns or now, now)
        with self.cv:
            done = [d for d in self.done if lo <= d[0] <= hi]
            gaps = list(self.gaps)
            if self.inflight:
                gaps.append((self._progress_ns, now))  # IO outstanding right now, nothing completed since
            outstanding = len(self.inflight)
            counters = dict(self.counters)
        overlap = [(max(a, lo), min(b, hi)) for a, b in gaps if b > lo and a < hi]
        longest = max(overlap, key=lambda g: g[1] - g[0], default=None)
        lat = sorted(d[1] for d in done)

        def pct(p: float) -> float | None:
            return round(lat[min(len(lat) - 1, int(p * len(lat)))] / 1e6, 3) if lat else None

        # Over the window asked for (a burst after a servicing is not a rate); the whole run from its first IO.
        span = (hi - (lo if since_ns else min(d[0] for d in done))) / 1e9 if done else 0
        return {**counters, "outstanding": outstanding, "window_completions": len(done),
                "iops": round(len(done) / span) if span else None,
                "latency_ms": {"p50": pct(0.5), "p99": pct(0.99), "max": pct(1.0)},
                "io_blackout_ms": round((longest[1] - longest[0]) / 1e6, 3) if longest else 0.0,
                "blackout_start_ns": longest[0] if longest else None, "blackout_end_ns": longest[1] if longest else None,
                "chunks_written": len(self.expected), "bad_blocks": self.bad_blocks[:20]}

    def close(self) -> None:
        self.stop()
        self._closing = True
        self._completer.join(5)
