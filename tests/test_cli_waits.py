"""A host command never hangs silently and never lies about why it waited: one request per traffic/disk command (the
NIC/disk range asked only after a refusal), a host that takes the connection and never answers is named as such
(not "is a host running?", not a silent exit 0), and a long `traffic stats` shows that it waits, on a terminal only.
Against a fake host (an rpc server in this process), so the waits are certain whatever the machine's load."""
from __future__ import annotations

import contextlib
import json
import os
import pty
import select
import signal
import socket
import subprocess
import threading
import time
import types

import pytest

from helpers import CLEAN_ENV
from servicing_helpers import HostRun, pid_alive
from vfkeep import proc, rpc
from vfkeep.host import agents, control
from vfkeep.host.traffic import GuestTraffic, TrafficError
from vfkeep.host.vocabulary import CommandError, RemoteTarget

NO_TRAFFIC = {"nics": [], "last_servicing": None}


@contextlib.contextmanager
def fake_host(run_dir, **handlers):
    """A host control socket in `run_dir` answering `handlers`; yields the list of commands it was sent."""
    seen: list[str] = []

    def recorded(name, fn):
        def handler(**args):
            seen.append(name)
            return fn(**args)
        return handler

    server = control.serve(str(run_dir), {n: recorded(n, fn) for n, fn in handlers.items()}, refused=(TrafficError,))
    server.start()
    try:
        yield seen
    finally:
        server.close()


def vfkeep(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(proc.vfkeep_argv(*args), capture_output=True, text=True, timeout=timeout, env=CLEAN_ENV,
                          stdin=subprocess.DEVNULL)


def status(**_):
    return {"nics": 1, "nvme_devices": [{"pci_id": "a100:00:00.0"}]}


DISK = {"disk": 0, "pid": 1, "rate": 0, "qd": 8, "read_pct": 50, "errors": 0, "verify_errors": 0, "duplicates": 0}


@pytest.mark.parametrize("argv", [("traffic", "stats", "--nic", "0"), ("traffic", "stop", "--nic", "0"),
                                  ("traffic", "start", "--nic", "0"), ("disk", "stop", "--disk", "0"),
                                  ("disk", "start", "--disk", "0"), ("disk", "stats", "--disk", "0")])
def test_a_traffic_or_disk_command_is_one_request(tmp_path, argv):
    """`--nic N`/`--disk N` cost a `status` request before every command (and, before it, outside the command's
    JSON errors)."""
    with fake_host(tmp_path, status=status, traffic=lambda action, **a: NO_TRAFFIC,
                   disk=lambda action, **a: {"disks": [DISK] if action == "start" else [], "last_servicing": None}
                   ) as seen:
        r = vfkeep(*argv, "--run-dir", str(tmp_path), "--json")
    assert r.returncode == 0, r
    assert json.loads(r.stdout)["nics" if argv[0] == "traffic" else "disks"] == ([DISK] if argv[:2] == ("disk", "start")
                                                                                 else []), r
    assert seen == [argv[0]]


def test_a_disk_the_host_refuses_and_does_not_have_is_bad_usage(tmp_path):
    """The disk half of the NIC test below: the host is asked how many disks it has only once it refused one."""
    def refuse(action, disk=None, **_):
        raise TrafficError(f"disk {disk!r} out of range [0, 1)" if disk else f"no disk agent on disk {disk}")

    with fake_host(tmp_path, status=status, disk=refuse) as seen:
        r = vfkeep("disk", "stats", "--disk", "3", "--run-dir", str(tmp_path))
        assert r.returncode == 2 and seen == ["disk", "status"], r
        assert r.stderr == ("vfkeep: disk stats: Invalid value for --disk: disk 3 out of range: the host has 1 disk(s) "
                            "(`vfkeep disk stats --help`)\n"), r
        r = vfkeep("disk", "stop", "--disk", "0", "--run-dir", str(tmp_path), "--json")  # in range: the refusal
        assert r.returncode == 1 and seen[2:] == ["disk", "status"], r
        assert json.loads(r.stdout)["error"]["message"].startswith("no disk agent on disk 0 (host log"), r


def test_a_nic_the_host_refuses_and_does_not_have_is_bad_usage_in_json_too(tmp_path):
    def refuse(action, nic=None, **_):
        raise TrafficError(f"nic {nic!r} out of range [0, 1)" if nic else f"no traffic agent on nic {nic}")

    with fake_host(tmp_path, status=status, traffic=refuse) as seen:
        r = vfkeep("traffic", "stats", "--nic", "3", "--run-dir", str(tmp_path), "--json")
        assert r.returncode == 2 and r.stderr == "" and seen == ["traffic", "status"], r
        assert json.loads(r.stdout) == {"ok": False, "error": {"type": "Usage", "message": "Invalid value for --nic: "
                                                               "NIC 3 out of range: the host has 1 NIC(s)"}}
        r = vfkeep("traffic", "stats", "--nic", "0", "--run-dir", str(tmp_path))  # in range: the host's refusal
        assert r.returncode == 1 and r.stderr.startswith("vfkeep: traffic stats: no traffic agent on nic 0 (host log"), r
    r = vfkeep("traffic", "stats", "--nic", "3", "--run-dir", str(tmp_path / "nohost"), "--json")
    assert r.returncode == 1 and r.stderr == "" and json.loads(r.stdout)["error"]["type"] == "Unavailable", r


@contextlib.contextmanager
def silent_host(run_dir):
    """A socket that takes connections and never answers (a hung host); yields the connections it took."""
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(os.path.join(run_dir, "host.sock"))
    listener.listen(4)
    taken: list[socket.socket] = []
    stop = threading.Event()

    def accept():
        while not stop.is_set():
            if select.select([listener], [], [], 0.1)[0]:
                taken.append(listener.accept()[0])

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        yield taken
    finally:
        stop.set()
        t.join(5)
        for c in taken:
            c.close()
        listener.close()


def test_events_from_a_host_that_never_answers_fails_naming_it(tmp_path):
    """It exited 0 with no line after 5 s (the subscription's timeout was taken for `--timeout`'s quiet end)."""
    with silent_host(str(tmp_path)) as taken:
        r = vfkeep("events", "--run-dir", str(tmp_path))
    assert taken and r.returncode == 1 and r.stdout == "", r
    (line,) = r.stderr.splitlines()
    assert line == (f"vfkeep: events: the host did not answer: events on {tmp_path}/host.sock: no reply within 5.0 s "
                    f"(host log: {tmp_path}/host.log)"), line


def test_a_host_that_does_not_answer_in_time_is_not_called_absent(tmp_path):
    """A timeout said "no host answering in DIR ...; is a host running? (`vfkeep run ...`)" of a host that is."""
    with silent_host(str(tmp_path)):
        with pytest.raises(CommandError) as e:
            RemoteTarget(str(tmp_path)).call("status", wait=0.3)
    assert e.value.kind == "Timeout"
    assert e.value.message == (f"the host did not answer: status on {tmp_path}/host.sock: no reply within 0.3 s "
                               f"(host log: {tmp_path}/host.log)")


def test_an_agent_that_does_not_answer_is_named_with_its_log(tmp_path, monkeypatch):
    """Its timeout said only "stats on DIR/guest-agent-0.sock: no reply within 30.0 s"; and a `--settle-ms` longer
    than the agent timeout was cut short by it."""
    monkeypatch.setattr(agents, "AGENT_TIMEOUT_S", 0.3)
    monkeypatch.setattr("vfkeep.host.traffic.AGENT_TIMEOUT_S", 0.3)
    monkeypatch.setattr(agents.Agent.call, "__defaults__", (0.3,))  # (the default wait, bound at its definition)
    settled = threading.Event()

    def stats(settle_ms=0, **_):
        if settle_ms == 0:
            threading.Event().wait(5)  # never in time
        settled.wait(settle_ms / 1000)  # as an agent whose frames do not all come back
        return {"sent": 0}

    path = str(tmp_path / "guest-agent-0.sock")
    server = rpc.ThreadedServer(path, rpc.Dispatcher(agents.log, {"stats": stats}))
    server.start()
    child = proc.spawn(["sleep", "60"])
    try:
        pool = GuestTraffic(str(tmp_path), None, None, [None])
        pool._agents[0] = agents.Agent(0, child, path, TrafficError, "nic")
        with pytest.raises(TrafficError) as e:
            pool.stats(nic=0, settle_ms=0)
        assert str(e.value) == (f"nic 0: its agent (pid {child.pid}) did not answer 'stats' within 0.3 s: overloaded "
                                f"or stuck (its log: {tmp_path}/guest-agent-0.log)")
        t0 = time.monotonic()
        (st,) = pool.stats(nic=0, settle_ms=600)["nics"]
        assert st["sent"] == 0 and time.monotonic() - t0 >= 0.6
    finally:
        proc.end(child)
        server.close()


def read_until(fd: int, text: bytes, timeout: float) -> bytes:
    """What the terminal `fd` showed until `text` appeared (or the timeout, or its writer closed it)."""
    out, deadline = b"", time.monotonic() + timeout
    while text not in out and (left := deadline - time.monotonic()) > 0:
        if select.select([fd], [], [], left)[0]:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # EIO: every writer closed it
                break
            if not chunk:
                break
            out += chunk
    return out


@pytest.mark.parametrize("json_flag", [False, True])
def test_traffic_stats_shows_that_it_waits_on_a_terminal_only(tmp_path, json_flag):
    """An overloaded agent took 5-16 s to answer `traffic stats`, with nothing shown meanwhile. The fake host
    answers only once the terminal showed the wait (or after 20 s: then nothing was shown)."""
    shown = threading.Event()

    def traffic(action, **_):
        shown.wait(20)
        return NO_TRAFFIC

    if json_flag:
        shown.set()  # nothing to wait for: whatever the terminal shows until the command ended is all it shows
    master, slave = pty.openpty()
    with fake_host(tmp_path, status=status, traffic=traffic):
        child = subprocess.Popen(proc.vfkeep_argv("traffic", "stats", "--run-dir", str(tmp_path),
                                                  *(["--json"] if json_flag else [])),
                                 stdout=subprocess.PIPE, stderr=slave, stdin=subprocess.DEVNULL, text=True,
                                 env={**CLEAN_ENV, "TERM": "xterm", "COLUMNS": "120"})
        os.close(slave)
        try:
            screen = read_until(master, b"waiting for the agents", 60)
            shown.set()
            out, _ = child.communicate(timeout=60)
            screen += read_until(master, b"\x00", 1)  # the rest (the spinner's line cleared)
        finally:
            os.close(master)
            if child.poll() is None:
                proc.end(child)
    assert child.returncode == 0
    if json_flag:
        assert json.loads(out) == NO_TRAFFIC and b"waiting" not in screen, screen
    else:
        assert out.startswith("no traffic agent running") and b"traffic stats: waiting for the agents' counts (at " \
            b"most 120 s)" in screen, screen


def test_a_stopped_host_is_named_at_once(tmp_path):
    """A host stopped by SIGSTOP (Ctrl-Z in its console's terminal) took the request and answered nothing: `status`
    waited 30 s and then called it absent, `service` waited for ever."""
    child = proc.spawn(["sleep", "120"])
    try:
        (tmp_path / "host.pid").write_text(f"{child.pid}\n")
        os.kill(child.pid, signal.SIGSTOP)
        with silent_host(str(tmp_path)):
            r = vfkeep("status", "--run-dir", str(tmp_path), timeout=20)
            s = vfkeep("service", "--run-dir", str(tmp_path), "--json", timeout=20)
            e = vfkeep("events", "--run-dir", str(tmp_path), timeout=20)
    finally:
        os.kill(child.pid, signal.SIGCONT)
        proc.end(child)
    stopped = (f"host pid {child.pid} is stopped (SIGSTOP, or Ctrl-Z in its terminal) and answers nothing until "
               f"continued: `kill -CONT {child.pid}` (host log: {tmp_path}/host.log)")
    assert r.returncode == 1 and r.stderr == f"vfkeep: status: {stopped}\n", r
    assert s.returncode == 1 and json.loads(s.stdout) == {"ok": False, "error": {"type": "Stopped",
                                                                                  "message": stopped}}, s
    assert e.returncode == 1 and e.stderr == f"vfkeep: events: {stopped}\n", e  # (was 5 s, then "did not answer")


def test_stop_ends_a_stopped_host_in_order(tmp_path):
    """`vfkeep stop` of a SIGSTOPped host waited 30 s for its answer, then sent a SIGTERM it could not act on and
    gave up after 60 more, the host left stopped."""
    h = HostRun(tmp_path / "run")
    kids = h.children()
    try:
        os.kill(h.pid, signal.SIGSTOP)
        r = vfkeep("stop", "--run-dir", h.run_dir, timeout=50)
        assert r.returncode == 0 and r.stdout == (f"stopped host pid {h.pid} in {h.run_dir}: worker 1 (pid "
                                                  f"{kids[-1]}) shut 1 NIC down; every device and agent ended\n"), r
        assert h.reap(30) == 143 and not [p for p in kids if pid_alive(p)]
        assert "host stopped" in h.logs()  # in order: its own teardown ran
    finally:
        if h.child.poll() is None:
            os.kill(h.pid, signal.SIGCONT)
            h.kill()


def test_a_host_that_goes_away_mid_request_is_not_called_absent(tmp_path):
    """A host that died during `service` was "no host answering in DIR: ... closed the connection before replying to
    'service'; is a host running? (`vfkeep run ...`)", without the log that says why it died."""
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(tmp_path / "host.sock"))
    listener.listen(1)

    def take_one_request_and_die():
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(60)
            while b"\n" not in conn.recv(4096):
                pass

    t = threading.Thread(target=take_one_request_and_die, daemon=True)
    t.start()
    try:
        r = vfkeep("service", "--run-dir", str(tmp_path))
    finally:
        t.join(60)
        listener.close()
    assert r.returncode == 1 and r.stderr == (
        f"vfkeep: service: the host in {tmp_path} went away before answering: {tmp_path}/host.sock closed the "
        f"connection before replying to 'service' (it stopped or died; host log: {tmp_path}/host.log)\n"), r


def test_a_stopped_agent_is_named_at_once(tmp_path, monkeypatch):
    """A guest agent stopped by SIGSTOP took the request and answered nothing: `traffic stats` (and `stop`, `status`,
    a servicing's window) waited out the agent timeout, 30 s, then called it "overloaded or stuck". Here the timeout
    is 20 s: the agent must be named long before it."""
    monkeypatch.setattr("vfkeep.host.traffic.AGENT_TIMEOUT_S", 20.0)
    path = str(tmp_path / "guest-agent-0.sock")
    listener = socket.socket(socket.AF_UNIX)  # takes the request, as a stopped process's socket does
    listener.bind(path)
    listener.listen(4)
    child = proc.spawn(["sleep", "120"])
    try:
        os.kill(child.pid, signal.SIGSTOP)
        pool = GuestTraffic(str(tmp_path), None, None, [None])
        pool._agents[0] = agents.Agent(0, child, path, TrafficError, "nic")
        t0 = time.monotonic()
        with pytest.raises(TrafficError) as e:
            pool.stats(nic=0, settle_ms=0)
        assert time.monotonic() - t0 < 15
        with pytest.raises(TrafficError) as s:
            pool.status()
    finally:
        os.kill(child.pid, signal.SIGCONT)
        proc.end(child)
        listener.close()
    stopped = (f"nic 0: its agent (pid {child.pid}) is stopped (SIGSTOP) and answers nothing until continued: "
               f"`kill -CONT {child.pid}` (its log: {tmp_path}/guest-agent-0.log)")
    assert str(e.value) == stopped and str(s.value) == stopped


@contextlib.contextmanager
def events_host(run_dir):
    """A host control socket in `run_dir` that serves `events` from the bus it yields."""
    from vfkeep.host.events import EventBus
    bus = EventBus()
    server = control.serve(str(run_dir), {}, refused=(), events=bus)
    server.start()
    try:
        yield bus
    finally:
        bus.close(drain_s=5)
        server.close()


class Lines:
    """A child's pipe read line by line with a timeout (`next(timeout)`: '' at its end or after it), then `rest()`."""

    def __init__(self, pipe):
        self.fd, self.buf = pipe.fileno(), b""

    def next(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf and select.select([self.fd], [], [], max(0.0, deadline - time.monotonic()))[0]:
            chunk = os.read(self.fd, 4096)
            if not chunk:
                break
            self.buf += chunk
        line, sep, self.buf = self.buf.partition(b"\n")
        if not sep:
            self.buf = line
            return ""
        return (line + sep).decode()

    def rest(self, timeout: float) -> str:
        out = []
        while line := self.next(timeout):
            out.append(line)
        return "".join(out) + self.buf.decode()


def test_events_names_a_stopped_host_and_fails_when_it_dies(tmp_path):
    """An events stream from a host stopped by SIGSTOP waited silently for ever, and when the host then died
    (SIGKILL: no host_stopping event) it exited 0 with no line, as after an orderly stop."""
    host = proc.spawn(["sleep", "120"])  # the host's process, as the pidfile names it
    (tmp_path / "host.pid").write_text(f"{host.pid}\n")
    log = f"{tmp_path}/host.log"
    child = None
    try:
        with events_host(tmp_path) as bus:
            child = subprocess.Popen(proc.vfkeep_argv("events", "--run-dir", str(tmp_path), "--json"),
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=CLEAN_ENV,
                                     stdin=subprocess.DEVNULL)
            out, err = Lines(child.stdout), Lines(child.stderr)
            deadline = time.monotonic() + 60
            while bus.subscribers == 0:
                assert time.monotonic() < deadline and child.poll() is None, "events never subscribed"
                time.sleep(0.02)
            os.kill(host.pid, signal.SIGSTOP)
            assert err.next(15) == (
                f"vfkeep: events: host pid {host.pid} is stopped (SIGSTOP, or Ctrl-Z in its terminal) and answers "
                f"nothing until continued: `kill -CONT {host.pid}`; waiting for it (host log: {log})\n")
            os.kill(host.pid, signal.SIGCONT)
            assert err.next(15) == f"vfkeep: events: host pid {host.pid} continued\n"
            bus.publish("nic_state", pci_id="x", restore_path="fresh", error=None, worker_generation=2, cause="boot")
            assert json.loads(out.next(15))["event"] == "nic_state"
            os.kill(host.pid, signal.SIGKILL)  # it dies: the stream ends without host_stopping
            host.wait(10)
        child.wait(30)
        last = out.rest(10)
    finally:
        if child is not None and child.poll() is None:
            proc.end(child)
        proc.end(host)
    assert child.returncode == 1 and json.loads(last) == {"ok": False, "error": {"type": "Error", "message": (
        f"host pid {host.pid} died without stopping in order (killed, or it crashed; host log: {log})")}}


def test_events_ends_with_the_hosts_stop(tmp_path):
    """The host's last event reaches the stream before the host exits (the stream's writer could see the end before
    writing what it held, and the host exit before the writer ran): exit 0 after host_stopping."""
    h = HostRun(tmp_path / "run")
    child = None
    try:
        child = subprocess.Popen(proc.vfkeep_argv("events", "--run-dir", h.run_dir, "--json"),
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=CLEAN_ENV,
                                 stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while h.status()["event_subscribers"] == 0:
            assert time.monotonic() < deadline and child.poll() is None, "events never subscribed"
            time.sleep(0.02)
        h.stop()
        out, err = child.communicate(timeout=30)
    finally:
        if child is not None and child.poll() is None:
            proc.end(child)
        if h.child.poll() is None:
            h.kill()
    assert child.returncode == 0 and err == "", err
    assert [json.loads(ln)["event"] for ln in out.splitlines()] == ["host_stopping", "host_stopped"]


def test_a_stopping_host_waits_for_its_streams_to_pass_on_the_last_event():
    """`EventBus.close` ends the subscriptions and waits (bounded) until their readers are done with them: the host
    process exits right after it, and a reader that had not yet written host_stopping lost it."""
    from vfkeep.host.events import EventBus
    bus = EventBus()
    sub = bus.subscribe()
    got: list[dict] = []
    reading = threading.Event()

    def reader():
        reading.wait(10)
        while (e := sub.next(0.1)) is not None or not sub.closed:
            if e is not None:
                got.append(e)
        sub.close()

    t = threading.Thread(target=reader)
    t.start()
    bus.publish("host_stopping", cause="stop requested", servicing_phase=None)
    threading.Timer(0.2, reading.set).start()  # the reader runs only once close() began
    bus.close(drain_s=20)
    assert [e["event"] for e in got] == ["host_stopping"]
    t.join(10)


def test_a_stopped_worker_is_named_at_once(tmp_path):
    """A worker stopped by SIGSTOP answered nothing: a save waited out its timeout (60 s), an `inspect` 20 s, and
    then said only that it did not answer."""
    from vfkeep.contract import Channel, Hello
    from vfkeep.host.worker_proc import WorkerFailed, WorkerProcess

    ours, theirs = Channel.pair()
    child = proc.spawn(["sleep", "120"])
    try:
        os.kill(child.pid, signal.SIGSTOP)
        worker = WorkerProcess(child, ours, 3, ["sleep"])
        t0 = time.monotonic()
        with pytest.raises(WorkerFailed) as e:
            worker.recv(10, Hello)
        assert time.monotonic() - t0 < 8
    finally:
        os.kill(child.pid, signal.SIGCONT)
        proc.end(child)
        ours.sock.close()
        theirs.sock.close()
    assert str(e.value) == (f"worker 3 (pid {child.pid}) is stopped (SIGSTOP) and answers nothing until continued: "
                            f"`kill -CONT {child.pid}`")


def test_stopped_children_are_named_and_stopped_in_order(tmp_path):
    """`status` showed a stopped worker, device or agent as `alive: true` and nothing else; a servicing then waited
    on a stopped device until its worker's timeouts ran out; and the host's stop waited 10 s for the stopped
    worker's NIC shutdown (which never came: 'NICs shut down' was not true), then 5 s for each other child."""
    h = HostRun(tmp_path / "run")
    try:
        h.traffic("start", rate=100)
        st = h.status()
        worker, (device, pci) = st["worker"]["pid"], (st["devices"][0]["pid"], st["devices"][0]["pci_id"])
        agent = h.traffic("status")["agents"][0]["pid"]
        for pid in (worker, device, agent):
            os.kill(pid, signal.SIGSTOP)
        deadline = time.monotonic() + 30  # (a signal is acted on once its process runs)
        while not all(proc.process_state(p) == "T" for p in (worker, device, agent)):
            assert time.monotonic() < deadline, "not stopped"
            time.sleep(0.01)
        warnings = h.status()["warnings"]
        r = vfkeep("service", "--run-dir", h.run_dir, "--mana-keepalive", timeout=30)
        p = vfkeep("probe", "--run-dir", h.run_dir, "0", timeout=30)
        shown = h.inspect("devices/0", wait=30)  # (its counters were asked for: 5 s, then "no reply within 5.0 s")
        h.stop()  # (still stopped: the host continues them, and ends every one)
    finally:
        if h.child.poll() is None:
            h.kill()
    line = "is stopped (SIGSTOP) and answers nothing until continued: `kill -CONT"
    assert warnings == [f"worker 1 (pid {worker}) {line} {worker}`", f"device {pci} (pid {device}) {line} {device}`",
                        f"nic 0: its traffic agent (pid {agent}) {line} {agent}`"]
    assert r.returncode == 1 and r.stderr == (
        f"vfkeep: service: device {pci} (pid {device}) {line} {device}`: a servicing needs every device running (host "
        f"log: {h.run_dir}/host.log)\n"), r
    # probe named none of them: "0/8 frames came back" after its 2 s; inspect waited 5 s for the device's counters
    assert p.returncode == 1 and p.stderr == (
        f"vfkeep: probe: worker 1 (pid {worker}) {line} {worker}`; device {pci} (pid {device}) {line} {device}`; "
        f"nic 0: its traffic agent (pid {agent}) {line} {agent}`: a probe of nic 0 needs them running (host log: "
        f"{h.run_dir}/host.log)\n"), p
    assert shown["error"] == f"device {pci} (pid {device}) {line} {device}`" and "counters" not in shown, shown
    logs = h.logs()
    assert "did not shut down cleanly" not in logs
    assert f'msg="traffic agent ended" nic=0 pid={agent} exit_status=0' in logs, logs


def test_a_host_still_starting_is_not_called_absent(tmp_path):
    """Between its pidfile and its control socket (a boot takes seconds), a host was "no host answering ...; is a host
    running? (`vfkeep run ...`)"."""
    import sys

    host = proc.spawn([sys.executable, "-c", "import time; time.sleep(120)", "vfkeep", "run"])  # (its pid is a host's)
    try:
        (tmp_path / "host.pid").write_text(f"{host.pid}\n")
        r = vfkeep("status", "--run-dir", str(tmp_path))
    finally:
        proc.end(host)
    assert r.returncode == 1 and r.stderr == (
        f"vfkeep: status: no host answering in {tmp_path}: cannot connect to {tmp_path}/host.sock: No such file or "
        f"directory; host pid {host.pid} runs there but its control socket is not up: still starting, or the socket "
        f"was removed (host log: {tmp_path}/host.log)\n"), r


@pytest.mark.parametrize("nics", [0, 2])
def test_stop_says_what_the_stop_did_to_the_nics(tmp_path, nics):
    """`vfkeep stop` said "NICs shut down" whatever happened: with no NIC at all, a worker that had died or one that
    never answered its shutdown. It now says what the host's teardown reports (its host_stopped event)."""
    h = HostRun(tmp_path / "run", nics=nics)
    try:
        st = h.status()
        worker, pcis = st["worker"]["pid"], [d["pci_id"] for d in st["devices"]]
        r = vfkeep("stop", "--run-dir", h.run_dir, "--json")
        assert h.reap(30) == 0
    finally:
        if h.child.poll() is None:
            h.kill()
    assert r.returncode == 0, r
    summary = f"worker 1 (pid {worker}) " + ("had no NIC to shut down" if nics == 0 else "shut 2 NICs down")
    assert json.loads(r.stdout) == {"stopped": h.pid, "run_dir": h.run_dir, "servicing_phase": None, "outcome": {
        "worker": "shut_down", "nics_shut_down": pcis, "nvme_shut_down": [], "summary": summary}}, r


class _Worker:
    """A worker as the teardown sees it, in the state `how`."""

    def __init__(self, how: str):
        from vfkeep.host.worker_proc import WorkerFailed
        self.how, self.generation, self.pid, self.failed = how, 4, 4242, WorkerFailed
        self.state_taken = how == "saved"
        self.child = subprocess.CompletedProcess([], -9 if how == "dead" else 0)
        self.asked = []

    def alive(self):
        return self.how != "dead"

    def dismiss(self, timeout):
        self.asked.append("dismiss")

    def request(self, msg, timeout, reply):
        self.asked.append(type(msg).__name__)
        if self.how == "silent":
            raise self.failed("worker 4 (pid 4242) did not answer within 10 s")

    def end(self):
        return self.child.returncode


@pytest.mark.parametrize("how, worker, summary", [
    ("dead", "dead", "worker 4 (pid 4242) had exited (killed by SIGKILL): its 2 NICs were not shut down"),
    ("silent", "no_shutdown", "worker 4 (pid 4242) did not confirm its shutdown (worker 4 (pid 4242) did not answer "
                              "within 10 s); it was ended: its 2 NICs were perhaps not shut down"),
    ("saved", "abandoned_servicing", "worker 4 (pid 4242) had saved its state for the servicing the stop abandoned: "
                                     "its 2 NICs were left as saved, not shut down"),
    (None, "none", "no worker was running: no NIC was shut down"),
    ("answers", "shut_down", "worker 4 (pid 4242) shut 2 NICs down"),
])
def test_the_stop_outcome_says_whether_the_nics_were_shut_down(tmp_path, how, worker, summary):
    """What `vfkeep stop` prints (the host_stopped event's summary) for each state the teardown finds the worker in:
    it said "NICs shut down" for every one."""
    from vfkeep.host.vmm import Host, HostConfig

    host = Host(HostConfig(run_dir=str(tmp_path), nics=2))
    host.devices = [types.SimpleNamespace(pci_id=p) for p in ("a1:00.0", "a2:00.0")]
    host.worker = None if how is None else _Worker(how)
    out = host._end_worker()
    shut = ["a1:00.0", "a2:00.0"] if worker == "shut_down" else []
    assert out == {"worker": worker, "nics_shut_down": shut, "nvme_shut_down": [], "summary": summary}
    assert host.worker is None
