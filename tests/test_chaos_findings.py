"""Regressions for what `vfkeep chaos` found (issue 15): each test failed before its fix."""
import threading
import time

import pytest

from driver_helpers import InProcessBench, numbered_frames
from servicing_helpers import HostRun, until_accounted
from vfkeep.driver.mana import ManaDevice
from vfkeep.guest.ring import ChannelLayout, NicChannel
from vfkeep.memory import DmaManager, MemoryLayout
from vfkeep.paravisor.net_relay import NetRelay

LAYOUT = MemoryLayout(guest_pages=64, worker_pages=512, pool_pages=0)  # the in-process tests' guest memory


def _owners(h: HostRun) -> tuple[dict, dict]:
    return h.inspect("worker/pool")["devices"], h.inspect("worker/worker_ram")["devices"]


def test_hwc_failure_while_opening_the_vport_takes_the_flr_retry(tmp_path):
    """chaos seed 1, servicings 56/82/97/98: one failed CREATE_QUEUE (or CONFIG_VPORT_TX) during a fresh init's
    vport open left the NIC without a vport until the next servicing, and its HWC buffer in the pool owned by
    a device object nobody had any more. The vport open is part of the NoReset attempt: it fails, the device
    is shut down (its pages freed), and the FLR retry brings the NIC up. The failed vport's queue memory, which
    its teardown could not take back from the device (the HWC failed), is freed once the FLR has reset the
    function (servicings 82/97: one pool page stayed owned)."""
    h = HostRun(tmp_path / "run", "--datapath-keepalive")
    try:
        owners = _owners(h)
        for request in ("CREATE_QUEUE", "CONFIG_VPORT_TX"):
            h.device_control(0, "fail_request", type=request, mode="once")
            r = h.service(mana_keepalive=False)
            n = r["nics"][0]
            assert n["restore_path"] == "fresh" and n["error"] is None, r
            assert n["device_reset"], r  # the NoReset attempt failed; the FLR retry succeeded
            assert h.probe()["ok"]
            assert _owners(h) == owners
    finally:
        h.stop()


DEVICE_DROPS = ("tx_dropped_link_down", "rx_dropped_link_down", "in_discards_no_wqe", "rx_dropped_unmapped",
                "in_errors_rx_vport_disabled", "rx_dropped_no_vport", "rx_dropped_removed", "tx_errors", "rx_errors",
                "tx_backend_errors", "rx_backend_errors")


def _wait(cond, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (value := cond()):
        assert time.monotonic() < deadline, what
        time.sleep(0.05)
    return value


def _flows_again(h, timeout: float) -> None:
    """Until NIC 0's agent received 100 more frames."""
    base = h.traffic("status")["agents"][0]["received"]
    _wait(lambda: h.traffic("status")["agents"][0]["received"] > base + 100, timeout, "traffic flows again")


def test_frames_sent_into_a_removed_device_are_counted(tmp_path):
    """chaos seed 1, servicings 45/54/91: frames the relay had posted when the device disappeared (its
    doorbells go nowhere) died with the torn-down vport uncounted. They are `tx_stranded`, as for an
    abandoned relay. A removal the worker sees before the guest's next send strands nothing (a starved guest
    agent on a loaded machine: CI saw 0 lost once), so the scenario is repeated on a fresh host, at most
    REMOVALS times, until a removal strands frames; the losses must equal the counters every time."""
    for attempt in range(REMOVALS):
        h = HostRun(tmp_path / f"run{attempt}")
        try:
            h.traffic("start", rate=3000, size=128)
            _flows_again(h, 10)
            h.device_control(0, "surprise_removal", on=True)
            _wait(lambda: h.inspect("worker/nics/0/missing"), 10, "the worker sees the device gone")
            h.device_control(0, "surprise_removal", on=False)
            _wait(lambda: not h.inspect("worker/nics/0/missing"), 15, "the device is back (hot-add)")
            _flows_again(h, 10)
            s, counted = _lost_and_counted(h, None, [])
            assert s["frames_lost"] == counted, (s, counted)
            assert s["duplicated"] == 0 and s["unknown"] == 0
        finally:
            h.stop()
        if s["frames_lost"] > 0:
            return  # the removal did cost frames, each one counted
    pytest.fail(f"none of {REMOVALS} removals stranded a frame")


#: Surprise removals tried until one strands frames (each alone: 55-398 of 3000 frames/s, 8 of 8 at load 0).
REMOVALS = 5


def test_a_nic_whose_last_init_attempt_failed_is_retried(tmp_path):
    """chaos seed 1, servicings 56/98: on the reset-flr path the NoReset attempt fails (the HWC is live), so one
    failed CONFIG_VPORT_TX in the FLR attempt left the NIC dead until the next servicing. The NIC's watcher
    retries a NIC that did not come up (FLR, fresh init) with the hot-add backoff."""
    h = HostRun(tmp_path / "run")
    try:
        h.device_control(0, "fail_request", type="CONFIG_VPORT_TX", mode="once")
        r = h.service(mana_keepalive=True, next_env={"OPENHCL_MANA_KEEP_ALIVE": "disabled"})
        assert "CONFIG_VPORT_TX" in (r["nics"][0]["error"] or ""), r
        _wait(lambda: h.inspect("worker/nics/0/recoveries") == 1, 10, "the NIC is re-created")
        assert h.inspect("worker/nics/0/error") is None
        assert h.probe()["ok"]
    finally:
        h.stop()


def test_frames_a_saving_worker_stranded_are_in_its_save_outcome(tmp_path):
    """chaos seed 1, servicings 45/54/57/68: a device removed just before a servicing is found gone by the old
    worker's save (`quiesce`), which counts the sends it strands in its relay's `tx_stranded` — and then exits
    with the count. The save outcome of each NIC carries its relay counters, so the count outlives the worker
    (`inspect last_servicing/save_outcomes`)."""
    h = HostRun(tmp_path / "run")
    try:
        h.traffic("start", rate=3000, size=128)
        _wait(lambda: h.traffic("status")["agents"][0]["received"] > 300, 10, "traffic flows")
        relay_before = h.inspect("worker/nics/0/relay")
        h.device_control(0, "surprise_removal", on=True)
        r = h.service(mana_keepalive=True)
        h.device_control(0, "surprise_removal", on=False)
        _wait(lambda: not h.inspect("worker/nics/0/missing"), 15, "the device is back (hot-add)")
        _flows_again(h, 10)
        (outcome,) = h.inspect("last_servicing/save_outcomes")
        assert outcome["save_outcome"] == "DeviceMissing", r
        old_relay = outcome["relay"]
        assert old_relay["tx_frames"] >= relay_before["tx_frames"]
        s, counted = _lost_and_counted(h, None, [old_relay])
        assert s["frames_lost"] == counted, (s, counted, old_relay)
    finally:
        h.stop()


def _lost_and_counted(h: HostRun, before: dict | None, old_relays: list[dict], uncounted: int = 0) -> tuple[dict, int]:
    """(the guest's traffic stats, frames the drop counters account for since `before`, or since the start), once
    the losses exceed the count by `uncounted` at most (`until_accounted`)."""
    h.traffic("stop")

    def read():
        s = h.traffic("stats", settle_ms=100)["nics"][0]
        counters = h.device_control(0, "counters")["counters"]
        rings = h.inspect("host/rings/0")
        relay = h.inspect("worker/nics/0/relay")
        return s, (rings["tx"]["dropped_full"] + rings["rx"]["dropped_full"]
                   + sum(counters[k] - (before["device"][k] if before else 0) for k in DEVICE_DROPS)
                   + sum(r[k] for r in (*old_relays, relay)
                         for k in ("tx_dropped_bad_frame", "rx_dropped_too_big", "tx_stranded")))

    return until_accounted(read, uncounted)


def test_a_replacement_does_not_resume_a_kept_vport_its_killed_predecessor_moved_on(tmp_path):
    """chaos seed 1, servicing 865: under data-path keepalive the new worker resumes the kept vport and starts
    its relay before the deferred HWC probe, so a kill at `restore.hwc` comes after its relay moved frames: it
    consumed completions and posted sends the saved state does not record. The host gave the replacement the
    same saved state, which resumed the vport at the stale positions: it reaped completions of sends it never
    posted (tx_outstanding -16) and re-read receive completions its predecessor had delivered (28 frames
    twice, 29 lost). Once guest IO moved since the handoff, the saved state is stale: the replacement starts
    without it (the NIC comes back through FLR, DESIGN D4), and what the killed worker held is lost with it
    (at most the vport's buffers), never delivered twice. The HWC is stalled until the restoring worker's relay
    has moved the guest's tx ring (so it surely ran before the kill; a fixed 50 ms from the request could end
    before a loaded machine's restore began), and moved fewer frames than its queues hold (a stale state that
    far behind is caught by the overflow check of the CQ)."""
    h = HostRun(tmp_path / "run", "--datapath-keepalive")
    try:
        h.service(mana_keepalive=True)  # the vport is in the pool from now on
        h.traffic("start", rate=1000, size=128)
        _wait(lambda: h.traffic("status")["agents"][0]["received"] > 100, 10, "traffic flows")
        before = {"device": h.device_control(0, "counters")["counters"]}
        h.device_control(0, "hwc_stall", on=True)
        done: dict = {}
        svc = threading.Thread(target=lambda: done.update(h.service(mana_keepalive=True, kill_point="restore.hwc")))
        svc.start()
        try:
            # The old worker's relay stopped in the save; a move of the tx ring's worker side after the restore
            # began is the new worker's relay (its HWC probe, and the kill after it, wait for the stall's end).
            _wait(lambda: (h.status(wait=5)["servicing"] or {}).get("phase") == "restore" or not svc.is_alive(),
                  60, "the restore begins")
            head = h.inspect("host/rings/0/tx/head")
            _wait(lambda: h.inspect("host/rings/0/tx/head") > head or not svc.is_alive(), 8,
                  "the restoring worker's relay moves frames")
            assert svc.is_alive(), done
        finally:
            h.device_control(0, "hwc_stall", on=False)
            svc.join(120)
        r = done
        assert "restore.hwc" in h.worker_log(h.status()["worker"]["generation"] - 1)
        n = r["nics"][0]
        assert n["restore_path"] != "keepalive", r  # not the stale state
        _flows_again(h, 15)
        old_relays = [o["relay"] for o in h.inspect("last_servicing/save_outcomes")]
        s, counted = _lost_and_counted(h, before, old_relays, uncounted=64 + 128)  # the killed worker's vport
        assert s["duplicated"] == 0 and s["unknown"] == 0, s
        assert counted <= s["frames_lost"] <= counted + 64 + 128, (s, counted)  # at most
    finally:
        h.stop()


def test_sends_whose_doorbell_a_briefly_removed_device_lost_are_rung_again(mem):
    """chaos seed 1, servicings 739-741: a device removed for 50 ms, too short for the worker's presence poll,
    lost the SQ doorbell of the sends the relay posted meanwhile. Nothing rang it again: with every send buffer
    posted and none completing, the relay waited for TX completions for good, and the kept vport carried the
    stall through two keepalive servicings. A send queue with work outstanding and no completion for
    `TX_TIMEOUT_S` has its doorbells rung again (a tail the device already has is ignored, gdma spec 4.3)."""
    bench = InProcessBench(mem)
    dev = ManaDevice.new(bench.connect(DmaManager(mem), "nic0"), "nic0")
    data = dev.open_vport(0).data
    channel = NicChannel.create(mem, ChannelLayout(nics=1, slots=16, slot_size=2048), 0)
    relay = NetRelay(channel, data, "nic0")
    relay.start()
    try:
        bench.device.removed = True  # writes go nowhere; the driver reads nothing that would tell it
        sent = numbered_frames(12)
        assert channel.tx.push_many(sent) == 12
        channel.tx.doorbell.ring()
        _wait(lambda: not len(channel.tx) and data.tx_outstanding == 12, 5, "the relay posted the sends")
        bench.device.removed = False
        _wait(lambda: len(channel.rx) == 12, 10, "the lost sends are sent (loopback: they come back)")
        assert sorted(bytes(f[12:]) for f in channel.rx.pop_many(12)) == sorted(f[12:] for f in sent)
        assert data.tx_timeouts >= 1
    finally:
        relay.stop()
        dev.shutdown()
        channel.close()
        bench.device.close()


def test_a_function_reset_behind_the_workers_back_is_found_by_the_tx_watchdog(tmp_path):
    """An FLR behind the worker's back outside a servicing (the campaign's `device_reset` fault when it lands
    after the restore) took the function's HWC and queues, and nothing the worker reads showed it: the NIC
    stayed dead. Sends that the device no longer completes even after the TX watchdog rang their doorbells
    again (`TX_HUNG_TIMEOUTS` timeouts in a row) make the NIC reset the function and come up fresh; the sends
    lost with the old queues are counted (`tx_stranded`)."""
    h = HostRun(tmp_path / "run")
    try:
        h.traffic("start", rate=1000, size=128)
        _wait(lambda: h.traffic("status")["agents"][0]["received"] > 100, 10, "traffic flows")
        before = {"device": h.device_control(0, "counters")["counters"]}
        h.device_control(0, "reset_function")
        _flows_again(h, 20)
        assert h.inspect("worker/nics/0/relay_failure_resets") == 1
        s, counted = _lost_and_counted(h, before, [])
        assert s["frames_lost"] > 0  # the reset did cost frames
        assert s["frames_lost"] == counted and s["duplicated"] == 0 and s["unknown"] == 0, (s, counted)
    finally:
        h.stop()


def test_a_queue_the_device_overflowed_stops_the_relay_as_a_device_failure(mem):
    """The relay once died with QueueOverflow on its vport's EQ (after a hot-add under load) and the NIC stayed
    dead until the next servicing. A relay stopped by a device error other than DeviceMissing flags
    `device_failed`, on which the NIC resets the function and comes up fresh (as for a hung send queue,
    test above). Here the RX CQ's next entry carries an owner count two laps ahead."""
    from vfkeep.gdma.constants import OWNER_COUNT_SHIFT_IN_LAST_BYTE, OWNER_MASK
    bench = InProcessBench(mem)
    dev = ManaDevice.new(bench.connect(DmaManager(mem), "nic0"), "nic0")
    data = dev.open_vport(0).data
    channel = NicChannel.create(mem, ChannelLayout(nics=1, slots=16, slot_size=2048), 0)
    relay = NetRelay(channel, data, "nic0")
    try:
        cq = data.queues.rx_cq
        last = (cq.next & (cq.size - 1)) + cq.entry_size - 1
        cq.mem[last] = (((cq.next // cq.size) + 2) & OWNER_MASK) << OWNER_COUNT_SHIFT_IN_LAST_BYTE
        relay.start()
        _wait(lambda: relay.error is not None, 5, "the relay stops")
        assert "QueueOverflow" in relay.error and relay.device_failed and not relay.device_missing
    finally:
        relay.stop()
        dev.shutdown()
        channel.close()
        bench.device.close()


def test_a_restore_kill_point_the_restore_did_not_reach_is_disarmed_once_it_is_over(tmp_path):
    """chaos seed 1, servicings 534-535: the next worker was armed to die at `restore.vport`, which a kept vport's
    restore never reaches (it opens no vport), so it survived that servicing — and died at run time when a hot-add
    opened a vport during the next one, taking 64 frames with it uncounted. A restore kill point is for the
    restore: the worker disarms it once `started` is sent."""
    h = HostRun(tmp_path / "run", "--datapath-keepalive")
    try:
        h.service(mana_keepalive=True)  # the vport is in the pool from now on
        r = h.service(mana_keepalive=True, kill_point="restore.vport")
        assert r["status"] == "ok" and r["nics"][0]["restore_path"] == "keepalive", r  # never reached
        generation = h.status()["worker"]["generation"]
        h.device_control(0, "raise_reset_request")  # EQE 135: the NIC is re-created, a vport opened
        _wait(lambda: h.inspect("worker/nics/0/vf_resets") == 1, 15, "the NIC is re-created by the same worker")
        assert h.status()["worker"]["generation"] == generation
        assert "kill point reached" not in h.worker_log(generation)
        assert h.probe()["ok"]
    finally:
        h.stop()


class _Killed(BaseException):
    """The worker's SIGKILL, in-process: nothing of the relay catches it."""


def test_frames_a_killed_worker_rang_into_a_downed_link_are_not_sent_again(mem, monkeypatch):
    """chaos seed 1, servicing 906 (tree 0ef0466; new worker killed at `restore.started` during a 1 s link
    flap): 41 frames lost, 43 in the drop counters. The killed worker's relay had rung the SQ doorbell for frames
    it copied straight from the guest's tx ring slots but had not yet released the slots; the device dropped them
    (link down: `tx_dropped_link_down`), and the replacement's relay found them still in the ring and sent them
    again, delivered once the link was up: counted as dropped and delivered. A frame leaves the tx ring before the
    doorbell that sends it, so a kill loses it at most (counted by the device or by no one), never sends it twice.
    Here the worker dies just after its first SQ doorbell, with the link down; the replacement starts fresh (the
    function reset, a new vport) with the link up again."""
    bench = InProcessBench(mem)
    link = bench.device.vports[0]
    channel = NicChannel.create(mem, ChannelLayout(nics=1, slots=16, slot_size=2048), 0)
    sent = numbered_frames(12)
    killed = ManaDevice.new(bench.connect(DmaManager(mem), "nic0"), "nic0")
    replacement = None
    try:
        relay = NetRelay(channel, killed.open_vport(0).data, "nic0")
        sq = relay.datapath.queues.sq
        commit = sq.commit

        def doorbell_then_die(*args, **kwargs):
            commit(*args, **kwargs)
            raise _Killed

        monkeypatch.setattr(sq, "commit", doorbell_then_die)
        link.link_up = False
        assert channel.tx.push_many(sent) == 12
        with pytest.raises(_Killed):
            relay._pump()  # the relay's pass, on this thread: it dies at its first SQ doorbell
        assert bench.device.counters["tx_dropped_link_down"] == 12
        link.link_up = True
        bench.device.flr("the replacement's fresh init")
        replacement = ManaDevice.new(bench.connect(DmaManager(mem), "nic0"), "nic0")
        relay = NetRelay(channel, replacement.open_vport(0).data, "nic0")
        relay._pump()
        relay._drain()  # hands the guest what came back (the in-process loopback answered the doorbell)
        received = {bytes(f[12:]) for f in channel.rx.pop_many(16)}
        lost = len({f[12:] for f in sent} - received)
        counted = (bench.device.counters["tx_dropped_link_down"] + channel.tx.stats().dropped_full
                   + channel.rx.stats().dropped_full + relay.stats.tx_dropped_bad_frame
                   + relay.stats.rx_dropped_too_big + relay.stats.tx_stranded)
        assert (lost, counted) == (12, 12), f"{len(received)} of the counted frames delivered too"
    finally:
        if replacement is not None:
            replacement.shutdown()
        channel.close()
        bench.device.close()


def test_a_fault_fired_by_a_late_phase_event_does_not_outlive_its_servicing(tmp_path):
    """CI (chaos seed 1, servicing 23, keepalive + data path): the surprise removal armed for the restore was fired
    by the campaign's event thread while the host had already answered the servicing; `_disarm` found nothing to
    undo yet, the fault's timer was registered after it, and the device stayed removed into the checks: the guest's
    last sends waited in the SQ of a removed device and were counted lost (3 frames, no drop counter). A fault being
    fired now holds `_disarm` off until it can be undone, and a phase event read once the servicing is over fires
    nothing."""
    from vfkeep.chaos import Campaign

    calls: list[tuple[str, bool | None]] = []
    in_action, release = threading.Event(), threading.Event()

    def device(nic, cmd, **args):
        calls.append((cmd, args.get("on")))
        if cmd == "surprise_removal" and args.get("on"):
            in_action.set()
            assert release.wait(10), "the test never released the fault"

    c = Campaign(str(tmp_path / "run"), nics=1, seed=1)
    c.device = device
    with c._lock:
        c._armed = True
    c._arm({"kind": "surprise_removal", "nic": 0, "trigger": "restore", "ms": 500})
    events = threading.Thread(target=c._fire, args=("restore",))  # the event thread, reading phase_done late
    events.start()
    assert in_action.wait(10)
    disarm = threading.Thread(target=c._disarm)  # the servicing was answered meanwhile
    disarm.start()
    disarm.join(0.2)
    assert disarm.is_alive(), "disarm returned while a fault was being fired"
    release.set()
    events.join(10)
    disarm.join(10)
    assert not events.is_alive() and not disarm.is_alive()
    assert calls == [("surprise_removal", True), ("surprise_removal", False), ("clear_faults", None)], calls
    assert c._undo == [] and c._pending == {}

    c._arm({"kind": "surprise_removal", "nic": 0, "trigger": "restore", "ms": 500})  # armed, then the servicing ends
    c._disarm()
    c._pending["restore"] = [lambda: calls.append(("late", None))]  # (as if armed again without a servicing)
    c._fire("restore")
    assert ("late", None) not in calls, "a phase event fired a fault outside any servicing"
