"""benchmarks/trace_blackout.py with one path: every counted servicing takes that path, even when the path does
not leave the worker what it expects itself (a second `keepalive` in a row would keep the vport its first put
in the pool: a data-path keepalive)."""
import json
import sys
from pathlib import Path

from helpers import CLEAN_ENV, run_to_end
from servicing_helpers import SESSION, live_processes
from vfkeep.servicing_paths import FOLLOWS_ITSELF, HWC_REQUESTS, ORDER, preparing, unexpected

ROOT = Path(__file__).resolve().parent.parent


def test_keepalive_alone_is_prepared_by_a_reset_and_rebuilds_the_vport_each_time(tmp_path):
    out = tmp_path / "trace.json"
    child, stdout, _ = run_to_end([sys.executable, "-m", "benchmarks.trace_blackout", "--paths", "keepalive",
                                   "--repeat", "2", "--timing", "natural", "--rate", "1000", "--json", str(out)],
                                  env=CLEAN_ENV, cwd=ROOT)
    assert live_processes(SESSION, child.pid) == []
    report = json.loads(out.read_text())
    assert report["prepared_by"] == "reset" and report["unexpected"] == []
    ka = report["paths"]["keepalive"]
    assert len(ka["blackout_ms_all"]) == 2 and "after a reset servicing" in stdout


def test_a_path_that_cannot_follow_itself_is_prepared_by_its_predecessor_in_order():
    assert FOLLOWS_ITSELF == {"reset", "keepalive+datapath"}
    assert [preparing(p) for p in ORDER] == ["keepalive+datapath", "reset-flr", "reset", "keepalive"]


def test_counting_requests_tells_a_keepalive_that_kept_the_vport():
    nic = {"pci_id": "nic0", "restore_path": "keepalive", "device_reset": False, "hwc_established": False}
    kept = {"ok": True, "error": None, "nics": [{**nic, "hwc_requests": HWC_REQUESTS["keepalive+datapath"]}]}
    assert unexpected("keepalive", kept) == []
    assert unexpected("keepalive", kept, count_requests=True) == [
        f"nic0: {HWC_REQUESTS['keepalive+datapath']} HWC requests, expected {HWC_REQUESTS['keepalive']}"]
    assert unexpected("keepalive+datapath", kept, count_requests=True) == []
