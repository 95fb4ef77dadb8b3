"""The host's guest agent processes, one per device index: a NIC's traffic agent, a disk's IO agent.

Only the host can start an agent: it owns the guest memory file and the eventfds the agent attaches to.
Agents play the guest, so they run across servicings untouched; they are ended with the host, by PID.
`GuestTraffic` (host/traffic.py) and `GuestDisks` (host/disks.py) add what their agents measure.
"""
from __future__ import annotations

import concurrent.futures
import logging
import os
import subprocess
import threading
from dataclasses import dataclass

from .. import proc, rpc
from ..log import kv

log = logging.getLogger("vfkeep.host.agents")

AGENT_TIMEOUT_S = 30.0


@dataclass
class Agent:
    index: int
    child: subprocess.Popen
    control: str
    error: type[Exception] = rpc.RpcError
    noun: str = "device"

    def call(self, cmd: str, wait: float = AGENT_TIMEOUT_S, **args) -> dict:
        """One request on a connection of its own, so concurrent callers never share a socket; arguments
        that are None are left out (the agent's defaults apply)."""
        try:
            with rpc.RpcClient(self.control, wait) as client:
                return client.call(cmd, {k: v for k, v in args.items() if v is not None}, patience=self._not_stopped)
        except rpc.Timeout:  # alive (it took the request), but busy or stuck: say so, and where to look
            raise self.error(f"{self.noun} {self.index}: its agent (pid {self.child.pid}) did not answer {cmd!r} "
                             f"within {wait:g} s: overloaded or stuck (its log: {self.log})") from None
        except rpc.RpcError as e:
            raise self.error(f"{self.noun} {self.index}: {e}") from None

    def _not_stopped(self) -> None:
        """While an answer is awaited: an agent stopped by SIGSTOP answers nothing until continued; it was named
        only once the 30 s timeout ran out, as "overloaded or stuck"."""
        if line := proc.stopped_line(f"{self.noun} {self.index}: its agent (pid {self.child.pid})", self.child.pid):
            raise self.error(f"{line} (its log: {self.log})")

    @property
    def log(self) -> str:
        return f"{os.path.splitext(self.control)[0]}.log"


class AgentPool:
    """Agents of `count` devices, spawned on first use (`agent`). Spawning must run on the host's
    long-lived actor thread (children die with the thread that spawned them); everything else may run on
    any thread. A subclass sets the names below and `_spawn`."""

    error: type[Exception] = Exception
    noun = "device"  # the index's name in messages ("nic", "disk")
    what = "agent"  # the agent's name in messages ("traffic agent")
    start_hint = "start it first"
    operations: tuple[str, ...] = ()
    log = log  # the subclass's module logger

    def __init__(self, count: int):
        self.count = count
        self._agents: dict[int, Agent] = {}
        self._lock = threading.Lock()
        self.last_servicing: list[dict] | None = None

    def _spawn(self, index: int) -> tuple[subprocess.Popen, str]:
        """Start the agent of `index`: (its process, its control socket path)."""
        raise NotImplementedError

    def operation(self, action: str):
        if action not in self.operations:
            raise self.error(f"unknown {self.what.split()[0]} action {action!r}; known: {', '.join(self.operations)}")
        return getattr(self, action)

    def indexes(self, index: int | None) -> list[int]:
        """All devices, or the one named (checked)."""
        if index is None:
            return list(range(self.count))
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < self.count:
            raise self.error(f"{self.noun} {index!r} out of range [0, {self.count})")
        return [index]

    def agent(self, index: int) -> Agent:
        """The agent of `index`, spawned on first use (or again once it died)."""
        with self._lock:
            agent = self._agents.get(index)
            if agent is not None and agent.child.poll() is None:
                return agent
            if agent is not None:
                kv(self.log, logging.WARNING, f"{self.what} had died, starting a new one", **{self.noun: index},
                   exit_status=agent.child.returncode)
            child, control = self._spawn(index)
            agent = self._agents[index] = Agent(index, child, control, self.error, self.noun)
            kv(self.log, logging.INFO, f"{self.what} started", **{self.noun: index}, pid=child.pid, control=control)
            return agent

    def has_agent(self, index: int) -> bool:
        with self._lock:
            agent = self._agents.get(index)
            return agent is not None and agent.child.poll() is None

    def running(self, index: int | None = None) -> list[Agent]:
        """Live agents of the selected devices (none spawned yet is an error only for one named device)."""
        indexes = self.indexes(index)
        with self._lock:
            agents = [self._agents[i] for i in indexes if i in self._agents and self._agents[i].child.poll() is None]
        if index is not None and not agents:
            raise self.error(f"no {self.what} on {self.noun} {index}; {self.start_hint}")
        return agents

    @staticmethod
    def each(fn, agents: list[Agent]) -> list:
        """fn(agent) for every agent concurrently (a measurement may wait per agent)."""
        if len(agents) <= 1:
            return [fn(a) for a in agents]
        with concurrent.futures.ThreadPoolExecutor(len(agents)) as pool:
            return list(pool.map(fn, agents))

    def status(self) -> dict:
        """Agents (pid, alive, their status) and the per-device numbers of the last servicing window; cheap."""
        with self._lock:
            agents = list(self._agents.values())
        out = []
        for a in agents:
            entry = {self.noun: a.index, "pid": a.child.pid, "alive": a.child.poll() is None}
            if entry["alive"]:
                entry.update(a.call("status"))
            out.append(entry)
        return {"agents": out, "last_servicing": self.last_servicing}

    def close(self) -> None:
        """End every agent by PID (SIGTERM: the agent exits 0; SIGKILL if it does not)."""
        with self._lock:
            agents, self._agents = list(self._agents.values()), {}
        for a in agents:
            proc.end(a.child)
            kv(self.log, logging.INFO, f"{self.what} ended", **{self.noun: a.index}, pid=a.child.pid,
               exit_status=a.child.returncode)
