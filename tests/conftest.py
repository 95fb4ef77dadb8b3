"""Shared fixtures."""
from __future__ import annotations

import logging

import pytest

from vfkeep.memory import GuestMemory
from vfkeep.proc import end


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
