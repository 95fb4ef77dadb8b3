"""Ctrl-C (and SIGTERM) on a command: its own cleanup, one line `vfkeep: COMMAND: interrupted (SIG...)`
saying what became of its work, exit 128 + N; never click's `Aborted!`, exit 1 (new-user review items 8, 9,
11)."""
import os
import signal
import subprocess
import sys

import pytest

from helpers import CLEAN_ENV, interrupt, wait_for
from servicing_helpers import SESSION, HostRun, children_of, live_processes, pid_alive
from vfkeep import proc


def start(*args: str, env: dict | None = None, preexec_fn=None) -> subprocess.Popen:
    return subprocess.Popen(proc.vfkeep_argv(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, stdin=subprocess.DEVNULL, env={**CLEAN_ENV, **(env or {})},
                            preexec_fn=preexec_fn)


def last_line(err: str) -> str:
    assert "Traceback" not in err and "Aborted!" not in err, err
    return err.strip().splitlines()[-1]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_smoke_removes_its_temporary_run_dir(tmp_path, sig):
    """Item 8: the temporary run dir was removed only when the scenario passed."""
    child = start("smoke", env={"TMPDIR": str(tmp_path)})
    wait_for(lambda: len(live_processes(SESSION, child.pid)) >= 2, child=child)  # smoke + its test device
    _, err = interrupt(child, sig)
    assert child.returncode == 128 + sig, err
    line = last_line(err)
    assert line.startswith(f"vfkeep: smoke: interrupted ({signal.Signals(sig).name}); every process ended") \
        and line.endswith("removed"), line
    assert os.listdir(tmp_path) == [] and live_processes(SESSION, child.pid) == []


def test_a_command_started_with_sigint_ignored_is_still_interrupted_by_it(tmp_path):
    """A script's `vfkeep ... &` (and a suite run that way) passes SIGINT ignored: Python then installs no
    KeyboardInterrupt handler, and smoke ran to its end through the interrupt (exit 0, as in a fresh-clone CI)."""
    child = start("smoke", env={"TMPDIR": str(tmp_path)},
                  preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    wait_for(lambda: len(live_processes(SESSION, child.pid)) >= 2, child=child)
    _, err = interrupt(child, signal.SIGINT)
    assert child.returncode == 130, err
    assert last_line(err).startswith("vfkeep: smoke: interrupted (SIGINT)")
    assert os.listdir(tmp_path) == [] and live_processes(SESSION, child.pid) == []


#: A worker that never answers: the boot waits for it (up to a minute).
SILENT_WORKER = f"{sys.executable} -c 'import time; time.sleep(300)'"


@pytest.mark.parametrize("how", ["--detach", "--no-console"])
def test_interrupted_start_up_stops_the_host(tmp_path, how):
    """Items 9 and 11: the --detach launcher said `Aborted!` (exit 1) and the host it had started booted on in
    its session; the boot itself waited for its worker before it stopped."""
    run_dir = tmp_path / "run"
    child = start("run", how, "--run-dir", str(run_dir), "--timing", "natural", "--worker-cmd", SILENT_WORKER)
    wait_for(lambda: (run_dir / "host.pid").exists(), child=child)
    host = int((run_dir / "host.pid").read_text())
    wait_for(lambda: len(children_of(host)) >= 2, child=child)  # its device and its worker
    kids = children_of(host)
    _, err = interrupt(child, signal.SIGINT)
    assert child.returncode == 130, err
    if how == "--detach":
        assert last_line(err) == (f"vfkeep: run: interrupted (SIGINT); the host starting in the background (pid "
                                  f"{host}) was stopped, every child ended"), err
    else:
        assert last_line(err).startswith("vfkeep: run: interrupted (SIGINT) during start-up; every child ended"), err
    assert not pid_alive(host) and not [k for k in kids if pid_alive(k)]
    assert not proc.processes_mentioning(str(run_dir)) and not (run_dir / "host.pid").exists()


def test_interrupted_service_says_the_servicing_carries_on(tmp_path):
    """Item 11: `service` interrupted said `Aborted!` (exit 1); the servicing goes on in the host."""
    h = HostRun(tmp_path / "run")
    try:
        child = start("service", "--run-dir", h.run_dir, "--test-config", "SERVICING_SAVE_STUCK", "--timeout", "1")
        wait_for(lambda: h.status()["servicing"] is not None, child=child)
        _, err = interrupt(child, signal.SIGINT)
        assert child.returncode == 130, err
        assert last_line(err).startswith("vfkeep: service: interrupted (SIGINT); the servicing carries on in the "
                                         "host"), err
        wait_for(lambda: h.status()["servicing"] is None)  # it completes on its own (a stuck save: the fresh path)
        assert h.inspect("last_servicing")["result"]["status"] == "failed"
    finally:
        h.stop()


def test_interrupted_chaos_keeps_its_run_dir_as_interrupted_and_writes_a_partial_report(tmp_path):
    """Item 11: chaos said `Aborted!` (exit 1) and 'run dir kept in /tmp/vfk-chaos-failed-PID', no --json."""
    import glob
    import json

    report = tmp_path / "chaos.json"
    child = start("chaos", "--servicings", "100", "--json", str(report), env={"TMPDIR": str(tmp_path)})
    # the warm-up servicing is done once its result is recorded: the campaign runs
    wait_for(lambda: glob.glob(str(tmp_path / "vfk-chaos-*" / "run" / "last_servicing.json")), 120, child)
    _, err = interrupt(child, signal.SIGINT)
    assert child.returncode == 130, err
    keep = tmp_path / f"vfk-chaos-interrupted-{child.pid}"
    line = last_line(err)
    assert line.startswith("vfkeep: chaos: interrupted (SIGINT); stopped after ") and line.endswith(
        f"of 100 servicings, run dir kept in {keep}, partial report in {report}"), line
    data = json.loads(report.read_text())
    assert data["interrupted"] and data["run_dir_kept"] == str(keep) and data["servicings"] < 100
    assert (keep / "host.log").exists() and not proc.processes_mentioning(str(tmp_path))
