"""vfio-user server (spec vfio-user.md): one client at a time on a single-threaded loop.

Nothing a client sends may take the device process down: every bad command becomes an error
reply, every unparsable stream a closed connection, and the next client is then served. A
client disconnect drops its DMA mappings and eventfds; the device keeps its state unless its
`reset_method` is `flr` (spec §5.2, §5.4).

For third-party clients (a VMM's vfio-user client, spec addendum): DMA_MAP without an fd is accepted
as a range the device cannot reach (A1); ERR and REQ report one vector each (A3); the VERSION reply
carries only the capabilities the client proposed (A4); a reply that cannot be sent in full closes
the connection (A5). This server never sends DMA_READ/DMA_WRITE.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import socket
import struct
import time

from vfkeep.log import hold_lines, kv, kv_at, write_held_lines
from vfkeep.proc import freeze_heap
from vfkeep.sockets import listen_unix, unlink_if_ours

from .control import control_server
from .device import RESET_FLR, VfioUserDevice
from .dma import DmaSpace
from .irqs import IrqTable
from .loop import EventLoop
from .protocol import (DEFAULT_MAX_DMA_MAPS, DEFAULT_MAX_MSG_FDS, DEVICE_FLAGS_PCI, DEVICE_FLAGS_RESET, DEVICE_INFO, DMA_MAP,
                       DMA_UNMAP, DMA_UNMAP_ALL, FLAG_ERROR, IRQ_ERR, IRQ_INFO, IRQ_REQ,
                       IRQ_INFO_EVENTFD, IRQ_SET, MAX_DATA_XFER_SIZE, MAX_MSG_FDS, NUM_PCI_IRQS, NUM_PCI_REGIONS,
                       PAGE_SIZES, REGION_ACCESS, REGION_INFO, REGION_INFO_READ, REGION_INFO_WRITE, TYPE_COMMAND,
                       TYPE_REPLY, VERSION_FIXED, VERSION_MAJOR, VERSION_MINOR, Command, CommandError, FrameReader, FramingError,
                       Message, PeerClosed, command_name, decode_version, encode_message, encode_version, send_frames,
                       send_message)

log = logging.getLogger("vfkeep.vfio_user.server")

#: A client that does not drain its socket for this long is treated as gone.
SEND_TIMEOUT_S = 5.0
#: Client messages handled per wake-up. The socket stays readable, so the loop comes back for the rest
#: after serving the control channel, backends and timers: a client posting doorbells back to back can
#: keep the device busy but cannot starve them.
MESSAGES_PER_WAKEUP = 64
#: A reply with a payload this big (a large REGION_READ) is sent at once with the ones held before it.
HELD_REPLY_BYTES = 1 << 16
#: A client's disconnect holds the device's log lines this long (`vfkeep.log.hold_lines`; each keeps its `mono`): in
#: a servicing the old worker's disconnect, the new one's connect and attach are inside the guest's blackout, where
#: formatting and writing a line cost the device 0.1-0.2 ms of CPU each on a loaded machine.
DISCONNECT_LINES_HELD_S = 0.25
#: Commands logged only at DEBUG: register traffic is the data path, and the ones a reconnecting driver sends
#: are a servicing's critical path (their own lines, version, dma map, set irqs, are DEBUG too: every line costs
#: the device tens of microseconds while the driver waits; "client connected" marks the attach at INFO).
_QUIET = {Command.REGION_READ, Command.REGION_WRITE, Command.VERSION, Command.DEVICE_GET_INFO,
          Command.DEVICE_GET_REGION_INFO, Command.DEVICE_GET_IRQ_INFO, Command.DMA_MAP, Command.DEVICE_SET_IRQS}


class _Connection:
    def __init__(self, sock: socket.socket, epoch: int):
        self.sock = sock
        self.epoch = epoch
        self.reader = FrameReader(MAX_MSG_FDS)
        self.negotiated = False
        #: Replies to the commands of one wake-up (`_readable`), sent together at its end: the client wakes once
        #: for a pipelined batch (an attach: up to ten commands), not once per reply. None outside a wake-up.
        self.replies: list[tuple[int, bytes]] | None = None


class VfioUserServer:
    """Serves `device` on `socket_path`; control channel on `control_path` (default `<path>.ctl`)."""

    def __init__(self, socket_path: str | os.PathLike, device: VfioUserDevice, *,
                 control_path: str | os.PathLike | None = None, max_dma_maps: int = DEFAULT_MAX_DMA_MAPS,
                 loop: EventLoop | None = None):
        self.socket_path = os.fspath(socket_path)
        self.device = device
        self.loop = loop or EventLoop()
        self.dma = DmaSpace(max_dma_maps)
        self._version_replies: dict[tuple, bytes] = {}  # (minor, the proposed keys we answer) -> VERSION reply
        # ERR and REQ: one vector each, whatever the device (addendum A3: QEMU gives up error recovery
        # unless ERR has exactly 1). Assignable; never signalled: no unrecoverable error or removal
        # request is modelled.
        self.irqs = IrqTable([1 if i in (IRQ_ERR, IRQ_REQ) else device.irq_count(i) for i in range(NUM_PCI_IRQS)])
        # The interrupts of one wake-up (a burst of client messages, a timer such as a modelled HWC answer, a
        # backend's frames): once per vector, after all of it, so the client is woken once and finds it done.
        self.loop.step = self.irqs.coalescing
        self.epoch = 0
        self.resets = 0
        self._regions = {i: (size, flags & (REGION_INFO_READ | REGION_INFO_WRITE))
                         for i, (size, flags) in device.regions().items()}
        self._num_regions = max(NUM_PCI_REGIONS, max(self._regions, default=0) + 1)
        self._conn: _Connection | None = None
        self._listener, self._inode = listen_unix(self.socket_path)
        try:
            self.control = control_server(control_path or self.socket_path + ".ctl", self.loop)
        except OSError:
            unlink_if_ours(self.socket_path, self._inode)  # nothing serves it
            self._listener.close()
            raise
        self.loop.add_reader(self._listener.fileno(), self._accept)
        self.control.register("ping", lambda: {"pid": os.getpid()})
        self.control.register("epoch", lambda: {"epoch": self.epoch, "connected": self.connected})
        self.control.register("get_reset_method", lambda: {"value": device.reset_method})
        self.control.register("set_reset_method", self._set_reset_method)
        self.control.register("write_log", self._write_log)
        self._handlers = {
            Command.VERSION: self._version,
            Command.DMA_MAP: self._dma_map,
            Command.DMA_UNMAP: self._dma_unmap,
            Command.DEVICE_GET_INFO: self._get_info,
            Command.DEVICE_GET_REGION_INFO: self._get_region_info,
            Command.DEVICE_GET_IRQ_INFO: self._get_irq_info,
            Command.DEVICE_SET_IRQS: self._set_irqs,
            Command.REGION_READ: self._region_read,
            Command.REGION_WRITE: self._region_write,
            Command.DEVICE_RESET: self._reset,
        }
        device.attached(self)
        kv(log, logging.INFO, "vfio-user server listening", socket=self.socket_path,
           reset_method=device.reset_method, regions=len(self._regions))

    @property
    def connected(self) -> bool:
        return self._conn is not None

    def received_at(self) -> float:
        """When the client's message being handled had reached the device at the latest (CLOCK_MONOTONIC s: the
        socket read that brought it in); now if no client is connected."""
        conn = self._conn
        return conn.reader.received_at if conn is not None else time.monotonic()

    def run(self) -> None:
        self.loop.run()

    def stop(self) -> None:
        self.loop.stop()

    def close(self) -> None:
        """Release sockets and mappings without touching device state (process shutdown)."""
        if self._conn is not None:
            self._conn.reader.discard()
            self._conn.sock.close()
            self._conn = None
        self.dma.unmap_all()
        self.dma.release_retired()
        self.irqs.drop_all()
        self.control.close()
        self.loop.remove_reader(self._listener.fileno())
        unlink_if_ours(self.socket_path, self._inode)
        self._listener.close()

    # -- connection lifecycle -------------------------------------------------------------------
    def _accept(self) -> None:
        try:
            sock, _ = self._listener.accept()
        except (BlockingIOError, ConnectionAbortedError):
            return
        connected_at = time.monotonic_ns()
        sock.setblocking(False)
        self.epoch += 1
        epoch = self.epoch
        self._conn = _Connection(sock, epoch)
        # One client at a time: later ones wait in the listen backlog until this one is gone.
        self.loop.remove_reader(self._listener.fileno())
        self.loop.add_reader(sock.fileno(), self._readable)
        self.device.client_connected(epoch)
        # A client pipelines its attach behind the connect (open_vfio): serve what already arrived now, not
        # after another pass of the loop (a reconnect inside a servicing's window waits for it). The line says
        # when the client connected but is written once that is answered (formatting and writing it took the
        # device 0.1 ms of CPU under load, which the client waited for).
        try:
            self._readable()
        finally:
            kv_at(log, logging.INFO, connected_at, "client connected", epoch=epoch)

    def _disconnect(self, reason: str) -> None:
        conn = self._conn
        with contextlib.suppress(PeerClosed, TimeoutError, OSError):  # e.g. the error reply of a failed VERSION
            self._send_held(conn)
        self._conn = None
        self.loop.remove_reader(conn.sock.fileno())
        conn.reader.discard()
        conn.sock.close()
        hold_lines()
        self.loop.call_later(DISCONNECT_LINES_HELD_S, write_held_lines)
        maps = len(self.dma)
        self.dma.retire_all()  # (unmapped once the next client's attach is served, unless it takes them over)
        self.irqs.drop_all()
        kv(log, logging.INFO, "client disconnected", epoch=conn.epoch, reason=reason, dropped_dma_maps=maps,
           reset_method=self.device.reset_method)
        try:
            self.device.client_disconnected()
            if self.device.reset_method == RESET_FLR:
                self._flr("client disconnected")
        finally:  # whatever the device did, the next client must be accepted
            self.loop.add_reader(self._listener.fileno(), self._accept)

    @staticmethod
    def _write_log() -> dict:
        """Write the lines a disconnect holds (`DISCONNECT_LINES_HELD_S`) now: the host asks once a servicing's
        result is measured, so whoever reads this device's log once `service` returns finds the servicing in it."""
        write_held_lines()
        return {}

    def _flr(self, why: str) -> None:
        self.device.reset()
        self.irqs.clear_pending()
        self.resets += 1
        kv(log, logging.INFO, "function level reset", epoch=self.epoch, why=why, resets=self.resets)

    def _readable(self) -> None:
        conn = self._conn
        conn.replies = []
        try:
            self._serve_messages(conn)
        finally:
            if conn is self._conn:
                self.irqs.signal_held()  # what the burst raised, before its replies (`IrqTable.signal_held`)
                self._flush_replies(conn)
            conn.replies = None
            if self.dma.retired and len(self.dma):  # the client's attach mapped memory and has its replies
                self.dma.release_retired()

    def _serve_messages(self, conn: _Connection) -> None:
        for _ in range(MESSAGES_PER_WAKEUP):
            if conn is not self._conn:
                return
            try:
                msg = conn.reader.read(conn.sock)
            except PeerClosed as e:
                self._disconnect(f"peer closed: {e}")
                return
            except FramingError as e:
                kv(log, logging.WARNING, "framing error, closing connection", epoch=conn.epoch, error=e)
                self._disconnect(f"framing error: {e}")
                return
            if msg is None:
                return
            self._handle(conn, msg)
        if conn is self._conn and conn.reader.buffered:  # read from the socket already: it may not wake us
            self.loop.call_later(0, self._readable)

    # -- dispatch -------------------------------------------------------------------------------
    def _handle(self, conn: _Connection, msg: Message) -> None:
        name = command_name(msg.command)
        if msg.type != TYPE_COMMAND:
            msg.close_fds()
            kv(log, logging.WARNING, "not a command, closing connection", epoch=conn.epoch, cmd=name,
               flags=f"{msg.flags:#x}")
            self._disconnect(f"message type {msg.type} where a command was expected")
            return
        level = logging.DEBUG if msg.command in _QUIET else logging.INFO
        if log.isEnabledFor(level):  # register traffic is the data path: skip building a line nobody writes
            kv(log, level, "command", epoch=conn.epoch, cmd=name, id=msg.msg_id, size=len(msg.payload),
               fds=len(msg.fds), posted=msg.no_reply)
        close_after = False
        try:
            if not conn.negotiated:
                close_after = True  # only a successful VERSION opens the session (spec §3.1)
                if msg.command != Command.VERSION:
                    raise CommandError(errno.EINVAL, f"{name} before VERSION")
            handler = self._handlers.get(msg.command)
            if handler is None:
                raise CommandError(errno.EINVAL, f"command {name} is not supported")
            if msg.fds and msg.command not in (Command.DMA_MAP, Command.DEVICE_SET_IRQS):
                raise CommandError(errno.EINVAL, f"{name} carries {len(msg.fds)} unexpected fds")
            reply = handler(conn, msg)
            close_after = False
        except CommandError as e:
            kv(log, logging.WARNING, "command failed", epoch=conn.epoch, cmd=name, id=msg.msg_id,
               errno=errno.errorcode.get(e.errno, e.errno), reason=e.reason)
            self._send(conn, msg, b"", error=e.errno)
        except Exception:  # noqa: BLE001 - a device bug answers EINVAL instead of killing the device
            log.error("command handler raised", exc_info=True, extra={"kv": {"epoch": conn.epoch, "cmd": name}})
            self._send(conn, msg, b"", error=errno.EINVAL)
        else:
            self._send(conn, msg, reply)
        finally:
            msg.close_fds()
        if close_after and conn is self._conn:
            self._disconnect(f"{name} failed before negotiation")

    def _send(self, conn: _Connection, msg: Message, payload: bytes, error: int = 0) -> None:
        if msg.no_reply or conn is not self._conn:
            return
        if conn.replies is not None:
            conn.replies.append((msg.command, encode_message(msg.msg_id, msg.command,
                                                             TYPE_REPLY | (FLAG_ERROR if error else 0), payload, error)))
            if len(conn.replies) >= MESSAGES_PER_WAKEUP or len(payload) >= HELD_REPLY_BYTES:
                self._flush_replies(conn)
            return
        try:
            send_message(conn.sock, msg.msg_id, msg.command, TYPE_REPLY | (FLAG_ERROR if error else 0), payload,
                         error=error, timeout=SEND_TIMEOUT_S)
        except (PeerClosed, TimeoutError, OSError) as e:
            self._disconnect(f"reply failed: {e}")

    def _flush_replies(self, conn: _Connection) -> None:
        """Send the held replies; a client that cannot take them is disconnected."""
        try:
            self._send_held(conn)
        except (PeerClosed, TimeoutError, OSError) as e:
            self._disconnect(f"reply failed: {e}")

    @staticmethod
    def _send_held(conn: _Connection) -> None:
        """Send the replies held in this wake-up (`_Connection.replies`) as one burst."""
        held = conn.replies
        if held:
            conn.replies = []
            send_frames(conn.sock, b"".join(frame for _, frame in held), held[0][0], timeout=SEND_TIMEOUT_S)

    # -- handlers: each returns the reply payload or raises CommandError -----------------------
    def _version(self, conn: _Connection, msg: Message) -> bytes:
        if conn.negotiated:
            raise CommandError(errno.EINVAL, "VERSION already negotiated on this connection")
        major, minor, caps = decode_version(msg.payload)
        if major != VERSION_MAJOR:
            raise CommandError(errno.EINVAL, f"VERSION major {major} not supported (only {VERSION_MAJOR})")
        max_fds = caps.get("max_msg_fds", DEFAULT_MAX_MSG_FDS)
        if max_fds > 1024:
            raise CommandError(errno.EINVAL, f"client max_msg_fds {max_fds} outside 0..1024")
        conn.negotiated = True
        if log.isEnabledFor(logging.DEBUG):  # (the attach's commands are a servicing's critical path)
            kv(log, logging.DEBUG, "version negotiated", epoch=conn.epoch, client_minor=minor, caps=caps)
        # Only keys the client proposed, valued with our limits; unsupported ones (migration, twin_socket,
        # write_multiple) are left out, which means unsupported; no JSON proposed, none sent (addendum A4).
        ours = {"max_msg_fds": MAX_MSG_FDS, "max_data_xfer_size": MAX_DATA_XFER_SIZE,
                "max_dma_maps": self.dma.max_maps, "pgsizes": PAGE_SIZES}
        proposed_json = len(msg.payload) > VERSION_FIXED.size
        # The same client proposes the same at every attach (a reconnect is in a servicing's window): the reply is
        # encoded once per answer (json.dumps with separators builds an encoder per call).
        key = (min(minor, VERSION_MINOR), tuple(k for k in ours if k in caps) if proposed_json else None)
        reply = self._version_replies.get(key)
        if reply is None:
            reply = self._version_replies[key] = encode_version(
                VERSION_MAJOR, key[0], None if key[1] is None else {k: ours[k] for k in key[1]})
        return reply

    def _dma_map(self, conn: _Connection, msg: Message) -> bytes:
        argsz, flags, offset, address, size = _unpack(DMA_MAP, msg)
        if argsz < DMA_MAP.size:
            raise CommandError(errno.EINVAL, f"DMA_MAP argsz {argsz} < {DMA_MAP.size}")
        if len(msg.fds) > 1:
            raise CommandError(errno.EINVAL, f"DMA_MAP takes at most one memory fd, got {len(msg.fds)}")
        fd = msg.fds[0] if msg.fds else None  # no fd: a message-only range the device cannot reach (A1)
        added = self.dma.map(fd, offset, address, size, flags)
        level = logging.DEBUG if added else logging.INFO
        if log.isEnabledFor(level):
            kv(log, level, "dma map" if added else "dma map repeated (no-op)", epoch=conn.epoch, iova=f"{address:#x}",
               size=f"{size:#x}", offset=f"{offset:#x}", flags=f"{flags:#x}", maps=len(self.dma), fd=fd is not None)
        return b""

    def _dma_unmap(self, conn: _Connection, msg: Message) -> bytes:
        argsz, flags, address, size = _unpack(DMA_UNMAP, msg)
        if argsz < DMA_UNMAP.size:
            raise CommandError(errno.EINVAL, f"DMA_UNMAP argsz {argsz} < {DMA_UNMAP.size}")
        if flags == DMA_UNMAP_ALL:
            if address or size:
                raise CommandError(errno.EINVAL, "DMA_UNMAP with UNMAP_ALL needs address 0 and size 0")
            self.dma.unmap_all()
        elif flags == 0:
            self.dma.unmap(address, size)
        else:
            raise CommandError(errno.EINVAL, f"DMA_UNMAP flags {flags:#x}: only 0 or UNMAP_ALL (0x2)")
        return msg.payload

    def _get_info(self, conn: _Connection, msg: Message) -> bytes:
        (argsz, _, _, _) = _unpack(DEVICE_INFO, msg)
        if argsz < DEVICE_INFO.size:
            raise CommandError(errno.EINVAL, f"DEVICE_GET_INFO argsz {argsz} < {DEVICE_INFO.size}")
        flags = DEVICE_FLAGS_PCI | (DEVICE_FLAGS_RESET if self.device.reset_method == RESET_FLR else 0)
        return DEVICE_INFO.pack(DEVICE_INFO.size, flags, self._num_regions, NUM_PCI_IRQS)

    def _get_region_info(self, conn: _Connection, msg: Message) -> bytes:
        argsz, _, index, _, _, _ = _unpack(REGION_INFO, msg)
        if argsz < REGION_INFO.size:
            raise CommandError(errno.EINVAL, f"DEVICE_GET_REGION_INFO argsz {argsz} < {REGION_INFO.size}")
        if index >= self._num_regions:
            raise CommandError(errno.EINVAL, f"region {index} >= num_regions {self._num_regions}")
        size, flags = self._regions.get(index, (0, 0))
        return REGION_INFO.pack(REGION_INFO.size, flags, index, 0, size, 0)

    def _get_irq_info(self, conn: _Connection, msg: Message) -> bytes:
        argsz, _, index, _ = _unpack(IRQ_INFO, msg)
        if argsz < IRQ_INFO.size:
            raise CommandError(errno.EINVAL, f"DEVICE_GET_IRQ_INFO argsz {argsz} < {IRQ_INFO.size}")
        if index >= NUM_PCI_IRQS:
            raise CommandError(errno.EINVAL, f"IRQ index {index} >= num_irqs {NUM_PCI_IRQS}")
        return IRQ_INFO.pack(IRQ_INFO.size, IRQ_INFO_EVENTFD, index, self.irqs.counts[index])

    def _set_irqs(self, conn: _Connection, msg: Message) -> bytes:
        if len(msg.payload) < IRQ_SET.size:
            raise CommandError(errno.EINVAL, f"DEVICE_SET_IRQS payload is {len(msg.payload)} bytes, "
                                             f"needs at least {IRQ_SET.size}")
        argsz, flags, index, start, count = IRQ_SET.unpack_from(msg.payload)
        if argsz != len(msg.payload):
            raise CommandError(errno.EINVAL, f"DEVICE_SET_IRQS argsz {argsz} != payload size {len(msg.payload)}")
        self.irqs.set_irqs(flags, index, start, count, msg.payload[IRQ_SET.size:], msg.fds)
        if log.isEnabledFor(logging.DEBUG):
            kv(log, logging.DEBUG, "set irqs", epoch=conn.epoch, flags=f"{flags:#x}", index=index, start=start,
               count=count)
        return b""

    def _region_read(self, conn: _Connection, msg: Message) -> bytes:
        offset, index, count = _unpack(REGION_ACCESS, msg)
        self._check_access(index, offset, count, REGION_INFO_READ)
        data = self.device.region_read(index, offset, count) if count else b""
        if len(data) != count:
            raise CommandError(errno.EINVAL, f"region {index} read of {count} bytes at {offset:#x} returned "
                                             f"{len(data)} bytes")
        return REGION_ACCESS.pack(offset, index, count) + bytes(data)

    def _region_write(self, conn: _Connection, msg: Message) -> bytes:
        if len(msg.payload) < REGION_ACCESS.size:
            raise CommandError(errno.EINVAL, f"REGION_WRITE payload is {len(msg.payload)} bytes, needs at least 16")
        offset, index, count = REGION_ACCESS.unpack_from(msg.payload)
        data = msg.payload[REGION_ACCESS.size:]
        if len(data) != count:
            raise CommandError(errno.EINVAL, f"REGION_WRITE count {count} but {len(data)} data bytes")
        self._check_access(index, offset, count, REGION_INFO_WRITE)
        if count:
            self.device.region_write(index, offset, data)
        return REGION_ACCESS.pack(offset, index, count)

    def _reset(self, conn: _Connection, msg: Message) -> bytes:
        if msg.payload:
            raise CommandError(errno.EINVAL, f"DEVICE_RESET has a {len(msg.payload)}-byte payload, expected none")
        if self.device.reset_method != RESET_FLR:
            raise CommandError(errno.EINVAL, f"DEVICE_RESET refused: reset_method is {self.device.reset_method!r}")
        self._flr("DEVICE_RESET")
        return b""

    def _check_access(self, index: int, offset: int, count: int, need: int) -> None:
        if index >= self._num_regions:
            raise CommandError(errno.EINVAL, f"region {index} >= num_regions {self._num_regions}")
        if count > MAX_DATA_XFER_SIZE:
            raise CommandError(errno.E2BIG, f"access of {count} bytes > max_data_xfer_size {MAX_DATA_XFER_SIZE}")
        size, flags = self._regions.get(index, (0, 0))
        if offset + count > size:
            raise CommandError(errno.EINVAL, f"region {index} access [{offset:#x}, {offset + count:#x}) beyond "
                                             f"its size {size:#x}")
        if not flags & need:
            kind = "read" if need == REGION_INFO_READ else "written"
            raise CommandError(errno.EINVAL, f"region {index} cannot be {kind} (flags {flags:#x})")

    # -- control channel ------------------------------------------------------------------------
    def _set_reset_method(self, value: str) -> dict:
        previous = self.device.reset_method
        self.device.reset_method = value  # the device checks it: a bad value is an error reply
        # A reset path's fresh init sets none on a device that has it (in its window): only a change is INFO.
        kv(log, logging.INFO if value != previous else logging.DEBUG, "reset method set", previous=previous,
           value=value)
        return {"value": value, "previous": previous}


def _unpack(layout: struct.Struct, msg: Message) -> tuple:
    """Fixed-size payloads must be exactly their struct (anything else is malformed)."""
    if len(msg.payload) != layout.size:
        raise CommandError(errno.EINVAL, f"{command_name(msg.command)} payload is {len(msg.payload)} bytes, "
                                         f"expected {layout.size}")
    return layout.unpack(msg.payload)


def serve_until_stopped(server: "VfioUserServer", device, log: logging.Logger, what: str, name: str,
                        **fields) -> None:
    """A device process's life: serve until SIGTERM or SIGINT, then close and log what the device counted."""
    signal.signal(signal.SIGTERM, lambda *_: server.stop())
    signal.signal(signal.SIGINT, lambda *_: server.stop())
    kv(log, logging.INFO, f"{what} serving", name=name, **fields)
    freeze_heap()
    try:
        server.run()
    finally:
        device.close()
        server.close()
        kv(log, logging.INFO, f"{what} stopped", name=name,
           counters={k: v for k, v in device.core.counters.items() if v})
