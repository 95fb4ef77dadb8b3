"""UNIX stream socket helpers shared by the control sockets (`vfkeep.rpc`) and the vfio-user transport."""
from __future__ import annotations

import os
import select
import socket
import time


def listen_unix(path: str) -> tuple[socket.socket, int]:
    """Non-blocking listening socket at `path` and the inode of its file, replacing a stale socket file
    left by a dead process."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.bind(path)
    sock.listen(16)
    sock.setblocking(False)
    return sock, os.stat(path).st_ino


def unlink_if_ours(path: str, inode: int) -> None:
    """Remove the socket file unless another process has bound a new one there since."""
    try:
        if os.stat(path).st_ino == inode:
            os.unlink(path)
    except OSError:
        pass


def connect_unix(path: str | os.PathLike, deadline: float, error: type[Exception]) -> socket.socket:
    """Non-blocking connected socket to `path`, retrying while the listener is not there yet; `error`
    once `deadline` (monotonic) has passed."""
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.connect(os.fspath(path))
        except (FileNotFoundError, ConnectionRefusedError) as e:
            sock.close()
            if time.monotonic() >= deadline:
                raise error(f"cannot connect to {os.fspath(path)}: {e.strerror}") from None
            time.sleep(0.01)  # retry back-off while the server starts
            continue
        except OSError:
            sock.close()
            raise
        sock.setblocking(False)
        return sock


def wait_fd(sock: socket.socket | int, events: int, deadline: float | None) -> int:
    """poll() one fd until `events` or `deadline` (monotonic; None = forever); TimeoutError then.
    Returns the events that fired."""
    poller = select.poll()
    poller.register(sock, events)
    remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
    ready = poller.poll(None if remaining is None else remaining * 1000)
    if not ready:
        raise TimeoutError("peer did not respond in time")
    return ready[0][1]


def send_all(sock: socket.socket, data: bytes, deadline: float | None) -> None:
    """Write all of `data` to a non-blocking socket by `deadline`; TimeoutError otherwise."""
    view = memoryview(data)
    while view:
        try:
            view = view[sock.send(view, socket.MSG_NOSIGNAL):]
        except BlockingIOError:
            wait_fd(sock, select.POLLOUT, deadline)
