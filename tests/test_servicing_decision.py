"""Servicing decision table (spec §6.1, DESIGN D2-D5), save outcomes, version skew and bad blobs, with
real processes: one host, one MANA device process, workers replaced at every servicing.

Every test checks what the *device* saw (reset counter, command log) and that the NIC passes frames
afterwards. Tests share one host; the `host` fixture puts it back to the default worker first.
"""
import json
import os
import signal
import sys
import time

import pytest

from servicing_helpers import HostRun, pid_alive
from vfkeep.rpc import Refused

ESTABLISH, DESTROY = "SMC_MSG_TYPE_ESTABLISH_HWC", "SMC_MSG_TYPE_DESTROY_HWC"
REGISTER, DEREGISTER = "GDMA_REGISTER_DEVICE", "GDMA_DEREGISTER_DEVICE"
FLR = "FLR"
MANA_ENV, NVME_ENV = "OPENHCL_MANA_KEEP_ALIVE", "OPENHCL_NVME_KEEP_ALIVE"
PCI_ID = "d186:00:00.0"
DOWNLEVEL = f"{sys.executable} -m vfkeep.cli worker --compat downlevel"
NON_KEEPALIVE = (ESTABLISH, REGISTER, DESTROY, DEREGISTER, FLR)


def names(entries):
    return [e["name"] for e in entries]


def nic(result):
    assert len(result["nics"]) == 1
    return result["nics"][0]


def decoded_state(host):
    out = host.cli("state", "decode", os.path.join(host.run_dir, "servicing_state.bin"), "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)["summary"]


def assert_clean_shutdown_then_fresh(entries):
    """Old worker: DEREGISTER_DEVICE, DESTROY_HWC; new worker (new connection epoch): ESTABLISH_HWC, REGISTER."""
    n = names(entries)
    assert FLR not in n, n
    i_dereg, i_destroy, i_est, i_reg = n.index(DEREGISTER), n.index(DESTROY), n.index(ESTABLISH), n.index(REGISTER)
    assert i_dereg < i_destroy < i_est < i_reg, n
    assert entries[i_destroy]["epoch"] < entries[i_est]["epoch"]
    assert n.count(ESTABLISH) == 1 and entries[i_est]["status"] == 0


def assert_refused_then_flr(entries):
    """NoReset attempt refused by the device (its HWC is still live), then FLR and a fresh ESTABLISH_HWC."""
    n = names(entries)
    first, flr = n.index(ESTABLISH), n.index(FLR)
    assert entries[first]["status"] != 0 and first < flr, n
    second = n.index(ESTABLISH, flr)
    assert entries[second]["status"] == 0 and REGISTER in n[second:], n


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    h = HostRun(tmp_path_factory.mktemp("decision") / "run")
    yield h
    h.stop()


@pytest.fixture
def host(shared):
    """The shared host with a default worker (current, MANA keepalive config on) and a fault-free device."""
    w = shared.inspect("worker")
    if (w["compat"], w["keepalive"]["mana"], w["keepalive"]["nvme"]) != ("current", "enabled", "disabled") \
            or w["nics"][0]["device"] is None:
        r = shared.service()
        assert r["nics"][0]["error"] is None, r
    yield shared
    shared.device_control(0, "clear_faults")
    shared.device_control(0, "surprise_removal", on=False)


# -- decision table ----------------------------------------------------------------------------
def test_keepalive_restore(host):
    """S=yes K=yes: no ESTABLISH_HWC/REGISTER_DEVICE/DESTROY_HWC/FLR; same HWC buffer, ids and pool."""
    before = host.inspect("worker")
    resets = host.reset_count()
    r, (entries,) = host.serviced(mana_keepalive=True)
    n = nic(r)
    assert r["ok"] and r["error"] is None and r["unclaimed_pool_allocations"] == []
    assert (n["restore_path"], n["device_reset"], n["hwc_established"], n["error"]) == ("keepalive", False, False, None)
    assert not set(NON_KEEPALIVE) & set(names(entries)), names(entries)
    assert "CONNECT" in names(entries)
    assert host.reset_count() == resets
    after = host.inspect("worker")
    assert after["pool"] == before["pool"]
    keep = ("pdid", "db_id", "gpa_mkey", "hwc_buffer", "hwc_queues")
    dev_a, dev_b = after["nics"][0]["device"], before["nics"][0]["device"]
    assert {k: dev_a[k] for k in keep} == {k: dev_b[k] for k in keep}
    assert int(dev_a["activity_id"], 16) >> 16 == int(dev_b["activity_id"], 16) >> 16  # random part from fresh init
    (outcome,) = host.inspect("last_servicing/save_outcomes")
    assert (outcome["pci_id"], outcome["save_outcome"], outcome["error"]) == (PCI_ID, "Saved", None)
    assert outcome["relay"]["tx_stranded"] == 0  # the old worker's relay counters when it stopped
    log = host.worker_log(after["generation"])
    assert "restoring gdma driver" in log and "creating new VFIO device" not in log
    assert decoded_state(host)["mana_pci_ids"] == [PCI_ID]
    assert host.probe()["ok"]


def test_host_flag_off_is_clean_shutdown_then_fresh(host):
    """Host bit clear: the old worker shuts down (DEREGISTER, DESTROY_HWC); S=no K=yes: fresh, HWC in the pool."""
    r, (entries,) = host.serviced()
    n = nic(r)
    assert r["ok"] and (n["restore_path"], n["device_reset"], n["hwc_established"]) == ("fresh", False, True)
    assert_clean_shutdown_then_fresh(entries)
    state = decoded_state(host)
    assert state["mana_state"] is None and state["dma_manager_state"] is False
    assert host.inspect("worker/nics/0/device/hwc_buffer/persistent") is True
    assert host.inspect("last_servicing/save_outcomes")[0]["save_outcome"] == "Shutdown"
    assert "creating new VFIO device" in host.worker_log(host.inspect("worker/generation"))
    assert host.probe()["ok"]


def test_config_off_is_clean_shutdown_then_fresh(host):
    """K=no in a worker: it was created S=no K=no (ephemeral HWC), and with the host bit set it still does a
    normal shutdown; the next (K=yes) worker fresh-inits."""
    r, _ = host.serviced(next_env={MANA_ENV: "disabled"})
    assert nic(r)["restore_path"] == "fresh"
    assert host.inspect("worker/keepalive/mana") == "disabled"
    assert host.inspect("worker/nics/0/device/hwc_buffer/persistent") is False
    assert host.inspect("worker/pool/devices") == {}
    r, (entries,) = host.serviced(mana_keepalive=True)
    n = nic(r)
    assert r["ok"] and (n["restore_path"], n["device_reset"], n["hwc_established"]) == ("fresh", False, True)
    assert_clean_shutdown_then_fresh(entries)
    assert decoded_state(host)["dma_manager_state"] is False
    assert host.probe()["ok"]


def test_saved_state_but_keepalive_disabled_in_new_worker(host):
    """S=yes K=no: attach and free the saved buffers, NoReset fails on the live HWC, FLR, fresh init."""
    r, (entries,) = host.serviced(mana_keepalive=True, next_env={MANA_ENV: "nohost,privatepool"})
    n = nic(r)
    assert r["ok"] and r["unclaimed_pool_allocations"] == []
    assert (n["restore_path"], n["device_reset"], n["hwc_established"]) == ("fresh", True, True)
    assert DESTROY not in names(entries) and DEREGISTER not in names(entries)
    assert_refused_then_flr(entries)
    assert host.inspect("worker/pool/devices") == {}  # freed, and the new HWC buffer is ephemeral
    log = host.worker_log(host.inspect("worker/generation"))
    assert "have saved state from keepalive but restoring on an unsupported host" in log
    assert host.probe()["ok"]


def test_restore_failure_falls_back(host):
    """D2: the device fails a request during the keepalive restore -> free, FLR, fresh; reported as fallback."""
    host.device_control(0, "fail_request", type="GDMA_GENERATE_TEST_EQE", mode="once")
    r, (entries,) = host.serviced(mana_keepalive=True)
    n = nic(r)
    assert r["ok"] and r["unclaimed_pool_allocations"] == []
    assert (n["restore_path"], n["device_reset"], n["hwc_established"]) == ("fallback", True, True)
    assert n["error"].startswith("keepalive restore failed")
    assert FLR in names(entries) and names(entries).count(ESTABLISH) == 1
    assert "falling back to fresh init with flr" in host.worker_log(host.inspect("worker/generation"))
    assert host.inspect("worker/pool/devices") == {f"nic_{PCI_ID}": 6}
    assert host.probe()["ok"]


# -- save outcomes -------------------------------------------------------------------------------
def test_save_failed_resets_device_and_reports_unclaimed(host):
    """An HWC request that fails during the save (the vport teardown's DISABLE_QUEUE) refuses it (SaveFailed):
    the device is switched to FLR and released; its pool pages were in the snapshot and nobody claims them
    (E2 -> D3: freed and listed)."""
    base_pfn = host.inspect("worker/nics/0/device/hwc_buffer/base_pfn")
    host.device_control(0, "fail_request", type="GDMA_DISABLE_QUEUE", mode="once")
    r, (entries,) = host.serviced(mana_keepalive=True)
    n = nic(r)
    assert host.inspect("last_servicing/save_outcomes")[0]["save_outcome"] == "SaveFailed"
    assert r["ok"] and (n["restore_path"], n["device_reset"], n["hwc_established"]) == ("fresh", True, True)
    assert r["unclaimed_pool_allocations"] == [{"device": f"nic_{PCI_ID}", "base_pfn": base_pfn, "pages": 6,
                                                "tag": "vfio dma"}]
    assert DESTROY not in names(entries)
    assert host.inspect("worker/pool/devices") == {f"nic_{PCI_ID}": 6}  # only the new HWC buffer
    assert host.probe()["ok"]


def wait_for(host, path: str, want, timeout: float = 30.0):
    """Poll `inspect path` until it equals `want` (the VF manager acts on its own thread)."""
    deadline = time.monotonic() + timeout
    while (got := host.inspect(path)) != want:
        assert time.monotonic() < deadline, f"inspect {path} is {got!r}, not {want!r} after {timeout} s"
        time.sleep(0.05)


# -- run time: VF reset request, surprise removal and hot-add (no servicing) --------------------------
def test_vf_reset_request_reconfigures_the_nic_without_a_servicing(host):
    """EQE 135 (gdma spec 6.4) at run time: the VF manager tears the NIC down without a single HWC request,
    resets the function and creates the NIC fresh; the same worker passes frames again."""
    generation = host.inspect("worker/generation")
    seq = host.log_seq()
    host.device_control(0, "raise_reset_request")
    wait_for(host, "worker/nics/0/vf_resets", 1)
    entries = host.commands_since(seq)
    n = names(entries)
    eqe, flr = n.index("EQE_135"), n.index(FLR)
    assert [e["kind"] for e in entries[eqe + 1:flr]] == ["event"] * (flr - eqe - 1), n  # no request, no SMC
    assert n[flr + 1:].count(ESTABLISH) == 1 and REGISTER in n[flr:] and DESTROY not in n and DEREGISTER not in n
    assert host.inspect("worker/generation") == generation
    assert host.inspect("worker/nics/0/device/reset_pending") is False
    assert host.device_control(0, "get_reset_method")["value"] == "none"
    assert host.probe()["ok"]


def test_device_missing_then_hot_add(host):
    """Spec 5.2: surprise removal before a save is DeviceMissing with no reset-method change, and the NIC's
    teardown freed its HWC pages before the pool snapshot (none in the blob, nothing unclaimed). The new
    worker finds no device; once the device is back (hot-add) its VF manager creates the NIC fresh, without
    a servicing."""
    host.device_control(0, "surprise_removal", on=True)
    r, (entries,) = host.serviced(mana_keepalive=True)
    assert host.inspect("last_servicing/save_outcomes")[0]["save_outcome"] == "DeviceMissing"
    assert FLR not in names(entries) and "SET_RESET_METHOD" not in names(entries), names(entries)
    assert host.device_control(0, "get_reset_method")["value"] == "none"
    state = decoded_state(host)
    assert state["dma_manager_state"] and state["mana_pci_ids"] == [] and state["pool_allocations"] == []
    assert r["unclaimed_pool_allocations"] == []
    assert "DeviceMissing" in nic(r)["error"] and host.inspect("worker/nics/0/device") is None
    assert host.inspect("worker/nics/0/missing") is True and host.inspect("worker/pool/devices") == {}

    generation, seq = host.inspect("worker/generation"), host.log_seq()
    host.device_control(0, "surprise_removal", on=False)
    wait_for(host, "worker/nics/0/hot_adds", 1)
    assert host.inspect("worker/generation") == generation
    n = names(host.commands_since(seq))
    assert n.index(FLR) < n.index(ESTABLISH) < n.index(REGISTER), n
    nic0 = host.inspect("worker/nics/0")
    assert (nic0["missing"], nic0["error"], nic0["restore_path"]) == (False, None, "fresh")
    assert host.inspect("worker/pool/devices") == {f"nic_{PCI_ID}": 6}
    assert host.probe()["ok"]
    r, _ = host.serviced(mana_keepalive=True)  # and it is kept alive again
    assert nic(r)["restore_path"] == "keepalive"


def test_surprise_removal_at_run_time_frees_the_nic_at_once(host):
    """The VF manager notices the removal on its own (no save needed) and frees the NIC's pages."""
    host.device_control(0, "surprise_removal", on=True)
    wait_for(host, "worker/nics/0/missing", True)
    assert host.inspect("worker/nics/0/device") is None and host.inspect("worker/pool/devices") == {}
    host.device_control(0, "surprise_removal", on=False)
    wait_for(host, "worker/nics/0/hot_adds", 1)
    assert host.probe()["ok"]


# -- D3: mixed flags ---------------------------------------------------------------------------
def test_mixed_flags_unclaimed_pages_freed_and_reported(host):
    """E1: both configs on, host sets only the NVMe bit: the DMA snapshot holds the NIC's HWC pages, MANA is
    shut down normally; nobody re-attaches the pages -> freed, warned, listed (D3)."""
    host.service(next_env={NVME_ENV: "host,privatepool"})
    base_pfn = host.inspect("worker/nics/0/device/hwc_buffer/base_pfn")
    r, (entries,) = host.serviced(nvme_keepalive=True)
    n = nic(r)
    assert r["ok"] and (n["restore_path"], n["device_reset"]) == ("fresh", False)
    assert_clean_shutdown_then_fresh(entries)
    assert r["unclaimed_pool_allocations"] == [{"device": f"nic_{PCI_ID}", "base_pfn": base_pfn, "pages": 6,
                                                "tag": "vfio dma"}]
    pool = host.inspect("worker/pool")
    assert pool["pending_pages"] == 0 and pool["devices"] == {f"nic_{PCI_ID}": 6}
    # The slot table: the unclaimed buffer's slot is free again (slots never merge), the new HWC buffer is the
    # only allocation, and the slots cover the pool.
    table = pool["slot_table"]
    assert {"base_pfn": base_pfn, "pages": 6, "state": "free", "owner": None, "tag": None} in table
    assert [s for s in table if s["state"] != "free"] == [
        {"base_pfn": host.inspect("worker/nics/0/device/hwc_buffer/base_pfn"), "pages": 6, "state": "allocated",
         "owner": f"nic_{PCI_ID}", "tag": "vfio dma"}]
    assert sum(s["pages"] for s in table) == pool["total_pages"] == pool["free_pages"] + 6
    assert "freed unclaimed pool allocation" in host.worker_log(host.inspect("worker/generation"))
    assert host.probe()["ok"]


def test_mixed_flags_strict_pool_fails_like_openhcl(host):
    """VFKEEP_STRICT_POOL=1 reproduces OpenHCL: "unrestored allocations found"; the NIC still works, and
    the pending pages make the next keepalive save fail without touching the NIC."""
    host.service(next_env={NVME_ENV: "host,privatepool"})
    r = host.service(nvme_keepalive=True, next_env={"VFKEEP_STRICT_POOL": "1"})
    assert not r["ok"] and f"unrestored allocations found: nic_{PCI_ID}" in r["error"]
    assert [u["device"] for u in r["unclaimed_pool_allocations"]] == [f"nic_{PCI_ID}"]
    assert host.inspect("worker/pool/pending_pages") == 6
    assert host.probe()["ok"]
    r, (entries,) = host.serviced(mana_keepalive=True)
    assert not r["ok"] and "dma manager save failed" in r["error"]
    assert not set(NON_KEEPALIVE) & set(names(entries))
    assert host.probe()["ok"]


# -- D4 / D5 -------------------------------------------------------------------------------------
def test_save_timeout_starts_worker_anyway(host):
    """D4: the save hangs past --timeout: the host ends the worker and starts the next one without state;
    the NIC comes back through the fresh path (its HWC is still live, so FLR)."""
    pid = host.inspect("worker/pid")
    r, (entries,) = host.serviced(mana_keepalive=True, timeout=1.0, test_config="SERVICING_SAVE_STUCK")
    n = nic(r)
    assert not r["ok"] and "did not answer within" in r["error"]
    assert host.inspect("worker/pid") != pid
    assert (n["restore_path"], n["device_reset"], n["hwc_established"]) == ("fresh", True, True)
    assert_refused_then_flr(entries)
    assert host.probe()["ok"]


def test_save_crash_starts_worker_anyway(host):
    r, (entries,) = host.serviced(mana_keepalive=True, test_config="SERVICING_SAVE_CRASH")
    n = nic(r)
    assert not r["ok"] and "closed its channel" in r["error"]
    assert (n["restore_path"], n["device_reset"]) == ("fresh", True)
    assert_refused_then_flr(entries)
    assert host.probe()["ok"]


def test_save_fail_revives_in_place_and_is_not_sticky(host):
    """Spec 2.4 hook after the inner save: the worker keeps running and revives its saved NIC (FLR fallback,
    instead of the reference's dead NIC); D5: the next request with the bit set uses keepalive again."""
    pid = host.inspect("worker/pid")
    r, (entries,) = host.serviced(mana_keepalive=True, test_config="SERVICING_SAVE_FAIL")
    n = nic(r)
    assert not r["ok"] and "SERVICING_SAVE_FAIL" in r["error"]
    assert host.inspect("worker/pid") == pid
    assert (n["restore_path"], n["device_reset"], n["hwc_established"]) == ("fallback", True, True)
    assert host.probe()["ok"]
    r = host.service(mana_keepalive=True)
    assert r["ok"] and nic(r)["restore_path"] == "keepalive" and not nic(r)["device_reset"]
    assert host.probe()["ok"]


def test_worker_dying_outside_servicing_is_replaced(host):
    """No servicing running: the host notices the dead worker and starts one through the fresh path."""
    gen, pid = host.inspect("worker/generation"), host.inspect("worker/pid")
    seq = host.log_seq()
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 60  # (a replacement is a Python start-up: many seconds on a loaded machine)
    while time.monotonic() < deadline:
        try:  # while the replacement starts there is briefly no worker to inspect
            if host.inspect("worker/generation") != gen:
                break
        except Refused:
            pass
        time.sleep(0.1)
    assert host.inspect("worker/generation") == gen + 1
    assert host.inspect("worker/nics/0/restore_path") == "fresh"
    assert_refused_then_flr(host.commands_since(seq))
    assert host.probe()["ok"]


def test_restore_stuck_replacement_restores_keepalive(host):
    """The new worker hangs before fetching the state; it never touched the device, so the replacement
    restores from the same blob with keepalive."""
    r, (entries,) = host.serviced(mana_keepalive=True, timeout=1.5,
                                  next_env={"VFKEEP_TEST_CONFIG": "SERVICING_RESTORE_STUCK"})
    n = nic(r)
    assert not r["ok"] and r["error"].startswith("restore:")
    assert (n["restore_path"], n["device_reset"], n["hwc_established"]) == ("keepalive", False, False)
    assert not set(NON_KEEPALIVE) & set(names(entries))
    assert host.probe()["ok"]


# -- version skew --------------------------------------------------------------------------------
def test_skew_current_to_downlevel_with_keepalive(host):
    """The downlevel worker ignores field 10003 (S=no) and never enables MANA keepalive; it restores the DMA
    manager, so the NIC's pages are unclaimed (D3), and its fresh init needs an FLR."""
    base_pfn = host.inspect("worker/nics/0/device/hwc_buffer/base_pfn")
    r, (entries,) = host.serviced(mana_keepalive=True, next_worker_cmd=DOWNLEVEL)
    n = nic(r)
    assert host.inspect("worker/compat") == "downlevel" and host.inspect("worker/keepalive/mana") == "disabled"
    assert r["ok"] and (n["restore_path"], n["device_reset"], n["hwc_established"]) == ("fresh", True, True)
    assert_refused_then_flr(entries)
    assert r["unclaimed_pool_allocations"] == [{"device": f"nic_{PCI_ID}", "base_pfn": base_pfn, "pages": 6,
                                                "tag": "vfio dma"}]
    assert "downlevel worker ignores mana_state" in host.worker_log(host.inspect("worker/generation"))
    assert host.probe()["ok"]


def test_skew_current_to_downlevel_without_keepalive(host):
    r, (entries,) = host.serviced(next_worker_cmd=DOWNLEVEL)
    n = nic(r)
    assert r["ok"] and (n["restore_path"], n["device_reset"], n["hwc_established"]) == ("fresh", False, True)
    assert_clean_shutdown_then_fresh(entries)
    assert r["unclaimed_pool_allocations"] == []
    assert host.probe()["ok"]


def test_skew_downlevel_to_current(host):
    """A downlevel worker never saves MANA state even with the host bit set: clean shutdown, no 10003."""
    host.service(next_worker_cmd=DOWNLEVEL)
    r, (entries,) = host.serviced(mana_keepalive=True)
    n = nic(r)
    assert host.inspect("worker/compat") == "current"
    assert r["ok"] and (n["restore_path"], n["device_reset"], n["hwc_established"]) == ("fresh", False, True)
    assert_clean_shutdown_then_fresh(entries)
    state = decoded_state(host)
    assert state["mana_state"] is None and state["dma_manager_state"] is False
    assert host.probe()["ok"]


# -- untrusted saved state -------------------------------------------------------------------------
@pytest.mark.parametrize("mode,error", [
    ("truncate", "failed to decode servicing state"),
    ("corrupt", "failed to decode servicing state"),
    ("firmware-missing", "failed to decode servicing state"),
    ("firmware-unknown", "failed to decode servicing state"),
    ("mana-pfn-outside-pool", "lies outside the private pool"),
    ("dma-pfn-outside-pool", "dma manager restore failed"),
])
def test_bad_blob_falls_back(host, mode, error):
    """A damaged blob is a typed error and a clean fallback (FLR, fresh init), never a crash; PFNs outside
    the pool are rejected before any pool memory is attached."""
    r, (entries,) = host.serviced(mana_keepalive=True, tamper=mode)
    n = nic(r)
    assert r["ok"] and r["unclaimed_pool_allocations"] == []
    assert (n["restore_path"], n["device_reset"]) == ("fallback", True)
    assert error in n["error"]
    assert ESTABLISH not in names(entries)[:names(entries).index(FLR)]
    log = host.worker_log(host.inspect("worker/generation"))
    assert log.index("falling back to fresh init with flr") < log.index("attached pending buffers")
    assert host.inspect("worker/pool/pending_pages") == 0
    assert host.probe()["ok"]


def test_pool_left_all_leaked_gives_an_ephemeral_hwc(tmp_path):
    """Saved state that leaves every pool slot Leaked: nothing to re-attach (fallback) and no pool pages for
    a new HWC buffer; the NIC still comes up, with its HWC buffer in worker RAM and the reason reported."""
    h = HostRun(tmp_path / "run")
    try:
        r = h.service(mana_keepalive=True, tamper="pool-all-leaked")
        n = nic(r)
        assert (n["restore_path"], n["device_reset"]) == ("fallback", True)
        assert "gdma restored memory not found" in n["error"] and "HWC buffer is ephemeral" in n["error"]
        assert h.inspect("worker/pool/free_pages") == 0
        assert h.probe()["ok"]
    finally:
        h.stop()


def test_unparsable_pool_config_no_pool(tmp_path):
    """A bad pool size is warned about and means no pool; the MANA config still claims one (trusted as-is,
    E6): the NIC runs with an ephemeral HWC buffer instead of failing, and a keepalive save is refused
    (SaveFailed: FLR), after which the NIC comes back fresh."""
    h = HostRun(tmp_path / "run", env={"OPENHCL_ENABLE_VTL2_GPA_POOL": "lots"})
    try:
        with open(os.path.join(h.run_dir, "host.log")) as f:
            assert "unparsable pool config" in f.read()
        assert h.inspect("worker/pool/total_pages") == 0
        n0 = h.inspect("worker/nics/0")
        assert "no sources available for private persistent allocations" in n0["error"]
        assert n0["device"]["hwc_buffer"]["persistent"] is False and h.probe()["ok"]
        r, (entries,) = h.serviced(mana_keepalive=True)
        assert h.inspect("last_servicing/save_outcomes")[0]["save_outcome"] == "SaveFailed"
        assert (nic(r)["restore_path"], nic(r)["device_reset"]) == ("fresh", True)
        assert h.probe()["ok"]
    finally:
        h.stop()


def test_a_worker_wrappers_own_processes_end_with_the_worker(host, tmp_path):
    """`--next-worker-cmd` may be a wrapper script that starts processes of its own: when the host ends that worker
    (the next servicing retires it), they end too, not only the worker's pid (they ran on under init)."""
    pidfile = tmp_path / "wrapper-child.pid"
    wrapper = (f"sh -c 'sleep 300 & echo $! > {pidfile}; exec {sys.executable} -m vfkeep.cli worker \"$@\"' "
               "wrapper")
    r = host.service(next_worker_cmd=wrapper)
    assert r["ok"], r
    child = int(pidfile.read_text())
    assert pid_alive(child)
    try:
        r = host.service()  # the wrapper's worker is saved, dismissed and ended
        assert r["ok"], r
        deadline = time.monotonic() + 30
        while pid_alive(child):
            assert time.monotonic() < deadline, "the worker wrapper's own process outlived the worker"
            time.sleep(0.05)
    finally:
        if pid_alive(child):
            os.kill(child, signal.SIGKILL)
