"""Client against the test device running in its own process: handshake, info, registers,
posted writes, DMA and interrupts."""
from __future__ import annotations

import errno
import json
import os
import select
import socket
import zlib

import pytest

from vfkeep.memory import GuestMemory, MemoryLayout
from vfkeep.vfio_user import (DeviceMissing, VfioDevice, VfioError, VfioTimeout, control_call, protocol as p)
from vfkeep.vfio_user.testdev import (BAR0_SIZE, DEVICE_ID, DMA_CMD_CRC32, DMA_CMD_FILL, ID_VALUE, REG_COUNTER,
                                      REG_DMA_ADDR, REG_DMA_CMD, REG_DMA_LEN, REG_DMA_RESULT, REG_DMA_STATUS,
                                      REG_DOORBELL, REG_ID, REG_IRQ_COUNT, REG_SCRATCH, VENDOR_ID)


def readable(fd: int, timeout: float = 0.0) -> bool:
    return bool(select.select([fd], [], [], timeout)[0])


@pytest.fixture
def dev(vfio_testdev):
    sock, _ = vfio_testdev()
    with VfioDevice.restore(sock) as d:
        yield d


SERVER_CAPS = {"max_msg_fds": 16, "max_data_xfer_size": 1048576, "max_dma_maps": 65535, "pgsizes": 4096}


PROPOSALS = [
    ({"max_msg_fds": 16}, {"max_msg_fds": 16}),
    ({"max_msg_fds": 253, "max_data_xfer_size": 4096, "max_dma_maps": 8, "pgsizes": 4096,
      "migration": {"pgsize": 4096, "max_bitmap_size": 1}, "twin_socket": {"supported": True},
      "write_multiple": True}, SERVER_CAPS),
    ({}, {}),
    (None, None),
]


@pytest.mark.parametrize("proposed, answered", PROPOSALS)
def test_version_reply_carries_only_proposed_capabilities(vfio_testdev, proposed, answered):
    """Addendum A4: only keys the client proposed, each with the server's own limit; unsupported ones
    (migration, twin_socket, write_multiple) omitted; no JSON proposed, a 4-byte reply."""
    sock, _ = vfio_testdev()
    _check_version_reply(sock, proposed, answered)


def test_one_server_answers_each_clients_own_proposal(vfio_testdev):
    """The server encodes a VERSION reply once per proposal (a reconnect is in a servicing's window): clients that
    propose differently, one after the other, still each get the answer to their own proposal."""
    sock, _ = vfio_testdev()
    for proposed, answered in PROPOSALS * 2:
        _check_version_reply(sock, proposed, answered)


def _check_version_reply(sock, proposed, answered) -> None:
    s = socket.socket(socket.AF_UNIX)
    s.connect(str(sock))
    s.setblocking(False)
    p.send_message(s, 0x1234, p.Command.VERSION, p.TYPE_COMMAND, p.encode_version(0, 5, proposed))
    reply = p.wait_message(s, p.FrameReader(), 5)
    assert (reply.msg_id, reply.command, reply.flags, reply.error) == (0x1234, 1, p.TYPE_REPLY, 0)
    assert reply.payload[:4] == b"\0\0\0\0"  # major 0, minor min(5, 0)
    if answered is None:
        assert len(reply.payload) == 4
    else:
        assert reply.payload.endswith(b"\0") and json.loads(reply.payload[4:-1]) == {"capabilities": answered}
    s.close()


def test_client_handshake_and_info(dev):
    assert dev.server_caps["max_data_xfer_size"] == 1 << 20
    assert (dev.info.flags, dev.info.num_regions, dev.info.num_irqs) == (p.DEVICE_FLAGS_PCI, 9, 5)
    assert not dev.was_reset
    bar0, cfg, bar1 = dev.region_info(0), dev.region_info(7), dev.region_info(1)
    assert (bar0.index, bar0.flags, bar0.size) == (0, 0x3, BAR0_SIZE)
    assert (cfg.flags, cfg.size) == (0x3, 256)
    assert (bar1.flags, bar1.size) == (0, 0)  # not implemented
    msix = dev.irq_info(p.IRQ_MSIX)
    assert (msix.index, msix.flags, msix.count) == (2, p.IRQ_INFO_EVENTFD, 4)
    assert dev.irq_info(p.IRQ_INTX).count == 0
    for bad in (lambda: dev.region_info(9), lambda: dev.irq_info(5)):
        with pytest.raises(VfioError) as e:
            bad()
        assert e.value.errno == errno.EINVAL


def test_region_read_write(dev):
    cfg = dev.region_read(7, 0, 4)
    assert int.from_bytes(cfg[:2], "little") == VENDOR_ID and int.from_bytes(cfg[2:], "little") == DEVICE_ID
    assert dev.read32(REG_ID) == ID_VALUE
    dev.write32(REG_SCRATCH, 0xCAFEF00D)
    assert dev.read32(REG_SCRATCH) == 0xCAFEF00D
    dev.write64(REG_DMA_ADDR, 0x1122334455667788)
    assert dev.read64(REG_DMA_ADDR) == 0x1122334455667788
    assert dev.read32(REG_COUNTER) == 2
    with pytest.raises(VfioError):
        dev.read32(REG_ID + 2)  # the device refuses unaligned register access


def test_posted_writes_are_ordered_before_a_later_read(dev):
    for i in range(200):
        dev.write32(REG_SCRATCH, i, posted=True)
    assert dev.read32(REG_SCRATCH) == 199
    assert dev.read32(REG_COUNTER) == 200


def test_dma_device_reads_and_writes_guest_memory(dev):
    mem = GuestMemory.create(MemoryLayout(guest_pages=4, worker_pages=4, pool_pages=4))
    try:
        dev.map_guest_memory(mem)
        assert control_call(f"{dev.path}.ctl", "state")["dma_maps"] == 1  # all of guest memory, one DMA_MAP
        gpa = mem.layout.pool.gpa + 4096
        mem.write(gpa, b"guest data" * 100)
        dev.write64(REG_DMA_ADDR, gpa)
        dev.write32(REG_DMA_LEN, 1000)
        dev.write32(REG_DMA_CMD, DMA_CMD_CRC32)
        assert dev.read32(REG_DMA_STATUS) == 0
        assert dev.read32(REG_DMA_RESULT) == zlib.crc32(b"guest data" * 100)
        dev.write32(REG_SCRATCH, 0x04030201)
        dev.write32(REG_DMA_CMD, DMA_CMD_FILL, posted=True)
        dev.read32(REG_DMA_STATUS)
        assert mem.read(gpa, 8) == bytes([1, 2, 3, 4, 1, 2, 3, 4])
        # an unmapped IOVA is a recorded fault, not a crash
        dev.write64(REG_DMA_ADDR, mem.layout.size + 4096)
        dev.write32(REG_DMA_CMD, DMA_CMD_CRC32)
        assert dev.read32(REG_DMA_STATUS) == 1
        dev.dma_unmap(0, mem.layout.size)  # exactly the mapping (an unmap must name one)
        dev.write64(REG_DMA_ADDR, 0)
        dev.write32(REG_DMA_CMD, DMA_CMD_CRC32)
        assert dev.read32(REG_DMA_STATUS) == 1
        dev.dma_unmap(unmap_all=True)
        assert control_call(f"{dev.path}.ctl", "state")["dma_maps"] == 0
    finally:
        mem.close()


def test_dma_map_errors(vfio_testdev):
    sock, _ = vfio_testdev(max_dma_maps=2)
    mem = GuestMemory.create(MemoryLayout(guest_pages=4, worker_pages=4, pool_pages=4))
    try:
        with VfioDevice.restore(sock) as dev:
            dev.dma_map(mem.fd, 0, 0, 4096)
            dev.dma_map(mem.fd, 0, 0, 4096)  # exact repeat: no-op
            for args, code in [((mem.fd, 0, 2048, 4096), errno.EEXIST), ((mem.fd, 0, 0, 8192), errno.EEXIST),
                               ((mem.fd, 0, 1 << 40, mem.layout.size + 4096), errno.EINVAL)]:
                with pytest.raises(VfioError) as e:
                    dev.dma_map(*args)
                assert e.value.errno == code
            dev.dma_map(mem.fd, 4096, 4096, 4096)
            with pytest.raises(VfioError) as e:
                dev.dma_map(mem.fd, 8192, 8192, 4096)
            assert e.value.errno == errno.ENOSPC
            with pytest.raises(VfioError) as e:
                dev.dma_unmap(0, 8192)
            assert e.value.errno == errno.ENOENT
            dev.dma_unmap(0, 4096)
            dev.dma_map(mem.fd, 8192, 8192, 4096)
    finally:
        mem.close()


def test_interrupt_through_eventfd(dev):
    efd = dev.set_irq(3)
    dev.write32(REG_DOORBELL, 3)
    assert readable(efd, 5) and os.eventfd_read(efd) == 1
    assert dev.read32(REG_IRQ_COUNT) == 1
    # software trigger (SET_IRQS DATA_NONE|TRIGGER count>0) signals the assigned vector
    dev._request(p.Command.DEVICE_SET_IRQS, p.IRQ_SET.pack(20, 0x21, p.IRQ_MSIX, 3, 1))
    assert readable(efd)
    dev.clear_irqs()  # vectors disabled: the next doorbell is latched, not lost
    dev.write32(REG_DOORBELL, 3)
    assert control_call(f"{dev.path}.ctl", "state")["pending"] == [3]
    efd2 = dev.set_irq(3)  # replaces (and closes) efd; the latch is signalled before the reply
    assert readable(efd2) and os.eventfd_read(efd2) == 1
    dev.read32(REG_ID)
    assert not readable(efd2)
    with pytest.raises(VfioError):
        dev.write32(REG_DOORBELL, 4)  # no such vector


def test_device_reset_refused_with_none(dev):
    dev.write32(REG_SCRATCH, 7)
    with pytest.raises(VfioError) as e:
        dev.reset()
    assert e.value.errno == errno.EINVAL and e.value.command == p.Command.DEVICE_RESET
    assert dev.read32(REG_SCRATCH) == 7


def test_one_client_at_a_time(vfio_testdev):
    sock, _ = vfio_testdev()
    first = VfioDevice.restore(sock)
    with pytest.raises(VfioTimeout):
        VfioDevice.restore(sock, timeout=0.3)  # waits in the backlog, handshake not answered
    first.close()
    with VfioDevice.restore(sock) as second:
        assert second.read32(REG_ID) == ID_VALUE


def test_device_missing(tmp_path, vfio_testdev):
    with pytest.raises(DeviceMissing):
        VfioDevice.new(tmp_path / "nobody.sock", timeout=0.1)
    sock, proc = vfio_testdev()
    dev = VfioDevice.restore(sock)
    proc.kill()
    proc.wait()
    with pytest.raises(DeviceMissing):
        dev.read32(REG_ID)
    with pytest.raises(DeviceMissing):
        dev.read32(REG_ID)  # stays failed
    dev.close()
