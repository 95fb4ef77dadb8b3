"""MANA emulator in its own process (`vfkeep device`) driven through the real vfio-user transport."""
from __future__ import annotations

import fcntl
import os
import socket
import struct
import time

import pytest

from device_driver_helper import MANA_DEV_ID, Pages, TestDriver, VportQueues, cqe_params, eqe_type, frame
from vfkeep.device.main import start_device
from vfkeep.gdma.constants import (CQE_RX_OKAY, CQE_TX_OKAY, GDMA_EQE_HWC_RECONFIG_DATA,
                                   GDMA_EQE_HWC_RESET_REQUEST, GDMA_EQE_TEST_EVENT, GDMA_GENERATE_TEST_EQE,
                                   GDMA_QUERY_MAX_RESOURCES, GDMA_VERIFY_VF_DRIVER_VERSION, HWC_DEV_ID,
                                   MANA_QUERY_DEV_CONFIG)
from vfkeep.gdma.bnic import ManaQueryDeviceCfgReq
from vfkeep.gdma.queues import EqeDataReconfig
from vfkeep.gdma.requests import GdmaGenerateTestEventReq, GdmaVerifyVerReq
from vfkeep.memory import MemoryLayout
from vfkeep.proc import end
from vfkeep.rpc import Refused
from vfkeep.vfio_user import VfioDevice, VfioError, control_call

LAYOUT = MemoryLayout(guest_pages=64, worker_pages=2048, pool_pages=0)
PEER = bytes.fromhex("020000000001")


@pytest.fixture
def mana(tmp_path):
    """Factory: `start(*args, name="mana") -> Device` runs `vfkeep device`; ended by PID at teardown."""
    procs, ports = [], []

    class Device:
        def __init__(self, name, args):
            self.sock = str(tmp_path / f"{name}.sock")
            self.ctl_path = self.sock + ".ctl"
            self.proc = start_device(self.sock, "--run-dir", str(tmp_path), *args)
            procs.append(self.proc)

        def ctl(self, cmd, **args):
            return control_call(self.ctl_path, cmd, **args)

        def connect(self, mem, restore=False):
            port = (VfioDevice.restore if restore else VfioDevice.new)(self.sock)
            ports.append(port)
            port.map_guest_memory(mem)
            return port

        def counters(self):
            return self.ctl("counters")["counters"]

        def wait_counter(self, name, value, timeout=5.0):
            deadline = time.monotonic() + timeout
            while (got := self.counters()[name]) < value:
                assert time.monotonic() < deadline, f"{name} stayed at {got}, expected {value}"
            return got

    yield lambda *args, name="mana": Device(name, args)
    for port in ports:
        port.close()
    for proc in procs:
        end(proc)


def driver(port, mem, timeout=5.0):
    return TestDriver(port, mem, Pages(mem, mem.layout.worker), timeout=timeout)


def test_bringup_and_10000_loopback_frames_over_vfio_user(mana, mem):
    dev = mana()
    port = dev.connect(mem)
    assert port.device_info().can_reset is False  # reset_method none
    cfg = port.region_read(7, 0, 4)
    assert int.from_bytes(cfg, "little") == 0x00BA1414
    assert port.irq_info(2).count == 64
    assert (port.read64(0x08), port.read64(0x18)) == (0x1000, 40)  # Linux reads these with readq
    drv = driver(port, mem)
    drv.bring_up()
    drv.request(GDMA_VERIFY_VF_DRIVER_VERSION, GdmaVerifyVerReq(protocol_ver_min=1, protocol_ver_max=1).to_bytes())
    drv.request(GDMA_GENERATE_TEST_EQE, GdmaGenerateTestEventReq(queue_index=drv.hwc_eq.id).to_bytes())
    assert eqe_type(drv.wait_event(GDMA_EQE_TEST_EVENT)) == GDMA_EQE_TEST_EVENT
    vp = VportQueues(drv)
    vp.start(rx_buffers=256)
    total, batch, seq = 10_000, 128, 0
    start = time.perf_counter()
    while seq < total:
        n = min(batch, total - seq)
        vp.send([frame(PEER, vp.mac, s) for s in range(seq, seq + n)])
        rx = vp.wait_rx(n)
        assert [t for t, _ in rx] == [CQE_RX_OKAY] * n
        assert [int.from_bytes(f[14:22], "little") for _, f in rx] == list(range(seq, seq + n))
        assert all(f[:6] == vp.mac and f[6:12] == PEER for _, f in rx)
        vp.post_rx(n)
        assert vp.wait_tx(n) == [CQE_TX_OKAY] * n
        seq += n
    elapsed = time.perf_counter() - start
    c = dev.counters()
    assert c["frames_tx"] == c["frames_rx"] == total
    assert c["in_discards_no_wqe"] == c["dma_faults"] == c["malformed_wqes"] == 0
    assert c["interrupts"] > 0 and drv.wakeups > 0  # MSI-X delivered through eventfds
    print(f"loopback over vfio-user: {total / elapsed:.0f} frames/s")


def test_keepalive_none_reconnect_same_ids_and_rx_meanwhile(mana, mem):
    dev = mana()
    port = dev.connect(mem)
    drv = driver(port, mem)
    drv.bring_up()
    vp = VportQueues(drv)
    vp.start(rx_buffers=8)
    ids = drv.hwc_ids()
    port.close()  # the worker goes away; the device keeps running
    state = dev.ctl("state")
    assert state["hwc_established"] and state["posted_rx"] == 8 and not state["connected"]
    assert dev.ctl("inject_rx", vport=0, frame_hex=frame(vp.mac, PEER, 99).hex()) == {"delivered": False}
    assert dev.counters()["rx_dropped_unmapped"] == 1  # no DMA mapping while nobody is connected

    port = dev.connect(mem, restore=True)  # epoch 2: maps memory again, no reset
    for seq in range(3):  # frames arriving "meanwhile", before the new driver touches the device
        assert dev.ctl("inject_rx", vport=0, frame_hex=frame(vp.mac, PEER, seq).hex())["delivered"]
    rx = vp.poll_rx()  # straight from the RX CQ and the posted buffers in guest memory
    assert [int.from_bytes(f[14:22], "little") for _, f in rx] == [0, 1, 2]
    assert dev.ctl("state")["posted_rx"] == 5
    for seq in range(3, 9):  # until the posted buffers run out, then drops
        dev.ctl("inject_rx", vport=0, frame_hex=frame(vp.mac, PEER, seq).hex())
    assert len(vp.poll_rx()) == 5 and dev.counters()["in_discards_no_wqe"] == 1

    drv.reattach(port)  # restore: same queues, no ESTABLISH_HWC
    resp, _, cqes = drv.send_request(GDMA_QUERY_MAX_RESOURCES)
    assert resp.status == 0 and cqe_params(cqes[0]).wq_number == ids["sq"] and cqe_params(cqes[1]).wq_number == ids["rq"]
    assert dev.ctl("state")["hwc"]["eq_id"] == ids["eq"]
    vp.post_rx(8)
    vp.send([frame(PEER, vp.mac, 7)])
    assert vp.wait_tx(1) == [CQE_TX_OKAY] and len(vp.wait_rx(1)) == 1
    log = dev.ctl("command_log")["entries"]
    assert [e["name"] for e in log if e["epoch"] == 2 and e["kind"] == "smc"] == []
    assert dev.counters()["reset_count"] == 0


def test_flr_on_disconnect_and_device_reset(mana, mem):
    dev = mana("--reset-method", "flr", "--timing", "realistic")
    port = dev.connect(mem)  # VfioDevice.new sends DEVICE_RESET on an flr device
    assert port.device_info().can_reset
    assert dev.counters()["reset_count"] == 1
    drv = driver(port, mem)
    drv.bring_up()
    VportQueues(drv).start(rx_buffers=4)
    assert dev.counters()["modelled_hwc_ms_total"] >= 10  # 1 ms per request, from the device's own counter
    port.close()
    deadline = time.monotonic() + 30  # (a device process, 200 ms of modelled FLR; passes once seen)
    while (state := dev.ctl("state"))["hwc_established"]:
        assert time.monotonic() < deadline
    assert not state["registered"] and state["posted_rx"] == 0 and state["eqs"] == [] and state["dma_regions"] == []
    c = dev.counters()
    assert c["reset_count"] == 2 and c["modelled_flr_ms_total"] == 200
    flrs = [e for e in dev.ctl("command_log")["entries"] if e["kind"] == "flr"]
    assert [e["reason"] for e in flrs] == ["device_reset", "disconnect"]

    dev.ctl("set_reset_method", value="none")
    port = dev.connect(mem)
    with pytest.raises(VfioError):
        port.reset()  # refused with none
    drv = driver(port, mem)
    assert drv.establish_hwc().status == 0 and drv.hwc_ids()["eq"] == 24  # fresh ids after the wipe


def test_fault_hooks_over_the_control_channel(mana, mem):
    dev = mana()
    dev.ctl("fail_request", type="ESTABLISH_HWC", mode="from_epoch", epoch=2)
    port = dev.connect(mem)
    drv = driver(port, mem)
    drv.bring_up()  # epoch 1: fine
    assert drv.destroy_hwc().status == 0
    port.close()
    port = dev.connect(mem)  # epoch 2: ESTABLISH_HWC fails from now on
    drv = driver(port, mem)
    assert drv.establish_hwc().status == 1
    assert dev.ctl("clear_faults")["cleared"] == 1
    assert drv.establish_hwc().status == 0
    drv.request(GDMA_QUERY_MAX_RESOURCES)
    log = dev.ctl("command_log")["entries"]
    smc = [(e["epoch"], e["name"], e["status"], e["injected"]) for e in log if e["kind"] == "smc"]
    assert smc == [(1, "SMC_MSG_TYPE_ESTABLISH_HWC", 0, False), (1, "SMC_MSG_TYPE_DESTROY_HWC", 0, False),
                   (2, "SMC_MSG_TYPE_ESTABLISH_HWC", 1, True), (2, "SMC_MSG_TYPE_ESTABLISH_HWC", 0, False)]
    hwc = [e for e in log if e["kind"] == "hwc"]
    assert hwc[-1]["name"] == "GDMA_QUERY_MAX_RESOURCES" and hwc[-1]["epoch"] == 2 and hwc[-1]["t"] > 0

    dev.ctl("fail_request", type="GDMA_REGISTER_DEVICE", mode="once")
    assert drv.send_request(5, dev_id=MANA_DEV_ID)[0].status == 0  # still registered from epoch 1
    assert drv.send_request(4, dev_id=MANA_DEV_ID)[0].status == 1
    assert drv.send_request(4, dev_id=MANA_DEV_ID)[0].status == 0

    dev.ctl("hwc_stall", on=True)
    drv.timeout = 0.2
    with pytest.raises(TimeoutError):
        drv.send_request(GDMA_QUERY_MAX_RESOURCES)
    dev.ctl("hwc_stall", on=False)
    drv.timeout = 5.0
    assert len(drv.wait_cqes(drv.hwc_cq, 2, drv.hwc_eq, 0)) == 2  # answered once the stall ends
    drv.post_hwc_rwqe()

    dev.ctl("link", vport=0, up=False)
    assert EqeDataReconfig.from_bytes(drv.wait_event(GDMA_EQE_HWC_RECONFIG_DATA)).data_type == 3
    dev.ctl("raise_reset_request", revoke_vtl0_vf=False)
    assert eqe_type(drv.wait_event(GDMA_EQE_HWC_RESET_REQUEST)) == GDMA_EQE_HWC_RESET_REQUEST
    assert drv.wakeups > 0

    with pytest.raises(Refused):
        dev.ctl("fail_request", type="NOT_A_REQUEST")
    dev.ctl("surprise_removal")
    assert port.read32(0) == 0xFFFFFFFF and port.region_read(7, 0, 4) == b"\xff" * 4


def test_bad_input_keeps_the_device_serving(mana, mem):
    dev = mana()
    port = dev.connect(mem)
    drv = driver(port, mem)
    drv.bring_up()
    port.write64(0x1000, (64 << 32) | 77)  # doorbell for a queue that does not exist
    port.write32(0x1000, 1)  # 4-byte doorbell
    port.write64(0x1FF0, 5)  # no such doorbell
    resp, _, _ = drv.send_request(0x9999, dev_id=HWC_DEV_ID)  # unknown GDMA request
    assert resp.status == 1
    resp, _, _ = drv.send_request(0x2FFFF, dev_id=MANA_DEV_ID)  # unknown BNIC request
    assert resp.status == 1
    c = dev.counters()
    assert c["bad_doorbells"] == 3 and c["bad_requests"] == 2
    drv.mana(MANA_QUERY_DEV_CONFIG, ManaQueryDeviceCfgReq().to_bytes())
    assert dev.proc.poll() is None


def test_udp_backend_and_keepalive_rx(mana, mem):
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer.bind(("127.0.0.1", 0))
    peer.settimeout(5)
    dev = mana("--backend", f"udp:127.0.0.1:{peer.getsockname()[1]}")
    try:
        local_port = dev.ctl("state")["backend"]["local_port"]
        port = dev.connect(mem)
        drv = driver(port, mem)
        drv.bring_up()
        vp = VportQueues(drv)
        vp.start(rx_buffers=16)
        sent = [frame(PEER, vp.mac, s, 200) for s in range(5)]
        vp.send(sent)
        assert [peer.recv(65535) for _ in sent] == sent  # one datagram per frame
        assert vp.wait_tx(5) == [CQE_TX_OKAY] * 5
        for s in range(3):
            peer.sendto(frame(vp.mac, PEER, 100 + s), ("127.0.0.1", local_port))
        assert [int.from_bytes(f[14:22], "little") for _, f in vp.wait_rx(3)] == [100, 101, 102]

        port.close()  # keepalive: the backend keeps delivering
        rx_before = dev.counters()["frames_rx"]
        port = dev.connect(mem, restore=True)
        for s in range(4):
            peer.sendto(frame(vp.mac, PEER, 200 + s), ("127.0.0.1", local_port))
        dev.wait_counter("frames_rx", rx_before + 4)
        assert [int.from_bytes(f[14:22], "little") for _, f in vp.poll_rx()] == [200, 201, 202, 203]
    finally:
        peer.close()


def _tap_unusable() -> str | None:
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR)
    except OSError as e:
        return f"/dev/net/tun is not usable: {e}"
    try:
        fcntl.ioctl(fd, 0x400454CA, struct.pack("16sH", b"vfkprobe0", 0x1002))
    except OSError as e:
        return f"cannot create a TAP interface (needs CAP_NET_ADMIN): {e}"
    finally:
        os.close(fd)
    return None


def test_tap_backend(mana, mem):
    reason = _tap_unusable()
    if reason:
        pytest.skip(reason)
    name = f"vfkt{os.getpid() % 100000}"
    dev = mana("--backend", f"tap:{name}")
    port = dev.connect(mem)
    drv = driver(port, mem)
    drv.bring_up()
    vp = VportQueues(drv)
    vp.start(rx_buffers=16)
    raw = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x88B5))
    try:
        raw.bind((name, 0))
        raw.settimeout(5)
        vp.send([frame(PEER, vp.mac, 1)])
        assert raw.recv(65535)[:22] == frame(PEER, vp.mac, 1)[:22]
        raw.send(frame(vp.mac, PEER, 2))
        for _ in range(8):  # the kernel may also send on the new interface (IPv6 ND, MLD): skip those
            (t, f), = vp.wait_rx(1)
            if f[12:14] == b"\x88\xb5":
                break
        assert t == CQE_RX_OKAY and int.from_bytes(f[14:22], "little") == 2
    finally:
        raw.close()


def test_sigterm_ends_the_device_cleanly(mana, mem):
    dev = mana()
    port = dev.connect(mem)
    port.close()
    assert end(dev.proc) == 0
    assert not os.path.exists(dev.sock)


def test_bad_command_line(tmp_path):
    from click.testing import CliRunner

    from vfkeep.device.main import device_command
    result = CliRunner().invoke(device_command, ["--socket", str(tmp_path / "s"), "--backend", "ftp:x"])
    assert result.exit_code != 0 and "bad backend" in result.output
    result = CliRunner().invoke(device_command, ["--socket", str(tmp_path / "s"), "--mac", "zz"])
    assert result.exit_code != 0 and "MAC" in result.output

