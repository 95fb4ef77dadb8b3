"""`degraded` means a NIC did not take the path requested of it (README, DESIGN §10): a NIC asked for fresh
that came up fresh is not degraded, whatever note it has (new-user review item 15)."""
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
