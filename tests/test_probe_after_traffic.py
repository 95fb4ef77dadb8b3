"""`probe` on a NIC whose rings a traffic agent holds: refused while its traffic runs, done by the agent once
it is stopped (it was refused for the VM's life after a `traffic start`; new-user review item 16)."""
from servicing_helpers import HostRun


def test_probe_works_again_once_traffic_stopped(tmp_path):
    h = HostRun(tmp_path / "run")
    try:
        h.traffic("start", rate=500)
        r = h.cli("probe", "--run-dir", h.run_dir, "0")
        assert r.returncode == 1 and "traffic is running" in r.stderr, r.stderr
        h.traffic("stop")
        r = h.cli("probe", "--run-dir", h.run_dir, "0", "16")
        assert r.returncode == 0 and r.stdout.strip() == "nic 0: 16/16 frames came back", (r.stdout, r.stderr)
        stats = h.traffic("stats")["nics"][0]
        assert stats["lost"] == 0, stats
    finally:
        h.stop()
