"""Asynchronous events of a host: servicing started / phase done / completed, NIC state changes, stopping.

The host publishes; every `vfkeep events` connection (the control socket's `events` command) has a
subscription of its own. An event is one JSON object::

    {"event": KIND, "seq": N, "ts": UNIX_SECONDS, "data": {...}}

`seq` counts every event the host published, so a subscriber sees gaps when it fell behind (its queue
holds QUEUE_LEN events; older ones are dropped, and the next event delivered says how many in
`dropped`). Kinds and their data are listed in KINDS (docs/control-api.md documents them).
"""
from __future__ import annotations

import collections
import itertools
import threading
import time
from typing import Any

#: kind -> what its data holds (the API documentation's list).
KINDS = {
    "servicing_started": "servicing (number), mana_keepalive, nvme_keepalive, nics (pci ids configured next)",
    "phase_done": "servicing, phase (prelaunch|save|handoff or replacement|restore|measure), ms",
    "servicing_completed": "servicing, status, ok, error, phases_ms, nics [{pci_id, restore_path, reason}]",
    "nic_state": "pci_id, restore_path, error, worker_generation, cause (boot|servicing|replacement)",
    "host_stopping": "cause",
    "host_stopped": "worker (shut_down|none|dead|no_shutdown|abandoned_servicing|unknown), nics_shut_down, "
                    "nvme_shut_down (pci ids), summary",
}
QUEUE_LEN = 1024
#: How long a stopping host waits for its subscribers' readers to pass on what they hold (host_stopping).
DRAIN_S = 1.0


class Subscription:
    """One subscriber's queue of events; `next(timeout)` is None when none came in time or it is closed."""

    def __init__(self, bus: "EventBus"):
        self._bus = bus
        self._events: collections.deque = collections.deque(maxlen=QUEUE_LEN)
        self._cond = threading.Condition()
        self._dropped = 0
        self.closed = False
        self.done = threading.Event()  # its reader is done with it (`close`)

    def _put(self, event: dict) -> None:
        with self._cond:
            if len(self._events) == self._events.maxlen:
                self._dropped += 1
            self._events.append(event)
            self._cond.notify()

    def next(self, timeout: float | None) -> dict | None:
        with self._cond:
            if not self._cond.wait_for(lambda: self._events or self.closed, timeout) or not self._events:
                return None
            event = self._events.popleft()
            if self._dropped:
                event = {**event, "dropped": self._dropped}
                self._dropped = 0
            return event

    def close(self) -> None:
        """The reader is done (it passed on every event it will)."""
        self._bus._remove(self)
        with self._cond:
            self.closed = True
            self._cond.notify_all()
        self.done.set()


class EventBus:
    def __init__(self):
        self._subs: list[Subscription] = []
        self._lock = threading.Lock()
        self._seq = itertools.count(1)

    def subscribe(self) -> Subscription:
        sub = Subscription(self)
        with self._lock:
            self._subs.append(sub)
        return sub

    def _remove(self, sub: Subscription) -> None:
        with self._lock:
            if sub in self._subs:
                self._subs.remove(sub)

    @property
    def subscribers(self) -> int:
        with self._lock:
            return len(self._subs)

    def publish(self, kind: str, **data: Any) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown event kind {kind!r}")
        with self._lock:
            event = {"event": kind, "seq": next(self._seq), "ts": round(time.time(), 6), "data": data}
            subs = list(self._subs)
        for sub in subs:
            sub._put(event)

    def close(self, drain_s: float = DRAIN_S) -> None:
        """Ends every subscription (the host is stopping), then waits up to `drain_s` for their readers to be done:
        the process may exit next, and a `vfkeep events` that missed host_stopping says the host died."""
        with self._lock:
            subs, self._subs = self._subs, []
        for sub in subs:
            with sub._cond:
                sub.closed = True
                sub._cond.notify_all()
        deadline = time.monotonic() + drain_s
        for sub in subs:
            sub.done.wait(max(0.0, deadline - time.monotonic()))
