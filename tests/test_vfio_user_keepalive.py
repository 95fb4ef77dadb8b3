"""Keepalive semantics across clients (spec §5.2, §5.4, §6): reset_method none keeps device
state and latched interrupts over a disconnect; flr wipes them; DEVICE_RESET follows the method."""
from __future__ import annotations

import errno
import os
import select
import time

import pytest

from vfkeep.memory import GuestMemory, MemoryLayout
from vfkeep.rpc import BadArguments, Refused
from vfkeep.vfio_user import VfioDevice, VfioError, control_call, protocol as p
from vfkeep.vfio_user.testdev import REG_DOORBELL, REG_ID, REG_SCRATCH


def readable(fd: int, timeout: float = 0.0) -> bool:
    return bool(select.select([fd], [], [], timeout)[0])


def wait_detached(sock, timeout: float = 5.0) -> dict:
    """After a client closed, poll until the device has processed the disconnect."""
    deadline = time.monotonic() + timeout
    while True:
        state = control_call(f"{sock}.ctl", "state")
        if not state["connected"]:
            return state
        assert time.monotonic() < deadline, "device never saw the disconnect"
        time.sleep(0.005)


def test_state_survives_disconnect_with_none(vfio_testdev):
    sock, _ = vfio_testdev(reset_method="none")
    mem = GuestMemory.create(MemoryLayout(guest_pages=2, worker_pages=2, pool_pages=2))
    try:
        with VfioDevice.new(sock) as dev:
            assert not dev.info.can_reset and not dev.was_reset
            dev.map_guest_memory(mem)
            dev.set_irq(0)
            dev.write32(REG_SCRATCH, 0xABCD)
        state = wait_detached(sock)
        assert (state["scratch"], state["dma_maps"], state["resets"], state["epoch"]) == (0xABCD, 0, 0, 1)
        with VfioDevice.new(sock) as dev:  # even a "new" driver cannot reset it: no RESET flag
            assert dev.read32(REG_SCRATCH) == 0xABCD
        assert control_call(f"{sock}.ctl", "epoch")["epoch"] == 2
    finally:
        mem.close()


def test_flr_wipes_state_on_disconnect(vfio_testdev):
    sock, _ = vfio_testdev(reset_method="none")
    ctl = f"{sock}.ctl"
    with VfioDevice.restore(sock) as dev:
        dev.write32(REG_SCRATCH, 0x1111)
        assert control_call(ctl, "set_reset_method", value="flr") == {"value": "flr", "previous": "none"}
        assert control_call(ctl, "get_reset_method")["value"] == "flr"
        assert dev.device_info().can_reset  # the RESET flag follows the method
    state = wait_detached(sock)
    assert (state["scratch"], state["resets"]) == (0, 1)


def test_new_resets_an_flr_device_and_restore_does_not(vfio_testdev):
    sock, _ = vfio_testdev(reset_method="flr")
    ctl = f"{sock}.ctl"
    with VfioDevice.restore(sock) as dev:
        assert dev.info.flags == p.DEVICE_FLAGS_PCI | p.DEVICE_FLAGS_RESET and not dev.was_reset
        dev.write32(REG_SCRATCH, 5)
        dev.reset()
        assert dev.read32(REG_SCRATCH) == 0
        dev.write32(REG_SCRATCH, 6)
        control_call(ctl, "set_reset_method", value="none")
    with VfioDevice.new(sock) as dev:
        assert dev.read32(REG_SCRATCH) == 6 and not dev.was_reset
        assert control_call(ctl, "state")["resets"] == 1
        control_call(ctl, "set_reset_method", value="flr")
    assert wait_detached(sock)["resets"] == 2  # that disconnect was an FLR
    with VfioDevice.new(sock) as dev:
        assert dev.was_reset and control_call(ctl, "state")["resets"] == 3


def test_device_reset_takes_the_modelled_flr_time(vfio_testdev):
    sock, _ = vfio_testdev(reset_method="flr", flr_ms=100)
    with VfioDevice.restore(sock) as dev:
        t0 = time.monotonic()
        dev.reset()
        assert time.monotonic() - t0 >= 0.1
    control_call(f"{sock}.ctl", "set_reset_method", value="none")
    with VfioDevice.restore(sock) as dev:
        with pytest.raises(VfioError) as e:
            dev.reset()
        assert e.value.errno == errno.EINVAL
    assert wait_detached(sock)["resets"] == 2  # the explicit reset and the flr disconnect


def test_interrupt_between_clients_is_delivered_once(vfio_testdev):
    sock, _ = vfio_testdev(reset_method="none")
    ctl = f"{sock}.ctl"
    with VfioDevice.restore(sock) as dev:
        dev.set_irq(2)
    wait_detached(sock)
    assert control_call(ctl, "raise_irq", vector=2) == {"vector": 2, "delivered": False}
    control_call(ctl, "raise_irq", vector=2)  # coalesces with the first
    assert control_call(ctl, "state")["pending"] == [2]
    with VfioDevice.restore(sock) as dev:
        other = dev.set_irq(1)
        assert not readable(other)  # only the latched vector fires
        efd = dev.set_irq(2)
        assert readable(efd) and os.eventfd_read(efd) == 1
        dev.read32(REG_ID)  # round trip: nothing else is on its way
        assert not readable(efd)
        state = control_call(ctl, "state")
        assert (state["pending"], state["irqs_latched"], state["irqs_delivered"]) == ([], 1, 1)
        dev.write32(REG_DOORBELL, 2)  # normal delivery afterwards
        assert readable(efd, 5) and os.eventfd_read(efd) == 1
    wait_detached(sock)
    with VfioDevice.restore(sock) as dev:
        efd = dev.set_irq(2)
        dev.read32(REG_ID)
        assert not readable(efd)  # delivered once, never replayed


def test_flr_forgets_latched_interrupts(vfio_testdev):
    sock, _ = vfio_testdev(reset_method="flr")
    control_call(f"{sock}.ctl", "raise_irq", vector=0)
    with VfioDevice.new(sock) as dev:  # new() resets an flr device: the latch is device state
        efd = dev.set_irq(0)
        dev.read32(REG_ID)
        assert not readable(efd)


def test_control_refuses_bad_reset_method(vfio_testdev):
    sock, _ = vfio_testdev()
    with pytest.raises(Refused, match="reset method"):
        control_call(f"{sock}.ctl", "set_reset_method", value="bus")
    with pytest.raises(BadArguments):
        control_call(f"{sock}.ctl", "set_reset_method")
    assert control_call(f"{sock}.ctl", "get_reset_method")["value"] == "none"


def test_the_next_client_takes_over_the_mapping_the_last_one_left_and_the_rest_is_unmapped_after_its_attach(
        vfio_testdev):
    """A servicing's new worker maps all of guest memory again: the device keeps the old worker's mapping out of its
    table (no DMA reaches it) and the new worker's DMA_MAP of the same range takes it over, without a new mmap; a
    kept mapping the next client does not take over is unmapped once that client's attach is served."""
    sock, _ = vfio_testdev(reset_method="none")
    ctl = f"{sock}.ctl"
    mem = GuestMemory.create(MemoryLayout(guest_pages=2, worker_pages=2, pool_pages=2))
    try:
        with VfioDevice.new(sock) as dev:
            dev.map_guest_memory(mem)
        state = wait_detached(sock)
        assert (state["dma_maps"], state["retired_dma_maps"], state["files_mapped"]) == (0, 1, 1)
        with VfioDevice.restore(sock) as dev:
            dev.map_guest_memory(mem)
            state = control_call(ctl, "state")
            assert (state["dma_maps"], state["retired_dma_maps"], state["files_mapped"]) == (1, 0, 1)
        wait_detached(sock)
        with VfioDevice.restore(sock) as dev:
            dev.dma_map(mem.fd, 0, 0, 4096)  # not the range the last client mapped
            state = control_call(ctl, "state")
            assert (state["dma_maps"], state["retired_dma_maps"], state["files_mapped"]) == (1, 0, 2)
    finally:
        mem.close()


def test_a_cancelled_attach_sent_ahead_is_taken_by_the_device_before_a_control_call_that_follows(vfio_testdev):
    """A next worker whose NIC does not take the keepalive path cancels the attach it sent ahead and may then set
    the reset method to flr (a fallback): `cancel()` returns once the device has taken the disconnect, so that
    control call, on the other socket, can neither find the client still attached nor turn the disconnect into a
    reset."""
    sock, _ = vfio_testdev(reset_method="none")
    mem = GuestMemory.create(MemoryLayout(guest_pages=2, worker_pages=2, pool_pages=2))
    try:
        for _ in range(3):
            pending = VfioDevice.attach_ahead(sock, mem, p.REGION_BAR0, p.IRQ_MSIX, irqs=(0, 1))
            pending.cancel()
            assert control_call(f"{sock}.ctl", "state")["connected"] is False
            control_call(f"{sock}.ctl", "set_reset_method", value="flr")
            control_call(f"{sock}.ctl", "set_reset_method", value="none")
        state = control_call(f"{sock}.ctl", "state")
        assert (state["resets"], state["epoch"]) == (0, 3)
    finally:
        mem.close()
