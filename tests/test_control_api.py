"""The documented host control API (docs/control-api.md), driven from a plain socket client: greeting, a command,
an error, and the events of one servicing in order; `vfkeep events` prints them."""
from __future__ import annotations

import json
import socket
import subprocess
import threading
import time

import pytest

from servicing_helpers import HostRun
from vfkeep import proc


class Line:
    """A plain JSON-lines client, as a script in any language would write it."""

    def __init__(self, path: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(60)
        self.sock.connect(path)
        self.f = self.sock.makefile("rwb")

    def read(self) -> dict:
        line = self.f.readline()
        assert line.endswith(b"\n"), line
        return json.loads(line)

    def send(self, obj: dict) -> None:
        self.f.write(json.dumps(obj).encode() + b"\n")
        self.f.flush()

    def close(self) -> None:
        self.f.close()
        self.sock.close()


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    h = HostRun(tmp_path_factory.mktemp("api") / "run")
    yield h
    h.stop()


def test_greeting_command_and_error(host):
    c = Line(host.path)
    try:
        g = c.read()["greeting"]
        assert (g["api"], g["api_version"], g["host_pid"]) == ("vfkeep.host", 1, host.pid)
        assert {"service", "inspect", "status", "events", "stop"} <= set(g["commands"]) and "events" in g["capabilities"]
        c.send({"id": "a", "cmd": "status"})
        r = c.read()
        assert (r["id"], r["ok"]) == ("a", True) and r["result"]["servicing"] is None
        c.send({"id": 2, "cmd": "service", "args": {"tamper": "shred"}})
        r = c.read()
        assert (r["id"], r["ok"], r["error"]["type"]) == (2, False, "Refused") and "unknown tamper" in r["error"]["message"]
        c.send({"id": 3, "cmd": "reboot"})
        assert c.read()["error"]["type"] == "UnknownCommand"
    finally:
        c.close()


def test_events_of_one_servicing_in_order(host):
    sub = Line(host.path)
    try:
        sub.read()  # greeting
        sub.send({"id": 1, "cmd": "events"})
        r = sub.read()
        assert r["ok"] and "servicing_completed" in r["result"]["subscribed"]
        cli_out: list[str] = []
        printer = subprocess.Popen(proc.vfkeep_argv("events", "--run-dir", host.run_dir, "--json", "--count", "7"),
                                   stdout=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 30
            while host.status()["event_subscribers"] < 2:  # this test's and the printer's
                assert time.monotonic() < deadline and printer.poll() is None
                time.sleep(0.05)
            result = {}
            t = threading.Thread(target=lambda: result.update(host.service(mana_keepalive=True)))
            t.start()
            events = []
            while not events or events[-1]["event"] != "servicing_completed":
                events.append(sub.read())
            t.join()
            cli_out = printer.communicate(timeout=60)[0].splitlines()
        finally:
            proc.end(printer)
        kinds = [(e["event"], e["data"].get("phase")) for e in events]
        assert kinds == [("servicing_started", None), ("phase_done", "prelaunch"), ("phase_done", "save"),
                         ("phase_done", "handoff"), ("phase_done", "restore"), ("phase_done", "measure"),
                         ("servicing_completed", None)], kinds
        seqs = [e["seq"] for e in events]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
        n = events[0]["data"]["servicing"]
        assert all(e["data"]["servicing"] == n for e in events)
        done = events[-1]["data"]
        assert done["status"] == result["status"] == "ok" and done["nics"][0]["restore_path"] == "keepalive"
        assert [json.loads(line)["event"] for line in cli_out] == [k for k, _ in kinds]
        # One measurement reported twice: the save's event said 7.778 ms, its result 6.545 (the restore's 1.6 ms off)
        by_phase = {e["data"]["phase"]: e["data"]["ms"] for e in events if e["event"] == "phase_done"}
        phases = ("save", "handoff", "restore")
        assert [by_phase[p] for p in phases] == [result["phases_ms"][p] for p in phases], (by_phase, result)
        assert done["phases_ms"] == result["phases_ms"]
    finally:
        sub.close()


def test_nic_state_event_when_a_nic_changes(host):
    sub = Line(host.path)
    try:
        sub.read()
        sub.send({"cmd": "events"})
        assert sub.read()["ok"]
        host.service(mana_keepalive=True, tamper="corrupt")
        events = []
        while not events or events[-1]["event"] != "nic_state":
            events.append(sub.read())
        change = events[-1]["data"]
        assert events[-2]["event"] == "servicing_completed" and events[-2]["data"]["status"] == "degraded"
        assert change["restore_path"] == "fallback" and change["cause"] == "servicing" and change["error"]
    finally:
        sub.close()


def test_a_failed_save_has_a_replacement_phase_not_a_handoff(host):
    """With no state handed over the result's `phases_ms.handoff` is null and `replacement` is the time spent
    ending the failed worker and starting one without state; the events (and `status`) called it `handoff`."""
    sub = Line(host.path)
    try:
        sub.read()
        sub.send({"cmd": "events"})
        assert sub.read()["ok"]
        result = host.service(mana_keepalive=True, test_config="SERVICING_SAVE_CRASH")  # (the worker dies)
        events = []
        while not events or events[-1]["event"] != "servicing_completed":
            events.append(sub.read())
    finally:
        sub.close()
    phases = [e["data"]["phase"] for e in events if e["event"] == "phase_done"]
    assert result["status"] == "failed" and result["phases_ms"]["handoff"] is None, result
    assert phases == ["prelaunch", "save", "replacement", "restore", "measure"], phases
    by_phase = {e["data"]["phase"]: e["data"]["ms"] for e in events if e["event"] == "phase_done"}
    phases = ("save", "replacement", "restore")
    assert [by_phase[p] for p in phases] == [result["phases_ms"][p] for p in phases], (by_phase, result)


def test_a_refused_save_has_the_save_only(host):
    """SERVICING_SAVE_FAIL: the worker refuses its save and keeps running; the save is the servicing's whole time."""
    sub = Line(host.path)
    try:
        sub.read()
        sub.send({"cmd": "events"})
        assert sub.read()["ok"]
        result = host.service(mana_keepalive=True, test_config="SERVICING_SAVE_FAIL")
        events = []
        while not events or events[-1]["event"] != "servicing_completed":
            events.append(sub.read())
    finally:
        sub.close()
    by_phase = {e["data"]["phase"]: e["data"]["ms"] for e in events if e["event"] == "phase_done"}
    assert list(by_phase) == ["prelaunch", "save", "measure"], by_phase
    assert by_phase["save"] == result["phases_ms"]["save"] == result["phases_ms"]["total"], (by_phase, result)


def test_events_count_not_reached_within_timeout_is_a_failure(host):
    """`vfkeep events --count N --timeout T` on a quiet host exited 0 with nothing printed, as if it had the N
    events a script waited for; without --count a quiet timeout stays a plain end (exit 0)."""
    asked = subprocess.run(proc.vfkeep_argv("events", "--run-dir", host.run_dir, "--count", "1", "--timeout", "0.5"),
                           capture_output=True, text=True, timeout=60)
    assert asked.returncode == 1 and asked.stdout == "", asked
    assert asked.stderr == (f"vfkeep: events: no event for 0.5 s, 0 of the 1 asked for with --count (host log: "
                            f"{host.run_dir}/host.log)\n"), asked
    quiet = subprocess.run(proc.vfkeep_argv("events", "--run-dir", host.run_dir, "--timeout", "0.5"),
                           capture_output=True, text=True, timeout=60)
    assert (quiet.returncode, quiet.stdout, quiet.stderr) == (0, "", ""), quiet
