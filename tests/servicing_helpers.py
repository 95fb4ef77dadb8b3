"""Real-process harness for the servicing tests: a `vfkeep run --no-console` host (`DetachedHost`) plus test checks."""
from __future__ import annotations

import os
import signal
import subprocess
import time

from vfkeep import proc, rpc
from vfkeep.proc import stat_fields
from vfkeep.host.control import HostClient
from vfkeep.host.detached import DetachedHost
from vfkeep.vfio_user.control import control_call


class HostRun(DetachedHost):
    """`vfkeep run --no-console --timing natural` in its own run dir; `stop()` must leave no child behind."""

    def __init__(self, run_dir, *args: str, env: dict[str, str] | None = None, nics: int = 1):
        super().__init__(str(run_dir), "--timing", "natural", *args, nics=nics, env=env, wait=120)

    def device_control(self, nic: int, cmd: str, **args) -> dict:
        return control_call(os.path.join(self.run_dir, f"nic{nic}.sock.ctl"), cmd, **args)

    def log_seq(self, nic: int = 0) -> int:
        return self.device_control(nic, "command_log", since=1 << 62)["last_seq"]

    def commands_since(self, seq: int, nic: int = 0) -> list[dict]:
        """Command-log entries of NIC `nic`'s device after `seq` (vport data-path setup left out)."""
        return [e for e in self.device_control(nic, "command_log", since=seq)["entries"]
                if "DMA_REGION" not in e["name"] and "WQ_OBJ" not in e["name"]]

    def reset_count(self, nic: int = 0) -> int:
        return self.device_control(nic, "counters")["counters"]["reset_count"]

    def serviced(self, devices: int = 1, **request) -> tuple[dict, list[list[dict]]]:
        """Service and return (result, command-log entries of this servicing for each of the first
        `devices` device processes)."""
        seqs = [self.log_seq(i) for i in range(devices)]
        result = self.service(**request)
        return result, [self.commands_since(seqs[i], i) for i in range(devices)]

    def worker_log(self, generation: int) -> str:
        with open(os.path.join(self.run_dir, f"worker-{generation}.log")) as f:
            return f.read()

    def children(self) -> list[int]:
        return children_of(self.pid)

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(proc.vfkeep_argv(*args), capture_output=True, text=True, timeout=timeout)

    def stop(self) -> None:
        """`stop` over the control socket, then check the host exited cleanly and ended every child. (Not `vfkeep
        stop`: its Python start-up cost 1-2 s per test; test_cli_surface and test_host_sigkill run the command.)"""
        kids = self.children()
        try:
            HostClient.stop(self, wait=30)
        except rpc.RpcError:
            self.kill()  # (a host that cannot be asked to stop is ended, and the test fails)
            raise
        assert self.reap(60) == 0, self.logs()
        alive = [p for p in kids if pid_alive(p)]
        assert not alive, f"children left behind: {alive}"


#: How long a guest's losses may take to meet the drop counters once its traffic stopped.
ACCOUNTING_SETTLE_S = 15.0


def until_accounted(read, slack: int = 0):
    """`read()` -> (traffic stats of a NIC, frames its drop counters account for, ...), read again until the guest's
    losses exceed the count by `slack` at most (match it, by default), for ACCOUNTING_SETTLE_S at most; returns the
    last reading. A frame still on its way counts as lost until it arrives, and on a loaded machine a starved guest
    agent, relay or device may hold the last ones longer than any one fixed wait (one reading after a 500 ms settle
    failed that way); a loss no counter accounts for, or a frame counted twice, never agrees, and the caller's
    assertion then shows the numbers."""
    deadline = time.monotonic() + ACCOUNTING_SETTLE_S
    while True:
        got = read()
        if got[1] <= got[0]["frames_lost"] <= got[1] + slack or time.monotonic() > deadline:
            return got


def kill_host(h: HostRun) -> list[int]:
    """SIGKILL the host; returns its children, each gone."""
    kids = h.children()
    os.kill(h.pid, signal.SIGKILL)
    h.child.wait(10)
    deadline = time.monotonic() + 10
    while any(pid_alive(p) for p in kids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [p for p in kids if pid_alive(p)]
    return kids

#: Indexes into stat_fields().
PPID, SESSION = 1, 3


def live_processes(field: int, value: int) -> list[int]:
    """PIDs of the live (not zombie) processes whose stat_fields()[field] is `value`."""
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            fields = stat_fields(name)
            if fields and int(fields[field]) == value and fields[0] != "Z":
                out.append(int(name))
    return out


def children_of(pid: int) -> list[int]:
    return sorted(live_processes(PPID, pid))


def pid_alive(pid: int) -> bool:
    fields = stat_fields(pid)
    return fields is not None and fields[0] != "Z"


# -- invariants after a servicing (issue 15: kill-anywhere) ---------------------------------------------------
PAGE = 4096


def wait_settled(host: HostRun, after_generation: int, timeout: float = 60.0) -> dict:
    """`status` once no servicing runs and a live worker newer than `after_generation` is current (a worker
    killed after `started` is replaced by the host's supervision, at its next idle tick)."""
    deadline = time.monotonic() + timeout
    while True:
        st = host.status()
        w = st["worker"]
        if st["servicing"] is None and w is not None and w["alive"] and w["generation"] > after_generation:
            return st
        assert time.monotonic() < deadline, f"no settled worker after generation {after_generation}: {st}"
        time.sleep(0.05)


def _owner_of(tables: list[list[dict]]) -> dict[int, str]:
    """page -> owner of every allocated slot in the worker's slot tables (pool and worker RAM)."""
    owners: dict[int, str] = {}
    for table in tables:
        for s in table:
            if s["state"] == "allocated":
                for pfn in range(s["base_pfn"], s["base_pfn"] + s["pages"]):
                    owners[pfn] = s["owner"]
    return owners


def device_pages(state: dict) -> set[int]:
    """Every guest page a MANA device DMAs into, as far as its `state` shows: the HWC's queues, each vport's
    queues and the DMA regions no queue consumed yet (queues as contiguous runs from their first page)."""
    queues = [state["hwc"][q] for q in ("eq", "cq", "rq", "sq")] if state["hwc"] else []
    queues += [v[q] for v in state["vports"] for q in ("sq", "tx_cq", "rq", "rx_cq") if v[q] is not None]
    pages = {q["first_page"] // PAGE + i for q in queues for i in range(q["pages"])}
    pages.update(p // PAGE for r in state["dma_regions"] for p in r["pages"])
    return pages


def check_invariants(host: HostRun, nics: int, pool_pages_per_nic: int) -> None:
    """What must hold once any servicing is over, however it went: every NIC passes frames; the pool holds
    exactly each NIC's persistent allocations (nothing pending, leaked or owned by a NIC that is gone); every
    page a device DMAs into is allocated to that NIC in the current worker (none double-owned, none free);
    the host's only children are its devices and one worker; no traceback in any log."""
    for i in range(nics):
        probe = host.probe(i)
        assert probe["ok"], f"nic {i} does not pass frames: {probe}"
    worker = host.inspect("worker")
    pool = worker["pool"]
    pci_ids = [d["pci_id"] for d in host.status()["devices"]][:nics]
    assert pool["pending_pages"] == 0 and pool["leaked_pages"] == 0, pool
    assert pool["devices"] == {f"nic_{p}": pool_pages_per_nic for p in pci_ids}, pool["devices"]
    assert sum(s["pages"] for s in pool["slot_table"]) == pool["total_pages"]
    owners = _owner_of([pool["slot_table"], worker["worker_ram"]["slot_table"]])
    claimed: dict[int, str] = {}
    for i, pci_id in enumerate(pci_ids):
        pages = device_pages(host.device_control(i, "state"))
        assert pages, f"device {pci_id} shows no HWC or queue memory"
        for pfn in pages:
            assert owners.get(pfn) in (f"nic_{pci_id}", f"nic_{pci_id}_ephemeral"), \
                f"device {pci_id} DMAs into page {pfn}, owned by {owners.get(pfn)!r} in the worker"
            assert claimed.setdefault(pfn, pci_id) == pci_id, f"page {pfn} used by {claimed[pfn]} and {pci_id}"
    st = host.status()
    expected = {d["pid"] for d in st["devices"]} | {st["worker"]["pid"]}
    assert set(host.children()) == expected, f"host children {host.children()}, expected {sorted(expected)}"
    for name in os.listdir(host.run_dir):
        if name.endswith((".log", ".stderr")):
            with open(os.path.join(host.run_dir, name), errors="replace") as f:
                assert "Traceback" not in f.read(), f"traceback in {name}:\n{host.logs()}"
