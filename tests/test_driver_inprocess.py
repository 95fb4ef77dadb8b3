"""Driver against the emulator core in the same process (no transport): bring-up, data path, save and
restore, refusals, typed errors. The process-level acceptance tests are in test_driver_process.py."""

import pytest

from driver_helpers import EventfdIrqs, HeldLoop, InProcessBacking, InProcessBench, loopback, same_payloads
from driver_helpers import numbered_frames as frames
from vfkeep.device import control
from vfkeep.device.core import GdmaDevice
from vfkeep.device.dma import MappedMemory
from vfkeep.device.timing import DeviceTiming
from vfkeep.driver.errors import (DeviceMissing, HwcFailure, HwcTimeout, ResetRequestPending,
                                  RestoredMemoryNotFound, RestoreError, SaveRefusedHwcFailure,
                                  SaveRefusedResetPending, SmcError)
from vfkeep.driver.mana import ManaDevice, fresh_vectors, restore_vectors
from vfkeep.driver.vport import VportConfig
from vfkeep.gdma.constants import DB_CQ, DB_EQ, DB_RQ, DB_SQ, GDMA_LIST_DEVICES, HWC_DEV_ID, MANA_QUERY_STATS
from vfkeep.gdma.constants import request_name
from vfkeep.gdma.regs import WqDoorbellValue
from vfkeep.memory import DmaManager, MemoryLayout
from vfkeep.paravisor.vf_manager import fresh_mana_device, nic_dma_clients
from vfkeep.proto import mana_driver_pb2

LAYOUT = MemoryLayout(guest_pages=16, worker_pages=512, pool_pages=64)
SMALL = VportConfig(tx_wq_size=4096, tx_cq_size=4096, rx_wq_size=4096, rx_cq_size=4096)

FRESH_SEQUENCE = ["SMC_MSG_TYPE_ESTABLISH_HWC", "GDMA_QUERY_MAX_RESOURCES", "GDMA_GENERATE_TEST_EQE",
                  "GDMA_VERIFY_VF_DRIVER_VERSION", "GDMA_LIST_DEVICES", "GDMA_REGISTER_DEVICE",
                  "MANA_QUERY_DEV_CONFIG"]
RESTORE_SEQUENCE = ["GDMA_GENERATE_TEST_EQE", "GDMA_VERIFY_VF_DRIVER_VERSION", "GDMA_LIST_DEVICES",
                    "MANA_QUERY_DEV_CONFIG"]


@pytest.fixture
def bench(mem):
    b = InProcessBench(mem)
    yield b
    b.device.close()


def saved_after_bringup(bench, mem):
    """Fresh device with one vport that passed traffic, saved; returns (state, restored DmaManager)."""
    dma = DmaManager(mem, strict_pool=False)
    dev = ManaDevice.new(bench.connect(dma, "nic0"), "nic0")
    loopback(dev.open_vport(0, SMALL), frames(40))
    dma_state = dma.save()  # the pool snapshot before the device save, as the worker takes it (spec 2.2)
    state = dev.save()
    mem.scrub_worker_ram()
    new_dma = DmaManager(mem, strict_pool=False)
    new_dma.restore(dma_state)
    return state, new_dma


def test_fresh_bringup_sequence_and_clean_shutdown(bench, mem):
    dma = DmaManager(mem, strict_pool=False)
    dev = ManaDevice.new(bench.connect(dma, "nic0"), "nic0")
    assert bench.log_since(0) == FRESH_SEQUENCE
    hwc = dev.gdma.hwc
    assert (hwc.eq.id, hwc.cq.id, hwc.rq.id, hwc.sq.id) == (24, 24, 24, 24)
    assert dev.gdma.hwc_mem.persistent and LAYOUT.pool.contains_pfn(dev.gdma.hwc_mem.base_pfn, 6)
    assert dev.num_vports == 1 and dev.link_speed_bps == 200_000_000_000
    vport = dev.open_vport(0)
    assert vport.mac == bytes.fromhex("00155d121212")
    data = frames(700)
    assert same_payloads(loopback(vport, data), data)
    assert vport.inspect()["stats"]["rx_frames"] == 700
    assert dev.query_stats()["hc_out_octets"] == 700 * 64
    seq = bench.device.command_log.seq
    assert dev.shutdown() is True
    assert bench.log_since(seq) == ["MANA_CONFIG_VPORT_RX", "MANA_DESTROY_WQ_OBJ", "MANA_DESTROY_WQ_OBJ",
                                    "GDMA_DISABLE_QUEUE", "GDMA_DEREGISTER_DEVICE", "SMC_MSG_TYPE_DESTROY_HWC"]
    assert dma.inspect()["pool"]["allocated_pages"] == 0 and dma.inspect()["worker_ram"]["allocated_pages"] == 0
    assert not bench.device.inspect()["hwc_established"]


OPEN_VPORT_SEQUENCE = ["MANA_QUERY_VPORT_CONFIG", "MANA_CONFIG_VPORT_TX", "GDMA_CREATE_DMA_REGION", "GDMA_CREATE_QUEUE",
                       "GDMA_CREATE_DMA_REGION", "GDMA_CREATE_DMA_REGION", "MANA_CREATE_WQ_OBJ",
                       "GDMA_CREATE_DMA_REGION", "GDMA_CREATE_DMA_REGION", "MANA_CREATE_WQ_OBJ", "MANA_CONFIG_VPORT_RX",
                       "RX doorbell"]


def test_open_vport_follows_the_reference_order(bench, mem, monkeypatch):
    """gdma spec 13.1 steps 12-24: the receive WQEs are posted (RQ doorbell) after CONFIG_VPORT_RX starts
    traffic, not before."""
    dev = ManaDevice.new(bench.connect(DmaManager(mem, strict_pool=False), "nic0"), "nic0")
    seq = bench.device.command_log.seq
    events = []
    doorbell = bench.device.doorbell

    def record(offset, value):
        if offset % 4096 == DB_RQ and WqDoorbellValue.from_int(value).id != dev.gdma.hwc.rq.id:
            events.append((bench.device.command_log.seq, 1, "RX doorbell"))  # after the request it follows
        doorbell(offset, value)

    monkeypatch.setattr(bench.device, "doorbell", record)
    vport = dev.open_vport(0, SMALL)
    events += [(e["seq"], 0, e["name"]) for e in bench.device.command_log.since(seq) if e["kind"] == "hwc"]
    assert [name for *_, name in sorted(events)][:len(OPEN_VPORT_SEQUENCE)] == OPEN_VPORT_SEQUENCE
    assert vport.queue_ids()["rq"] == 25
    dev.shutdown()


def test_receive_waits_for_interrupt_and_frames_can_be_taken_zero_copy(bench, mem):
    dev = ManaDevice.new(bench.connect(DmaManager(mem, strict_pool=False), "nic0"), "nic0")
    vport = dev.open_vport(0, SMALL)
    assert vport.data.receive(8, timeout=0.05) == []  # armed, slept, nothing came
    assert vport.data.prepare_wait() is True
    control.inject_rx(bench.device, 0, (b"\x02" * 6 + b"\x04" * 6 + b"xy" * 30).hex())
    assert vport.dev.gdma.irq.wait(vport.vector, 1.0)  # the armed queues raised the data vector
    sizes = []
    assert vport.data.receive_into(lambda view: sizes.append(len(view)), 8) == 1 and sizes == [72]
    dev.shutdown()


def test_change_vector_moves_the_data_interrupt(bench, mem):
    dev = ManaDevice.new(bench.connect(DmaManager(mem, strict_pool=False), "nic0"), "nic0")
    vport = dev.open_vport(0, SMALL)
    assert vport.vector == 1
    vport.change_vector(0)
    assert bench.log_since(0)[-1] == "GDMA_CHANGE_MSIX_FOR_EQ"
    assert vport.data.prepare_wait() is True
    control.inject_rx(bench.device, 0, (b"\x02" * 6 + b"\x04" * 6 + b"z" * 50).hex())
    assert dev.gdma.irq.wait(0, 1.0)
    assert len(vport.data.receive(8)) == 1
    dev.shutdown()


def test_save_then_restore_without_establish_or_register(bench, mem):
    state, dma = saved_after_bringup(bench, mem)
    g = state.gdma
    assert g.mem.len == 24576 and LAYOUT.pool.contains_pfn(g.mem.base_pfn, 6)
    assert (g.eq.id, g.cq.id, g.rq.id, g.sq.id) == (24, 24, 24, 24)
    assert g.rq.head - g.rq.tail == 4096 - 32 and g.sq.head - g.sq.tail == 4096
    assert g.num_msix == 2 and g.min_queue_avail == 64
    assert bench.device.inspect()["hwc_established"] and bench.device.inspect()["registered"]

    seq = bench.device.command_log.seq
    blob = mana_driver_pb2.ManaDeviceSavedState.FromString(state.SerializeToString())
    dev = ManaDevice.restore(bench.connect(dma, "nic0", fresh=False), "nic0", blob.SerializeToString())
    assert bench.log_since(seq) == RESTORE_SEQUENCE
    first = [e for e in bench.device.command_log.since(seq) if e["kind"] == "hwc"][0]
    assert first["activity_id"] == (g.hwc_activity_id + 1) & 0xFFFFFFFF
    assert dma.validate_restore() == []
    got = loopback(dev.open_vport(0, SMALL), frames(300))
    assert len(got) == 300
    names = bench.log_since(seq)
    assert "SMC_MSG_TYPE_ESTABLISH_HWC" not in names and "GDMA_REGISTER_DEVICE" not in names
    assert dev.save().gdma.mem.base_pfn == g.mem.base_pfn  # and again, for the next servicing


def vector_assignments(backing) -> list[list[int]]:
    """The vectors of each `set_irq`/`set_irqs` exchange on `backing` from now on, one list per exchange."""
    calls = []
    set_irq, set_irqs = backing.set_irq, backing.set_irqs
    backing.set_irq = lambda v: (calls.append([v]), set_irq(v))[1]
    backing.set_irqs = lambda vs: (calls.append(list(vs)), set_irqs(vs))[1]
    return calls


def test_a_restore_maps_every_vector_at_once(bench, mem):
    """The HWC's vector and the data vectors (1 .. num_msix - 1) go to the device in one exchange at restore,
    so rebuilding the vport afterwards assigns none (each assignment is a round trip inside the blackout)."""
    state, dma = saved_after_bringup(bench, mem)
    backing = bench.connect(dma, "nic0", fresh=False)
    calls = vector_assignments(backing)
    dev = ManaDevice.restore(backing, "nic0", state.SerializeToString())
    assert calls == [[0, 1]] and state.gdma.num_msix == 2
    assert restore_vectors(state) == (0, 1)  # what an attach assigns for it (`open_vfio(irqs=)`): all of them
    vport = dev.open_vport(0, SMALL)
    assert calls == [[0, 1]] and vport.vector == 1
    assert len(loopback(vport, frames(10))) == 10  # its interrupts arrive on the vector mapped at restore
    dev.shutdown()


def test_a_fresh_init_maps_the_vport_vectors_with_the_hwc_s(bench, mem):
    """Fresh: vector 0 and the vports' (1 .. num_vps - 1) in the one exchange before ESTABLISH_HWC."""
    backing = bench.connect(DmaManager(mem, strict_pool=False), "nic0")
    calls = vector_assignments(backing)
    dev = ManaDevice.new(backing, "nic0")
    vport = dev.open_vport(0, SMALL)
    assert calls == [[0, 1]] and vport.vector == 1
    assert fresh_vectors() == (0, 1)  # what a fresh attach assigns for it (`open_vfio(irqs=)`)
    assert len(loopback(vport, frames(10))) == 10
    dev.shutdown()


def test_a_shutdown_releases_the_handle_without_unmapping_interrupts_first(bench, mem):
    """The interrupts go with the handle: no DEVICE_SET_IRQS disabling them before the disconnect (a round trip
    in a reset's window); the shutdown's last exchanges are DEREGISTER_DEVICE and DESTROY_HWC."""
    backing = bench.connect(DmaManager(mem, strict_pool=False), "nic0")
    dev = ManaDevice.new(backing, "nic0")
    seq, calls = bench.device.command_log.seq, []
    clear, close = backing.clear_irqs, backing.close
    backing.clear_irqs = lambda: (calls.append("clear_irqs"), clear())
    backing.close = lambda: (calls.append("close"), close())
    assert dev.shutdown()
    assert calls[0] == "close" and bench.log_since(seq) == ["GDMA_DEREGISTER_DEVICE", "SMC_MSG_TYPE_DESTROY_HWC"]


def test_the_device_save_releases_its_pool_memory_so_only_an_earlier_snapshot_can_restore(bench, mem):
    """Spec 2.2: saving the MANA device returns its HWC buffer to the pool (the live slot table shows it
    Free) although the device keeps using it, so the pool snapshot must come first. Swapped, the snapshot
    holds nothing to re-attach and the keepalive restore fails."""
    dma = DmaManager(mem, strict_pool=False)
    dev = ManaDevice.new(bench.connect(dma, "nic0"), "nic0")
    hwc_pfn = dev.gdma.hwc_mem.base_pfn
    before = dma.save()  # the worker's order
    state = dev.save()
    assert dma.inspect()["pool"]["allocated_pages"] == 0 and bench.device.inspect()["hwc_established"]
    after = dma.save()  # swapped order
    slots = {s.base_pfn: s.state.WhichOneof("variant") for s in after.private_pool.state}
    assert slots[hwc_pfn] == "free"
    assert {s.base_pfn: s.state.WhichOneof("variant") for s in before.private_pool.state}[hwc_pfn] == "allocated"

    swapped = DmaManager(mem, strict_pool=False)
    swapped.restore(after)
    with pytest.raises(RestoredMemoryNotFound):
        ManaDevice.restore(bench.connect(swapped, "nic0", fresh=False), "nic0", state)
    right = DmaManager(mem, strict_pool=False)
    right.restore(before)
    dev = ManaDevice.restore(bench.connect(right, "nic0", fresh=False), "nic0", state)
    assert dev.gdma.hwc_mem.base_pfn == hwc_pfn and right.validate_restore() == []


def test_saved_state_round_trips_through_bytes_and_a_second_servicing(bench, mem):
    state, dma = saved_after_bringup(bench, mem)
    blob = state.SerializeToString()
    assert mana_driver_pb2.ManaDeviceSavedState.FromString(blob) == state
    assert b"\x10\x80\xc0\x01" in blob  # mem.len = 24576 as spec 7.2 encodes it
    dev = ManaDevice.restore(bench.connect(dma, "nic0", fresh=False), "nic0", blob)
    again = dev.save().gdma  # no vport: only the four restore requests ran on the HWC
    g = state.gdma
    for name in ("mem", "db_id", "pdid", "gpa_mkey", "num_msix", "min_queue_avail"):
        assert getattr(again, name) == getattr(g, name), name
    for a, b in ((again.eq, g.eq), (again.cq, g.cq)):
        assert (a.id, a.size, a.shift, a.doorbell) == (b.id, b.size, b.shift, b.doorbell)
    for a, b in ((again.rq, g.rq), (again.sq, g.sq)):
        assert (a.id, a.mask, a.doorbell) == (b.id, b.mask, b.doorbell)
    assert again.hwc_activity_id == (g.hwc_activity_id + 4) & 0xFFFFFFFF
    assert (again.sq.tail - g.sq.tail, again.rq.tail - g.rq.tail, again.cq.next - g.cq.next) == (4 * 64, 4 * 32,
                                                                                             8 * 64)


def test_restore_onto_a_device_that_lost_its_hwc_times_out_and_frees(bench, mem):
    state, dma = saved_after_bringup(bench, mem)
    bench.device.flr("reset during the handover")
    with pytest.raises(HwcTimeout, match="GDMA_GENERATE_TEST_EQE"):
        ManaDevice.restore(bench.connect(dma, "nic0", fresh=False), "nic0", state, probe_timeout_ms=100)
    usage = dma.inspect()["pool"]
    assert usage["allocated_pages"] == 0 and usage["pending_pages"] == 0


def test_save_refused_after_hwc_failure(bench, mem):
    dev = ManaDevice.new(bench.connect(DmaManager(mem, strict_pool=False), "nic0"), "nic0")
    control.fail_request(bench.device, "QUERY_STATS")
    with pytest.raises(HwcFailure) as err:
        dev.query_stats()
    assert (err.value.request_type, err.value.status) == (MANA_QUERY_STATS, 1)
    with pytest.raises(HwcFailure, match="earlier HWC failure"):
        dev.bnic.query_dev_config()
    with pytest.raises(SaveRefusedHwcFailure, match="cannot save/restore after HWC failure"):
        dev.save()
    seq = bench.device.command_log.seq
    assert dev.shutdown() is False
    assert bench.log_since(seq) == []  # no DEREGISTER, no DESTROY_HWC after an HWC failure


def test_save_refused_with_reset_request_pending(bench, mem):
    dev = ManaDevice.new(bench.connect(DmaManager(mem, strict_pool=False), "nic0"), "nic0")
    vport = dev.open_vport(0, SMALL)
    control.raise_reset_request(bench.device, revoke_vtl0_vf=True)
    with pytest.raises(SaveRefusedResetPending, match="reset request pending"):
        dev.save()
    assert dev.reset_pending and dev.gdma.events.revoke_vtl0_vf and vport.closed
    with pytest.raises(ResetRequestPending):
        dev.bnic.query_dev_config()
    seq = bench.device.command_log.seq
    assert dev.shutdown() is False
    assert bench.log_since(seq) == []


def test_link_toggles_are_delivered_and_saved_until_delivered(bench, mem):
    dma = DmaManager(mem, strict_pool=False)
    dev = ManaDevice.new(bench.connect(dma, "nic0"), "nic0")
    vport = dev.open_vport(0, SMALL)
    control.link(bench.device, 0, False)
    assert vport.link_up is False
    control.link(bench.device, 0, True)
    dev.gdma.process_events()  # seen by the driver, not yet delivered
    state = dev.save()
    assert [(t.vport_index, t.link_up) for t in state.gdma.link_toggle] == [(0, True)]


def test_event_fd_wakes_on_link_change(bench, mem):
    dev = ManaDevice.new(bench.connect(DmaManager(mem, strict_pool=False), "nic0"), "nic0")
    vport = dev.open_vport(0, SMALL)
    assert vport.queue_ids() == {"eq": 25, "sq": 25, "tx_cq": 25, "rq": 25, "rx_cq": 26}
    assert dev.prepare_event_wait() is True
    control.link(bench.device, 0, False)
    assert dev.gdma.irq.wait(0, 1.0) and dev.event_fd == dev.gdma.irq.fd(0)
    assert dev.poll_events() == [(0, False)] and vport.link_up is False
    control.link(bench.device, 0, True)
    assert dev.prepare_event_wait() is False  # already waiting: poll, do not sleep
    assert dev.poll_events() == [(0, True)]
    dev.shutdown()


def test_hwc_timeout_marks_failure_and_reports(bench, mem):
    dev = ManaDevice.new(bench.connect(DmaManager(mem, strict_pool=False), "nic0"), "nic0")
    control.hwc_stall(bench.device)
    seq = bench.device.command_log.seq
    with pytest.raises(HwcTimeout) as err:
        dev.gdma.deregister_device(dev.dev_id, timeout_ms=150)
    assert "no HWC response" in str(err.value)
    report = [e for e in bench.device.command_log.since(seq) if e["name"] == "SMC_MSG_TYPE_REPORT_HWC_TIMEOUT"]
    assert report and report[0]["last_cmd_failed"] == 1 and report[0]["wait_ms"] >= 150
    assert dev.gdma.hwc_failure
    with pytest.raises(SaveRefusedHwcFailure):
        dev.save()
    dev.shutdown()


def test_lost_interrupt_is_survived_and_reported(bench, mem, monkeypatch):
    dev = ManaDevice.new(bench.connect(DmaManager(mem, strict_pool=False), "nic0"), "nic0")
    seq = bench.device.command_log.seq
    monkeypatch.setattr(bench.irqs, "trigger", lambda vector: None)  # the device's MSI-X goes nowhere
    control.hwc_stall(bench.device)
    sleep = dev.gdma.irq.wait

    def answer_then_sleep(vector, timeout):
        """The device answers as the driver goes to sleep (a 30 ms timer could answer before the request was
        sent on a loaded machine: the first poll found it, and no interrupt was missed)."""
        control.hwc_stall(bench.device, False)
        return sleep(vector, timeout)

    monkeypatch.setattr(dev.gdma.irq, "wait", answer_then_sleep)
    dev.bnic.query_dev_config()  # found by the re-poll when the interrupt wait expires
    report = [e for e in bench.device.command_log.since(seq) if e["name"] == "SMC_MSG_TYPE_REPORT_HWC_TIMEOUT"]
    assert report and report[0]["interrupt_loss"] == 1 and report[0]["last_cmd_failed"] == 0
    assert not dev.gdma.hwc_failure


def test_surprise_removed_device_is_device_missing(bench, mem):
    control.surprise_removal(bench.device)
    with pytest.raises(DeviceMissing, match="not present"):
        ManaDevice.new(bench.connect(DmaManager(mem, strict_pool=False), "nic0"), "nic0")


def test_second_establish_is_refused_by_a_device_that_kept_its_hwc(bench, mem):
    saved_after_bringup(bench, mem)
    dma = DmaManager(mem, strict_pool=False)
    with pytest.raises(SmcError, match="ESTABLISH_HWC refused"):
        ManaDevice.new(bench.connect(dma, "nic1", fresh=False), "nic1")
    assert dma.inspect()["pool"]["allocated_pages"] == 0


def test_create_fresh_noreset_then_flr(bench, mem):
    dma = DmaManager(mem, strict_pool=False)
    dev, flr = fresh_mana_device(lambda: bench.connect(dma, "nic0"), bench.set_reset_method, "nic0")
    assert flr is False and bench.device.counters["reset_count"] == 0
    dev.save()  # leaves the HWC alive: the next NoReset attempt must fail
    bench.device.reset_method = "none"
    dma2 = DmaManager(mem, strict_pool=False)
    dev, flr = fresh_mana_device(lambda: bench.connect(dma2, "nic1"), bench.set_reset_method, "nic1")
    assert flr is True and bench.device.counters["reset_count"] == 1
    assert bench.device.reset_method == "none"
    assert len(loopback(dev.open_vport(0, SMALL), frames(10))) == 10
    dev.shutdown()


def _restore_expecting(bench, mem, mutate, error, match):
    state, dma = saved_after_bringup(bench, mem)
    mutate(state.gdma)
    blob = state.SerializeToString()
    before = mem.read(0, mem.size)
    seq = bench.device.command_log.seq
    with pytest.raises(error, match=match):
        ManaDevice.restore(bench.connect(dma, "nic0", fresh=False), "nic0", blob)
    assert mem.read(0, mem.size) == before, "a refused restore wrote guest memory"
    assert bench.log_since(seq) == []
    return dma


def test_restore_with_wrong_base_pfn_frees_attached_buffers(bench, mem):
    dma = _restore_expecting(bench, mem, lambda g: setattr(g.mem, "base_pfn", g.mem.base_pfn + 6),
                             RestoredMemoryNotFound, r"gdma restored memory not found for base_pfn \d+")
    usage = dma.inspect()["pool"]
    assert usage["allocated_pages"] == 0 and usage["pending_pages"] == 0


@pytest.mark.parametrize("mutate,match", [
    (lambda g: setattr(g.mem, "base_pfn", 3), "outside the private pool"),
    (lambda g: setattr(g.eq, "size", 3000), "eq size 3000 must be a power of two"),
    (lambda g: setattr(g.cq, "size", 8192), "cq size 8192 must be a power of two in"),
    (lambda g: setattr(g.rq, "mask", 8191), "rq size 8192"),
    (lambda g: setattr(g.sq, "id", 1 << 24), "24 bits"),
])
def test_restore_with_bad_field_writes_nothing(bench, mem, mutate, match):
    dma = _restore_expecting(bench, mem, mutate, RestoreError, match)
    assert dma.inspect()["pool"]["pending_pages"] == 6  # untouched: the worker's fallback attaches and frees them


def test_restore_with_truncated_blob(bench, mem):
    state, dma = saved_after_bringup(bench, mem)
    blob = state.SerializeToString()
    before = mem.read(0, mem.size)
    for cut in (len(blob) - 1, len(blob) // 2, 3):
        with pytest.raises(RestoreError):
            ManaDevice.restore(bench.connect(dma, "nic0", fresh=False), "nic0", blob[:cut])
    assert mem.read(0, mem.size) == before


def test_restore_without_gdma_state(bench, mem):
    _, dma = saved_after_bringup(bench, mem)
    with pytest.raises(RestoreError, match="no gdma state"):
        ManaDevice.restore(bench.connect(dma, "nic0", fresh=False), "nic0", b"")


def test_bringup_errors_are_typed(bench, mem):
    control.fail_request(bench.device, "VERIFY_VF_DRIVER_VERSION")
    dma = DmaManager(mem, strict_pool=False)
    with pytest.raises(HwcFailure, match="GDMA_VERIFY_VF_DRIVER_VERSION failed with status 1"):
        ManaDevice.new(bench.connect(dma, "nic0"), "nic0")
    assert dma.inspect()["pool"]["allocated_pages"] == 0


def test_a_wait_arms_only_the_queues_that_notified_since_their_last_arm(bench, mem):
    """gdma spec 4.2: an EQ or CQ notifies once per arm. `prepare_wait` arms the RX CQ and the EQ; a second
    wait with nothing delivered rings no doorbell (a wake-up by the guest ring costs none); once a frame came
    back, its completion EQE says the RX CQ and the EQ fired, and exactly those two are armed again — the
    interrupt arrives every time."""
    dma = DmaManager(mem, strict_pool=False)
    backing = bench.connect(dma, "nic0")
    dev = ManaDevice.new(backing, "nic0")
    data = dev.open_vport(0, SMALL).data
    rings = []
    write64 = backing.write64
    backing.write64 = lambda offset, value, posted=False: (rings.append(offset), write64(offset, value, posted))
    db = dev.gdma.doorbell_page(0)
    cq_db, eq_db, sq_db, rq_db = (db.address(o) for o in (DB_CQ, DB_EQ, DB_SQ, DB_RQ))
    assert data.prepare_wait(need_tx=False)
    assert sorted(rings) == sorted([cq_db, eq_db])
    for _ in range(3):
        rings.clear()
        assert data.prepare_wait(need_tx=False) and rings == []  # still armed
        assert data.send(frames(1)) == 1 and rings == [sq_db]
        assert data.gdma.irq.wait(data.vector, 2.0)  # loopback: RX CQE -> EQE -> interrupt
        assert len(data.receive(8)) == 1
        rings.clear()
        assert data.prepare_wait(need_tx=False)
        assert sorted(rings) == sorted([cq_db, eq_db])
    rings.clear()
    data.rearm()  # after an idle timeout: everything again
    assert data.prepare_wait(need_tx=False) and sorted(rings) == sorted([cq_db, eq_db])


def test_received_buffers_are_posted_again_with_the_next_send_or_wait(bench, mem):
    """The relay's `receive_batch` leaves the RQ doorbell for the next send (just before its SQ doorbell, so
    a loopback reply finds every buffer posted), the next wait, or a quarter of the buffers; the device sees
    one burst of doorbells per guest burst, and no frame is lost to a buffer not posted in time."""
    dma = DmaManager(mem, strict_pool=False)
    backing = bench.connect(dma, "nic0")
    dev = ManaDevice.new(backing, "nic0")
    data = dev.open_vport(0, SMALL).data
    rings = []
    write64 = backing.write64
    backing.write64 = lambda offset, value, posted=False: (rings.append(offset), write64(offset, value, posted))
    db = dev.gdma.doorbell_page(0)
    sq_db, rq_db = db.address(DB_SQ), db.address(DB_RQ)
    got: list[bytes] = []
    sent = frames(3 * data._rx_nbuf)
    for i in range(0, len(sent), 8):
        rings.clear()
        data.arm_rx()
        assert data.send(sent[i:i + 8]) == 8
        assert rings[-1] == sq_db and rings.count(rq_db) == (i > 0)  # the buffers of the last burst, first
        assert data.gdma.irq.wait(data.vector, 2.0)
        rings.clear()
        data.receive_batch(lambda views: got.extend(bytes(v) for v in views), 64)
        assert rq_db not in rings
    assert same_payloads(got, sent) and bench.device.counters["in_discards_no_wqe"] == 0
    rings.clear()
    assert data.prepare_wait(need_tx=False) and rings[0] == rq_db
    rings.clear()
    for n in range(1, data._rx_nbuf // 4 + 1):  # frames from the wire, none sent: a quarter of the buffers
        bench.device.deliver(0, sent[n])
        assert data.receive_batch(lambda views: None, 64) == 1
        assert rings == ([] if n < data._rx_nbuf // 4 else [rq_db])


def test_smc_messages_are_posted_writes(bench, mem):
    """ESTABLISH_HWC's seven payload dwords and header, and DESTROY_HWC's header, are posted writes (one burst
    over vfio-user, `posted_batch`): the header read after them is the message's only round trip."""
    backing = bench.connect(DmaManager(mem, strict_pool=False), "nic0")
    log = []
    write32 = backing.write32
    backing.write32 = lambda offset, value, posted=False: (log.append(posted), write32(offset, value, posted))
    dev = ManaDevice.new(backing, "nic0")
    assert log == [True] * 8
    assert dev.shutdown()
    assert log == [True] * 9
    assert [e["name"] for e in bench.device.command_log.since(0) if e["kind"] == "smc"] == [
        "SMC_MSG_TYPE_ESTABLISH_HWC", "SMC_MSG_TYPE_DESTROY_HWC"]


def test_an_hwc_request_is_one_burst_of_posted_writes(bench, mem):
    """Each request reaches the device as one burst: the CQ and EQ arms, the RQ doorbell of the receive WQE that
    replaces the one the request consumes, the SQ doorbell, in that order; nothing else is written, and at rest
    one receive WQE stays posted (what a saved HWC carries over, spec 6.3). The driver reads its EQ twice per
    request."""
    dma = DmaManager(mem, strict_pool=False)
    backing = bench.connect(dma, "nic0")
    dev = ManaDevice.new(backing, "nic0")
    writes, bursts = [], []
    write64 = backing.write64
    backing.write64 = lambda offset, value, posted=False: (writes.append(offset), write64(offset, value, posted))
    backing.write64_posted_many = lambda w: (bursts.append([offset for offset, _ in w]),
                                             [write64(offset, value, True) for offset, value in w])
    hwc = dev.gdma.hwc
    eq_reads = []
    poll_offset = hwc.eq.poll_offset
    hwc.eq.poll_offset = lambda: eq_reads.append(poll_offset()) or eq_reads[-1]
    for _ in range(3):
        dev.gdma.verify_vf_driver_version()
        assert hwc.rq.in_flight == 32 and hwc.sq.in_flight == 0
    assert writes == []
    assert bursts == [[hwc.cq._db_addr, hwc.eq._db_addr, hwc.rq._db_addr, hwc.sq._db_addr]] * 3
    # The EQ is read once before the burst (nothing new) and once after the answer (its completion event, then
    # nothing): not again to arm, nor before the first sleep.
    assert [off is None for off in eq_reads] == [True, False, True] * 3
    device_hwc = bench.device.hwc
    assert device_hwc.rq.pending and not device_hwc.sq.pending  # the device sees the posted receive WQE too


def test_meanwhile_runs_while_the_device_works_on_the_request(mem):
    """`request(meanwhile=)`: the device has taken the request and not answered it when `meanwhile` runs."""
    loop = HeldLoop()
    irqs = EventfdIrqs()
    device = GdmaDevice(MappedMemory(mem), irqs, loop)
    dma = DmaManager(mem, strict_pool=False)
    dev = ManaDevice.new(InProcessBacking(device, irqs, 1, nic_dma_clients(dma, "nic0", True)), "nic0")
    device.timing = DeviceTiming(hwc_latency_ms=1, flr_ms=0)  # from now on answers wait for the loop
    seen = []

    def meanwhile():
        seen.append((device.counters["hwc_requests"], dev.gdma.hwc.cq.pending()))
        loop.timers.pop()[1]()  # the latency has passed: the device answers

    before = device.counters["hwc_requests"]
    dev.gdma.request(GDMA_LIST_DEVICES, HWC_DEV_ID, meanwhile=meanwhile)
    assert seen == [(before + 1, False)] and not dev.gdma.hwc_failure
    assert device.counters["modelled_hwc_ms_total"] == 1


def test_a_failing_meanwhile_is_raised_after_the_request_completed(bench, mem):
    """The request is still completed and checked: the HWC stays in step and usable. A request that fails
    raises its own error (and marks the HWC failed), not the other."""
    dev = ManaDevice.new(bench.connect(DmaManager(mem, strict_pool=False), "nic0"), "nic0")
    with pytest.raises(ZeroDivisionError):
        dev.gdma.request(GDMA_LIST_DEVICES, HWC_DEV_ID, meanwhile=lambda: 1 / 0)
    assert not dev.gdma.hwc_failure and dev.gdma.mana_dev_id() == dev.dev_id  # the next request works
    control.COMMANDS["fail_request"](bench.device, type="GDMA_LIST_DEVICES", mode="once")
    with pytest.raises(HwcFailure, match="GDMA_LIST_DEVICES failed with status"):
        dev.gdma.request(GDMA_LIST_DEVICES, HWC_DEV_ID, meanwhile=lambda: 1 / 0)
    assert dev.gdma.hwc_failure
    dev.shutdown()


def test_a_vport_allocates_its_memory_while_the_device_works_on_a_request(bench, mem, monkeypatch):
    """Opening a vport allocates its five queues' memory during QUERY_VPORT_CONFIG and its packet buffers during
    CONFIG_VPORT_RX (`meanwhile`), none between the requests that hand memory to the device."""
    dev = ManaDevice.new(bench.connect(DmaManager(mem, strict_pool=False), "nic0"), "nic0")
    in_flight, allocated = [None], []
    request, client = dev.gdma.request, dev.dma.kind(False)
    allocate = client.allocate_dma_buffer

    def tracked(code, *args, **kwargs):
        in_flight[0] = request_name(code)
        try:
            return request(code, *args, **kwargs)
        finally:
            in_flight[0] = None

    monkeypatch.setattr(dev.gdma, "request", tracked)
    monkeypatch.setattr(client, "allocate_dma_buffer", lambda n: (allocated.append(in_flight[0]), allocate(n))[1])
    vport = dev.open_vport(0, SMALL)
    assert allocated == ["MANA_QUERY_VPORT_CONFIG"] * 5 + ["MANA_CONFIG_VPORT_RX"] * 2
    assert len(loopback(vport, frames(20))) == 20


def test_a_vport_whose_data_path_cannot_be_built_is_undone(bench, mem, monkeypatch):
    """The packet buffers and rings are built during CONFIG_VPORT_RX (`meanwhile`): if that fails, RX was
    enabled all the same, and closing the vport disables it first, then destroys every queue; the HWC is fine."""
    dev = ManaDevice.new(bench.connect(DmaManager(mem, strict_pool=False), "nic0"), "nic0")
    seq = bench.device.command_log.seq

    def broken(*args, **kwargs):
        raise MemoryError("no room for the packet buffers")

    with monkeypatch.context() as m:
        m.setattr("vfkeep.driver.vport.VportDataPath", broken)
        with pytest.raises(MemoryError):
            dev.open_vport(0, SMALL)
    names = bench.log_since(seq)
    assert names[names.index("MANA_CONFIG_VPORT_RX"):] == [
        "MANA_CONFIG_VPORT_RX", "MANA_CONFIG_VPORT_RX", "MANA_DESTROY_WQ_OBJ", "MANA_DESTROY_WQ_OBJ",
        "GDMA_DISABLE_QUEUE"]
    assert not dev.gdma.hwc_failure and not dev.vports and dev.leaked == []
    assert len(loopback(dev.open_vport(0, SMALL), frames(20))) == 20
    dev.shutdown()
