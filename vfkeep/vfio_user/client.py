"""vfio-user client: the worker's view of one device (spec §5.1, §5.3, §6).

`VfioDevice.new` is a fresh driver (resets the device when it advertises RESET, like Linux VFIO
on open); `VfioDevice.restore` re-attaches after servicing and never resets. Every reply has a
deadline; an error reply raises `VfioError`, a vanished server `DeviceMissing`.

Against any compliant server (spec addendum A2, A5): the client reads the socket while it sends and
while it waits, and answers server-initiated DMA_READ/DMA_WRITE from the memory it DMA-mapped (by
`pread`/`pwrite` on its own copy of the mapped fd), queueing replies behind the message being
sent; other server commands get ENOSYS, commands carrying fds EINVAL. A send that fails after
writing any byte closes the connection (`DeviceMissing`): the stream would otherwise go on inside
the unfinished message.
"""
from __future__ import annotations

import collections
import contextlib
import errno
import logging
import os
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass

from vfkeep.log import kv
from vfkeep.memory.guest_memory import GuestMemory
from vfkeep.sockets import connect_unix, wait_fd

from .protocol import (DEVICE_FLAGS_RESET, DEVICE_INFO, DMA_MAP, DMA_MAP_READ, DMA_MAP_WRITE, DMA_RW, DMA_UNMAP,
                       DMA_UNMAP_ALL, FLAG_ERROR, FLAG_NO_REPLY, IRQ_INFO, IRQ_MSIX, IRQ_SET, IRQ_SET_ACTION_TRIGGER,
                       IRQ_SET_DATA_EVENTFD, IRQ_SET_DATA_NONE, MAX_DATA_XFER_SIZE, MAX_MSG_FDS, REGION_ACCESS,
                       REGION_BAR0, REGION_INFO, TYPE_COMMAND, TYPE_REPLY, VERSION_MAJOR, VERSION_MINOR, Command,
                       CommandError, FrameReader, FramingError, Message, PeerClosed, command_name, decode_version,
                       encode_message, encode_version, send_frames, send_message)

log = logging.getLogger("vfkeep.vfio_user.client")
#: Our VERSION payload (spec 3.1), always the same: encoded once, not in every attach (a servicing's window).
_PROPOSAL = encode_version(VERSION_MAJOR, VERSION_MINOR, {"max_msg_fds": MAX_MSG_FDS,
                                                         "max_data_xfer_size": MAX_DATA_XFER_SIZE})

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


@dataclass(frozen=True)
class _Mapping:
    """A range this client DMA-mapped, with its own dup of the fd to serve DMA_READ/DMA_WRITE from."""

    iova: int
    size: int
    fd: int
    file_offset: int
    flags: int


class VfioDevice:
    """One connection to a device. Thread-safe: one request/reply exchange at a time."""

    def __init__(self, sock: socket.socket, path: str, timeout: float):
        self.path = path
        self.timeout = timeout
        self._sock: socket.socket | None = sock
        self._reader = FrameReader(MAX_MSG_FDS)
        self._lock = threading.RLock()  # set_irq/clear_irqs hold it around _request
        self._posted = threading.local()  # `posted_batch`: the thread's posted writes not sent yet
        self._next_id = 0
        self._inbox: collections.deque[Message] = collections.deque()  # replies read while sending
        self._outbox: collections.deque[tuple] = collections.deque()  # our replies to server commands
        self._maps: list[_Mapping] = []
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
    def restore_mapped(cls, path: str | os.PathLike, mem: GuestMemory, region: int, irq: int,
                       timeout: float = DEFAULT_TIMEOUT_S, read: tuple[int, int] | None = None,
                       irqs: tuple[int, ...] = ()) -> tuple["VfioDevice", RegionInfo, IrqInfo, bytes | None]:
        """`restore` and `map_and_query` pipelined behind the handshake: one round trip after the connect (a
        restore resets nothing, so nothing has to wait for DEVICE_GET_INFO's answer). In the same round trip:
        `read` = (offset, count), a REGION_READ of `region` the caller needs next (a driver's register map; its
        bytes are the last item, None without `read`), and `irqs`, MSI-X vectors assigned as `set_irqs` does
        (their eventfds in `irq_fds`)."""
        return cls.attach_ahead(path, mem, region, irq, timeout, read, irqs).finish()

    @classmethod
    def attach_ahead(cls, path: str | os.PathLike, mem: GuestMemory, region: int, irq: int,
                     timeout: float = DEFAULT_TIMEOUT_S, read: tuple[int, int] | None = None,
                     irqs: tuple[int, ...] = ()) -> "PendingAttach":
        """`restore_mapped`'s connect and pipeline, sent now without waiting for a reply: the device serves it while
        the caller does other work, and `PendingAttach.finish()` reads the answers (or `cancel()` disconnects)."""
        more, efds = cls._attach_requests(mem, region, irq, read, irqs)
        try:
            dev, sent = cls._open_ahead(path, timeout, more)
        except BaseException:
            for efd in efds:
                os.close(efd)
            raise
        return PendingAttach(dev, sent, mem, read, tuple(irqs), efds)

    @classmethod
    def _attach_requests(cls, mem: GuestMemory, region: int, irq: int, read: tuple[int, int] | None,
                         irqs: tuple[int, ...]) -> tuple[list[tuple], list[int]]:
        """DMA_MAP of guest memory, REGION_INFO of `region`, IRQ_INFO of `irq`, `read`'s REGION_READ and a SET_IRQS
        per vector of `irqs`: what a driver needs before it runs, as one pipeline. Returns it with the new
        eventfds of `irqs` (the caller's to close if the pipeline is not sent)."""
        more = [cls._dma_map_request(mem.fd, 0, 0, mem.layout.size), cls._region_info_request(region),
                cls._irq_info_request(irq)]
        if read is not None:
            more.append((Command.REGION_READ, REGION_ACCESS.pack(read[0], region, read[1]), ()))
        efds = [os.eventfd(0, os.EFD_CLOEXEC) for _ in irqs]
        return more + [cls._set_irq_request(vector, efd) for vector, efd in zip(irqs, efds)], efds

    def _attached(self, mem: GuestMemory, read: tuple[int, int] | None, irqs: tuple[int, ...], efds: list[int],
                  replies: list[bytes]) -> tuple[RegionInfo, IrqInfo, bytes | None]:
        """The replies of an `_attach_requests` pipeline; the eventfds belong to this device from here on."""
        mapped, region_reply, irq_reply, *rest = replies
        for vector, efd in zip(irqs, efds):
            old = self._irq_fds.pop(vector, None)
            if old is not None:
                os.close(old)
            self._irq_fds[vector] = efd
        self._mapped(mem.fd, 0, 0, mem.layout.size)
        data = self._region_read_reply(rest[0], read[1]) if read is not None else None
        return self._region_info(region_reply), self._irq_info(irq_reply), data

    @classmethod
    def _open(cls, path: str | os.PathLike, timeout: float, then: list[tuple] | None = None):
        """Connect, then VERSION and DEVICE_GET_INFO pipelined: one round trip (a failed VERSION closes the
        session, and its error is the one raised). With `then` (more commands, pipelined behind them):
        (device, their replies)."""
        dev, sent = cls._open_ahead(path, timeout, then or [])
        replies = dev._opened(sent)
        return dev if then is None else (dev, replies)

    @classmethod
    def _open_ahead(cls, path: str | os.PathLike, timeout: float, then: list[tuple]) -> tuple["VfioDevice", list]:
        """`_open`'s connect and its commands sent: (device, what `_opened` takes the replies of)."""
        sock = connect_unix(path, time.monotonic() + timeout, DeviceMissing)
        dev = cls(sock, os.fspath(path), timeout)
        try:
            return dev, dev._send_requests([(Command.VERSION, _PROPOSAL, ()), (Command.DEVICE_GET_INFO,
                                            DEVICE_INFO.pack(DEVICE_INFO.size, 0, 0, 0), ()), *then])
        except BaseException:
            dev.close()
            raise

    def _opened(self, sent: list[tuple[int, int]]) -> list[bytes]:
        """The handshake's replies (checked) for `_open_ahead`'s `sent`; the replies of the commands behind it.
        Any failure closes the connection."""
        try:
            version, info, *more = self._take_replies(sent)
            self._check_version(version)
            self.info = self._device_info(info)
        except BaseException:
            self.close()
            raise
        kv(log, logging.DEBUG, "attached to device", path=self.path, flags=f"{self.info.flags:#x}",
           regions=self.info.num_regions, irqs=self.info.num_irqs)
        return more

    def _check_version(self, payload: bytes) -> None:
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
        return self._device_info(self._request(Command.DEVICE_GET_INFO, DEVICE_INFO.pack(DEVICE_INFO.size, 0, 0, 0)))

    def _device_info(self, reply: bytes) -> DeviceInfo:
        _, flags, num_regions, num_irqs = self._unpack(DEVICE_INFO, reply, Command.DEVICE_GET_INFO)
        return DeviceInfo(flags, num_regions, num_irqs)

    def region_info(self, index: int) -> RegionInfo:
        return self._region_info(self._requests([self._region_info_request(index)])[0])

    @staticmethod
    def _region_info_request(index: int) -> tuple[int, bytes, tuple]:
        return Command.DEVICE_GET_REGION_INFO, REGION_INFO.pack(REGION_INFO.size, 0, index, 0, 0, 0), ()

    def _region_info(self, reply: bytes) -> RegionInfo:
        _, flags, idx, _, size, _ = self._unpack(REGION_INFO, reply[:REGION_INFO.size], Command.DEVICE_GET_REGION_INFO)
        return RegionInfo(idx, flags, size)

    def irq_info(self, index: int) -> IrqInfo:
        return self._irq_info(self._requests([self._irq_info_request(index)])[0])

    @staticmethod
    def _irq_info_request(index: int) -> tuple[int, bytes, tuple]:
        return Command.DEVICE_GET_IRQ_INFO, IRQ_INFO.pack(IRQ_INFO.size, 0, index, 0), ()

    def _irq_info(self, reply: bytes) -> IrqInfo:
        _, flags, idx, count = self._unpack(IRQ_INFO, reply, Command.DEVICE_GET_IRQ_INFO)
        return IrqInfo(idx, flags, count)

    # -- DMA ------------------------------------------------------------------------------------
    def dma_map(self, fd: int, file_offset: int, iova: int, size: int) -> None:
        """Let the device reach [iova, iova+size) = `size` bytes of file `fd` at `file_offset`."""
        with self._lock:
            self._requests([self._dma_map_request(fd, file_offset, iova, size)])
            self._mapped(fd, file_offset, iova, size)

    @staticmethod
    def _dma_map_request(fd: int, file_offset: int, iova: int, size: int) -> tuple[int, bytes, tuple]:
        return (Command.DMA_MAP, DMA_MAP.pack(DMA_MAP.size, DMA_MAP_READ | DMA_MAP_WRITE, file_offset, iova, size),
                (fd,))

    def _mapped(self, fd: int, file_offset: int, iova: int, size: int) -> None:
        if not any((m.iova, m.size) == (iova, size) for m in self._maps):  # an exact repeat is a no-op
            self._maps.append(_Mapping(iova, size, os.dup(fd), file_offset, DMA_MAP_READ | DMA_MAP_WRITE))

    def map_guest_memory(self, mem: GuestMemory) -> None:
        """All of guest memory (guest RAM, worker RAM, pool: one file, contiguous) in one DMA_MAP, IOVA = file
        offset (so PFNs agree everywhere)."""
        self.dma_map(mem.fd, 0, 0, mem.layout.size)

    def map_and_query(self, mem: GuestMemory, region: int, irq: int, read: tuple[int, int] | None = None,
                      irqs: tuple[int, ...] = ()) -> tuple[RegionInfo, IrqInfo, bytes | None]:
        """`map_guest_memory`, REGION_INFO of `region` and IRQ_INFO of `irq`, pipelined: what a driver needs
        before its first register access, in one round trip; `read` and `irqs` as `restore_mapped` (the read's
        bytes are the last item, None without `read`)."""
        with self._lock:
            batch, efds = self._attach_requests(mem, region, irq, read, irqs)
            try:
                replies = self._requests(batch)
            except BaseException:
                for efd in efds:
                    os.close(efd)
                raise
            return self._attached(mem, read, irqs, efds, replies)

    def dma_unmap(self, iova: int = 0, size: int = 0, *, unmap_all: bool = False) -> None:
        flags = DMA_UNMAP_ALL if unmap_all else 0
        with self._lock:
            self._request(Command.DMA_UNMAP, DMA_UNMAP.pack(DMA_UNMAP.size, flags, iova, size))
            self._forget_maps(lambda m: unmap_all or (m.iova, m.size) == (iova, size))

    # -- regions --------------------------------------------------------------------------------
    def region_read(self, index: int, offset: int, count: int) -> bytes:
        self._check_count(count)
        return self._region_read_reply(self._request(Command.REGION_READ, REGION_ACCESS.pack(offset, index, count)),
                                       count)

    def _region_read_reply(self, reply: bytes, count: int) -> bytes:
        if len(reply) != REGION_ACCESS.size + count:
            raise self._protocol_error(f"REGION_READ reply of {len(reply)} bytes for a {count}-byte read")
        return reply[REGION_ACCESS.size:]

    def region_write(self, index: int, offset: int, data: bytes, posted: bool = False) -> None:
        """`posted` sets no-reply: the server handles commands in order, so any later reply
        proves the write was applied (a read doubles as a flush). Inside `posted_batch` a posted write waits
        for the end of the batch (or the thread's next request) and goes out with the others."""
        self._check_count(len(data))
        batch = getattr(self._posted, "batch", None)
        if posted and batch is not None:
            batch.append((index, offset, bytes(data)))
            return
        self._request(Command.REGION_WRITE, REGION_ACCESS.pack(offset, index, len(data)) + bytes(data),
                      no_reply=posted)

    @contextlib.contextmanager
    def posted_batch(self):
        """Posted writes of this thread inside the block (doorbells) leave together at its end, in order, as one
        burst (`region_writes_posted`): a write-combining buffer, so the device reads a whole batch of doorbells in
        one wake-up. A request of the thread meanwhile sends them first (order is kept); they are sent even if the
        block raises."""
        if getattr(self._posted, "batch", None) is not None:  # nested: the outer block sends
            yield
            return
        self._posted.batch = []
        try:
            yield
        finally:
            batch, self._posted.batch = self._posted.batch, None
            self._send_posted(batch)

    def _send_waiting(self) -> None:
        """Send the thread's posted writes held by `posted_batch` now (before another request of the thread)."""
        batch = getattr(self._posted, "batch", None)
        if batch:
            self._posted.batch = []
            self._send_posted(batch)

    def _send_posted(self, batch: list[tuple[int, int, bytes]]) -> None:
        """(region, offset, data) posted writes in order: a burst per run of writes to one region."""
        start = 0
        for i in range(1, len(batch) + 1):
            if i == len(batch) or batch[i][0] != batch[start][0]:
                self._send_writes(batch[start][0], [(offset, data) for _, offset, data in batch[start:i]])
                start = i

    def region_writes_posted(self, index: int, writes: list[tuple[int, bytes]]) -> None:
        """Posted writes of (offset, data) to region `index`, in order, sent as one burst: the device takes them
        in one wake-up (a driver arming queues and ringing a doorbell together, like write-combined MMIO). Inside
        this thread's `posted_batch` they join its burst, as single posted writes do."""
        for _, data in writes:
            self._check_count(len(data))
        batch = getattr(self._posted, "batch", None)
        if batch is not None:
            batch.extend((index, offset, bytes(data)) for offset, data in writes)
            return
        self._send_writes(index, writes)

    def _send_writes(self, index: int, writes: list[tuple[int, bytes]]) -> None:
        """`region_writes_posted`'s burst, sent now (after the thread's posted writes held before it)."""
        self._send_waiting()
        with self._lock:
            if self._sock is None:
                raise DeviceMissing(f"REGION_WRITE: not connected to {self.path}")
            frames = []
            for offset, data in writes:
                frames.append(encode_message(self._next_id, Command.REGION_WRITE, TYPE_COMMAND | FLAG_NO_REPLY,
                                             REGION_ACCESS.pack(offset, index, len(data)) + bytes(data)))
                self._next_id = (self._next_id + 1) & 0xFFFF
            try:
                try:
                    send_frames(self._sock, b"".join(frames), Command.REGION_WRITE, timeout=self.timeout,
                                on_readable=self._pump)
                    self._flush()
                except TimeoutError:
                    raise VfioTimeout(f"REGION_WRITE: device at {self.path} does not read its socket "
                                      f"({self.timeout} s)") from None
            except PeerClosed as e:
                raise self._gone(f"REGION_WRITE: {e}") from None
            except FramingError as e:
                raise self._protocol_error(f"unreadable message from server: {e}") from None

    def write64_posted_many(self, writes: list[tuple[int, int]]) -> None:
        """Posted 64-bit BAR0 writes (offset, value), in order, in one burst (`region_writes_posted`)."""
        self.region_writes_posted(REGION_BAR0, [(offset, value.to_bytes(8, "little")) for offset, value in writes])

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
        return self.set_irqs([vector])[0]

    def set_irqs(self, vectors: list[int]) -> list[int]:
        """`set_irq` for each of `vectors`, one DEVICE_SET_IRQS each, pipelined: one round trip."""
        efds = [os.eventfd(0, os.EFD_CLOEXEC) for _ in vectors]
        with self._lock:
            try:
                self._requests([self._set_irq_request(vector, efd) for vector, efd in zip(vectors, efds)])
            except BaseException:
                for efd in efds:
                    os.close(efd)
                raise
            for vector, efd in zip(vectors, efds):
                old = self._irq_fds.pop(vector, None)
                if old is not None:
                    os.close(old)
                self._irq_fds[vector] = efd
        return efds

    @staticmethod
    def _set_irq_request(vector: int, efd: int) -> tuple[int, bytes, tuple]:
        return (Command.DEVICE_SET_IRQS,
                IRQ_SET.pack(IRQ_SET.size, IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER, IRQ_MSIX, vector, 1), (efd,))

    def irq_fds(self, vectors) -> list[int]:
        """The eventfds assigned to `vectors` (KeyError for one that has none)."""
        return [self._irq_fds[v] for v in vectors]

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
            self._drop_socket()
            self._close_irq_fds()
            self._forget_maps(lambda m: True)

    def __enter__(self) -> "VfioDevice":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- transport ------------------------------------------------------------------------------
    def _request(self, command: int, payload: bytes, *, fds: list[int] | tuple[int, ...] = (), no_reply: bool = False) -> bytes:
        return self._requests([(command, payload, fds)], no_reply=no_reply)[0]

    def _requests(self, batch: list[tuple[int, bytes, list[int] | tuple[int, ...]]], *,
                  no_reply: bool = False) -> list[bytes]:
        """Send each (command, payload, fds) of `batch` without waiting, then take the replies in order: the
        server handles and answers commands in arrival order (vfio-user spec 1.4), so a batch costs one round
        trip. The first error reply raises as that command alone would; nothing of the batch is used then
        (the commands after it may have been applied: callers batch only what they would give up together)."""
        self._send_waiting()  # the thread's posted writes go first
        with self._lock:
            sent = self._send_requests(batch, no_reply=no_reply)
            return self._take_replies([] if no_reply else sent)

    def _send_requests(self, batch: list[tuple[int, bytes, list[int] | tuple[int, ...]]], *,
                       no_reply: bool = False) -> list[tuple[int, int]]:
        """`_requests`' sending half: (msg_id, command) of each command sent, for `_take_replies`. Consecutive
        commands without fds leave in one sendmsg (one wake-up of the server, not one per command); a command
        with fds goes alone, its fds on the sendmsg that starts with its header (spec 1.6)."""
        with self._lock:
            if self._sock is None:
                raise DeviceMissing(f"{command_name(batch[0][0])}: not connected to {self.path}")
            sent: list[tuple[int, int]] = []
            current = [batch[0][0]]
            with self._transport_errors(current):
                flags = TYPE_COMMAND | (FLAG_NO_REPLY if no_reply else 0)
                group: list[tuple[int, bytes]] = []  # (command, encoded) without fds, not sent yet
                for command, payload, fds in batch:
                    current[0] = command
                    msg_id = self._next_id
                    self._next_id = (self._next_id + 1) & 0xFFFF
                    if fds:
                        self._send_group(group)
                        self._send(msg_id, command, flags, payload, fds=fds)
                    else:
                        group.append((command, encode_message(msg_id, command, flags, payload)))
                    sent.append((msg_id, command))
                self._send_group(group)
            return sent

    def _take_replies(self, sent: list[tuple[int, int]]) -> list[bytes]:
        """`_requests`' receiving half: the replies to `sent`, in order ([b""] for none)."""
        with self._lock:
            replies = []
            current = [sent[0][1] if sent else Command.VERSION]
            with self._transport_errors(current):
                for msg_id, command in sent:
                    current[0] = command
                    reply = self._wait_reply(msg_id, command)
                    if reply.is_error:
                        raise VfioError(reply.error if 0 < reply.error <= 4096 else errno.EINVAL, command)
                    replies.append(reply.payload)
                self._flush()  # answers to server commands that came with our replies
            return replies or [b""]

    @contextlib.contextmanager
    def _transport_errors(self, current: list[int]):
        """The socket's failures as this client's errors, named after the command `current[0]`."""
        try:
            yield
        except TimeoutError:
            raise VfioTimeout(f"{command_name(current[0])}: device at {self.path} does not read its socket "
                              f"({self.timeout} s)") from None
        except PeerClosed as e:  # SendAborted included: a half-sent message ends the connection
            raise self._gone(f"{command_name(current[0])}: {e}") from None
        except FramingError as e:
            raise self._protocol_error(f"unreadable message from server: {e}") from None

    def _send(self, msg_id: int, command: int, flags: int, payload: bytes, *, error: int = 0, fds=()) -> None:
        send_message(self._sock, msg_id, command, flags, payload, error=error, fds=fds, timeout=self.timeout,
                     on_readable=self._pump)

    def _send_group(self, group: list[tuple[int, bytes]]) -> None:
        """Send (command, encoded message) pairs without fds in one sendmsg, and empty `group`."""
        if group:
            send_frames(self._sock, b"".join(frame for _, frame in group), group[0][0], timeout=self.timeout,
                        on_readable=self._pump)
            group.clear()

    def _flush(self) -> None:
        """Send our replies to server commands, now that no message of ours is half-sent."""
        while self._outbox:
            reply = self._outbox.popleft()
            try:
                self._send(*reply[:4], error=reply[4])
            except TimeoutError:  # nothing went out: it stays first in line
                self._outbox.appendleft(reply)
                raise

    def _pump(self) -> None:
        """Read everything the server has sent: replies wait in the inbox, commands are served."""
        while (msg := self._reader.read(self._sock)) is not None:
            if msg.type == TYPE_COMMAND:
                self._serve(msg)
            elif msg.type == TYPE_REPLY:
                msg.close_fds()  # our subset never passes fds to the client
                self._inbox.append(msg)
            else:
                msg.close_fds()
                raise self._protocol_error(f"message type {msg.type} from server")

    def _wait_reply(self, msg_id: int, command: int) -> Message:
        deadline = time.monotonic() + self.timeout
        while True:
            while self._inbox:
                msg = self._inbox.popleft()
                if msg.msg_id != msg_id:  # a reply to a request that already timed out
                    kv(log, logging.WARNING, "discarding stale reply", id=msg.msg_id, cmd=command_name(msg.command))
                elif msg.command != command:
                    raise self._protocol_error(f"reply id {msg_id} is for {command_name(msg.command)}, "
                                               f"expected {command_name(command)}")
                else:
                    return msg
            self._flush()
            try:
                wait_fd(self._sock, select.POLLIN, deadline)
            except TimeoutError:
                raise VfioTimeout(f"{command_name(command)}: no reply from {self.path} within {self.timeout} s") \
                    from None
            self._pump()

    # -- server-initiated commands (addendum A2) ------------------------------------------------
    def _serve(self, msg: Message) -> None:
        """Answer a server command; the reply is queued (it may arrive while our own message is
        half-sent) and goes out before we wait for anything else."""
        error, payload = 0, b""
        try:
            if msg.fds:
                raise CommandError(errno.EINVAL, f"{command_name(msg.command)} carries {len(msg.fds)} fds")
            if msg.command == Command.DMA_READ:
                payload = self._dma_read(msg.payload)
            elif msg.command == Command.DMA_WRITE:
                payload = self._dma_write(msg.payload)
            else:
                raise CommandError(errno.ENOSYS, f"{command_name(msg.command)} is not a client command")
        except CommandError as e:
            error = e.errno
            kv(log, logging.WARNING, "server command refused", cmd=command_name(msg.command), id=msg.msg_id,
               reason=e.reason)
        finally:
            msg.close_fds()
        if not msg.no_reply:
            self._outbox.append((msg.msg_id, msg.command, TYPE_REPLY | (FLAG_ERROR if error else 0), payload, error))

    def _dma_read(self, payload: bytes) -> bytes:
        if len(payload) != DMA_RW.size:
            raise CommandError(errno.EINVAL, f"DMA_READ payload is {len(payload)} bytes, expected {DMA_RW.size}")
        address, count = DMA_RW.unpack(payload)
        m = self._mapping(address, count, DMA_MAP_READ)
        data = os.pread(m.fd, count, m.file_offset + address - m.iova)
        if len(data) != count:
            raise CommandError(errno.EFAULT, f"DMA_READ [{address:#x}, +{count:#x}) beyond the mapped file")
        return DMA_RW.pack(address, count) + data

    def _dma_write(self, payload: bytes) -> bytes:
        if len(payload) < DMA_RW.size:
            raise CommandError(errno.EINVAL, f"DMA_WRITE payload is {len(payload)} bytes, needs at least 16")
        address, count = DMA_RW.unpack_from(payload)
        if count > len(payload) - DMA_RW.size:
            raise CommandError(errno.EINVAL, f"DMA_WRITE count {count} but {len(payload) - DMA_RW.size} data bytes")
        m = self._mapping(address, count, DMA_MAP_WRITE)
        if os.pwrite(m.fd, payload[DMA_RW.size:DMA_RW.size + count], m.file_offset + address - m.iova) != count:
            raise CommandError(errno.EFAULT, f"DMA_WRITE [{address:#x}, +{count:#x}) beyond the mapped file")
        return DMA_RW.pack(address, count)

    def _mapping(self, address: int, count: int, need: int) -> _Mapping:
        """The mapping holding all of [address, address+count): E2BIG over our max_data_xfer_size,
        EFAULT outside every mapping, EPERM without the needed permission."""
        if count > MAX_DATA_XFER_SIZE:
            raise CommandError(errno.E2BIG, f"DMA access of {count} bytes > max_data_xfer_size {MAX_DATA_XFER_SIZE}")
        for m in self._maps:
            if m.iova <= address and address + count <= m.iova + m.size:
                if not m.flags & need:
                    raise CommandError(errno.EPERM, f"mapping at {m.iova:#x} does not allow this access")
                return m
        raise CommandError(errno.EFAULT, f"DMA access [{address:#x}, +{count:#x}) is not inside one mapping")

    def _forget_maps(self, which) -> None:
        keep = []
        for m in self._maps:
            if which(m):
                os.close(m.fd)
            else:
                keep.append(m)
        self._maps = keep

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
        for msg in self._inbox:
            msg.close_fds()
        self._inbox.clear()
        self._outbox.clear()

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


class PendingAttach:
    """A restore's attach (`VfioDevice.attach_ahead`) sent, its replies not read yet: `finish()` reads them and
    returns what `restore_mapped` returns; `cancel()` disconnects instead. One of the two, once. `settle()` may
    finish it earlier, as soon as the device has answered, for `finish()` to hand over then."""

    def __init__(self, dev: VfioDevice, sent: list[tuple[int, int]], mem: GuestMemory,
                 read: tuple[int, int] | None, irqs: tuple[int, ...], efds: list[int]):
        self._dev: VfioDevice | None = dev
        self._sent, self._mem, self.read, self.irqs, self._efds = sent, mem, read, irqs, efds
        #: (what `finish` returned, None) or (None, what it raised) once `settle` finished the attach.
        self._settled: tuple | None = None

    def fileno(self) -> int:
        """The connection's socket, readable when answers come (until the attach is settled, finished or
        cancelled)."""
        return self._dev._sock.fileno()

    def answers(self) -> tuple[RegionInfo, IrqInfo, bytes | None] | None:
        """What the device answered to the attach `settle` finished (`finish`'s result without the device): None
        before, or when it failed."""
        if self._settled is None or self._settled[0] is None:
            return None
        return self._settled[0][1:]

    def settle(self) -> bool:
        """Read what the device has answered so far, without waiting; once every answer is in, finish the attach
        now (`finish` then returns what it made, or raises what it raised). True once settled (or finished or
        cancelled): a worker waiting for the host's go reads the answers then, not in the restore after the go."""
        dev = self._dev
        if dev is None:
            return True
        try:
            with dev._lock, dev._transport_errors([Command.VERSION]):
                dev._pump()
                answered = {m.msg_id for m in dev._inbox}
            if not all(msg_id in answered for msg_id, _ in self._sent):
                return False
            self._settled = (self.finish(), None)
        except (VfioClientError, OSError) as e:  # kept for `finish`: its caller handles it as if raised there
            if self._dev is not None:  # the read failed (finish cleans up after itself)
                self._take().close()
                self._close_efds()
            self._settled = (None, e)
        return True

    def _take(self) -> VfioDevice:
        dev, self._dev = self._dev, None
        if dev is None:
            raise VfioClientError("the attach was finished or cancelled already")
        return dev

    def finish(self) -> tuple[VfioDevice, RegionInfo, IrqInfo, bytes | None]:
        if self._settled is not None:
            (result, error), self._settled = self._settled, None
            if error is not None:
                raise error
            return result
        dev = self._take()
        try:
            replies = dev._opened(self._sent)
        except BaseException:
            self._close_efds()
            raise
        try:
            return dev, *dev._attached(self._mem, self.read, self.irqs, self._efds, replies)
        except BaseException:
            dev.close()
            raise

    def cancel(self) -> None:
        """Disconnect without using the attach, returning once the device has taken the disconnect (it closes its
        end; at most the connection's timeout): a control call that follows (e.g. a fallback setting the reset
        method to flr) must not reach the device first and turn the disconnect into a reset."""
        if self._settled is not None:  # finished by `settle`: the device and the vectors' eventfds are its now
            (result, _), self._settled = self._settled, None
            if result is not None:
                _disconnect(result[0])
            return
        _disconnect(self._take())
        self._close_efds()

    def _close_efds(self) -> None:
        for efd in self._efds:
            os.close(efd)
        self._efds = []


def _disconnect(dev: VfioDevice) -> None:
    """Close `dev`'s connection once the device has taken the disconnect (`PendingAttach.cancel`)."""
    try:
        sock = dev._sock
        if sock is not None:
            sock.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + dev.timeout
            while True:
                wait_fd(sock, select.POLLIN, deadline)
                if not sock.recv(65536):
                    break
    except (OSError, TimeoutError):
        pass
    finally:
        dev.close()
