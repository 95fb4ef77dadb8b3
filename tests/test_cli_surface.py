"""One vocabulary for console and CLI, output that fits, --json errors, --version, --log-level, idempotent stop,
temporary files and worker logs (issue 17)."""
from __future__ import annotations

import glob
import io
import json
import os
import signal
import subprocess
import sys

import click
import pytest
from rich.console import Console

from helpers import CLEAN_ENV
from servicing_helpers import HostRun
from vfkeep import cli, proc
from vfkeep.host import render
from vfkeep.host.console import HostConsole
from vfkeep.host.vocabulary import COMMAND_OBJECTS, HOST_COMMANDS


def vfkeep(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """A CLI command with its output piped, as a script would run it."""
    return subprocess.run(proc.vfkeep_argv(*args), capture_output=True, text=True, timeout=timeout,
                          env={**CLEAN_ENV, **(env or {})}, stdin=subprocess.DEVNULL)


class _Stub:
    run_dir = "/nonexistent"

    def servicing_phase(self):
        return None


# -- one definition ------------------------------------------------------------------------------------------
def test_console_and_cli_commands_are_one_definition():
    group_ctx = click.Context(cli.main)
    console = HostConsole(_Stub())
    assert set(HOST_COMMANDS) <= set(console.commands)
    assert set(cli.main.list_commands(group_ctx)) >= set(HOST_COMMANDS)
    for name in HOST_COMMANDS:
        command = cli.main.get_command(group_ctx, name)
        assert command is COMMAND_OBJECTS[name], name  # the console runs this very object
        subs = command.commands.values() if isinstance(command, click.Group) else [command]
        for sub in subs:  # every host command takes --json and --run-dir (after the subcommand too)
            opts = {o for p in sub.params for o in p.opts}
            assert {"--json", "--run-dir"} <= opts, (name, sub.name, opts)


def test_console_help_lines_are_whole_sentences():
    """`help` in the console (and `vfkeep --help`) shows each command's first sentence: never cut at an "e.g."."""
    for name in HOST_COMMANDS:
        short = COMMAND_OBJECTS[name].get_short_help_str(200)
        assert not short.endswith(("e.g.", "i.e.")), (name, short)


def test_console_and_cli_report_the_same_usage_error(tmp_path):
    buf = io.StringIO()
    HostConsole(_Stub(), Console(file=buf, width=300)).onecmd("service-vtl2 --timeout abc")
    r = vfkeep("service", "--run-dir", str(tmp_path), "--timeout", "abc")
    message = "Invalid value for '--timeout': 'abc' is not a valid float range."
    assert r.returncode == 2 and message in r.stderr and message in buf.getvalue()


def test_options_before_or_after_the_subcommand(tmp_path):
    run_dir = str(tmp_path / "nohost")
    before = vfkeep("traffic", "--run-dir", run_dir, "stats")
    after = vfkeep("traffic", "stats", "--run-dir", run_dir)
    assert before.returncode == after.returncode == 1
    assert f"no host answering in {run_dir}" in before.stderr and before.stderr == after.stderr


FAILURES = [  # (argv, exit status, command named in the failure line); DIR: a run dir with no host
    (("service", "--run-dir", "DIR"), 1, "service"), (("inspect", "--run-dir", "DIR"), 1, "inspect"),
    (("status", "--run-dir", "DIR"), 1, "status"), (("probe", "--run-dir", "DIR"), 1, "probe"),
    (("traffic", "stats", "--run-dir", "DIR"), 1, "traffic stats"),
    (("traffic", "--run-dir", "DIR", "start"), 1, "traffic start"),
    (("disk", "stats", "--verify", "--run-dir", "DIR"), 1, "disk stats"),
    (("exec", "--run-dir", "DIR", "0", "true"), 1, "exec"), (("events", "--run-dir", "DIR"), 1, "events"),
    (("service", "--run-dir", "DIR", "--timeout", "-1"), 2, "service"),
    (("service", "--run-dir", "DIR", "--nics", "x"), 2, "service"),
    (("disk", "stats", "--disk", "-1"), 2, "disk stats"), (("traffic", "start", "--rate", "0"), 2, "traffic start"),
    (("inspect", "--run-dir", "FILE"), 2, "inspect"), (("run", "--run-dir", "FILE/x", "--no-console"), 2, "run"),
    (("run", "--nics", "-1", "--run-dir", "DIR"), 2, "run"), (("run", "--disk-size", "lots"), 2, "run"),
    (("run", "--bogus"), 2, "run"), (("state", "decode", "DIR/none.bin"), 2, "state decode"),
    (("state", "decode", "FILE"), 2, "state decode"), (("chaos", "--servicings", "0"), 2, "chaos"),
    (("nosuch",), 2, None), (("--bogus",), 2, None),
]


@pytest.mark.parametrize("argv, code, command", FAILURES, ids=[" ".join(a) for a, _, _ in FAILURES])
def test_every_failure_is_one_line_naming_the_command(tmp_path, argv, code, command):
    """Bad run dir, no host, bad option values: one line `vfkeep: COMMAND: cause` on stderr (the log to read
    where there is one), nothing else, and the exit status; never click's `Error:`/`Usage:` form."""
    (tmp_path / "file").write_bytes(b"not a directory")
    args = [a.replace("DIR", str(tmp_path / "nohost")).replace("FILE", str(tmp_path / "file")) for a in argv]
    r = vfkeep(*args, timeout=60)
    assert r.returncode == code and r.stdout == "", (r.returncode, r.stdout, r.stderr)
    (line,) = r.stderr.splitlines()
    assert line.startswith(f"vfkeep: {command}: " if command else "vfkeep: "), line
    if code == 1:
        assert "is a host running?" in line and "vfkeep run --run-dir" in line, line


def test_refusals_and_failed_results_end_in_the_same_line(tmp_path):
    """A host's refusal is named once (not "disk: disk: ..."), with the host log."""
    h = HostRun(tmp_path / "run", nics=0)
    try:
        r = vfkeep("disk", "start", "--run-dir", h.run_dir)
        (line,) = r.stderr.splitlines()
        assert r.returncode == 1 and line.startswith("vfkeep: disk start: this host has no NVMe disks"), line
        assert line.endswith(f"(host log: {h.run_dir}/host.log)"), line
        for cmd in (("traffic", "stats"), ("traffic", "stop")):  # (not "start traffic first": it cannot, no NIC)
            r = vfkeep(*cmd, "--run-dir", h.run_dir)
            (line,) = r.stderr.splitlines()
            assert r.returncode == 1 and r.stdout == "" and line == (f"vfkeep: {' '.join(cmd)}: this host has no "
                                                                     "NICs: start it with `vfkeep run --nics N` (host "
                                                                     f"log: {h.run_dir}/host.log)"), r
        r = vfkeep("run", "--run-dir", h.run_dir, "--nics", "0", "--detach")
        (line,) = r.stderr.splitlines()
        assert r.returncode == 1 and line.startswith(f"vfkeep: run: a host is already running in {h.run_dir}"), line
    finally:
        h.stop()


def test_version_and_json_errors(tmp_path):
    for flag in ("--version", "-V"):
        r = vfkeep(flag)
        assert r.returncode == 0 and r.stdout.startswith("vfkeep, version ")
    r = vfkeep("inspect", "--run-dir", str(tmp_path), "--json")
    err = json.loads(r.stdout)
    assert r.returncode == 1 and err["ok"] is False and err["error"]["type"] == "Unavailable"
    assert "vfkeep run --run-dir" in err["error"]["message"]  # says how to get a host there
    r = vfkeep("service", "--run-dir", str(tmp_path), "--nics", "x", "--json")
    assert r.returncode == 2 and json.loads(r.stdout)["error"]["type"] == "Usage"
    bad = tmp_path / "empty.bin"
    bad.write_bytes(b"")
    r = vfkeep("state", "decode", str(bad), "--json")
    assert r.returncode == 2 and json.loads(r.stdout)["error"]["type"] == "UndecodableState"


# -- output -----------------------------------------------------------------------------------------------------
LONG_REASON = "saved state rejected: failed to decode servicing state (138 bytes): " + "x" * 150


def _result() -> dict:
    nic = {"pci_id": "d186:00:00.0", "restore_path": "fallback", "requested_path": "keepalive",
           "device_reset": True, "hwc_established": True, "device_resets": 1, "hwc_requests": 40, "smc_messages": 9,
           "error": "failed to decode", "reason": LONG_REASON}
    return {"ok": True, "status": "degraded", "mana_keepalive": True, "nvme_keepalive": False, "nics": [nic],
            "unclaimed_pool_allocations": [], "phases_ms": {"save": 1.0, "handoff": 2.0, "restore": 3.0, "total": 6.0},
            "blackout_ms": None, "frames_lost": None, "timing": {"preset": "natural", "hwc_latency_ms": 0.0,
                                                                  "flr_ms": 0.0}, "error": None}


@pytest.mark.parametrize("terminal", [False, True])
def test_servicing_output_is_never_cut(terminal):
    """80 columns or piped: every field whole (a narrow terminal gets lines, not a squeezed table)."""
    buf = io.StringIO()
    render.print_servicing(_result(), Console(file=buf, width=80, force_terminal=terminal, soft_wrap=True))
    out = buf.getvalue()
    assert "…" not in out and LONG_REASON in out.replace("\n", "") and "servicing degraded" in out


def test_fallback_line_says_each_thing_once():
    """The reason of a fallback already quotes the error: a line shows it once, not as reason= and error=."""
    r = _result()
    r["nics"][0]["error"] = "failed to decode servicing state (138 bytes)"
    r["nics"][0]["reason"] = "saved state rejected: failed to decode servicing state (138 bytes)"
    r["nvme"] = [{"pci_id": "a100:00:00.0", "restore_path": "fallback", "requested_path": "keepalive",
                  "device_reset": True, "controller_enabled": True, "error": "InvalidSavedState: bad qid",
                  "reason": "saved state rejected: InvalidSavedState: bad qid"}]
    lines = render.servicing_lines(r)
    nic = next(ln for ln in lines if ln.startswith("nic "))
    nvme = next(ln for ln in lines if ln.startswith("nvme "))
    assert nic.count("failed to decode servicing state") == 1 and "error=" not in nic, nic
    assert nvme.count("bad qid") == 1 and "error=" not in nvme, nvme
    r["nics"][0]["reason"] = "keepalive not requested"  # an error the reason does not carry is still shown
    assert "error=failed to decode servicing state (138 bytes)" in render.servicing_lines(r)[1]


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    h = HostRun(tmp_path_factory.mktemp("cli") / "run", "--keep-worker-logs", "2")
    yield h
    h.stop()


def test_piped_output_is_plain_and_whole(host):
    r = vfkeep("service", "--run-dir", host.run_dir, "--mana-keepalive", "--tamper", "truncate")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("servicing degraded: keepalive flags: mana; save ")
    assert any(ln.startswith("nic d186:00:00.0: path=fallback requested=keepalive ") and
               "reason=saved state rejected: failed to decode servicing state" in ln for ln in lines), lines
    r = vfkeep("inspect", "--run-dir", host.run_dir, "worker")
    assert r.returncode == 0 and "…" not in r.stdout
    assert all(": " in ln and ln.split(": ")[0].startswith("worker/") for ln in r.stdout.splitlines())
    assert "worker/nics/0/restore_path: fallback" in r.stdout.splitlines()
    assert vfkeep("traffic", "start", "--run-dir", host.run_dir, "--rate", "500").returncode == 0
    r = vfkeep("traffic", "stats", "--run-dir", host.run_dir)
    assert r.returncode == 0 and r.stdout.startswith("traffic since the last start: nic=0 sent=")
    assert "received=" in r.stdout and "blackout_ms=" in r.stdout and "…" not in r.stdout
    assert " frames_lost=0 " in r.stdout  # frames still in flight are waited for, not counted lost
    assert vfkeep("traffic", "stop", "--run-dir", host.run_dir).returncode == 0


def test_worker_logs_kept_for_the_last_k_servicings(host):
    for _ in range(3):
        assert host.service(mana_keepalive=True)["status"] == "ok"
    gen = host.inspect("worker/generation")
    kept = sorted(n for n in os.listdir(host.run_dir) if n.startswith("worker-"))
    assert {n.split(".")[0] for n in kept} == {f"worker-{gen - 1}", f"worker-{gen}"}, kept
    empty = [n for n in os.listdir(host.run_dir) if n.endswith(".stderr") and n.startswith("worker-")
             and os.path.getsize(os.path.join(host.run_dir, n)) == 0 and n != f"worker-{gen}.stderr"]
    assert empty == []  # an ended worker's empty stderr is removed


def test_stop_is_idempotent_and_says_what_it_stopped(tmp_path):
    h = HostRun(tmp_path / "run", nics=0)
    first = vfkeep("stop", "--run-dir", h.run_dir)
    assert first.returncode == 0 and f"stopped host pid {h.pid} in {h.run_dir}" in first.stdout
    assert h.reap(30) == 0
    second = vfkeep("stop", "--run-dir", h.run_dir, "--json")
    assert second.returncode == 0 and json.loads(second.stdout)["stopped"] is None


def test_log_level_reaches_every_process(tmp_path):
    h = HostRun(tmp_path / "run", nics=0, env={"VFKEEP_LOG_LEVEL": "warning"})
    try:
        assert h.status()["worker"]["alive"]
    finally:
        h.stop()
    for name in ("host.log", "worker-1.log"):
        with open(os.path.join(h.run_dir, name)) as f:
            text = f.read()
        assert "level=info" not in text, name
    r = vfkeep("--log-level", "debug", "--version")
    assert r.returncode == 0


# -- temporary files --------------------------------------------------------------------------------------------
def test_smoke_leaves_nothing_in_the_temp_dir(tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    r = vfkeep("smoke", env={"TMPDIR": str(tmp)})
    assert r.returncode == 0, r.stderr
    assert "removed the run directory" in r.stdout and os.listdir(tmp) == []


def test_the_suite_fails_when_a_test_leaves_something_in_the_temp_dir(tmp_path):
    """The suite's own check (conftest): a test that leaves a temp file fails the run, naming the file."""
    import shutil
    shutil.copy(os.path.join(os.path.dirname(__file__), "conftest.py"), tmp_path)
    (tmp_path / "test_leaky.py").write_text("import tempfile\n\ndef test_leaky():\n"
                                            "    tempfile.mkstemp(prefix='leaked-by-test-')\n")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                       capture_output=True, text=True, timeout=60, env=CLEAN_ENV, cwd=tmp_path)
    assert r.returncode == 1 and "1 passed" in r.stdout, r.stdout + r.stderr
    assert "left 1 entries in its temp dir" in r.stdout and "leaked-by-test-" in r.stdout, r.stdout


# `vfkeep demo` / `vfkeep chaos` with what they drive stubbed (no host): how each ends when something fails.
_ENDINGS = '''
import os, sys
from vfkeep import chaos, demo
from vfkeep.cli import main

case = sys.argv[1]


class Demo:
    def __init__(self, *args, **kwargs):
        if case == "demo-boot":
            raise RuntimeError("host exited with 1 during boot:\\n(the host's last lines)")
        self.host, self.processes = self, {}

    def step(self, text):
        pass

    def stop(self):
        pass

    def run(self):
        if case == "demo-write":
            return {"machine": {"cpus": 2}, "runs": []}
        return {"machine": {"cpus": 2}, "runs": [{"mode": "keepalive", "expectations_failed": ["the device saw an FLR"]},
                                                 {"mode": "reset", "expectations_failed": ["no ESTABLISH_HWC"]}]}


class Campaign(chaos.Campaign):
    def boot(self):
        os.makedirs(self.run_dir)
        raise RuntimeError("host not ready within 60 s:\\n(the host's last lines)")

    def close(self):
        pass


demo.Demo, demo.plot, demo.table, demo.verdict = Demo, lambda *a: None, lambda r: "", lambda *a: (True, ["held"])
if case == "demo-write":
    def write_report(*args):
        raise OSError(28, "No space left on device")
    demo.write_report = write_report
chaos.Campaign, chaos.print_summary = Campaign, lambda *a: None
if case == "chaos-violation":
    chaos.run_campaign = lambda *a: {"servicings": 16, "run_dir_kept": "/tmp/vfk-chaos-run-1", "violations": [
        {"servicing": 7, "invariant": "frames", "fault": "kill_new", "path": "reset", "detail": "3 lost"}]}
main([case.split("-")[0], "--out", os.path.join(sys.argv[2], "report")] if case.startswith("demo") else
     ["chaos", "--servicings", "2"], prog_name="vfkeep")
'''


@pytest.mark.parametrize("case, line", [
    ("demo-boot", "vfkeep: demo: host exited with 1 during boot (see TMP/vfkeep-demo-*/host.log)"),
    ("demo-write", "vfkeep: demo: cannot write the report to TMP/report: No space left on device"),
    ("demo-unexpected", "vfkeep: demo: unexpected: keepalive: the device saw an FLR (and 1 more above) "
                        "(see TMP/vfkeep-demo-*/host.log)"),
    ("chaos-boot", "vfkeep: chaos: stopped after 0 servicings: host not ready within 60 s "
                   "(see TMP/vfk-chaos-failed-*/host.log)"),
    ("chaos-violation", "vfkeep: chaos: 1 violation(s) in 16 servicings, the first in servicing 7 (frames) "
                        "(see /tmp/vfk-chaos-run-1/host.log)")])
def test_demo_and_chaos_end_a_failure_in_the_one_line_form(tmp_path, case, line):
    """Exit 1 with `vfkeep: COMMAND: cause (see LOG)` as the only stderr line, as every other command (the demo
    said "logs kept in DIR" on stdout, chaos printed its run dir on a line of its own or a traceback)."""
    import fnmatch
    r = subprocess.run([sys.executable, "-c", _ENDINGS, case, str(tmp_path)], capture_output=True, text=True,
                       timeout=60, env={**CLEAN_ENV, "TMPDIR": str(tmp_path)}, stdin=subprocess.DEVNULL)
    assert r.returncode == 1, (r.stdout, r.stderr)
    (got,) = r.stderr.splitlines()
    assert fnmatch.fnmatchcase(got, line.replace("TMP", str(tmp_path))), got
    if case == "demo-write":  # every process had ended: nothing of it is left either
        assert not glob.glob(str(tmp_path / "vfkeep-demo-*"))


@pytest.mark.parametrize("option, value, cause", [
    ("--out", "/proc/vfkeep-report", "cannot write /proc/vfkeep-report: /proc refuses new entries"),
    ("--out", "FILE/report", "cannot create FILE/report: FILE is not a directory"),
    ("--out", "FILE", "Directory 'FILE' is a file"),
    ("--json", "/proc/vfkeep.json", "cannot write /proc/vfkeep.json: /proc refuses new entries")])
def test_demo_refuses_a_report_path_it_cannot_write_before_starting_anything(tmp_path, option, value, cause):
    """`--out /proc/x` ran the whole demo, then failed and left its temporary run dir (root may write anywhere by
    the permission bits, /proc takes no new entries): refused up front, exit 2, one line, nothing started."""
    (tmp_path / "file").write_text("")
    value = value.replace("FILE", str(tmp_path / "file"))
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    r = subprocess.run(proc.vfkeep_argv("demo", option, value), capture_output=True, text=True, timeout=60,
                       env={**CLEAN_ENV, "TMPDIR": str(tmp)}, stdin=subprocess.DEVNULL, cwd=tmp_path)
    assert r.returncode == 2, (r.stdout, r.stderr)
    (line,) = r.stderr.splitlines()
    assert line.startswith(f"vfkeep: demo: Invalid value for '{option}': "
                           + cause.replace("FILE", str(tmp_path / "file"))), line
    assert os.listdir(tmp) == [] and sorted(os.listdir(tmp_path)) == ["file", "tmp"]
