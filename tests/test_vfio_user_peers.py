"""What compliant third-party vfio-user peers need (spec vfio-user.md addendum), against test peers: a scripted
server that sends DMA_READ/DMA_WRITE while the client waits or sends, one that stops reading mid-message, and
a raw client mapping DMA without an fd; ERR/REQ interrupts of the MANA device."""
from __future__ import annotations

import errno
import os
import select
import socket
import threading
import time

import pytest

from device_driver_helper import Pages, TestDriver
from vfkeep.device.main import start_device
from vfkeep.gdma.regs import EstablishHwc
from vfkeep.memory import MemoryLayout
from vfkeep.proc import end
from vfkeep.sockets import wait_fd
from vfkeep.vfio_user import DeviceMissing, VfioDevice, control_call, protocol as p

LAYOUT = MemoryLayout(guest_pages=64, worker_pages=2048, pool_pages=0)
IOVA = 0x100000
MAP_SIZE = 1 << 20
TIMEOUT = 5.0


class ScriptedServer:
    """A vfio-user server in a thread: answers the client's handshake and DMA_MAP, then runs `script(self,
    msg)` for the next command. `error` holds what went wrong on its side."""

    def __init__(self, path: str, script):
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(1)
        self.script, self.error, self.results = script, None, {}
        self.next_id = 0x700
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.conn, _ = self.listener.accept()
            self.conn.setblocking(False)
            self.reader = p.FrameReader()
            while True:
                msg = self.recv()
                msg.close_fds()
                if msg.command == p.Command.VERSION:
                    self.reply(msg, p.encode_version(0, 0, {"max_msg_fds": 16, "max_data_xfer_size": MAP_SIZE}))
                elif msg.command == p.Command.DEVICE_GET_INFO:
                    self.reply(msg, p.DEVICE_INFO.pack(16, p.DEVICE_FLAGS_PCI, 9, 5))
                elif msg.command == p.Command.DMA_MAP:
                    self.reply(msg, b"")
                    self.after_map()
                else:
                    self.script(self, msg)
                    return
        except Exception as e:  # noqa: BLE001 - reported to the test
            self.error = e

    def after_map(self) -> None:
        """Hook: runs right after the DMA_MAP reply."""

    def recv(self) -> p.Message:
        return p.wait_message(self.conn, self.reader, TIMEOUT)

    def reply(self, msg: p.Message, payload: bytes) -> None:
        p.send_message(self.conn, msg.msg_id, msg.command, p.TYPE_REPLY, payload, timeout=TIMEOUT)

    def ask(self, command: int, payload: bytes, *, fds=(), no_reply: bool = False) -> p.Message | None:
        """Send a server command; its reply (None for no-reply)."""
        self.next_id += 1
        p.send_message(self.conn, self.next_id, command, p.TYPE_COMMAND | (p.FLAG_NO_REPLY if no_reply else 0),
                       payload, fds=fds, timeout=TIMEOUT)
        if no_reply:
            return None
        reply = self.recv()
        assert reply.msg_id == self.next_id and reply.command == command and reply.type == p.TYPE_REPLY
        return reply

    def close(self) -> None:
        self.thread.join(TIMEOUT)
        self.listener.close()
        if hasattr(self, "conn"):
            self.conn.close()


@pytest.fixture
def memfd():
    fd = os.memfd_create("guest")
    os.ftruncate(fd, MAP_SIZE)
    yield fd
    os.close(fd)


@pytest.fixture
def scripted(tmp_path):
    servers = []

    def start(script, after_map=None) -> tuple[ScriptedServer, str]:
        path = str(tmp_path / f"scripted{len(servers)}.sock")
        server = ScriptedServer(path, script)
        if after_map is not None:
            server.after_map = lambda: after_map(server)
        servers.append(server)
        return server, path

    yield start
    for s in servers:
        s.close()


def rw(address: int, count: int, data: bytes = b"") -> bytes:
    return p.DMA_RW.pack(address, count) + data


def test_client_answers_dma_read_and_write_while_it_waits_for_a_reply(scripted, memfd):
    """A2: the server sends DMA_WRITE/DMA_READ (and bad commands) before it answers the client's REGION_READ."""
    def script(server, msg):
        assert msg.command == p.Command.REGION_READ
        r = server.results
        r["write"] = server.ask(p.Command.DMA_WRITE, rw(IOVA + 16, 5, b"hello"))
        r["read"] = server.ask(p.Command.DMA_READ, rw(IOVA + 16, 5))
        r["no_reply"] = server.ask(p.Command.DMA_WRITE, rw(IOVA + 32, 3, b"abc"), no_reply=True)
        r["unmapped"] = server.ask(p.Command.DMA_READ, rw(IOVA + MAP_SIZE - 2, 4))
        r["too_big"] = server.ask(p.Command.DMA_READ, rw(IOVA, MAP_SIZE + 1))
        r["short_data"] = server.ask(p.Command.DMA_WRITE, rw(IOVA, 8, b"1234"))
        r["unknown"] = server.ask(99, b"")
        efd = os.eventfd(0)
        r["with_fd"] = server.ask(p.Command.DMA_READ, rw(IOVA, 4), fds=[efd])
        os.close(efd)
        server.reply(msg, p.REGION_ACCESS.pack(0, 0, 4) + (0xC0FFEE).to_bytes(4, "little"))

    server, path = scripted(script)
    with VfioDevice.restore(path) as dev:
        dev.dma_map(memfd, 0, IOVA, MAP_SIZE)
        assert dev.read32(0) == 0xC0FFEE
    assert server.error is None, server.error
    r = server.results
    assert (r["write"].is_error, r["write"].payload) == (False, rw(IOVA + 16, 5))
    assert (r["read"].is_error, r["read"].payload) == (False, rw(IOVA + 16, 5, b"hello"))
    assert os.pread(memfd, 19, 16) == b"hello" + bytes(11) + b"abc"
    errors = {k: r[k].error for k in ("unmapped", "too_big", "short_data", "unknown", "with_fd") if r[k].is_error}
    assert errors == {"unmapped": errno.EFAULT, "too_big": errno.E2BIG, "short_data": errno.EINVAL,
                      "unknown": errno.ENOSYS, "with_fd": errno.EINVAL}


def test_client_reads_while_it_sends(scripted, memfd):
    """A2: the server writes 512 KiB to the client's memory while the client sends a 1 MiB REGION_WRITE: neither
    drains its socket unless the client reads while it sends (else both block until a timeout)."""
    big = bytes(range(256)) * 2048

    def send_big_dma_write(server):
        wait_fd(server.conn, select.POLLIN, time.monotonic() + TIMEOUT)  # the client started its REGION_WRITE
        p.send_message(server.conn, 0x900, p.Command.DMA_WRITE, p.TYPE_COMMAND, rw(IOVA, len(big), big),
                       timeout=TIMEOUT)

    def script(server, msg):
        assert msg.command == p.Command.REGION_WRITE and len(msg.payload) == 16 + MAP_SIZE
        dma_reply = server.recv()
        server.results["write"] = (dma_reply.msg_id, dma_reply.is_error, dma_reply.payload)
        server.reply(msg, msg.payload[:16])

    server, path = scripted(script, after_map=send_big_dma_write)
    with VfioDevice.restore(path, timeout=TIMEOUT) as dev:
        dev.dma_map(memfd, 0, IOVA, MAP_SIZE)
        dev.region_write(0, 0, bytes(MAP_SIZE))
    assert server.error is None, server.error
    assert server.results["write"] == (0x900, False, rw(IOVA, len(big)))
    assert os.pread(memfd, len(big), 0) == big


def test_send_failing_part_way_closes_the_connection(scripted):
    """A5: the server stops reading mid-message; the client's send times out after writing part of it, so the
    client closes the connection (the server sees the unfinished message, then end of file) and later commands
    fail at once instead of landing inside the unfinished payload."""
    stop_reading = threading.Event()
    server, path = scripted(lambda server, msg: stop_reading.wait(TIMEOUT))
    dev = VfioDevice.restore(path, timeout=0.5)
    try:
        dev.region_write(0, 0, bytes(MAP_SIZE), posted=True)  # header read by the script, the rest never
        with pytest.raises(DeviceMissing, match="send failed after"):
            dev.region_write(0, 0, bytes(MAP_SIZE))
        with pytest.raises(DeviceMissing, match="not connected"):
            dev.read32(0)
    finally:
        stop_reading.set()
        dev.close()
    server.thread.join(TIMEOUT)
    # After the first message (read whole), only part of the second reached the server, then end of file.
    server.conn.setblocking(True)
    server.conn.settimeout(TIMEOUT)
    received = 0
    while chunk := server.conn.recv(1 << 16):
        received += len(chunk)
    assert 0 < received < p.HEADER_SIZE + 16 + MAP_SIZE


# -- the MANA device as a server for third-party clients ----------------------------------------------
@pytest.fixture
def mana(tmp_path):
    sock = str(tmp_path / "mana.sock")
    proc = start_device(sock, "--run-dir", str(tmp_path))
    yield sock
    end(proc)


def test_dma_map_without_fd_is_accepted_and_a_counted_dma_fault(mana, mem):
    """A1: QEMU maps ROM shadows without an fd. The map succeeds and obeys the overlap/unmap rules; the device
    reaching into it is a DMA fault it counts (here: HWC pages there), and the device keeps serving."""
    with VfioDevice.new(mana) as port:
        port.map_guest_memory(mem)
        rom = 1 << 40
        no_fd = p.DMA_MAP.pack(p.DMA_MAP.size, p.DMA_MAP_READ, 0, rom, 1 << 20)
        port._request(p.Command.DMA_MAP, no_fd)  # the client API always sends its memfd; a VMM does not
        port._request(p.Command.DMA_MAP, no_fd)  # exact repeat: a no-op
        with pytest.raises(Exception, match="EEXIST"):
            port._request(p.Command.DMA_MAP, p.DMA_MAP.pack(p.DMA_MAP.size, 0x3, 0, rom + 4096, 4096))
        drv = TestDriver(port, mem, Pages(mem, mem.layout.worker), timeout=TIMEOUT)
        pfn = rom >> 12
        assert drv.smc_write(EstablishHwc.build(pfn, pfn, pfn, pfn).to_bytes()).status == 1
        assert control_call(mana + ".ctl", "counters")["counters"]["dma_faults"] == 1
        port.dma_unmap(rom, 1 << 20)
        drv.bring_up()  # the HWC in guest memory works


def test_err_and_req_interrupts_have_one_vector(mana, mem):
    """A3: ERR count exactly 1 (else QEMU gives up error recovery), REQ 1; both assignable and de-assignable."""
    with VfioDevice.new(mana) as port:
        for index in (p.IRQ_ERR, p.IRQ_REQ):
            info = port.irq_info(index)
            assert (info.flags, info.count) == (p.IRQ_INFO_EVENTFD, 1)
            efd = os.eventfd(0)
            try:
                port._request(p.Command.DEVICE_SET_IRQS, p.IRQ_SET.pack(20, 0x24, index, 0, 1), fds=[efd])
                port._request(p.Command.DEVICE_SET_IRQS, p.IRQ_SET.pack(20, 0x24, index, 0, 1))  # teardown
            finally:
                os.close(efd)
