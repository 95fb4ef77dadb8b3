"""Guest traffic agent: one process per NIC that offers paced traffic on the guest channel and measures it.

The agent plays the guest of DESIGN §7: it pushes sequence-numbered, timestamped frames
(`make_frames`) into the NIC's guest->worker ring at a set rate and size and pops what comes back
on the worker->guest ring (the loopback backend returns each frame with its MACs swapped). It
runs across servicings untouched, so its records show exactly what the guest saw while the
worker was replaced: the blackout, and every frame that never came back.

Records are kept for the whole life of the process, compactly: the send time of seq N is
`sent_ns[N]` (seqs are consecutive from 0 and never reused, even across stop/start), arrivals are
three parallel arrays. Two guest senders (`start(..., backpressure=)`):

- non-blocking (default): a frame the full tx ring refuses still takes a seq, so it shows up as
  lost — counted by the ring's `dropped_full` and the agent's `tx_ring_full` — never silently.
- blocking (`backpressure=True`), as a Linux guest's netvsc + qdisc + blocking socket: while the tx
  ring is full, frames wait in a guest queue of TXQUEUELEN frames (sent, with their seq and send
  time; pushed in order as the ring drains), and while that queue is full too the sender is blocked
  and sends nothing. Frames its pacing owed meanwhile beyond its catch-up allowance are never sent:
  counted as `backpressured` (delayed by the guest stack, not lost). Frames still queued when the
  sender stops and the ring does not drain within STOP_FLUSH_S are discarded and counted lost
  (`guest_queue_purged`), as an interface reset purges its qdisc.

Control: a `vfkeep.rpc` socket (JSON lines, `{"id", "cmd", "args"}` -> `{"id", "ok", "result"|"error"}`);
command(args) -> result:

    start(rate, size, backpressure=False)    -> {rate, size, backpressure, first_seq}
    stop()                                   -> {sent}
    stats(since_ns|since_mark, until_ns|until_mark, settle_ms=0)
                                             -> TrafficStats.to_dict() fields, frames_lost, lost_tx_ring_full,
                                                lost_guest_queue, backpressured, window, settled, rings, agent
    timeline(bin_ms=10, <window as for stats>) -> {t0_ns, bin_ms, bins: [...], marks: [...]}
    mark(label, t_ns=now)                    -> {label, t_ns}
    marks()                                  -> {marks: [{label, t_ns}, ...]}
    status()                                 -> {running, rate, size, counters..., rings}
    quit()                                   -> {}, then the agent exits 0 (so does SIGTERM)

Any failure is an error reply and the agent carries on. Times are CLOCK_MONOTONIC
nanoseconds (`time.monotonic_ns()`), comparable across the processes of one machine, so the
host can mark servicing windows with its own clock.
"""
from __future__ import annotations

import argparse
import array
import bisect
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

from .. import rpc
from ..log import kv, setup
from ..memory.guest_memory import GuestMemory, MemoryLayout
from ..proc import READY_TIMEOUT_S, NotReady, freeze_heap, spawn_ready
from .ring import ChannelLayout, NicChannel, RingError
from .stats import MIN_FRAME, TrafficStats, parse_frames, percentile, windowed_delivery

log = logging.getLogger(__name__)

MAX_RATE = 1_000_000
#: Replies list at most this many lost seqs (the count is always exact).
MAX_LOST_SEQS = 1000
RX_BATCH = 512
#: Per wake-up the sender sends about this much time's worth of frames (Python cannot wake every 20 us).
BURST_NS = 2_000_000
#: Tokens saved up while the sender could not run are capped at this much time's worth of frames (and at
#: half the ring), so a scheduling hiccup does not turn into a burst that overflows the ring by itself.
MAX_CATCH_UP_NS = 10_000_000
#: The blocking sender's guest queue (frames), Linux's default `txqueuelen`.
TXQUEUELEN = 1000
#: How long `stop` lets the blocking sender's guest queue drain into the tx ring before purging it.
STOP_FLUSH_S = 2.0
#: How often the control server's loop looks for a shutdown request (bounds the exit latency).
CONTROL_POLL_S = 0.05

# Per-seq fate in `_status`.
_PENDING, _RECEIVED, _REFUSED, _PURGED = 0, 1, 2, 3
#: Frame size of `probe` (as the host's own probe).
PROBE_SIZE = 64


def guest_mac(nic: int) -> bytes:
    """Locally administered MAC of the guest's side of NIC `nic`."""
    return bytes((0x02, 0x00, 0x00, 0x00, nic & 0xFF, 0x01))


def peer_mac(nic: int) -> bytes:
    """Destination MAC of the agent's frames; the loopback backend swaps it back to `guest_mac`."""
    return bytes((0x02, 0x00, 0x00, 0x00, nic & 0xFF, 0x02))


class AgentError(Exception):
    """The agent could not be started (requests fail with `vfkeep.rpc` errors)."""


class TrafficAgent:
    """Sender thread, receiver thread and the records; the control server calls its public methods."""

    def __init__(self, channel: NicChannel):
        # Frames are built and checked as numpy blocks; imported here, as the host imports this module for the
        # client only and has no use for numpy.
        from .blocks import make_frame_block, parse_frame_block
        self._make_block, self._parse_block = make_frame_block, parse_frame_block
        self.channel = channel
        self.src, self.dst = guest_mac(channel.nic), peer_mac(channel.nic)
        self.max_size = min(channel.tx.max_frame, channel.rx.max_frame)
        self.rate = 0
        self.size = 0
        # Sent side: send time by seq, fate by seq. Appended by the sender under _tx_lock.
        self._sent_ns = array.array("q")
        self._status = bytearray()
        self._tx_lock = threading.Lock()
        # Receive side, in arrival order. Appended by the receiver under _rx_cond (notified per batch).
        self._rx_seq = array.array("q")
        self._rx_send_ns = array.array("q")
        self._rx_ns = array.array("q")
        self._rx_cond = threading.Condition()
        self.backpressure = False
        self.counters = {"tx_ring_full": 0, "pacing_shortfall": 0, "backpressured": 0, "guest_queue_purged": 0,
                         "rx_other": 0, "rx_bad": 0, "rx_unknown_seq": 0}
        # The blocking sender's guest queue: frames sent (seq and send time taken) that wait for tx ring room, as
        # blocks of frames of one size (`make_frame_block`), oldest first; `_queued` frames in all.
        self._queue: list = []
        self._queued = 0
        # When the blocked sender gave up frames (`backpressured`), and how many: for per-window counts.
        self._bp_ns = array.array("q")
        self._bp_count = array.array("q")
        self.errors: list[str] = []
        self.marks: list[tuple[str, int]] = []
        self._control_lock = threading.Lock()  # start/stop from concurrent control connections
        self._sender: threading.Thread | None = None
        self._halt = threading.Event()
        self._closing = threading.Event()
        self._receiver = threading.Thread(target=self._receive_loop, name="agent-rx", daemon=True)
        self._receiver.start()

    # -- sending -------------------------------------------------------------------------------
    def start(self, rate: Any, size: Any, backpressure: Any = False) -> dict:
        """Begin (or re-pace) traffic; seqs continue from where the last run stopped. `backpressure`: the
        blocking sender (module docstring), else the non-blocking one."""
        if not isinstance(rate, (int, float)) or isinstance(rate, bool) or not 0 < rate <= MAX_RATE:
            raise rpc.Refused(f"rate {rate!r} must be a number of frames/s in (0, {MAX_RATE}]")
        if not isinstance(size, int) or isinstance(size, bool) or not MIN_FRAME <= size <= self.max_size:
            raise rpc.Refused(f"size {size!r} must be an integer number of bytes in [{MIN_FRAME}, {self.max_size}] "
                             f"(the ring slot payload)")
        if not isinstance(backpressure, bool):
            raise rpc.Refused(f"backpressure {backpressure!r} must be true or false")
        with self._control_lock:
            previous = self.rate if self._sender is not None else 0  # re-paced: said, not silent
            self._stop_sender(flush=not backpressure)  # a re-paced blocking sender pushes the queue first
            self.rate, self.size, self.backpressure = rate, size, backpressure
            self._halt = threading.Event()
            self._sender = threading.Thread(target=self._send_loop, args=(rate, size, backpressure, self._halt),
                                            name="agent-tx", daemon=True)
            first_seq = len(self._sent_ns)
            self._sender.start()
        kv(log, logging.INFO, "traffic started", rate=rate, size=size, backpressure=backpressure, first_seq=first_seq)
        return {"rate": rate, "size": size, "backpressure": backpressure, "first_seq": first_seq,
                "previous_rate": previous}

    def stop(self) -> dict:
        with self._control_lock:
            was_running = self._stop_sender()
            self.rate = 0
        kv(log, logging.INFO, "traffic stopped", was_running=was_running, sent=len(self._sent_ns))
        return {"sent": len(self._sent_ns)}

    def probe(self, count: Any, timeout_s: Any = 2.0) -> dict:
        """`vfkeep probe` on this agent's NIC while its traffic is stopped (the agent holds the rings, which are
        single-producer/single-consumer): `count` frames pushed at once and awaited for `timeout_s`. They
        join the records as any frames sent."""
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            raise rpc.Refused(f"count {count!r} must be an integer >= 1")
        if not isinstance(timeout_s, (int, float)) or isinstance(timeout_s, bool) or timeout_s <= 0:
            raise rpc.Refused(f"timeout_s {timeout_s!r} must be a positive number of seconds")
        with self._control_lock:
            if self._sender is not None:
                raise rpc.Refused("traffic is running: `traffic stats` shows what comes back")
            with self._rx_cond:
                arrivals = len(self._rx_seq)
            first = len(self._sent_ns)
            self._send_burst(count, PROBE_SIZE, backpressure=False)
            sent = sum(1 for st in self._status[first:first + count] if st != _REFUSED)
            deadline = time.monotonic() + timeout_s
            with self._rx_cond:
                while (received := sum(1 for seq in self._rx_seq[arrivals:] if first <= seq < first + count)) < sent:
                    if not self._rx_cond.wait(max(0.0, deadline - time.monotonic())):
                        break
        kv(log, logging.INFO, "probe", sent=sent, received=received)
        return {"sent": sent, "received": received}

    def _stop_sender(self, flush: bool = True) -> bool:
        """Stop the sender thread; with `flush`, then let the guest queue drain (module docstring)."""
        if self._sender is None:
            return False
        self._halt.set()
        self._sender.join()
        self._sender = None
        if flush and self._queued:
            self._flush_queue()
        return True

    def _flush_queue(self) -> None:
        deadline = time.monotonic() + STOP_FLUSH_S
        while self._push_queued() and time.monotonic() < deadline and not self._closing.is_set():
            time.sleep(BURST_NS / 1e9)
        if self._queued:
            first = len(self._sent_ns) - self._queued  # the queue holds the newest seqs
            self._status[first:] = bytes([_PURGED]) * self._queued
            self.counters["guest_queue_purged"] += self._queued
            kv(log, logging.WARNING, "guest queue purged", frames=self._queued)
            self._queue, self._queued = [], 0

    def _push_queued(self) -> int:
        """Push what fits of the guest queue into the tx ring, in order; the frames still queued. Only this
        producer fills the ring, so everything offered within `free_slots` is accepted (nothing refused)."""
        tx = self.channel.tx
        while self._queue and tx.free_slots:
            block = self._queue[0]
            taken = tx.push_block(block[:tx.free_slots])
            self._queued -= taken
            if taken < len(block):
                self._queue[0] = block[taken:]
                break
            self._queue.pop(0)
        return self._queued

    def _send_loop(self, rate: float, size: int, backpressure: bool, halt: threading.Event) -> None:
        """Token bucket on the monotonic clock: wake about every BURST_NS, send what is due in one push.
        Tokens beyond the catch-up depth are given up: `backpressured` if the blocked sender could not send
        them, else `pacing_shortfall` (the sender was not scheduled in time)."""
        burst = max(1, round(rate * BURST_NS / 1e9))
        depth = max(burst, min(round(rate * MAX_CATCH_UP_NS / 1e9), self.channel.tx.slots // 2))
        tokens = float(burst)
        last = time.monotonic_ns()
        blocked = False
        try:
            while not halt.is_set():
                now = time.monotonic_ns()
                tokens += (now - last) * rate / 1e9
                last = now
                if tokens > depth:
                    excess = int(tokens - depth)
                    if blocked:
                        self.counters["backpressured"] += excess
                        self._bp_ns.append(now)
                        self._bp_count.append(excess)
                    else:
                        self.counters["pacing_shortfall"] += excess
                    tokens -= excess
                n = int(tokens)
                if n or self._queued:
                    sent = self._send_burst(n, size, backpressure)
                    tokens -= sent
                    blocked = sent < n
                if blocked or self._queued:
                    halt.wait(BURST_NS / 1e9)  # poll for ring room (the relay does not signal it)
                elif tokens < burst:
                    halt.wait((burst - tokens) / rate)
        except Exception as e:  # a dead sender must show in status/stats, not only on stderr
            self._fail("sender", e)

    def _send_burst(self, n: int, size: int, backpressure: bool) -> int:
        """One push of up to `n` new frames, published together, so they carry one send time; returns how many
        were sent. The blocking sender pushes its guest queue first and sends only what the ring and the queue
        have room for; the non-blocking one sends all `n` and the ring refuses what does not fit."""
        if backpressure:
            queued = self._push_queued()
            n = min(n, self.channel.tx.free_slots + TXQUEUELEN - queued)
            if n <= 0:
                return 0
        seq = len(self._sent_ns)
        t = time.monotonic_ns()
        frames = self._make_block(seq, n, size, t, self.src, self.dst)
        with self._tx_lock:  # records first: a frame may come back before push_many returns
            self._sent_ns.extend(array.array("q", (t,)) * n)
            self._status.extend(bytes(n))
        if backpressure:
            self._queue.append(frames)
            self._queued += n
            self._push_queued()
            return n
        accepted = self.channel.tx.push_block(frames)
        if accepted < n:
            self._status[seq + accepted:seq + n] = bytes([_REFUSED]) * (n - accepted)
            self.counters["tx_ring_full"] += n - accepted
        return n

    # -- receiving -----------------------------------------------------------------------------
    def _receive_loop(self) -> None:
        rx = self.channel.rx
        try:
            while not self._closing.is_set():
                # parsed in place in the ring's slots (no copy), then released
                blocks = rx.peek_blocks(RX_BATCH)
                if not blocks:
                    rx.doorbell.wait(None)  # close() rings it to end the loop
                    continue
                now = time.monotonic_ns()
                for rows, lengths in blocks:
                    self._record_arrivals(rows, lengths, now)
                rx.release_count(sum(len(lengths) for _, lengths in blocks),
                                 sum(sum(lengths) for _, lengths in blocks))
        except Exception as e:  # a dead receiver must show in status/stats, not only on stderr
            self._fail("receiver", e)

    def _record_arrivals(self, rows, lengths: list[int], now: int) -> None:
        """Record a run of received frames, the rows of `rows` (ring slots) of `lengths` bytes: a run of our frames
        of one size is parsed as one block, anything else frame by frame."""
        size = lengths[0]
        parsed = self._parse_block(rows[:, :size], size) if lengths.count(size) == len(lengths) else None
        if parsed is not None:
            (seqs, sends), other, bad = parsed, 0, []
        else:
            seqs, sends, other, bad = parse_frames([memoryview(row[:n]) for row, n in zip(rows, lengths)])
        self.counters["rx_other"] += other
        self.counters["rx_bad"] += len(bad)
        for e in bad:
            kv(log, logging.WARNING, "damaged frame received", error=e)
        status = self._status
        with self._rx_cond:
            first = seqs[0] if seqs else 0
            if 0 <= first and first + len(seqs) <= len(status) and seqs == list(range(first, first + len(seqs))):
                status[first:first + len(seqs)] = bytes((_RECEIVED,)) * len(seqs)  # the usual batch: one slice
            else:
                for seq in seqs:
                    if 0 <= seq < len(status):
                        status[seq] = _RECEIVED
                    else:
                        self.counters["rx_unknown_seq"] += 1
            self._rx_seq.extend(seqs)
            self._rx_send_ns.extend(sends)
            self._rx_ns.extend([now] * len(seqs))
            self._rx_cond.notify_all()

    def _fail(self, who: str, e: Exception) -> None:
        self.errors.append(f"{who}: {e}")
        kv(log, logging.ERROR, "traffic thread failed", thread=who, error=e)

    # -- marks and windows ---------------------------------------------------------------------
    def mark(self, label: Any, t_ns: Any = None) -> dict:
        if not isinstance(label, str) or not label:
            raise rpc.Refused(f"mark label {label!r} must be a non-empty string")
        if t_ns is None:
            t_ns = time.monotonic_ns()
        elif not isinstance(t_ns, int) or isinstance(t_ns, bool) or t_ns < 0:
            raise rpc.Refused(f"mark time {t_ns!r} must be CLOCK_MONOTONIC nanoseconds")
        self.marks.append((label, t_ns))
        kv(log, logging.INFO, "mark", label=label, t_ns=t_ns)
        return {"label": label, "t_ns": t_ns}

    def _mark_time(self, label: Any) -> int:
        for name, t in reversed(self.marks):
            if name == label:
                return t
        raise rpc.Refused(f"no mark named {label!r} (marks: {sorted({m for m, _ in self.marks})})")

    def _window_bound(self, args: dict, edge: str) -> int | None:
        ns, label = args.get(f"{edge}_ns"), args.get(f"{edge}_mark")
        if ns is not None and label is not None:
            raise rpc.Refused(f"give {edge}_ns or {edge}_mark, not both")
        if label is not None:
            return self._mark_time(label)
        if ns is not None and (not isinstance(ns, int) or isinstance(ns, bool)):
            raise rpc.Refused(f"{edge}_ns {ns!r} must be CLOCK_MONOTONIC nanoseconds")
        return ns

    def _window(self, args: dict) -> tuple[int, int, int, int, bool]:
        """(since_ns, until_ns, first seq, end seq, settled) of the frames sent in the window.

        The window ends no later than now. With settle_ms, waits that long at most for frames of
        the window that are still in flight; frames the tx ring refused are known lost and not waited for.
        """
        since = self._window_bound(args, "since")
        until = self._window_bound(args, "until")
        settle_ms = args.get("settle_ms", 0)
        if not isinstance(settle_ms, (int, float)) or isinstance(settle_ms, bool) or not 0 <= settle_ms <= 60_000:
            raise rpc.Refused(f"settle_ms {settle_ms!r} must be a number of milliseconds in [0, 60000]")
        now = time.monotonic_ns()
        since = 0 if since is None else since
        until = now if until is None else min(until, now)
        with self._tx_lock:
            lo = bisect.bisect_left(self._sent_ns, since)
            hi = bisect.bisect_right(self._sent_ns, until)
        status = self._status
        pos = lo

        def settled() -> bool:
            nonlocal pos
            found = status.find(_PENDING, pos, hi)
            pos = hi if found < 0 else found
            return found < 0

        with self._rx_cond:
            done = self._rx_cond.wait_for(settled, timeout=settle_ms / 1000)
        return since, until, lo, max(lo, hi), done

    def _backpressured(self, since: int, until: int) -> int:
        """Frames the blocked sender gave up between `since` and `until` (delayed by the guest, never sent)."""
        lo, hi = bisect.bisect_left(self._bp_ns, since), bisect.bisect_right(self._bp_ns, until)
        return sum(self._bp_count[lo:hi])

    def _records(self, lo: int, hi: int) -> tuple[list, list]:
        """(seq, send_ns) for seqs [lo, hi) and every arrival of those seqs, in arrival order."""
        sent_ns = self._sent_ns
        sent = [(seq, sent_ns[seq]) for seq in range(lo, hi)]
        with self._rx_cond:
            n = len(self._rx_ns)
            # An arrival of a frame sent at or after since cannot be earlier than since.
            start = bisect.bisect_left(self._rx_ns, sent_ns[lo], 0, n) if lo < hi else n
            received = [(s, t, r) for s, t, r in zip(self._rx_seq[start:n], self._rx_send_ns[start:n],
                                                     self._rx_ns[start:n]) if lo <= s < hi]
        return sent, received

    def stats(self, since_ns: Any = None, until_ns: Any = None, since_mark: Any = None, until_mark: Any = None,
              settle_ms: Any = 0) -> dict:
        since, until, lo, hi, settled = self._window({"since_ns": since_ns, "until_ns": until_ns,
                                                      "since_mark": since_mark, "until_mark": until_mark,
                                                      "settle_ms": settle_ms})
        st = TrafficStats.from_records(*self._records(lo, hi))
        out = st.to_dict()
        out["lost_seqs_truncated"] = len(out["lost_seqs"]) > MAX_LOST_SEQS
        out["lost_seqs"] = out["lost_seqs"][:MAX_LOST_SEQS]
        out.update({
            "frames_lost": st.lost,
            "lost_tx_ring_full": self._status.count(_REFUSED, lo, hi),
            "lost_guest_queue": self._status.count(_PURGED, lo, hi),
            "backpressured": self._backpressured(since, until),
            "blackout_start_ns": st.blackout_start_ns, "blackout_end_ns": st.blackout_end_ns,
            "window": {"since_ns": since, "until_ns": until, "first_seq": lo, "end_seq": hi},
            "settled": settled,
            "rings": self.rings(),
            "agent": self.status(),
        })
        return out

    def timeline(self, bin_ms: Any = 10, since_ns: Any = None, until_ns: Any = None, since_mark: Any = None,
                 until_mark: Any = None, settle_ms: Any = 0) -> dict:
        """Delivery per bin (windowed_delivery) plus the RTT of the frames sent in each bin, for plots."""
        if not isinstance(bin_ms, (int, float)) or isinstance(bin_ms, bool) or bin_ms <= 0:
            raise rpc.Refused(f"bin_ms {bin_ms!r} must be a positive number of milliseconds")
        since, until, lo, hi, _ = self._window({"since_ns": since_ns, "until_ns": until_ns, "since_mark": since_mark,
                                                "until_mark": until_mark, "settle_ms": settle_ms})
        st = TrafficStats.from_records(*self._records(lo, hi))
        if not st.timeline:
            return {"t0_ns": None, "bin_ms": bin_ms, "bins": [], "marks": self.marks_list()}
        t0 = st.timeline[0].send_ns
        bins = windowed_delivery(st.timeline, bin_ms)
        width = bin_ms * 1e6
        rtts: list[list[int]] = [[] for _ in bins]
        for r in st.timeline:
            if r.recv_ns is not None:
                rtts[int((r.send_ns - t0) // width)].append(r.recv_ns - r.send_ns)
        out = []
        for b, rtt in zip(bins, rtts):
            rtt.sort()
            out.append({"start_ms": b.start_ms, "sent": b.sent, "delivered": b.delivered, "lost": b.lost,
                        "rtt_p50_ms": _ms(percentile(rtt, 50)), "rtt_max_ms": _ms(rtt[-1] if rtt else None)})
        marks = [dict(m, t_ms=(m["t_ns"] - t0) / 1e6) for m in self.marks_list()]
        return {"t0_ns": t0, "bin_ms": bin_ms, "bins": out, "marks": marks}

    def marks_list(self) -> list[dict]:
        return [{"label": label, "t_ns": t} for label, t in self.marks]

    def rings(self) -> dict:
        return {"tx": self.channel.tx.stats().to_dict(), "rx": self.channel.rx.stats().to_dict()}

    def status(self) -> dict:
        running = self._sender is not None and self._sender.is_alive()
        return {"running": running, "rate": self.rate, "size": self.size, "backpressure": self.backpressure,
                "guest_queue": self._queued, "sent": len(self._sent_ns), "received": len(self._rx_ns), **self.counters,
                "errors": list(self.errors)}

    def close(self) -> None:
        """Stop both threads; the caller closes the channel and memory afterwards."""
        with self._control_lock:
            self._stop_sender(flush=False)
        self._closing.set()
        self.channel.rx.doorbell.ring()
        self._receiver.join()


def _ms(ns: int | None) -> float | None:
    return None if ns is None else ns / 1e6


# -- control server ----------------------------------------------------------------------------
def control_server(path: str, agent: TrafficAgent, quitting: threading.Event) -> rpc.ThreadedServer:
    """The agent's `vfkeep.rpc` socket; a thread per connection, so a slow `stats` does not block a `mark`.
    `quit` sets `quitting` (so does the signal handler); main() waits on it."""

    def quit_() -> dict:
        kv(log, logging.INFO, "quit requested")
        quitting.set()
        return {}

    commands = {"start": agent.start, "stop": agent.stop, "probe": agent.probe, "stats": agent.stats,
                "timeline": agent.timeline,
                "mark": agent.mark, "marks": lambda: {"marks": agent.marks_list()},
                "status": lambda: dict(agent.status(), rings=agent.rings()), "quit": quit_}
    return rpc.ThreadedServer(path, rpc.Dispatcher(log, commands), name="agent-control")


# -- client --------------------------------------------------------------------------------------
class AgentClient:
    """Client of one agent's control socket (one connection, requests in turn); `vfkeep.rpc` errors."""

    def __init__(self, path: str, timeout: float = 30.0):
        self.path = path
        self._rpc = rpc.RpcClient(path, timeout)

    def call(self, cmd: str, **args: Any) -> dict:
        """One request (arguments that are None are left out); its result."""
        return self._rpc.call(cmd, {k: v for k, v in args.items() if v is not None})

    def start(self, rate: float, size: int = 128, backpressure: bool = False) -> dict:
        return self.call("start", rate=rate, size=size, backpressure=backpressure)

    def stop(self) -> dict:
        return self.call("stop")

    def stats(self, since_ns: int | None = None, until_ns: int | None = None, *, since_mark: str | None = None,
              until_mark: str | None = None, settle_ms: float = 0) -> dict:
        return self.call("stats", since_ns=since_ns, until_ns=until_ns, since_mark=since_mark,
                         until_mark=until_mark, settle_ms=settle_ms)

    def timeline(self, bin_ms: float = 10, since_ns: int | None = None, until_ns: int | None = None, *,
                 since_mark: str | None = None, until_mark: str | None = None, settle_ms: float = 0) -> dict:
        return self.call("timeline", bin_ms=bin_ms, since_ns=since_ns, until_ns=until_ns, since_mark=since_mark,
                         until_mark=until_mark, settle_ms=settle_ms)

    def mark(self, label: str, t_ns: int | None = None) -> int:
        return self.call("mark", label=label, t_ns=t_ns)["t_ns"]

    def marks(self) -> list[dict]:
        return self.call("marks")["marks"]

    def status(self) -> dict:
        return self.call("status")

    def quit(self) -> None:
        self.call("quit")

    def close(self) -> None:
        self._rpc.close()

    def __enter__(self) -> "AgentClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# -- process -------------------------------------------------------------------------------------
def spawn_agent(mem: GuestMemory | int, mem_layout: MemoryLayout, channel_layout: ChannelLayout, nic: int,
                tx_fd: int, rx_fd: int, control_path: str, run_dir: str | None = None,
                ready_timeout: float = READY_TIMEOUT_S) -> subprocess.Popen:
    """Start the agent for NIC `nic` (it dies with the caller) and return once its control socket listens.

    The agent reports readiness on a pipe, so there is no window in which the socket path does not
    answer yet; if it dies first, AgentError carries its exit status.
    """
    mem_fd = mem.fd if isinstance(mem, GuestMemory) else mem
    argv = [sys.executable, "-m", "vfkeep.guest.agent", "--memfd", str(mem_fd), "--layout", mem_layout.to_str(),
            "--channel", channel_layout.to_str(), "--nic", str(nic), "--tx-fd", str(tx_fd), "--rx-fd", str(rx_fd),
            "--control", control_path]
    if run_dir is not None:
        argv += ["--run-dir", str(run_dir)]
    try:
        return spawn_ready(argv, pass_fds=(mem_fd, tx_fd, rx_fd), timeout=ready_timeout)
    except NotReady as e:
        if e.returncode is None:
            raise AgentError(f"traffic agent for nic {nic} not ready within {ready_timeout}s") from None
        raise AgentError(f"traffic agent for nic {nic} exited with status {e.returncode} before listening"
                         + (f" (see {run_dir}/guest-agent-{nic}.log)" if run_dir else "")) from None

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vfkeep.guest.agent", description=__doc__.split("\n")[0])
    p.add_argument("--memfd", type=int, required=True, help="inherited guest memory file descriptor")
    p.add_argument("--layout", required=True, help="MemoryLayout string (guest=N,worker=N,pool=N)")
    p.add_argument("--channel", required=True, help="ChannelLayout string (nics=N,slots=N,slot_size=N,base=GPA)")
    p.add_argument("--nic", type=int, required=True)
    p.add_argument("--tx-fd", type=int, required=True, help="guest->worker doorbell eventfd")
    p.add_argument("--rx-fd", type=int, required=True, help="worker->guest doorbell eventfd")
    p.add_argument("--control", required=True, help="UNIX socket path to serve")
    p.add_argument("--run-dir", help="log to <run-dir>/guest-agent-<nic>.log (default: stderr)")
    p.add_argument("--ready-fd", type=int, help="write 'ready' here once the control socket listens, then close it")
    args = p.parse_args(argv)

    setup(f"guest-agent-{args.nic}", args.run_dir)
    quit_event = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: quit_event.set())

    try:
        mem = GuestMemory.attach(args.memfd, MemoryLayout.from_str(args.layout))
        os.close(args.memfd)  # attach keeps its own duplicate
        channel = NicChannel.attach(mem, ChannelLayout.from_str(args.channel), args.nic, args.tx_fd, args.rx_fd)
    except (OSError, ValueError, RingError) as e:
        kv(log, logging.ERROR, "cannot attach to the guest channel", nic=args.nic, error=repr(e))
        return 2
    agent = TrafficAgent(channel)
    freeze_heap()  # (its threads start with the first `start`)
    server = control_server(args.control, agent, quit_event)
    server.start(poll_interval=CONTROL_POLL_S)
    kv(log, logging.INFO, "traffic agent ready", nic=args.nic, control=args.control, pid=os.getpid(),
       max_frame=agent.max_size)
    if args.ready_fd is not None:
        os.write(args.ready_fd, b"ready\n")
        os.close(args.ready_fd)

    quit_event.wait()  # a `quit` request or SIGTERM/SIGINT
    server.close()
    agent.close()
    channel.close()
    mem.close()
    kv(log, logging.INFO, "traffic agent exited", **{k: v for k, v in agent.status().items() if k != "errors"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
