"""Driver against the MANA emulator in its own process, over vfio-user: fresh bring-up with 10,000 frames,
and the keepalive proof (servicing spec 12.1) across two real worker processes with a negative control."""
import pathlib
import sys

import pytest

from driver_helpers import loopback, numbered_frames, same_payloads
from helpers import run_json
from vfkeep import proc
from vfkeep.device.main import start_device
from vfkeep.driver.errors import DeviceMissing, SaveRefusedHwcFailure
from vfkeep.driver.mana import ManaDevice
from vfkeep.memory import DmaManager, GuestMemory, MemoryLayout
from vfkeep.paravisor.vf_manager import nic_dma_clients
from vfkeep.vfio_user import control_call
from vfkeep.vfio_user.backing import open_vfio

LAYOUT = MemoryLayout(guest_pages=16, worker_pages=1024, pool_pages=64)
WORKER = pathlib.Path(__file__).with_name("driver_worker.py")
TRIPWIRES = ("SMC_MSG_TYPE_ESTABLISH_HWC", "GDMA_REGISTER_DEVICE")


@pytest.fixture
def device(tmp_path):
    """Factory: start `vfkeep device` with extra args; returns its socket path. Ended by PID at teardown."""
    procs = []

    def start(*args: str) -> str:
        sock = str(tmp_path / f"nic{len(procs)}.sock")
        procs.append(start_device(sock, "--run-dir", str(tmp_path), *args))
        return sock

    start.procs = procs
    yield start
    for p in procs:
        proc.end(p)


def ctl(sock: str, cmd: str, **args) -> dict:
    return control_call(sock + ".ctl", cmd, **args)


def run_worker(mode: str, mem: GuestMemory, sock: str, out: pathlib.Path, nframes: int) -> dict:
    return run_json([sys.executable, str(WORKER), mode, str(mem.fd), LAYOUT.to_str(), sock, str(out), str(nframes)],
                    [mem.fd], timeout=30)


def test_fresh_bringup_10000_frames_and_clean_shutdown(device, mem):
    sock = device("--reset-method", "none")
    dev = ManaDevice.new(open_vfio(sock, mem, nic_dma_clients(DmaManager(mem, strict_pool=False), "nic0", True)),
                         "nic0")
    frames = numbered_frames(10_000)
    got = loopback(dev.open_vport(0), frames)
    assert len(got) == 10_000 and same_payloads(got, frames)
    counters = ctl(sock, "counters")["counters"]
    assert counters["in_discards_no_wqe"] == 0 and counters["frames_rx"] == 10_000
    assert dev.shutdown() is True
    names = [e["name"] for e in ctl(sock, "command_log")["entries"]]
    assert names[-3:] == ["GDMA_DEREGISTER_DEVICE", "SMC_MSG_TYPE_DESTROY_HWC", "DISCONNECT"]
    assert ctl(sock, "state")["hwc_established"] is False


def test_vanished_device_is_device_missing_and_shutdown_does_not_raise(device, mem):
    sock = device("--reset-method", "none")
    dma = DmaManager(mem, strict_pool=False)
    dev = ManaDevice.new(open_vfio(sock, mem, nic_dma_clients(dma, "nic0", True)), "nic0")
    vport = dev.open_vport(0)
    proc.end(device.procs[-1])
    with pytest.raises(DeviceMissing):
        dev.query_stats()
    with pytest.raises(SaveRefusedHwcFailure):
        dev.save()
    assert vport.closed and dev.shutdown() is False
    with pytest.raises(DeviceMissing):  # the transport's error, translated by the backing
        open_vfio(sock, mem, nic_dma_clients(dma, "nic0", True), timeout=0.2)


def save_and_arm_tripwires(device, mem, tmp_path):
    """Process 1 brings the NIC up and saves; then ESTABLISH_HWC and REGISTER_DEVICE fail from the next
    connection epoch on, and the host scrubs worker RAM. Returns (socket, saving epoch, log seq)."""
    sock = device("--reset-method", "none")
    saved = run_worker("save", mem, sock, tmp_path, 500)
    assert "error" not in saved, saved
    assert saved["traffic"] == {"sent": 500, "received": 500, "intact": True}
    epoch = ctl(sock, "epoch")["epoch"]
    seq = ctl(sock, "command_log")["last_seq"]
    assert ctl(sock, "state")["hwc_established"] and ctl(sock, "state")["registered"]
    for name in TRIPWIRES:
        ctl(sock, "fail_request", type=name, mode="from_epoch", epoch=epoch + 1)
    mem.scrub_worker_ram()
    return sock, epoch, seq, saved


def test_keepalive_restore_in_a_new_process(device, mem, tmp_path):
    sock, epoch, seq, saved = save_and_arm_tripwires(device, mem, tmp_path)
    restored = run_worker("restore", mem, sock, tmp_path, 1000)
    assert "error" not in restored, restored
    assert restored["base_pfn"] == saved["base_pfn"] and restored["unclaimed"] == 0
    assert restored["traffic"] == {"sent": 1000, "received": 1000, "intact": True}
    assert restored["clean_shutdown"] is True

    log = ctl(sock, "command_log", since=seq)["entries"]
    names = [e["name"] for e in log]
    assert not set(TRIPWIRES) & set(names), "a non-keepalive command ran after the save"
    assert not any(e["kind"] == "flr" for e in log)
    assert ctl(sock, "counters")["counters"]["reset_count"] == 0
    first = [e["name"] for e in log if e["epoch"] == epoch + 1 and e["kind"] == "hwc"][:4]
    assert first == ["GDMA_GENERATE_TEST_EQE", "GDMA_VERIFY_VF_DRIVER_VERSION", "GDMA_LIST_DEVICES",
                     "MANA_QUERY_DEV_CONFIG"]
    assert names[-2:] == ["SMC_MSG_TYPE_DESTROY_HWC", "DISCONNECT"]  # clean shutdown reached the old HWC


def test_negative_control_fresh_init_trips_the_wires(device, mem, tmp_path):
    sock, epoch, seq, _ = save_and_arm_tripwires(device, mem, tmp_path)
    fresh = run_worker("fresh", mem, sock, tmp_path, 10)
    assert fresh["freed_pages"] == 6
    assert fresh["error"]["type"] == "CreateFailed", fresh
    log = ctl(sock, "command_log", since=seq)["entries"]
    establish = [e for e in log if e["name"] == "SMC_MSG_TYPE_ESTABLISH_HWC"]
    assert len(establish) == 2 and all(e["status"] == 1 for e in establish)  # NoReset attempt, then after FLR
    assert any(e["kind"] == "flr" for e in log)
    assert ctl(sock, "get_reset_method")["value"] == "flr"  # left for the next open to reset


@pytest.mark.parametrize("method_set", [True, False])
def test_a_fresh_init_after_setting_reset_method_none_attaches_in_one_round_trip(device, mem, monkeypatch,
                                                                                  method_set):
    """The NoReset attempt (servicing spec 6.4) sets the device's reset method to none first: the open then cannot
    reset the device, so it attaches as a restore does, its handshake and mapping in one pipelined round trip
    (`VfioDevice.new` would wait for DEVICE_GET_INFO's answer before mapping). If setting the method failed, the
    open still decides for itself (and would reset a device whose method is flr)."""
    from vfkeep.contract import NicConfig
    from vfkeep.paravisor.vf_manager import VfManager
    from vfkeep.vfio_user import VfioDevice
    sock = device("--reset-method", "flr")
    opened = []
    new = VfioDevice.new.__func__
    monkeypatch.setattr(VfioDevice, "new", classmethod(lambda cls, *a, **k: opened.append("new") or new(cls, *a, **k)))
    vf = VfManager(NicConfig(0, "nic0", sock, -1, -1), mem, DmaManager(mem, strict_pool=False))
    if not method_set:
        def refused(method):
            raise DeviceMissing("control channel refused")
        vf.set_reset_method = refused
    vf._fresh(persistent_hwc=False)
    try:
        assert vf.dev is not None and vf.vport is not None and not vf.flr
        state = ctl(sock, "state")
        if method_set:
            assert opened == [] and state["reset_method"] == "none"
        else:
            assert opened == ["new"] and state["reset_method"] == "flr"
        assert ctl(sock, "counters")["counters"]["reset_count"] == (0 if method_set else 1)
    finally:
        vf.dev.shutdown()


def test_a_nic_that_does_not_take_the_keepalive_restore_cancels_the_attach_sent_ahead_first(device, mem):
    """The next worker sends a NIC's restore attach ahead (`attach_ahead_for`); a NIC whose path turns out to be
    another (here: no saved state, a fresh init) disconnects it before anything else, or its own open would wait
    behind it (the device serves one client at a time)."""
    from vfkeep.contract import NicConfig, RestorePath
    from vfkeep.driver.mana import RESTORE_FIRST_READ, fresh_vectors
    from vfkeep.paravisor.vf_manager import VfManager
    from vfkeep.vfio_user.backing import attach_ahead

    sock = device("--reset-method", "none")
    pending = attach_ahead(sock, mem, prefetch=RESTORE_FIRST_READ, irqs=fresh_vectors())
    vf = VfManager.create(NicConfig(0, "nic0", sock, -1, -1), mem, DmaManager(mem, strict_pool=False), saved=None,
                          keepalive=False, force_fallback=None, ahead=pending)
    assert (vf.error, vf.restore_path, vf.flr) == (None, RestorePath.FRESH, False)
    names = [e["name"] for e in ctl(sock, "command_log")["entries"]]
    assert names.count("CONNECT") == 2 and names.index("DISCONNECT") < names.index("CONNECT", 1)
    vf.shutdown()
