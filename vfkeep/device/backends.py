"""Packet backends: where a vport's transmitted frames go and where received frames come from.

- `loopback` (default): a frame sent on a vport comes back to the same vport
  with source and destination MAC swapped (like a reflecting switch port).
- `udp:HOST:PORT`: every transmitted frame is one datagram to HOST:PORT; every
  datagram received on the local port is one received frame. The local port
  is `--udp-listen PORT` (0 = an ephemeral port, reported by the `state`
  control command as `backend.local_port`).
- `tap:NAME[@NETNS]`: a Linux TAP interface (/dev/net/tun, IFF_TAP|IFF_NO_PI,
  needs CAP_NET_ADMIN), created in network namespace NETNS when given (the
  host's wire namespace of `--guest netns`); the device brings it up.

udp and tap are one wire shared by all vports: a received frame goes to the
vport whose MAC is its destination, broadcast/multicast to every vport, and
with a single vport every frame goes to it (see `GdmaDevice.deliver_wire`).
Frames move in batches both ways: `send_many(vport, frames)` takes what one
SQ doorbell produced (views of the TX buffers, valid only during the call: a
backend copies what it keeps), and readers run on the device's event loop and hand up
to `RX_BATCH` frames per wake-up to the device as one batch. A backend never
raises into the data path: send errors are counted (`tx_backend_errors`).
"""
from __future__ import annotations

import contextlib
import os
import socket

import numpy as np

from .. import netns

RX_BATCH = 256
MAX_DATAGRAM = 65535
SOCKET_BUFFER = 4 << 20


class BackendError(Exception):
    """A backend spec that cannot be parsed or opened."""


def swap_macs(frame: bytes | memoryview) -> bytes:
    """The frame with destination and source MAC swapped: one copy (slices of a view are not copies)."""
    if len(frame) < 12:
        return bytes(frame)
    return b"".join((frame[6:12], frame[:6], frame[12:]))


class LoopbackBackend:
    kind = "loopback"

    def attach(self, dev) -> None:
        self.dev = dev

    def send_many(self, vport_index: int, frames: list[bytes]) -> None:
        if min(map(len, frames), default=12) < 12:
            self.dev.deliver_many(vport_index, list(map(swap_macs, frames)))
            return
        join = b"".join  # swap_macs inline: one copy per frame
        self.dev.deliver_many(vport_index, [join((f[6:12], f[:6], f[12:])) for f in frames])

    def send_block(self, vport_index: int, frames: np.ndarray) -> None:
        """`send_many` for frames of one length (at least 12 bytes), the rows of `frames`: swapped as columns."""
        swapped = np.empty_like(frames)
        swapped[:, :6], swapped[:, 6:12], swapped[:, 12:] = frames[:, 6:12], frames[:, :6], frames[:, 12:]
        self.dev.deliver_block(vport_index, swapped)

    def close(self) -> None:
        pass

    def inspect(self) -> dict:
        return {"kind": self.kind}


class UdpBackend:
    kind = "udp"

    def __init__(self, host: str, port: int, listen_port: int = 0):
        self.peer = (host, port)
        self.listen_port = listen_port
        self.sock: socket.socket | None = None

    def attach(self, dev) -> None:
        self.dev = dev
        sock = self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
        try:
            sock.bind(("127.0.0.1", self.listen_port))
        except OSError as e:
            sock.close()
            raise BackendError(f"cannot bind UDP port {self.listen_port}: {e}") from e
        sock.setblocking(False)
        self.listen_port = sock.getsockname()[1]
        dev.loop.add_reader(sock.fileno(), self._readable)

    def send_many(self, vport_index: int, frames: list[bytes]) -> None:
        sendto, peer = self.sock.sendto, self.peer
        for frame in frames:
            try:
                sendto(frame, peer)
            except OSError:
                self.dev.counters["tx_backend_errors"] += 1

    def _readable(self) -> None:
        frames = []
        recv = self.sock.recv
        for _ in range(RX_BATCH):
            try:
                frames.append(recv(MAX_DATAGRAM))
            except BlockingIOError:
                break
            except OSError:  # e.g. ECONNREFUSED left by an earlier send
                self.dev.counters["rx_backend_errors"] += 1
                break
        if frames:
            self.dev.deliver_wire(frames)

    def close(self) -> None:
        if self.sock is not None:
            self.dev.loop.remove_reader(self.sock.fileno())
            self.sock.close()
            self.sock = None

    def inspect(self) -> dict:
        return {"kind": self.kind, "peer": f"{self.peer[0]}:{self.peer[1]}", "local_port": self.listen_port}


class TapBackend:
    kind = "tap"

    def __init__(self, name: str, netns: str | None = None):
        if not name or len(name.encode()) > 15:
            raise BackendError(f"TAP interface name {name!r} must be 1-15 bytes")
        self.name = name
        self.netns = netns
        self.fd: int | None = None

    def attach(self, dev) -> None:
        """Create the interface (in `netns` when given: it is born there, never visible outside) and bring it up."""
        self.dev = dev
        try:
            with contextlib.ExitStack() as stack:
                if self.netns is not None:
                    stack.enter_context(netns.entered(self.netns))
                fd = netns.open_tap(self.name)
        except netns.NetnsError as e:
            raise BackendError(str(e)) from None
        self.fd = fd
        dev.loop.add_reader(fd, self._readable)

    def send_many(self, vport_index: int, frames: list[bytes]) -> None:
        fd = self.fd
        for frame in frames:
            try:
                os.write(fd, frame)
            except OSError:
                self.dev.counters["tx_backend_errors"] += 1

    def _readable(self) -> None:
        frames = []
        for _ in range(RX_BATCH):
            try:
                frames.append(os.read(self.fd, MAX_DATAGRAM))
            except BlockingIOError:
                break
            except OSError:
                self.dev.counters["rx_backend_errors"] += 1
                break
        if frames:
            self.dev.deliver_wire(frames)

    def close(self) -> None:
        if self.fd is not None:
            self.dev.loop.remove_reader(self.fd)
            os.close(self.fd)
            self.fd = None

    def inspect(self) -> dict:
        return {"kind": self.kind, "name": self.name, "netns": self.netns}


def parse_backend(spec: str, udp_listen: int = 0):
    """`loopback` | `udp:HOST:PORT` | `tap:NAME` → an unattached backend."""
    kind, _, rest = spec.partition(":")
    if kind == "loopback" and not rest:
        return LoopbackBackend()
    if kind == "udp":
        host, _, port = rest.rpartition(":")
        if host and port.isdigit() and 0 < int(port) < 65536:
            return UdpBackend(host, int(port), udp_listen)
    if kind == "tap" and rest:
        name, _, ns = rest.partition("@")
        return TapBackend(name, ns or None)
    raise BackendError(f"bad backend {spec!r}: expected loopback, udp:HOST:PORT or tap:NAME[@NETNS]")


__all__ = ["LoopbackBackend", "UdpBackend", "TapBackend", "BackendError", "parse_backend", "swap_macs"]
