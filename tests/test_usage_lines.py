"""Bad usage is exit 2 with one line naming the command (new-user review item 20)."""
import subprocess

from servicing_helpers import HostRun
from vfkeep import proc


def vfkeep(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(proc.vfkeep_argv(*args), capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)


def test_a_bad_log_level_names_the_command_it_was_for():
    r = vfkeep("--log-level", "loud", "status")
    assert r.returncode == 2
    assert r.stderr.strip() == ("vfkeep: status: Invalid value for '--log-level': 'loud' is not one of 'debug', "
                                "'info', 'warning', 'error'. (`vfkeep --help`)"), r.stderr


def test_an_nvme_tamper_on_a_host_without_nvme_is_refused(tmp_path):
    """It tampered nothing, silently, and the servicing passed for a tampered one."""
    h = HostRun(tmp_path / "run")
    try:
        r = h.cli("service", "--run-dir", h.run_dir, "--tamper", "nvme-mem-len")
        assert r.returncode == 2 and r.stderr.startswith("vfkeep: service: Invalid value for --tamper: "
                                                         "nvme-mem-len damages saved NVMe controllers; the host has "
                                                         "none"), r.stderr
        assert h.status()["servicings"] == 0
    finally:
        h.stop()
