"""UNIX stream socket helpers shared by the control sockets (`vfkeep.rpc`) and the vfio-user transport."""
from __future__ import annotations

import os
import select
import socket
import stat
import time


class SocketPathError(OSError):
    """A socket cannot be created at a path: its directory is missing, something else is there, or another
    process listens on it (a path is never taken from a live server or from a file that is not a socket)."""


def is_stale_socket(path: str) -> bool:
    """`path` is a socket file nobody listens on (connect refused): a dead process's, safe to replace."""
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            return False
    except FileNotFoundError:
        return False
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        return True
    except OSError:  # accepted, backlog full (EAGAIN), no permission: somebody's, not ours to remove
        return False
    finally:
        probe.close()
    return False


def claim_socket_path(path: str) -> None:
    """Make `path` free for bind(): remove a stale socket there; SocketPathError if a live socket or any
    other file is there."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise SocketPathError(f"{path} exists and is not a socket; not replacing it")
    if not is_stale_socket(path):
        raise SocketPathError(f"another process is listening on {path}")
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def bind_error(path: str, e: OSError) -> SocketPathError:
    """bind() failed: the cause as one line naming the path."""
    return SocketPathError(f"cannot create socket {path}: {e.strerror or e}")


def listen_unix(path: str) -> tuple[socket.socket, int]:
    """Non-blocking listening socket at `path` and the inode of its file, replacing a stale socket file
    left by a dead process (never a live one or another kind of file: SocketPathError)."""
    claim_socket_path(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(path)
    except OSError as e:
        sock.close()
        raise bind_error(path, e) from None
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
