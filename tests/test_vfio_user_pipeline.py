"""The driver's attach pipelines its commands (vfio-user spec 1.4: a client may send several commands without
waiting; the server answers in order): connect + VERSION + DEVICE_GET_INFO, then DMA_MAP + REGION_INFO +
IRQ_INFO (one batch for a restore, two for a fresh attach, which may reset the device before it maps memory) instead
of five round trips (issue 10: every round trip of a restore is in the guest's blackout).

The server here answers nothing until it has the whole batch, so a client that waits for each reply before
sending the next command times out."""
from __future__ import annotations

import contextlib
import errno
import select
import socket
import threading
import time

import pytest

from vfkeep.driver.errors import BackingError, DeviceMissing
from vfkeep.memory import MemoryLayout
from vfkeep.vfio_user import client as client_module
from vfkeep.vfio_user import protocol as p
from vfkeep.vfio_user.backing import attach_ahead, open_vfio

LAYOUT = MemoryLayout(guest_pages=16, worker_pages=16, pool_pages=0)
TIMEOUT = 2.0


class BatchServer:
    """Reads each batch (a number of commands) whole before it answers any of them, in order; `fail` names
    a command to answer with EINVAL; `gate`: set once the first batch may be answered."""

    def __init__(self, path: str, batches: list[int], fail: int | None = None, gate: threading.Event | None = None):
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(1)
        self.batches, self.fail, self.gate = batches, fail, gate
        self.seen: list[list[int]] = []
        self.answered = threading.Event()  # the first batch is answered
        self.error: Exception | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            conn, _ = self.listener.accept()
            with conn:
                conn.setblocking(False)
                reader = p.FrameReader()
                for size in self.batches:
                    batch = [p.wait_message(conn, reader, TIMEOUT) for _ in range(size)]
                    self.seen.append([m.command for m in batch])
                    if self.gate is not None and not self.gate.wait(TIMEOUT):
                        raise TimeoutError("the test never opened the gate")
                    for m in batch:
                        m.close_fds()
                        error = errno.EINVAL if m.command == self.fail else 0
                        p.send_message(conn, m.msg_id, m.command, p.TYPE_REPLY | (p.FLAG_ERROR if error else 0),
                                       b"" if error else self._answer(m), error=error, timeout=TIMEOUT)
                    self.answered.set()
                p.wait_message(conn, reader, TIMEOUT)  # until the client hangs up
        except (p.PeerClosed, TimeoutError) as e:
            if len(self.seen) < len(self.batches):
                self.error = e
        except Exception as e:  # noqa: BLE001 - reported to the test
            self.error = e

    @staticmethod
    def _answer(m: p.Message) -> bytes:
        if m.command == p.Command.VERSION:
            return p.encode_version(0, 0, {"max_msg_fds": 16, "max_data_xfer_size": 1 << 20})
        if m.command == p.Command.DEVICE_GET_INFO:
            return p.DEVICE_INFO.pack(p.DEVICE_INFO.size, p.DEVICE_FLAGS_PCI, 9, 5)
        if m.command == p.Command.DEVICE_GET_REGION_INFO:
            return p.REGION_INFO.pack(p.REGION_INFO.size, p.REGION_INFO_READ | p.REGION_INFO_WRITE, 0, 0, 8192, 0)
        if m.command == p.Command.DEVICE_GET_IRQ_INFO:
            return p.IRQ_INFO.pack(p.IRQ_INFO.size, p.IRQ_INFO_EVENTFD, p.IRQ_MSIX, 4)
        if m.command == p.Command.REGION_READ:  # reads return their offset's low byte, repeated
            offset, _, count = p.REGION_ACCESS.unpack_from(m.payload)
            return m.payload[:p.REGION_ACCESS.size] + bytes([offset & 0xFF]) * count
        return b""

    def close(self) -> None:
        self.thread.join(TIMEOUT + 1)
        self.listener.close()


@pytest.fixture
def server(tmp_path):
    made = []

    def start(batches: list[int], fail: int | None = None, gate: threading.Event | None = None) -> tuple[BatchServer, str]:
        path = str(tmp_path / f"batch{len(made)}.sock")
        made.append(BatchServer(path, batches, fail, gate))
        return made[-1], path

    yield start
    for s in made:
        s.close()


RESTORE_BATCH = [p.Command.VERSION, p.Command.DEVICE_GET_INFO, p.Command.DMA_MAP, p.Command.DEVICE_GET_REGION_INFO,
                 p.Command.DEVICE_GET_IRQ_INFO]


def test_a_restore_attach_is_one_pipelined_batch_and_kept_vectors_one_more(server, mem):
    """A restore resets nothing, so handshake and mapping go in one batch; the vectors it needs (the HWC's and a
    kept vport's) are assigned in a second one, one DEVICE_SET_IRQS each."""
    srv, path = server([5, 2])
    backing = open_vfio(path, mem, None, restore=True, timeout=TIMEOUT)
    assert (backing.bar0_len, backing.msix_count) == (8192, 4)
    fds = backing.set_irqs([0, 1])
    assert len(set(fds)) == 2
    backing.close()
    srv.close()
    assert srv.error is None
    assert srv.seen == [RESTORE_BATCH, [p.Command.DEVICE_SET_IRQS] * 2]


def test_a_restore_fetches_the_drivers_first_read_in_its_batch(server, mem):
    """`prefetch`: the register-map read a MANA restore makes first goes in the attach's batch; the driver's read
    of that range is answered from it once, later reads go to the device (no round trip of its own left)."""
    srv, path = server([6, 1])
    backing = open_vfio(path, mem, None, restore=True, timeout=TIMEOUT, prefetch=(0, 40))
    assert backing.read(0, 40) == bytes(40)
    assert backing.read(8, 4) == bytes([8]) * 4  # the device's second batch
    backing.close()
    srv.close()
    assert srv.error is None
    assert srv.seen == [[*RESTORE_BATCH, p.Command.REGION_READ], [p.Command.REGION_READ]]


def test_a_restore_assigns_the_drivers_first_vectors_in_its_batch(server, mem):
    """`irqs`: the vectors a keepalive restore assigns first (the HWC's and a kept vport's) go in the attach's
    batch with the register-map read: one round trip for everything the restore needs before it arms its queues.
    The driver's `set_irqs` of exactly those takes their eventfds; any other assignment goes to the device."""
    srv, path = server([8, 1])
    backing = open_vfio(path, mem, None, restore=True, timeout=TIMEOUT, prefetch=(0, 40), irqs=(0, 1))
    assert backing.read(0, 40) == bytes(40)
    fds = backing.set_irqs([0, 1])
    assert len(set(fds)) == 2 and backing.set_irq(2) not in fds  # the second batch
    backing.close()
    srv.close()
    assert srv.error is None
    assert srv.seen == [[*RESTORE_BATCH, p.Command.REGION_READ, p.Command.DEVICE_SET_IRQS, p.Command.DEVICE_SET_IRQS],
                        [p.Command.DEVICE_SET_IRQS]]


def test_an_attach_sent_ahead_is_answered_before_anyone_waits_for_it_and_read_by_the_open(server, mem):
    """`attach_ahead` (the next worker, before its DMA manager restores): the whole restore attach goes out without
    waiting, so the device (this one answers only a whole batch) serves it while the caller works; the open that
    follows reads those answers, with no exchange of its own."""
    srv, path = server([8])
    pending = attach_ahead(path, mem, timeout=TIMEOUT, prefetch=(0, 40), irqs=(0, 1))
    assert srv.answered.wait(TIMEOUT)  # nobody has read a reply yet
    backing = open_vfio(path, mem, None, restore=True, timeout=TIMEOUT, prefetch=(0, 40), irqs=(0, 1), ahead=pending)
    assert backing.read(0, 40) == bytes(40) and len(set(backing.set_irqs([0, 1]))) == 2
    backing.close()
    srv.close()
    assert srv.error is None
    assert srv.seen == [[*RESTORE_BATCH, p.Command.REGION_READ, p.Command.DEVICE_SET_IRQS, p.Command.DEVICE_SET_IRQS]]


def _settled(pending) -> bool:
    """`settle()` until it is done (True) or the device sends nothing more for TIMEOUT (False)."""
    while not pending.settle():
        if not select.select([pending.fileno()], [], [], TIMEOUT)[0]:
            return False
    return True


def test_an_attach_sent_ahead_settles_once_answered_and_the_open_then_reads_nothing(server, mem, monkeypatch):
    """`settle()` (the next worker, while it waits for the host's go): False while the device has not answered
    every command of the attach, then it finishes the attach; the open after the go takes that, reading nothing."""
    gate = threading.Event()
    srv, path = server([8], gate=gate)
    pending = attach_ahead(path, mem, timeout=TIMEOUT, prefetch=(0, 40), irqs=(0, 1))
    assert pending.settle() is False
    gate.set()
    assert _settled(pending)
    monkeypatch.setattr(client_module.VfioDevice, "_take_replies", lambda *a: pytest.fail("read after the settle"))
    backing = open_vfio(path, mem, None, restore=True, timeout=TIMEOUT, prefetch=(0, 40), irqs=(0, 1), ahead=pending)
    assert backing.read(0, 40) == bytes(40) and len(set(backing.set_irqs([0, 1]))) == 2
    assert (backing.bar0_len, backing.msix_count) == (8192, 4)
    backing.close()
    srv.close()
    assert srv.error is None and not srv.thread.is_alive()


def test_a_settled_attach_that_does_not_fit_is_disconnected_and_one_that_failed_fails_the_open(server, mem, tmp_path):
    """A settled attach the open cannot use (other vectors) is disconnected like an unsettled one; an attach whose
    device vanished before it answered settles on that error, and the open after the go raises it as its own."""
    srv, path = server([8])
    pending = attach_ahead(path, mem, timeout=TIMEOUT, prefetch=(0, 40), irqs=(0, 1))
    assert _settled(pending)
    pending.cancel()
    srv.close()
    assert srv.error is None and not srv.thread.is_alive()  # (it saw the hang-up)

    gone = str(tmp_path / "gone.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(gone)
    listener.listen(1)
    pending = attach_ahead(gone, mem, timeout=TIMEOUT, prefetch=(0, 40), irqs=(0, 1))
    conn, _ = listener.accept()
    conn.close()
    listener.close()
    assert _settled(pending)
    with pytest.raises(DeviceMissing):
        open_vfio(gone, mem, None, restore=True, timeout=TIMEOUT, prefetch=(0, 40), irqs=(0, 1), ahead=pending)


def test_an_attach_sent_ahead_for_other_vectors_is_cancelled_and_the_open_attaches_anew(server, mem):
    """An attach sent ahead that does not fit the open (other vectors: the final state differs from the one it
    was sent for) is disconnected first; the open then makes its own."""
    first, path = server([8])
    pending = attach_ahead(path, mem, timeout=TIMEOUT, prefetch=(0, 40), irqs=(0, 1))
    assert first.answered.wait(TIMEOUT)
    first.listener.close()  # (the open's connection goes to the second server on the same path)
    import os
    os.unlink(path)
    second = BatchServer(path, [7])
    try:
        backing = open_vfio(path, mem, None, restore=True, timeout=TIMEOUT, prefetch=(0, 40), irqs=(0,),
                            ahead=pending)
        backing.close()
    finally:
        second.close()
        first.close()
    assert first.error is None and second.error is None
    assert second.seen == [[*RESTORE_BATCH, p.Command.REGION_READ, p.Command.DEVICE_SET_IRQS]]


def test_a_restore_attach_sends_its_commands_without_fds_together(server, mem, monkeypatch):
    """Each sendmsg of the attach is a wake-up of the device and a system call of the worker in the servicing's
    window: commands without fds leave together, one with fds alone (its fds on the sendmsg that starts with its
    header, vfio-user spec 1.6): [VERSION, DEVICE_GET_INFO], [DMA_MAP + memfd], [REGION_INFO, IRQ_INFO,
    REGION_READ], and one [SET_IRQS + eventfd] per vector."""
    sends = []
    real = p.send_frames

    def counted(sock, frames, command, *, fds=(), **kwargs):
        if threading.current_thread() is threading.main_thread():  # (not the server's replies)
            sends.append((len(frames), len(fds)))
        return real(sock, frames, command, fds=fds, **kwargs)

    monkeypatch.setattr(p, "send_frames", counted)
    monkeypatch.setattr(client_module, "send_frames", counted)
    srv, path = server([8])
    backing = open_vfio(path, mem, None, restore=True, timeout=TIMEOUT, prefetch=(0, 40), irqs=(0, 1))
    backing.close()
    srv.close()
    assert srv.error is None and len(srv.seen[0]) == 8
    assert [n for _, n in sends] == [0, 1, 0, 1, 1], sends


def test_a_fresh_attach_is_two_pipelined_batches(server, mem):
    """A fresh attach may reset the device (when it says it can) before mapping memory: two batches."""
    srv, path = server([2, 3])
    backing = open_vfio(path, mem, None, restore=False, timeout=TIMEOUT)
    backing.close()
    srv.close()
    assert srv.error is None
    assert srv.seen == [RESTORE_BATCH[:2], RESTORE_BATCH[2:]]


def test_a_fresh_attach_fetches_the_drivers_first_read_and_vectors_with_its_mapping(server, mem):
    """A fresh MANA init reads the register map and assigns its vectors first: with `prefetch` and `irqs` both go
    in the mapping's batch (after the handshake, and a reset if there is one), as a restore's do."""
    srv, path = server([2, 6, 1])
    backing = open_vfio(path, mem, None, restore=False, timeout=TIMEOUT, prefetch=(0, 40), irqs=(0, 1))
    assert backing.read(0, 40) == bytes(40)
    fds = backing.set_irqs([0, 1])
    assert len(set(fds)) == 2 and backing.set_irq(2) not in fds  # the third batch
    backing.close()
    srv.close()
    assert srv.error is None
    assert srv.seen == [RESTORE_BATCH[:2], [*RESTORE_BATCH[2:], p.Command.REGION_READ, p.Command.DEVICE_SET_IRQS,
                                            p.Command.DEVICE_SET_IRQS], [p.Command.DEVICE_SET_IRQS]]


def test_an_error_reply_in_a_batch_fails_the_attach_naming_its_command(server, mem):
    srv, path = server([5], fail=p.Command.DEVICE_GET_REGION_INFO)
    with pytest.raises(BackingError, match="DEVICE_GET_REGION_INFO failed: EINVAL"):
        open_vfio(path, mem, None, restore=True, timeout=TIMEOUT)
    srv.close()


def test_a_refused_version_is_the_error_even_with_info_pipelined_behind_it(server, mem):
    srv, path = server([5], fail=p.Command.VERSION)
    with pytest.raises(BackingError, match="VERSION failed: EINVAL"):
        open_vfio(path, mem, None, restore=True, timeout=TIMEOUT)
    srv.close()


def test_posted_writes_go_out_as_one_burst_in_order():
    """`write64_posted_many`: every write a REGION_WRITE without reply, in order, all in one send (the device
    takes them in one wake-up: one read gets them all)."""
    from vfkeep.vfio_user.client import VfioDevice

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    dev = VfioDevice(ours, "pair", TIMEOUT)
    try:
        dev.write64_posted_many([(0x1800, 1), (0x1FF8, 2), (0x1000, 3)])
        data = theirs.recv(1 << 16)
        reader = p.FrameReader()
        reader._buf += data  # parse what that one read returned, nothing more
        msgs = [reader._next() for _ in range(3)]
        assert reader._next() is None
        assert [m.command for m in msgs] == [p.Command.REGION_WRITE] * 3 and all(m.no_reply for m in msgs)
        assert [p.REGION_ACCESS.unpack_from(m.payload) for m in msgs] == [(0x1800, 0, 8), (0x1FF8, 0, 8),
                                                                          (0x1000, 0, 8)]
        assert [int.from_bytes(m.payload[p.REGION_ACCESS.size:], "little") for m in msgs] == [1, 2, 3]
        assert len({m.msg_id for m in msgs}) == 3
    finally:
        dev.close()
        theirs.close()


def test_posted_writes_in_a_batch_leave_together_in_order_at_its_end():
    """`posted_batch`: a write-combining buffer for doorbells. Nothing reaches the socket inside the block, a burst
    of writes (`write64_posted_many`, a queue's arms) included; at its end every posted write is there, in order, as
    consecutive messages — also when the block raises."""
    from vfkeep.vfio_user.client import VfioDevice

    ours, device_end = socket.socketpair()
    ours.setblocking(False)
    device_end.setblocking(False)
    dev = VfioDevice(ours, "pair", TIMEOUT)
    reader = p.FrameReader()
    try:
        for fail in (False, True):
            with pytest.raises(RuntimeError) if fail else contextlib.nullcontext():
                with dev.posted_batch():
                    dev.write64(0x2000, 0, posted=True)
                    dev.write64_posted_many([(0x2008, 1), (0x2010, 2)])
                    with pytest.raises(BlockingIOError):
                        device_end.recv(1, socket.MSG_PEEK)
                    if fail:
                        raise RuntimeError("the batch's caller failed")
            got = [p.wait_message(device_end, reader, TIMEOUT) for _ in range(3)]
            assert [m.command for m in got] == [p.Command.REGION_WRITE] * 3 and all(m.no_reply for m in got)
            assert [p.REGION_ACCESS.unpack_from(m.payload)[0] for m in got] == [0x2000, 0x2008, 0x2010]
            assert [m.msg_id for m in got] == list(range(got[0].msg_id, got[0].msg_id + 3))
    finally:
        dev.close()
        device_end.close()


def test_the_reader_says_by_when_its_messages_had_arrived():
    """`FrameReader.received_at`: just after the socket read that brought the message in, so never before it was
    sent (a device models its latency from it)."""
    ours, theirs = socket.socketpair()
    theirs.setblocking(False)
    reader = p.FrameReader()
    try:
        for i in range(2):
            sent = time.monotonic()
            ours.sendall(p.encode_message(i, p.Command.REGION_WRITE, p.FLAG_NO_REPLY, bytes(24)))
            msg = p.wait_message(theirs, reader, TIMEOUT)
            assert msg.msg_id == i and sent <= reader.received_at <= time.monotonic()
    finally:
        ours.close()
        theirs.close()


@contextlib.contextmanager
def _client_at_the_door(tmp_path, monkeypatch, on_send):
    """A vfio-user server on the test device (its loop is not run) and a client that connected and sent VERSION,
    not yet accepted; `on_send(frames)` sees every send of the server's replies."""
    from vfkeep.vfio_user import server as server_module
    from vfkeep.vfio_user.testdev import TestDevice
    real_send_frames = server_module.send_frames
    monkeypatch.setattr(server_module, "send_frames",
                        lambda sock, frames, *a, **k: (on_send(frames), real_send_frames(sock, frames, *a, **k))[1])
    path = str(tmp_path / "dev.sock")
    srv = server_module.VfioUserServer(path, TestDevice())
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        client.connect(path)
        p.send_message(client, 0, p.Command.VERSION, p.TYPE_COMMAND, p.encode_version(0, 0, {"max_msg_fds": 16}))
        yield srv, client
    finally:
        client.close()
        srv.close()
        srv.loop.close()


def test_the_server_answers_the_commands_that_came_with_the_connect_in_one_burst(tmp_path, monkeypatch):
    """A client pipelines its attach behind the connect: the server's accept serves what already arrived (without
    another pass of its loop, which is not run here), and the replies of one wake-up leave in one send, so the
    client wakes once for the batch."""
    sends = []
    with _client_at_the_door(tmp_path, monkeypatch, lambda frames: sends.append(len(frames))) as (srv, client):
        p.send_message(client, 1, p.Command.DEVICE_GET_INFO, p.TYPE_COMMAND,
                       p.DEVICE_INFO.pack(p.DEVICE_INFO.size, 0, 0, 0))
        srv._accept()
        client.setblocking(False)
        reader = p.FrameReader()
        replies = [reader.read(client), reader.read(client)]
        assert [(r.msg_id, r.command, r.type) for r in replies] == [
            (0, p.Command.VERSION, p.TYPE_REPLY), (1, p.Command.DEVICE_GET_INFO, p.TYPE_REPLY)]
        assert len(sends) == 1 and sends[0] == sum(p.HEADER_SIZE + len(r.payload) for r in replies)


def test_the_server_writes_its_connect_line_after_answering_the_attach(tmp_path, monkeypatch):
    """A reconnect is in a servicing's window and the client waits for the answers to its attach: the server's
    "client connected" line (0.1 ms of its CPU under load) is written after the replies went out, stamped with the
    time of the accept (`mono`, the trace's "device: client connected")."""
    import logging

    events = []

    class Lines(logging.Handler):
        def emit(self, record):
            events.append((record.getMessage(), getattr(record, "mono", None)))

    lines = Lines()
    server_log = logging.getLogger("vfkeep.vfio_user.server")
    server_log.addHandler(lines)
    level = server_log.level
    server_log.setLevel(logging.INFO)  # (setLevel: the logger caches what is enabled)
    try:
        with _client_at_the_door(tmp_path, monkeypatch,
                                 lambda frames: events.append(("replies", time.monotonic_ns()))) as (srv, _):
            before = time.monotonic_ns()
            srv._accept()
    finally:
        server_log.removeHandler(lines)
        server_log.setLevel(level)
    (replies, sent_at), (connected, connected_at) = [e for e in events if e[0] in ("replies", "client connected")]
    assert (replies, connected) == ("replies", "client connected")
    assert before <= connected_at <= sent_at
