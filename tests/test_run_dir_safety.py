"""A run dir (or a socket path) may hold other people's files: vfkeep removes or replaces only what it created
itself, and only when nothing uses it (new-user review, items 1-5, 7, 10)."""
import os
import signal
import socket
import subprocess

import pytest

from helpers import vfkeep, wait_for
from servicing_helpers import HostRun, pid_alive
from vfkeep.host import leftovers
from vfkeep.sockets import SocketPathError, listen_unix

DATA = b"the user's own blocks\n" * 100


def stale_socket(path) -> None:
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.close()  # a socket file nobody listens on


def live_socket(path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.listen(1)
    return s


def user_disk(path):
    path.write_bytes(DATA)
    os.truncate(path, 64 << 20)
    return path


def unchanged(path) -> bool:
    with open(path, "rb") as f:
        return f.read(len(DATA)) == DATA and os.path.getsize(path) == 64 << 20


def one_line(r: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    return lines[0]


def test_run_keeps_a_disk_file_named_like_its_own_in_the_run_dir(tmp_path):
    """Item 1: `--disk DIR/nvme0.disk` was deleted and recreated empty by the start-up cleanup."""
    disk = user_disk(tmp_path / "nvme0.disk")
    h = HostRun(tmp_path, "--nvme", "1", "--disk", str(disk), nics=0)
    try:
        assert "removed" not in (tmp_path / "host.stderr").read_text()
        assert unchanged(disk)
    finally:
        h.stop()
    assert unchanged(disk)


def test_stop_without_a_host_removes_only_what_vfkeep_created_and_says_so(tmp_path):
    """Items 2 and 3: stop deleted the user's nvme3.disk, an empty build.stderr and other sockets, saying
    `nothing to stop`."""
    user_disk(tmp_path / "nvme3.disk")
    (tmp_path / "build.stderr").write_text("")
    stale_socket(tmp_path / "other-app.sock")
    live = live_socket(tmp_path / "nic1.sock")  # a vfkeep name, but somebody listens on it
    # what a SIGKILLed host of this run dir left:
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / "host.pid").write_text(f"{dead.pid}\n")
    stale_socket(tmp_path / "nic0.sock")
    (tmp_path / "worker-2.stderr").write_text("")
    (tmp_path / "nvme0.disk").write_bytes(b"this run's only")
    (tmp_path / leftovers.MANIFEST).write_text("nvme0.disk\n../escape.disk\n")
    try:
        r = vfkeep("stop", "--run-dir", str(tmp_path))
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == (f"no host running in {tmp_path}; removed the pidfile of dead host pid {dead.pid} "
                                    f"and sockets nic0.sock and files nvme0.disk, worker-2.stderr left in {tmp_path}")
        assert sorted(os.listdir(tmp_path)) == ["build.stderr", "nic1.sock", "nvme3.disk", "other-app.sock"]
        assert unchanged(tmp_path / "nvme3.disk")
        r = vfkeep("stop", "--run-dir", str(tmp_path))
        assert r.returncode == 0 and r.stdout.strip() == f"no host running in {tmp_path}; nothing to stop", r
    finally:
        live.close()


def test_run_leaves_other_programs_sockets_alone(tmp_path):
    """Item 3: `vfkeep run` unlinked every socket in the run dir, a live one too."""
    stale_socket(tmp_path / "other-app.sock")
    live = live_socket(tmp_path / "guest-agent-0.sock")
    try:
        assert leftovers.remove_leftovers(str(tmp_path)) == []
        assert sorted(os.listdir(tmp_path)) == ["guest-agent-0.sock", "other-app.sock"]
    finally:
        live.close()
    assert leftovers.remove_leftovers(str(tmp_path)) == ["sockets guest-agent-0.sock"]


@pytest.mark.parametrize("cmd", [("run", "--nics", "0"), ("stop",), ("status",)])
def test_an_empty_run_dir_is_refused(tmp_path, cmd):
    """Item 3: `--run-dir ""` meant the current directory (`vfkeep run` then cleaned it up)."""
    (tmp_path / "mine.stderr").write_text("")
    r = vfkeep(*cmd, "--run-dir", "", cwd=tmp_path)
    assert r.returncode == 2, r
    assert "--run-dir" in one_line(r) and "must name a directory" in r.stderr
    assert os.listdir(tmp_path) == ["mine.stderr"]


def test_listen_unix_replaces_only_a_stale_socket(tmp_path):
    """Item 4: the listener unlinked whatever was at its path (a file, a live server's socket)."""
    regular = tmp_path / "x.sock"
    regular.write_text("data")
    with pytest.raises(SocketPathError, match="exists and is not a socket"):
        listen_unix(str(regular))
    assert regular.read_text() == "data"
    live = live_socket(tmp_path / "live.sock")
    try:
        with pytest.raises(SocketPathError, match="another process is listening"):
            listen_unix(str(tmp_path / "live.sock"))
        c = socket.socket(socket.AF_UNIX)
        c.connect(str(tmp_path / "live.sock"))  # still the first server's
        c.close()
    finally:
        live.close()
    stale_socket(tmp_path / "stale.sock")
    sock, _ = listen_unix(str(tmp_path / "stale.sock"))
    sock.close()
    with pytest.raises(SocketPathError, match="cannot create socket .*No such file or directory"):
        listen_unix(str(tmp_path / "missing" / "x.sock"))


@pytest.mark.parametrize("command", ["device", "nvme-device"])
def test_device_refuses_a_socket_path_in_use_with_one_line(tmp_path, command):
    """Items 4 and 7: `vfkeep device --socket` deleted a file or a live device's socket there, and a missing
    directory was a traceback."""
    regular = tmp_path / "x.sock"
    regular.write_text("data")
    live = live_socket(tmp_path / "live.sock")
    try:
        for path, cause in ((regular, "exists and is not a socket"), (tmp_path / "live.sock", "another process"),
                            (tmp_path / "nodir" / "x.sock", "No such file or directory")):
            r = vfkeep(command, "--socket", str(path))
            assert r.returncode == 1, r
            line = one_line(r)
            assert line.startswith(f"vfkeep: {command}: ") and cause in line and str(path) in line, line
        assert regular.read_text() == "data"
        assert sorted(os.listdir(tmp_path)) == ["live.sock", "x.sock"]
    finally:
        live.close()


@pytest.mark.parametrize("args, cause", [
    (("--nvme", "2", "--disk", "{d}/a.img", "--disk", "{d}/a.img"), "two NVMe controllers on one file"),
    (("--nvme", "2", "--disk", "{d}/a.img", "--disk", "{d}/link.img"), "two NVMe controllers on one file"),
    (("--nvme", "2", "--disk", "{d}/run/nvme1.disk"), "sparse file of this run goes"),
    (("--nvme", "1"), "exists and vfkeep did not create it"),
    (("--disk", "{d}/a.img"), "--disk needs --nvme"),
    (("--nvme", "1", "--disk", "{d}/missing/x.img"), "not a file in an existing directory"),
])
def test_run_refuses_disks_that_would_lose_data_before_anything_starts(tmp_path, args, cause):
    """Items 10, 1, 6 and 20: one file for two controllers (bad blocks), the user's file at the run's own
    sparse-file path (replaced), a --disk in a missing directory (failed once devices ran) and --disk without
    --nvme are refused at option checking, exit 2."""
    run = tmp_path / "run"
    run.mkdir()
    user_disk(tmp_path / "a.img")
    os.symlink(tmp_path / "a.img", tmp_path / "link.img")
    user_disk(run / "nvme0.disk")
    user_disk(run / "nvme1.disk")
    r = vfkeep("run", "--run-dir", str(run), "--nics", "0", *(a.format(d=tmp_path) for a in args))
    assert r.returncode == 2, r
    assert cause in one_line(r) and one_line(r).startswith("vfkeep: run: ")
    assert sorted(os.listdir(run)) == ["nvme0.disk", "nvme1.disk"]
    assert unchanged(tmp_path / "a.img") and unchanged(run / "nvme0.disk") and unchanged(run / "nvme1.disk")



@pytest.mark.parametrize("mode", ["--no-console", "--detach"])
def test_a_second_host_starting_in_the_same_run_dir_is_refused(tmp_path, mode):
    """Two `run`s started together both passed the pidfile and socket checks, booted, and their devices fought
    over nic0.sock: one host was left running without its pidfile. The run dir is held (an flock on the directory,
    as a starting host holds it), so a second one stops before anything starts."""
    import fcntl

    from vfkeep import proc

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    held = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
    child = subprocess.Popen(proc.vfkeep_argv("run", "--run-dir", str(run_dir), mode), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        _, err = child.communicate(timeout=60)
    finally:
        os.close(held)
        if child.poll() is None:
            proc.end(child)
        if (run_dir / "host.pid").exists():  # (a host the detach started anyway: ended, and the test fails)
            pid = int((run_dir / "host.pid").read_text())
            os.kill(pid, signal.SIGTERM)
            wait_for(lambda: not pid_alive(pid), 60)
    assert child.returncode == 1 and err == (f"vfkeep: run: a host is already running in {run_dir} (starting); stop "
                                             f"it with `vfkeep stop --run-dir {run_dir}`\n"), err
    assert os.listdir(run_dir) == []


#: `vfkeep run ARGV...` with the real uid root and the effective uid `nobody`: click's check that --run-dir is
#: readable (access(2): the real uid) passes, the open of the run dir for its lock (the effective uid) fails, as any
#: failure that check cannot foresee would (the dir made unreadable in between, no fd left). What `run` loads is
#: loaded first: `nobody` may not read the interpreter's own library under /root.
AS_NOBODY = """
import os, sys
import vfkeep.cli, vfkeep.device.backends, vfkeep.host.commands, vfkeep.host.vmm, vfkeep.netns
os.seteuid(65534)
sys.argv = ["vfkeep", "run", *sys.argv[1:]]
vfkeep.cli.main()
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root, to run `vfkeep run` as a user who may not open the run dir")
def test_a_run_dir_that_cannot_be_locked_is_one_line():
    """Opening the run dir for its lock raised out of `run`: a traceback, not the one line naming the cause."""
    import sys
    import tempfile

    run_dir = tempfile.mkdtemp(prefix="vfkeep-test-lock-", dir="/tmp")  # (root's, 0700: nobody may open it)
    try:
        r = subprocess.run([sys.executable, "-c", AS_NOBODY, "--run-dir", run_dir, "--no-console"], capture_output=True,
                           text=True, timeout=60, stdin=subprocess.DEVNULL)
        left = os.listdir(run_dir)
    finally:
        os.rmdir(run_dir)
    assert r.returncode == 1 and r.stderr == f"vfkeep: run: cannot lock --run-dir {run_dir}: Permission denied\n", r
    assert left == []


def test_the_commands_a_failure_suggests_work_for_a_run_dir_with_a_space(tmp_path):
    """`(vfkeep run --run-dir /tmp/my vm --detach)`: pasted, that started a host in /tmp/my ('vm': an extra
    argument)."""
    import shlex

    run_dir = str(tmp_path / "my vm")
    r = vfkeep("status", "--run-dir", run_dir)
    suggested = r.stderr.split("`")[1]
    assert r.returncode == 1 and shlex.split(suggested) == ["vfkeep", "run", "--run-dir", run_dir, "--detach"], r
