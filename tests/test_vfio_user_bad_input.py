"""Malformed input never takes the device down (spec §1.5, §3): bad commands get error replies
and the session goes on; unparsable streams close the connection; after every case a normal
client is served and the device process is alive. One device serves the whole module."""
from __future__ import annotations

import array
import errno
import os
import socket
import time

import pytest
from hypothesis import given, settings, strategies as st

from vfkeep.proc import end
from vfkeep.vfio_user import VfioDevice, protocol as p
from vfkeep.vfio_user.testdev import ID_VALUE, REG_ID, start_testdev

CAPS = {"max_msg_fds": 16, "max_data_xfer_size": 1 << 20}


@pytest.fixture(scope="module")
def device(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    sock = d / "dev.sock"
    proc = start_testdev(sock, run_dir=d)
    yield sock, proc
    end(proc)


@pytest.fixture
def raw(device):
    """A hand-driven connection; afterwards the device must still serve a normal client."""
    sock, proc = device
    conns = []

    def connect(negotiate: bool = True) -> Raw:
        r = Raw(sock)
        conns.append(r)
        if negotiate:
            r.send(p.Command.VERSION, p.encode_version(0, 0, CAPS))
            assert not r.recv().is_error
        return r

    fds_before = received_fds(proc.pid)
    yield connect
    for r in conns:
        r.sock.close()
    with VfioDevice.restore(sock) as dev:
        assert dev.read32(REG_ID) == ID_VALUE
    assert proc.poll() is None
    deadline = time.monotonic() + 5  # the device closes every fd it was sent
    while received_fds(proc.pid) != fds_before:
        assert time.monotonic() < deadline, f"device leaks fds: {received_fds(proc.pid)} != {fds_before}"
        time.sleep(0.01)


def received_fds(pid: int) -> list[str]:
    """The device's non-socket fds (eventfds, pipes, memfds a client could leak into it); sockets
    come and go with connections and are left out."""
    targets = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            targets.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except FileNotFoundError:
            pass
    return sorted(t for t in targets if not t.startswith("socket:"))


class Raw:
    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))
        self.sock.setblocking(False)
        self.reader = p.FrameReader()

    def send(self, command: int, payload: bytes = b"", *, flags: int = 0, size: int | None = None,
             fds=(), msg_id: int = 1) -> None:
        """Raw bytes so the header can lie about the size."""
        size = p.HEADER_SIZE + len(payload) if size is None else size
        data = p.HEADER.pack(msg_id, command, size, flags, 0) + payload
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
        self.sock.setblocking(True)
        self.sock.sendmsg([data], anc)
        self.sock.setblocking(False)

    def recv(self, timeout: float = 5.0) -> p.Message:
        return p.wait_message(self.sock, self.reader, timeout)

    def error(self, command: int, payload: bytes = b"", **kw) -> int:
        """Send a command expected to fail; return the errno of its error reply."""
        self.send(command, payload, **kw)
        reply = self.recv()
        assert reply.flags == p.TYPE_REPLY | p.FLAG_ERROR and reply.payload == b"" and reply.command == command
        return reply.error

    def closed(self, timeout: float = 5.0) -> bool:
        """True if the server closes the connection (after at most one error reply)."""
        deadline = time.monotonic() + timeout
        try:
            while True:
                msg = p.wait_message(self.sock, self.reader, max(0.0, deadline - time.monotonic()))
                assert msg.is_error
        except p.PeerClosed:
            return True
        except TimeoutError:
            return False

    def works(self) -> None:
        self.send(p.Command.DEVICE_GET_INFO, p.DEVICE_INFO.pack(16, 0, 0, 0), msg_id=77)
        reply = self.recv()
        assert (reply.msg_id, reply.is_error) == (77, False)


def access(offset, region, count, data=b""):
    return p.REGION_ACCESS.pack(offset, region, count) + data


# -- stream errors: the connection is closed ----------------------------------------------------
@pytest.mark.parametrize("size", [0, 8, 15])
def test_header_size_below_16_closes(raw, size):
    r = raw()
    r.send(p.Command.DEVICE_GET_INFO, size=size)
    assert r.closed()


def test_oversize_message_closes(raw):
    r = raw()
    r.send(p.Command.REGION_WRITE, access(0, 0, 4, bytes(4)), size=p.MAX_MESSAGE_SIZE + 1)
    assert r.closed()


def test_reply_where_command_expected_closes(raw):
    r = raw()
    r.send(p.Command.DEVICE_GET_INFO, p.DEVICE_INFO.pack(16, 0, 0, 0), flags=p.TYPE_REPLY)
    assert r.closed()


def test_garbage_closes(raw):
    r = raw(negotiate=False)
    r.sock.send(os.urandom(5) + b"\xff\xff\xff\x7f" + os.urandom(100))
    assert r.closed()


def test_too_many_fds_closes(raw):
    r = raw()
    fds = [os.eventfd(0) for _ in range(p.MAX_MSG_FDS + 1)]
    r.send(p.Command.DEVICE_SET_IRQS, p.IRQ_SET.pack(20, 0x24, 2, 0, 4), fds=fds)
    for fd in fds:
        os.close(fd)
    assert r.closed()


def test_disconnect_mid_message(raw):
    r = raw()
    r.send(p.Command.REGION_WRITE, access(0, 0, 4), size=p.HEADER_SIZE + 100)  # promises more bytes
    fd = os.eventfd(0)
    r.send(p.Command.DEVICE_SET_IRQS, p.IRQ_SET.pack(20, 0x24, 2, 0, 1), fds=[fd])  # fds inside the payload
    os.close(fd)
    # the fixture closes the connection here and checks the device serves on, without leaks


# -- VERSION rules (§3.1) -------------------------------------------------------------------------
def test_command_before_version_is_refused_and_closed(raw):
    r = raw(negotiate=False)
    assert r.error(p.Command.DEVICE_GET_INFO, p.DEVICE_INFO.pack(16, 0, 0, 0)) == errno.EINVAL
    assert r.closed()


def test_second_version_is_refused_and_session_continues(raw):
    r = raw()
    assert r.error(p.Command.VERSION, p.encode_version(0, 0, CAPS)) == errno.EINVAL
    r.works()


@pytest.mark.parametrize("payload", [
    p.encode_version(1, 0, None), b"\0\0", bytes(4) + b"{bad json}\0", bytes(4) + b'{"capabilities":{}}',
    p.encode_version(0, 0, {"max_msg_fds": 5000}), p.encode_version(0, 0, {"max_msg_fds": "x"})])
def test_bad_version_is_refused_and_closed(raw, payload):
    r = raw(negotiate=False)
    assert r.error(p.Command.VERSION, payload) == errno.EINVAL
    assert r.closed()


def test_version_with_fds_is_refused(raw):
    r = raw(negotiate=False)
    fd = os.eventfd(0)
    assert r.error(p.Command.VERSION, p.encode_version(0, 0, CAPS), fds=[fd]) == errno.EINVAL
    os.close(fd)
    assert r.closed()


# -- command errors: error reply, session continues ---------------------------------------------
@pytest.mark.parametrize("command", [0, 6, 11, 12, 14, 15, 16, 17, 18, 99, 0xFFFF])
def test_unknown_or_unsupported_command(raw, command):
    r = raw()
    assert r.error(command, bytes(16)) == errno.EINVAL
    r.works()


@pytest.mark.parametrize("command,payload", [
    (p.Command.DEVICE_GET_INFO, b""),                              # header-only command other than RESET
    (p.Command.DEVICE_GET_INFO, bytes(8)),                         # short payload
    (p.Command.DEVICE_GET_INFO, p.DEVICE_INFO.pack(8, 0, 0, 0)),   # argsz too small
    (p.Command.DEVICE_GET_REGION_INFO, p.REGION_INFO.pack(16, 0, 0, 0, 0, 0)),
    (p.Command.DEVICE_GET_IRQ_INFO, p.IRQ_INFO.pack(16, 0, 7, 0)),
    (p.Command.REGION_READ, bytes(20)),
    (p.Command.REGION_WRITE, bytes(8)),
    (p.Command.DMA_UNMAP, p.DMA_UNMAP.pack(24, 0x1, 0, 0)),        # dirty bitmap: not supported
    (p.Command.DMA_UNMAP, p.DMA_UNMAP.pack(24, 0x2, 4096, 0)),     # UNMAP_ALL needs 0/0
    (p.Command.DEVICE_RESET, bytes(4)),                            # reset has no payload
    (p.Command.DEVICE_RESET, b""),                                 # and is refused with reset_method none
])
def test_malformed_payload(raw, command, payload):
    r = raw()
    assert r.error(command, payload) == errno.EINVAL
    r.works()


@pytest.mark.parametrize("offset,region,count,code", [
    (4094, 0, 4, errno.EINVAL),                             # crosses the end of BAR0
    (4096, 0, 4, errno.EINVAL),
    (0, 1, 4, errno.EINVAL),                                # BAR1 not implemented
    (0, 9, 4, errno.EINVAL),                                # region >= num_regions
    (0xFFFFFFFFFFFFFFFF, 7, 4, errno.EINVAL),
    (0, 0, (1 << 20) + 1, errno.E2BIG),
])
def test_region_read_out_of_range(raw, offset, region, count, code):
    r = raw()
    assert r.error(p.Command.REGION_READ, access(offset, region, count)) == code
    r.works()


def test_region_write_out_of_range_and_count_mismatch(raw):
    r = raw()
    assert r.error(p.Command.REGION_WRITE, access(4094, 0, 4, bytes(4))) == errno.EINVAL
    assert r.error(p.Command.REGION_WRITE, access(0, 7, 4, bytes(3))) == errno.EINVAL
    assert r.error(p.Command.REGION_WRITE, access(0, 0, 2, bytes(4))) == errno.EINVAL
    r.works()


def test_failed_posted_write_sends_nothing(raw):
    r = raw()
    r.send(p.Command.REGION_WRITE, access(8192, 0, 4, bytes(4)), flags=p.FLAG_NO_REPLY, msg_id=5)
    r.works()  # the first reply to arrive is the GET_INFO one


def test_set_irqs_missing_fds(raw):
    r = raw()
    fd = os.eventfd(0)
    assert r.error(p.Command.DEVICE_SET_IRQS, p.IRQ_SET.pack(20, 0x24, 2, 0, 2), fds=[fd]) == errno.EINVAL
    assert r.error(p.Command.DEVICE_SET_IRQS, p.IRQ_SET.pack(24, 0x24, 2, 0, 1)) == errno.EINVAL  # argsz lies
    os.close(fd)
    r.works()


def test_set_irqs_with_a_non_eventfd(raw):
    r = raw()
    rd, wr = os.pipe()
    assert r.error(p.Command.DEVICE_SET_IRQS, p.IRQ_SET.pack(20, 0x24, 2, 0, 1), fds=[wr]) == errno.EINVAL
    os.close(rd)
    os.close(wr)
    r.works()


def test_dma_map_extra_fds_and_bad_arguments(raw):
    r = raw()
    fd = os.memfd_create("t")
    os.ftruncate(fd, 8192)
    body = p.DMA_MAP.pack(32, 0x3, 0, 0, 4096)
    assert r.error(p.Command.DMA_MAP, body, fds=[fd, fd]) == errno.EINVAL
    assert r.error(p.Command.DMA_MAP, p.DMA_MAP.pack(32, 0x3, 4096, 0, 8192), fds=[fd]) == errno.EINVAL  # past EOF
    assert r.error(p.Command.DMA_MAP, p.DMA_MAP.pack(16, 0x3, 0, 0, 4096), fds=[fd]) == errno.EINVAL  # argsz
    assert r.error(p.Command.DMA_MAP, p.DMA_MAP.pack(32, 0x3, 0, 0, 4096) + bytes(4), fds=[fd]) == errno.EINVAL
    os.close(fd)
    r.works()


def test_fds_on_a_command_that_takes_none(raw):
    r = raw()
    fd = os.eventfd(0)
    assert r.error(p.Command.DEVICE_GET_INFO, p.DEVICE_INFO.pack(16, 0, 0, 0), fds=[fd]) == errno.EINVAL
    os.close(fd)
    r.works()


def test_stale_socket_file_is_replaced(tmp_path):
    sock = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(sock))
    s.close()  # a socket file nobody listens on, as a killed device leaves it
    proc = start_testdev(sock, run_dir=tmp_path)
    try:
        with VfioDevice.restore(sock) as dev:
            assert dev.read32(REG_ID) == ID_VALUE
    finally:
        end(proc)
    assert not sock.exists()  # removed on a clean exit


@settings(max_examples=150, deadline=None)
@given(command=st.one_of(st.integers(0, 20), st.integers(0, 0xFFFF)),
       flags=st.sampled_from([0, p.FLAG_NO_REPLY, 0x2, 0x20, 0xFFFFFFC0]),
       payload=st.one_of(st.binary(max_size=64), st.builds(lambda a, b: a + b, st.sampled_from(
           [p.REGION_ACCESS.pack(0, 0, 4), p.REGION_ACCESS.pack(8, 0, 4), p.IRQ_SET.pack(20, 0x21, 2, 0, 0)]),
           st.binary(max_size=8))))
def test_random_commands_never_hurt_the_device(device, command, flags, payload):
    sock, proc = device
    r = Raw(sock)
    try:
        r.send(p.Command.VERSION, p.encode_version(0, 0, CAPS))
        r.recv()
        try:
            r.send(command, payload, flags=flags, msg_id=1)
            r.send(p.Command.DEVICE_GET_INFO, p.DEVICE_INFO.pack(16, 0, 0, 0), msg_id=77)
            while (reply := r.recv()).msg_id != 77:
                assert reply.msg_id == 1 and reply.type == p.TYPE_REPLY
            assert not reply.is_error
        except (p.PeerClosed, BrokenPipeError, ConnectionResetError):
            assert flags & p.FLAG_TYPE_MASK  # only a non-command message closes the connection
    finally:
        r.sock.close()
    assert proc.poll() is None
