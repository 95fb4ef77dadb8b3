"""Guest disk IO across a worker replacement (issue 13 item 4): the guest IO engine on the block channel,
the NVMe emulator in its own process, the block relay + NVMe driver in two worker-like child processes.
Requests in flight at the save complete after the restore: none lost, none duplicated, none corrupted."""
import json
import pathlib
import subprocess
import sys
import time

import pytest

from vfkeep import proc
from vfkeep.guest.block import BAD_BUFFER, BAD_REQUEST, COMPLETION, OP_READ, BlockChannel, BlockLayout, Request
from vfkeep.guest.disk_io import DiskIo
from vfkeep.memory import MemoryLayout
from vfkeep.nvme_device.main import start_nvme_device
from vfkeep.vfio_user import control_call

LAYOUT = MemoryLayout(guest_pages=160, worker_pages=1024, pool_pages=512)
BLOCKS = BlockLayout(disks=1, slots=64, data_pages=64, base_gpa=0)
WORKER = pathlib.Path(__file__).with_name("nvme_relay_worker.py")
LBAS = 4096


@pytest.fixture
def rig(tmp_path, mem):
    sock = str(tmp_path / "nvme0.sock")
    dev = start_nvme_device(sock, "--run-dir", str(tmp_path), "--size", "4M")
    channel = BlockChannel.create(mem, BLOCKS, 0)
    children = []

    def worker(keepalive: bool, start: dict) -> tuple[subprocess.Popen, dict]:
        fds = list(channel.bell_fds())
        child = subprocess.Popen([sys.executable, str(WORKER), str(mem.fd), LAYOUT.to_str(), BLOCKS.to_str(), sock,
                                  *map(str, fds), json.dumps({"keepalive": keepalive})],
                                 pass_fds=[mem.fd, *fds], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                 preexec_fn=proc.die_with_parent)
        children.append(child)
        child.stdin.write(json.dumps(start) + "\n")
        child.stdin.flush()
        return child, json.loads(child.stdout.readline())

    def command(child, line: str) -> dict:
        child.stdin.write(line + "\n")
        child.stdin.flush()
        out = json.loads(child.stdout.readline())
        child.wait(30)
        return out

    yield sock, channel, worker, command
    for c in children:
        proc.end(c)
    proc.end(dev)
    channel.close()


def wait_for(pred, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def device_inflight(sock: str) -> int:
    return sum(q["inflight"] for q in control_call(sock + ".ctl", "state")["sqs"])


def servicing(rig, mem, keepalive: bool):
    io = DiskIo(rig[1], mem, lbas=LBAS)
    try:
        return run_servicing(rig, mem, io, keepalive)
    finally:
        io.close()


def run_servicing(rig, mem, io, keepalive):
    """The device holds every IO it fetches from just before the save until after the restore (`io_stall`, ended
    by `clear_faults`), so the save finds requests in flight however slow the machine (an `io_delay` of 20 ms did
    not: at load 15 the save once caught 1)."""
    sock, channel, worker, command = rig
    first, up = worker(keepalive, {})
    assert up["path"] == "fresh"
    io.start(qd=16, read_pct=40)
    wait_for(lambda: io.counters["completed"] >= 400)
    control_call(sock + ".ctl", "io_stall", on=True)
    wait_for(lambda: device_inflight(sock) >= 8)
    t_save = time.monotonic_ns()
    saved = command(first, "save")
    mem.scrub_worker_ram()
    second, up = worker(keepalive, {k: saved[k] for k in ("driver_state", "dma_state", "requests") if saved[k]})
    t_up = time.monotonic_ns()
    control_call(sock + ".ctl", "clear_faults")
    completed_at_restore = io.counters["completed"]
    wait_for(lambda: io.counters["completed"] >= completed_at_restore + 400)
    io.stop()
    assert io.wait_idle(30), "requests in flight at the save never completed"
    assert io.verify_all() > 0
    stats = io.stats(t_save, None)
    done = command(second, "quit")
    return saved, up, stats, (t_save, t_up), done


def assert_every_request_once(stats):
    assert stats["errors"] == 0 and stats["verify_errors"] == 0, stats["bad_blocks"]
    assert stats["duplicates"] == 0 and stats["outstanding"] == 0 and stats["ring_full"] == 0
    assert stats["submitted"] == stats["completed"]


def test_guest_io_across_a_keepalive_servicing(rig, mem):
    saved, up, stats, _, done = servicing(rig, mem, keepalive=True)
    assert saved["inflight"] >= 8, "the save must catch guest requests in flight"
    assert up["path"] == "keepalive" and up["replay"] == saved["inflight"] and up["unclaimed"] == 0
    assert_every_request_once(stats)
    assert done["relay"]["replayed"] == saved["inflight"]
    assert stats["io_blackout_ms"] > 0


def test_guest_io_across_a_servicing_without_keepalive(rig, mem):
    """The controller is reset (CC.EN 1→0) and re-initialised; the guest requests are still replayed."""
    sock = rig[0]
    seq = control_call(sock + ".ctl", "command_log")["last_seq"]
    saved, up, stats, _, done = servicing(rig, mem, keepalive=False)
    assert up["path"] == "fresh" and up["replay"] == saved["inflight"] > 0, (saved["relay"], stats)
    names = [e["name"] for e in control_call(sock + ".ctl", "command_log", since=seq)["entries"]]
    assert names.count("CC_DISABLE") >= 2 and names.count("CC_ENABLE") == 2  # reset and re-enabled
    assert_every_request_once(stats)


def test_iops_of_a_window_is_over_the_window_not_over_its_burst(rig, mem):
    """A servicing window whose IO all completes in one burst after the restore (found in review: 16
    completions within 0.4 ms reported as 40,022 IOPS): the rate is completions over the window asked for."""
    io = DiskIo(rig[1], mem, lbas=LBAS)
    try:
        t0 = time.monotonic_ns() - 2_000_000_000
        for i in range(16):
            io.done.append((t0 + 1_000_000_000 + i * 25_000, 100_000, OP_READ))
        st = io.stats(t0, t0 + 2_000_000_000)
        assert st["window_completions"] == 16 and st["iops"] == 8
        first_s = (t0 + 1_000_000_000) / 1e9
        before = time.monotonic()
        whole = io.stats()["iops"]  # the whole run: from its first completion to now (about 1 s, longer under load)
        assert round(16 / (time.monotonic() - first_s)) <= whole <= round(16 / (before - first_s)), whole
    finally:
        io.close()

def test_relay_refuses_requests_outside_the_data_area(rig, mem):
    sock, channel, worker, command = rig
    child, up = worker(False, {})
    channel.requests.push(Request(1, OP_READ, 8, 0, 0).pack())  # gpa 0: the ring itself
    channel.requests.push(Request(2, OP_READ, 8, 1 << 40, channel.data_gpa).pack())  # past the namespace
    channel.requests.push(Request(3, 9, 8, 0, channel.data_gpa).pack())  # unknown op
    wait_for(lambda: len(channel.completions) == 3)
    got = {COMPLETION.unpack(raw)[0]: COMPLETION.unpack(raw)[1] for raw in channel.completions.pop_many(3)}
    assert got == {1: BAD_BUFFER, 2: BAD_REQUEST, 3: BAD_REQUEST}
    assert control_call(sock + ".ctl", "counters")["counters"]["io_commands"] == 0
    assert command(child, "quit")["relay"]["refused"] == 3


def test_disk_agent_process_over_its_rpc_socket(rig, mem, tmp_path):
    from vfkeep import rpc
    from vfkeep.guest.disk_agent import spawn_disk_agent

    sock, channel, worker, command = rig
    child, up = worker(False, {})
    ctl_path = str(tmp_path / "disk-agent-0.sock")
    agent = spawn_disk_agent(mem, BLOCKS, 0, *channel.bell_fds(), ctl_path, lbas=LBAS, run_dir=str(tmp_path))
    try:
        with rpc.RpcClient(ctl_path, 30) as client:
            assert client.call("start", {"qd": 8, "read_pct": 50})["qd"] == 8
            wait_for(lambda: client.call("status")["counters"]["completed"] >= 300)
            verified = client.call("verify", {"qd": 8})
            assert verified["chunks"] > 0
            stats = verified["stats"]
            assert_every_request_once(stats)
            assert stats["iops"] > 0 and stats["latency_ms"]["p50"] is not None
            with pytest.raises(rpc.Refused):
                client.call("start", {"qd": 10_000})
            client.call("quit")
        assert agent.wait(10) == 0
    finally:
        proc.end(agent)
    command(child, "quit")
