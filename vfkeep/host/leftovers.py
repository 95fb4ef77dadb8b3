"""What a dead host leaves in its run dir, and removing only that.

A run dir may be shared with the user's own files (a `--disk` image, another program's socket, a build's
empty `.stderr`), so cleanup never goes by "anything that looks like it": sockets by vfkeep's own names and
only when nobody listens on them; disk files only when the host recorded creating them (`host.created`,
written before each is created, removed at teardown); children's stderr files by vfkeep's own names and only
when empty; network namespaces by the run dir's own id. `vfkeep run` (before it starts) and `vfkeep stop`
(with no host running) both call `remove_leftovers`.
"""
from __future__ import annotations

import os
import re
import stat

from .. import sockets

#: Files the host created and removes at teardown (one name a line): the next run or stop reads it when the
#: host died before its teardown.
MANIFEST = "host.created"
#: Every socket a host and its children bind in the run dir (host, NIC and NVMe devices and their control
#: sockets, traffic and disk agents, guest bridges).
OWN_SOCKET = re.compile(r"host\.sock|(nic|nvme)\d+\.sock(\.ctl)?|(guest-agent|guest-bridge|disk-agent)-\d+\.sock")
#: The children's stderr files (host.stderr is the starting host's own, opened by whoever started it).
OWN_STDERR = re.compile(r"(worker-\d+|device-nic\d+|device-nvme\d+)\.stderr")
#: What a manifest may name (it is read back from a directory others can write to).
_MANIFEST_ENTRY = re.compile(r"nvme\d+\.disk")


class LeftoverError(Exception):
    """A leftover could not be removed (the network namespaces, say, without root)."""


def record_created(run_dir: str, path: str) -> None:
    """Note `path` (a file in `run_dir` the host is about to create) in the manifest, before creating it."""
    with open(os.path.join(run_dir, MANIFEST), "a") as f:
        f.write(os.path.basename(path) + "\n")


def forget_created(run_dir: str) -> None:
    """The host removed what it created (teardown): the manifest goes too."""
    try:
        os.unlink(os.path.join(run_dir, MANIFEST))
    except FileNotFoundError:
        pass


def created_files(run_dir: str) -> list[str]:
    """Names the manifest lists (entries that are not a name vfkeep gives its files are ignored)."""
    try:
        with open(os.path.join(run_dir, MANIFEST)) as f:
            return sorted({n for n in f.read().split() if _MANIFEST_ENTRY.fullmatch(n)})
    except OSError:
        return []


def remove_leftovers(run_dir: str, keep: tuple[str, ...] = ()) -> list[str]:
    """Remove what a dead host of `run_dir` left; never a path in `keep` (this run's `--disk` files).
    Returns what was removed, as phrases for one line ("sockets host.sock, nic0.sock", ...)."""
    keep_real = {os.path.realpath(k) for k in keep}
    notes = []
    if removed := _remove_stale_sockets(run_dir):
        notes.append(f"sockets {', '.join(removed)}")
    if removed := _remove_namespaces(run_dir):
        notes.append(f"network namespaces {', '.join(removed)}")
    if removed := _remove_files(run_dir, keep_real):
        notes.append(f"files {', '.join(removed)}")
    return notes


def _remove_stale_sockets(run_dir: str) -> list[str]:
    removed = []
    for name in sorted(os.listdir(run_dir)):
        path = os.path.join(run_dir, name)
        if OWN_SOCKET.fullmatch(name) and sockets.is_stale_socket(path):
            try:
                os.unlink(path)
                removed.append(name)
            except FileNotFoundError:
                pass
    return removed


def _remove_namespaces(run_dir: str) -> list[str]:
    from .. import netns

    if not netns.list_run(netns.run_id(run_dir)):
        return []
    try:
        return netns.cleanup_run(netns.run_id(run_dir))
    except netns.NetnsError as e:
        raise LeftoverError(f"cannot remove the network namespaces a dead host left in {run_dir}: {e}") from None


def _remove_files(run_dir: str, keep_real: set[str]) -> list[str]:
    removed = []
    disks = set(created_files(run_dir))
    for name in sorted(os.listdir(run_dir)):
        path = os.path.join(run_dir, name)
        try:
            st = os.lstat(path)
            if not stat.S_ISREG(st.st_mode) or os.path.realpath(path) in keep_real:
                continue
            if name in disks or (OWN_STDERR.fullmatch(name) and st.st_size == 0):
                os.unlink(path)
                removed.append(name)
        except FileNotFoundError:
            pass
    forget_created(run_dir)
    return removed
