"""A next worker's rehearsal of the kept-vport restore (`rehearse_kept_restore`, `Worker.rehearse_restore`): it runs
the real path on scratch things, leaves nothing behind, fires no kill point, and a failing one changes nothing."""
import gc
import glob
import logging
import os
import signal
import tempfile
import threading

from vfkeep import kill_points
from vfkeep.contract import DATAPATH_KEEPALIVE_ENV, MANA_KEEPALIVE_ENV, PRELAUNCHED_ENV, Channel, NicConfig
from vfkeep.memory import GuestMemory, MemoryLayout
from vfkeep.paravisor import rehearsal
from vfkeep.paravisor import worker as worker_module
from vfkeep.paravisor.mana_kind import ManaKind

LAYOUT = MemoryLayout(guest_pages=16, worker_pages=16, pool_pages=16)


def open_fds() -> dict[str, str]:
    return {fd: os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
            if os.path.exists(f"/proc/self/fd/{fd}")}


def test_a_rehearsal_takes_the_fresh_then_the_keepalive_path_and_leaves_nothing_behind(monkeypatch):
    paths = []
    original = ManaKind.restore

    def restore(self, previous, config):
        original(self, previous, config)
        paths.append([vf.restore_path for vf in self.vf_managers])

    monkeypatch.setattr(ManaKind, "restore", restore)
    gc.collect()  # (the rehearsal collects: what earlier tests left for the collector must not count as its own)
    fds, threads = open_fds(), set(threading.enumerate())
    scratch = glob.glob(os.path.join(tempfile.gettempdir(), "vfkeep-rehearsal-*"))
    rehearsal.rehearse_kept_restore()
    assert paths == [["fresh"], ["keepalive"]]
    assert set(threading.enumerate()) == threads
    assert open_fds() == fds  # (the scratch memfd, its doorbells, the device's sockets and loop: all closed)
    assert glob.glob(os.path.join(tempfile.gettempdir(), "vfkeep-rehearsal-*")) == scratch
    assert logging.root.manager.disable == logging.NOTSET


def test_a_rehearsal_logs_nothing(caplog):
    with caplog.at_level(logging.DEBUG):
        rehearsal.rehearse_kept_restore()
        logging.getLogger("vfkeep.test").debug("logging is on again")
    assert [r.getMessage() for r in caplog.records] == ["logging is on again"]


def test_no_kill_point_fires_inside_a_rehearsal_and_the_armed_one_is_armed_again(monkeypatch):
    killed = []
    monkeypatch.setattr(kill_points.os, "kill", lambda pid, sig: killed.append(sig))
    kill_points.arm("restore.pool_buffers_attached")  # reached by every kept-vport restore
    try:
        with kill_points.disarmed():
            rehearsal.rehearse_kept_restore()
        assert killed == []
        kill_points.reached("restore.pool_buffers_attached")
        assert killed == [signal.SIGKILL]
    finally:
        kill_points.arm(None)


def _worker(monkeypatch, mem, prelaunched: bool, datapath_keepalive: bool = True):
    monkeypatch.setenv(MANA_KEEPALIVE_ENV, "enabled")
    if prelaunched:
        monkeypatch.setenv(PRELAUNCHED_ENV, "1")
    else:
        monkeypatch.delenv(PRELAUNCHED_ENV, raising=False)
    if datapath_keepalive:
        monkeypatch.setenv(DATAPATH_KEEPALIVE_ENV, "1")
    else:
        monkeypatch.delenv(DATAPATH_KEEPALIVE_ENV, raising=False)
    host, chan = Channel.pair()
    nic = NicConfig(0, "nic0", "/nonexistent/nic0.sock", -1, -1)
    return worker_module.Worker(chan, mem, [nic], generation=2, downlevel=False, channel_layout=None), \
        (host, chan)


def test_a_failing_rehearsal_is_one_warning_and_the_worker_goes_on(monkeypatch, caplog):
    def fail():
        raise RuntimeError("scratch device gone")

    monkeypatch.setattr(rehearsal, "rehearse_kept_restore", fail)
    with GuestMemory.create(LAYOUT) as mem:
        w, chans = _worker(monkeypatch, mem, prelaunched=True)
        try:
            with caplog.at_level(logging.DEBUG, logger="vfkeep"):
                w.rehearse_restore()
            assert w.dma is None and w.mana.vf_managers == []  # nothing of the worker's own was made
        finally:
            for c in chans:
                c.close()
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [r.getMessage() for r in warnings] == ["rehearsing the kept-vport restore failed"]
    assert "scratch device gone" in warnings[0].kv["error"]


def test_only_a_prelaunched_worker_with_data_path_keepalive_rehearses(monkeypatch):
    """Not a worker started inside a blackout (no prelaunch, a D4 replacement), which would pay for it there."""
    calls = []
    monkeypatch.setattr(rehearsal, "rehearse_kept_restore", lambda: calls.append(1))
    with GuestMemory.create(LAYOUT) as mem:
        for prelaunched, datapath_keepalive, expected in ((True, True, 1), (True, False, 0), (False, True, 0)):
            calls.clear()
            w, chans = _worker(monkeypatch, mem, prelaunched, datapath_keepalive)
            try:
                w.rehearse_restore()
            finally:
                for c in chans:
                    c.close()
            assert len(calls) == expected, (prelaunched, datapath_keepalive)
