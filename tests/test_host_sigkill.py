"""A host that dies by SIGKILL (issue 15 item 5): every child dies with it (PR_SET_PDEATHSIG), also in the middle
of a servicing; the next `vfkeep run` on the same run dir removes what it left (pidfile, sockets, network
namespaces) and says so."""
import os
import stat
import threading
import time

from helpers import vfkeep
from netns_helpers import assert_nothing_left, needs_netns
from servicing_helpers import HostRun, children_of, kill_host
from vfkeep import netns, rpc


def sockets(run_dir) -> list[str]:
    return sorted(n for n in os.listdir(run_dir) if stat.S_ISSOCK(os.lstat(os.path.join(run_dir, n)).st_mode))


def host_note(run_dir) -> str:
    with open(os.path.join(run_dir, "host.stderr")) as f:
        return f.read()


def test_host_killed_mid_servicing_takes_every_child_and_the_next_run_cleans_up(tmp_path):
    run_dir = tmp_path / "run"
    h = HostRun(run_dir, nics=2)
    h.traffic("start", rate=300)

    def stuck():
        try:
            h.service(mana_keepalive=True, test_config="SERVICING_SAVE_STUCK", timeout=60)
        except rpc.RpcError:
            pass  # the host died under it

    t = threading.Thread(target=stuck, daemon=True)
    t.start()
    deadline = time.monotonic() + 30
    while (h.status()["servicing"] or {}).get("phase") != "save":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    # devices 2, agents 2, the worker stuck in its save and the prelaunched next one
    assert len(h.children()) == 6
    kill_host(h)
    t.join(10)
    left = sockets(run_dir)
    assert {"host.sock", "nic0.sock", "nic1.sock.ctl", "guest-agent-1.sock"} <= set(left), left
    assert (run_dir / "host.pid").exists()

    h2 = HostRun(run_dir, nics=1)
    try:
        note = host_note(run_dir)
        assert "removed the pidfile of dead host pid" in note and "nic1.sock.ctl" in note, note
        assert not {"nic1.sock", "nic1.sock.ctl", "guest-agent-1.sock"} & set(sockets(run_dir))
        assert h2.probe()["ok"]
    finally:
        h2.stop()
    assert sockets(run_dir) == [] and not (run_dir / "host.pid").exists()
    assert children_of(h2.pid) == []


@needs_netns
def test_namespaces_of_a_killed_host_are_removed_by_the_next_run(tmp_path):
    """Whatever the next run's guest is: a host without --guest netns removes them too."""
    run_dir = tmp_path / "run"
    rid = netns.run_id(str(run_dir))
    h = HostRun(run_dir, "--guest", "netns")
    try:
        assert len(netns.list_run(rid)) == 2
        kill_host(h)
    except BaseException:
        h.kill()
        netns.cleanup_run(rid)
        raise
    try:
        assert len(netns.list_run(rid)) == 2  # nothing ran to remove them
        h2 = HostRun(run_dir)
        try:
            assert netns.guest_ns(rid, 0) in host_note(run_dir)
            assert netns.list_run(rid) == []
        finally:
            h2.stop()
        assert_nothing_left(rid)
    finally:
        netns.cleanup_run(rid)  # (only if something above failed)


@needs_netns
def test_stop_after_a_killed_netns_host_removes_what_the_next_run_would_and_says_so(tmp_path):
    """`vfkeep stop` with no host running left the namespaces, pidfile and sockets of a SIGKILLed
    `--guest netns` host, saying `nothing to stop` (new-user review item 5)."""
    run_dir = tmp_path / "run"
    rid = netns.run_id(str(run_dir))
    h = HostRun(run_dir, "--guest", "netns")
    try:
        kill_host(h)
        assert len(netns.list_run(rid)) == 2 and (run_dir / "host.pid").exists()
        r = vfkeep("stop", "--run-dir", str(run_dir))
        assert r.returncode == 0, r.stderr
        for name in ("pidfile of dead host pid", "host.sock", "nic0.sock.ctl", "guest-bridge-0.sock",
                     netns.guest_ns(rid, 0), netns.wire_ns(rid, 0)):
            assert name in r.stdout, (name, r.stdout)
        assert netns.list_run(rid) == [] and sockets(run_dir) == [] and not (run_dir / "host.pid").exists()
        assert_nothing_left(rid)
    finally:
        h.kill()
        netns.cleanup_run(rid)  # (only if something above failed)


def test_a_killed_nvme_hosts_disk_file_goes_with_the_next_stop_or_run(tmp_path):
    """nvme0.disk (64 MiB sparse) and the empty device-nvme0.stderr outlived a SIGKILLed --nvme host, also
    after the next run/stop without --nvme; the README says the disk file goes when the host stops."""
    run_dir = tmp_path / "run"
    for cleaner in ("stop", "run"):
        h = HostRun(run_dir, "--nvme", "1", nics=0)
        kill_host(h)
        assert (run_dir / "nvme0.disk").exists() and (run_dir / "device-nvme0.stderr").exists()
        if cleaner == "stop":
            r = vfkeep("stop", "--run-dir", str(run_dir))
            assert r.returncode == 0 and "no host running" in r.stdout, r.stderr
            assert "sockets host.sock, nvme0.sock, nvme0.sock.ctl and files device-nvme0.stderr, nvme0.disk" in r.stdout
        else:
            h2 = HostRun(run_dir, nics=0)
            try:
                assert "files device-nvme0.stderr, nvme0.disk" in host_note(run_dir), host_note(run_dir)
            finally:
                h2.stop()
        assert not (run_dir / "nvme0.disk").exists() and not (run_dir / "device-nvme0.stderr").exists()
