"""NvmeManager across a worker handover, in the worker's save order (servicing §2.2: DMA manager state, then
NVMe), with guest IO on the block channel: keepalive, NVMe not kept alive while the pool snapshot is taken
(mixed flags, DESIGN D8), a blob without field 10000 (previous release), strict pool mode."""
import json
import time

import pytest

from vfkeep import proc
from vfkeep.contract import NvmeConfig
from vfkeep.contract import RestorePath as P
from vfkeep.guest.block import BlockChannel, BlockLayout
from vfkeep.guest.disk_io import DiskIo
from vfkeep.memory import DmaManager, MemoryLayout, UnrestoredAllocations
from vfkeep.nvme_device.main import start_nvme_device
from vfkeep.paravisor.nvme_manager import NvmeManager
from vfkeep.proto import underhill_pb2
from vfkeep.vfio_user import control_call

LAYOUT = MemoryLayout(guest_pages=160, worker_pages=1024, pool_pages=512)
BLOCKS = BlockLayout(disks=1, slots=64, data_pages=64, base_gpa=0)
TRIPWIRES = {"CREATE_IO_CQ", "CREATE_IO_SQ", "IDENTIFY", "ASYNC_EVENT_REQUEST", "CC_ENABLE", "CC_DISABLE"}


@pytest.fixture
def rig(tmp_path, mem):
    sock = str(tmp_path / "nvme0.sock")
    dev = start_nvme_device(sock, "--run-dir", str(tmp_path), "--size", "4M")
    channel = BlockChannel.create(mem, BLOCKS, 0)
    io = DiskIo(channel, mem, lbas=2048)
    yield sock, channel, io
    io.close()
    proc.end(dev)
    channel.close()


def generation(mem, sock, channel, *, keepalive_enabled=True, strict=False):
    dma = DmaManager(mem, strict_pool=strict)
    return dma, NvmeManager([NvmeConfig(0, "nvme0", sock)], mem, dma, keepalive_enabled=keepalive_enabled,
                            channels={"nvme0": channel})


def handover(mem, dma, mgr, nvme_keepalive: bool, *, with_nvme_field=True) -> underhill_pb2.ServicingState:
    """The old worker's save, in order: DMA manager state (a keepalive is effective), then NVMe, then units."""
    state = underhill_pb2.ServicingState()
    state.init_state.dma_manager_state.CopyFrom(dma.save())
    nvme, _ = mgr.save(nvme_keepalive)
    if nvme is not None and with_nvme_field:
        state.init_state.nvme_state.nvme_state.CopyFrom(nvme)
    state.units.extend(mgr.units())
    mgr.shutdown()  # the old process goes away: saved drivers only close their handle
    mem.scrub_worker_ram()
    return state


def wait_completed(io, n, mgr, timeout=30):
    deadline = time.monotonic() + timeout
    while io.counters["completed"] < n:
        if time.monotonic() >= deadline:
            pytest.fail(f"IO stalled: {json.dumps({'io': io.stats(), 'manager': mgr.inspect()}, default=str)}")
        time.sleep(0.01)


def run(rig, mem, nvme_keepalive, **kw):
    sock, channel, io = rig
    dma, mgr = generation(mem, sock, channel)
    assert mgr.restore(None)[0]["restore_path"] == P.FRESH
    mgr.start()
    control_call(sock + ".ctl", "io_delay", ms=10)
    io.start(qd=16, read_pct=30)
    wait_completed(io, 300, mgr)
    seq = control_call(sock + ".ctl", "command_log")["last_seq"]
    state = handover(mem, dma, mgr, nvme_keepalive, with_nvme_field=kw.pop("with_nvme_field", True))
    dma2, mgr2 = generation(mem, sock, channel, **kw)
    dma2.restore(state.init_state.dma_manager_state)
    results = mgr2.restore(state)
    mgr2.start()
    control_call(sock + ".ctl", "clear_faults")
    wait_completed(io, io.counters["completed"] + 300, mgr2)
    io.stop()
    assert io.wait_idle(30)
    io.verify_all()
    stats = io.stats()
    assert stats["errors"] == stats["verify_errors"] == stats["duplicates"] == stats["outstanding"] == 0
    window = [e["name"] for e in control_call(sock + ".ctl", "command_log", since=seq)["entries"]]
    return dma2, mgr2, results, window, state


def test_keepalive_handover_with_guest_io(rig, mem):
    dma, mgr, results, window, state = run(rig, mem, nvme_keepalive=True)
    assert results == [{"pci_id": "nvme0", "restore_path": P.KEEPALIVE, "flr": False, "error": None}]
    assert not TRIPWIRES & set(window), window
    assert state.init_state.HasField("nvme_state") and [u.name for u in state.units] == ["storvsp/nvme0"]
    assert dma.validate_restore() == []
    assert mgr.inspect()["disks"][0]["relay"]["replayed"] > 0  # guest requests in flight at the save
    mgr.shutdown()


def test_nvme_not_kept_alive_while_the_pool_snapshot_holds_its_pages(rig, mem):
    """Mixed flags (only the other device kept alive): NVMe is reset and re-initialised fresh; its stale pool
    pages are freed and listed by the validation; nothing leaks."""
    dma, mgr, results, window, state = run(rig, mem, nvme_keepalive=False)
    assert results[0]["restore_path"] == P.FRESH and not state.init_state.HasField("nvme_state")
    assert "CC_DISABLE" in window and "CC_ENABLE" in window
    unclaimed = dma.validate_restore()
    assert [(u.device, u.pages) for u in unclaimed] == [("nvme_nvme0", 69)] * 3
    assert dma.inspect()["pool"]["devices"] == {"nvme_nvme0": 3 * 69}  # only the new controller's queues
    mgr.shutdown()


def test_strict_pool_reports_the_stale_nvme_pages(rig, mem):
    dma, mgr, results, window, state = run(rig, mem, nvme_keepalive=False, strict=True)
    with pytest.raises(UnrestoredAllocations) as e:
        dma.validate_restore()
    assert {a.device for a in e.value.allocations} == {"nvme_nvme0"}
    mgr.shutdown()


def test_blob_without_field_10000_restores_nvme_fresh(rig, mem):
    """A previous release's blob carries no NVMe state: the controller (left running by a keepalive save)
    is initialised fresh; its queue pages in the snapshot are freed by the validation."""
    dma, mgr, results, window, state = run(rig, mem, nvme_keepalive=True, with_nvme_field=False)
    assert results[0]["restore_path"] == P.FRESH
    assert {u.device for u in dma.validate_restore()} == {"nvme_nvme0"}
    mgr.shutdown()


def test_keepalive_disabled_on_the_new_side(rig, mem):
    dma, mgr, results, window, state = run(rig, mem, nvme_keepalive=True, keepalive_enabled=False)
    assert results[0]["restore_path"] == P.FRESH
    assert window.index("CC_DISABLE") < window.index("CC_ENABLE")
    assert dma.validate_restore() == []  # the saved pages were attached and freed before the fresh init
    mgr.shutdown()
