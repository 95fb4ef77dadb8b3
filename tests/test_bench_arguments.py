"""Every benchmark refuses what it could not use with one usage line (exit 2) before anything runs: `--repeat 0`
ended in a `statistics` traceback (no median), an unwritable report path in a traceback after the whole run."""
import argparse
import importlib

import pytest

#: Each benchmark's report option.
REPORT = {"bench_blackout": "--out", "bench_driver": "--out", "bench_load": "--out", "bench_nvme": "--out",
          "bench_sensitivity": "--out", "bench_servicing": "--out", "bench_throughput": "--out",
          "trace_blackout": "--json"}


@pytest.mark.parametrize("name", sorted(REPORT))
def test_a_bad_report_path_or_repeat_is_refused_before_the_benchmark_runs(name, tmp_path, monkeypatch, capsys):
    bench = importlib.import_module(f"benchmarks.{name}")
    parse = argparse.ArgumentParser.parse_args

    def parse_only(self, *args, **kwargs):  # (accepted: the benchmark would run now)
        parse(self, *args, **kwargs)
        pytest.fail("accepted")

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_only)
    cases = [([REPORT[name], str(tmp_path)], "is a directory"),
             ([REPORT[name], "/proc/vfkeep-report.json"], "/proc refuses new entries")]
    if name != "bench_throughput":  # (it has no --repeat)
        cases.append((["--repeat", "0"], "--repeat: must be at least 1"))
    for args, says in cases:
        with pytest.raises(SystemExit) as e:
            bench.main(args)
        assert e.value.code == 2 and says in capsys.readouterr().err, args
