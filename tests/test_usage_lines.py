"""Bad usage is exit 2 with one line naming the command (new-user review item 20)."""
import pytest

from helpers import vfkeep
from servicing_helpers import HostRun


def test_a_bad_log_level_names_the_command_it_was_for():
    r = vfkeep("--log-level", "loud", "status")
    assert r.returncode == 2
    assert r.stderr.strip() == ("vfkeep: status: Invalid value for '--log-level': 'loud' is not one of 'debug', "
                                "'info', 'warning', 'error'. (`vfkeep --help`)"), r.stderr


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    h = HostRun(tmp_path_factory.mktemp("usage") / "run", "--ring-slots", "256")
    yield h
    h.stop()


def test_an_nvme_tamper_on_a_host_without_nvme_is_refused(host):
    """It tampered nothing, silently, and the servicing passed for a tampered one."""
    r = host.cli("service", "--run-dir", host.run_dir, "--tamper", "nvme-mem-len")
    assert r.returncode == 2 and r.stderr.startswith("vfkeep: service: Invalid value for --tamper: nvme-mem-len "
                                                     "damages saved NVMe controllers; the host has none"), r.stderr
    assert host.status()["servicings"] == 0


@pytest.mark.parametrize("args, cause", [(("0", "257"), "257 frames do not fit the 256-slot ring"),
                                         (("0", "0"), "0 is not in the range x>=1"),
                                         (("1",), "NIC 1 out of range: the host has 1 NIC(s)")])
def test_a_probe_out_of_range_is_bad_usage(host, args, cause):
    """`probe 0 100000` was exit 1 (refused by the host), `probe 0 0` exit 2."""
    r = host.cli("probe", "--run-dir", host.run_dir, *args)
    assert r.returncode == 2 and r.stderr.startswith("vfkeep: probe: ") and cause in r.stderr, r.stderr


def test_a_second_traffic_start_says_it_re_paced(host):
    """It restarted at the default rate without a word."""
    try:
        assert host.cli("traffic", "start", "--run-dir", host.run_dir, "--rate", "500").returncode == 0
        r = host.cli("traffic", "start", "--run-dir", host.run_dir)
        assert r.returncode == 0 and r.stdout.strip().endswith("; re-paced: it was running at 500 frames/s"), r
    finally:
        host.traffic("stop")


NOT_FINITE = [("service", "--timeout", "nan"), ("service", "--timeout", "inf"), ("stop", "--timeout", "nan"),
              ("events", "--timeout", "nan"), ("exec", "--timeout", "nan", "0", "true"),
              ("traffic", "start", "--rate", "nan"), ("traffic", "stats", "--settle-ms", "nan"),
              ("disk", "start", "--rate", "nan"), ("run", "--hwc-latency-ms", "nan"), ("demo", "--rate", "nan")]


@pytest.mark.parametrize("argv", NOT_FINITE, ids=" ".join)
def test_a_number_that_is_not_finite_is_bad_usage(tmp_path, argv):
    """nan passed every range check: `service --timeout nan` was the host's internal error, `stop --timeout nan`
    would never give up, `traffic start --rate nan` the agent's refusal (exit 1)."""
    r = vfkeep(*argv, "--run-dir" if argv[0] != "demo" else "--out", str(tmp_path / "x"))
    name = " ".join(argv[:2]) if argv[0] in ("traffic", "disk") else argv[0]
    assert r.returncode == 2 and r.stderr.startswith(f"vfkeep: {name}: Invalid value for ") \
        and f"{argv[-1] if argv[0] != 'exec' else 'nan'!r} is not a finite number" in r.stderr, r.stderr
    assert not (tmp_path / "x").exists()
