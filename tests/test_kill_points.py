"""Kill anywhere (issue 15 item 2): a worker SIGKILLed at each named point of its save or restore
(`vfkeep.kill_points.POINTS`) leaves every NIC working, the pool holding exactly the live NICs' persistent
allocations, every page a device uses owned by that NIC, no process behind and no traceback in any log.

Real processes: one `vfkeep run` host with two NICs (`tests/servicing_helpers.py`), one servicing per point,
the point handed over as `service(kill_point=...)` like `vfkeep service --kill-point`."""
import ast
import pathlib

import pytest

from servicing_helpers import HostRun, check_invariants, wait_settled
from vfkeep import kill_points, rpc

NICS = 2
HWC_POOL_PAGES = 6
KEPT_VPORT_POOL_PAGES = 202

#: Per point: the servicing's status and the paths a NIC may take. A save killed before the devices were saved
#: leaves no state (fresh; the live HWC makes NoReset fail, so FLR); once the whole state was sent, the host has
#: it. A restore killed before the devices were touched is replayed by a replacement with the same state
#: (keepalive); once a NIC's HWC moved on, the replacement's first request on the saved HWC fails and that NIC
#: takes the FLR fallback (NICs restore concurrently, so the other NIC may be on either side).
EXPECTED = {
    "save.requested": ("failed", {"fresh"}),
    "save.io_stopped": ("failed", {"fresh"}),
    "save.dma_saved": ("failed", {"fresh"}),
    "save.vports_closed": ("failed", {"fresh"}),
    "save.devices_saved": ("failed", {"fresh"}),
    "save.state_sent": ("ok", {"keepalive"}),
    "save.answered": ("ok", {"keepalive"}),
    "restore.before_state": ("failed", {"keepalive"}),
    "restore.state_received": ("failed", {"keepalive"}),
    "restore.dma_restored": ("failed", {"keepalive"}),
    "restore.pool_buffers_attached": ("failed", {"keepalive", "fallback"}),
    "restore.hwc": ("failed", {"keepalive", "fallback"}),
    "restore.vport": ("failed", {"keepalive", "fallback"}),
    "restore.validated": ("failed", {"keepalive", "fallback"}),
    "restore.started": ("ok", {"keepalive"}),
}


def test_every_named_point_is_reached_once_in_the_code_and_tested():
    """The list beside the code is the code: each `kill_points.reached(NAME)` names a listed point, each
    listed point is reached at exactly one place, and this test module covers each."""
    src = pathlib.Path(kill_points.__file__).parent
    reached = []
    for path in src.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "reached" \
                    and getattr(node.func.value, "id", None) == "kill_points":
                reached.append(node.args[0].value)
    assert sorted(reached) == sorted(kill_points.POINTS)
    assert set(EXPECTED) == set(kill_points.POINTS)
    assert list(kill_points.POINTS) == [*kill_points.SAVE_POINTS, *kill_points.RESTORE_POINTS]


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    h = HostRun(tmp_path_factory.mktemp("kill") / "run", nics=NICS)
    yield h
    h.stop()


def killed_generation(host: HostRun, point: str) -> int:
    """The worker a point kills: the current one for a save point, the next one (prelaunched) for a restore
    point."""
    gen = host.status()["worker"]["generation"]
    return gen if point in kill_points.SAVE_POINTS else gen + 1


def assert_killed_at(host: HostRun, generation: int, point: str) -> None:
    log = host.worker_log(generation)
    assert f'msg="test hook: kill point reached, SIGKILL" point={point}' in log, log[-3000:]


@pytest.mark.parametrize("point", list(kill_points.POINTS))
def test_worker_killed_at_point_leaves_every_nic_working(host, point):
    killed = killed_generation(host, point)
    result = host.service(mana_keepalive=True, kill_point=point)
    assert_killed_at(host, killed, point)
    status, paths = EXPECTED[point]
    assert result["status"] == status, result
    assert {n["restore_path"] for n in result["nics"]} <= paths, result
    wait_settled(host, killed)
    check_invariants(host, NICS, HWC_POOL_PAGES)
    # And the next servicing is an ordinary keepalive one.
    after = host.service(mana_keepalive=True)
    assert after["status"] == "ok" and {n["restore_path"] for n in after["nics"]} == {"keepalive"}, after


def test_unknown_kill_point_is_refused(host):
    with pytest.raises(rpc.Refused, match="unknown kill point 'save.nowhere'"):
        host.service(mana_keepalive=True, kill_point="save.nowhere")


@pytest.fixture(scope="module")
def datapath_host(tmp_path_factory):
    h = HostRun(tmp_path_factory.mktemp("kill-dp") / "run", "--datapath-keepalive", nics=1)
    yield h
    h.stop()


@pytest.mark.parametrize("point", ["save.vports_closed", "restore.pool_buffers_attached", "restore.hwc",
                                   "restore.validated", "restore.started"])
def test_kept_vport_worker_killed_at_point_leaves_the_nic_working(datapath_host, point):
    """Data-path keepalive (DESIGN D7): the kept vport's pool blocks are accounted for whatever point the
    worker died at (the HWC probe runs after the relay restarted: `restore.hwc` is then reached last)."""
    killed = killed_generation(datapath_host, point)
    datapath_host.service(mana_keepalive=True, kill_point=point)
    assert_killed_at(datapath_host, killed, point)
    wait_settled(datapath_host, killed)
    check_invariants(datapath_host, 1, HWC_POOL_PAGES + KEPT_VPORT_POOL_PAGES)
