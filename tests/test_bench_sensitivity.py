"""bench_sensitivity: its summary over cells whose servicings the guest traffic did not all measure, and its arguments."""
import pytest

from benchmarks import bench_sensitivity as bench


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
        "request": [0.25] * 10, "reconnect": [0.5] * 10, "scrub": [0.25] * 10, "handoff": [0.25] * 10 if blob else []})
    rows, costs = bench.run([1.0], [100.0], 3, 1000.0)
    assert [r["path"] for r in rows] == list(bench.ORDER) and costs["fixed_ms"] == 1.0
    for r in rows:
        assert r["unmeasured"] == 1 and r["blackout_ms"]["median"] == 12.0, r
        # fixed + (4 HWC requests + 4 SMC messages) x one round trip + 4 HWC requests x the modelled latency
        # + one data round trip of the undisturbed traffic; the round trips waited for: the fewest of any servicing
        # (two slow ones that also waited for a deferred request do not raise it)
        assert r["floor_ms"] == 1.0 + (4 + 4) * 0.25 + 4 * 1.0 + 0.5
        assert r["datapath_rtt_ms"] == 0.5 and r["undisturbed_blackout_ms"] == 0.75


def test_fixed_costs_pool_batches_so_one_disturbed_batch_does_not_set_the_floor():
    """A batch measured while something else held the CPUs (every request 0.72 ms) beside one that was not: the
    cost is the 10th percentile of the pooled samples (about the quiet batch's), each batch's kept beside it; the
    handoff from the batches that had a saved state only."""
    quiet = {"request": [0.34 + i / 1000 for i in range(100)], "reconnect": [1.3] * 50, "scrub": [0.9] * 25,
             "handoff": []}
    disturbed = {"request": [0.72] * 100, "reconnect": [1.3] * 50, "scrub": [0.9] * 25, "handoff": [0.03] * 100}
    costs = bench.fixed_costs([quiet, disturbed], 752)
    assert 0.34 <= costs["request_ms"] < 0.4 and costs["request_batches_ms"] == [0.349, 0.72]
    assert costs["handoff_ms"] == 0.03 and costs["handoff_batches_ms"] == [0.03]
    assert costs["fixed_ms"] == round(0.03 + 0.9 + 1.3, 4) and costs["blob_bytes"] == 752


def test_a_floor_above_its_median_is_said_not_to_be_a_lower_bound():
    """A floor above the measured median is not the lower bound it claims to be: the table says so by name and
    the JSON lists it, rather than printing 0.9x as if it were a result."""
    def row(path, median, floor):
        return {"timing": {"flr_ms": 100.0, "hwc_latency_ms": 1.0}, "path": path, "floor_ms": floor,
                "blackout_ms": {"median": median, "p95": median, "n": 10}, "over_floor": round(median / floor, 2),
                "unmeasured": 0}
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
