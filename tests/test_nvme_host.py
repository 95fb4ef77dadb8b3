"""NVMe keepalive through the host (issue 13 acceptance, real processes): `vfkeep run --nvme 1` with a NIC,
guest disk IO at queue depth 16 from the host's disk agent, servicing over the control socket.

One host for the module (its tests run in order and share the disk's IO, which runs throughout and is
verified block by block at the end): keepalive during IO (the controller's command log shows no CREATE IO
CQ/SQ, IDENTIFY or new AER in the window), completions delayed 2 s, no NVMe bit (reset and re-enable),
mixed flags both ways (the other device fresh, its stale pool pages freed and listed; under strict pool
mode the reference's failure), keepalive disabled on the new side, hostile saved queues (PFN outside the
pool, wrong mem_len, qid / CID out of range, a pending table larger than the queue: `--tamper nvme-*`), a
previous release's blob without field 10000.
"""
import json
import os
import signal
import subprocess
import time

import pytest

from helpers import wait_for
from saved_state_fuzz import all_fields
from servicing_helpers import HostRun
from vfkeep import proc
from vfkeep.proto import underhill_pb2
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
    before = wait_io(host, more=1000)
    # Commands in flight at the save: the disk's QD 16 in flight, each completing 3 s after its fetch, longer than
    # the servicing (with 300 ms, the 16 completed as a burst and the guest's turnaround — slow while the next
    # worker is prelaunched — sometimes left none in flight at the save: 1 run in 3 under load).
    nvme_ctl(host, "io_delay", ms=3000)
    relay_at = "worker/nvme/disks/0/relay"
    done = host.disk("stats")["disks"][0]["completed"]
    # what was fetched before the delay completed and the next 16 (delayed) went out
    wait_for(lambda: host.disk("stats")["disks"][0]["completed"] > done and host.inspect(relay_at)["inflight"] == 16,
             30)  # (10 s was three of the delayed bursts: within reach of a loaded machine's disk agent)
    try:
        r, log = window(host, mana_keepalive=True, nvme_keepalive=True, timeout=10)
    finally:
        nvme_ctl(host, "clear_faults")
    (n,) = r["nvme"]
    assert r["status"] == "ok" and n["restore_path"] == "keepalive" and n["reason"] is None, r
    assert not n["device_reset"] and not n["controller_enabled"] and n["admin_commands"] == []
    assert not TRIPWIRES & set(log), log
    assert r["io_errors"] == 0 and r["io_blackout_ms"] is not None
    assert [u for u in r["unclaimed_pool_allocations"] if u["device"].startswith("nvme_")] == []
    total = wait_io(host)
    assert total["errors"] == 0
    (w,) = host.disk("stats")["last_servicing"]  # the window's own numbers, not the agent's whole run
    assert w["completed"] < before["completed"] and w["io_errors"] == 0
    # the guest requests in flight at the save, replayed once the restored commands drained
    wait_for(lambda: host.inspect(relay_at)["replayed"] > 0, 15)
    relay = host.inspect(relay_at)
    assert relay["errors"] == 0
    assert relay["reissued_replayed"] <= relay["replayed"]  # what the guest re-issued too ran once


def keys_in(tree) -> set[str]:
    if isinstance(tree, dict):
        return set(tree) | {k for v in tree.values() for k in keys_in(v)}
    if isinstance(tree, list):
        return {k for v in tree for k in keys_in(v)}
    return set()


def test_each_device_writes_its_log_and_stderr_under_one_name(host):
    """device-nvme0.log beside device-nvme0.stderr, as device-nic0.*: not the PCI id (a100:00:00.0) for one."""
    names = set(os.listdir(host.run_dir))
    assert {"device-nvme0.log", "device-nvme0.stderr", "device-nic0.log", "device-nic0.stderr"} <= names, names
    assert not [n for n in names if "a100" in n], names


def test_state_decode_shows_field_10000_with_every_nvme_field(host):
    """`vfkeep state decode --json` on the state the keepalive servicing handed over (commands in flight):
    field 10000, and every field of the NVMe schema somewhere in it — except those at their default in this
    state, which the decoder leaves out like any absent field."""
    out = subprocess.run(proc.vfkeep_argv("state", "decode", "--json", os.path.join(host.run_dir,
                                                                                        "servicing_state.bin")),
                         capture_output=True, text=True, timeout=60, check=True)
    decoded = json.loads(out.stdout)
    assert decoded["summary"]["field_numbers"]["nvme_state"] == 10000
    assert decoded["summary"]["nvme_state"] == ["a100:00:00.0"]
    nvme = decoded["state"]["init_state"]["nvme_state"]
    at_default = {"unmapped", "last_aen"}  # no fused queues; no event arrived in the window
    every = {name.rsplit(".", 1)[1] for name in all_fields(underhill_pb2.NvmeSavedState.DESCRIPTOR)}
    missing = every - at_default - keys_in(nvme)
    assert not missing, missing


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
    assert host.inspect("worker/pool/pending_pages") == 0
    assert r["io_errors"] == 0 and wait_io(host)["errors"] == 0


def test_nvme_keepalive_only_boots_mana_fresh_without_leaks(host):
    r, log = window(host, nvme_keepalive=True)
    (n,), (nic,) = r["nvme"], r["nics"]
    assert r["status"] == "ok" and n["restore_path"] == "keepalive" and nic["restore_path"] == "fresh"
    assert not TRIPWIRES & set(log), log
    assert [(u["device"], u["pages"]) for u in r["unclaimed_pool_allocations"]] == [("nic_d186:00:00.0", 6)]
    assert pool_devices(host) == {"nvme_a100:00:00.0": 3 * QUEUE_PAGES, "nic_d186:00:00.0": 6}
    assert host.inspect("worker/pool/pending_pages") == 0
    assert host.probe(0, 4)["ok"]
    assert r["io_errors"] == 0 and wait_io(host)["errors"] == 0


def test_keepalive_disabled_on_the_new_side_frees_buffers_and_resets(host):
    r, log = window(host, mana_keepalive=True, nvme_keepalive=True,
                    next_env={"OPENHCL_NVME_KEEP_ALIVE": "disabled"})
    (n,) = r["nvme"]
    assert n["restore_path"] == "fresh" and r["status"] == "degraded", r
    assert n["reason"] == "keepalive not configured in the new worker (NVMe keepalive disabled)"
    assert n["device_reset"] and n["controller_enabled"]
    assert log.count("CC_DISABLE") == 1 and log.index("CC_DISABLE") < log.index("CC_ENABLE"), log
    # The saved queue blocks were attached and freed (none left for the validation to list), and the new
    # worker's queues are in worker RAM (an ephemeral client): no NVMe page left in the pool.
    freed = [line for line in host.worker_log(host.inspect("worker/generation")).splitlines()
             if "freed saved nvme buffers" in line]
    assert len(freed) == 1 and f"pages={3 * QUEUE_PAGES}" in freed[0], freed
    assert [u for u in r["unclaimed_pool_allocations"] if u["device"].startswith("nvme_")] == []
    assert pool_devices(host) == {"nic_d186:00:00.0": 6} and host.inspect("worker/pool/pending_pages") == 0
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
    with open(os.path.join(host.run_dir, "host.log")) as f:  # the host's log says why, as for a NIC
        done = [ln for ln in f if 'msg="servicing done"' in ln][-1]
    assert "nvme_paths=fallback" in done and "a100:00:00.0: saved state rejected: " in done, done


def nvme_counters(host) -> dict:
    return nvme_ctl(host, "counters")["counters"]


def assert_queues_on_the_controllers_pool_pages(host) -> None:
    """Every SQ and CQ the controller runs lies inside a pool slot allocated to its own DMA client."""
    slots = [(s["base_pfn"] * 4096, (s["base_pfn"] + s["pages"]) * 4096)
             for s in host.inspect("worker/pool")["slot_table"]
             if s["state"] == "allocated" and s["owner"] == "nvme_a100:00:00.0"]
    state = nvme_ctl(host, "state")
    queues = [(q["base"], q["size"] * 64) for q in state["sqs"]] + [(q["base"], q["size"] * 16) for q in state["cqs"]]
    assert len(queues) == 6, state
    for base, nbytes in queues:
        assert any(lo <= base and base + nbytes <= hi for lo, hi in slots), (base, nbytes, slots)


@pytest.mark.parametrize("mode, error", [
    ("nvme-mem-len", "admin queue: mem_len 286720 is not the 282624-byte queue pair block"),
    ("nvme-qid-out-of-range", "IO queue 3: qid repeated or above max_io_queues 2"),
    ("nvme-cid-out-of-range", "admin queue: CID"),
    ("nvme-pending-overflow", "admin queue: 256 pending commands, more than the 255 a 256-entry queue holds"),
])
def test_hostile_saved_queues_take_the_fresh_path_inside_the_devices_pages(host, mode, error):
    """A typed error, then the fresh path (controller reset and re-enabled); the restore attached and freed the
    saved queue blocks and wrote nothing (no DMA fault, no stray doorbell at the controller); the controller's
    queues are on its own pool pages; nothing leaks and the disk works."""
    before = nvme_counters(host)
    r, log = window(host, mana_keepalive=True, nvme_keepalive=True, tamper=mode)
    (n,) = r["nvme"]
    assert n["restore_path"] == "fallback" and r["status"] == "degraded", r
    assert n["reason"].startswith("saved state rejected: InvalidSavedState: ") and error in n["reason"], n
    assert n["device_reset"] and n["controller_enabled"]
    assert log.index("CC_DISABLE") < log.index("CC_ENABLE") < log.index("IDENTIFY") < log.index("CREATE_IO_CQ"), log
    after = nvme_counters(host)
    assert [after[k] - before[k] for k in ("dma_faults", "bad_doorbells", "queue_failures")] == [0, 0, 0], after
    assert_queues_on_the_controllers_pool_pages(host)
    assert [u for u in r["unclaimed_pool_allocations"] if u["device"].startswith("nvme_")] == []
    assert pool_devices(host) == {"nvme_a100:00:00.0": 3 * QUEUE_PAGES, "nic_d186:00:00.0": 6}
    assert host.inspect("worker/pool/pending_pages") == 0
    assert r["io_errors"] == 0 and wait_io(host)["errors"] == 0


def test_a_previous_release_blob_without_field_10000_restores_nvme_fresh(host):
    """The old worker saved the controller for keepalive (left running, queues in the pool), but the state
    the new worker gets has no field 10000: the controller is reset and initialised fresh, its stale pool
    pages are freed and listed, and the disk works."""
    r, log = window(host, mana_keepalive=True, nvme_keepalive=True, tamper="nvme-state-missing")
    (n,), (nic,) = r["nvme"], r["nics"]
    assert nic["restore_path"] == "keepalive" and n["restore_path"] == "fresh", r
    assert n["reason"] == "no saved state for it reached the new worker" and r["status"] == "degraded", n
    assert n["device_reset"] and n["controller_enabled"] and "IDENTIFY" in n["admin_commands"]
    assert log.index("CC_DISABLE") < log.index("CC_ENABLE"), log
    stale = [(u["device"], u["pages"]) for u in r["unclaimed_pool_allocations"]]
    assert stale == [("nvme_a100:00:00.0", QUEUE_PAGES)] * 3, stale
    assert pool_devices(host) == {"nvme_a100:00:00.0": 3 * QUEUE_PAGES, "nic_d186:00:00.0": 6}
    assert r["io_errors"] == 0 and wait_io(host)["errors"] == 0


def test_mixed_flags_under_strict_pool_fail_like_openhcl_and_the_disk_keeps_working(host):
    """VFKEEP_STRICT_POOL=1 (DESIGN D8): MANA only leaves the controller's stale pages unclaimed:
    "unrestored allocations found" naming them, the pages stay pending; NVMe still came up fresh and IO
    flows. A servicing without keepalive (no DMA state handed over) gives a clean pool again."""
    r = host.service(mana_keepalive=True, next_env={"VFKEEP_STRICT_POOL": "1"})
    assert not r["ok"] and "unrestored allocations found: nvme_a100:00:00.0" in r["error"], r
    assert r["nvme"][0]["restore_path"] == "fresh" and r["nics"][0]["restore_path"] == "keepalive"
    assert host.inspect("worker/pool/pending_pages") == 3 * QUEUE_PAGES
    assert r["io_errors"] == 0 and wait_io(host)["errors"] == 0
    r = host.service()
    assert r["ok"] and host.inspect("worker/pool/pending_pages") == 0, r
    assert pool_devices(host) == {"nvme_a100:00:00.0": 3 * QUEUE_PAGES, "nic_d186:00:00.0": 6}
    assert wait_io(host)["errors"] == 0


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


@pytest.mark.parametrize("cmd", ["start", "stop", "stats"])
def test_a_disk_the_host_does_not_have_is_bad_usage(host, cmd):
    """`disk start --disk 1` on a host with one disk was the host's refusal, exit 1 (`probe 1`: exit 2)."""
    r = host.cli("disk", cmd, "--disk", "1", "--run-dir", host.run_dir)
    assert r.returncode == 2 and r.stderr.startswith(f"vfkeep: disk {cmd}: Invalid value for --disk: disk 1 out of "
                                                     "range: the host has 1 disk(s)"), r.stderr


def test_every_block_verifies_after_the_servicings(host):
    host.disk("verify")
    (st,) = host.disk("stats")["disks"]
    assert st["chunks_written"] > 0 and st["outstanding"] == 0
    assert st["errors"] == st["verify_errors"] == st["duplicates"] == 0, json.dumps(st)


def test_disk_stats_verify_says_what_it_checked_and_names_bad_blocks(host):
    """`disk stats --verify` (text) says that a verify ran, how many chunks and blocks it read back and the bad
    blocks it found; a bad block is in the agent's log and the command fails with one line naming the log.
    (Last in the module: it corrupts the disk.)"""
    r = host.cli("disk", "stats", "--verify", "--run-dir", host.run_dir)
    assert r.returncode == 0, r.stderr
    (line,) = [ln for ln in r.stdout.splitlines() if ln.startswith("verify: ")]
    chunks = host.disk("stats")["disks"][0]["chunks_written"]
    assert line == f"verify: disk 0: read back {chunks} chunks ({chunks * 8} blocks), 0 bad blocks", line
    r = host.cli("disk", "stats", "--verify", "--json", "--run-dir", host.run_dir)
    (v,) = json.loads(r.stdout)["verify"]
    assert r.returncode == 0 and v == {"disk": 0, "chunks": chunks, "blocks": chunks * 8, "verify_errors": 0,
                                       "bad_blocks": []}, v
    with open(os.path.join(host.run_dir, "nvme0.disk"), "r+b") as f:
        f.write(b"\xa5" * (1 << 20))  # the first 256 chunks: some of them written
    r = host.cli("disk", "stats", "--verify", "--run-dir", host.run_dir)
    agent_log = os.path.join(host.run_dir, "disk-agent-0.log")
    (line,) = [ln for ln in r.stdout.splitlines() if ln.startswith("verify: ")]
    assert r.returncode == 1 and f"read back {chunks} chunks" in line and " bad blocks: lba " in line, r.stdout
    assert r.stderr.splitlines()[-1].startswith("vfkeep: disk stats: disk 0: ") and agent_log in r.stderr, r.stderr
    with open(agent_log) as f:
        text = f.read()
    assert "block verification failed" in text and "lba=" in text and "verify found bad blocks" in text
