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
    monkeypatch.setattr(bench, "fixed_costs", lambda blob: {"fixed_ms": 1.0, "request_ms": 0.25})
    rows, costs = bench.run([1.0], [100.0], 3, 1000.0)
    assert [r["path"] for r in rows] == list(bench.ORDER) and costs["fixed_ms"] == 1.0
    for r in rows:
        assert r["unmeasured"] == 1 and r["blackout_ms"]["median"] == 12.0, r
        # fixed + (4 HWC requests + 4 SMC messages) x one round trip + 4 HWC requests x the modelled latency
        # + one data round trip of the undisturbed traffic; the round trips waited for: the fewest of any servicing
        # (two slow ones that also waited for a deferred request do not raise it)
        assert r["floor_ms"] == 1.0 + (4 + 4) * 0.25 + 4 * 1.0 + 0.5
        assert r["datapath_rtt_ms"] == 0.5 and r["undisturbed_blackout_ms"] == 0.75


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
