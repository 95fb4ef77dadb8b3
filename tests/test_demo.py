"""`vfkeep demo` end to end: exit status, results.json schema, the plot, and no process left behind."""
import json
import os
import signal
import statistics
import subprocess

from helpers import CLEAN_ENV, interrupt, run_to_end, wait_for
from servicing_helpers import SESSION, live_processes, pid_alive
from vfkeep import proc
from vfkeep.demo import verdict
from vfkeep.device.timing import DeviceTiming
from vfkeep.servicing_paths import HWC_REQUESTS
from vfkeep.servicing_paths import ORDER as MODES

RESULT_KEYS = {"ok", "mana_keepalive", "nvme_keepalive", "nics", "unclaimed_pool_allocations", "phases_ms",
               "blackout_ms", "frames_lost", "timing", "error"}


def session_members(sid: int) -> list[int]:
    """Live processes of session `sid` (the demo runs in a session of its own, so this is everything it
    started, whoever their parent is now)."""
    return live_processes(SESSION, sid)


def _demo(*args: str, **env_extra: str):
    """`vfkeep demo ARGS` to its end without the caller's OPENHCL_/VFKEEP_ settings (helpers.run_to_end)."""
    return run_to_end(proc.vfkeep_argv("demo", *args), env=CLEAN_ENV | env_extra)


def test_demo(tmp_path):
    """All four paths, each taking its path; medians and device counts in the JSON; nothing left behind
    (no process, nothing in the temp dir)."""
    out, extra, tmp = tmp_path / "report", tmp_path / "copy.json", tmp_path / "tmp"
    tmp.mkdir()
    child, stdout, stderr = _demo("--out", str(out), "--json", str(extra), "--timing", "natural", "--flr-ms", "10",
                                  "--rate", "2000", "--servicings", "2", TMPDIR=str(tmp))
    assert session_members(child.pid) == [] and os.listdir(tmp) == []

    for word in (*MODES, "restore path", "HWC re-established", "HWC requests", "device resets", "blackout ms",
                 "min–max", "frames lost", "save ms", "handoff ms", "restore ms", "verdict:",
                 "every servicing took its path"):
        assert word in stdout, stdout

    # Piped, the verdict is one unwrapped line naming every path (not cut at 80 columns).
    (verdict_line,) = [line for line in stdout.splitlines() if line.startswith("verdict:")]
    assert all(mode in verdict_line for mode in MODES), stdout

    report = json.loads((out / "results.json").read_text())
    assert json.loads(extra.read_text()) == report
    assert (out / "timeline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    timing = {"preset": "custom", "hwc_latency_ms": 0.0, "flr_ms": 10.0}
    assert report["timing"] == timing and report["rate_fps"] == 2000 and report["nics"] == 1
    assert report["servicings"] == 2 and {"platform", "cpus", "python"} <= set(report["machine"])
    assert isinstance(report["verdict"]["ordering_held"], bool) and report["verdict"]["lines"]

    runs = {run["mode"]: run for run in report["runs"]}
    assert list(runs) == list(MODES)
    for mode, run in runs.items():
        assert run["timing"] == timing and run["expectations_failed"] == []
        assert len(run["blackout_ms_all"]) == 2 and run["blackout_ms"] == statistics.median(run["blackout_ms_all"])
        assert run["frames_lost"] == sum(run["frames_lost_all"]) >= 0
        assert run["hwc_requests"] > 0 and run["timeline"]["bins"]
        for r in run["results"]:
            assert RESULT_KEYS <= set(r), set(r)
        (t,) = run["median_servicing"]["traffic"]
        assert t["sent"] > 0
    assert [runs[m]["device_resets"] for m in MODES] == [1, 0, 0, 0]
    assert [runs[m]["restore_path"] for m in MODES] == ["fresh", "fresh", "keepalive", "keepalive"]
    assert [runs[m]["hwc_established"] for m in MODES] == [True, True, False, False]
    # Keeping the data path too saves the vport's queue commands (which ones: test_datapath_keepalive).
    assert runs["keepalive+datapath"]["hwc_requests"] < runs["keepalive"]["hwc_requests"]
    assert {m: runs[m]["hwc_requests"] for m in MODES} == HWC_REQUESTS

    roles = {p["role"] for p in report["processes"]}
    assert roles == {"worker", "device", "traffic-agent"}
    assert len([p for p in report["processes"] if p["role"] == "worker"]) == 1 + 4 * 2
    assert not [p for p in report["processes"] if pid_alive(p["pid"])]


def run_summary(mode: str, blackouts: list[float], hwc: int, resets: int) -> dict:
    return {"mode": mode, "blackout_ms": statistics.median(blackouts), "blackout_ms_all": blackouts,
            "hwc_requests": hwc, "device_resets": resets}


def test_verdict_reports_a_reversed_ordering_with_its_likely_cause():
    timing = DeviceTiming(hwc_latency_ms=1.0, flr_ms=100.0)
    good = [run_summary("reset-flr", [180, 190, 200], 17, 1), run_summary("reset", [60, 62, 64], 22, 0),
            run_summary("keepalive", [30, 31, 33], 19, 0), run_summary("keepalive+datapath", [6, 7, 8], 4, 0)]
    held, lines = verdict(good, timing, load=0.1, cpus=2)
    assert held and lines[0].startswith("expected ordering held") and "reset-flr / keepalive+datapath 27.1x" in lines[0]
    assert len(lines) == 1
    held, lines = verdict(good, timing, load=1.5, cpus=2)
    assert held and "busy (load average 1.5 on 2 CPUs" in lines[1]

    # keepalive slower than reset on a quiet machine: the model puts 3 ms between them, the spread is larger.
    swapped = [good[0], run_summary("reset", [40, 44, 70], 22, 0), run_summary("keepalive", [45, 50, 52], 19, 0),
               good[3]]
    held, lines = verdict(swapped, timing, load=0.1, cpus=2)
    assert not held and "did NOT hold" in lines[0] and len(lines) == 2
    assert lines[1].startswith("keepalive (50.0 ms) was not shorter than reset (44.0 ms)")
    assert "only 3.0 ms of device time" in lines[1] and "spread of 30.0 ms" in lines[1]

    # The same on a loaded machine: CPU contention is named first.
    held, lines = verdict(swapped, timing, load=3.0, cpus=2)
    assert not held and "CPU contention" in lines[1] and "3.0 on 2 CPUs" in lines[1]

    # A reversal the model and load do not explain is said to be unexplained, not "as expected".
    flr_reversed = [run_summary("reset-flr", [50, 51, 52], 17, 1), *good[1:]]
    held, lines = verdict(flr_reversed, timing, load=0.1, cpus=2)
    assert not held and lines[1].startswith("reset (62.0 ms) was not shorter than reset-flr (51.0 ms)")
    assert "not explained" in lines[1]


def test_demo_interrupted_leaves_nothing(tmp_path):
    """Ctrl-C while the demo's host, worker, device and agent run: exit 130, every process ended."""
    child = subprocess.Popen(proc.vfkeep_argv("demo", "--out", str(tmp_path / "report"), "--timing", "natural"),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    wait_for(lambda: len(session_members(child.pid)) >= 4, child=child)  # demo + device + worker + traffic agent
    stdout, stderr = interrupt(child, signal.SIGINT)
    assert child.returncode == 130, stderr
    assert "interrupted" in stdout
    assert session_members(child.pid) == []
    assert not (tmp_path / "report" / "results.json").exists()


def test_demo_with_an_nvme_disk(tmp_path):
    """`--nvme 1`: each path takes the disk along (keepalive: kept; reset paths: reset and re-enabled), the
    table adds the disk IO blackout, no IO error, every block written verified, nothing left behind."""
    out = tmp_path / "report"
    child, stdout, stderr = _demo("--out", str(out), "--timing", "natural", "--flr-ms", "10", "--rate", "1000",
                                  "--servicings", "1", "--nvme", "1")
    assert session_members(child.pid) == []
    for word in ("disk path", "disk IO blackout ms", "disk IO errors", "verified"):
        assert word in stdout, stdout
    report = json.loads((out / "results.json").read_text())
    runs = {run["mode"]: run for run in report["runs"]}
    assert [runs[m]["nvme_path"] for m in MODES] == ["fresh", "fresh", "keepalive", "keepalive"]
    assert all(runs[m]["io_errors"] == 0 and runs[m]["io_blackout_ms"] is not None for m in MODES)
    assert all(n["device_reset"] == (m in ("reset-flr", "reset")) for m in MODES for r in runs[m]["results"]
               for n in r["nvme"])
    (disk,) = report["disks"]
    assert disk["errors"] == disk["verify_errors"] == disk["duplicates"] == 0 < disk["chunks_written"]
    assert {"nvme-device", "disk-agent"} <= {p["role"] for p in report["processes"]}
    assert not [p for p in report["processes"] if pid_alive(p["pid"])]


def test_a_servicing_the_guest_did_not_measure_is_counted_not_dropped():
    """results.json had blackout_ms_all [608.5, 15.8, None, 10.4, 31.7]: the table said "median of 5" and
    "frames lost 0"; it must say 4/5 were measured, and the verdict must say so."""
    from vfkeep.demo import table

    timing = DeviceTiming(hwc_latency_ms=1.0, flr_ms=100.0)
    kd = {**run_summary("keepalive+datapath", [1.0], 4, 0), "blackout_ms": 23.75,
          "blackout_ms_all": [608.5, 15.8, None, 10.4, 31.7]}
    runs = [run_summary("reset-flr", [180, 190, 200], 17, 1), run_summary("reset", [60, 62, 64], 22, 0),
            run_summary("keepalive", [30, 31, 33], 19, 0), kd]
    held, lines = verdict(runs, timing, load=0.1, cpus=2)
    assert "keepalive+datapath: 1 of 5 servicings not measured" in lines[-1]
    assert not [line for line in lines if line.startswith(("reset-flr:", "reset:", "keepalive:"))]

    for r in runs:
        n = len(r["blackout_ms_all"])
        r.update(frames_lost=0, frames_lost_all=[None if b is None else 0 for b in r["blackout_ms_all"]],
                 restore_path="x", hwc_established=False, phases_ms=dict.fromkeys(("save", "handoff", "restore"), 1.0),
                 servicings=n)
    report = {"runs": runs, "servicings": 5, "timing": timing.to_dict(), "rate_fps": 1000, "frame_size": 128,
              "nics": 1, "load_average_before": 0.1, "machine": {"cpus": 2}}
    from rich.console import Console
    console = Console(width=200, record=True)
    console.print(table(report))
    text = console.export_text()
    blackout = next(line for line in text.splitlines() if "│ blackout ms" in line)
    lost = next(line for line in text.splitlines() if "│ frames lost" in line)
    assert "(4/5 measured)" in blackout and "(4/5 measured)" in lost
    assert blackout.count("measured") == 1


def test_age_is_the_whole_process_lifetime():
    """The demo's 'took N s' line is the process's age (start-up and writing the report included)."""
    age = proc.age_s()
    assert 0 < age < 24 * 3600
    child = subprocess.Popen(["sleep", "5"])
    try:
        assert proc.age_s(child.pid) < age
    finally:
        child.kill()
        child.wait()
