"""Guest traffic on a running host: one traffic agent process per NIC, started on request (an
`AgentPool`, host/agents.py). For every servicing the host marks the window (its own
CLOCK_MONOTONIC times) in each agent and asks for the frames sent in it: the servicing result's `blackout_ms` is the
longest blackout over the NICs and `frames_lost` the sum, both null when no traffic ran.
"""
from __future__ import annotations

import logging
import os
import subprocess
from typing import TYPE_CHECKING

from ..log import kv
from .agents import AGENT_TIMEOUT_S, Agent, AgentPool

if TYPE_CHECKING:  # (the CLI's `traffic start` takes the defaults below: no guest code for it)
    from ..guest.ring import ChannelLayout, NicChannel
    from ..memory import GuestMemory

log = logging.getLogger("vfkeep.host.traffic")

DEFAULT_RATE = 1000
DEFAULT_SIZE = 128
#: How long a servicing result waits for frames of the window still in flight after the restore.
SETTLE_MS = 200
#: Label of the mark set at every `start`: `stats` without a window covers the current run only
#: (stats over a whole long run costs the agent seconds of CPU).
START_MARK = "traffic-start"
#: `stats` without settle_ms waits for the frames still in flight (the agent answers as soon as all came
#: back) at most this many times the NIC's last measured RTT p99, within [floor, cap] ms; the cap until an
#: RTT is known. So "lost" means lost, not "not back yet".
SETTLE_RTT_MULTIPLE = 10
SETTLE_FLOOR_MS = 100.0
SETTLE_CAP_MS = 2000.0


class TrafficError(Exception):
    """A traffic request that cannot be served (no such NIC, no agent, agent failure)."""


class GuestTraffic(AgentPool):
    """The host's traffic agents (`AgentPool`). `has_agent(nic)`: an agent is attached to the NIC's rings
    (it consumes the rx ring even when its traffic is stopped), so nobody else may push or pop them, as the
    rings are SPSC."""

    error, noun, what, start_hint, log = TrafficError, "nic", "traffic agent", "start traffic first", log
    operations = ("start", "stop", "stats", "timeline", "status")

    def __init__(self, run_dir: str, mem: GuestMemory, channel_layout: ChannelLayout | None,
                 channels: list[NicChannel]):
        super().__init__(len(channels))
        self.run_dir = run_dir
        self.mem = mem
        self.channel_layout = channel_layout
        self.channels = channels
        self._windows = 0
        self._rtt_p99_ms: dict[int, float] = {}

    def _spawn(self, nic: int) -> tuple[subprocess.Popen, str]:
        from ..guest.agent import AgentError, spawn_agent
        tx, rx = self.channels[nic].bell_fds()
        path = os.path.join(self.run_dir, f"guest-agent-{nic}.sock")
        try:
            return spawn_agent(self.mem, self.mem.layout, self.channel_layout, nic, tx, rx, path, self.run_dir), path
        except AgentError as e:
            raise TrafficError(str(e)) from None

    # -- operations ------------------------------------------------------------------------------
    def start(self, rate: float = DEFAULT_RATE, size: int = DEFAULT_SIZE, nic: int | None = None,
              backpressure: bool = False) -> dict:
        nics = self.indexes(nic)
        out = []
        for i in nics:
            agent = self.agent(i)
            agent.call("mark", label=START_MARK)
            reply = agent.call("start", rate=rate, size=size, backpressure=backpressure)
            out.append({"nic": i, "pid": agent.child.pid, **reply})
        kv(log, logging.INFO, "traffic started", nics=",".join(map(str, nics)), rate=rate, size=size,
           backpressure=backpressure)
        return {"nics": out}

    def stop(self, nic: int | None = None) -> dict:
        return {"nics": [{"nic": a.index, **a.call("stop")} for a in self.running(nic)]}

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
        def one(a: Agent) -> dict:
            settle = self.settle_bound_ms(a.index) if settle_ms is None else settle_ms
            window = {"since_ns": since_ns, "until_ns": until_ns, "settle_ms": settle}
            if since_ns is None:
                window = {"since_mark": START_MARK, "until_ns": until_ns, "settle_ms": settle}
            reply = a.call("stats", wait=AGENT_TIMEOUT_S + settle / 1000, **window)  # (it may settle that long)
            return {"nic": a.index, "pid": a.child.pid, **self._measured(a.index, reply)}

        return {"nics": self.each(one, self.running(nic)), "last_servicing": self.last_servicing}

    def timeline(self, nic: int = 0, bin_ms: float = 10, since_ns: int | None = None,
                 until_ns: int | None = None) -> dict:
        """Delivery and RTT per time bin of one NIC's agent (for plots), with every mark."""
        (agent,) = self.running(nic)
        return {"nic": nic, **agent.call("timeline", bin_ms=bin_ms, since_ns=since_ns, until_ns=until_ns)}

    # -- servicing -------------------------------------------------------------------------------
    def window(self, start_ns: int, end_ns: int) -> tuple[float | None, int | None]:
        """Mark a servicing window in every agent and measure it: (max blackout ms, total frames lost)
        over the agents that sent frames in it; (None, None) when none did. Never raises: a servicing
        result must not fail because the guest's measurement did."""
        self._windows += 1
        start, end = f"service-{self._windows}-start", f"service-{self._windows}-end"

        def one(a: Agent) -> dict | None:
            try:
                a.call("mark", label=start, t_ns=start_ns)
                a.call("mark", label=end, t_ns=end_ns)
                st = self._measured(a.index, a.call("stats", since_mark=start, until_mark=end, settle_ms=SETTLE_MS))
            except TrafficError as e:
                kv(log, logging.WARNING, "no traffic numbers for the servicing window", nic=a.index, error=str(e))
                return None
            return {"nic": a.index, "start_ns": start_ns, "end_ns": end_ns, **st}

        measured = [m for m in self.each(one, self.running()) if m is not None and m["sent"]]
        self.last_servicing = measured or None
        if not measured:
            return None, None
        blackout = max(m["blackout_ms"] for m in measured)
        lost = sum(m["frames_lost"] for m in measured)
        kv(log, logging.INFO, "servicing window measured", window=self._windows, blackout_ms=blackout,
           frames_lost=lost, nics=len(measured))
        return round(blackout, 3), lost
