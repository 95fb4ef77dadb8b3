"""Net relay: guest tx ring -> vport data path send, receive -> guest rx ring, one thread per NIC.

The rings and their counters live in guest memory, so a relay started by the next worker continues
exactly where this one stopped. Frames are taken from the tx ring only when the vport has a free
TX buffer for them, so stopping for servicing never strands a popped frame, and only once copied
into it, before the SQ doorbell, so a worker killed meanwhile never sends one twice; every frame
that is dropped anyway is counted.
"""
from __future__ import annotations

import logging
import os
import queue
import select
import threading
import time
from dataclasses import asdict, dataclass

from ..driver.errors import DEVICE_ERRORS, BadFrame, DeviceMissing
from ..driver.datapath import VportDataPath
from ..guest.ring import NicChannel, RingError
from ..log import kv, kv_at

log = logging.getLogger("vfkeep.worker.relay")

#: Frames per vport call (one receive batch, one send batch; one doorbell each). Half the relay vport's TX
#: buffers: the device works on one batch while the relay fills the next.
BATCH = 256
DRAIN_MAX_BATCHES = 64
IDLE_WAIT_MS = 1000
#: A relay's first send takes at most this many of the guest's frames (the oldest), alone: the relay then waits
#: for the device's answer (MODERATION_MS at most) and hands those frames back before it copies the rest of the
#: backlog the guest queued while no relay ran, so the guest's first frames back (its blackout end) wait neither
#: for the whole backlog's transmit and receive nor for the copy of the rest. At least the device's block size
#: (8 frames, `device.vport._MIN_BLOCK`).
FIRST_BATCH = 16
#: After moving frames, how long the relay waits for more guest frames before it arms the vport's queues and
#: sleeps: a frame from the wire meanwhile waits at most this long (a received loopback frame is announced by
#: the arms sent with its send).
MODERATION_MS = 1
#: A relay's first frames back to the guest (its blackout end) go alone: the relay sends nothing more (the rest of
#: the backlog, which would keep it and the device busy) and sets `resumed` (which starts the rest of the worker's
#: start) only once the guest has taken them, at most this long after handing them over, looking every
#: GUEST_LOOK_S. On two CPUs a relay and a device that go on working had the woken guest wait for one of them,
#: up to a millisecond.
GUEST_TAKE_WAIT_S = 0.002
GUEST_LOOK_S = 50e-6


@dataclass
class RelayStats:
    tx_frames: int = 0         # guest -> vport
    rx_frames: int = 0         # vport -> guest
    rx_dropped_ring_full: int = 0
    rx_dropped_too_big: int = 0
    tx_dropped_bad_frame: int = 0
    tx_stranded: int = 0       # sent into a vport whose device lost it (abandon): never completed
    wakeups: int = 0


class RelayThread:
    """A relay's thread, started before its relay exists (`ManaKind.prepare`, before the saved state arrives): a
    thread start — the clone, its first scheduling, the starter waiting for it to run — is then not in a restore's
    window. `NetRelay.start(thread)` hands it the relay's loop; `cancel()` ends one no relay took."""

    def __init__(self, name: str):
        self._work: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._main, name=name, daemon=True)
        self.thread.start()

    def run(self, target) -> None:
        self._work.put(target)

    def cancel(self) -> None:
        self._work.put(None)

    def _main(self) -> None:
        target = self._work.get()
        if target is not None:
            target()


class NetRelay:
    def __init__(self, channel: NicChannel, datapath: VportDataPath, pci_id: str, stats: RelayStats | None = None):
        self.channel = channel
        self.datapath = datapath
        self.pci_id = pci_id
        self.stats = RelayStats() if stats is None else stats  # a NIC's relays after a re-creation count on
        self.error: str | None = None
        self.device_missing = False
        #: Stopped by a device error other than DeviceMissing (a hung send queue, an overflowed queue): the vport
        #: is unusable, and the NIC resets the function (VfManager._relay_failed).
        self.device_failed = False
        self._stop_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._stopping = False
        self._last_batch = False
        self._stop_lock = threading.Lock()
        #: Set once the guest has taken the first received frames this relay handed it (`GUEST_TAKE_WAIT_S` at most
        #: after handing them over), or the relay has nothing to do (it goes to sleep idle with no send
        #: outstanding), or has ended: the data path is back, so work that would compete with it for the CPU (a
        #: deferred HWC probe, the rest of the worker's start) may start. Sends outstanding
        #: when it goes idle (the device has not answered within MODERATION_MS) do not count: their frames are
        #: the guest's blackout end; whoever waits uses a timeout for a device that never answers.
        self.resumed = threading.Event()
        self._sent = False  # the first send is FIRST_BATCH frames at most
        self._first_sent = False  # ... and the pass that made it waits for the device's answer
        #: (mono ns, tx head, rx tail) of the relay's start, for its "relay running" line: written once the guest
        #: has its first frames back (`_resume`) or the relay ends, stamped with this time (`kv_at`) — formatting
        #: and writing it first took the relay 0.1-0.2 ms of CPU inside the guest's blackout.
        self._running: tuple[int, int, int] | None = None
        #: When the relay's loop started (time.monotonic_ns(); None before): the end of a restore's window up to its
        #: relay running (`bench_sensitivity` measures the restore's steps to it).
        self.running_ns: int | None = None
        #: The thread the relay runs on, once started (made here only without one started ahead: a thread object
        #: costs 20-40 us of CPU in the restore's window).
        self._thread: threading.Thread | None = None

    def start(self, thread: RelayThread | None = None) -> None:
        """Run on `thread` (started ahead: `RelayThread`), else on a thread of its own started now."""
        if thread is None:
            self._thread = threading.Thread(target=self._run, name=f"relay-{self.pci_id}", daemon=True)
            self._thread.start()
        else:
            self._thread = thread.thread
            thread.run(self._run)

    def stop(self, last_batch: bool = True) -> None:
        """Stop moving frames, wait for the thread, then drain the vport (`_drain`, unless the relay ended on
        an error) on the calling thread; the vport is then free for save or shutdown. The drain comes after the
        relay's thread has ended and this thread woke from the join (0.05-0.45 ms under load), so its last
        frames to the guest — where the guest's blackout starts — are not followed by that wait. `last_batch`:
        what the guest queued meanwhile goes out as one last batch (`_drain`).
        Idempotent: a second stop must not write to or close the stop eventfd's number again (by then it
        may belong to another file, e.g. a device socket)."""
        with self._stop_lock:
            if self._stop_fd is None:
                return
            self._last_batch = last_batch
            self._stopping = True
            os.eventfd_write(self._stop_fd, 1)
            if self._thread is not None:  # started
                self._thread.join()
                if self.error is None:  # the data path is this thread's now
                    self._guarded(self._drain)
            os.close(self._stop_fd)
            self._stop_fd = None
            self.resumed.set()  # (also for a relay never started: nobody waits for it)
        kv(log, logging.INFO, "relay stopped", pci_id=self.pci_id, **vars(self.stats))  # (asdict: a deep copy)

    def abandon(self) -> None:
        """Stop for good: the vport is dropped without teardown (a deferred HWC probe failed, the FLR fallback
        follows). What came back is drained to the guest as at any stop; sends the device never completed
        are lost, counted in `tx_stranded`. The guest's frames still queued stay in its ring (no last batch
        into a vport being dropped)."""
        self.stop(last_batch=False)
        self.stats.tx_stranded += self.datapath.tx_outstanding

    def _run(self) -> None:
        try:
            self._guarded(self._serve)
        finally:
            self._log_running()
            self.resumed.set()

    def _guarded(self, work) -> None:
        """`work()` (the relay's loop, or the drain at its stop); a device or ring error ends the relay, noted."""
        try:
            work()
        except DeviceMissing as e:
            self.device_missing = True
            self._fail(e)
        except DEVICE_ERRORS as e:
            self.device_failed = True
            self._fail(e)
        except RingError as e:
            self._fail(e)

    def _serve(self) -> None:
        """The relay's loop, until `stop()`."""
        tx_bell = self.channel.tx.doorbell
        poller = select.poll()
        answer = select.poll()  # the device's answer (or a stop), not the guest's frames
        for fd in (tx_bell.fd, self.datapath.fileno(), self._stop_fd):
            poller.register(fd, select.POLLIN)
            if fd != tx_bell.fd:
                answer.register(fd, select.POLLIN)
        self._running = (time.monotonic_ns(), self.channel.tx.head, self.channel.rx.tail)
        self.running_ns = self._running[0]
        moved = False
        rx_before = self.stats.rx_frames
        while not self._stopping:
            tx_bell.clear()
            with self.datapath.doorbells_batched():  # the pass's doorbells: one burst, one device wake-up
                moved_now = self._pump(first_back_alone=not self.resumed.is_set())
            if moved_now:
                moved = True
                if not self.resumed.is_set() and self.stats.rx_frames != rx_before:
                    handed = time.monotonic_ns()
                    self._await_guest()
                    self._resume(self.stats.rx_frames - rx_before, handed)
                elif self._first_sent and len(self.channel.tx):
                    self._await_answer(answer)
                self._first_sent = False
                continue
            moderate, moved = moved and not len(self.channel.tx), False
            if moderate:
                # Interrupt moderation: after a busy pass, first wait MODERATION_MS for more guest frames
                # without arming anything; the next send arms the RX side with its own SQ doorbell, so a
                # steady stream costs the device one wake-up per guest burst instead of two. (Guest frames
                # waiting for TX buffers need the TX CQ armed: no moderation then.)
                if self.datapath.take_events():  # an interrupt already handled must not end the wait
                    continue
                if poller.poll(MODERATION_MS):
                    self.stats.wakeups += 1
                    continue
            # Wake for TX completions only if guest frames wait for a TX buffer; otherwise reap them later.
            with self.datapath.doorbells_batched():
                ready = not self.datapath.prepare_wait(need_tx=bool(len(self.channel.tx)))
            if ready:
                continue
            if len(self.channel.tx) and self.datapath.tx_free:
                continue
            if not self.resumed.is_set() and not self.datapath.tx_outstanding:
                self._resume(self.stats.rx_frames - rx_before, time.monotonic_ns())
            if not poller.poll(IDLE_WAIT_MS):
                self.datapath.rearm()  # idle: arm everything again, in case a notification was lost
            self.stats.wakeups += 1

    def _await_answer(self, answer: select.poll) -> None:
        """After the first send of a backlog: wait (MODERATION_MS at most) until the device has answered it —
        frames back, or its TX completions (a backend that returns nothing) — so that the next pass hands those
        frames to the guest before it copies the rest of the backlog. That send armed both (`arm_rx(tx=True)`, in
        the burst of its SQ doorbell), so the wait itself sends the device nothing."""
        if answer.poll(MODERATION_MS):
            self.stats.wakeups += 1

    def _await_guest(self) -> None:
        """After handing the guest its first frames back (a pass that sent nothing): sleep until the guest has
        taken them (its rx ring is empty), `GUEST_TAKE_WAIT_S` at most, or a stop, so the guest's receiver, just
        woken, finds a CPU that neither this relay nor the device it would send the rest to holds."""
        rx, stop_fd = self.channel.rx, self._stop_fd
        deadline = time.monotonic() + GUEST_TAKE_WAIT_S
        while len(rx) and not self._stopping and time.monotonic() < deadline:
            select.select((stop_fd,), (), (), GUEST_LOOK_S)

    def _resume(self, frames: int, mono: int) -> None:
        """`resumed`, and the "relay resumed" line stamped with `mono` (when the guest had its first frames back, or
        the relay found nothing to do)."""
        self.resumed.set()
        self._log_running()
        kv_at(log, logging.INFO, mono, "relay resumed", pci_id=self.pci_id, rx_frames=frames)

    def _log_running(self) -> None:
        """The "relay running" line, once, stamped with the relay's start (`_running`)."""
        if self._running is not None:
            mono, tx_head, rx_tail = self._running
            self._running = None
            kv_at(log, logging.INFO, mono, "relay running", pci_id=self.pci_id, tx_head=tx_head, rx_tail=rx_tail)

    def _pump(self, first_back_alone: bool = False) -> int:
        """Everything the vport received, then one batch of sends; returns the frames moved. Receiving first
        frees RX buffers, posted again just before the sends can bring more frames back (loopback), so the
        device does not run out of them. `first_back_alone`: a pass that hands the guest frames sends nothing
        (`_await_guest` follows)."""
        moved = 0
        rx_frames = self.stats.rx_frames
        for _ in range(DRAIN_MAX_BATCHES if self.datapath.rx_pending() else 0):  # (a guest burst's pass: none)
            n = self._receive()
            moved += n
            if n < BATCH:
                break
        if first_back_alone and self.stats.rx_frames != rx_frames:
            return moved
        room = min(BATCH if self._sent else FIRST_BATCH, self.datapath.tx_free)
        tx = self.channel.tx
        blocks = tx.peek_blocks(room) if room else []
        if not blocks:
            self.datapath.send([])  # reap the TX completions
            return moved
        lengths = [n for _, run in blocks for n in run]
        self._first_sent, self._sent = not self._sent, True
        # What comes back interrupts (the arms go just before the SQ doorbell); after the first send, so do its TX
        # completions: the relay waits for either (`_await_answer`).
        self.datapath.arm_rx(tx=self._first_sent)
        try:
            # Copied straight from the ring slots into TX buffers; the slots are released before the SQ doorbell,
            # so a worker killed in between has lost these frames at most, never sends them twice (the next
            # relay starts after them).
            sent = taken = self.datapath.send_blocks(
                blocks, before_doorbell=lambda n: tx.release_count(n, sum(lengths[:n])))
        except BadFrame as e:
            frames = [bytes(row[:n]) for rows, run in blocks for row, n in zip(rows, run)]  # copies: the slots go
            tx.release_count(len(frames), sum(lengths))  # back to the guest first
            sent, taken = self._send_one_by_one(frames, e), len(frames)
        self.stats.tx_frames += sent
        return moved + taken

    def _receive(self) -> int:
        """One batch vport -> guest rx ring, copied straight from the packet buffers; returns the frames taken
        from the vport."""
        return self.datapath.receive_batch(self._to_guest, BATCH, self._block_to_guest)

    def _block_to_guest(self, rows, length: int) -> None:
        """`_to_guest` for frames of one `length`, the rows of `rows`: one block copy."""
        if length > self.channel.rx.max_frame:
            self.stats.rx_dropped_too_big += len(rows)
            return
        pushed = self.channel.rx.push_block(rows[:, :length])
        self.stats.rx_frames += pushed
        self.stats.rx_dropped_ring_full += len(rows) - pushed

    def _to_guest(self, views: list[memoryview]) -> None:
        """Push received frames to the guest; a frame larger than a ring slot, or one the full ring refuses,
        is counted."""
        limit = self.channel.rx.max_frame
        if max(map(len, views)) > limit:
            fit = [v for v in views if len(v) <= limit]
            self.stats.rx_dropped_too_big += len(views) - len(fit)
            views = fit
        pushed = self.channel.rx.push_many(views)
        self.stats.rx_frames += pushed
        self.stats.rx_dropped_ring_full += len(views) - pushed

    def _drain(self) -> None:
        """After the last send, hand the guest what the vport still holds, so stopping for servicing
        strands no frame in queues the save then destroys. The device handles messages in order, so once
        a register read returns it has processed every doorbell before it: the frames in flight have
        completed and (loopback) come back. Bounded, as a wire backend may keep delivering. The read is also
        the stop's presence check (`VfManager.quiesce`), so it is made even with no send outstanding.

        Then, on a stop with `last_batch` (servicing, shutdown; not an abandon), what the guest queued meanwhile
        — frames that came in during the relay's last wait or while the worker read the save request (the
        relay's thread waiting for the GIL) — goes out as one batch, brought back by one more read: the guest
        gets them now, not from the next worker's relay, and its blackout starts at its next frame.

        A read of all ones (the device is gone: DeviceMissing) still came after every doorbell, and a removed
        device writes nothing more, so what it completed before it went is in memory for good: reaped and handed
        to the guest all the same, so that only the sends it never took are `tx_stranded` (an abandon) — a relay
        that had not yet looked at them lost them uncounted."""
        try:
            self.datapath.sync()
        except DeviceMissing:
            self.datapath.send([])
            self._hand_back()
            raise
        self.datapath.send([])  # reap the TX completions
        if self._last_batch and len(self.channel.tx) and self.datapath.tx_free:
            with self.datapath.doorbells_batched():
                self._pump()  # (receives first: what came back frees RX buffers for what it sends)
            self.datapath.sync()
            self.datapath.send([])
        self._hand_back()

    def _hand_back(self) -> None:
        """What the vport received, to the guest (bounded: a wire backend may keep delivering)."""
        for _ in range(DRAIN_MAX_BATCHES):
            if not self._receive():
                break

    def _send_one_by_one(self, frames: list[bytes], first_error: BadFrame) -> int:
        """A batch held a frame the vport cannot carry: send the rest, count the bad ones."""
        kv(log, logging.WARNING, "dropping frames the vport cannot carry", pci_id=self.pci_id, error=first_error)
        sent = 0
        for f in frames:
            try:
                sent += self.datapath.send([f])
            except BadFrame:
                self.stats.tx_dropped_bad_frame += 1
        return sent

    def _fail(self, e: Exception) -> None:
        self.error = f"{type(e).__name__}: {e}"
        kv(log, logging.ERROR, "relay stopped by an error", pci_id=self.pci_id, error=self.error)

    def inspect(self) -> dict:
        running = self._thread is not None and self._thread.is_alive()
        return {**asdict(self.stats), "running": running, "error": self.error}
