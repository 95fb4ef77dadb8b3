"""Kill points: named places of the worker's save and restore sequences where a test can SIGKILL the worker.

Issue 15's kill-anywhere tests and `vfkeep chaos` die here on purpose, to prove that a worker lost at any step
of a servicing leaves nothing dead or leaked (DESIGN D4). The code calls `reached(NAME)` at each point; the
worker dies there (SIGKILL, itself: no finally, no atexit, no flushed buffers but the log line before) when
`NAME` is the point it was armed with, and nothing happens otherwise.

Arming: `VFKEEP_KILL_POINT=NAME` in a worker's environment (read when the worker starts; the host sets it for
the next worker of one servicing: `service(kill_point=...)` with a restore point), or `arm(NAME)` (the worker
arms the save point a save request carries, `Save.kill_point`). A restore point is disarmed once the restore
is over (`started` sent): run-time re-creations of a NIC pass the same code. Every name is in `POINTS`, which
maps it to what has happened when it is reached; the kill-anywhere test (tests/test_kill_points.py) kills at each.

Stdlib only: the driver, the paravisor and the host all import it.
"""
from __future__ import annotations

import logging
import os
import contextlib
import signal
from typing import Iterator, Mapping

from .log import kv, write_held_lines

log = logging.getLogger("vfkeep.kill_points")

KILL_POINT_ENV = "VFKEEP_KILL_POINT"

#: The old worker's save (servicing spec §2.2), in order.
SAVE_POINTS: dict[str, str] = {
    "save.requested": "the save request is read; nothing is stopped or saved",
    "save.io_stopped": "every relay is stopped and drained; no state is taken",
    "save.dma_saved": "the DMA manager's pool snapshot is taken; no device is saved",
    "save.vports_closed": "a NIC's vports are closed (MANA save), its HWC not yet saved or released",
    "save.devices_saved": "every device is saved and released without reset; the blob is not built",
    "save.state_sent": "every chunk of the state is sent; the host's answer is not read",
    "save.answered": "the host took the state; the worker has not exited",
}
#: The new worker's restore (servicing spec §3), in order. `restore.pool_buffers_attached`, `restore.hwc` and
#: `restore.vport` are reached once per NIC (NICs restore concurrently: the first one kills the worker).
RESTORE_POINTS: dict[str, str] = {
    "restore.before_state": "`start` is read; the saved state is not requested (before the blob arrives)",
    "restore.state_received": "the whole saved state arrived; nothing is decoded or restored",
    "restore.dma_restored": "the DMA manager is restored (saved allocations pending); no device is touched",
    "restore.pool_buffers_attached": "a NIC's saved pool buffers are attached, not yet checked or freed",
    "restore.hwc": "a NIC's HWC is rebuilt from its saved state and answered the test event; "
                   "LIST_DEVICES and QUERY_DEV_CONFIG are not sent",
    "restore.vport": "a vport is half built: its EQ and send queue exist, its receive queue does not",
    "restore.validated": "the pool is validated; no relay runs, restore-completed is not sent",
    "restore.started": "`started` is sent: the servicing is over for the host",
}
POINTS: dict[str, str] = {**SAVE_POINTS, **RESTORE_POINTS}
#: Reached after the host has the servicing result: the kill is no part of it (the host replaces the worker as
#: one that "died outside servicing"; frames lost meanwhile are in no servicing result).
AFTER_RESULT = ("restore.started",)

_armed: str | None = None


class UnknownKillPoint(ValueError):
    """A kill point name that is not in `POINTS`."""


def check(name: str) -> str:
    if name not in POINTS:
        raise UnknownKillPoint(f"unknown kill point {name!r}; known: {', '.join(POINTS)}")
    return name


def arm(name: str | None) -> None:
    """Die at `name` from now on (None: nowhere). An unknown name is warned about and ignored (never fatal)."""
    global _armed
    if name is not None and name not in POINTS:
        kv(log, logging.WARNING, "unknown kill point, ignored", point=name, known="|".join(POINTS))
        return
    _armed = name
    if name is not None:
        kv(log, logging.WARNING, "test hook: kill point armed", point=name)


def arm_from_env(environ: Mapping[str, str]) -> None:
    arm(environ.get(KILL_POINT_ENV) or None)


@contextlib.contextmanager
def disarmed() -> Iterator[None]:
    """No kill point fires inside (code of a restore run on scratch things: `rehearse_kept_restore`); the one armed
    before is armed again after, silently."""
    global _armed
    armed, _armed = _armed, None
    try:
        yield
    finally:
        _armed = armed


def reached(name: str) -> None:
    """The worker is at `name`: SIGKILL itself if armed there."""
    if name != _armed:
        return
    kv(log, logging.WARNING, "test hook: kill point reached, SIGKILL", point=name, pid=os.getpid())
    write_held_lines()  # (held lines too: a SIGKILL writes nothing)
    os.kill(os.getpid(), signal.SIGKILL)
