"""Host mechanics without NICs: result shape, state decode, inspect, D4/D5 hooks, console, bad input."""
import datetime
import json
import os
import subprocess
import threading
import time

import pytest

from servicing_helpers import HostRun
from vfkeep import proc, rpc

RESULT_KEYS = {"ok", "mana_keepalive", "nvme_keepalive", "nics", "unclaimed_pool_allocations", "phases_ms",
               "blackout_ms", "frames_lost", "timing", "error", "status", "nvme", "io_blackout_ms", "io_errors"}


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    h = HostRun(tmp_path_factory.mktemp("host0") / "run", nics=0)
    yield h
    h.stop()


def test_result_shape_and_state_file(host):
    r = host.service(mana_keepalive=True)
    assert set(r) == RESULT_KEYS
    assert r["ok"] and r["error"] is None and r["nics"] == []
    assert set(r["phases_ms"]) == {"save", "handoff", "replacement", "restore", "total"}
    assert r["phases_ms"]["total"] >= r["phases_ms"]["save"]
    assert r["blackout_ms"] is None and r["frames_lost"] is None

    blob = os.path.join(host.run_dir, "servicing_state.bin")
    out = host.cli("state", "decode", blob, "--json")
    assert out.returncode == 0, out.stderr
    decoded = json.loads(out.stdout)
    assert decoded["summary"]["dma_manager_state"] is True  # keepalive effective, no devices
    assert decoded["summary"]["mana_state"] is None          # no VF managers: absent, not empty
    human = host.cli("state", "decode", blob)
    assert "init_state" in human.stdout and "private_pool" in human.stdout


def test_state_reaches_the_new_worker_before_anything_is_written_to_disk(host):
    """The blob goes to the next worker straight from the old one's message; the run dir's copy is written only once
    the next worker has started (off the servicing's critical path), so its mtime is after that worker's line."""
    host.service(mana_keepalive=True)
    generation = host.status()["worker"]["generation"]
    started = [line for line in host.worker_log(generation).splitlines() if 'msg="worker started"' in line][-1]
    ts = started.split()[0]  # ts=YYYY-MM-DDTHH:MM:SS.mmmZ (UTC, ms truncated)
    logged = datetime.datetime.fromisoformat(ts[3:-1]).replace(tzinfo=datetime.timezone.utc).timestamp()
    assert os.stat(os.path.join(host.run_dir, "servicing_state.bin")).st_mtime >= logged


def test_state_file_is_what_the_new_worker_was_given(host):
    """With --tamper the run dir's servicing_state.bin is the tampered blob the new worker got; the old
    worker's own save is beside it as servicing_state.untampered.bin, which the next servicing removes."""
    state, saved = (os.path.join(host.run_dir, n) for n in ("servicing_state.bin", "servicing_state.untampered.bin"))
    host.service(mana_keepalive=True, tamper="truncate")
    with open(state, "rb") as f, open(saved, "rb") as g:
        handed, original = f.read(), g.read()
    assert handed == original[:len(original) // 2] and handed
    out = host.cli("state", "decode", state)
    assert out.returncode == 2 and "not a ServicingState" in out.stderr
    assert host.service(mana_keepalive=True)["ok"]
    assert not os.path.exists(saved)
    assert host.cli("state", "decode", state).returncode == 0


def test_no_keepalive_omits_dma_state(host):
    r = host.service()
    assert r["ok"]
    decoded = json.loads(host.cli("state", "decode", os.path.join(host.run_dir, "servicing_state.bin"),
                                  "--json").stdout)
    assert decoded["summary"]["dma_manager_state"] is False


def test_decode_rejects_garbage(host, tmp_path):
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"\x0f\x00garbage")
    out = host.cli("state", "decode", str(bad))
    assert out.returncode != 0 and "not a ServicingState" in out.stderr


def test_inspect_paths(host):
    gen = host.inspect("worker/generation")
    assert isinstance(gen, int) and gen >= 1
    assert host.inspect("worker/keepalive") == {"mana": "enabled", "nvme": "disabled"}
    with pytest.raises(rpc.Refused, match="no 'nope' here"):
        host.inspect("worker/nope")
    out = host.cli("inspect", "--run-dir", host.run_dir, "worker/pool")
    assert out.returncode == 0 and "total_pages" in out.stdout
    # The slot table as well as the totals: no NIC, so one free slot over the whole pool.
    pool = host.inspect("worker/pool")
    assert pool["slot_table"] == [{"base_pfn": pool["slot_table"][0]["base_pfn"], "pages": pool["total_pages"],
                                   "state": "free", "owner": None, "tag": None}]
    assert "slot_table" in out.stdout and f"pages={pool['total_pages']} state=free" in out.stdout


def test_save_stuck_times_out_then_next_servicing_is_fresh_decision(host):
    """D4: the host gives up after --timeout, ends the worker and starts the next one anyway; D5: the
    following servicing is decided afresh."""
    pid = host.inspect("worker/pid")
    r = host.service(mana_keepalive=True, timeout=1.0, test_config="SERVICING_SAVE_STUCK")
    assert not r["ok"] and "did not answer within" in r["error"]
    assert host.inspect("worker/pid") != pid
    assert host.inspect("worker/restore/servicing_state_bytes") is None  # no state: fresh path
    assert host.service(mana_keepalive=True)["ok"]


def test_prelaunched_worker_asks_for_the_state_before_the_save_ends(host):
    """The prelaunched next worker is started for the servicing before the save (issue 10): its request for
    the saved state already waits when the host has the state. When the save then fails (D4, here: stuck
    past --timeout), that worker is ended and one without state takes over: the fresh path, as before."""
    gen = host.inspect("worker/generation")
    r = host.service(mana_keepalive=True, timeout=1.0, test_config="SERVICING_SAVE_STUCK")
    assert not r["ok"] and "did not answer within" in r["error"]
    assert "servicing state requested" in host.worker_log(gen + 1)  # while the old worker hung in its save
    assert host.inspect("worker/generation") == gen + 2
    assert "servicing state requested" not in host.worker_log(gen + 2)
    assert host.inspect("worker/restore/servicing_state_bytes") is None
    assert host.service(mana_keepalive=True)["ok"]


def test_save_crash_starts_worker_anyway(host):
    r = host.service(mana_keepalive=True, test_config="SERVICING_SAVE_CRASH")
    assert not r["ok"] and "closed its channel" in r["error"]
    assert host.inspect("worker/restore/servicing_state_bytes") is None
    assert host.service(mana_keepalive=True)["ok"]


def test_save_fail_keeps_worker_running(host):
    pid = host.inspect("worker/pid")
    r = host.service(mana_keepalive=True, test_config="SERVICING_SAVE_FAIL")
    assert not r["ok"] and "SERVICING_SAVE_FAIL" in r["error"]
    assert host.inspect("worker/pid") == pid
    assert "SERVICING_SAVE_FAIL" in host.inspect("worker/last_save_error")
    r = host.service(mana_keepalive=True)  # D5: not sticky
    assert r["ok"] and host.inspect("worker/pid") != pid


def test_restore_stuck_replaced_with_same_state(host):
    r = host.service(mana_keepalive=True, timeout=1.5, next_env={"VFKEEP_TEST_CONFIG": "SERVICING_RESTORE_STUCK"})
    assert not r["ok"] and r["error"].startswith("restore:")
    assert host.inspect("worker/test_config") is None
    assert host.inspect("worker/restore/servicing_state_bytes") > 0  # the replacement got the blob
    assert host.service(mana_keepalive=True)["ok"]


def test_one_state_change_at_a_time(host):
    """Spec §13: only one servicing may be in progress."""
    slow = threading.Thread(target=host.service, kwargs={"timeout": 3.0, "test_config": "SERVICING_SAVE_STUCK"})
    slow.start()
    try:
        # The first servicing is surely in progress (its save is stuck for 3 s) before the second is asked for:
        # a fixed wait let a loaded machine send the second first.
        deadline = time.monotonic() + 30
        while (host.status(wait=5)["servicing"] or {}).get("phase") != "save":
            assert time.monotonic() < deadline and slow.is_alive(), "the first servicing never reached its save"
            time.sleep(0.02)
        with pytest.raises(rpc.Refused, match="a servicing is already in progress"):
            host.service()
    finally:
        slow.join()
    assert host.service()["ok"]


def test_next_worker_that_does_not_start_leaves_vm_untouched(host):
    pid = host.inspect("worker/pid")
    with pytest.raises(rpc.Refused, match="next worker did not start"):
        host.service(mana_keepalive=True, next_worker_cmd="false")
    assert host.inspect("worker/pid") == pid and host.service()["ok"]


def test_unknown_test_config_is_refused(host):
    """A mistyped hook must not run a real servicing instead (issue 11)."""
    pid = host.inspect("worker/pid")
    with pytest.raises(rpc.Refused, match="unknown test config 'SERVICING_NONSENSE'"):
        host.service(mana_keepalive=True, test_config="SERVICING_NONSENSE")
    assert host.inspect("worker/pid") == pid


def test_bad_requests_refused(host):
    for bad in (-1, float("nan"), "5"):  # nan passed every comparison: the host's internal error (math.ceil)
        with pytest.raises(rpc.Refused, match="timeout must be a positive number of seconds"):
            host.service(timeout=bad)
    with pytest.raises(rpc.BadArguments, match="unexpected keyword argument 'flavour'"):
        host.service(flavour="x")
    with pytest.raises(rpc.Refused, match="unknown tamper mode"):
        host.service(tamper="shred")
    with pytest.raises(rpc.UnknownCommand,
                       match="known: disk, events, exec, inspect, probe, service, status, stop, traffic"):
        host.call("reboot")
    out = host.cli("service", "--run-dir", host.run_dir, "--next-env", "NOEQUALS")
    assert out.returncode == 2 and "KEY=VAL" in out.stderr


def test_malformed_env_warns_and_disables(tmp_path):
    h = HostRun(tmp_path / "run", nics=0,
                env={"OPENHCL_MANA_KEEP_ALIVE": "1", "OPENHCL_NVME_KEEP_ALIVE": "host, privatepool"})
    try:
        assert h.inspect("worker/keepalive") == {"mana": "disabled", "nvme": "disabled"}
        log = h.worker_log(1)
        assert "bad keepalive setting" in log and "OPENHCL_MANA_KEEP_ALIVE" in log and "value=1" in log
        r = h.service(mana_keepalive=True, nvme_keepalive=True)
        assert r["ok"]
        decoded = json.loads(h.cli("state", "decode", os.path.join(h.run_dir, "servicing_state.bin"), "--json").stdout)
        assert decoded["summary"]["dma_manager_state"] is False  # nothing effective
    finally:
        h.stop()


def test_console_bad_input_keeps_running(tmp_path):
    run_dir = tmp_path / "run"
    script = "\n".join(["frobnicate", "servce", "service-vtl2 --bogus", "service-vtl2 --timeout abc", "inspect worker/nope",
                        "inspect --wat", "status extra", "probe x", "help", "help service-vtl2",
                        "service-vtl2 --mana-keepalive", "inspect worker/generation", "quit"]) + "\n"
    r = subprocess.run(proc.vfkeep_argv("run", "--run-dir", str(run_dir), "--nics", "0", "--timing", "natural"),
                       input=script, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "COLUMNS": "200", "TERM": "dumb"})
    out = r.stdout
    assert r.returncode == 0, r.stderr
    assert "unknown command 'frobnicate'" in out and "unknown command 'servce'; did you mean 'service'?" in out
    assert "No such option '--bogus'" in out
    assert "'abc' is not a valid float" in out
    assert "no 'nope' here" in out
    assert "No such option '--wat'" in out
    assert "unexpected extra argument (extra)" in out
    assert "'x' is not a valid integer" in out
    assert "Usage: service [OPTIONS]" in out and "Service the paravisor" in out
    assert "servicing ok" in out
    assert "vfkeep> 2\n" in out


class _StubHost:
    run_dir = "/nonexistent"
    tree = {"worker": {"keepalive": {"mana": "enabled"}, "nics": [{"pdid": 0}], "pid": 1}, "host": {}}

    def inspect(self, path=None):
        from vfkeep.host.vmm import _select
        return _select(self.tree, path)


def test_console_completion():
    from vfkeep.host.console import HostConsole
    c = HostConsole(_StubHost())
    assert c.completenames("ser") == ["service", "service-vtl2"]
    assert c.completedefault("--ma", "service-vtl2 --ma", 13, 17) == ["--mana-keepalive"]
    rest = c.completedefault("--", "service --mana-keepalive --", 26, 28)
    assert {"--nvme-keepalive", "--timeout", "--test-config", "--next-env", "--next-worker-cmd", "--json",
            "--require-keepalive"} <= set(rest) and "--mana-keepalive" not in rest
    assert c.completedefault("wor", "inspect wor", 8, 11) == ["worker/"]
    assert c.completedefault("worker/", "inspect worker/", 8, 15) == ["worker/keepalive/", "worker/nics/",
                                                                       "worker/pid"]
    assert c.completedefault("worker/nics/", "inspect worker/nics/", 0, 0) == ["worker/nics/0"]
    assert c.completedefault("nope/x", "inspect nope/x", 0, 0) == []


def test_console_traffic(tmp_path):
    """Guest traffic from the console: start, a servicing that reports the guest's blackout, stats, stop."""
    script = "\n".join(["traffic start --rate 2000", "traffic bogus", "traffic start --rate x",
                        "service-vtl2 --mana-keepalive", "traffic stats --settle-ms 500", "traffic stop",
                        "quit"]) + "\n"
    r = subprocess.run(proc.vfkeep_argv("run", "--run-dir", str(tmp_path / "run"), "--nics", "1", "--timing",
                                        "natural"),
                       input=script, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "COLUMNS": "200", "TERM": "dumb"})
    out = r.stdout
    assert r.returncode == 0, r.stderr
    assert "nic 0: 2000 frames/s of 128 bytes" in out
    assert "No such command 'bogus'" in out and "'x' is not a valid float" in out
    assert "servicing ok" in out
    assert "traffic since the last start" in out and "last servicing window" in out
    assert "nic 0: stopped after" in out


def test_console_traffic_completion():
    from vfkeep.host.console import HostConsole
    c = HostConsole(_StubHost())
    assert c.completenames("tr") == ["traffic"]
    assert c.completedefault("st", "traffic st", 8, 10) == ["start", "stats", "stop"]
    assert c.completedefault("--r", "traffic start --r", 14, 17) == ["--rate"]


def test_a_host_without_devices_says_so(host):
    """`run --nics 0` without `--nvme`: a VM with nothing to keep alive. `service --require-keepalive` exited 0 (every
    NIC kept alive, of none), `traffic stats|stop` said to start traffic, which `traffic start` then refused, and
    `service --nics 0` named the host's NICs as "0 to -1"."""
    before = host.status()["servicings"]
    r = host.cli("service", "--run-dir", host.run_dir, "--mana-keepalive", "--require-keepalive")
    assert (r.returncode, r.stdout) == (2, ""), r
    assert r.stderr == ("vfkeep: service: Invalid value for --require-keepalive: the host has no NIC and no NVMe "
                        "controller: nothing to keep alive (`vfkeep service --help`)\n"), r.stderr
    r = host.cli("service", "--run-dir", host.run_dir, "--nics", "0")
    assert r.returncode == 2 and r.stderr.startswith("vfkeep: service: Invalid value for --nics: NIC 0 out of range: "
                                                     "the host has no NICs (`vfkeep service --help`)"), r.stderr
    assert host.status()["servicings"] == before
    r = host.cli("service", "--run-dir", host.run_dir, "--mana-keepalive")
    assert r.returncode == 0 and "no NIC or NVMe controller: nothing was kept alive or restored" in r.stdout, r
    for action in ("start", "stats", "stop"):
        r = host.cli("traffic", action, "--run-dir", host.run_dir)
        assert r.returncode == 1 and r.stderr.startswith(f"vfkeep: traffic {action}: this host has no NICs: start "
                                                         "it with `vfkeep run --nics N`"), r


def test_servicings_counted_are_those_started_and_status_shows_the_last(host):
    """Requests refused for their arguments' types were counted as servicings (an internal error after
    `servicing_started`, with no `servicing_completed`), and a servicing whose next worker did not start ("servicing
    not attempted") was counted while `last_servicing_ok` still told of the one before it, or was null."""
    before = host.status()["servicings"]
    for args, message in (({"next_env": "x"}, "next_env must be"), ({"next_env": {"A": 1}}, "next_env must be"),
                          ({"next_worker_cmd": 5}, "next_worker_cmd must be"), ({"test_config": 5}, "test config"),
                          ({"mana_keepalive": "yes"}, "mana_keepalive must be"),
                          ({"nvme_keepalive": 1}, "nvme_keepalive must be")):
        with pytest.raises(rpc.Refused, match=message):
            host.service(**args)
    assert host.status()["servicings"] == before
    assert host.service(mana_keepalive=True)["ok"]
    with pytest.raises(rpc.Refused, match="servicing failed before the save: the next worker did not start"):
        host.service(next_worker_cmd="false")
    status = host.status()
    assert (status["servicings"], status["last_servicing_ok"], status["last_servicing_status"]) == \
        (before + 2, False, "failed"), status
    last = host.inspect("last_servicing/result")
    assert last["error"].startswith("servicing failed before the save: the next worker did not start"), last
    assert (last["status"], last["nics"], last["phases_ms"]["save"]) == ("failed", [], None), last
    assert host.service()["ok"] and host.status()["last_servicing_status"] == "ok"
