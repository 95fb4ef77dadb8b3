"""A restarted relay says when the guest's traffic is back (`NetRelay.resumed`), and a data-path keepalive's
deferred HWC probe waits for that (issue 10: the probe's requests competed with the relay's first frames for
the worker's CPU inside the guest's blackout).

The relay runs over a real driver and the in-process emulator (loopback backend), as in test_relay_drops."""
from __future__ import annotations

import threading

from driver_helpers import numbered_frames
from test_relay_drops import LAYOUT, relay_bench  # noqa: F401 (the fixture and the memory it needs)
from vfkeep.paravisor import vf_manager
from vfkeep.paravisor.vf_manager import VfManager
from vfkeep.contract import NicConfig


def test_resumed_once_the_guest_frames_waiting_at_the_start_came_back(relay_bench):
    relay, channel, _ = relay_bench(slots=16)
    assert channel.tx.push_many(numbered_frames(12)) == 12  # the guest sent while no relay ran
    relay.start()
    assert relay.resumed.wait(5)
    assert len(channel.rx) > 0  # set by the pass that handed the looped-back frames to the guest
    relay.stop()


def test_resumed_when_there_is_nothing_to_relay(relay_bench):
    relay, channel, _ = relay_bench()
    relay.start()
    assert relay.resumed.wait(5)
    assert len(channel.rx) == 0 and relay.stats.tx_frames == 0
    relay.stop()


def test_resumed_when_the_device_never_completes_the_sends(relay_bench):
    """Nothing comes back (the vport stopped behind the driver's back): the relay goes idle, which counts."""
    relay, channel, bench = relay_bench()
    bench.device.vports[0].stop()
    assert channel.tx.push_many(numbered_frames(4)) == 4
    relay.start()
    assert relay.resumed.wait(5)
    assert len(channel.rx) == 0
    relay.abandon()


def test_resumed_once_stopped_even_if_never_started(relay_bench):
    """Whoever waits for a relay stopped early must not wait for its timeout."""
    relay, _, _ = relay_bench()
    relay.stop()
    assert relay.resumed.is_set()


class _Relay:
    def __init__(self):
        self.resumed = threading.Event()


class _Device:
    """Records whether the relay had resumed when the probe ran."""

    def __init__(self, relay: _Relay):
        self.relay = relay
        self.probe_pending = True
        self.probed_after_resume: bool | None = None

    def probe(self) -> None:
        self.probed_after_resume = self.relay.resumed.is_set()
        self.probe_pending = False


def _manager(relay: _Relay) -> tuple[VfManager, _Device]:
    vf = VfManager(NicConfig(0, "nic0", "unused.sock", -1, -1), None, None)
    vf.relay, vf.dev = relay, _Device(relay)
    return vf, vf.dev


def test_deferred_probe_waits_for_the_relay_to_resume():
    relay = _Relay()
    vf, dev = _manager(relay)
    timer = threading.Timer(0.05, relay.resumed.set)
    timer.start()
    vf.finish_restore()
    timer.join()
    assert dev.probed_after_resume is True and not dev.probe_pending


def test_deferred_probe_runs_anyway_when_the_relay_does_not_resume(monkeypatch):
    monkeypatch.setattr(vf_manager, "PROBE_AFTER_RELAY_S", 0.01)
    vf, dev = _manager(_Relay())
    vf.finish_restore()
    assert dev.probed_after_resume is False and not dev.probe_pending
