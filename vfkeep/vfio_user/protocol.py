"""vfio-user wire format (spec vfio-user.md §1-4): header, command numbers, flags, payload
structs, and framing over an AF_UNIX stream with SCM_RIGHTS file descriptors.

Both ends use non-blocking sockets: the server runs on a selector loop and the client waits
with poll() so every wait has a deadline. `FrameReader` therefore reads incrementally, taking
whatever the socket holds in one recvmsg, so a burst of small messages (posted doorbell writes)
costs one system call rather than two per message. Descriptors ride on the skb carrying the header
of their message (a sender passes them with the sendmsg that starts it), and Linux ends a read
right after an skb that carried descriptors: so the descriptors of one read belong to the last
message starting in it, which is the first message to end at or after that read's end.
"""
from __future__ import annotations

import array
import collections
import enum
import errno
import json
import os
import select
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Callable

from vfkeep.sockets import wait_fd

# -- header (§1.3) ------------------------------------------------------------------------------
HEADER = struct.Struct("<HHIII")
HEADER_SIZE = HEADER.size  # 16

FLAG_TYPE_MASK = 0x0000000F
TYPE_COMMAND = 0
TYPE_REPLY = 1
FLAG_NO_REPLY = 0x00000010
FLAG_ERROR = 0x00000020


class Command(enum.IntEnum):
    """Command numbers of the whole protocol (§2); the server implements a subset."""

    VERSION = 1
    DMA_MAP = 2
    DMA_UNMAP = 3
    DEVICE_GET_INFO = 4
    DEVICE_GET_REGION_INFO = 5
    DEVICE_GET_REGION_IO_FDS = 6
    DEVICE_GET_IRQ_INFO = 7
    DEVICE_SET_IRQS = 8
    REGION_READ = 9
    REGION_WRITE = 10
    DMA_READ = 11
    DMA_WRITE = 12
    DEVICE_RESET = 13
    DIRTY_PAGES = 14
    REGION_WRITE_MULTI = 15
    DEVICE_FEATURE = 16
    MIG_DATA_READ = 17
    MIG_DATA_WRITE = 18


_COMMAND_NAMES = {c.value: c.name for c in Command}


def command_name(number: int) -> str:
    return _COMMAND_NAMES.get(number) or f"UNKNOWN({number})"


# -- payload structs (§3), all little-endian and packed -----------------------------------------
VERSION_FIXED = struct.Struct("<HH")          # major, minor; capabilities JSON + NUL follow
DMA_MAP = struct.Struct("<IIQQQ")             # argsz, flags, offset, address, size
DMA_UNMAP = struct.Struct("<IIQQ")            # argsz, flags, address, size
DEVICE_INFO = struct.Struct("<IIII")          # argsz, flags, num_regions, num_irqs
REGION_INFO = struct.Struct("<IIIIQQ")        # argsz, flags, index, cap_offset, size, offset
IRQ_INFO = struct.Struct("<IIII")             # argsz, flags, index, count
IRQ_SET = struct.Struct("<IIIII")             # argsz, flags, index, start, count (+ bool data)
REGION_ACCESS = struct.Struct("<QII")         # offset, region, count (+ data)
DMA_RW = struct.Struct("<QQ")                 # address, count (+ data): server->client DMA_READ/WRITE,
                                              # libvfio-user's layout (addendum A2)

VERSION_MAJOR = 0
VERSION_MINOR = 0

# -- limits (§1.7, §3.1) ------------------------------------------------------------------------
MAX_DATA_XFER_SIZE = 1 << 20
#: Largest message either side accepts: a full-size REGION_WRITE.
MAX_MESSAGE_SIZE = MAX_DATA_XFER_SIZE + HEADER_SIZE + REGION_ACCESS.size
#: fds this project's server and client accept per message (at least 16, spec §3.1 [project]).
MAX_MSG_FDS = 16
#: Bytes one recvmsg takes from the stream at most (a burst of posted writes in one system call).
READ_CHUNK = 1 << 16
_MSG_CTRUNC = int(socket.MSG_CTRUNC)  # a plain int: enum flag arithmetic per read is measurable
DEFAULT_MAX_MSG_FDS = 1
DEFAULT_MAX_DMA_MAPS = 65535
PAGE_SIZES = 4096

# -- VFIO constants (§4) ------------------------------------------------------------------------
REGION_BAR0 = 0
REGION_CONFIG = 7
NUM_PCI_REGIONS = 9

IRQ_INTX = 0
IRQ_MSI = 1
IRQ_MSIX = 2
IRQ_ERR = 3
IRQ_REQ = 4
NUM_PCI_IRQS = 5

IRQ_SET_DATA_NONE = 0x01
IRQ_SET_DATA_BOOL = 0x02
IRQ_SET_DATA_EVENTFD = 0x04
IRQ_SET_ACTION_MASK = 0x08
IRQ_SET_ACTION_UNMASK = 0x10
IRQ_SET_ACTION_TRIGGER = 0x20
IRQ_SET_DATA_MASK = 0x07
IRQ_SET_ACTION_MASK_ALL = 0x38

IRQ_INFO_EVENTFD = 0x1
IRQ_INFO_MASKABLE = 0x2
IRQ_INFO_AUTOMASKED = 0x4
IRQ_INFO_NORESIZE = 0x8

REGION_INFO_READ = 0x1
REGION_INFO_WRITE = 0x2
REGION_INFO_MMAP = 0x4
REGION_INFO_CAPS = 0x8

DEVICE_FLAGS_RESET = 0x01
DEVICE_FLAGS_PCI = 0x02

DMA_MAP_READ = 0x1
DMA_MAP_WRITE = 0x2
DMA_MAP_MMAP = 0x4
DMA_MAP_FILE_IO = 0x8
DMA_UNMAP_GET_DIRTY_BITMAP = 0x1
DMA_UNMAP_ALL = 0x2

#: Capability keys whose values must be integers (§3.1).
INT_CAPS = ("max_msg_fds", "max_data_xfer_size", "max_dma_maps", "pgsizes")
OBJECT_CAPS = ("migration", "twin_socket")
BOOL_CAPS = ("write_multiple",)


# -- errors -------------------------------------------------------------------------------------
class CommandError(Exception):
    """A command failed with `errno_`; the server turns it into an error reply. Devices may raise
    it from `region_read`/`region_write` to choose the errno."""

    def __init__(self, errno_: int, reason: str):
        super().__init__(f"{errno.errorcode.get(errno_, errno_)}: {reason}")
        self.errno = errno_
        self.reason = reason


class FramingError(Exception):
    """The byte stream cannot be parsed any further (bad size, lost fds): close the connection."""


class PeerClosed(Exception):
    """The other end went away (EOF, ECONNRESET, EPIPE)."""


class SendAborted(PeerClosed):
    """A send failed after part of the message was written (timeout or error): the stream has lost its
    framing, so the connection must be closed, as if the peer had gone (addendum A5). A send that wrote
    nothing raises TimeoutError or PeerClosed instead."""


@dataclass
class Message:
    msg_id: int
    command: int
    flags: int
    error: int
    payload: bytes
    fds: list[int] = field(default_factory=list)

    @property
    def type(self) -> int:
        return self.flags & FLAG_TYPE_MASK

    @property
    def no_reply(self) -> bool:
        return bool(self.flags & FLAG_NO_REPLY)

    @property
    def is_error(self) -> bool:
        return bool(self.flags & FLAG_ERROR)

    def close_fds(self) -> None:
        close_fds(self.fds)


def close_fds(fds: list[int]) -> None:
    """Close and forget every fd in the list (the receiver owns what it was sent)."""
    while fds:
        try:
            os.close(fds.pop())
        except OSError:
            pass


# -- capabilities (§3.1) ------------------------------------------------------------------------
def encode_version(major: int, minor: int, caps: dict | None) -> bytes:
    """VERSION payload; capabilities as compact JSON with the terminating NUL."""
    body = VERSION_FIXED.pack(major, minor)
    if caps is not None:
        body += json.dumps({"capabilities": caps}, separators=(",", ":")).encode() + b"\0"
    return body


def decode_version(payload: bytes) -> tuple[int, int, dict]:
    """(major, minor, capabilities) from a VERSION payload; CommandError(EINVAL) when malformed."""
    if len(payload) < VERSION_FIXED.size:
        raise CommandError(errno.EINVAL, f"VERSION payload is {len(payload)} bytes, needs at least 4")
    major, minor = VERSION_FIXED.unpack_from(payload)
    text = payload[VERSION_FIXED.size:]
    if not text:
        return major, minor, {}
    if text[-1:] != b"\0":
        raise CommandError(errno.EINVAL, "VERSION capabilities are not NUL-terminated")
    try:
        doc = json.loads(text[:-1].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CommandError(errno.EINVAL, f"VERSION capabilities are not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise CommandError(errno.EINVAL, "VERSION capabilities JSON is not an object")
    caps = doc.get("capabilities", {})
    if not isinstance(caps, dict):
        raise CommandError(errno.EINVAL, f"capabilities must be an object, got {type(caps).__name__}")
    for key, value in caps.items():
        if key in INT_CAPS and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise CommandError(errno.EINVAL, f"capability {key} must be a non-negative integer, got {value!r}")
        if key in OBJECT_CAPS and not isinstance(value, dict):
            raise CommandError(errno.EINVAL, f"capability {key} must be an object, got {value!r}")
        if key in BOOL_CAPS and not isinstance(value, bool):
            raise CommandError(errno.EINVAL, f"capability {key} must be a boolean, got {value!r}")
    return major, minor, caps


# -- framing (§1.2, §1.6) -----------------------------------------------------------------------
def send_message(sock: socket.socket, msg_id: int, command: int, flags: int, payload: bytes = b"", *,
                 error: int = 0, fds: list[int] | tuple[int, ...] = (), timeout: float = 5.0,
                 on_readable: Callable[[], None] | None = None) -> None:
    """Send one message with its fds on the sendmsg that carries the header. Works on non-blocking
    sockets: waits for writability up to `timeout`. PeerClosed if the peer is gone, TimeoutError
    if it does not drain its socket in time; SendAborted for either once any byte went out.
    `on_readable` is called whenever the socket has input meanwhile (it must read, not send): a peer
    that is itself sending to us cannot then deadlock against this send (addendum A2)."""
    send_frames(sock, encode_message(msg_id, command, flags, payload, error), command, fds=fds, timeout=timeout,
                on_readable=on_readable)


def encode_message(msg_id: int, command: int, flags: int, payload: bytes = b"", error: int = 0) -> bytes:
    """One message as it goes on the wire: header, then payload."""
    return HEADER.pack(msg_id & 0xFFFF, command, HEADER_SIZE + len(payload), flags, error) + payload


def send_frames(sock: socket.socket, frames: bytes, command: int, *, fds: list[int] | tuple[int, ...] = (),
                timeout: float = 5.0, on_readable: Callable[[], None] | None = None) -> None:
    """Send `frames` (one or more encoded messages, `command` naming the first for errors) as `send_message`
    does: messages sent back to back in one write reach the peer in one wake-up."""
    total = len(frames)
    data = memoryview(frames)
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    deadline = time.monotonic() + timeout
    while data:
        try:
            try:
                sent = sock.sendmsg([data], ancillary, socket.MSG_NOSIGNAL)
            except BlockingIOError:
                _wait_writable(sock, deadline, on_readable)
                continue
            except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError) as e:
                raise PeerClosed(str(e)) from None
        except (PeerClosed, TimeoutError, OSError) as e:
            if len(data) == total:
                raise
            raise SendAborted(f"{command_name(command)}: send failed after {total - len(data)} of {total} bytes "
                              f"({e or type(e).__name__}): connection must be closed") from None
        ancillary = []  # the fds went with the first bytes
        data = data[sent:]


def _wait_writable(sock: socket.socket, deadline: float, on_readable: Callable[[], None] | None) -> None:
    if on_readable is None:
        wait_fd(sock, select.POLLOUT, deadline)
        return
    while True:
        events = wait_fd(sock, select.POLLOUT | select.POLLIN, deadline)
        if events & select.POLLIN:
            on_readable()
        if events & ~select.POLLIN:  # writable, or an error/hangup the next sendmsg reports
            return


class FrameReader:
    """Assembles messages from a non-blocking stream (see the module docstring for descriptors)."""

    def __init__(self, max_fds: int = MAX_MSG_FDS, max_size: int = MAX_MESSAGE_SIZE):
        self.max_fds = max_fds
        self.max_size = max_size
        self._anc_size = socket.CMSG_SPACE(max_fds * array.array("i").itemsize)
        self._buf = bytearray()  # received, not yet returned
        self._pos = 0  # stream offset of _buf[0]
        self._fd_marks: collections.deque[tuple[int, list[int]]] = collections.deque()  # (read end, fds)
        #: CLOCK_MONOTONIC s just after the socket read that brought the last bytes in: every message `read`
        #: returned so far had arrived by then (a device models latency from it, not from when it got round
        #: to the message).
        self.received_at = 0.0

    @property
    def buffered(self) -> bool:
        """True if a complete message is waiting in the reader (no socket read needed for it)."""
        return len(self._buf) >= HEADER_SIZE and len(self._buf) >= HEADER.unpack_from(self._buf)[2]

    def read(self, sock: socket.socket) -> Message | None:
        """Return the next complete message, or None when the socket has no more bytes yet.
        Raises PeerClosed on EOF/reset and FramingError on an unparsable frame (fds closed)."""
        while True:
            msg = self._next()
            if msg is not None:
                return msg
            try:
                data, anc, msg_flags, _ = sock.recvmsg(READ_CHUNK, self._anc_size)
            except BlockingIOError:
                return None
            except (ConnectionResetError, ConnectionAbortedError) as e:
                self.discard()
                raise PeerClosed(str(e)) from None
            fds = _received_fds(anc)
            if fds:
                self._fd_marks.append((self._pos + len(self._buf) + len(data), fds))
            if msg_flags & _MSG_CTRUNC:
                self.discard()
                raise FramingError(f"ancillary data truncated: more than {self.max_fds} fds in one message")
            if len(fds) > self.max_fds:
                self.discard()
                raise FramingError(f"{len(fds)} fds in one message, at most {self.max_fds} accepted")
            if not data:
                self.discard()
                raise PeerClosed("end of file")
            self.received_at = time.monotonic()
            self._buf += data

    def _next(self) -> Message | None:
        buf = self._buf
        if len(buf) < HEADER_SIZE:
            return None
        msg_id, command, size, flags, err = HEADER.unpack_from(buf)
        if not HEADER_SIZE <= size <= self.max_size:
            self.discard()
            raise FramingError(f"message size {size} outside [{HEADER_SIZE}, {self.max_size}]")
        if len(buf) < size:
            return None
        payload = bytes(buf[HEADER_SIZE:size])
        del buf[:size]
        self._pos += size
        fds: list[int] = []
        marks = self._fd_marks
        while marks and marks[0][0] <= self._pos:
            fds += marks.popleft()[1]
        return Message(msg_id, command, flags, err, payload, fds)

    def discard(self) -> None:
        """Drop everything received and not yet returned, closing its fds."""
        while self._fd_marks:
            close_fds(self._fd_marks.popleft()[1])
        self._pos += len(self._buf)
        self._buf = bytearray()


def _received_fds(anc: list[tuple[int, int, bytes]]) -> list[int]:
    fds = array.array("i")
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
    return fds.tolist()


def wait_message(sock: socket.socket, reader: FrameReader, timeout: float | None) -> Message:
    """Block (with poll) until `reader` has a full message; TimeoutError after `timeout` seconds."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        msg = reader.read(sock)
        if msg is not None:
            return msg
        wait_fd(sock, select.POLLIN, deadline)
