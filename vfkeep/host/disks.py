"""Guest disk IO on a running host: one disk agent process per NVMe disk, started on request.

Like the traffic agents (`host/traffic.py`): only the host can start one (it owns the guest memory file
and the block channels' eventfds), agents play the guest and run across servicings untouched, and they
are ended with the host, by PID. For every servicing the host asks the agents for the window: the
result's `io_blackout_ms` is the longest IO blackout over the disks and `io_errors` the errors, failed
verifications and duplicate completions the servicing cost, both null when no disk IO ran.
"""
from __future__ import annotations

import concurrent.futures
import logging
import os
import subprocess
import threading
import time
from dataclasses import dataclass

from .. import proc, rpc
from ..guest.block import BlockChannel, BlockLayout
from ..guest.disk_agent import DiskAgentError, spawn_disk_agent
from ..log import kv
from ..memory import GuestMemory

log = logging.getLogger("vfkeep.host.disks")

DEFAULT_QD = 8
AGENT_TIMEOUT_S = 30.0
#: After a servicing, how long the result waits for the first completion after the window (the IO
#: blackout ends there, once the new worker's relay replayed what was in flight).
RESUME_WAIT_S = 5.0
#: Counters whose growth during a servicing is an IO error the guest saw.
ERROR_COUNTERS = ("errors", "verify_errors", "duplicates")


class DiskError(Exception):
    """A disk request that cannot be served (no such disk, no agent, agent failure)."""


@dataclass
class _Agent:
    disk: int
    child: subprocess.Popen
    control: str

    def call(self, cmd: str, wait: float = AGENT_TIMEOUT_S, **args) -> dict:
        try:
            return rpc.call(self.control, cmd, args, timeout=wait)
        except rpc.RpcError as e:
            raise DiskError(f"disk {self.disk}: {e}") from None


class GuestDisks:
    """The host's disk agents. `start` spawns, so it must run on the host's long-lived actor thread;
    everything else may run on any thread. `lbas`: the blocks of each disk the agents use, from LBA 0."""

    def __init__(self, run_dir: str, mem: GuestMemory, layout: BlockLayout, channels: list[BlockChannel], lbas: int):
        self.run_dir, self.mem, self.layout, self.channels, self.lbas = run_dir, mem, layout, channels, lbas
        self._agents: dict[int, _Agent] = {}
        self._lock = threading.Lock()
        self.last_servicing: list[dict] | None = None

    def operation(self, action: str):
        ops = {"start": self.start, "stop": self.stop, "stats": self.stats, "verify": self.verify,
               "status": self.status}
        if action not in ops:
            raise DiskError(f"unknown disk action {action!r}; known: {', '.join(ops)}")
        return ops[action]

    def _disks(self, disk: int | None) -> list[int]:
        if disk is None:
            return list(range(len(self.channels)))
        if not isinstance(disk, int) or isinstance(disk, bool) or not 0 <= disk < len(self.channels):
            raise DiskError(f"disk {disk!r} out of range [0, {len(self.channels)})")
        return [disk]

    def _agent(self, disk: int) -> _Agent:
        with self._lock:
            agent = self._agents.get(disk)
            if agent is not None and agent.child.poll() is None:
                return agent
            req, cpl = self.channels[disk].bell_fds()
            path = os.path.join(self.run_dir, f"disk-agent-{disk}.sock")
            try:
                child = spawn_disk_agent(self.mem, self.layout, disk, req, cpl, path, lbas=self.lbas,
                                         run_dir=self.run_dir)
            except DiskAgentError as e:
                raise DiskError(str(e)) from None
            agent = self._agents[disk] = _Agent(disk, child, path)
            kv(log, logging.INFO, "disk agent started", disk=disk, pid=child.pid, control=path)
            return agent

    def _running(self, disk: int | None = None) -> list[_Agent]:
        disks = self._disks(disk)
        with self._lock:
            agents = [self._agents[i] for i in disks if i in self._agents and self._agents[i].child.poll() is None]
        if disk is not None and not agents:
            raise DiskError(f"no disk agent on disk {disk}; start disk IO first")
        return agents

    @staticmethod
    def _each(fn, agents: list[_Agent]) -> list:
        if len(agents) <= 1:
            return [fn(a) for a in agents]
        with concurrent.futures.ThreadPoolExecutor(len(agents)) as pool:
            return list(pool.map(fn, agents))

    # -- operations ------------------------------------------------------------------------------
    def start(self, rate: float = 0, qd: int = DEFAULT_QD, read_pct: int = 50, disk: int | None = None) -> dict:
        """Start (or re-pace) IO: `rate` requests/s (0: as fast as `qd` allows), `qd` in flight."""
        disks = self._disks(disk)
        if not disks:
            raise DiskError("the host has no NVMe disks (vfkeep run --nvme N)")
        out = []
        for i in disks:
            agent = self._agent(i)
            out.append({"disk": i, "pid": agent.child.pid,
                        **agent.call("start", rate=rate, qd=qd, read_pct=read_pct)})
        kv(log, logging.INFO, "disk io started", disks=",".join(map(str, disks)), rate=rate, qd=qd, read_pct=read_pct)
        return {"disks": out}

    def stop(self, disk: int | None = None) -> dict:
        return {"disks": [{"disk": a.disk, **a.call("stop")} for a in self._running(disk)]}

    def stats(self, disk: int | None = None, since_ns: int | None = None, until_ns: int | None = None) -> dict:
        """Per disk: counters, IOPS, latency percentiles and the IO blackout of [since, until] (default: the
        whole run), plus the per-disk numbers of the last servicing window."""
        def one(a: _Agent) -> dict:
            return {"disk": a.disk, "pid": a.child.pid, **a.call("stats", since_ns=since_ns, until_ns=until_ns)}

        return {"disks": self._each(one, self._running(disk)), "last_servicing": self.last_servicing}

    def verify(self, disk: int | None = None, timeout: float = 60.0) -> dict:
        """Stop IO and read back every chunk written: each block must hold its LBA and last generation."""
        def one(a: _Agent) -> dict:
            return {"disk": a.disk, **a.call("verify", wait=timeout + 10, qd=DEFAULT_QD, timeout=timeout)}

        return {"disks": self._each(one, self._running(disk))}

    def status(self) -> dict:
        with self._lock:
            agents = list(self._agents.values())
        out = []
        for a in agents:
            entry = {"disk": a.disk, "pid": a.child.pid, "alive": a.child.poll() is None}
            if entry["alive"]:
                entry.update(a.call("status"))
            out.append(entry)
        return {"agents": out, "last_servicing": self.last_servicing}

    # -- servicing -------------------------------------------------------------------------------
    def snapshot(self) -> dict[int, dict]:
        """Each running agent's counters before a servicing (`window` diffs them)."""
        out = {}
        for a in self._running():
            try:
                out[a.disk] = a.call("status")
            except DiskError as e:
                kv(log, logging.WARNING, "no disk counters before the servicing", disk=a.disk, error=str(e))
        return out

    def popped(self) -> dict[int, int]:
        """Each disk's request-ring consumer position: what the worker had taken from the guest so far (call
        once a worker died, before the next one runs)."""
        return {i: ch.requests.stats().head for i, ch in enumerate(self.channels)}

    def requeue(self, popped: dict[int, int]) -> None:
        """A worker died with the requests it had popped (`popped()` taken after its death) and no saved state
        reached its successor: each agent re-pushes those still outstanding. Never raises."""
        for a in self._running():
            try:
                n = a.call("requeue", popped_before=popped[a.disk])["requeued"]
            except DiskError as e:
                kv(log, logging.WARNING, "disk requests could not be requeued", disk=a.disk, error=str(e))
                continue
            kv(log, logging.INFO, "disk requests requeued after a worker died with them", disk=a.disk, requests=n)

    def window(self, before: dict[int, dict], start_ns: int, end_ns: int) -> tuple[float | None, int | None]:
        """(longest IO blackout ms, IO errors) of the servicing window over the disks whose IO ran in it
        (running at the snapshot); (None, None) when none did. Waits (at most RESUME_WAIT_S) for IO to
        resume after the window, so the blackout is measured to its end. Never raises."""
        def one(a: _Agent) -> dict | None:
            if not before.get(a.disk, {}).get("running"):
                return None
            try:
                first = a.call("status")["counters"]
                deadline = time.monotonic() + RESUME_WAIT_S
                while time.monotonic() < deadline:
                    c = a.call("status")["counters"]
                    if c["completed"] > first["completed"] or c["completed"] + c["ring_full"] >= c["submitted"]:
                        break  # IO moves again, or nothing is outstanding
                    time.sleep(0.01)
                st = a.call("stats", since_ns=start_ns)
            except DiskError as e:
                kv(log, logging.WARNING, "no disk numbers for the servicing window", disk=a.disk, error=str(e))
                return None
            errors = sum(st[k] - before[a.disk]["counters"][k] for k in ERROR_COUNTERS)
            return {"disk": a.disk, "start_ns": start_ns, "end_ns": end_ns, "io_errors": errors, **st}

        measured = [m for m in self._each(one, self._running()) if m is not None]
        self.last_servicing = measured or None
        if not measured:
            return None, None
        blackout = max(m["io_blackout_ms"] for m in measured)
        errors = sum(m["io_errors"] for m in measured)
        kv(log, logging.INFO, "servicing window measured (disks)", io_blackout_ms=blackout, io_errors=errors,
           disks=len(measured))
        return round(blackout, 3), errors

    def close(self) -> None:
        """End every agent by PID."""
        with self._lock:
            agents, self._agents = list(self._agents.values()), {}
        for a in agents:
            proc.end(a.child)
            kv(log, logging.INFO, "disk agent ended", disk=a.disk, pid=a.child.pid, exit_status=a.child.returncode)
