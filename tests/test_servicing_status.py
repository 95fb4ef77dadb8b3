"""`degraded` means a NIC did not take the path requested of it (README, DESIGN §10): a NIC asked for fresh
that came up fresh is not degraded, whatever note it has (new-user review item 15)."""
from helpers import wait_for
from servicing_helpers import HostRun
from vfkeep.contract import RestorePath
from vfkeep.host.outcome import NOT_REQUESTED, nic_reason

POOL_NOTE = "pool exhausted (unable to allocate 6 pages for nic_x: pool has 1 free pages); HWC buffer is ephemeral"


def test_fresh_as_requested_is_not_degraded_by_a_note():
    assert nic_reason(False, RestorePath.FRESH, None, None, "enabled", "enabled") == (NOT_REQUESTED, False)
    assert nic_reason(False, RestorePath.FRESH, POOL_NOTE, None, "enabled", "enabled") == \
        (f"{NOT_REQUESTED}; {POOL_NOTE}", False)


def test_a_nic_that_did_not_come_up_is_degraded_even_when_fresh_was_requested():
    reason, degraded = nic_reason(False, RestorePath.FRESH, "DeviceMissing: gone", None, "enabled", "enabled")
    assert degraded and reason == f"{NOT_REQUESTED}; DeviceMissing: gone"


def test_keepalive_requested_and_not_taken_is_still_degraded():
    reason, degraded = nic_reason(True, RestorePath.FRESH, POOL_NOTE, None, "enabled", "enabled")
    assert degraded and POOL_NOTE in reason


def test_a_servicing_without_keepalive_on_a_tiny_pool_is_ok(tmp_path):
    """The reviewer's case: `run --pool-pages 1`, `service --nvme-keepalive` on a host without NVMe said
    `servicing degraded` with `nic: path=fresh requested=fresh ... reason=pool exhausted`."""
    h = HostRun(tmp_path / "run", "--pool-pages", "1")
    try:
        r = h.service(nvme_keepalive=True)
        (nic,) = r["nics"]
        assert nic["restore_path"] == nic["requested_path"] == "fresh", nic
        assert nic["reason"].startswith(f"{NOT_REQUESTED}; pool exhausted"), nic
        assert r["status"] == "ok", r
    finally:
        h.stop()


def test_a_dead_device_is_named_in_the_log_the_warnings_and_a_refused_servicing(tmp_path):
    """Item 19: after kill -9 of the NIC's device process host.log said nothing, `warnings: []`, and service
    failed with a bare `cannot connect to .../nic0.sock.ctl: Connection refused`."""
    import os
    import signal

    h = HostRun(tmp_path / "run")
    try:
        pid = h.status()["devices"][0]["pid"]
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: h.status()["warnings"], 30)  # the host notices at its next idle tick (0.5 s)
        log = os.path.join(h.run_dir, "device-nic0.log")
        died = f"device nic0 (d186:00:00.0, pid {pid}) died, killed by SIGKILL (see {log})"
        assert h.status()["warnings"] == [died]
        with open(os.path.join(h.run_dir, "host.log")) as f:
            assert 'msg="device died"' in f.read()
        r = h.cli("service", "--run-dir", h.run_dir, "--mana-keepalive")
        assert r.returncode == 1 and r.stderr.startswith(f"vfkeep: service: {died}: a servicing needs every "
                                                         "device running"), r.stderr
    finally:
        h.stop()


def test_the_device_log_has_the_servicing_once_service_returns(tmp_path):
    """A device holds its log lines for 0.25 s after a client disconnects (out of the blackout's CPU): the result
    came back 60-230 ms before the old worker's disconnect and the new one's connect were in device-nic0.log."""
    import os

    h = HostRun(tmp_path / "run")
    try:
        h.service(mana_keepalive=True)
        with open(os.path.join(h.run_dir, "device-nic0.log")) as f:
            log = f.read()
        assert 'msg="client disconnected" epoch=1 ' in log and 'msg="client connected" epoch=2' in log, log
    finally:
        h.stop()
