"""Shared fixtures."""
from __future__ import annotations

import atexit
import logging
import os
import shutil
import signal
import tempfile

import pytest
from hypothesis import HealthCheck, settings

from vfkeep import proc
from vfkeep.memory import GuestMemory
from vfkeep.proc import end


SUITE_TMP_ENV = "VFKEEP_SUITE_TMPDIR"

# Property tests assert behaviour, not speed: Hypothesis' 200 ms per-example deadline and its "data generation too
# slow" check fail on a loaded 2-CPU machine (a landing saw test_gdma_codec miss the deadline, then pass alone).
# Loaded here, before the test modules are imported, so every @settings inherits it. Derandomized: each run draws
# the same examples, so a run passes or fails by the code, not by the draw (finding new examples is the fuzz
# campaigns' job, `make fuzz`, which run apart from the suite).
settings.register_profile("vfkeep", deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
settings.load_profile("vfkeep")


def pytest_configure(config):
    """Point TMPDIR (this process and every child) at a directory of the suite's own, so that what any test,
    tool or child leaves in the temp dir is found at the end (pytest's own tmp_path dirs stay where they were
    and are removed for passing tests, see `tmp_path_retention_policy`)."""
    if SUITE_TMP_ENV in os.environ:
        return
    os.environ.setdefault("PYTEST_DEBUG_TEMPROOT", tempfile.gettempdir())
    suite_tmp = tempfile.mkdtemp(prefix="vfks-")
    os.environ[SUITE_TMP_ENV] = os.environ["TMPDIR"] = suite_tmp
    tempfile.tempdir = None  # recomputed from TMPDIR on next use
    config.add_cleanup(lambda: shutil.rmtree(suite_tmp, ignore_errors=True))


@pytest.fixture(autouse=True)
def _interrupt_handlers_restored():
    """A command run in-process (click's CliRunner) installs vfkeep's interrupt handlers (`proc.signals_interrupt`)
    in pytest itself: after one Ctrl-C they ignore the next, and SIGTERM too, for the rest of the session. Each test
    leaves pytest's handlers as it found them, and the exit hook that ignores interrupts unregistered."""
    saved = {sig: signal.getsignal(sig) for sig in proc.INTERRUPTS}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)
    atexit.unregister(proc._ignored_from_exit)


def pytest_sessionfinish(session, exitstatus):
    """The whole suite leaves nothing in the temp dir: anything there now fails the run, named."""
    suite_tmp = os.environ.get(SUITE_TMP_ENV)
    if not suite_tmp or not os.path.isdir(suite_tmp):
        return
    left = sorted(os.listdir(suite_tmp))
    if left:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter:
            reporter.write_line(f"FAILED: the suite left {len(left)} entries in its temp dir {suite_tmp}: "
                                f"{', '.join(left[:20])}", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture
def vfio_testdev(tmp_path):
    """Factory: `start(name="dev", **start_testdev_kwargs) -> (socket_path, proc)` runs the vfio-user
    test device in its own process; every device is ended by its PID at teardown."""
    from vfkeep.vfio_user.testdev import start_testdev

    procs = []

    def start(name: str = "dev", **kwargs):
        sock = tmp_path / f"{name}.sock"
        proc = start_testdev(sock, run_dir=tmp_path, **kwargs)
        procs.append(proc)
        return sock, proc

    yield start
    for proc in procs:
        end(proc)


@pytest.fixture
def mem(request):
    """Guest memory laid out as the test module's LAYOUT (a module that needs more defines its own `mem`)."""
    m = GuestMemory.create(request.module.LAYOUT)
    yield m
    m.close()


@pytest.fixture(scope="module")
def quiet_vfkeep_logs():
    """Only critical vfkeep log lines for a module (fuzz tests: thousands of refused requests are logged,
    and formatting them is most of the run time)."""
    logger = logging.getLogger("vfkeep")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    yield
    logger.setLevel(level)
