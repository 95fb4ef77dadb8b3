"""Guest traffic on a running host: one traffic agent process per NIC, started on request.

Only the host can start an agent: it owns the guest memory file and the ring eventfds the agent
attaches to. Agents play the guest, so they run across servicings untouched; they are ended with
the host, by PID. For every servicing the host marks the window (its own CLOCK_MONOTONIC times)
in each agent and asks for the frames sent in it: the servicing result's `blackout_ms` is the
longest blackout over the NICs and `frames_lost` the sum, both null when no traffic ran.
"""
from __future__ import annotations

import concurrent.futures
import logging
import os
import subprocess
import threading
from dataclasses import dataclass

from .. import proc, rpc
from ..guest.agent import AgentClient, AgentError, spawn_agent
from ..guest.ring import ChannelLayout, NicChannel
from ..log import kv
from ..memory import GuestMemory

log = logging.getLogger("vfkeep.host.traffic")

DEFAULT_RATE = 1000
DEFAULT_SIZE = 128
#: How long a servicing result waits for frames of the window still in flight after the restore.
SETTLE_MS = 200
#: Label of the mark set at every `start`: `stats` without a window covers the current run only
#: (stats over a whole long run costs the agent seconds of CPU).
START_MARK = "traffic-start"
AGENT_TIMEOUT_S = 30.0
#: `stats` without settle_ms waits for the frames still in flight (the agent answers as soon as all came
#: back) at most this many times the NIC's last measured RTT p99, within [floor, cap] ms; the cap until an
#: RTT is known. So "lost" means lost, not "not back yet".
SETTLE_RTT_MULTIPLE = 10
SETTLE_FLOOR_MS = 100.0
SETTLE_CAP_MS = 2000.0


class TrafficError(Exception):
    """A traffic request that cannot be served (no such NIC, no agent, agent failure)."""


@dataclass
class _Agent:
    nic: int
    child: subprocess.Popen
    control: str

    def call(self, cmd: str, **args) -> dict:
        """One request on a connection of its own, so concurrent callers never share a socket."""
        try:
            with AgentClient(self.control, timeout=AGENT_TIMEOUT_S) as c:
                return c.call(cmd, **args)
        except rpc.RpcError as e:
            raise TrafficError(f"nic {self.nic}: {e}") from None


class GuestTraffic:
    """The host's traffic agents. `start` spawns, so it must run on the host's long-lived actor thread
    (children die with the thread that spawned them); everything else may run on any thread."""

    def __init__(self, run_dir: str, mem: GuestMemory, channel_layout: ChannelLayout | None,
                 channels: list[NicChannel]):
        self.run_dir = run_dir
        self.mem = mem
        self.channel_layout = channel_layout
        self.channels = channels
        self._agents: dict[int, _Agent] = {}
        self._lock = threading.Lock()
        self._windows = 0
        self._rtt_p99_ms: dict[int, float] = {}
        self.last_servicing: list[dict] | None = None

    def operation(self, action: str):
        ops = {"start": self.start, "stop": self.stop, "stats": self.stats, "timeline": self.timeline,
               "status": self.status}
        if action not in ops:
            raise TrafficError(f"unknown traffic action {action!r}; known: {', '.join(ops)}")
        return ops[action]

    # -- agents ----------------------------------------------------------------------------------
    def _nics(self, nic: int | None) -> list[int]:
        if nic is None:
            return list(range(len(self.channels)))
        if not isinstance(nic, int) or isinstance(nic, bool) or not 0 <= nic < len(self.channels):
            raise TrafficError(f"nic {nic!r} out of range [0, {len(self.channels)})")
        return [nic]

    def _agent(self, nic: int) -> _Agent:
        """The agent of `nic`, spawned on first use."""
        with self._lock:
            agent = self._agents.get(nic)
            if agent is not None and agent.child.poll() is None:
                return agent
            if agent is not None:
                kv(log, logging.WARNING, "traffic agent had died, starting a new one", nic=nic,
                   exit_status=agent.child.returncode)
            ch = self.channels[nic]
            tx, rx = ch.bell_fds()
            path = os.path.join(self.run_dir, f"guest-agent-{nic}.sock")
            try:
                child = spawn_agent(self.mem, self.mem.layout, self.channel_layout, nic, tx, rx, path, self.run_dir)
            except AgentError as e:
                raise TrafficError(str(e)) from None
            agent = self._agents[nic] = _Agent(nic, child, path)
            kv(log, logging.INFO, "traffic agent started", nic=nic, pid=child.pid, control=path)
            return agent

    def has_agent(self, nic: int) -> bool:
        """True while an agent process is attached to NIC `nic`'s rings (it consumes the rx ring even when
        its traffic is stopped): nobody else may push or pop them then, as the rings are SPSC."""
        with self._lock:
            agent = self._agents.get(nic)
            return agent is not None and agent.child.poll() is None

    def _running(self, nic: int | None = None) -> list[_Agent]:
        """Live agents of the selected NICs (none spawned yet is an error only for one named NIC)."""
        nics = self._nics(nic)
        with self._lock:
            agents = [self._agents[i] for i in nics if i in self._agents and self._agents[i].child.poll() is None]
        if nic is not None and not agents:
            raise TrafficError(f"no traffic agent on nic {nic}; start traffic first")
        return agents

    @staticmethod
    def _each(fn, agents: list[_Agent]) -> list:
        """fn(agent) for every agent concurrently (stats may wait settle_ms per agent)."""
        if len(agents) <= 1:
            return [fn(a) for a in agents]
        with concurrent.futures.ThreadPoolExecutor(len(agents)) as pool:
            return list(pool.map(fn, agents))

    # -- operations ------------------------------------------------------------------------------
    def start(self, rate: float = DEFAULT_RATE, size: int = DEFAULT_SIZE, nic: int | None = None,
              backpressure: bool = False) -> dict:
        nics = self._nics(nic)
        if not nics:
            raise TrafficError("the host has no NICs")
        out = []
        for i in nics:
            agent = self._agent(i)
            agent.call("mark", label=START_MARK)
            reply = agent.call("start", rate=rate, size=size, backpressure=backpressure)
            out.append({"nic": i, "pid": agent.child.pid, **reply})
        kv(log, logging.INFO, "traffic started", nics=",".join(map(str, nics)), rate=rate, size=size,
           backpressure=backpressure)
        return {"nics": out}

    def stop(self, nic: int | None = None) -> dict:
        return {"nics": [{"nic": a.nic, **a.call("stop")} for a in self._running(nic)]}

    def settle_bound_ms(self, nic: int) -> float:
        """The default settle of `stats` for `nic` (SETTLE_RTT_MULTIPLE x its last measured RTT p99)."""
        rtt = self._rtt_p99_ms.get(nic)
        if rtt is None:
            return SETTLE_CAP_MS
        return min(SETTLE_CAP_MS, max(SETTLE_FLOOR_MS, SETTLE_RTT_MULTIPLE * rtt))

    def _measured(self, nic: int, reply: dict) -> dict:
        rtt = (reply.get("rtt_ms") or {}).get("p99")
        if rtt is not None:
            self._rtt_p99_ms[nic] = rtt
        return reply

    def stats(self, nic: int | None = None, since_ns: int | None = None, until_ns: int | None = None,
              settle_ms: float | None = None) -> dict:
        """Per NIC: the frames sent in the window (default: since the last start), plus the per-NIC
        numbers of the last servicing window. Waits for frames in flight: `settle_ms` at most, by default
        a bound from the NIC's measured RTT (`settle_bound_ms`)."""
        def one(a: _Agent) -> dict:
            settle = self.settle_bound_ms(a.nic) if settle_ms is None else settle_ms
            window = {"since_ns": since_ns, "until_ns": until_ns, "settle_ms": settle}
            if since_ns is None:
                window = {"since_mark": START_MARK, "until_ns": until_ns, "settle_ms": settle}
            return {"nic": a.nic, "pid": a.child.pid, **self._measured(a.nic, a.call("stats", **window))}

        return {"nics": self._each(one, self._running(nic)), "last_servicing": self.last_servicing}

    def timeline(self, nic: int = 0, bin_ms: float = 10, since_ns: int | None = None,
                 until_ns: int | None = None) -> dict:
        """Delivery and RTT per time bin of one NIC's agent (for plots), with every mark."""
        (agent,) = self._running(nic)
        return {"nic": nic, **agent.call("timeline", bin_ms=bin_ms, since_ns=since_ns, until_ns=until_ns)}

    def status(self) -> dict:
        """Agents (pid, alive, counters) and the per-NIC numbers of the last servicing window; cheap."""
        with self._lock:
            agents = list(self._agents.values())
        out = []
        for a in agents:
            entry = {"nic": a.nic, "pid": a.child.pid, "alive": a.child.poll() is None}
            if entry["alive"]:
                entry.update(a.call("status"))
            out.append(entry)
        return {"agents": out, "last_servicing": self.last_servicing}

    # -- servicing -------------------------------------------------------------------------------
    def window(self, start_ns: int, end_ns: int) -> tuple[float | None, int | None]:
        """Mark a servicing window in every agent and measure it: (max blackout ms, total frames lost)
        over the agents that sent frames in it; (None, None) when none did. Never raises: a servicing
        result must not fail because the guest's measurement did."""
        self._windows += 1
        start, end = f"service-{self._windows}-start", f"service-{self._windows}-end"

        def one(a: _Agent) -> dict | None:
            try:
                a.call("mark", label=start, t_ns=start_ns)
                a.call("mark", label=end, t_ns=end_ns)
                st = self._measured(a.nic, a.call("stats", since_mark=start, until_mark=end, settle_ms=SETTLE_MS))
            except TrafficError as e:
                kv(log, logging.WARNING, "no traffic numbers for the servicing window", nic=a.nic, error=str(e))
                return None
            return {"nic": a.nic, "start_ns": start_ns, "end_ns": end_ns, **st}

        measured = [m for m in self._each(one, self._running()) if m is not None and m["sent"]]
        self.last_servicing = measured or None
        if not measured:
            return None, None
        blackout = max(m["blackout_ms"] for m in measured)
        lost = sum(m["frames_lost"] for m in measured)
        kv(log, logging.INFO, "servicing window measured", window=self._windows, blackout_ms=blackout,
           frames_lost=lost, nics=len(measured))
        return round(blackout, 3), lost

    def close(self) -> None:
        """End every agent by PID (SIGTERM: the agent exits 0; SIGKILL if it does not)."""
        with self._lock:
            agents, self._agents = list(self._agents.values()), {}
        for a in agents:
            proc.end(a.child)
            kv(log, logging.INFO, "traffic agent ended", nic=a.nic, pid=a.child.pid, exit_status=a.child.returncode)
