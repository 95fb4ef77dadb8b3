"""NVMe keepalive through the host (issue 13 acceptance, real processes): `vfkeep run --nvme 1` with a NIC,
guest disk IO at queue depth 16 from the host's disk agent, servicing over the control socket.

One host for the module (its tests run in order and share the disk's IO, which runs throughout and is
verified block by block at the end): keepalive during IO (the controller's command log shows no CREATE IO
CQ/SQ, IDENTIFY or new AER in the window), completions delayed 2 s, no NVMe bit (reset and re-enable),
mixed flags both ways (the other device fresh, its stale pool pages freed and listed), keepalive
disabled on the new side, a hostile saved queue PFN.
"""
import json
import os
import signal
import subprocess
import time

import pytest

from servicing_helpers import HostRun
from vfkeep import proc
from vfkeep.vfio_user.control import control_call

TRIPWIRES = {"CREATE_IO_CQ", "CREATE_IO_SQ", "IDENTIFY", "ASYNC_EVENT_REQUEST", "CC_ENABLE", "CC_DISABLE", "FLR"}
QUEUE_PAGES = 69  # one queue pair's block (nvme.md §11.1); a controller has three (admin + 2 IO)


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    h = HostRun(tmp_path_factory.mktemp("nvmehost") / "run", "--nvme", "1")
    try:
        h.disk("start", qd=16, read_pct=40)
        yield h
    finally:
        h.stop()


def nvme_ctl(host, cmd: str, **args) -> dict:
    return control_call(os.path.join(host.run_dir, "nvme0.sock.ctl"), cmd, **args)


def window(host, **request) -> tuple[dict, list[str]]:
    """Service and return (result, names in the controller's command log during the servicing)."""
    seq = nvme_ctl(host, "command_log", since=1 << 62)["last_seq"]
    result = host.service(**request)
    return result, [e["name"] for e in nvme_ctl(host, "command_log", since=seq)["entries"]]


def pool_devices(host) -> dict:
    return host.inspect("worker/pool/devices")


def wait_io(host, more: int = 200, timeout: float = 30) -> dict:
    """Until the disk completed `more` further requests (IO flows); its stats."""
    start = host.disk("stats")["disks"][0]["completed"]
    deadline = time.monotonic() + timeout
    while True:
        st = host.disk("stats")["disks"][0]
        if st["completed"] >= start + more:
            return st
        assert time.monotonic() < deadline, f"disk IO stalled: {st}"
        time.sleep(0.02)


def test_keepalive_servicing_during_io_issues_no_queue_identify_or_aer(host):
    wait_io(host)
    # Commands in flight at the save (the relays stop first and what they have in flight may complete until
    # the drivers are saved: a delay longer than that window keeps some outstanding).
    nvme_ctl(host, "io_delay", ms=300)
    time.sleep(0.1)
    try:
        r, log = window(host, mana_keepalive=True, nvme_keepalive=True)
    finally:
        nvme_ctl(host, "clear_faults")
    (n,) = r["nvme"]
    assert r["status"] == "ok" and n["restore_path"] == "keepalive" and n["reason"] is None, r
    assert not n["device_reset"] and not n["controller_enabled"] and n["admin_commands"] == []
    assert not TRIPWIRES & set(log), log
    assert r["io_errors"] == 0 and r["io_blackout_ms"] is not None
    assert [u for u in r["unclaimed_pool_allocations"] if u["device"].startswith("nvme_")] == []
    assert wait_io(host)["errors"] == 0
    relay = host.inspect("worker/nvme/disks/0/relay")
    assert relay["replayed"] > 0 and relay["errors"] == 0  # guest requests in flight at the save
    assert relay["reissued_replayed"] <= relay["replayed"]  # what the guest re-issued too ran once


def test_state_decode_shows_field_10000(host):
    out = subprocess.run(proc.vfkeep_argv("state", "decode", "--json", os.path.join(host.run_dir,
                                                                                        "servicing_state.bin")),
                         capture_output=True, text=True, timeout=60, check=True)
    text = out.stdout
    assert "nvme_state" in text and "a100:00:00.0" in text and "identify_ctrl" in text and "pending_cmds" in text


def test_keepalive_with_completions_delayed_2s(host):
    """Commands submitted before the save complete after the restore; the save stays within its bound."""
    nvme_ctl(host, "io_delay", ms=2000)
    time.sleep(0.2)  # the queue fills with delayed commands
    try:
        r, log = window(host, mana_keepalive=True, nvme_keepalive=True, timeout=10)
    finally:
        nvme_ctl(host, "clear_faults")
    assert r["status"] == "ok" and r["nvme"][0]["restore_path"] == "keepalive", r
    assert not TRIPWIRES & set(log), log
    assert r["io_errors"] == 0
    st = wait_io(host)
    assert st["errors"] == st["duplicates"] == st["verify_errors"] == 0, st


def test_servicing_without_the_nvme_bit_resets_and_re_enables_the_controller(host):
    """MANA only (mixed flags, E1): NVMe is shut down by the old worker and initialised fresh by the new one;
    its stale pool pages (in the snapshot MANA keepalive made) are freed and listed; nothing leaks."""
    r, log = window(host, mana_keepalive=True)
    (n,), (nic,) = r["nvme"], r["nics"]
    assert r["status"] == "ok" and nic["restore_path"] == "keepalive"
    assert n["restore_path"] == "fresh" and n["reason"] == "keepalive not requested"
    assert n["device_reset"] and n["controller_enabled"] and "IDENTIFY" in n["admin_commands"]
    assert log.index("CC_DISABLE") < log.index("CC_ENABLE"), log
    stale = [(u["device"], u["pages"]) for u in r["unclaimed_pool_allocations"]]
    assert stale == [("nvme_a100:00:00.0", QUEUE_PAGES)] * 3, stale
    assert pool_devices(host) == {"nvme_a100:00:00.0": 3 * QUEUE_PAGES, "nic_d186:00:00.0": 6}
    assert r["io_errors"] == 0 and wait_io(host)["errors"] == 0


def test_nvme_keepalive_only_boots_mana_fresh_without_leaks(host):
    r, log = window(host, nvme_keepalive=True)
    (n,), (nic,) = r["nvme"], r["nics"]
    assert r["status"] == "ok" and n["restore_path"] == "keepalive" and nic["restore_path"] == "fresh"
    assert not TRIPWIRES & set(log), log
    assert [(u["device"], u["pages"]) for u in r["unclaimed_pool_allocations"]] == [("nic_d186:00:00.0", 6)]
    assert pool_devices(host) == {"nvme_a100:00:00.0": 3 * QUEUE_PAGES, "nic_d186:00:00.0": 6}
    assert host.probe(0, 4)["ok"]
    assert r["io_errors"] == 0 and wait_io(host)["errors"] == 0


def test_keepalive_disabled_on_the_new_side_frees_buffers_and_resets(host):
    r, log = window(host, mana_keepalive=True, nvme_keepalive=True,
                    next_env={"OPENHCL_NVME_KEEP_ALIVE": "disabled"})
    (n,) = r["nvme"]
    assert n["restore_path"] == "fresh" and r["status"] == "degraded", r
    assert n["reason"] == "keepalive not configured in the new worker (NVMe keepalive disabled)"
    assert log.index("CC_DISABLE") < log.index("CC_ENABLE"), log
    assert [u for u in r["unclaimed_pool_allocations"] if u["device"].startswith("nvme_")] == []
    assert r["io_errors"] == 0 and wait_io(host)["errors"] == 0
    # That worker keeps its queues in worker RAM: the next keepalive servicing saves no NVMe state.
    r = host.service(mana_keepalive=True, nvme_keepalive=True)
    assert r["nvme"][0]["restore_path"] == "fresh" and r["io_errors"] == 0


def test_saved_queue_pfn_outside_the_pool_takes_the_fallback(host):
    r = host.service(mana_keepalive=True, nvme_keepalive=True)  # back on the pool
    assert r["nvme"][0]["restore_path"] == "keepalive", r
    r, log = window(host, mana_keepalive=True, nvme_keepalive=True, tamper="nvme-pfn-outside-pool")
    (n,) = r["nvme"]
    assert n["restore_path"] == "fallback" and "saved state rejected" in n["reason"], n
    assert n["device_reset"] and n["controller_enabled"]
    assert r["io_errors"] == 0 and wait_io(host)["errors"] == 0
    assert pool_devices(host) == {"nvme_a100:00:00.0": 3 * QUEUE_PAGES, "nic_d186:00:00.0": 6}


def test_an_unreadable_blob_loses_no_guest_request(host):
    """The blob's "storvsp" units (the requests in flight at the save) are lost with it: the guest re-issues
    what it still waits for and the controller, reset by the fallback, runs them."""
    nvme_ctl(host, "io_delay", ms=300)
    time.sleep(0.1)
    try:
        r, log = window(host, mana_keepalive=True, nvme_keepalive=True, tamper="truncate")
    finally:
        nvme_ctl(host, "clear_faults")
    (n,) = r["nvme"]
    assert n["restore_path"] == "fallback" and n["device_reset"], n
    assert r["io_errors"] == 0
    st = wait_io(host)
    assert st["errors"] == st["duplicates"] == 0, st
    assert host.inspect("worker/nvme/disks/0/relay")["replayed"] == 0


def test_failed_save_revives_the_controller_and_replays_the_guest_requests(host):
    """DESIGN D4: the old worker keeps running; its saved controller is reset and initialised fresh, and the
    guest requests that were in flight are re-issued: none fails, none is lost."""
    r, log = window(host, mana_keepalive=True, nvme_keepalive=True, test_config="SERVICING_SAVE_FAIL")
    (n,) = r["nvme"]
    assert r["status"] == "failed" and n["restore_path"] == "fresh" and n["device_reset"], r
    assert log.index("CC_DISABLE") < log.index("CC_ENABLE"), log
    assert r["io_errors"] == 0 and wait_io(host)["errors"] == 0
    r = host.service(mana_keepalive=True, nvme_keepalive=True)
    assert r["status"] == "ok" and r["nvme"][0]["restore_path"] == "keepalive", r


def test_a_worker_that_dies_with_guest_requests_costs_no_io_error(host):
    """The guest re-issues what a dead worker had taken from its ring when no saved state carries it: a crash
    after the drivers were saved (D4: the next worker starts without state), and a worker killed between
    servicings (the host replaces it)."""
    nvme_ctl(host, "io_delay", ms=5)
    try:
        r, log = window(host, mana_keepalive=True, nvme_keepalive=True, test_config="SERVICING_SAVE_CRASH")
    finally:
        nvme_ctl(host, "clear_faults")
    (n,) = r["nvme"]
    assert r["status"] == "failed" and n["restore_path"] == "fresh" and n["device_reset"], r
    assert r["io_errors"] == 0 and wait_io(host)["errors"] == 0
    pid = host.status()["worker"]["pid"]
    nvme_ctl(host, "io_delay", ms=5)
    try:
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while host.status()["worker"]["pid"] == pid or not host.status()["worker"]["alive"]:
            assert time.monotonic() < deadline, "the dead worker was not replaced"
            time.sleep(0.05)
    finally:
        nvme_ctl(host, "clear_faults")
    st = wait_io(host)
    assert st["errors"] == st["duplicates"] == 0 and st["requeued"] > 0, st


def test_require_keepalive_covers_the_nvme_controllers(host):
    r = host.cli("service", "--run-dir", host.run_dir, "--mana-keepalive", "--require-keepalive")
    assert r.returncode == 3 and "a100:00:00.0 (fresh: keepalive not requested)" in r.stderr, r.stderr
    r = host.cli("service", "--run-dir", host.run_dir, "--mana-keepalive", "--nvme-keepalive", "--require-keepalive")
    assert r.returncode == 0, r.stderr + r.stdout


def test_every_block_verifies_after_the_servicings(host):
    host.disk("verify")
    (st,) = host.disk("stats")["disks"]
    assert st["chunks_written"] > 0 and st["outstanding"] == 0
    assert st["errors"] == st["verify_errors"] == st["duplicates"] == 0, json.dumps(st)
