"""The four servicing paths the demo and the sensitivity benchmark compare, as host servicing requests.

- `reset-flr`: saved state the next worker does not restore (spec §6.1 S=yes K=no): its NoReset attempt
  fails on the live HWC, then FLR and fresh init.
- `reset`: no keepalive flag: the old worker shuts the NIC down cleanly (DEREGISTER_DEVICE, DESTROY_HWC),
  the new one fresh-inits it without a reset.
- `keepalive`: MANA keepalive; the HWC survives, the vport's queues are destroyed and recreated (as OpenHCL).
- `keepalive+datapath`: MANA keepalive with the vport's queues and buffers kept too (DESIGN D7).

The host must run with `--datapath-keepalive` (pool room for a kept vport, workers keep it by default).
Serviced in `ORDER`, each request leaves the worker the next one expects: after `reset` the worker's
vport is ephemeral (so `keepalive` rebuilds it); after `keepalive` it is in the pool (so
`keepalive+datapath` keeps it); any keepalive-enabled worker can be saved for `reset-flr`. Only `reset` and
`keepalive+datapath` also leave the worker what they themselves expect (`FOLLOWS_ITSELF`): after `keepalive`
the vport is in the pool (a second `keepalive` would keep it: a data-path keepalive), after `reset-flr` the
worker has MANA keepalive disabled (nothing to keep); `preparing(path)` is the servicing to run first.

With NVMe disks (`request(path, nvme=True)`) each path does the same to the controllers: the keepalive
paths set the NVMe bit too (no controller reset, no admin command); `reset` clears it (the old worker
disables the controller, the new one enables it: the declared disable + enable time); `reset-flr` saves
for keepalive but the next worker has NVMe keepalive disabled (the saved pages are freed, CC.EN 1→0,
fresh init).
"""
from __future__ import annotations

import time
from typing import Callable

from .contract import DATAPATH_KEEPALIVE_ENV, MANA_KEEPALIVE_ENV, NVME_KEEPALIVE_ENV

ORDER = ("reset-flr", "reset", "keepalive", "keepalive+datapath")

#: Servicing request per path (`Host.service(**request)` / the control socket's `service` op).
REQUESTS = {
    "reset-flr": {"mana_keepalive": True, "next_env": {MANA_KEEPALIVE_ENV: "disabled"}},
    "reset": {"mana_keepalive": False, "next_env": {DATAPATH_KEEPALIVE_ENV: "0"}},
    "keepalive": {"mana_keepalive": True, "next_env": {DATAPATH_KEEPALIVE_ENV: "1"}},
    "keepalive+datapath": {"mana_keepalive": True},
}

_KEPT = {"restore_path": "keepalive", "device_reset": False, "hwc_established": False}
#: What the device and the worker must report for each NIC of a servicing on that path.
EXPECTED = {
    "reset-flr": {"restore_path": "fresh", "device_reset": True, "hwc_established": True},
    "reset": {"restore_path": "fresh", "device_reset": False, "hwc_established": True},
    "keepalive": _KEPT,
    "keepalive+datapath": _KEPT,
}


#: HWC requests each NIC's device counts in a servicing on that path, with one vport open (every host of the
#: demo and the benchmarks): what tells a keepalive that rebuilt the vport from one that kept it.
HWC_REQUESTS = {"reset-flr": 17, "reset": 22, "keepalive": 19, "keepalive+datapath": 4}

#: The paths whose servicing leaves the worker what they expect themselves.
FOLLOWS_ITSELF = frozenset({"reset", "keepalive+datapath"})


def preparing(path: str) -> str:
    """The path whose servicing leaves the worker what `path` expects: the one before it in `ORDER`."""
    return ORDER[ORDER.index(path) - 1]


_NVME_RESET = {"restore_path": "fresh", "device_reset": True, "controller_enabled": True}
_NVME_KEPT = {"restore_path": "keepalive", "device_reset": False, "controller_enabled": False}
#: What each NVMe controller must report for a servicing on that path (with `request(path, nvme=True)`).
EXPECTED_NVME = {"reset-flr": _NVME_RESET, "reset": _NVME_RESET, "keepalive": _NVME_KEPT,
                 "keepalive+datapath": _NVME_KEPT}


def request(path: str, nvme: bool = False) -> dict:
    """The servicing request of `path`; with `nvme`, the NVMe controllers take the same path."""
    req = {**REQUESTS[path], "next_env": dict(REQUESTS[path].get("next_env", {}))}
    if nvme:
        req["nvme_keepalive"] = req["mana_keepalive"]
        if path == "reset-flr":
            req["next_env"][NVME_KEEPALIVE_ENV] = "disabled"
    return req


def unexpected(path: str, result: dict, count_requests: bool = False) -> list[str]:
    """How a servicing result departs from what `path` must show (empty when it took that path); with
    `count_requests`, also each NIC's HWC requests against `HWC_REQUESTS` (hosts with one vport per NIC)."""
    bad = [] if result["ok"] else [f"servicing failed: {result['error']}"]
    for n in result["nics"]:
        bad += [f"{n['pci_id']}: {k} is {n[k]!r}, expected {v!r}" for k, v in EXPECTED[path].items() if n[k] != v]
        if count_requests and n["hwc_requests"] != HWC_REQUESTS[path]:
            bad.append(f"{n['pci_id']}: {n['hwc_requests']} HWC requests, expected {HWC_REQUESTS[path]}")
    for n in result.get("nvme") or []:
        bad += [f"nvme {n['pci_id']}: {k} is {n[k]!r}, expected {v!r}" for k, v in EXPECTED_NVME[path].items()
                if n[k] != v]
    if result.get("io_errors"):
        bad.append(f"{result['io_errors']} disk IO errors")
    return bad


def wait_steady(traffic: Callable[..., dict], rate: float, timeout: float = 3.0) -> float:
    """Wait until the backlog a servicing left in the guest's rings has drained, so that the next servicing's
    blackout does not include draining it: the frames in flight (sent - received, summed over the agents)
    are down to 10 ms worth, or have stopped falling for 100 ms (what remains was lost). `traffic(action)`
    is a host's `traffic`; gives up after `timeout` s. Returns the seconds waited."""
    limit = max(64.0, rate / 100)
    t0 = time.monotonic()
    best, best_t = float("inf"), t0
    while (now := time.monotonic()) - t0 < timeout:
        agents = [a for a in traffic("status")["agents"] if a.get("alive")]
        in_flight = sum(a["sent"] - a["received"] for a in agents)
        if in_flight <= limit * max(1, len(agents)):
            break
        if in_flight < best - limit:
            best, best_t = in_flight, now
        elif now - best_t > 0.1:
            break
        time.sleep(0.01)
    return time.monotonic() - t0


__all__ = ["ORDER", "REQUESTS", "EXPECTED", "EXPECTED_NVME", "HWC_REQUESTS", "FOLLOWS_ITSELF", "preparing", "request",
           "unexpected", "wait_steady"]
