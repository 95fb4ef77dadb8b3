"""Guest-network tests: the skip reason, and a check that a run left no namespace, interface or process."""
from __future__ import annotations

import os
import subprocess

import pytest

from vfkeep import netns

#: None when this machine can run them (root: CAP_NET_ADMIN, /dev/net/tun, ip, ping).
REASON = netns.unavailable_reason(("ip", "ping"))
needs_netns = pytest.mark.skipif(REASON is not None, reason=REASON or "")


#: The names of the TAPs a run (or these tests) create inside their namespaces. Only these are looked for in the
#: root namespace: it is shared with everything else on the machine (another suite's `tap:` backend may hold a
#: TAP there at the same time), so an interface of another name is not this test's.
OWN_TAPS = frozenset({netns.GUEST_TAP, netns.WIRE_TAP})


def interfaces() -> set[str]:
    """Interface names of the root namespace (a TAP that escaped its namespace would show here)."""
    return set(os.listdir("/sys/class/net"))


def escaped_taps(root_ifaces: set[str]) -> set[str]:
    """TAPs of ours that appeared in the root namespace since `root_ifaces` was taken."""
    return (interfaces() - root_ifaces) & OWN_TAPS


def processes_with(text: str) -> list[int]:
    """PIDs whose command line contains `text` (e.g. a run dir or namespace name)."""
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmd and int(pid) != os.getpid():
            out.append(int(pid))
    return out


def assert_nothing_left(rid: str, root_ifaces: set[str] | None = None, marker: str | None = None) -> None:
    """No namespace of run `rid`, no TAP of ours escaped to the root namespace, no process mentioning `marker`
    (or `rid`)."""
    assert netns.list_run(rid) == []
    if root_ifaces is not None:
        assert escaped_taps(root_ifaces) == set()
    left = processes_with(marker or f"vfk-{rid}")
    assert left == [], [open(f"/proc/{p}/cmdline").read() for p in left if os.path.exists(f"/proc/{p}")]


def ns_links(name: str) -> list[str]:
    r = subprocess.run(["ip", "-n", name, "-o", "link", "show"], capture_output=True, text=True, check=True)
    return [line.split(":")[1].strip().split("@")[0] for line in r.stdout.splitlines()]
