"""Single-threaded selector loop shared by the vfio-user server, its control channel and the
device's own backends and timers: one thread means device state needs no locks."""
from __future__ import annotations

import contextlib
import ctypes
import heapq
import itertools
import logging
import os
import selectors
import time
from typing import Callable

log = logging.getLogger("vfkeep.vfio_user.loop")


#: Linux lets a sleep of the calling thread end up to its "timer slack" late (50 us by default), to batch
#: wake-ups; a loop that models microsecond latencies asks for less.
TIMER_SLACK_NS = 1000
_PR_SET_TIMERSLACK = 29


def set_timer_slack(ns: int) -> bool:
    """prctl(PR_SET_TIMERSLACK) for the calling thread; False where it is not available (not Linux)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_TIMERSLACK, ctypes.c_ulong(ns), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


class Timer:
    """Handle returned by `call_later`; `cancel()` before it fires drops it."""

    __slots__ = ("when", "callback", "cancelled")

    def __init__(self, when: float, callback: Callable[[], None]):
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class EventLoop:
    def __init__(self) -> None:
        # select(2): timers fire to the microsecond. epoll and poll round a timeout up to whole milliseconds,
        # which would turn a modelled 0.25 ms HWC latency into 1 ms; a device watches only a handful of fds.
        self._selector = selectors.SelectSelector()
        self._timers: list[tuple[float, int, Timer]] = []
        self._seq = itertools.count()
        self._running = False
        #: Context each wake-up's callbacks (ready readers, then due timers) run inside; the vfio-user server
        #: sets its interrupt coalescing here, so one wake-up of the device signals each vector once, at its end.
        self.step: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
        # stop() may come from a signal handler: a byte on this pipe wakes select().
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.add_reader(self._wake_r, self._drain_wake)

    def add_reader(self, fd: int, callback: Callable[[], None]) -> None:
        """Call `callback()` whenever `fd` is readable (level-triggered); replaces an earlier one.
        Re-registering (not modify) also covers an fd number reused after a close."""
        self.remove_reader(fd)
        self._selector.register(fd, selectors.EVENT_READ, callback)

    def remove_reader(self, fd: int) -> None:
        if fd in self._selector.get_map():
            self._selector.unregister(fd)

    def call_later(self, delay_s: float, callback: Callable[[], None]) -> Timer:
        timer = Timer(time.monotonic() + max(0.0, delay_s), callback)
        heapq.heappush(self._timers, (timer.when, next(self._seq), timer))
        return timer

    def run(self) -> None:
        """Serve until `stop()`. A failing callback is logged and the loop goes on: a device
        process must outlive its own bugs long enough to report them."""
        set_timer_slack(TIMER_SLACK_NS)
        self._running = True
        while self._running:
            timeout = None
            if self._timers:
                timeout = max(0.0, self._timers[0][0] - time.monotonic())
            ready = self._selector.select(timeout)
            with self.step():
                for key, _ in ready:
                    if not self._running:
                        break
                    current = self._selector.get_map().get(key.fd)  # an earlier callback may have removed it
                    if current is not None:
                        self._guard(current.data)
                now = time.monotonic()
                while self._running and self._timers and self._timers[0][0] <= now:
                    timer = heapq.heappop(self._timers)[2]
                    if not timer.cancelled:
                        self._guard(timer.callback)

    def stop(self) -> None:
        """Make `run()` return; safe from signal handlers and other threads."""
        self._running = False
        try:
            os.write(self._wake_w, b"\0")
        except BlockingIOError:
            pass

    def close(self) -> None:
        self._selector.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    @staticmethod
    def _guard(callback: Callable[[], None]) -> None:
        try:
            callback()
        except Exception:  # noqa: BLE001 - keep serving, but say what broke
            log.error("loop callback failed", exc_info=True,
                      extra={"kv": {"callback": getattr(callback, "__qualname__", repr(callback))}})
