"""The declared device timing model (DESIGN D9): parameters, presets, and that they reach the device.

Modelled time is checked from the device's own counters (requests x latency), never the wall clock.
"""
import json
import time
from pathlib import Path

import pytest

from device_driver_helper import Pages, TestDriver, in_process_device, wait_eventfd
from driver_helpers import HeldLoop
from servicing_helpers import HostRun
from vfkeep import proc
from vfkeep.device.hwc import ANSWER_EARLY_S
from vfkeep.device.main import start_device
from vfkeep.device.timing import PRESETS, DeviceTiming, timing_from
from vfkeep.gdma.constants import DB_CQ, DB_EQ, GDMA_EQE_TEST_EVENT, GDMA_GENERATE_TEST_EQE, GDMA_QUERY_MAX_RESOURCES
from vfkeep.gdma.requests import GdmaGenerateTestEventReq
from vfkeep.driver.mana import ManaDevice
from vfkeep.memory import DmaManager, MemoryLayout
from vfkeep.paravisor.vf_manager import nic_dma_clients
from vfkeep.vfio_user import control_call
from vfkeep.vfio_user.backing import open_vfio
from vfkeep.nvme_device.core import make_timing

LAYOUT = MemoryLayout(guest_pages=64, worker_pages=256, pool_pages=0)


def test_presets_are_named_values_and_overrides_make_custom():
    assert timing_from("realistic") == DeviceTiming(hwc_latency_ms=1.0, flr_ms=100.0)
    assert timing_from("natural").to_dict() == {"preset": "natural", "hwc_latency_ms": 0.0, "flr_ms": 0.0}
    custom = timing_from("realistic", hwc_latency_ms=0.25)
    assert custom.to_dict() == {"preset": "custom", "hwc_latency_ms": 0.25, "flr_ms": 100.0}
    assert timing_from("natural", hwc_latency_ms=1, flr_ms=100).preset == "realistic"  # values, not the name
    assert DeviceTiming.from_dict(custom.to_dict()) == custom
    assert custom.to_args() == ["--hwc-latency-ms", "0.25", "--flr-ms", "100"]
    for bad in ({"hwc_latency_ms": -1}, {"flr_ms": -0.5}, {"hwc_latency_ms": 10_001}):
        with pytest.raises(ValueError, match="must be in"):
            DeviceTiming(**bad)
    assert set(PRESETS) == {"natural", "realistic"}


def test_every_timing_object_names_its_preset_under_one_key():
    """MANA and NVMe devices, results, demo and benchmark JSON all say `preset` (the NVMe one said `name`)."""
    assert make_timing("realistic").to_dict() == {"preset": "realistic", "enable_ms": 100.0, "disable_ms": 20.0,
                                                  "flr_ms": 100.0, "admin_ms": 1.0}
    assert make_timing("natural", admin_ms=2).to_dict()["preset"] == "custom"
    assert make_timing("natural", admin_ms=0).to_dict()["preset"] == "natural"  # values, not the name

    def timings(node):
        if isinstance(node, dict):
            yield from ([node["timing"]] if isinstance(node.get("timing"), dict) else [])
            for v in node.values():
                yield from timings(v)
        elif isinstance(node, list):
            for v in node:
                yield from timings(v)
    results = Path(__file__).resolve().parent.parent / "benchmarks" / "results"
    for path in results.glob("*.json"):
        for t in timings(json.loads(path.read_text())):
            assert "preset" in t and "name" not in t, (path.name, t)


def test_in_process_device_models_the_declared_latency(mem):
    loop = HeldLoop()
    device, port = in_process_device(mem, loop=loop, timing=DeviceTiming(hwc_latency_ms=0.25, flr_ms=10),
                                     reset_method="flr")
    drv = TestDriver(port, mem, Pages(mem, mem.layout.worker), timeout=0.2)
    drv.establish_hwc()
    drv.irq(0)
    drv.mem.write(drv.req_page, bytes(40))
    with pytest.raises(TimeoutError):  # the answer waits for the loop
        drv.send_request(GDMA_QUERY_MAX_RESOURCES)
    assert [d for d, _ in loop.timers] == [0.00025]
    loop.timers.pop()[1]()
    assert drv.hwc_cq.poll() is not None
    assert device.counters["modelled_hwc_ms_total"] == device.counters["hwc_requests"] * 0.25 == 0.25
    device.flr("test")
    device.flr("test")
    assert device.counters["modelled_flr_ms_total"] == 20 and device.counters["reset_count"] == 2
    assert device.inspect()["timing"] == {"preset": "custom", "hwc_latency_ms": 0.25, "flr_ms": 10.0}


def test_a_delayed_request_raises_its_effects_interrupts_with_its_answer(mem):
    """GENERATE_TEST_EQE posts its event when the device takes the request, but vector 0 fires only with the
    answer, after the modelled latency: the driver is woken once per request, not by the event and then again."""
    loop = HeldLoop()
    device, port = in_process_device(mem, loop=loop, timing=DeviceTiming(hwc_latency_ms=1, flr_ms=0))
    drv = TestDriver(port, mem, Pages(mem, mem.layout.worker), timeout=0.1)
    drv.establish_hwc()
    wait_eventfd(drv.irq(0), 0)  # the bring-up events' interrupt
    before = device.counters["interrupts"]
    drv.ring_cq_eq(DB_CQ, drv.hwc_cq, arm=True)  # armed before the request, as vfkeep's driver does
    drv.ring_cq_eq(DB_EQ, drv.hwc_eq, arm=True)
    with pytest.raises(TimeoutError):  # no interrupt until the answer
        drv.send_request(GDMA_GENERATE_TEST_EQE, GdmaGenerateTestEventReq(queue_index=drv.hwc_eq.id).to_bytes())
    assert drv.wakeups == 0 and device.counters["interrupts"] == before
    loop.timers.pop()[1]()  # the latency has passed: the answer
    assert device.counters["interrupts"] > before and wait_eventfd(drv.irq(0), 0)
    assert drv.hwc_cq.poll() is not None and drv.hwc_cq.poll() is not None
    drv.drain_eq(drv.hwc_eq)
    assert [ty for ty, _ in drv.events] == [GDMA_EQE_TEST_EVENT]
    assert device.counters["modelled_hwc_ms_total"] == device.counters["hwc_requests"] * 1 == 1


def test_a_delayed_answer_is_written_before_it_is_due_and_only_published_then(mem):
    """When the answer's timer fires (`ANSWER_EARLY_S` before the due time) the device writes the response and the
    two CQEs but their owner bytes, its Python work for the answer; what it does at the due time is only the owner
    bytes and the notification. Until then the driver sees no CQE, no completion EQE and no interrupt."""
    loop = HeldLoop()
    device, port = in_process_device(mem, loop=loop, timing=DeviceTiming(hwc_latency_ms=1, flr_ms=0))
    drv = TestDriver(port, mem, Pages(mem, mem.layout.worker), timeout=0.1)
    drv.establish_hwc()
    wait_eventfd(drv.irq(0), 0)
    drv.ring_cq_eq(DB_CQ, drv.hwc_cq, arm=True)
    drv.ring_cq_eq(DB_EQ, drv.hwc_eq, arm=True)
    with pytest.raises(TimeoutError):
        drv.send_request(GDMA_QUERY_MAX_RESOURCES)
    hwc, seen = device.hwc, {}
    stage = hwc._stage_answer

    def watched_stage(rwqe, response):
        publish = stage(rwqe, response)
        seen["staged"] = (drv.mem.read(drv.resp_page, len(response)) == response, drv.hwc_cq.poll(),
                          drv.hwc_eq.poll(), device.counters["interrupts"])
        return publish
    hwc._stage_answer = watched_stage
    before = device.counters["interrupts"]
    loop.timers.pop()[1]()
    assert seen["staged"] == (True, None, None, before)  # written, but nothing a driver can see
    assert drv.hwc_cq.poll() is not None and drv.hwc_cq.poll() is not None and drv.hwc_cq.poll() is None
    assert device.counters["interrupts"] == before + 1 and wait_eventfd(drv.irq(0), 0)
    assert drv.drain_eq(drv.hwc_eq) == 1


def test_the_latency_runs_from_the_arrival_of_the_requests_doorbell(mem):
    """Over a transport the device knows when a doorbell message had arrived (`received_at`: its socket read); the
    answer is due the modelled latency after that, not after the device got round to taking the request, so its
    own wake-up and work fall inside the latency. The timer is set `ANSWER_EARLY_S` before the answer is due (a
    timer fires late) and the device waits out the rest: a timer that fires early still answers no earlier. A
    request that waited longer than the latency (a stall) is answered at once; each counts the whole latency."""
    loop = HeldLoop()
    arrived = [0.0]
    device, port = in_process_device(mem, loop=loop, timing=DeviceTiming(hwc_latency_ms=100, flr_ms=0),
                                     received_at=lambda: arrived[0])
    drv = TestDriver(port, mem, Pages(mem, mem.layout.worker), timeout=0.01)
    drv.establish_hwc()
    drv.irq(0)
    drv.mem.write(drv.req_page, bytes(40))
    for ago, due in ((0.025, (0.05, 0.075 - ANSWER_EARLY_S)), (0.2, (0.0, 0.0))):
        arrived[0] = time.monotonic() - ago
        with pytest.raises(TimeoutError):  # the answer waits for the loop
            drv.send_request(GDMA_QUERY_MAX_RESOURCES)
        (delay, answer), = loop.timers
        assert due[0] <= delay <= due[1], (ago, delay)
        loop.timers.clear()
        answer()  # at once, i.e. early: it waits until the latency has passed
        assert time.monotonic() >= arrived[0] + 0.1
        assert drv.hwc_cq.poll() is not None and drv.hwc_cq.poll() is not None
        drv.post_hwc_rwqe()
    assert device.counters["modelled_hwc_ms_total"] == device.counters["hwc_requests"] * 100 == 200


def test_over_vfio_user_no_answer_comes_before_the_latency(tmp_path, mem):
    """Counted from the message's arrival, a request still takes at least the modelled latency from the driver's
    send (a lower bound, never flaky), and the device's counters say requests x latency."""
    sock = str(tmp_path / "nic.sock")
    device = start_device(sock, "--hwc-latency-ms", "30", "--run-dir", str(tmp_path))
    try:
        dev = ManaDevice.new(open_vfio(sock, mem, nic_dma_clients(DmaManager(mem, strict_pool=False), "t", False)),
                             "t")
        try:
            for _ in range(3):
                t = time.monotonic()
                dev.gdma.verify_vf_driver_version()
                assert time.monotonic() - t >= 0.030
        finally:
            dev.shutdown()
        c = control_call(sock + ".ctl", "counters")["counters"]
        assert c["hwc_requests"] >= 3 and c["modelled_hwc_ms_total"] == c["hwc_requests"] * 30
    finally:
        proc.end(device)


def test_run_passes_the_parameters_to_the_device_and_reports_them(tmp_path):
    host = HostRun(tmp_path / "run", "--hwc-latency-ms", "0.5", "--flr-ms", "20")
    try:
        want = {"preset": "custom", "hwc_latency_ms": 0.5, "flr_ms": 20.0}
        assert host.inspect("host/timing") == want
        before = host.device_control(0, "counters")["counters"]
        # Saved state the next worker does not restore: NoReset fails on the live HWC, FLR, fresh init.
        r = host.service(mana_keepalive=True, next_env={"OPENHCL_MANA_KEEP_ALIVE": "disabled"})
        assert r["ok"] and r["timing"] == want
        nic, = r["nics"]
        reply = host.device_control(0, "counters")
        c = reply["counters"]
        assert reply["timing"] == want
        assert nic["restore_path"] == "fresh" and nic["device_resets"] == c["reset_count"] - before["reset_count"] == 1
        assert nic["hwc_requests"] == c["hwc_requests"] - before["hwc_requests"] > 0
        assert c["modelled_hwc_ms_total"] == c["hwc_requests"] * 0.5
        assert c["modelled_flr_ms_total"] == c["reset_count"] * 20
    finally:
        host.stop()
