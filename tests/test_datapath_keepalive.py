"""Data-path keepalive (DESIGN D7, opt-in): the vport's queues and packet buffers live in the private pool and
survive a keepalive servicing; no queue is destroyed or created, nothing is lost, and a hostile kept-vport
state takes the fallback path. Default behaviour (option off) is covered by the existing servicing tests."""
import json
from types import SimpleNamespace

import pytest

from driver_helpers import InProcessBench, loopback, same_payloads
from driver_helpers import numbered_frames as frames
from servicing_helpers import HostRun, until_accounted
from test_traffic_host import DEVICE_DROPS
from vfkeep.contract import NicConfig, RestorePath
from vfkeep.driver.errors import HwcTimeout, RestoreError
from vfkeep.driver.mana import ManaDevice
from vfkeep.memory import DmaManager, GuestMemory, MemoryLayout
from vfkeep.paravisor import vf_manager
from vfkeep.paravisor.vf_manager import KEPT_VPORT, fresh_mana_device, release_nic_buffers
from vfkeep.proto import mana_driver_pb2

LAYOUT = MemoryLayout(guest_pages=16, worker_pages=512, pool_pages=512)  # room for two kept vports
#: Device commands that build or tear down a vport's data path: none may run in a data-path keepalive window.
QUEUE_COMMANDS = ("CREATE_QUEUE", "CREATE_WQ_OBJ", "DESTROY_WQ_OBJ", "DISABLE_QUEUE", "CONFIG_VPORT_RX",
                  "DMA_REGION")


def queue_commands(names):
    return [n for n in names if any(c in n for c in QUEUE_COMMANDS)]


@pytest.fixture
def mem():
    m = GuestMemory.create(LAYOUT)
    yield m
    m.close()


@pytest.fixture
def bench(mem):
    b = InProcessBench(mem)
    yield b
    b.device.close()


def kept_after_traffic(bench, mem, undelivered: int = 0):
    """Fresh device, persistent vport that passed traffic and holds `undelivered` received frames, saved;
    returns (state, queue ids, restored DmaManager, the undelivered frames)."""
    dma = DmaManager(mem, strict_pool=True)
    dev = ManaDevice.new(bench.connect(dma, "nic0"), "nic0")
    vport = dev.open_vport(0, KEPT_VPORT, persistent=True)
    assert (vport.data._tx_nbuf, vport.data._rx_nbuf) == (128, 256)
    assert len(loopback(vport, frames(300))) == 300
    pending = frames(undelivered, 96)
    assert vport.data.send(pending) == undelivered  # looped back into posted RX buffers, not taken
    ids = vport.queue_ids()
    dma_state = dma.save()  # the pool snapshot before the device save (servicing spec 2.2)
    state = dev.save()
    mem.scrub_worker_ram()
    new_dma = DmaManager(mem, strict_pool=True)
    new_dma.restore(dma_state)
    return state, ids, new_dma, pending


def test_kept_vport_resumes_without_queue_commands(bench, mem):
    seq = bench.device.command_log.seq
    state, ids, dma, pending = kept_after_traffic(bench, mem, undelivered=20)
    (v,) = state.vports
    assert (v.tx_buffers, v.rx_buffers, len(v.mem)) == (128, 256, 7)
    dev = ManaDevice.restore(bench.connect(dma, "nic0", fresh=False), "nic0", state.SerializeToString())
    assert dma.validate_restore() == []
    vport = dev.vports[0]
    assert vport.queue_ids() == ids and vport.persistent
    # Frames the device delivered before the handover come out of the kept buffers.
    assert same_payloads(vport.data.receive(64, timeout=1.0), pending)
    assert len(loopback(vport, frames(500))) == 500
    window = [e["name"] for e in bench.device.command_log.since(seq) if e["kind"] != "event"]
    save_at = max(i for i, n in enumerate(window) if n == "MANA_CONFIG_VPORT_RX")  # the fresh open's last
    assert queue_commands(window[save_at + 1:]) == []
    again = dev.save()  # and the next servicing keeps it again
    assert [m.base_pfn for m in again.vports[0].mem] == [m.base_pfn for m in v.mem]


def test_a_kept_vport_restores_without_looking_up_a_wire_struct_layout(bench, mem, monkeypatch):
    """Offsets in the WQEs and completions come from the ctypes layouts once, at import: resuming a kept vport (in
    the guest's blackout) looks none up (a check at the restore did, 15-50 us)."""
    from vfkeep.gdma import codec

    state, ids, dma, _ = kept_after_traffic(bench, mem)

    def looked_up(*args):
        raise AssertionError(f"a wire-struct layout looked up in the restore: {args}")
    monkeypatch.setattr(codec, "field_span", looked_up)
    dev = ManaDevice.restore(bench.connect(dma, "nic0", fresh=False), "nic0", state, defer_probe=True)
    assert dev.vports[0].queue_ids() == ids


def test_deferred_probe_resumes_the_data_path_before_any_hwc_request(bench, mem):
    """defer_probe: the kept vport carries traffic before the HWC probe (test event ... QUERY_DEV_CONFIG) ran;
    the probe then runs as in a plain restore."""
    state, ids, dma, pending = kept_after_traffic(bench, mem, undelivered=5)
    seq = bench.device.command_log.seq
    backing = bench.connect(dma, "nic0", fresh=False)
    exchanges = []  # the vectors (HWC, kept vport) are assigned in one exchange with the device
    set_irqs = backing.set_irqs
    backing.set_irq = lambda v: pytest.fail(f"vector {v} assigned on its own")
    backing.set_irqs = lambda vectors: (exchanges.append(list(vectors)), set_irqs(vectors))[1]
    dev = ManaDevice.restore(backing, "nic0", state, defer_probe=True)
    assert exchanges == [[0, state.vports[0].vector]] and state.vports[0].vector != 0
    assert dev.probe_pending and bench.log_since(seq) == []
    vport = dev.vports[0]
    assert same_payloads(vport.data.receive(64, timeout=1.0), pending)
    assert len(loopback(vport, frames(200))) == 200
    assert bench.log_since(seq) == []  # the data path needed no HWC request
    dev.probe()
    assert not dev.probe_pending and bench.log_since(seq) == [
        "GDMA_GENERATE_TEST_EQE", "GDMA_VERIFY_VF_DRIVER_VERSION", "GDMA_LIST_DEVICES", "MANA_QUERY_DEV_CONFIG"]
    assert dma.validate_restore() == [] and vport.queue_ids() == ids
    assert dev.shutdown()  # the vport's teardown needs what the probe brought (its BNIC, the device id)


def test_deferred_probe_on_a_device_that_lost_its_hwc_frees_everything(bench, mem):
    state, _, dma, _ = kept_after_traffic(bench, mem)
    bench.device.flr("reset during the handover")
    dev = ManaDevice.restore(bench.connect(dma, "nic0", fresh=False), "nic0", state, defer_probe=True)
    with pytest.raises(HwcTimeout, match="GDMA_GENERATE_TEST_EQE"):
        dev.probe(probe_timeout_ms=100)
    assert dev.gdma.hwc_failure and not dev.closed  # still open: the caller stops its relay first
    dev.drop_restored()
    assert dev.closed and dev.vports == {}
    usage = dma.inspect()["pool"]
    assert usage["allocated_pages"] == 0 and usage["pending_pages"] == 0


def test_option_off_vport_is_ephemeral_and_torn_down(bench, mem):
    dma = DmaManager(mem, strict_pool=False)
    dev = ManaDevice.new(bench.connect(dma, "nic0"), "nic0")
    vport = dev.open_vport(0, KEPT_VPORT)
    assert not vport.persistent and len(loopback(vport, frames(50))) == 50
    seq = bench.device.command_log.seq
    state = dev.save()
    assert list(state.vports) == [] and "MANA_DESTROY_WQ_OBJ" in bench.log_since(seq)
    assert "vports" not in str(state.ListFields())


@pytest.mark.parametrize("mutate,match", [
    (lambda v, pool: setattr(v.mem[5], "base_pfn", pool.end_pfn + 4), "outside the private pool"),
    (lambda v, pool: setattr(v.mem[6], "base_pfn", v.mem[5].base_pfn), "not a re-attached block"),
    (lambda v, pool: setattr(v.sq, "id", 1 << 24), "24 bits"),
    (lambda v, pool: setattr(v.rx_cq, "size", 3 << 12), "power of two"),
    (lambda v, pool: setattr(v, "rx_buffers", 512), "buffer counts"),
    (lambda v, pool: setattr(v, "tx_posted", v.tx_done + 129), "sends outstanding"),
    (lambda v, pool: setattr(v, "rx_done", v.rx_done + 1), "receives done"),
    (lambda v, pool: setattr(v, "vector", 7), "vector 7"),
    (lambda v, pool: setattr(v, "vport_index", 5), "not a free vport"),
    (lambda v, pool: v.mem.pop(), "memory blocks"),
])
def test_hostile_kept_vport_is_refused_then_fresh_init_works(bench, mem, mutate, match):
    state, _, dma, _ = kept_after_traffic(bench, mem)
    mutate(state.vports[0], LAYOUT.pool)
    with pytest.raises(RestoreError, match=match):
        ManaDevice.restore(bench.connect(dma, "nic0", fresh=False), "nic0", state.SerializeToString())
    # The worker's fallback: free what is pending, FLR, fresh device; the NIC works.
    release_nic_buffers(dma, "nic0")
    dev, flr = fresh_mana_device(lambda: bench.connect(dma, "nic0"), bench.set_reset_method, "nic0", force_flr=True)
    assert flr
    assert len(loopback(dev.open_vport(0, KEPT_VPORT, persistent=True), frames(100))) == 100
    assert dma.validate_restore() == []
    assert dma.inspect()["pool"]["allocated_pages"] == 6 + 202  # HWC + the new vport: nothing of the old leaked


def test_a_state_checked_ahead_is_not_checked_again_and_a_check_of_anything_else_does_not_count(bench, mem,
                                                                                                  monkeypatch):
    """`check_device_state` made ahead (the next worker, before the go: `vf_manager.check_ahead`) spares the restore
    its checks only for that same state object, register map, pool and vector count; a hostile state restored with
    the check of a good one is still refused (nothing of it used)."""
    from vfkeep.driver import mana as mana_module
    from vfkeep.driver.gdma_driver import map_bar0
    from vfkeep.driver.save_restore import check_device_state

    state, _, dma, _ = kept_after_traffic(bench, mem)
    backing = bench.connect(dma, "nic0", fresh=False)
    checked = check_device_state(state, map_bar0(backing), LAYOUT.pool, backing.msix_count)
    hostile = mana_driver_pb2.ManaDeviceSavedState()
    hostile.CopyFrom(state)
    hostile.vports[0].sq.id = 1 << 24
    with pytest.raises(RestoreError, match="24 bits"):
        ManaDevice.restore(backing, "nic0", hostile, checked=checked)
    same = mana_driver_pb2.ManaDeviceSavedState()
    same.CopyFrom(state)
    other_pool = type(LAYOUT.pool)(LAYOUT.pool.name, LAYOUT.pool.base_pfn, LAYOUT.pool.pages + 1)
    layout, msix = checked.layout, checked.msix_count
    assert checked.covers(state, layout, LAYOUT.pool, msix)
    bigger = type(layout)(**{**vars(layout), "bar0_len": 2 * layout.bar0_len})
    assert not any([checked.covers(same, layout, LAYOUT.pool, msix), checked.covers(state, layout, other_pool, msix),
                    checked.covers(state, layout, LAYOUT.pool, msix + 1), checked.covers(state, bigger, LAYOUT.pool, msix)])
    # The worker's check ahead, from the answers of its settled attach: only of a state that passes.
    answered = SimpleNamespace(answers=lambda: (SimpleNamespace(size=backing.bar0_len),
                                                SimpleNamespace(count=backing.msix_count), bench.device.bar0.read(0, 40)))
    ahead = vf_manager.check_ahead(answered, mana_driver_pb2.ManaSavedState(mana_device=state), LAYOUT.pool)
    assert ahead == checked
    assert vf_manager.check_ahead(answered, mana_driver_pb2.ManaSavedState(mana_device=hostile), LAYOUT.pool) is None
    unanswered = SimpleNamespace(answers=lambda: None)  # (the attach failed: the restore meets its error)
    assert vf_manager.check_ahead(unanswered, mana_driver_pb2.ManaSavedState(mana_device=state), LAYOUT.pool) is None
    checks = []
    monkeypatch.setattr(mana_module, "check_device_state", lambda *args: checks.append(args))
    dev = ManaDevice.restore(bench.connect(dma, "nic0", fresh=False), "nic0", state, defer_probe=True, checked=checked)
    assert checks == []
    assert len(loopback(dev.vports[0], frames(50))) == 50
    dev.probe()
    assert dev.shutdown()


# -- through the host: guest traffic across servicing ------------------------------------------------
def traffic(h: HostRun, *args: str) -> dict:
    r = h.cli("traffic", "--run-dir", h.run_dir, *args, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_keepalive_servicing_keeps_the_data_path_under_traffic(tmp_path):
    """No frame lost across keepalive and fresh servicings: 16384-slot rings hold 5.4 s of the guest's 3000 frames/s,
    so neither a slow servicing (its blackout) nor a guest receiver starved of CPU on a loaded machine fills one
    (4096 slots, 1.4 s, is within reach of a fresh servicing's blackout at load 10)."""
    host = HostRun(tmp_path / "run", "--datapath-keepalive", "--ring-slots", "16384")
    try:
        pool = host.inspect("worker/pool")
        assert pool["total_pages"] == 512 + 256
        vport = host.inspect("worker/nics/0/vport")
        assert vport["persistent"]
        ids = {k: vport[k] for k in ("eq", "sq", "tx_cq", "rq", "rx_cq")}
        traffic(host, "start", "--rate", "3000", "--size", "200")
        for _ in range(2):
            seq = host.log_seq()
            r = host.service(mana_keepalive=True)
            window = [e["name"] for e in host.device_control(0, "command_log", since=seq)["entries"]]
            assert r["ok"] and r["nics"][0]["restore_path"] == "keepalive", r
            assert queue_commands(window) == [], window
            # None: the guest sent nothing inside the window (a loaded machine can leave the agent without a CPU
            # for all of a data-path keepalive's few ms); the whole run's count below covers it either way.
            assert r["frames_lost"] in (0, None), r
            vport = host.inspect("worker/nics/0/vport")
            assert {k: vport[k] for k in ids} == ids and vport["persistent"]
        # Not effective without the host's keepalive flag: the vport is rebuilt as today.
        r = host.service()
        assert r["ok"] and r["nics"][0]["restore_path"] == "fresh" and r["frames_lost"] in (0, None), r
        stats = traffic(host, "stats", "--settle-ms", "10000")["nics"][0]  # every frame sent so far came back
        assert stats["settled"] and stats["frames_lost"] == 0 and stats["sent"] > 0, stats
        # A hostile state (HWC buffer outside the pool) takes the fallback; the NIC still carries traffic.
        r = host.service(mana_keepalive=True, tamper="mana-pfn-outside-pool")
        assert r["nics"][0]["restore_path"] == "fallback"
        # A save abandoned after the device kept its vport frees the kept memory before the revive.
        r = host.service(mana_keepalive=True, test_config="SERVICING_SAVE_FAIL")
        assert not r["ok"] and r["nics"][0]["restore_path"] == "fallback", r
        assert host.inspect("worker/pool")["allocated_pages"] == 6 + 202
        assert host.inspect("worker/nics/0/vport")["persistent"]
        stats = traffic(host, "stats", "--settle-ms", "10000")["nics"][0]
        assert stats["settled"] and stats["duplicated"] == 0
        traffic(host, "stop")
    except BaseException:
        host.kill()
        raise
    host.stop()


def test_failed_deferred_probe_takes_the_fallback_and_counts_what_it_stranded(tmp_path):
    """The kept vport carries traffic before the HWC probe; when the probe then fails (here: an injected
    error answer to the test event), the relay is abandoned, the NIC takes the FLR fallback with a relay on a
    new vport, and every frame the guest lost is in a counter."""
    host = HostRun(tmp_path / "run", "--datapath-keepalive")
    try:
        traffic(host, "start", "--rate", "3000", "--size", "200")
        host.service(mana_keepalive=True)  # the current worker's vport is now a kept one
        host.device_control(0, "fail_request", type="GDMA_GENERATE_TEST_EQE", mode="once")
        r = host.service(mana_keepalive=True)
        (nic,) = r["nics"]
        assert nic["restore_path"] == "fallback" and "GDMA_GENERATE_TEST_EQE" in nic["error"], r
        assert nic["device_reset"] and host.inspect("worker/nics/0/vport")["persistent"]
        traffic(host, "stop")

        def read():
            s = traffic(host, "stats", "--settle-ms", "100")["nics"][0]
            counters = host.device_control(0, "counters")["counters"]
            relay = host.inspect("worker/nics/0/relay")
            rings = host.inspect("host/rings/0")
            return s, (rings["tx"]["dropped_full"] + rings["rx"]["dropped_full"] + relay["tx_stranded"]
                       + sum(counters[k] for k in DEVICE_DROPS)), relay, rings

        s, counted, relay, rings = until_accounted(read)
        assert s["received"] > 0
        assert s["frames_lost"] == counted, (s["frames_lost"], relay, rings)
    except BaseException:
        host.kill()
        raise
    host.stop()



def test_kept_vport_saved_under_another_index_takes_the_fallback(bench, mem, monkeypatch):
    """Fuzz finding (issue 15 item 3; `python tests/saved_state_fuzz.py --seed 1 --case 7600`): a kept vport saved
    under index 1 left vport 0 for the VF manager to open before the deferred probe had read the device's
    configuration (AttributeError in the worker), and dropping that half-restored device tore its kept vport
    down through a BNIC it did not have yet. Now: a typed error, the FLR fallback, and the NIC passes frames."""
    state, _, dma, _ = kept_after_traffic(bench, mem)
    state.vports[0].vport_index = 1
    saved = mana_driver_pb2.ManaSavedState(pci_id="nic0", mana_device=state)
    monkeypatch.setattr(vf_manager, "reset_method_setter", lambda path: bench.set_reset_method)
    monkeypatch.setattr(vf_manager.VfManager, "_open", lambda self, persistent, restore=False, irqs=(), ahead=None: bench.connect(
        self.dma, self.pci_id, fresh=not restore, persistent=persistent))
    vf = vf_manager.VfManager.create(NicConfig(0, "nic0", "unused.sock", -1, -1), mem, dma, saved=saved,
                                     keepalive=True, force_fallback=None, datapath_keepalive=True)
    assert vf.restore_path is RestorePath.FALLBACK and vf.flr, vf.error
    assert "probe" in vf.error
    assert len(loopback(vf.vport, frames(50))) == 50
    assert vf.dev.shutdown()


def test_queue_memory_a_failed_teardown_leaked_is_freed_after_the_fallback_flr(bench, mem, monkeypatch):
    """Fuzz finding (issue 15 item 3; seed 1 case 8259): a vport that failed to open after a keepalive restore
    and then failed its teardown leaves its pool blocks allocated (the device may still use them), and the FLR
    fallback that follows never gave them back: the NIC's pool allocations were more than its live blocks until
    the next servicing. After the FLR nothing can use them: they are freed."""
    dma = DmaManager(mem, strict_pool=True)
    dev = ManaDevice.new(bench.connect(dma, "nic0"), "nic0")
    dev.open_vport(0, KEPT_VPORT)
    dma_state = dma.save()
    saved = mana_driver_pb2.ManaSavedState(pci_id="nic0", mana_device=dev.save())
    dma = DmaManager(mem, strict_pool=True)
    dma.restore(dma_state)
    bench.device.faults.add("MANA_CONFIG_VPORT_RX", "once")   # the new persistent vport fails to open ...
    bench.device.faults.add("MANA_DESTROY_WQ_OBJ", "once")    # ... and to tear down: its blocks are leaked
    monkeypatch.setattr(vf_manager, "reset_method_setter", lambda path: bench.set_reset_method)
    monkeypatch.setattr(vf_manager.VfManager, "_open", lambda self, persistent, restore=False, irqs=(), ahead=None: bench.connect(
        self.dma, self.pci_id, fresh=not restore, persistent=persistent))
    vf = vf_manager.VfManager.create(NicConfig(0, "nic0", "unused.sock", -1, -1), mem, dma, saved=saved,
                                     keepalive=True, force_fallback=None, datapath_keepalive=True)
    assert vf.restore_path is RestorePath.FALLBACK and vf.flr, vf.error
    assert dma.validate_restore() == []
    live = {(b.base_pfn, b.pages) for b in [vf.dev.gdma.hwc_mem, *vf.vport._blocks]}
    held = {(s["base_pfn"], s["pages"]) for s in dma.inspect()["pool"]["slot_table"] if s["state"] == "allocated"}
    assert held == live
    assert len(loopback(vf.vport, frames(50))) == 50


def test_blocking_guest_sender_loses_nothing_across_data_path_keepalive_servicings(tmp_path):
    """The guest's blocking sender (`traffic start --backpressure`): frames that find the tx ring full wait in the
    guest queue, so across data-path keepalive servicings no frame is refused by the ring, none is lost, and
    those that arrive keep their order; what the blocked sender did not send is reported, not lost.
    The claim is the send side's: a frame missing at the end may only be one the guest's own receiver left no
    room for (its rx ring full: the agent's receiver starved of CPU on a loaded machine, 4096 slots at 20k fps
    are 0.2 s), which the ring counts; any other loss (stranded in a worker, dropped by the device) fails."""
    host = HostRun(tmp_path / "run", "--datapath-keepalive")
    try:
        traffic(host, "start", "--rate", "20000", "--size", "64", "--backpressure")
        for _ in range(2):
            r = host.service(mana_keepalive=True)
            assert r["ok"] and r["nics"][0]["restore_path"] == "keepalive", r
        traffic(host, "stop")
        s = traffic(host, "stats", "--settle-ms", "10000")["nics"][0]
        assert s["lost_tx_ring_full"] == s["lost_guest_queue"] == s["rings"]["tx"]["dropped_full"] == 0
        receiver_full = s["rings"]["rx"]["dropped_full"]  # since the run began: the window is the whole run
        assert s["received"] > 0 and s["settled"] == (receiver_full == 0), s  # (a refused frame never arrives)
        assert s["frames_lost"] == receiver_full and s["received"] + receiver_full == s["sent"], s
        assert s["duplicated"] == s["reordered"] == 0
        assert s["agent"]["backpressure"] and s["backpressured"] >= 0
    except BaseException:
        host.kill()
        raise
    host.stop()


def test_a_deferred_restore_rings_its_doorbells_in_one_burst(bench, mem):
    """The HWC's EQ and CQ arms and the kept vport's arms leave in one `posted_batch` (one device wake-up
    inside the servicing's window), and none outside it."""
    import contextlib
    state, _, dma, _ = kept_after_traffic(bench, mem)
    backing = bench.connect(dma, "nic0", fresh=False)
    bursts, held = [], None
    write64, write64_many = backing.write64, backing.write64_posted_many

    def posted(offset, value, posted=False):
        assert posted and held is not None, "a doorbell outside the burst"
        held.append((offset, value))

    @contextlib.contextmanager
    def posted_batch():
        nonlocal held
        held = []
        try:
            yield
        finally:
            bursts.append(held)
            held = None
            for offset, value in bursts[-1]:
                write64(offset, value, posted=True)

    backing.write64, backing.posted_batch = posted, posted_batch
    backing.write64_posted_many = lambda writes: [posted(o, v, True) for o, v in writes]
    dev = ManaDevice.restore(backing, "nic0", state, defer_probe=True)
    backing.write64, backing.write64_posted_many = write64, write64_many
    del backing.posted_batch  # (this one holds writes until its end, also past a read: for the restore only)
    assert len(bursts) == 1 and len(bursts[0]) >= 4  # HWC EQ + CQ, the vport's EQ + RX CQ (at least)
    assert len(loopback(dev.vports[0], frames(50))) == 50
    dev.probe()
    assert dev.shutdown()


def test_a_rehearsed_save_changes_nothing_and_records_what_the_save_then_records(bench, mem):
    """`ManaDevice.rehearse_save` (the worker runs it once after it started, so the save's first calls are not in
    the next blackout): no device command, nothing closed, saved or freed, the kept vport still passes traffic; and
    it holds what the save then records for the HWC and the kept vport's memory."""
    dma = DmaManager(mem, strict_pool=True)
    dev = ManaDevice.new(bench.connect(dma, "nic0"), "nic0")
    vport = dev.open_vport(0, KEPT_VPORT, persistent=True)
    assert len(loopback(vport, frames(100))) == 100
    seq, pool = bench.device.command_log.seq, dma.inspect()
    rehearsed = dev.rehearse_save()
    assert bench.device.command_log.since(seq) == [] and dma.inspect() == pool
    assert not (dev.closed or dev.saved or vport.closed)
    assert len(loopback(vport, frames(100))) == 100
    state = dev.save()
    assert (rehearsed.gdma.eq, rehearsed.gdma.sq, rehearsed.gdma.mem, rehearsed.gdma.db_id) == \
        (state.gdma.eq, state.gdma.sq, state.gdma.mem, state.gdma.db_id)
    assert [(v.vport_index, list(v.mem), v.eq.id, v.sq.id) for v in rehearsed.vports] == \
        [(v.vport_index, list(v.mem), v.eq.id, v.sq.id) for v in state.vports]
