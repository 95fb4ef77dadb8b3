"""Ctrl-C (and SIGTERM) on a command: its own cleanup, one line `vfkeep: COMMAND: interrupted (SIG...)`
saying what became of its work, exit 128 + N; never click's `Aborted!`, exit 1 (new-user review items 8, 9,
11)."""
import os
import signal
import subprocess
import sys
import threading

import pytest

from helpers import CLEAN_ENV, HeldAtFinalization, interrupt, wait_for
from servicing_helpers import SESSION, HostRun, children_of, live_processes, pid_alive
from vfkeep import proc, rpc


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


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_second_interrupt_once_python_finalizes_a_command_changes_nothing(tmp_path, sig):
    """Ctrl-C on `vfkeep smoke` (as on any command but the host's children), then `sig` once Python is finalizing
    it: the finalization had put back the signals' default actions (its handlers no longer run), and that killed it
    (status -2 or -15) after its line said what it did. Now a signal then is ignored: exit 130 as said."""
    with HeldAtFinalization() as held:
        child = subprocess.Popen(held.argv("smoke"), pass_fds=held.pass_fds, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, start_new_session=True, stdin=subprocess.DEVNULL,
                                 env={**CLEAN_ENV, "TMPDIR": str(tmp_path)})
        held.started()
        try:
            wait_for(lambda: len(live_processes(SESSION, child.pid)) >= 2, child=child)  # smoke + its test device
            child.send_signal(signal.SIGINT)
            held.reached(child)
            child.send_signal(sig)
            held.release()
            _, err = child.communicate(timeout=60)
        finally:
            held.release()
            if child.poll() is None:
                proc.end(child)
    assert child.returncode == 130, err
    assert last_line(err).startswith("vfkeep: smoke: interrupted (SIGINT); every process ended"), err
    assert os.listdir(tmp_path) == [] and live_processes(SESSION, child.pid) == []


def test_a_signal_once_python_finalizes_a_finished_command_changes_nothing():
    """`vfkeep layout` done, all its output written: a Ctrl-C while Python finalized it killed it (status -2). Its
    status is its own."""
    with HeldAtFinalization() as held:
        child = subprocess.Popen(held.argv("layout", "--device", "nvme"), pass_fds=held.pass_fds,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
                                 env=CLEAN_ENV)
        held.started()
        try:
            held.reached(child)
            child.send_signal(signal.SIGINT)
            held.release()
            out, err = child.communicate(timeout=60)
        finally:
            held.release()
            if child.poll() is None:
                proc.end(child)
    assert child.returncode == 0 and err == "", err
    assert out == subprocess.run(proc.vfkeep_argv("layout", "--device", "nvme"), capture_output=True, text=True,
                                 env=CLEAN_ENV, timeout=60).stdout


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
                                  f"{host}) was stopped, every child ended (log: {run_dir / 'host.log'})"), err
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


def test_interrupted_stop_says_the_host_goes_on_stopping(tmp_path):
    """`vfkeep stop` interrupted while it waited for the host to exit said only "interrupted (SIGINT)": the host,
    asked to stop, goes on stopping (here it waits for a stuck save to reach a safe point).

    The host is held (SIGSTOP) from the line on until the interrupted `stop` exited: it cannot exit first, however
    late the interrupt is taken on a loaded machine (the save was stuck for only 5 s, after which the host stopped and
    the `stop` could end on its own before the interrupt came, or start too late to see the servicing)."""
    h = HostRun(tmp_path / "run")
    servicing = threading.Thread(target=lambda: _quietly(h.service, test_config="SERVICING_SAVE_STUCK", timeout=300,
                                                         wait=400))
    servicing.start()
    child = None
    try:
        wait_for(lambda: (h.status()["servicing"] or {}).get("phase") == "save")
        child = start("stop", "--run-dir", h.run_dir)
        line = child.stdout.readline()  # (said once the host answered the stop, which waits for a safe point)
        os.kill(h.pid, signal.SIGSTOP)
        assert line.startswith(f"host pid {h.pid}: a servicing is in progress (phase save)"), line
        _, err = interrupt(child, signal.SIGINT)
        assert child.returncode == 130 and last_line(err) == (
            f"vfkeep: stop: interrupted (SIGINT); host pid {h.pid} was asked to stop and goes on stopping (log: "
            f"{h.run_dir}/host.log)"), err
        os.kill(h.pid, signal.SIGCONT)
        assert h.reap(120) == 0  # (its safe-point wait, 10 s, then the stuck worker ended)
    finally:
        if child is not None and child.poll() is None:
            proc.end(child)
        if h.child.poll() is None:
            os.kill(h.pid, signal.SIGCONT)
            h.kill()
        servicing.join(60)


def _quietly(fn, **kwargs):
    """fn(**kwargs), its failure ignored (a servicing the host abandons as it stops)."""
    try:
        fn(**kwargs)
    except rpc.RpcError:
        pass


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


def _servicing_until(h: HostRun, phase: str, **request) -> tuple[threading.Thread, list]:
    """A servicing requested on a thread of its own, returned once the host is in its `phase`; the list gets
    its result or its refusal."""
    out: list = []

    def service():
        try:
            out.append(h.service(wait=120, **request))
        except rpc.RpcError as e:
            out.append(e)

    t = threading.Thread(target=service)
    t.start()
    wait_for(lambda: (h.status(wait=5)["servicing"] or {}).get("phase") == phase or bool(out))
    assert not out, out
    return t, out


def _interrupt_host(h: HostRun, t: threading.Thread, ready=lambda kids: True) -> list[int]:
    """Ctrl-C to the host once `ready(its children)`: it must exit 130; the servicing thread `t` is joined. Returns
    the children it had then (each must be gone afterwards)."""
    try:
        wait_for(lambda: ready(h.children()))
        kids = h.children()
        os.kill(h.pid, signal.SIGINT)
        assert h.reap(30) == 130, h.logs()
    finally:
        t.join(60)
        if h.child.poll() is None:
            h.kill()
    return kids


def _host_log(h: HostRun) -> str:
    with open(os.path.join(h.run_dir, "host.log")) as f:
        return f.read()


def test_an_interrupt_during_the_prelaunch_ends_the_starting_worker_and_saves_nothing(tmp_path):
    """Ctrl-C while the next worker starts (here: never, it says no hello): the servicing ends before its save and
    the VM stops in order, and says so. The stop waited 10 s for a safe point, then ended the current worker, and the
    prelaunch kept waiting up to a minute for the hello; then the stop said it was waiting up to 10 s."""
    h = HostRun(tmp_path / "run")
    t, out = _servicing_until(h, "prelaunch", mana_keepalive=True, next_worker_cmd=SILENT_WORKER)
    kids = _interrupt_host(h, t, lambda kids: len(kids) >= 3)  # device, worker, the next worker
    assert isinstance(out[0], rpc.Refused) and "servicing abandoned before the save" in str(out[0]), out
    log = _host_log(h)
    assert 'phase=save' not in log and "did not shut down cleanly" not in log
    assert 'msg="worker shut down" generation=1 ' in log  # the current worker, in order
    with open(os.path.join(h.run_dir, "host.stderr")) as f:  # it said it waited up to 10 s for a safe point
        assert "a servicing is in progress (phase prelaunch): abandoned before its save, the next worker ended\n" \
            in f.read()
    assert not [k for k in kids if pid_alive(k)] and not proc.processes_mentioning(h.run_dir)


def test_an_interrupt_during_a_save_dismisses_the_worker_that_saved(tmp_path):
    """Ctrl-C during a save: the save completes (a safe point), no new worker restores, and the worker that saved,
    idle since (it answers nothing more), is dismissed at once. The teardown asked it to shut its NICs down and
    waited 10 s for the answer. (A reset save with 300 ms HWC requests: seconds long, so it is caught.)"""
    h = HostRun(tmp_path / "run", "--hwc-latency-ms", "300")
    t, out = _servicing_until(h, "save", mana_keepalive=False)
    kids = _interrupt_host(h, t)
    assert isinstance(out[0], rpc.Refused) and "servicing abandoned: the host is stopping" in str(out[0]), out
    log = _host_log(h)
    assert "did not shut down cleanly" not in log and 'msg="worker shut down" generation=1 exit_status=0' in log
    assert not [k for k in kids if pid_alive(k)] and not proc.processes_mentioning(h.run_dir)


_INTERRUPTED_IMPORT = '''
import importlib, os, signal
from vfkeep import cli

real = importlib.import_module


def import_module(name, *args):
    if name == "vfkeep.demo":
        os.kill(os.getpid(), signal.SIGINT)  # arrives while the command's module is imported
    return real(name, *args)


importlib.import_module = import_module
cli.main(["demo", "--help"], prog_name="vfkeep")
'''


def test_an_interrupt_while_a_long_command_imports_its_module_is_taken_after_the_import(tmp_path):
    """A script's `vfkeep demo &` passes SIGINT ignored, and the demo took it only once its module (0.5-1 s of
    imports) was in: one sent meanwhile was lost. Now it is taken from before the import, held until the import is
    done (raised inside it, one came out as a RuntimeError of a dataclass), then ends the command."""
    r = subprocess.run([sys.executable, "-c", _INTERRUPTED_IMPORT], capture_output=True, text=True, timeout=60,
                       env=CLEAN_ENV, stdin=subprocess.DEVNULL,
                       preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    assert r.returncode == 130 and last_line(r.stderr) == "vfkeep: demo: interrupted (SIGINT)", (r.stdout, r.stderr)
    assert "Usage" not in r.stdout


def test_a_stop_during_boot_does_not_wait_for_a_device_still_starting(tmp_path, monkeypatch):
    """Ctrl-C while the boot waits for its devices' first answer (their imports: seconds with 5 devices on 2 loaded
    CPUs) waited for every device to answer, up to 4.9 s after the signal, and for one that never does, the boot's
    minute. The wait now ends at the stop (here: a device that never answers)."""
    from vfkeep.host import devices
    from vfkeep.host.vmm import Host, HostConfig

    real = proc.vfkeep_argv
    silent = [sys.executable, "-c", "import time; time.sleep(300)"]
    monkeypatch.setattr(devices.proc, "vfkeep_argv", lambda *a: silent if a[0] == "device" else real(*a))
    host = Host(HostConfig(run_dir=str(tmp_path), nics=1))
    failed: list = []

    def boot():
        try:
            host.start()
        except Exception as e:  # noqa: BLE001 - what the boot raised is the test's result
            failed.append(e)

    t = threading.Thread(target=boot)
    t.start()
    wait_for(lambda: host.devices)
    device = host.devices[0].child
    try:
        host.stop()
        t.join(30)
        assert not t.is_alive() and device.poll() is not None
        assert len(failed) == 1 and "start-up abandoned, the host is stopping" in str(failed[0]), failed
    finally:
        proc.end(device)
        t.join(60)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_host_client_command_is_interrupted_as_the_long_ones_are(tmp_path, sig):
    """`vfkeep events &` (SIGINT inherited ignored) streamed on through `kill -INT`, and SIGTERM killed it without
    a line: only demo, chaos, smoke, run and service took the signals. Here the host takes the connection and never
    answers, so the command is certainly past its imports and waiting when the signal comes."""
    import socket

    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(tmp_path / "host.sock"))
    listener.listen(1)
    child = start("events", "--run-dir", str(tmp_path), preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        listener.settimeout(60)
        conn, _ = listener.accept()
        _, err = interrupt(child, sig)
        conn.close()
    finally:
        listener.close()
    assert child.returncode == 128 + sig, err
    assert last_line(err) == f"vfkeep: events: interrupted ({signal.Signals(sig).name})", err
