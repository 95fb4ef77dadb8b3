"""NVMe manager decisions against the emulator process (spec nvme.md §13.2, issue 13): hostile saved state
takes the fresh path with a typed error and writes nothing outside the device's pages; keepalive disabled
on the new side; NoReset → FLR; OPENHCL_NVME_ALWAYS_FLR."""
import pytest

from vfkeep import proc
from vfkeep.host.tamper import NVME_QUEUE_TAMPERS
from vfkeep.memory import DmaManager, MemoryLayout
from vfkeep.nvme import NVM_WRITE
from vfkeep.nvme_device.main import start_nvme_device
from vfkeep.nvme_driver.errors import DEVICE_ERRORS, InvalidSavedState
from vfkeep.nvme_driver.saved_state import decode, validate
from vfkeep.contract import NvmeConfig
from vfkeep.contract import RestorePath as P
from vfkeep.driver.errors import DeviceMissing
from vfkeep.paravisor import nvme_manager
from vfkeep.paravisor.nvme_manager import always_flr_from_env, create_device
from vfkeep.proto import nvme_driver_pb2
from vfkeep.vfio_user import control_call

LAYOUT = MemoryLayout(guest_pages=64, worker_pages=1024, pool_pages=512)
#: How long the driver waits for CSTS.RDY to change (enable, reset): a wait on the device process, which on a
#: loaded machine took more than 5 s to be scheduled; the wait ends as soon as RDY changes.
READY_S = proc.READY_TIMEOUT_S
BLOCKS = 64


@pytest.fixture
def sock(tmp_path):
    path = str(tmp_path / "nvme0.sock")
    p = start_nvme_device(path, "--run-dir", str(tmp_path), "--size", "1M")
    yield path
    proc.end(p)


def ctl(sock, cmd, **args):
    return control_call(sock + ".ctl", cmd, **args)


def bring_up(sock, mem, **kw):
    dma = DmaManager(mem, strict_pool=False)
    disk = create_device(NvmeConfig(0, "nvme0", sock), mem, dma, cpu_count=2, ready_timeout_s=READY_S,
                         **{"saved": None, "save_restore_supported": True, **kw})
    return dma, disk


def write_pattern(drv, mem, generation: int) -> None:
    ns = drv.namespace(1)
    gpa = mem.layout.guest.gpa
    mem.write(gpa, bytes([generation]) * (BLOCKS * ns.block_size))
    ns.write(0, BLOCKS, gpa)


def read_back(drv, mem) -> bytes:
    ns = drv.namespace(1)
    gpa = mem.layout.guest.gpa + BLOCKS * ns.block_size
    ns.read(0, BLOCKS, gpa)
    return mem.read(gpa, BLOCKS * ns.block_size)


@pytest.fixture
def saved(sock, mem):
    """A controller in use, saved for keepalive: (driver state, DMA manager state)."""
    dma, disk = bring_up(sock, mem)
    write_pattern(disk.driver, mem, 7)
    state = disk.driver.save()
    dma_state = dma.save()
    disk.driver.shutdown()  # after save: the handle closes, nothing is reset or freed
    return state, dma_state


def restore(sock, mem, state, dma_state, **kw):
    dma = DmaManager(mem, strict_pool=False)
    dma.restore(dma_state)
    disk = create_device(NvmeConfig(0, "nvme0", sock), mem, dma, saved=state, cpu_count=2, ready_timeout_s=READY_S,
                         **{"save_restore_supported": True, **kw})
    return dma, disk


def test_keepalive_restore_in_process_reuses_the_queues(sock, mem, saved):
    seq = ctl(sock, "command_log")["last_seq"]
    dma, disk = restore(sock, mem, *saved)
    assert disk.restore_path == P.KEEPALIVE and disk.error is None
    assert read_back(disk.driver, mem) == bytes([7]) * len(read_back(disk.driver, mem))
    assert dma.validate_restore() == []
    assert [e["name"] for e in ctl(sock, "command_log", since=seq)["entries"]] == ["CONNECT"]
    disk.driver.shutdown()


def tamper_admin_pfn_into_guest_ram(s, mem):
    s.worker_data.admin.base_pfn = mem.layout.guest.base_pfn


def tamper_io_pfn_elsewhere_in_pool(s, mem):
    s.worker_data.io[0].queue_data.base_pfn = mem.layout.pool.end_pfn - 69


def tamper_qid_zero(s, mem):
    q = s.worker_data.io[1].queue_data
    q.qid = q.handler_data.sq_state.sqid = q.handler_data.cq_state.cqid = 0


def tamper_cid_duplicate(s, mem):
    cmds = s.worker_data.admin.handler_data.pending_cmds.commands
    cmds.add(command=cmds[0].command)


def tamper_await_aen_cid(s, mem):
    s.worker_data.admin.handler_data.aer_handler.await_aen_cid ^= 0x3FF


def tamper_sq_tail_out_of_ring(s, mem):
    s.worker_data.io[0].queue_data.handler_data.sq_state.tail = 256


def tamper_vector(s, mem):
    s.worker_data.io[0].iv = 4096


def tamper_short_identify(s, mem):
    s.identify_ctrl = s.identify_ctrl[:100]


TAMPERS = [tamper_admin_pfn_into_guest_ram, tamper_io_pfn_elsewhere_in_pool, tamper_qid_zero, tamper_cid_duplicate,
           tamper_await_aen_cid, tamper_sq_tail_out_of_ring, tamper_vector, tamper_short_identify]


@pytest.mark.parametrize("tamper", [*TAMPERS, *NVME_QUEUE_TAMPERS],  # and the host's `--tamper nvme-*` modes
                         ids=lambda t: t if isinstance(t, str) else t.__name__.removeprefix("tamper_"))
def test_hostile_saved_state_takes_the_fresh_path_and_writes_nothing_outside_the_device(sock, mem, saved, tamper):
    state, dma_state = saved
    bad = nvme_driver_pb2.NvmeDriverSavedState()
    bad.CopyFrom(state)
    if isinstance(tamper, str):
        NVME_QUEUE_TAMPERS[tamper](bad, mem.layout)
    else:
        tamper(bad, mem)
    outside = (mem.read(mem.layout.guest.gpa, mem.layout.guest.size),
               mem.read(mem.layout.worker.gpa, mem.layout.worker.size))
    dma, disk = restore(sock, mem, bad, dma_state)
    assert disk.restore_path == P.FALLBACK
    assert "InvalidSavedState" in disk.error or "RestoredMemoryNotFound" in disk.error, disk.error
    assert (mem.read(mem.layout.guest.gpa, mem.layout.guest.size),
            mem.read(mem.layout.worker.gpa, mem.layout.worker.size)) == outside
    assert read_back(disk.driver, mem) == bytes([7]) * (BLOCKS * 512)  # the disk works, data kept
    assert dma.validate_restore() == []  # the saved queue memory was re-attached and freed, none leaked
    assert dma.inspect()["pool"]["devices"] == {"nvme_nvme0": 3 * 69}
    disk.driver.shutdown()


def controller_pages(sock) -> set[int]:
    """Every page the controller's queues occupy, as the controller itself addresses them (SQE 64, CQE 16 B)."""
    st = ctl(sock, "state")
    queues = [(q["base"], q["size"] * 64) for q in st["sqs"]] + [(q["base"], q["size"] * 16) for q in st["cqs"]]
    return {pfn for base, size in queues for pfn in range(base >> 12, (base + size + 4095) >> 12)}


def allocatable_pool_pages(dma) -> set[int]:
    """Every pool page a new allocation can still get: the pages of the free slots (first fit takes only those)."""
    return {pfn for slot in dma.inspect()["pool"]["slot_table"] if slot["state"] == "free"
            for pfn in range(slot["base_pfn"], slot["base_pfn"] + slot["pages"])}


def test_a_fallback_that_cannot_reset_the_controller_never_hands_its_pages_out(sock, mem, saved, monkeypatch):
    """The keepalive restore fails and so does every fresh init (the function cannot be reached), after the
    saved pages were freed (the spec's order): the controller, still enabled, may write its queues there, so
    those pages are quarantined until a fresh init of the controller resets it (they were handed out)."""
    state, dma_state = saved
    queues = controller_pages(sock)
    assert ctl(sock, "state")["enabled"] and queues
    dma = DmaManager(mem, strict_pool=False)
    dma.restore(dma_state)

    def unreachable(*args, **kwargs):  # (as a missing socket does after its 5 s connect retries)
        raise DeviceMissing("cannot connect: the function does not answer")
    with monkeypatch.context() as m, pytest.raises(DEVICE_ERRORS):
        m.setattr(nvme_manager, "open_vfio", unreachable)
        m.setattr(nvme_manager, "reset_method_setter", unreachable)
        create_device(NvmeConfig(0, "nvme0", sock), mem, dma, saved=state, save_restore_supported=True,
                      cpu_count=2, ready_timeout_s=READY_S)
    assert ctl(sock, "state")["enabled"] and controller_pages(sock) == queues  # it still runs them
    free = allocatable_pool_pages(dma)
    assert free and not free & queues
    assert dma.inspect()["pool"]["leaked_pages"] == 3 * 69 and dma.validate_restore() == []
    disk = create_device(NvmeConfig(0, "nvme0", sock), mem, dma, saved=None, save_restore_supported=True,
                         cpu_count=2, ready_timeout_s=READY_S)  # a later fresh init resets it: the pages come back
    assert disk.restore_path == P.FRESH and dma.inspect()["pool"]["leaked_pages"] == 0
    assert read_back(disk.driver, mem) == bytes([7]) * (BLOCKS * 512)
    disk.driver.shutdown()
    assert len(allocatable_pool_pages(dma)) == LAYOUT.pool_pages


def test_a_fallback_whose_fresh_init_fails_leaves_the_controller_disabled_and_frees_its_pages(sock, mem, saved):
    """Every fresh init fails after the controller was reset (IDENTIFY refused): it ends disabled, so the saved
    pages are free again, not quarantined."""
    state, dma_state = saved
    state = nvme_driver_pb2.NvmeDriverSavedState.FromString(state.SerializeToString())
    tamper_vector(state, mem)  # the keepalive restore refuses it: the fallback
    ctl(sock, "admin_fault", opcode="IDENTIFY", action="fail", mode="always", cdw10=1)
    dma = DmaManager(mem, strict_pool=False)
    dma.restore(dma_state)
    with pytest.raises(DEVICE_ERRORS):
        create_device(NvmeConfig(0, "nvme0", sock), mem, dma, saved=state, save_restore_supported=True,
                      cpu_count=2, ready_timeout_s=READY_S)
    st = ctl(sock, "state")
    assert not st["enabled"] and not st["ready"] and st["sqs"] == [] and st["cqs"] == []
    assert dma.inspect()["pool"]["leaked_pages"] == 0
    assert len(allocatable_pool_pages(dma)) == LAYOUT.pool_pages


def test_truncated_blob_is_a_typed_error():
    with pytest.raises(InvalidSavedState):
        decode(b"\x0a\xff\xff")


def test_keepalive_disabled_on_the_new_side_frees_buffers_and_resets(sock, mem, saved):
    seq = ctl(sock, "command_log")["last_seq"]
    dma, disk = restore(sock, mem, *saved, save_restore_supported=False)
    assert disk.restore_path == P.FRESH and not disk.flr
    names = [e["name"] for e in ctl(sock, "command_log", since=seq)["entries"]]
    disable = names.index("CC_DISABLE")
    assert names.index("CC_ENABLE") > disable and "IDENTIFY" in names and "CREATE_IO_CQ" in names
    assert dma.inspect()["pool"]["allocated_pages"] == 0  # pending buffers freed; the new client is ephemeral
    assert dma.validate_restore() == []
    assert read_back(disk.driver, mem) == bytes([7]) * (BLOCKS * 512)
    disk.driver.shutdown()


def test_noreset_failure_retries_with_flr_and_restores_none(sock, mem):
    ctl(sock, "admin_fault", opcode="IDENTIFY", action="fail", mode="once", cdw10=1)
    dma, disk = bring_up(sock, mem)
    assert disk.restore_path == P.FRESH and disk.flr
    assert ctl(sock, "counters")["counters"]["reset_count"] == 1
    assert ctl(sock, "get_reset_method")["value"] == "none"
    write_pattern(disk.driver, mem, 3)
    assert read_back(disk.driver, mem) == bytes([3]) * (BLOCKS * 512)
    disk.driver.shutdown()


def test_always_flr(sock, mem):
    assert always_flr_from_env({"OPENHCL_NVME_ALWAYS_FLR": "TRUE"})
    assert always_flr_from_env({"OPENHCL_NVME_ALWAYS_FLR": "1"})
    assert not always_flr_from_env({"OPENHCL_NVME_ALWAYS_FLR": "yes"})
    dma, disk = bring_up(sock, mem, always_flr=True)
    assert disk.flr and ctl(sock, "counters")["counters"]["reset_count"] == 1
    assert ctl(sock, "get_reset_method")["value"] == "flr"  # not switched back with ALWAYS_FLR
    disk.driver.shutdown()


def test_validate_accepts_a_real_state(saved):
    validate(decode(saved[0].SerializeToString()), msix_count=16, cpu_count=2)


def test_pending_overflow_names_what_the_queue_holds(saved):
    """A queue of N entries holds N - 1 commands (one entry stays empty, spec nvme.md §4): the message says
    so rather than "N do not fit an N-entry queue"."""
    bad = nvme_driver_pb2.NvmeDriverSavedState()
    bad.CopyFrom(saved[0])
    NVME_QUEUE_TAMPERS["nvme-pending-overflow"](bad, LAYOUT)
    with pytest.raises(InvalidSavedState) as e:
        validate(bad, msix_count=16, cpu_count=2)
    assert "admin queue: 256 pending commands, more than the 255 a 256-entry queue holds" in str(e.value)


def test_state_decode_shows_field_10000_with_every_nvme_field(tmp_path, saved):
    from vfkeep.host.decode import decode_file
    from vfkeep.paravisor.nvme_manager import saved_driver_states
    from vfkeep.proto import underhill_pb2

    state, _ = saved
    blob = underhill_pb2.ServicingState()
    manager = blob.init_state.nvme_state.nvme_state
    manager.cpu_count = 2
    manager.nvme_disks.add(pci_id="nvme0").driver_state.CopyFrom(state)
    raw = blob.SerializeToString()
    assert b"\x82\xf1\x04" in raw  # field 10000, wire type 2 (spec §7.1)
    path = tmp_path / "state.bin"
    path.write_bytes(raw)
    decoded = decode_file(str(path))
    assert decoded["summary"]["nvme_state"] == ["nvme0"]
    disk = decoded["state"]["init_state"]["nvme_state"]["nvme_state"]["nvme_disks"][0]
    worker = disk["driver_state"]["worker_data"]
    assert len(disk["driver_state"]["identify_ctrl"]) == 2 * 4096
    assert set(worker) == {"admin", "io", "qsize", "max_io_queues", "allow_lazy_restore"}
    admin = worker["admin"]
    assert set(admin) == {"mem_len", "base_pfn", "sq_entries", "cq_entries", "handler_data"}  # qid 0 is default
    assert set(admin["handler_data"]) == {"sq_state", "cq_state", "pending_cmds", "aer_handler"}
    assert "await_aen_cid" in admin["handler_data"]["aer_handler"]
    assert {q["queue_data"]["qid"] for q in worker["io"]} == {1, 2}
    assert saved_driver_states(blob) == ({"nvme0": state}, 2)
    assert saved_driver_states(underhill_pb2.ServicingState()) == ({}, 0)  # a previous release's blob


def test_completions_written_during_the_handover_are_reaped_without_an_interrupt(sock, mem, monkeypatch):
    """A command completes after the old driver stopped listening (its interrupt went to the old eventfd):
    the restored driver must find the CQE by itself, not wait for a sweep."""
    import vfkeep.nvme_driver.driver as driver_mod
    monkeypatch.setattr(driver_mod, "POLL_INTERVAL_S", 60.0)
    dma, disk = bring_up(sock, mem)
    ctl(sock, "io_stall", on=True)
    disk.driver.namespace(1)
    disk.driver.submit_io(NVM_WRITE, 1, 0, 1, mem.layout.guest.gpa, 512, lambda s, d: None, cpu=0)
    assert ctl(sock, "state")["stalled_io"] == 1
    state = disk.driver.save()
    ctl(sock, "io_stall", on=False)  # completes now: CQE written, interrupt raised on the old eventfd
    assert ctl(sock, "counters")["counters"]["cqes_posted"] >= 1
    dma_state = dma.save()
    disk.driver.shutdown()
    dma2, disk2 = restore(sock, mem, state, dma_state)
    assert disk2.restore_path == P.KEEPALIVE
    assert disk2.driver.wait_drained(10)
    disk2.driver.shutdown()


def wait_until(pred, timeout=10.0):
    import time
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def test_namespace_change_in_the_window_completes_the_saved_aer(sock, mem, saved):
    """servicing_keepalive_with_namespace_update: the change happens between save and restore; the AER the
    old driver left outstanding completes for the new one, which reads the log page and rescans."""
    state, dma_state = saved
    ctl(sock, "namespace_change", nsid=1)  # no driver attached: the AEN waits in the held AER's completion
    seq = ctl(sock, "command_log")["last_seq"]
    dma, disk = restore(sock, mem, state, dma_state)
    assert disk.restore_path == P.KEEPALIVE
    wait_until(lambda: disk.driver.counters["namespace_rescans"] == 1)
    names = [e["name"] for e in ctl(sock, "command_log", since=seq)["entries"]]
    assert names[:4] == ["CONNECT", "GET_LOG_PAGE", "IDENTIFY", "ASYNC_EVENT_REQUEST"], names
    assert disk.driver.counters["aens"] == 1
    disk.driver.shutdown()


def test_delayed_create_io_cq_slows_the_fresh_init(sock, mem):
    ctl(sock, "admin_fault", opcode="CREATE_IO_CQ", action="delay", ms=300, mode="always")
    import time
    t = time.monotonic()
    dma, disk = bring_up(sock, mem)
    assert time.monotonic() - t >= 0.6  # two IO queues
    creates = [e for e in ctl(sock, "command_log")["entries"] if e["name"] == "CREATE_IO_CQ"]
    assert [e["injected"] for e in creates] == ["delay", "delay"] and all(e["status"] == 0 for e in creates)
    disk.driver.shutdown()


def test_surprise_removal_fails_pending_io_and_the_driver_reports_the_device_gone(sock, mem):
    dma, disk = bring_up(sock, mem)
    statuses = []
    ctl(sock, "io_stall", on=True)
    disk.driver.namespace(1)
    disk.driver.submit_io(NVM_WRITE, 1, 0, 1, mem.layout.guest.gpa, 512, lambda s, d: statuses.append(s))
    ctl(sock, "surprise_removal", on=True)
    from vfkeep.nvme_driver.driver import read_csts
    from vfkeep.nvme_driver.errors import DeviceGone
    with pytest.raises(DeviceGone):
        read_csts(disk.driver.backing, "nvme0")
    disk.driver.shutdown()  # the reset fails (device gone): teardown goes on
    assert statuses == []  # never completed, never completed twice
    ctl(sock, "surprise_removal", on=False)


def test_a_teardown_whose_reset_does_not_complete_keeps_the_queue_memory(tmp_path, mem):
    """Shutdown resets the controller, then frees its queues' pages; when the reset does not complete (RDY stays
    1 past the driver's timeout), the controller may still write them, so they stay allocated (the reference
    keeps its VFIO handle then) instead of going back to the allocator for the next buffer."""
    path = str(tmp_path / "nvme0.sock")
    p = start_nvme_device(path, "--run-dir", str(tmp_path), "--size", "1M", "--disable-ms", "600000")
    try:
        dma = DmaManager(mem, strict_pool=False)
        disk = create_device(NvmeConfig(0, "nvme0", path), mem, dma, saved=None, save_restore_supported=True,
                             cpu_count=2, ready_timeout_s=READY_S)  # (the enable: RDY=1 comes when it comes)
        disk.driver.ready_timeout_s = 0.3  # the reset's wait, which the disable (10 minutes) outlasts
        queues = controller_pages(path)
        assert queues and not allocatable_pool_pages(dma) & queues
        disk.driver.shutdown()
        assert ctl(path, "state")["ready"]  # the disable has not finished
        assert not allocatable_pool_pages(dma) & queues
    finally:
        proc.end(p)


def test_a_teardown_whose_reset_completes_frees_the_queue_memory(sock, mem):
    dma, disk = bring_up(sock, mem)
    assert len(allocatable_pool_pages(dma)) < LAYOUT.pool_pages
    disk.driver.shutdown()
    assert not ctl(sock, "state")["ready"] and len(allocatable_pool_pages(dma)) == LAYOUT.pool_pages
