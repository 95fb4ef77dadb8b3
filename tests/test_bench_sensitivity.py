"""bench_sensitivity: its floor (every step of the critical path in it), its summary over cells whose servicings the
guest traffic did not all measure, the kept-state steps it measures, and its arguments."""
import pytest

from benchmarks import bench_sensitivity as bench
from vfkeep import proc
from vfkeep.device.main import start_device
from vfkeep.device.timing import DeviceTiming
from vfkeep.memory import GuestMemory, MemoryLayout

#: Fixed costs, each a distinct power of two (ms), so that a floor's value tells which of them it counts.
COSTS = {"save_kept_ms": 1, "handoff_ms": 2, "scrub_ms": 4, "reconnect_ms": 8, "restore_kept_ms": 16,
         "relay_start_ms": 32, "request_ms": 64}
#: What each path's floor counts of them: the save tail and restore measured whole for the kept state, else the relay
#: start only; the larger of scrub and reconnect where the next worker attaches ahead (during the scrub), else both.
PATH_COSTS = {"reset-flr": ("handoff_ms", "scrub_ms", "reconnect_ms", "relay_start_ms"),
              "reset": ("handoff_ms", "scrub_ms", "reconnect_ms", "relay_start_ms"),
              "keepalive": ("handoff_ms", "reconnect_ms", "relay_start_ms"),
              "keepalive+datapath": ("save_kept_ms", "handoff_ms", "reconnect_ms", "restore_kept_ms")}


def _sample(blackout, late: int = 0):
    """`late`: deferred requests this servicing's blackout outlasted (counted as waited for)."""
    counts = {k: (0 if k.endswith("device_resets") else 4 + (late if k.startswith("critical_") else 0))
              for k in bench.COUNTS}
    return {"blackout_ms": blackout, "frames_lost": 0, **counts}


def test_an_unmeasured_servicing_is_counted_and_the_rest_summarised(monkeypatch):
    """One servicing per path without a measurement: the row counts it and summarises the others (it crashed on
    unpacking the raw samples after every cell had run); the floor from the fewest round trips waited for."""
    cell = {p: [_sample(10.0), _sample(None), _sample(12.0, late=1), _sample(14.0, late=1)] for p in bench.ORDER}
    quiet = {"rtt_ms": 0.5, "blackout_ms": 0.75}
    monkeypatch.setattr(bench, "measure_cell", lambda timing, repeat, rate: (cell, quiet, b"blob"))
    monkeypatch.setattr(bench, "fixed_cost_samples", lambda blob: {
        "request": [0.25] * 10, "reconnect": [0.5] * 10, "scrub": [0.25] * 10, "handoff": [0.25] * 10 if blob else [],
        "save_kept": [0.125] * 10, "restore_kept": [0.375] * 10, "relay_start": [0.125] * 10})
    rows, costs = bench.run([1.0], [100.0], 3, 1000.0)
    assert [r["path"] for r in rows] == list(bench.ORDER)
    # handoff + scrub and reconnect (in series, or the larger when the attach goes ahead) + the restore's part + the
    # save tail's, by path
    steps = {"reset-flr": 0.25 + 0.75 + 0.125, "reset": 0.25 + 0.75 + 0.125, "keepalive": 0.25 + 0.5 + 0.125,
             "keepalive+datapath": 0.125 + 0.25 + 0.5 + 0.375}
    for r in rows:
        assert r["unmeasured"] == 1 and r["blackout_ms"]["median"] == 12.0, r
        # + (4 HWC requests + 4 SMC messages) x one round trip + 4 HWC requests x the modelled latency
        # + one data round trip of the undisturbed traffic; the round trips waited for: the fewest of any servicing
        # (two slow ones that also waited for a deferred request do not raise it)
        assert r["floor_ms"] == steps[r["path"]] + (4 + 4) * 0.25 + 4 * 1.0 + 0.5
        assert r["floor_ms"] == round(sum(r["floor_terms_ms"].values()), 3)
        # beside it, the floor as defined up to session 13: handoff + scrub + reconnect, no save tail, no restore
        assert r["old_floor_ms"] == 0.25 + 0.75 + (4 + 4) * 0.25 + 4 * 1.0 + 0.5
        assert r["over_old_floor"] == round(12.0 / r["old_floor_ms"], 2)
        assert r["datapath_rtt_ms"] == 0.5 and r["undisturbed_blackout_ms"] == 0.75
    assert "(1.55x; old 1.60x, 1 unmeasured)" in bench.markdown(rows, bench.cell_ratios(rows))


@pytest.mark.parametrize("path", bench.ORDER)
def test_the_floor_counts_each_step_of_the_path_once(path):
    """The floor is the sum of the path's steps: each fixed cost that is on its critical path counts once, the others
    not at all; dropping any step from the floor (or counting one the path does not wait for) fails here."""
    counts = {"critical_hwc_requests": 3, "critical_smc_messages": 2, "critical_device_resets": 1}
    timing = DeviceTiming(hwc_latency_ms=128.0, flr_ms=256.0)
    device = 5 * COSTS["request_ms"] + 3 * 128 + 256

    def critical_path(path, c):
        """The steps written out: save tail, handoff, scrub and reconnect, restore, device round trips."""
        ahead = path in ("keepalive", "keepalive+datapath")
        kept = path == "keepalive+datapath"
        return ((c["save_kept_ms"] if kept else 0) + c["handoff_ms"]
                + (max(c["scrub_ms"], c["reconnect_ms"]) if ahead else c["scrub_ms"] + c["reconnect_ms"])
                + (c["restore_kept_ms"] if kept else c["relay_start_ms"]) + 5 * c["request_ms"] + 3 * 128 + 256)
    floor = bench.floor_ms(path, counts, timing, COSTS, 512.0)
    assert floor == sum(COSTS[k] for k in PATH_COSTS[path]) + device + 512
    for key in COSTS:  # any one cost raised: the floor follows it exactly where the path is on it
        costs = {**COSTS, key: COSTS[key] + 1024}
        assert bench.floor_ms(path, counts, timing, costs, 512.0) == critical_path(path, costs) + 512, key
    assert bench.old_floor_ms(counts, timing, COSTS, 512.0) == 2 + 4 + 8 + device + 512


def test_the_overlapped_scrub_and_reconnect_count_the_larger():
    """Where the attach goes ahead during the scrub, the larger of the two is on the path, whichever it is."""
    counts = {f"critical_{k}": 0 for k in ("hwc_requests", "smc_messages", "device_resets")}
    timing = DeviceTiming(hwc_latency_ms=0.0, flr_ms=0.0)
    for scrub, reconnect in ((4, 8), (8, 4)):
        terms = bench.floor_terms("keepalive+datapath", counts, timing,
                                  {**COSTS, "scrub_ms": scrub, "reconnect_ms": reconnect}, 0.0)
        assert terms["scrub_reconnect"] == 8
        assert bench.floor_terms("reset", counts, timing,
                                 {**COSTS, "scrub_ms": scrub, "reconnect_ms": reconnect}, 0.0)["scrub_reconnect"] == 12


def test_kept_steps_are_a_keepalive_restore_without_device_requests(tmp_path):
    """The kept-state steps run the workers' code through real data-path keepalive servicings of one NIC against a
    device process: each sample restores on the keepalive path with its kept vport (else the benchmark raises), and
    no HWC request or SMC message falls inside the steps (their round trips are counted apart); the relay's start is
    a part of the restore."""
    sock = str(tmp_path / "nic.sock")
    device = start_device(sock, "--timing", "natural", "--reset-method", "none", "--run-dir", str(tmp_path))
    layout = MemoryLayout(guest_pages=bench.CHANNELS.total_pages, worker_pages=64, pool_pages=512)
    try:
        with GuestMemory.create(layout) as mem:
            samples = bench.kept_steps_ms(sock, mem, 3)
    finally:
        proc.end(device)
    assert {k: len(v) for k, v in samples.items()} == {"save_kept": 3, "restore_kept": 3, "relay_start": 3}
    assert all(x > 0 for v in samples.values() for x in v)
    assert all(r >= s for r, s in zip(samples["restore_kept"], samples["relay_start"]))


def test_fixed_costs_pool_batches_so_one_disturbed_batch_does_not_set_the_floor():
    """A batch measured while something else held the CPUs (every request 0.72 ms) beside one that was not: the
    cost is the 10th percentile of the pooled samples (about the quiet batch's), each batch's kept beside it; the
    handoff from the batches that had a saved state only."""
    kept = {"save_kept": [0.3] * 25, "restore_kept": [0.5] * 25, "relay_start": [0.07] * 25}
    quiet = {"request": [0.34 + i / 1000 for i in range(100)], "reconnect": [1.3] * 50, "scrub": [0.9] * 25,
             "handoff": [], **kept}
    disturbed = {"request": [0.72] * 100, "reconnect": [1.3] * 50, "scrub": [0.9] * 25, "handoff": [0.03] * 100,
                 **kept}
    costs = bench.fixed_costs([quiet, disturbed], 752)
    assert 0.34 <= costs["request_ms"] < 0.4 and costs["request_batches_ms"] == [0.349, 0.72]
    assert costs["handoff_ms"] == 0.03 and costs["handoff_batches_ms"] == [0.03]
    assert (costs["save_kept_ms"], costs["restore_kept_ms"], costs["relay_start_ms"]) == (0.3, 0.5, 0.07)
    assert costs["blob_bytes"] == 752


def test_a_floor_above_its_median_is_said_not_to_be_a_lower_bound():
    """A floor above the measured median is not the lower bound it claims to be: the table says so by name and
    the JSON lists it, rather than printing 0.9x as if it were a result."""
    def row(path, median, floor):
        return {"timing": {"flr_ms": 100.0, "hwc_latency_ms": 1.0}, "path": path, "floor_ms": floor,
                "blackout_ms": {"median": median, "p95": median, "n": 10}, "over_floor": round(median / floor, 2),
                "over_old_floor": round(median / floor, 2), "unmeasured": 0}
    rows = [row("reset-flr", 138.6, 139.0), row("reset", 38.2, 41.5), row("keepalive", 33.3, 30.0),
            row("keepalive+datapath", 6.5, 3.7)]
    assert [b["path"] for b in bench.floors_above_median(rows)] == ["reset-flr", "reset"]
    text = bench.markdown(rows, bench.cell_ratios(rows))
    assert "NOT A LOWER BOUND" in text and "reset (FLR 100, HWC 1: 0.92x)" in text and "keepalive (" not in text
    rows[0]["floor_ms"] = rows[1]["floor_ms"] = 1.0
    assert not bench.floors_above_median(rows) and "NOT A LOWER BOUND" not in bench.markdown(rows, bench.cell_ratios(rows))


@pytest.mark.parametrize("args, says", [
    (["--latencies", "x"], "--latencies: comma-separated numbers of ms expected"),
    (["--latencies", "1,99999"], "--latencies: each value must be in [0, 10000] ms"),
    (["--flrs", "-5"], "--flrs: each value must be in [0, 60000] ms"),
    (["--repeat", "0"], "--repeat: must be at least 1"),
    (["--rate", "0"], "--rate: must be at least 1"),
])
def test_bad_arguments_are_a_usage_error_before_anything_runs(args, says, monkeypatch, capsys):
    """A bad sweep is refused with one usage line (exit 2), not a traceback after a host was booted."""
    monkeypatch.setattr(bench, "run", lambda *a: pytest.fail("the benchmark ran"))
    with pytest.raises(SystemExit) as e:
        bench.main(args)
    assert e.value.code == 2 and says in capsys.readouterr().err
