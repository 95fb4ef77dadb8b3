"""Host <-> worker control channel: length-prefixed JSON messages on a socketpair.

The host creates the pair and passes one end to the worker (pass_fds). Binary
payloads (the ServicingState blob) travel base64-encoded inside the JSON, which
keeps every message one self-describing object in the logs.
"""
from __future__ import annotations

import base64
import json
import select
import socket
import struct
import time
from typing import Any

_LEN = struct.Struct("<I")
MAX_MESSAGE = 64 << 20


class ChannelClosed(Exception):
    """The peer went away (EOF or reset)."""


class ChannelTimeout(Exception):
    """No message arrived in time."""


def encode_blob(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode()


def decode_blob(text: str | None) -> bytes | None:
    return None if text is None else base64.b64decode(text.encode(), validate=True)


class Channel:
    def __init__(self, sock: socket.socket):
        self.sock = sock
        self._buf = bytearray()

    @classmethod
    def pair(cls) -> tuple["Channel", "Channel"]:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        return cls(a), cls(b)

    @classmethod
    def from_fd(cls, fd: int) -> "Channel":
        return cls(socket.socket(fileno=fd))

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, msg: dict[str, Any]) -> None:
        data = json.dumps(msg, separators=(",", ":")).encode()
        try:
            self.sock.sendall(_LEN.pack(len(data)) + data)
        except (BrokenPipeError, ConnectionResetError) as e:
            raise ChannelClosed(str(e)) from e

    def recv(self, timeout: float | None = None) -> dict[str, Any]:
        """Next message; `timeout` None waits forever."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if len(self._buf) >= _LEN.size:
                (n,) = _LEN.unpack_from(self._buf)
                if n > MAX_MESSAGE:
                    raise ChannelClosed(f"message of {n} bytes exceeds {MAX_MESSAGE}")
                if len(self._buf) >= _LEN.size + n:
                    body = bytes(self._buf[_LEN.size:_LEN.size + n])
                    del self._buf[:_LEN.size + n]
                    return json.loads(body)
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            if remaining == 0.0:
                raise ChannelTimeout("no message from peer in time")
            r, _, _ = select.select([self.sock], [], [], remaining)
            if not r:
                raise ChannelTimeout("no message from peer in time")
            try:
                chunk = self.sock.recv(1 << 16)
            except ConnectionResetError as e:
                raise ChannelClosed(str(e)) from e
            if not chunk:
                raise ChannelClosed("peer closed the channel")
            self._buf += chunk

    def close(self) -> None:
        self.sock.close()
