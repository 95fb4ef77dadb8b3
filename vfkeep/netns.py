"""Linux network namespaces that vfkeep creates for a run: names, addresses, lifecycle, entering one.

`vfkeep run --guest netns` gives every NIC two namespaces: the guest's `vfk-<run-id>-g<N>` (a TAP
whose frames a guest bridge moves to and from the NIC's guest rings) and the wire's
`vfk-<run-id>-w<N>` (the TAP of the device's `tap` backend, with the peer address). The run id is a
hash of the run directory, so the next `run` with the same directory finds, and removes, what a
dead run left behind. Addresses come only from the benchmarking range 198.18.0.0/15 and live only
inside these namespaces: nothing routes in or out of them.

Everything here needs CAP_NET_ADMIN (`require_net_admin` says so clearly) and iproute2's `ip`.
"""
from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import ipaddress
import logging
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Iterator, Sequence

from . import proc
from .log import kv

log = logging.getLogger("vfkeep.netns")

NETNS_DIR = "/run/netns"
PREFIX = "vfk-"
#: RFC 2544 benchmarking range: never routed on the Internet, so nothing here can reach a real host.
NETWORK = ipaddress.ip_network("198.18.0.0/15")
PREFIX_LEN = 24
MAX_NICS = 256
#: Interface names inside the namespaces (each namespace has its own name space for interfaces).
GUEST_TAP = "eth0"
WIRE_TAP = "wire0"
_CAP_NET_ADMIN = 12
_CLONE_NEWNET = 0x40000000
_NAME = re.compile(r"^vfk-[0-9a-f]{8}-[gw][0-9]+$")
IP_TIMEOUT_S = 10.0


class NetnsError(Exception):
    """A namespace operation failed; the message names the namespace and the command."""


class NeedsNetAdmin(NetnsError):
    """The caller lacks CAP_NET_ADMIN (or the tools): the guest network cannot be built."""


def has_net_admin() -> bool:
    """True if this process's effective capabilities include CAP_NET_ADMIN (root has it)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> _CAP_NET_ADMIN & 1)
    except (OSError, ValueError):
        pass
    return os.geteuid() == 0


def missing_tools(tools: Sequence[str] = ("ip",)) -> list[str]:
    return [t for t in tools if shutil.which(t) is None]


def unavailable_reason(tools: Sequence[str] = ("ip",)) -> str | None:
    """Why the guest network cannot run here (None: it can); the text tests skip with."""
    if not has_net_admin():
        return "the guest network (--guest netns) needs root (CAP_NET_ADMIN) to create namespaces and TAPs"
    if not os.path.exists("/dev/net/tun"):
        return "the guest network needs /dev/net/tun (TAP interfaces)"
    if missing := missing_tools(tools):
        return f"the guest network needs {', '.join(missing)} (Debian: `make deps-net` installs iproute2, iputils-ping)"
    return None


def require_net_admin(tools: Sequence[str] = ("ip",)) -> None:
    if reason := unavailable_reason(tools):
        raise NeedsNetAdmin(reason)


# -- names and addresses -------------------------------------------------------------------------
def run_id(run_dir: str | os.PathLike) -> str:
    """8 hex digits naming a run's namespaces; the same run directory always gives the same id."""
    return hashlib.sha256(os.path.abspath(os.fspath(run_dir)).encode()).hexdigest()[:8]


def _check_nic(nic: int) -> None:
    if not 0 <= nic < MAX_NICS:
        raise ValueError(f"nic {nic} out of range [0, {MAX_NICS}) for the guest network")


def guest_ns(rid: str, nic: int) -> str:
    _check_nic(nic)
    return f"{PREFIX}{rid}-g{nic}"


def wire_ns(rid: str, nic: int) -> str:
    _check_nic(nic)
    return f"{PREFIX}{rid}-w{nic}"


def _subnet(nic: int) -> ipaddress.IPv4Network:
    _check_nic(nic)
    return list(NETWORK.subnets(new_prefix=PREFIX_LEN))[nic]


def peer_address(nic: int) -> str:
    """The wire side's address of NIC `nic` (198.18.N.1): what the guest pings."""
    return str(_subnet(nic).network_address + 1)


def guest_address(nic: int) -> str:
    """The guest's address on NIC `nic` (198.18.N.2)."""
    return str(_subnet(nic).network_address + 2)


# -- ip(8) ---------------------------------------------------------------------------------------
def ip(*args: str, netns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run `ip [-n NETNS] ARGS`; NetnsError with ip's message on failure when `check`."""
    argv = ["ip", *(("-n", netns) if netns else ()), *args]
    try:
        # In a process group of its own: a terminal's Ctrl-C killed the `ip netns del` of a cleanup it started. And
        # with the interrupts held (inherited, they stay held in it to its end): from its fork to its setpgid it is
        # still in ours, and with SIGINT's default action by then (subprocess resets handlers): a second Ctrl-C
        # killed a cleanup's `ip netns del` there (a namespace left; 1 `ip` in 2 under a stream of SIGINTs).
        with proc.interrupts_held():
            r = subprocess.run(argv, capture_output=True, text=True, timeout=IP_TIMEOUT_S, stdin=subprocess.DEVNULL,
                               process_group=0)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise NetnsError(f"{' '.join(argv)}: {e}") from None
    if check and r.returncode:
        raise NetnsError(f"{' '.join(argv)}: {r.stderr.strip() or f'exit status {r.returncode}'}")
    return r


def exists(name: str) -> bool:
    return os.path.exists(os.path.join(NETNS_DIR, name))


def create(name: str) -> None:
    """New named namespace with its loopback up. A namespace of that name must not exist."""
    ip("netns", "add", name)
    try:
        ip("link", "set", "lo", "up", netns=name)
        with entered(name):  # no IPv6 autoconfiguration chatter on the wire
            for conf in ("all", "default"):
                with contextlib.suppress(OSError), open(f"/proc/sys/net/ipv6/conf/{conf}/disable_ipv6", "w") as f:
                    f.write("1")
    except NetnsError:
        delete(name)
        raise
    kv(log, logging.INFO, "namespace created", netns=name)


def pids(name: str) -> list[int]:
    """Processes whose network namespace is `name`."""
    r = ip("netns", "pids", name, check=False)
    return [int(p) for p in r.stdout.split() if p.isdigit()] if r.returncode == 0 else []


def delete(name: str, timeout: float = 5.0) -> list[int]:
    """End every process still inside `name` (SIGTERM, then SIGKILL), then remove it; returns those pids.

    Only namespaces vfkeep created get here (`owned`): whatever runs in them was started for the run
    (bridge, a console `exec`, a test's ping). A process left inside would keep the namespace and its
    interfaces alive after `ip netns del`.
    """
    if not owned(name):
        raise NetnsError(f"refusing to delete namespace {name!r}: not one vfkeep creates")
    inside = pids(name)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in inside:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + timeout
        while (left := pids(name)) and time.monotonic() < deadline:
            time.sleep(0.02)
        if not left:
            break
    if exists(name):
        ip("netns", "del", name)
    kv(log, logging.INFO, "namespace removed", netns=name, ended_pids=",".join(map(str, inside)) or None)
    return inside


def owned(name: str) -> bool:
    return bool(_NAME.match(name))


def list_run(rid: str) -> list[str]:
    """Namespaces of run `rid` that exist now."""
    try:
        names = os.listdir(NETNS_DIR)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if owned(n) and n.startswith(f"{PREFIX}{rid}-"))


def cleanup_run(rid: str) -> list[str]:
    """Remove every namespace of run `rid` (a dead run's leftovers); returns their names."""
    left = list_run(rid)
    for name in left:
        kv(log, logging.WARNING, "removing a leftover namespace of an earlier run", netns=name)
        delete(name)
    return left


# -- entering a namespace ------------------------------------------------------------------------
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise NetnsError(f"setns: {os.strerror(err)}")


def enter(name: str) -> None:
    """Move the calling thread into namespace `name` for good (a process that lives there: call it
    before starting threads, then every socket and interface it creates is inside)."""
    try:
        fd = os.open(os.path.join(NETNS_DIR, name), os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise NetnsError(f"no namespace {name!r}: {e}") from None
    try:
        _setns(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def entered(name: str) -> Iterator[None]:
    """Run the block in namespace `name` (this thread only), then return to the original one.

    File descriptors opened inside stay bound to `name` (a TAP created here is an interface of `name`).
    """
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        enter(name)
        try:
            yield
        finally:
            _setns(home)
    finally:
        os.close(home)


def exec_argv(name: str, argv: Sequence[str]) -> list[str]:
    """argv that runs `argv` inside namespace `name` (`ip netns exec` execs it: the pid is the command's)."""
    return ["ip", "netns", "exec", name, *argv]


# -- TAP interfaces ------------------------------------------------------------------------------
_TUNSETIFF = 0x400454CA
_IFF_TAP = 0x0002
_IFF_NO_PI = 0x1000
_IFF_UP = 0x1
_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914
_SIOCSIFADDR = 0x8916
_SIOCSIFNETMASK = 0x891C
_SIOCSIFHWADDR = 0x8924
_ARPHRD_ETHER = 1


def open_tap(name: str, mac: bytes | None = None, address: str | None = None) -> int:
    """Create TAP `name` in the calling thread's namespace (IFF_TAP|IFF_NO_PI, non-blocking fd), set its
    MAC and IPv4 address (`A.B.C.D/LEN`) if given, bring it up; returns the fd. The interface lives as
    long as the fd: closing it (or the process dying) removes it."""
    if not name or len(name.encode()) > 15:
        raise NetnsError(f"TAP interface name {name!r} must be 1-15 bytes")
    if mac is not None and len(mac) != 6:
        raise NetnsError(f"TAP MAC {mac!r} must be 6 bytes")
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise NetnsError(f"cannot open /dev/net/tun: {e}") from None
    ifname = name.encode()
    try:
        fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH", ifname, _IFF_TAP | _IFF_NO_PI))
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            if mac is not None:
                fcntl.ioctl(s, _SIOCSIFHWADDR, struct.pack("16sH6s8x", ifname, _ARPHRD_ETHER, mac))
            if address is not None:
                iface = ipaddress.ip_interface(address)
                for req, value in ((_SIOCSIFADDR, iface.ip), (_SIOCSIFNETMASK, iface.netmask)):
                    fcntl.ioctl(s, req, struct.pack("16sHH4s8x", ifname, socket.AF_INET, 0, value.packed))
            flags = struct.unpack_from("16sH", fcntl.ioctl(s, _SIOCGIFFLAGS, struct.pack("16sH", ifname, 0)))[1]
            fcntl.ioctl(s, _SIOCSIFFLAGS, struct.pack("16sH", ifname, flags | _IFF_UP))
    except (OSError, ValueError) as e:
        os.close(fd)
        raise NetnsError(f"cannot set up TAP interface {name!r}: {e}") from None
    return fd
