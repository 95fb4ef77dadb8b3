"""bench_sensitivity's summary over cells whose servicings the guest traffic did not all measure."""
from benchmarks import bench_sensitivity as bench


def _sample(blackout):
    counts = {k: (0 if k.endswith("device_resets") else 4) for k in bench.COUNTS}
    return {"blackout_ms": blackout, "frames_lost": 0, **counts}


def test_an_unmeasured_servicing_is_counted_and_the_rest_summarised(monkeypatch):
    """One servicing per path without a measurement: the row counts it and summarises the others (it crashed on
    unpacking the raw samples after every cell had run)."""
    cell = {p: [_sample(10.0), _sample(None), _sample(12.0)] for p in bench.ORDER}
    monkeypatch.setattr(bench, "measure_cell", lambda timing, repeat, rate: (cell, b"blob"))
    monkeypatch.setattr(bench, "fixed_costs", lambda blob: {"fixed_ms": 1.0, "request_ms": 0.25})
    rows, costs = bench.run([1.0], [100.0], 3, 1000.0)
    assert [r["path"] for r in rows] == list(bench.ORDER) and costs["fixed_ms"] == 1.0
    for r in rows:
        assert r["unmeasured"] == 1 and r["blackout_ms"]["median"] == 11.0, r
        # fixed + (4 HWC requests + 4 SMC messages) x one round trip + 4 HWC requests x the modelled latency
        assert r["floor_ms"] == 1.0 + (4 + 4) * 0.25 + 4 * 1.0
