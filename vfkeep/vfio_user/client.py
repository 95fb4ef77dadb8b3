"""vfio-user client: the worker's view of one device (spec §5.1, §5.3, §6).

`VfioDevice.new` is a fresh driver (resets the device when it advertises RESET, like Linux VFIO
on open); `VfioDevice.restore` re-attaches after servicing and never resets. Every reply has a
deadline; an error reply raises `VfioError`, a vanished server `DeviceMissing`.
"""
from __future__ import annotations

import errno
import logging
import os
import socket
import struct
import threading
import time
from dataclasses import dataclass

from vfkeep.log import kv
from vfkeep.memory.guest_memory import GuestMemory
from vfkeep.sockets import connect_unix

from .protocol import (DEVICE_FLAGS_RESET, DEVICE_INFO, DMA_MAP, DMA_MAP_READ, DMA_MAP_WRITE, DMA_UNMAP,
                       DMA_UNMAP_ALL, FLAG_ERROR, FLAG_NO_REPLY, IRQ_INFO, IRQ_MSIX, IRQ_SET, IRQ_SET_ACTION_TRIGGER,
                       IRQ_SET_DATA_EVENTFD, IRQ_SET_DATA_NONE, MAX_DATA_XFER_SIZE, MAX_MSG_FDS, REGION_ACCESS,
                       REGION_BAR0, REGION_INFO, TYPE_COMMAND, TYPE_REPLY, VERSION_MAJOR, VERSION_MINOR, Command,
                       CommandError, FrameReader, FramingError, Message, PeerClosed, command_name, decode_version,
                       encode_version, send_message, wait_message)

log = logging.getLogger("vfkeep.vfio_user.client")

DEFAULT_TIMEOUT_S = 5.0


class VfioClientError(Exception):
    """Base of client-side errors."""


class VfioError(VfioClientError):
    """The device answered a command with an error reply."""

    def __init__(self, errno_: int, command: int):
        self.errno = errno_
        self.command = command
        super().__init__(f"{command_name(command)} failed: {errno.errorcode.get(errno_, errno_)} "
                         f"({os.strerror(errno_)})")


class VfioTimeout(VfioClientError):
    """No reply within the per-reply timeout."""


class DeviceMissing(VfioClientError):
    """The server is gone (or never came): treat the device as failed (spec §5.3)."""


class ProtocolError(VfioClientError):
    """The server broke the protocol; the connection is closed."""


@dataclass(frozen=True)
class DeviceInfo:
    flags: int
    num_regions: int
    num_irqs: int

    @property
    def can_reset(self) -> bool:
        return bool(self.flags & DEVICE_FLAGS_RESET)


@dataclass(frozen=True)
class RegionInfo:
    index: int
    flags: int
    size: int


@dataclass(frozen=True)
class IrqInfo:
    index: int
    flags: int
    count: int


class VfioDevice:
    """One connection to a device. Thread-safe: one request/reply exchange at a time."""

    def __init__(self, sock: socket.socket, path: str, timeout: float):
        self.path = path
        self.timeout = timeout
        self._sock: socket.socket | None = sock
        self._reader = FrameReader(MAX_MSG_FDS)
        self._lock = threading.RLock()  # set_irq/clear_irqs hold it around _request
        self._next_id = 0
        self._irq_fds: dict[int, int] = {}
        self.server_caps: dict = {}
        self.info: DeviceInfo | None = None
        self.was_reset = False  # new() sent DEVICE_RESET

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def new(cls, path: str | os.PathLike, timeout: float = DEFAULT_TIMEOUT_S) -> "VfioDevice":
        """Attach as a fresh driver: handshake, and DEVICE_RESET if the device can be reset."""
        dev = cls._open(path, timeout)
        if dev.info.can_reset:
            try:
                dev.reset()
            except BaseException:
                dev.close()
                raise
            dev.was_reset = True
        return dev

    @classmethod
    def restore(cls, path: str | os.PathLike, timeout: float = DEFAULT_TIMEOUT_S) -> "VfioDevice":
        """Re-attach after servicing: handshake only; device state is taken as it is."""
        return cls._open(path, timeout)

    @classmethod
    def _open(cls, path: str | os.PathLike, timeout: float) -> "VfioDevice":
        sock = connect_unix(path, time.monotonic() + timeout, DeviceMissing)
        dev = cls(sock, os.fspath(path), timeout)
        try:
            dev._version()
            dev.info = dev.device_info()
        except BaseException:
            dev.close()
            raise
        kv(log, logging.INFO, "attached to device", path=dev.path, flags=f"{dev.info.flags:#x}",
           regions=dev.info.num_regions, irqs=dev.info.num_irqs)
        return dev

    def _version(self) -> None:
        payload = self._request(Command.VERSION, encode_version(
            VERSION_MAJOR, VERSION_MINOR, {"max_msg_fds": MAX_MSG_FDS, "max_data_xfer_size": MAX_DATA_XFER_SIZE}))
        try:
            major, minor, caps = decode_version(payload)
        except CommandError as e:
            raise self._protocol_error(f"bad VERSION reply: {e.reason}") from None
        if major != VERSION_MAJOR or minor > VERSION_MINOR:
            raise self._protocol_error(f"server answered version {major}.{minor}, we proposed "
                                       f"{VERSION_MAJOR}.{VERSION_MINOR}")
        self.server_caps = caps

    # -- info -----------------------------------------------------------------------------------
    def device_info(self) -> DeviceInfo:
        reply = self._request(Command.DEVICE_GET_INFO, DEVICE_INFO.pack(DEVICE_INFO.size, 0, 0, 0))
        _, flags, num_regions, num_irqs = self._unpack(DEVICE_INFO, reply, Command.DEVICE_GET_INFO)
        return DeviceInfo(flags, num_regions, num_irqs)

    def region_info(self, index: int) -> RegionInfo:
        reply = self._request(Command.DEVICE_GET_REGION_INFO, REGION_INFO.pack(REGION_INFO.size, 0, index, 0, 0, 0))
        _, flags, idx, _, size, _ = self._unpack(REGION_INFO, reply[:REGION_INFO.size], Command.DEVICE_GET_REGION_INFO)
        return RegionInfo(idx, flags, size)

    def irq_info(self, index: int) -> IrqInfo:
        reply = self._request(Command.DEVICE_GET_IRQ_INFO, IRQ_INFO.pack(IRQ_INFO.size, 0, index, 0))
        _, flags, idx, count = self._unpack(IRQ_INFO, reply, Command.DEVICE_GET_IRQ_INFO)
        return IrqInfo(idx, flags, count)

    # -- DMA ------------------------------------------------------------------------------------
    def dma_map(self, fd: int, file_offset: int, iova: int, size: int) -> None:
        """Let the device reach [iova, iova+size) = `size` bytes of file `fd` at `file_offset`."""
        self._request(Command.DMA_MAP, DMA_MAP.pack(DMA_MAP.size, DMA_MAP_READ | DMA_MAP_WRITE, file_offset, iova,
                                                    size), fds=[fd])

    def map_guest_memory(self, mem: GuestMemory) -> None:
        """One DMA_MAP per non-empty region, IOVA = file offset (so PFNs agree everywhere)."""
        for region in mem.layout.regions:
            if region.pages:
                self.dma_map(mem.fd, region.gpa, region.gpa, region.size)

    def dma_unmap(self, iova: int = 0, size: int = 0, *, unmap_all: bool = False) -> None:
        flags = DMA_UNMAP_ALL if unmap_all else 0
        self._request(Command.DMA_UNMAP, DMA_UNMAP.pack(DMA_UNMAP.size, flags, iova, size))

    # -- regions --------------------------------------------------------------------------------
    def region_read(self, index: int, offset: int, count: int) -> bytes:
        self._check_count(count)
        reply = self._request(Command.REGION_READ, REGION_ACCESS.pack(offset, index, count))
        if len(reply) != REGION_ACCESS.size + count:
            raise self._protocol_error(f"REGION_READ reply of {len(reply)} bytes for a {count}-byte read")
        return reply[REGION_ACCESS.size:]

    def region_write(self, index: int, offset: int, data: bytes, posted: bool = False) -> None:
        """`posted` sets no-reply: the server handles commands in order, so any later reply
        proves the write was applied (a read doubles as a flush)."""
        self._check_count(len(data))
        self._request(Command.REGION_WRITE, REGION_ACCESS.pack(offset, index, len(data)) + bytes(data),
                      no_reply=posted)

    def read32(self, offset: int) -> int:
        return int.from_bytes(self.region_read(REGION_BAR0, offset, 4), "little")

    def read64(self, offset: int) -> int:
        return int.from_bytes(self.region_read(REGION_BAR0, offset, 8), "little")

    def write32(self, offset: int, value: int, posted: bool = False) -> None:
        self.region_write(REGION_BAR0, offset, value.to_bytes(4, "little"), posted)

    def write64(self, offset: int, value: int, posted: bool = False) -> None:
        self.region_write(REGION_BAR0, offset, value.to_bytes(8, "little"), posted)

    # -- interrupts -----------------------------------------------------------------------------
    def set_irq(self, vector: int) -> int:
        """Assign a new eventfd to MSI-X `vector` and return it (the caller polls/reads it; this
        object keeps owning it). A previous eventfd of the vector is closed."""
        efd = os.eventfd(0, os.EFD_CLOEXEC)
        with self._lock:
            try:
                self._request(Command.DEVICE_SET_IRQS, IRQ_SET.pack(
                    IRQ_SET.size, IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER, IRQ_MSIX, vector, 1), fds=[efd])
            except BaseException:
                os.close(efd)
                raise
            old = self._irq_fds.pop(vector, None)
            if old is not None:
                os.close(old)
            self._irq_fds[vector] = efd
        return efd

    def clear_irqs(self) -> None:
        """Disable every MSI-X vector on the device and close our eventfds."""
        with self._lock:
            self._request(Command.DEVICE_SET_IRQS,
                          IRQ_SET.pack(IRQ_SET.size, IRQ_SET_DATA_NONE | IRQ_SET_ACTION_TRIGGER, IRQ_MSIX, 0, 0))
            self._close_irq_fds()

    # -- reset / close --------------------------------------------------------------------------
    def reset(self) -> None:
        """DEVICE_RESET: refused (VfioError EINVAL) unless the device's reset_method is flr."""
        self._request(Command.DEVICE_RESET, b"")

    def close(self) -> None:
        """Disconnect; with reset_method none the device keeps its state for the next client."""
        with self._lock:
            if self._sock is not None:
                self._reader.discard()
                self._sock.close()
                self._sock = None
            self._close_irq_fds()

    def __enter__(self) -> "VfioDevice":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- transport ------------------------------------------------------------------------------
    def _request(self, command: int, payload: bytes, *, fds: list[int] | tuple[int, ...] = (), no_reply: bool = False) -> bytes:
        with self._lock:
            if self._sock is None:
                raise DeviceMissing(f"{command_name(command)}: not connected to {self.path}")
            msg_id = self._next_id
            self._next_id = (self._next_id + 1) & 0xFFFF
            try:
                send_message(self._sock, msg_id, command, TYPE_COMMAND | (FLAG_NO_REPLY if no_reply else 0),
                             payload, fds=fds, timeout=self.timeout)
            except TimeoutError:
                raise VfioTimeout(f"{command_name(command)}: device at {self.path} does not read its socket "
                                  f"({self.timeout} s)") from None
            except PeerClosed as e:
                raise self._gone(f"{command_name(command)}: {e}") from None
            if no_reply:
                return b""
            reply = self._wait_reply(msg_id, command)
        if reply.is_error:
            raise VfioError(reply.error if 0 < reply.error <= 4096 else errno.EINVAL, command)
        return reply.payload

    def _wait_reply(self, msg_id: int, command: int) -> Message:
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                msg = wait_message(self._sock, self._reader, max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                raise VfioTimeout(f"{command_name(command)}: no reply from {self.path} within {self.timeout} s") \
                    from None
            except PeerClosed as e:
                raise self._gone(f"{command_name(command)}: {e}") from None
            except FramingError as e:
                raise self._protocol_error(f"unreadable message from server: {e}") from None
            msg.close_fds()  # our subset never passes fds to the client
            if msg.type == TYPE_COMMAND:
                self._refuse(msg)
            elif msg.type != TYPE_REPLY:
                raise self._protocol_error(f"message type {msg.type} from server")
            elif msg.msg_id != msg_id:  # a reply to a request that already timed out
                kv(log, logging.WARNING, "discarding stale reply", id=msg.msg_id, cmd=command_name(msg.command))
            elif msg.command != command:
                raise self._protocol_error(f"reply id {msg_id} is for {command_name(msg.command)}, "
                                           f"expected {command_name(command)}")
            else:
                return msg

    def _refuse(self, msg: Message) -> None:
        """The server asked us something (DMA_READ/WRITE): we never offer it (spec §2)."""
        if not msg.no_reply:
            try:
                send_message(self._sock, msg.msg_id, msg.command, TYPE_REPLY | FLAG_ERROR, error=errno.ENOSYS,
                             timeout=self.timeout)
            except (PeerClosed, TimeoutError) as e:
                raise self._gone(f"refusing {command_name(msg.command)}: {e}") from None

    def _gone(self, why: str) -> DeviceMissing:
        self._drop_socket()
        return DeviceMissing(f"device at {self.path} is gone: {why}")

    def _protocol_error(self, why: str) -> ProtocolError:
        self._drop_socket()
        return ProtocolError(f"device at {self.path}: {why}")

    def _drop_socket(self) -> None:
        if self._sock is not None:
            self._reader.discard()
            self._sock.close()
            self._sock = None

    def _close_irq_fds(self) -> None:
        for fd in self._irq_fds.values():
            os.close(fd)
        self._irq_fds.clear()

    def _check_count(self, count: int) -> None:
        limit = self.server_caps.get("max_data_xfer_size", MAX_DATA_XFER_SIZE)
        if count > limit:
            raise ValueError(f"region access of {count} bytes exceeds the device's max_data_xfer_size {limit}")

    def _unpack(self, layout: struct.Struct, payload: bytes, command: int) -> tuple:
        if len(payload) != layout.size:
            raise self._protocol_error(f"{command_name(command)} reply is {len(payload)} bytes, "
                                       f"expected {layout.size}")
        return layout.unpack(payload)
