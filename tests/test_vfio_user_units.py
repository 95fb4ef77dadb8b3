"""In-process unit tests: wire structs, framing with fds, capabilities, IRQ table rules, DMA space."""
from __future__ import annotations

import errno
import mmap
import os
import select
import socket
import threading

import pytest

from vfkeep.proc import open_fd_count
from vfkeep.vfio_user import protocol as p
from vfkeep.vfio_user.dma import DmaFault, DmaSpace
from vfkeep.vfio_user.irqs import IrqTable
from vfkeep.vfio_user.loop import EventLoop


# -- structs and constants (spec §1.3, §3) -------------------------------------------------------
@pytest.mark.parametrize("layout,size", [
    (p.HEADER, 16), (p.DMA_MAP, 32), (p.DMA_UNMAP, 24), (p.DEVICE_INFO, 16), (p.REGION_INFO, 32),
    (p.IRQ_INFO, 16), (p.IRQ_SET, 20), (p.REGION_ACCESS, 16), (p.VERSION_FIXED, 4)])
def test_struct_sizes(layout, size):
    assert layout.size == size


def test_command_numbers_and_limits():
    assert (p.Command.VERSION, p.Command.DEVICE_SET_IRQS, p.Command.REGION_WRITE, p.Command.DEVICE_RESET) == \
        (1, 8, 10, 13)
    assert p.command_name(99) == "UNKNOWN(99)"
    assert p.MAX_MESSAGE_SIZE == (1 << 20) + 32
    assert p.MAX_MSG_FDS >= 16


# -- framing ------------------------------------------------------------------------------------
@pytest.fixture
def pair():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a.setblocking(False)
    b.setblocking(False)
    yield a, b
    a.close()
    b.close()


def test_message_roundtrip_with_fds(pair):
    a, b = pair
    efd = os.eventfd(0)
    p.send_message(a, 7, p.Command.DEVICE_SET_IRQS, p.TYPE_COMMAND, b"x" * 20, fds=[efd])
    msg = p.wait_message(b, p.FrameReader(), 2)
    assert (msg.msg_id, msg.command, msg.type, msg.payload, len(msg.fds)) == (7, 8, 0, b"x" * 20, 1)
    os.eventfd_write(msg.fds[0], 5)  # the received fd is the same eventfd
    assert os.eventfd_read(efd) == 5
    msg.close_fds()
    os.close(efd)


def test_reader_assembles_byte_by_byte(pair):
    a, b = pair
    raw = p.HEADER.pack(3, p.Command.REGION_READ, 32, 0, 0) + bytes(range(16))
    reader = p.FrameReader()
    for i, byte in enumerate(raw):
        a.send(bytes([byte]))
        msg = reader.read(b)
        assert (msg is None) == (i < len(raw) - 1)
    assert msg.payload == bytes(range(16))


def test_reader_never_reads_into_next_message(pair):
    a, b = pair
    efd = os.eventfd(0)
    p.send_message(a, 1, p.Command.DEVICE_GET_INFO, 0, bytes(16))
    p.send_message(a, 2, p.Command.DMA_MAP, 0, bytes(32), fds=[efd])
    reader = p.FrameReader()
    first, second = p.wait_message(b, reader, 2), p.wait_message(b, reader, 2)
    assert (first.msg_id, first.fds, second.msg_id, len(second.fds)) == (1, [], 2, 1)
    second.close_fds()
    os.close(efd)


def test_reader_takes_a_burst_in_one_read_and_gives_fds_to_their_message(pair):
    a, b = pair
    efd = os.eventfd(0)
    for i in range(5):
        p.send_message(a, i, p.Command.REGION_WRITE, p.FLAG_NO_REPLY, bytes(24))
    p.send_message(a, 5, p.Command.DEVICE_SET_IRQS, 0, bytes(20), fds=[efd])
    for i in range(6, 9):
        p.send_message(a, i, p.Command.REGION_WRITE, p.FLAG_NO_REPLY, bytes(24))

    class CountingSocket:
        reads = 0

        def recvmsg(self, *args):
            CountingSocket.reads += 1
            return b.recvmsg(*args)

    reader, sock = p.FrameReader(), CountingSocket()
    msgs = [reader.read(sock) for _ in range(9)]
    assert [m.msg_id for m in msgs] == list(range(9))
    assert [len(m.fds) for m in msgs] == [0] * 5 + [1] + [0] * 3
    assert CountingSocket.reads <= 3  # the kernel ends a read after the fd message: two reads, not eighteen
    assert reader.read(sock) is None and not reader.buffered
    os.eventfd_write(msgs[5].fds[0], 2)
    assert os.eventfd_read(efd) == 2
    msgs[5].close_fds()
    os.close(efd)


def test_large_message_partial_sends(pair):
    a, b = pair
    payload = os.urandom(p.MAX_DATA_XFER_SIZE + 16)
    t = threading.Thread(target=p.send_message, args=(a, 1, p.Command.REGION_WRITE, 0, payload))
    t.start()
    msg = p.wait_message(b, p.FrameReader(), 5)
    t.join()
    assert msg.payload == payload


@pytest.mark.parametrize("size", [0, 8, 15, p.MAX_MESSAGE_SIZE + 1, 0xFFFFFFFF])
def test_bad_message_size_is_framing_error(pair, size):
    a, b = pair
    a.send(p.HEADER.pack(1, p.Command.DEVICE_GET_INFO, size, 0, 0))
    with pytest.raises(p.FramingError, match="message size"):
        p.wait_message(b, p.FrameReader(), 2)


def test_too_many_fds_is_framing_error_and_fds_closed(pair):
    a, b = pair
    fds = [os.eventfd(0) for _ in range(4)]
    before = open_fd_count()
    p.send_message(a, 1, p.Command.DEVICE_SET_IRQS, 0, bytes(20), fds=fds)
    with pytest.raises(p.FramingError, match="fds"):
        p.wait_message(b, p.FrameReader(max_fds=2), 2)
    assert open_fd_count() == before
    for fd in fds:
        os.close(fd)


def test_eof_and_timeout(pair):
    a, b = pair
    with pytest.raises(TimeoutError):
        p.wait_message(b, p.FrameReader(), 0.05)
    a.close()
    with pytest.raises(p.PeerClosed):
        p.wait_message(b, p.FrameReader(), 2)


def test_send_to_closed_peer(pair):
    a, b = pair
    b.close()
    with pytest.raises(p.PeerClosed):
        p.send_message(a, 1, p.Command.VERSION, 0, bytes(4))


# -- VERSION capabilities (§3.1) ------------------------------------------------------------------
def test_version_encode_decode():
    payload = p.encode_version(0, 0, {"max_msg_fds": 16, "max_data_xfer_size": 1048576})
    assert payload[4:] == b'{"capabilities":{"max_msg_fds":16,"max_data_xfer_size":1048576}}\0'
    assert p.decode_version(payload) == (0, 0, {"max_msg_fds": 16, "max_data_xfer_size": 1048576})
    assert p.decode_version(bytes(4)) == (0, 0, {})
    assert p.decode_version(p.encode_version(0, 2, {"unknown": "ignored"}))[2] == {"unknown": "ignored"}


@pytest.mark.parametrize("text", [
    b'{"capabilities":{}}',  # no NUL
    b'not json\0', b'[1]\0', b'{"capabilities":[]}\0', b'\xff\0',
    b'{"capabilities":{"max_msg_fds":"16"}}\0', b'{"capabilities":{"max_msg_fds":1.5}}\0',
    b'{"capabilities":{"max_data_xfer_size":true}}\0', b'{"capabilities":{"migration":1}}\0',
    b'{"capabilities":{"write_multiple":1}}\0'])
def test_version_bad_capabilities(text):
    with pytest.raises(p.CommandError) as e:
        p.decode_version(bytes(4) + text)
    assert e.value.errno == errno.EINVAL


def test_version_too_short():
    with pytest.raises(p.CommandError):
        p.decode_version(b"\0\0")


# -- IRQ table (§3.7 validation, project latch) ---------------------------------------------------
def _table():
    return IrqTable([0, 0, 4, 1, 0])


def test_latched_interrupt_delivered_once_on_assign():
    t = _table()
    assert t.trigger(1) is False and t.trigger(1) is False  # coalesces into one latch
    assert t.pending() == [1]
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    fds = [efd]
    t.set_irqs(0x24, p.IRQ_MSIX, 1, 1, b"", fds)
    assert fds == []  # taken
    assert os.eventfd_read(efd) == 1 and t.pending() == []
    assert t.trigger(1) is True and os.eventfd_read(efd) == 1
    t.drop_all()
    with pytest.raises(OSError):
        os.fstat(efd)  # the table owned and closed it


def test_clear_pending_forgets_latch():
    t = _table()
    t.trigger(0)
    t.clear_pending()
    assert t.pending() == []


def test_software_trigger_and_deassign():
    t = _table()
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    t.set_irqs(0x24, p.IRQ_MSIX, 2, 1, b"", [efd])
    t.set_irqs(0x21, p.IRQ_MSIX, 2, 1, b"", [])
    assert os.eventfd_read(efd) == 1
    t.set_irqs(0x22, p.IRQ_MSIX, 0, 3, b"\0\0\1", [])
    assert os.eventfd_read(efd) == 1
    t.set_irqs(0x24, p.IRQ_MSIX, 2, 1, b"", [])  # de-assign
    assert not t.assigned(2)
    assert t.trigger(2) is False and t.pending() == [2]


def test_disable_closes_every_vector():
    t = _table()
    for v in range(4):
        t.set_irqs(0x24, p.IRQ_MSIX, v, 1, b"", [os.eventfd(0)])
    t.set_irqs(0x21, p.IRQ_MSIX, 0, 0, b"", [])
    assert not any(t.assigned(v) for v in range(4))


def test_interrupts_raised_in_a_coalescing_block_are_signalled_once_at_its_end():
    """The server's burst of messages: the client is woken once per vector, after the burst; a vector whose
    eventfd was replaced meanwhile is not signalled (its driver is gone); an unassigned one latches at once."""
    t = _table()
    efd, other = os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(0, os.EFD_NONBLOCK)
    t.set_irqs(0x24, p.IRQ_MSIX, 1, 1, b"", [efd])
    t.set_irqs(0x24, p.IRQ_MSIX, 2, 1, b"", [other])
    with t.coalescing():
        assert t.trigger(1) is True and t.trigger(1) is True and t.trigger(2) is True
        assert t.trigger(0) is False and t.pending() == [0]
        with pytest.raises(BlockingIOError):
            os.eventfd_read(efd)  # nothing yet
        replacement = os.eventfd(0, os.EFD_NONBLOCK)
        t.set_irqs(0x24, p.IRQ_MSIX, 2, 1, b"", [replacement])  # vector 2 has a new driver
    assert os.eventfd_read(efd) == 1 and t.delivered == 1
    with pytest.raises(BlockingIOError):
        os.eventfd_read(replacement)
    t.drop_all()


def test_a_held_interrupt_does_not_follow_its_vectors_fd_number_to_a_new_eventfd():
    """The table held (vector: fd number) and signalled at the block's end if the vector's fd still had that number:
    a vector closed and given a new eventfd within one block (its new fd received after the close, as the lowest
    free number: the old one's) woke the new eventfd's owner for an interrupt raised for the old one (a spurious
    wake-up; never a lost one)."""
    t = _table()
    old = os.eventfd(0, os.EFD_NONBLOCK)
    t.set_irqs(0x24, p.IRQ_MSIX, 1, 1, b"", [old])
    with t.coalescing():
        assert t.trigger(1) is True
        t.drop_all()  # (closes `old`: its number is free)
        new = os.eventfd(0, os.EFD_NONBLOCK)
        assert new == old  # the case: the new eventfd has the old one's number
        t.set_irqs(0x24, p.IRQ_MSIX, 1, 1, b"", [new])
    with pytest.raises(BlockingIOError):
        os.eventfd_read(new)
    assert t.delivered == 0
    assert t.trigger(1) is True and os.eventfd_read(new) == 1  # its own interrupts reach it
    t.drop_all()


def test_a_bursts_interrupts_are_signalled_before_its_replies_are_sent(tmp_path):
    """A client that has its reply finds the interrupts the same burst raised signalled already, and consumes them
    before it arms and sleeps (the MANA driver clears vector 0 before each HWC request). Signalled at the end of
    the loop's step instead, after the replies, they woke a driver that had gone on meanwhile (it preempts the
    device as soon as the reply is sent): on a fresh init's first HWC request, one stale wake-up, one more arm
    burst and one more device wake-up."""
    from vfkeep.vfio_user.server import VfioUserServer
    from vfkeep.vfio_user.testdev import REG_DOORBELL, REG_ID, TestDevice
    path = str(tmp_path / "dev.sock")
    server = VfioUserServer(path, TestDevice())
    client = socket.socket(socket.AF_UNIX)
    efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    seen = []
    flush = server._flush_replies

    def watched_flush(conn):
        seen.append(bool(conn.replies) and select.select([efd], [], [], 0)[0] == [efd])
        flush(conn)
    server._flush_replies = watched_flush
    try:
        client.connect(path)
        # As the MANA driver's SMC exchange: posted writes that raise an interrupt, then a read that waits.
        p.send_message(client, 1, p.Command.VERSION, p.TYPE_COMMAND, p.encode_version(0, 0, None))
        p.send_message(client, 2, p.Command.DEVICE_SET_IRQS, p.TYPE_COMMAND, p.IRQ_SET.pack(
            p.IRQ_SET.size, p.IRQ_SET_DATA_EVENTFD | p.IRQ_SET_ACTION_TRIGGER, p.IRQ_MSIX, 1, 1), fds=[efd])
        p.send_message(client, 3, p.Command.REGION_WRITE, p.TYPE_COMMAND | p.FLAG_NO_REPLY,
                       p.REGION_ACCESS.pack(REG_DOORBELL, p.REGION_BAR0, 4) + (1).to_bytes(4, "little"))
        p.send_message(client, 4, p.Command.REGION_READ, p.TYPE_COMMAND,
                       p.REGION_ACCESS.pack(REG_ID, p.REGION_BAR0, 4))
        server.loop.call_later(0.5, server.stop)  # one step takes the connect and the burst behind it
        server.run()
        assert seen and seen[0] is True
        assert os.eventfd_read(efd) == 1  # once
    finally:
        client.close()
        server.close()
        server.loop.close()
        os.close(efd)


def test_setting_the_reset_method_it_already_has_is_a_debug_line(tmp_path, caplog):
    """A reset path's fresh init sets none on a device that has it already, inside its window: only a change is
    worth an INFO line."""
    import logging

    from vfkeep.vfio_user.server import VfioUserServer
    from vfkeep.vfio_user.testdev import TestDevice
    server = VfioUserServer(str(tmp_path / "dev.sock"), TestDevice())
    caplog.clear()  # (its "listening" line)
    try:
        with caplog.at_level(logging.INFO, logger="vfkeep.vfio_user.server"):
            assert server._set_reset_method("none") == {"value": "none", "previous": "none"}
            assert server._set_reset_method("flr") == {"value": "flr", "previous": "none"}
        assert [(r.levelname, r.getMessage(), r.kv) for r in caplog.records] == [
            ("INFO", "reset method set", {"previous": "none", "value": "flr"})]
    finally:
        server.close()
        server.loop.close()


@pytest.mark.parametrize("flags,index,start,count,data,nfds", [
    (0x26, 2, 0, 1, b"", 0),    # two DATA bits
    (0x64, 2, 0, 1, b"", 1),    # unknown bit
    (0x04, 2, 0, 1, b"", 1),    # no ACTION bit
    (0x24, 5, 0, 1, b"", 1),    # index >= num_irqs
    (0x24, 2, 4, 1, b"", 1),    # start >= vectors
    (0x24, 2, 3, 2, b"", 2),    # start + count > vectors
    (0x24, 0, 0, 1, b"", 1),    # INTx has no vectors
    (0x24, 2, 0, 0, b"", 0),    # count 0 but not disable
    (0x21, 2, 1, 0, b"", 0),    # disable needs start 0
    (0x21, 2, 0, 1, b"", 1),    # fds without DATA_EVENTFD
    (0x24, 2, 0, 2, b"", 1),    # fd count != count
    (0x22, 2, 0, 2, b"\1", 0),  # DATA_BOOL with the wrong number of bytes
    (0x21, 2, 0, 1, b"\1", 0),  # data bytes without DATA_BOOL
    (0x29, 3, 0, 1, b"", 0),    # ERR: action other than TRIGGER
    (0x09, 2, 0, 1, b"", 0),    # MASK: not advertised
    (0x11, 2, 0, 1, b"", 0),    # UNMASK: not advertised
])
def test_set_irqs_validation(flags, index, start, count, data, nfds):
    t = _table()
    fds = [os.eventfd(0) for _ in range(nfds)]
    with pytest.raises(p.CommandError) as e:
        t.set_irqs(flags, index, start, count, data, fds)
    assert e.value.errno == errno.EINVAL
    assert len(fds) == nfds  # nothing taken: the caller closes them
    p.close_fds(fds)


def test_set_irqs_rejects_non_eventfd():
    r, w = os.pipe()
    fds = [w]
    with pytest.raises(p.CommandError, match="not an eventfd"):
        _table().set_irqs(0x24, p.IRQ_MSIX, 0, 1, b"", fds)
    p.close_fds(fds)
    os.close(r)


def test_trigger_out_of_range():
    with pytest.raises(ValueError, match="vector 4"):
        _table().trigger(4)


# -- DMA space (§3.2-3.3) -----------------------------------------------------------------------
@pytest.fixture
def memfd():
    fd = os.memfd_create("t")
    os.ftruncate(fd, 16 * 4096)
    yield fd
    os.close(fd)


def _code(fn, *args):
    with pytest.raises(p.CommandError) as e:
        fn(*args)
    return e.value.errno


def test_dma_map_view_read_write(memfd):
    d = DmaSpace(8)
    assert d.map(memfd, 4096, 0x10000, 8192, 0x3) is True
    d.write(0x10000 + 10, b"hello")
    assert os.pread(memfd, 5, 4096 + 10) == b"hello"  # shared with the file
    os.pwrite(memfd, b"world", 4096 + 8000)
    assert d.read(0x10000 + 8000, 5) == b"world"
    assert bytes(d.view(0x10000 + 10, 5)) == b"hello"
    for iova, n in [(0xFFFF, 2), (0x10000 + 8190, 4), (0, 1), (0x20000, 1), (0x10000, -1)]:
        with pytest.raises(DmaFault):
            d.read(iova, n)


def test_dma_mapping_is_the_whole_range_with_its_permissions(memfd):
    d = DmaSpace(8)
    d.map(memfd, 0, 0x10000, 8192, 0x3)
    d.map(memfd, 8192, 0x20000, 4096, 0x1)  # read only
    buf, base = d.mapping(0x10000 + 100, 8, write=True)
    assert (base, len(buf)) == (0x10000, 8192)
    buf[100:105] = b"hello"
    assert d.read(0x10000 + 100, 5) == b"hello"
    assert d.mapping(0x20000, 1)[1] == 0x20000
    for iova, n, write in [(0x20000, 1, True), (0x10000 + 8190, 4, False), (0x30000, 1, False)]:
        with pytest.raises(DmaFault):
            d.mapping(iova, n, write)


def test_dma_map_unaligned_file_offset(memfd):
    d = DmaSpace(8)
    os.pwrite(memfd, b"xy", 100)
    d.map(memfd, 100, 0x5000, 10, 0x7)
    assert d.read(0x5000, 2) == b"xy"


def test_dma_repeat_overlap_limit_unmap(memfd):
    d = DmaSpace(2)
    d.map(memfd, 0, 0x0, 4096, 0x3)
    assert d.map(memfd, 0, 0x0, 4096, 0x3) is False  # exact repeat: no-op
    assert len(d) == 1
    assert _code(d.map, memfd, 0, 0x0, 4096, 0x7) == errno.EEXIST  # same range, other flags
    assert _code(d.map, memfd, 0, 0x800, 4096, 0x3) == errno.EEXIST
    d.map(memfd, 4096, 0x1000, 4096, 0x3)  # adjacent is fine
    assert _code(d.map, memfd, 8192, 0x2000, 4096, 0x3) == errno.ENOSPC
    assert _code(d.unmap, 0x0, 8192) == errno.ENOENT
    assert _code(d.unmap, 0x800, 4096) == errno.ENOENT
    d.unmap(0x0, 4096)
    with pytest.raises(DmaFault):
        d.read(0x0, 1)
    assert d.read(0x1000, 1) == b"\0"
    d.unmap_all()
    assert len(d) == 0


def test_dma_map_without_fd_is_a_message_only_range(memfd):
    """Addendum A1: accepted, subject to the overlap/limit/unmap rules, unreachable for the device."""
    d = DmaSpace(2)
    assert d.map(None, 0x1234, 0x10000, 4096, p.DMA_MAP_READ) is True  # offset ignored
    assert d.map(None, 0, 0x10000, 4096, p.DMA_MAP_READ) is False  # exact repeat: no-op
    assert _code(d.map, memfd, 0, 0x10800, 4096, 0x3) == errno.EEXIST
    for access in (lambda: d.read(0x10000, 4), lambda: d.write(0x10000, b"x"), lambda: d.view(0x10000, 1)):
        with pytest.raises(DmaFault, match="without an fd"):
            access()
    d.map(memfd, 0, 0, 4096, 0x3)
    assert _code(d.map, None, 0, 0x20000, 4096, 0x3) == errno.ENOSPC  # counts toward max_dma_maps
    assert _code(d.unmap, 0x10000, 8192) == errno.ENOENT
    d.unmap(0x10000, 4096)
    d.unmap_all()
    assert len(d) == 0


@pytest.mark.parametrize("flags,size,offset", [(0x8, 4096, 0), (0x10, 4096, 0), (0x0, 4096, 0), (0x3, 0, 0),
                                               (0x3, 4096, 16 * 4096)])
def test_dma_map_bad_arguments(memfd, flags, size, offset):
    assert _code(DmaSpace(8).map, memfd, offset, 0, size, flags) == errno.EINVAL


def test_dma_read_only_mapping(memfd):
    d = DmaSpace(8)
    d.map(memfd, 0, 0, 4096, p.DMA_MAP_READ)
    with pytest.raises(DmaFault, match="not writable"):
        d.write(0, b"x")
    assert d.view(0, 4).readonly


def test_dma_unmap_while_device_holds_a_view(memfd):
    d = DmaSpace(8)
    d.map(memfd, 0, 0, 4096, 0x3)
    held = d.view(0, 16)
    d.unmap(0, 4096)  # must not raise although the mmap cannot be closed yet
    with pytest.raises(DmaFault):
        d.view(0, 16)
    held.release()


def test_dma_map_non_mappable_fd():
    r, w = os.pipe()
    try:
        with pytest.raises(p.CommandError):
            DmaSpace(8).map(r, 0, 0, mmap.PAGESIZE, 0x3)
    finally:
        os.close(r)
        os.close(w)


# -- event loop ---------------------------------------------------------------------------------
def test_event_loop_timers_readers_and_stop():
    loop = EventLoop()
    seen = []
    r, w = os.pipe()

    def on_read():
        seen.append(("read", os.read(r, 10)))
        loop.remove_reader(r)

    loop.add_reader(r, on_read)
    loop.call_later(0.02, lambda: seen.append("late"))
    loop.call_later(0.0, lambda: seen.append("soon"))
    loop.call_later(0.01, lambda: 1 / 0)  # a failing callback is logged, the loop goes on
    loop.call_later(0.005, lambda: seen.append("cancelled")).cancel()
    loop.call_later(0.03, loop.stop)
    os.write(w, b"x")
    loop.run()
    assert seen[-1] == "late" and set(seen) == {("read", b"x"), "soon", "late"}
    threading.Timer(0.01, loop.stop).start()  # stop() from another thread wakes select()
    loop.run()
    loop.close()
    os.close(r)
    os.close(w)


def test_a_timer_s_interrupts_are_signalled_once_after_it():
    """What the server sets as the loop's step: a modelled HWC answer (a timer) posts two CQEs, each raising
    the vector; the driver is woken once, after the whole answer, not at the first CQE."""
    loop, t = EventLoop(), _table()
    loop.step = t.coalescing
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    t.set_irqs(0x24, p.IRQ_MSIX, 0, 1, b"", [efd])
    seen = []

    def answer():
        t.trigger(0)
        with pytest.raises(BlockingIOError):
            os.eventfd_read(efd)  # not signalled yet: the answer is not complete
        t.trigger(0)
        seen.append("answered")

    loop.call_later(0.001, answer)
    loop.call_later(0.005, loop.stop)
    loop.run()
    assert seen == ["answered"] and os.eventfd_read(efd) == 1 and t.delivered == 1
    loop.close()
    t.drop_all()


def test_version_deeply_nested_json():
    with pytest.raises(p.CommandError):
        p.decode_version(bytes(4) + b"[" * 100000 + b"\0")


def test_a_leaving_clients_mappings_are_retired_and_the_next_client_takes_the_same_range_over(memfd):
    """A disconnect retires the client's mappings: out of the table at once (the device cannot reach them), not
    unmapped; the next client's DMA_MAP of the same range of the same file with the same flags takes one over (no
    new mmap: a servicing's new worker maps all of guest memory again, and the device's first accesses then take
    no page faults); one that no client took over is unmapped by `release_retired`."""
    d = DmaSpace(4)
    d.map(memfd, 0, 0x0, 8192, 0x3)
    d.map(memfd, 8192, 0x10000, 4096, 0x3)
    kept, other = d._maps[0].mm, d._maps[1].mm
    assert d.files_mapped == 2
    d.retire_all()
    assert (len(d), d.retired) == (0, 2)
    with pytest.raises(DmaFault):
        d.read(0x0, 1)
    assert d.map(memfd, 0, 0x0, 8192, 0x3) is True
    assert (len(d), d.retired, d.files_mapped) == (1, 1, 2) and d._maps[0].mm is kept
    assert d.map(memfd, 8192, 0x10000, 4096, 0x1) is True  # other flags: a mapping of its own
    assert d.files_mapped == 3 and d.retired == 1
    d.release_retired()
    assert d.retired == 0 and other.closed and not kept.closed
    d.write(0x10, b"kept")
    assert os.pread(memfd, 4, 0x10) == b"kept"
    d.retire_all()
    d.retire_all()  # a second disconnect unmaps what the first retired
    assert kept.closed and d.retired == 0
