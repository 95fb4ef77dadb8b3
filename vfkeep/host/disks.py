"""Guest disk IO on a running host: one disk agent process per NVMe disk, started on request (an
`AgentPool`, host/agents.py, like the traffic agents). For every servicing the host asks the agents for
the window: the result's `io_blackout_ms` is the longest IO blackout over the disks and `io_errors` the errors, failed
verifications and duplicate completions the servicing cost, both null when no disk IO ran.
"""
from __future__ import annotations

import logging
import os
import subprocess
import time

from ..guest.block import BlockChannel, BlockLayout
from ..guest.disk_agent import DiskAgentError, spawn_disk_agent
from ..log import kv
from ..memory import GuestMemory
from .agents import Agent, AgentPool

log = logging.getLogger("vfkeep.host.disks")

DEFAULT_QD = 8
#: After a servicing, how long the result waits for the first completion after the window (the IO
#: blackout ends there, once the new worker's relay replayed what was in flight).
RESUME_WAIT_S = 5.0
#: Counters whose growth during a servicing is an IO error the guest saw.
ERROR_COUNTERS = ("errors", "verify_errors", "duplicates")


class DiskError(Exception):
    """A disk request that cannot be served (no such disk, no agent, agent failure)."""


class GuestDisks(AgentPool):
    """The host's disk agents (`AgentPool`). `lbas`: the blocks of each disk the agents use, from LBA 0."""

    error, noun, what, start_hint, log = DiskError, "disk", "disk agent", "start disk IO first", log
    operations = ("start", "stop", "stats", "verify", "status")

    def __init__(self, run_dir: str, mem: GuestMemory, layout: BlockLayout, channels: list[BlockChannel], lbas: int):
        super().__init__(len(channels))
        self.run_dir, self.mem, self.layout, self.channels, self.lbas = run_dir, mem, layout, channels, lbas

    def _spawn(self, disk: int) -> tuple[subprocess.Popen, str]:
        req, cpl = self.channels[disk].bell_fds()
        path = os.path.join(self.run_dir, f"disk-agent-{disk}.sock")
        try:
            return spawn_disk_agent(self.mem, self.layout, disk, req, cpl, path, lbas=self.lbas,
                                    run_dir=self.run_dir), path
        except DiskAgentError as e:
            raise DiskError(str(e)) from None

    # -- operations ------------------------------------------------------------------------------
    def start(self, rate: float = 0, qd: int = DEFAULT_QD, read_pct: int = 50, disk: int | None = None) -> dict:
        """Start (or re-pace) IO: `rate` requests/s (0: as fast as `qd` allows), `qd` in flight."""
        disks = self.indexes(disk)
        if not disks:
            raise DiskError("the host has no NVMe disks (vfkeep run --nvme N)")
        out = []
        for i in disks:
            agent = self.agent(i)
            out.append({"disk": i, "pid": agent.child.pid,
                        **agent.call("start", rate=rate, qd=qd, read_pct=read_pct)})
        kv(log, logging.INFO, "disk io started", disks=",".join(map(str, disks)), rate=rate, qd=qd, read_pct=read_pct)
        return {"disks": out}

    def stop(self, disk: int | None = None) -> dict:
        return {"disks": [{"disk": a.index, **a.call("stop")} for a in self.running(disk)]}

    def stats(self, disk: int | None = None, since_ns: int | None = None, until_ns: int | None = None) -> dict:
        """Per disk: counters, IOPS, latency percentiles and the IO blackout of [since, until] (default: the
        whole run), plus the per-disk numbers of the last servicing window."""
        def one(a: Agent) -> dict:
            return {"disk": a.index, "pid": a.child.pid, **a.call("stats", since_ns=since_ns, until_ns=until_ns)}

        return {"disks": self.each(one, self.running(disk)), "last_servicing": self.last_servicing}

    def verify(self, disk: int | None = None, timeout: float = 60.0) -> dict:
        """Stop IO and read back every chunk written: each block must hold its LBA and last generation."""
        def one(a: Agent) -> dict:
            return {"disk": a.index, **a.call("verify", wait=timeout + 10, qd=DEFAULT_QD, timeout=timeout)}

        return {"disks": self.each(one, self.running(disk))}

    # -- servicing -------------------------------------------------------------------------------
    def snapshot(self) -> dict[int, dict]:
        """Each running agent's counters before a servicing (`window` diffs them)."""
        out = {}
        for a in self.running():
            try:
                out[a.index] = a.call("status")
            except DiskError as e:
                kv(log, logging.WARNING, "no disk counters before the servicing", disk=a.index, error=str(e))
        return out

    def popped(self) -> dict[int, int]:
        """Each disk's request-ring consumer position: what the worker had taken from the guest so far (call
        once a worker died, before the next one runs)."""
        return {i: ch.requests.stats().head for i, ch in enumerate(self.channels)}

    def requeue(self, popped: dict[int, int]) -> None:
        """A worker died with the requests it had popped (`popped()` taken after its death) and no saved state
        reached its successor: each agent re-pushes those still outstanding. Never raises."""
        for a in self.running():
            try:
                n = a.call("requeue", popped_before=popped[a.index])["requeued"]
            except DiskError as e:
                kv(log, logging.WARNING, "disk requests could not be requeued", disk=a.index, error=str(e))
                continue
            kv(log, logging.INFO, "disk requests requeued after a worker died with them", disk=a.index, requests=n)

    def window(self, before: dict[int, dict], start_ns: int, end_ns: int) -> tuple[float | None, int | None]:
        """(longest IO blackout ms, IO errors) of the servicing window over the disks whose IO ran in it
        (running at the snapshot); (None, None) when none did. Waits (at most RESUME_WAIT_S) for IO to
        resume after the window, so the blackout is measured to its end. Never raises."""
        def one(a: Agent) -> dict | None:
            if not before.get(a.index, {}).get("running"):
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
                kv(log, logging.WARNING, "no disk numbers for the servicing window", disk=a.index, error=str(e))
                return None
            # The agent's counters are for its whole run: the window's row shows what changed in it.
            counted = {k: st[k] - v for k, v in before[a.index]["counters"].items() if k in st}
            errors = sum(counted[k] for k in ERROR_COUNTERS)
            return {"disk": a.index, "start_ns": start_ns, "end_ns": end_ns, "io_errors": errors, **st, **counted}

        measured = [m for m in self.each(one, self.running()) if m is not None]
        self.last_servicing = measured or None
        if not measured:
            return None, None
        blackout = max(m["io_blackout_ms"] for m in measured)
        errors = sum(m["io_errors"] for m in measured)
        kv(log, logging.INFO, "servicing window measured (disks)", io_blackout_ms=blackout, io_errors=errors,
           disks=len(measured))
        return round(blackout, 3), errors
