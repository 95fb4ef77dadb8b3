"""`vfkeep demo` end to end: exit status, results.json schema, the plot, and no process left behind."""
import json
import os
import signal
import subprocess
import time

from servicing_helpers import SESSION, live_processes, pid_alive
from vfkeep import proc

RESULT_KEYS = {"ok", "mana_keepalive", "nvme_keepalive", "nics", "unclaimed_pool_allocations", "phases_ms",
               "blackout_ms", "frames_lost", "error"}


def session_members(sid: int) -> list[int]:
    """Live processes of session `sid` (the demo runs in a session of its own, so this is everything it
    started, whoever their parent is now)."""
    return live_processes(SESSION, sid)


def test_demo(tmp_path):
    out, extra = tmp_path / "report", tmp_path / "copy.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENHCL_", "VFKEEP_"))}
    child = subprocess.Popen(proc.vfkeep_argv("demo", "--out", str(out), "--json", str(extra), "--timing", "natural",
                                              "--rate", "2000"),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                             start_new_session=True)
    try:
        stdout, stderr = child.communicate(timeout=90)
    finally:
        if child.poll() is None:
            proc.end(child)
    assert child.returncode == 0, stderr + stdout
    assert session_members(child.pid) == []

    for word in ("keepalive", "reset", "restore path", "HWC re-established", "device resets", "blackout ms",
                 "frames lost", "save ms", "handoff ms", "restore ms", "as expected"):
        assert word in stdout, stdout

    report = json.loads((out / "results.json").read_text())
    assert json.loads(extra.read_text()) == report
    assert (out / "timeline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["timing"] == {"preset": "natural", "hwc_latency_ms": 0.0, "flr_ms": 0.0} and report["rate_fps"] == 2000 and report["nics"] == 1
    assert {"platform", "cpus", "python"} <= set(report["machine"])

    keepalive, reset = report["runs"]
    for run, mode in ((keepalive, "keepalive"), (reset, "reset")):
        assert run["mode"] == mode
        assert RESULT_KEYS <= set(run), set(run)
        assert run["ok"] and run["expectations_failed"] == []
        assert set(run["phases_ms"]) == {"save", "handoff", "restore", "total"}
        assert run["blackout_ms"] > 0 and run["frames_lost"] >= 0
        (t,) = run["traffic"]
        assert t["sent"] > 0 and t["frames_lost"] == run["frames_lost"]
        assert run["timeline"]["bins"]
    (n,) = keepalive["nics"]
    assert (n["restore_path"], n["device_reset"], n["hwc_established"]) == ("keepalive", False, False)
    assert keepalive["mana_keepalive"] and not reset["mana_keepalive"]
    (n,) = reset["nics"]
    assert (n["restore_path"], n["hwc_established"]) == ("fresh", True)
    (overall,) = report["traffic"]
    assert overall["sent"] > keepalive["traffic"][0]["sent"]

    roles = {p["role"] for p in report["processes"]}
    assert roles == {"worker", "device", "traffic-agent"}
    assert len([p for p in report["processes"] if p["role"] == "worker"]) == 3
    assert not [p for p in report["processes"] if pid_alive(p["pid"])]


def test_demo_interrupted_leaves_nothing(tmp_path):
    """Ctrl-C while the demo's host, worker, device and agent run: exit 130, every process ended."""
    child = subprocess.Popen(proc.vfkeep_argv("demo", "--out", str(tmp_path / "report"), "--timing", "natural"),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while len(session_members(child.pid)) < 4:  # demo + device + worker + traffic agent
            assert child.poll() is None and time.monotonic() < deadline, child.communicate()
            time.sleep(0.05)
        child.send_signal(signal.SIGINT)
        stdout, stderr = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            proc.end(child)
    assert child.returncode == 130, stderr
    assert "interrupted" in stdout
    assert session_members(child.pid) == []
    assert not (tmp_path / "report" / "results.json").exists()


def test_demo_with_datapath_keepalive(tmp_path):
    """--datapath-keepalive adds a third servicing that also keeps the vport's queues (DESIGN D7; that no
    queue command is sent is asserted in test_datapath_keepalive): both keepalive runs keep the device."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENHCL_", "VFKEEP_"))}
    r = subprocess.run(proc.vfkeep_argv("demo", "--out", str(tmp_path / "report"), "--timing", "natural",
                                        "--rate", "2000", "--datapath-keepalive"),
                       capture_output=True, text=True, env=env, timeout=90)
    assert r.returncode == 0, r.stderr + r.stdout
    report = json.loads((tmp_path / "report" / "results.json").read_text())
    assert [run["mode"] for run in report["runs"]] == ["keepalive", "keepalive+datapath", "reset"]
    assert [run["datapath_keepalive"] for run in report["runs"]] == [False, True, False]
    for run in report["runs"][:2]:
        (n,) = run["nics"]
        assert (n["restore_path"], n["device_reset"], n["hwc_established"]) == ("keepalive", False, False)
        assert run["expectations_failed"] == []
    assert "keepalive+datapath" in r.stdout
