"""`vfkeep run --guest netns`: the guest is a network namespace per NIC; real ping and TCP through
worker -> MANA vport -> device -> TAP -> peer namespace, across every servicing path; nothing is left
behind on any exit path. Root only (CAP_NET_ADMIN); skipped with that reason otherwise."""
from __future__ import annotations

import contextlib
import glob
import json
import os
import select
import signal
import subprocess
import time

import pytest
from click.testing import CliRunner

from vfkeep import netns, proc
from vfkeep.device.timing import PRESETS
from vfkeep.guest.netload import Pinger, TcpStream, lost_outside
from vfkeep.host.devices import nic_mac
from vfkeep.host.vmm import Host, HostConfig
from vfkeep.servicing_paths import ORDER, REQUESTS, unexpected

from helpers import HeldAtFinalization
from netns_helpers import assert_nothing_left, escaped_taps, interfaces, needs_netns
from servicing_helpers import HostRun, pid_alive

#: Lost replies must be inside the servicing window, give or take a request in flight when it began.
MARGIN_NS = 100_000_000


def _link(ns: str, ifname: str) -> str:
    return subprocess.run(["ip", "-n", ns, "link", "show", ifname], capture_output=True, text=True).stdout


def test_without_net_admin_run_says_it_needs_root(tmp_path, monkeypatch):
    monkeypatch.setattr(netns, "has_net_admin", lambda: False)
    from vfkeep.host.commands import run_command
    r = CliRunner().invoke(run_command, ["--run-dir", str(tmp_path), "--guest", "netns", "--detach"])
    assert r.exit_code != 0 and "needs root (CAP_NET_ADMIN)" in r.output
    assert netns.list_run(netns.run_id(tmp_path)) == []


@pytest.fixture
def root_ifaces():
    before = interfaces()
    yield before


@needs_netns
def test_two_nics_with_distinct_macs_reach_two_peers(tmp_path, root_ifaces):
    """One guest namespace per NIC, its TAP carrying the NIC's MAC; each pings its own peer through its
    own worker/vport/device/TAP path (the peer learns the guest's MAC); `vfkeep stop` leaves nothing."""
    host = HostRun(tmp_path / "run", "--guest", "netns", nics=2)
    rid = netns.run_id(host.run_dir)
    try:
        assert netns.list_run(rid) == sorted(f"vfk-{rid}-{k}{i}" for i in (0, 1) for k in "gw")
        for nic in (0, 1):
            g, w = netns.guest_ns(rid, nic), netns.wire_ns(rid, nic)
            peer = netns.peer_address(nic)
            r = host.cli("exec", "--run-dir", host.run_dir, str(nic), "ping", "-c", "3", "-i", "0.05", "-W", "5", peer)
            assert r.returncode == 0 and "3 received" in r.stdout, r.stdout + r.stderr
            assert nic_mac(nic).hex(":") in _link(g, netns.GUEST_TAP)
            neigh = subprocess.run(["ip", "-n", w, "neigh", "show", netns.guest_address(nic)], capture_output=True,
                                   text=True).stdout
            assert nic_mac(nic).hex(":") in neigh, neigh
        assert nic_mac(0) != nic_mac(1)
        # The other NIC's peer is not reachable: each guest has only its own wire.
        r = host.cli("exec", "--run-dir", host.run_dir, "0", "ping", "-c", "1", "-W", "1", netns.peer_address(1))
        assert r.returncode != 0
        nets = host.inspect("guest_net")
        assert [n["mac"] for n in nets] == [nic_mac(0).hex(":"), nic_mac(1).hex(":")]
        assert all(n["bridge"]["tap_rx_frames"] >= 3 and n["bridge"]["tx_ring_full"] == 0 for n in nets)
        # Probe and traffic agents would be second producers on the bridge's rings.
        with pytest.raises(Exception, match="guest bridge"):
            host.probe(0)
    except BaseException:
        host.kill()
        netns.cleanup_run(rid)
        raise
    host.stop()
    assert_nothing_left(rid, root_ifaces, marker=host.run_dir)


@needs_netns
@pytest.mark.timeout(300)  # 55 s at load 16
def test_tcp_and_ping_survive_every_servicing_path(tmp_path, root_ifaces):
    """Across every servicing path (reset-flr, reset, keepalive, keepalive+datapath) one TCP connection keeps
    streaming (no reset; the receiver checks every byte, in order, and the close is orderly) and ping loses
    replies only inside the servicing windows."""
    run_dir = str(tmp_path / "run")
    host = Host(HostConfig(run_dir=run_dir, nics=1, timing=PRESETS["natural"], datapath_keepalive=True,
                           guest="netns"))
    rid = netns.run_id(run_dir)
    os.makedirs(run_dir)
    pinger = stream = None
    try:
        host.start()
        g, w, peer = netns.guest_ns(rid, 0), netns.wire_ns(rid, 0), netns.peer_address(0)
        _console_exec(host, peer)
        pinger = Pinger(g, peer, 0.01)
        stream = TcpStream(g, w, peer, rate=1_000_000)
        stream.wait_connected()
        assert pinger.wait_replies(10, 10)
        windows, flowing = [], []
        for mode in ORDER:
            before = stream.received()
            result = host.service(**REQUESTS[mode])
            assert unexpected(mode, result) == [], result
            windows.append(host.last_servicing["window_ns"])
            deadline = time.monotonic() + 30  # the stream moves on after the servicing (TCP's backoff included)
            while stream.received() < before + 500_000 and time.monotonic() < deadline:
                time.sleep(0.05)
            flowing.append(stream.received() - before)
            assert stream.state() == "ESTABLISHED"
        # The NIC's MAC is the same after every servicing: the worker's vport, the guest's TAP, the peer's view.
        assert host.inspect("worker/nics/0/vport/mac") == nic_mac(0).hex(":")
        neigh = subprocess.run(["ip", "-n", w, "neigh", "show", netns.guest_address(0)], capture_output=True,
                               text=True).stdout
        assert nic_mac(0).hex(":") in neigh and nic_mac(0).hex(":") in _link(g, netns.GUEST_TAP)
        time.sleep(0.7)
        pinger.stop()
        tcp = stream.close()
    except BaseException:
        if stream is not None:
            stream.kill()
        raise
    finally:
        if pinger is not None:
            pinger.stop()
        host.stop()
    assert all(n >= 500_000 for n in flowing), flowing
    # At least what moved after the servicings (4 x 500 kB); how much more depends on how fast they were.
    assert tcp["ok"] and tcp["received"] == tcp["sent"] >= sum(flowing), tcp
    assert tcp["sender_error"] is None and tcp["receiver_error"] is None
    outside = lost_outside(pinger.lost_flights(), windows, MARGIN_NS)
    assert outside == [], (outside, windows, pinger.lost_flights())
    assert pinger.window(0, time.monotonic_ns())["sent"] > 100
    assert_nothing_left(rid, root_ifaces, marker=run_dir)


def _console_exec(host: Host, peer: str) -> None:
    """The console's `exec N CMD...` runs in guest N's namespace and shows the command's output."""
    import io

    from rich.console import Console

    from vfkeep.host.console import HostConsole
    buf = io.StringIO()
    c = HostConsole(host, Console(file=buf, width=200))
    # -w: until both replies came (with -W ping waits only two RTTs once one came: a reply lost at load 9)
    c.onecmd(f"exec 0 ping -c 2 -i 0.05 -w 10 {peer}")
    c.onecmd("exec 0 ip -o addr show eth0")
    c.onecmd("exec 7 true")
    out = buf.getvalue()
    assert "2 received" in out and f"{netns.guest_address(0)}/24" in out, out
    assert "nic 7 out of range" in out


@needs_netns
def test_sigterm_to_the_host_leaves_nothing(tmp_path, root_ifaces):
    host = HostRun(tmp_path / "run", "--guest", "netns")
    rid = netns.run_id(host.run_dir)
    # A long command inside the guest namespace, as from the console: it must end with the host.
    sleeper = proc.spawn(netns.exec_argv(netns.guest_ns(rid, 0), ["sleep", "300"]))
    try:
        kids = host.children()
        os.kill(host.pid, signal.SIGTERM)
        assert host.child.wait(30) == 143, host.logs()  # 128 + SIGTERM, after the orderly shutdown
        assert sleeper.wait(10) is not None
        assert not [p for p in kids if pid_alive(p)]
    finally:
        proc.end(sleeper)
        host.kill()
        netns.cleanup_run(rid)
    assert_nothing_left(rid, root_ifaces, marker=host.run_dir)


@needs_netns
def test_failed_boot_leaves_nothing(tmp_path, root_ifaces):
    """A worker that never comes up fails the boot: the run exits non-zero and takes its namespaces along."""
    run_dir = str(tmp_path / "run")
    r = subprocess.run(proc.vfkeep_argv("run", "--detach", "--run-dir", run_dir, "--timing", "natural", "--guest",
                                        "netns", "--worker-cmd", "false"), capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert_nothing_left(netns.run_id(run_dir), root_ifaces, marker=run_dir)


@needs_netns
def test_next_run_removes_a_dead_runs_namespaces(tmp_path, root_ifaces):
    """SIGKILL leaves the namespaces behind (their processes die with the host); the next run with the same run
    dir removes them before creating its own (and says so), and its stop leaves nothing."""
    first = HostRun(tmp_path / "run", "--guest", "netns")
    rid = netns.run_id(first.run_dir)
    try:
        first.child.kill()
        first.child.wait(10)
        first.kill()
        assert netns.list_run(rid) == [f"vfk-{rid}-g0", f"vfk-{rid}-w0"]
        second = HostRun(tmp_path / "run", "--guest", "netns")
        with open(os.path.join(second.run_dir, "host.stderr")) as f:
            assert f"network namespaces vfk-{rid}-g0, vfk-{rid}-w0" in f.read()
        r = second.cli("exec", "--run-dir", second.run_dir, "0", "ping", "-c", "2", "-i", "0.05", "-w", "10",
                       netns.peer_address(0))
        assert r.returncode == 0, r.stdout + r.stderr
        second.stop()
    finally:
        netns.cleanup_run(rid)
    assert_nothing_left(rid, root_ifaces, marker=first.run_dir)


@contextlib.contextmanager
def demo_net(tmp_path, *args: str, held: HeldAtFinalization | None = None):
    """`vfkeep demo --network ARGS` started in a session of its own (a terminal's Ctrl-C, or pytest's, reaches it only
    through the test), its temporary run dir under `tmp_path`. However the test ends, the demo is interrupted and
    waited for (not SIGKILLed 0.25 s after a Ctrl-C, as `subprocess.run` does: that left its namespaces), and its
    namespaces are removed. `held`: the demo stops once Python is finalizing it (`HeldAtFinalization`)."""
    argv = ("demo", "--network", "--timing", "natural", *args)
    child = subprocess.Popen(held.argv(*argv) if held else proc.vfkeep_argv(*argv), pass_fds=held.pass_fds if held
                             else (), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                             env={**os.environ, "TMPDIR": str(tmp_path)}, stdin=subprocess.DEVNULL)
    if held:
        held.started()
    try:
        yield child
    finally:
        if held:
            held.release()
        if child.poll() is None:
            child.send_signal(signal.SIGINT)
            try:
                child.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                child.kill()
                child.communicate()
        for run_dir in glob.glob(str(tmp_path / "vfkeep-demo-net-*")):
            netns.cleanup_run(netns.run_id(run_dir))


# The network demo took 58 s at load 16 (its servicings wait for Python start-ups), half the suite's 120 s default.
@needs_netns
@pytest.mark.timeout(300)
def test_network_demo(tmp_path, root_ifaces):
    """`vfkeep demo --network`: every path survived, JSON carries the per-path numbers, nothing is left."""
    out = tmp_path / "out"
    t = time.monotonic()
    with demo_net(tmp_path, "--out", str(out)) as child:
        stdout, stderr = child.communicate(timeout=280)
    took = time.monotonic() - t
    assert child.returncode == 0, stdout + stderr
    report = json.loads((out / "network.json").read_text())
    assert [p["path"] for p in report["paths"]] == list(ORDER)
    for p in report["paths"]:
        assert {"ping_lost", "ping_max_gap_ms", "tcp_survived", "tcp_retransmits", "tcp_bytes"} <= set(p)
        assert p["tcp_survived"] and p["tcp_bytes"] > 0 and p["ping_lost_outside_window"] == 0
    assert report["tcp"]["ok"] and (out / "network.png").stat().st_size > 10_000
    assert isinstance(report["drops"]["in_discards_no_wqe"], int), report["drops"]  # where a loss would be
    # its wall time is the run's (how short it is is the machine's load: 90 s was within reach at load 16+)
    assert "TCP survived" in stdout and 0 < report["wall_s"] <= took
    assert not [p for p in report["processes"] if pid_alive(p["pid"])]
    assert netns.list_run(report["guest"]["netns"].split("-")[1]) == []
    assert escaped_taps(root_ifaces) == set()
    assert glob.glob(str(tmp_path / "vfkeep-demo-net-*")) == []


def _wait_for(what: str, ready, child, timeout: float = 60):
    """ready() until it is true (returns it), while `child` runs."""
    deadline = time.monotonic() + timeout
    while not (got := ready()):
        assert child.poll() is None, f"ended before {what}: {child.communicate()}"
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.01)
    return got


def _stderr_until(child, text: str, timeout: float = 60) -> str:
    """What `child` wrote on stderr up to a line with `text` (read from its pipe as it comes; `communicate` reads the
    rest)."""
    got, deadline, fd = b"", time.monotonic() + timeout, child.stderr.fileno()
    while text.encode() not in got:
        left = deadline - time.monotonic()
        assert left > 0 and select.select([fd], [], [], left)[0], f"no {text!r} on stderr within {timeout} s: {got}"
        chunk = os.read(fd, 65536)
        assert chunk, f"stderr ended before {text!r}: {got}"
        got += chunk
    return got.decode()


#: When the second Ctrl-C comes: while the cleanup removes namespaces (its log says one went), once the command has
#: written its last line (it is exiting), or once Python is finalizing it (it had put back SIGINT's default action:
#: the command died of it, status -2, about 1 run in 7 of a test that pressed Ctrl-C twice 50 ms apart).
SECOND_INTERRUPTS = ["cleanup", "exit", "finalization"]


def _interrupt_twice(child, second: str, log: str, held: HeldAtFinalization | None, last_line: str) -> str:
    """Ctrl-C at `child` (a terminal signals its whole process group), then again at the moment `second`; returns
    its stderr. `log`: the host's log (a name that outlives the run dir the command removes)."""
    os.killpg(child.pid, signal.SIGINT)
    seen = ""
    if second == "cleanup":
        deadline = time.monotonic() + 60  # (the command may end meanwhile: the line comes before its end)
        while not _file_says(log, 'msg="namespace removed"'):
            assert time.monotonic() < deadline, f"no namespace removed within 60 s: {child.communicate()}"
            time.sleep(0.01)
    elif second == "exit":
        seen = _stderr_until(child, last_line)
    else:
        held.reached(child)
    if child.poll() is None:  # (not reaped: its pid is still its group's)
        os.killpg(child.pid, signal.SIGINT)
    if held:
        held.release()
    _, err = child.communicate(timeout=60)
    return seen + err


def _file_says(path: str, text: str) -> bool:
    try:
        with open(path) as f:
            return text in f.read()
    except FileNotFoundError:
        return False


DEMO_INTERRUPTED = "vfkeep: demo: interrupted (SIGINT); every process and namespace ended, temporary run dir removed"


@needs_netns
@pytest.mark.parametrize(("point", "second"),
                         [("namespaces", second) for second in SECOND_INTERRUPTS] + [("servicing", "cleanup")])
def test_a_network_demo_interrupted_twice_leaves_nothing(tmp_path, root_ifaces, point, second):
    """Ctrl-C pressed twice (the terminal signals the demo's whole process group): the second one cut the demo's
    cleanup short and left its two namespaces (`vfk-*-g0`, `-w0`), while it said they were removed; its temporary
    run dir was kept. Once the cleanup was done, one that came while Python finalized the demo killed it (status
    -2). Interrupted while its namespaces are being set up, and once a servicing is done (its guest's ping and TCP
    running); the second time at each `SECOND_INTERRUPTS` moment (once a servicing is done, during the cleanup only:
    the moments of the exit do not depend on where the first came, and each run of that point costs a servicing)."""
    kept = str(tmp_path / "host.log")
    with (HeldAtFinalization() if second == "finalization" else contextlib.nullcontext()) as held, \
            demo_net(tmp_path, held=held) as child:
        run_dir = _wait_for("a run dir", lambda: glob.glob(str(tmp_path / "vfkeep-demo-net-*")), child)[0]
        rid = netns.run_id(run_dir)
        _wait_for("its log", lambda: os.path.exists(os.path.join(run_dir, "host.log")), child)
        os.link(os.path.join(run_dir, "host.log"), kept)  # (the demo removes its run dir)
        if point == "namespaces":
            _wait_for("a namespace", lambda: netns.list_run(rid), child)
        else:
            _wait_for("a servicing", lambda: _file_says(kept, "servicing done"), child, timeout=90)
        err = _interrupt_twice(child, second, kept, held, DEMO_INTERRUPTED)
    assert child.returncode == 130, err
    assert_nothing_left(rid, root_ifaces, marker=run_dir)
    assert "Traceback" not in err and err.splitlines()[-1] == DEMO_INTERRUPTED, err
    assert not os.path.exists(run_dir)


@needs_netns
@pytest.mark.parametrize("second", SECOND_INTERRUPTS)
def test_a_run_interrupted_twice_during_set_up_leaves_nothing(tmp_path, root_ifaces, second):
    """`vfkeep run --guest netns` taking Ctrl-C twice while it creates its namespaces, the second time at each
    `SECOND_INTERRUPTS` moment: every namespace, TAP and process goes, and it exits 130 with its line."""
    run_dir = str(tmp_path / "run")
    rid = netns.run_id(run_dir)
    argv = ("run", "--no-console", "--guest", "netns", "--timing", "natural", "--run-dir", run_dir)
    with HeldAtFinalization() if second == "finalization" else contextlib.nullcontext() as held:
        child = subprocess.Popen(held.argv(*argv) if held else proc.vfkeep_argv(*argv),
                                 pass_fds=held.pass_fds if held else (), stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, start_new_session=True, stdin=subprocess.DEVNULL)
        if held:
            held.started()
        try:
            _wait_for("a namespace", lambda: netns.list_run(rid), child)
            err = _interrupt_twice(child, second, os.path.join(run_dir, "host.log"), held,
                                   "vfkeep: run: interrupted (SIGINT) during start-up")
        finally:
            if held:
                held.release()
            proc.end(child)
            netns.cleanup_run(rid)
    assert child.returncode == 130, err
    assert "Traceback" not in err, err
    assert err.splitlines()[-1].startswith("vfkeep: run: interrupted (SIGINT) during start-up; every child ended"), err
    assert_nothing_left(rid, root_ifaces, marker=run_dir)


def _pinger(interval_s: float, replies: dict[int, tuple[int, int]], transmitted: int):
    """A Pinger's records without a ping process: seq -> (send, receive) in ns."""
    import threading

    from vfkeep.guest.netload import Reply
    p = Pinger.__new__(Pinger)
    p.interval, p.transmitted, p.start_ns, p.stop_ns = interval_s, transmitted, 0, None
    p.replies = {s: Reply(s, t, r) for s, (t, r) in replies.items()}
    p._lock = threading.Lock()
    return p


def test_a_loss_is_placed_by_its_flight_not_its_send_time():
    """On a loaded machine a request waits in the guest's queues, the relay and the device: at an RTT of 300 ms, the
    requests sent 300-200 ms before a reset servicing were in flight when it dropped the vport's frames. By send time
    (100 ms of margin) they were "lost outside the servicing window" (22 at once in a suite run at load 10-20); their
    flight, from the send to the next reply that came, meets the window. A loss far from any window still counts."""
    ms = 1_000_000
    lost_seqs = set(range(20, 31)) | {80}  # the first 11: replies due inside the window [500, 600] ms; 80: alone
    replies = {s: (s * 10 * ms, (s * 10 + 300) * ms) for s in range(1, 101) if s not in lost_seqs}
    p = _pinger(0.01, replies, 100)
    flights = p.lost_flights()
    assert [seq for seq, _, _ in flights] == sorted(lost_seqs)
    assert flights[0] == (20, 200 * ms, 610 * ms) and flights[-1] == (80, 800 * ms, 1110 * ms)
    windows = [(500 * ms, 600 * ms)]
    by_send = [s for s, t in p.lost() if not any(w0 - 100 * ms <= t <= w1 + 100 * ms for w0, w1 in windows)]
    assert by_send == [*range(20, 31), 80]  # the old measurement
    assert lost_outside(flights, windows, 100 * ms) == [(80, 800 * ms)]
    # a flight no later reply closed meets every window after its send (and none before it)
    assert lost_outside([(5, 900 * ms, None)], windows, 0) == [(5, 900 * ms)]
    assert lost_outside([(5, 400 * ms, None)], windows, 0) == []


def test_a_loss_outside_the_windows_names_the_device_drops():
    """A ping loss no servicing explains is shown with the device's receive drops (at load 10-20: 61 frames found
    no posted receive buffer while the worker's relay waited for a CPU)."""
    from vfkeep.demo_net import problems
    path = {"path": "reset", "expectations_failed": [], "tcp_survived": True, "ping_lost_outside_window": 2}
    report = {"paths": [path], "tcp": {"ok": True}, "drops": {"in_discards_no_wqe": 61}}
    assert problems(report) == [
        "reset: 2 ping replies lost outside the servicing window",
        "the device dropped 61 received frames for want of a posted receive buffer (in_discards_no_wqe: the "
        "worker's relay did not keep up)"]
    assert problems({**report, "paths": [{**path, "ping_lost_outside_window": 0}]}) == []
