"""`vfkeep demo --network` (`make demo-net`): real ping and a real TCP connection across every servicing path.

One host with `--guest netns` (one NIC, realistic device timing by default, root needed): the guest
namespace pings the peer every 10 ms (iputils ping) and streams a checked byte pattern to it over
one TCP connection (a Python sender and receiver, `vfkeep.guest.netload`, no iperf3). The host
then services once per path of `vfkeep.servicing_paths`, in its order: reset-flr (FLR and fresh
init), reset (no keepalive: clean shutdown, fresh init), keepalive (MANA keepalive, the vport's
queues rebuilt) and keepalive+datapath (the vport's queues kept too, DESIGN D7). Each path's phase
runs from the end of the previous one until `AFTER_S` after its servicing, so every ping and every
byte belongs to exactly one path.

Per path: ping replies lost (and whether any was lost outside every servicing window, give or take
`WINDOW_MARGIN_MS`: a lost request's flight, from its send to the next reply that came, must meet one), the
longest time without a reply, TCP retransmissions (the kernel's
tcpi_total_retrans), bytes delivered, and whether the connection survived (still ESTABLISHED and
delivering after the servicing; at the end it is closed cleanly and the receiver has checked every
byte, in order). Output: a table, `<out>/network.png` (RTT and TCP throughput over time, servicing
windows shaded) and `<out>/network.json`.
"""
from __future__ import annotations

import logging
import os
import pathlib
import shutil
import tempfile
import time

import click
from rich.console import Console
from rich.table import Table

from . import log as vlog
from . import netns, proc
from .cli import one_line
from .demo import write_report
from .device.timing import DeviceTiming
from .guest.netload import Pinger, TcpStream, lost_outside
from .host.vmm import Host, HostConfig
from .log import kv
from .servicing_paths import ORDER, REQUESTS, unexpected

log = logging.getLogger("vfkeep.demo_net")

PING_INTERVAL_S = 0.01
TCP_RATE = 2_000_000
TCP_PORT = 5201
WARMUP_S = 1.0
#: After each servicing: long enough for TCP's retransmission timer (200 ms and up) to repair the window.
AFTER_S = 2.0
#: Slack around a servicing window when a lost request's flight (its send to the next reply that came) is matched
#: against it: ping's timestamps are wall-clock times mapped to the monotonic clock once, at its start.
WINDOW_MARGIN_MS = 100
TCP_BIN_S = 0.1


class NetDemo:
    def __init__(self, run_dir: str, timing: DeviceTiming, tcp_rate: float = TCP_RATE,
                 after_s: float = AFTER_S, machine: dict | None = None):
        # Data-path keepalive available (pool room for the kept vport); each path's request chooses (servicing_paths).
        self.host = Host(HostConfig(run_dir=run_dir, nics=1, timing=timing, datapath_keepalive=True, guest="netns"))
        self.timing, self.tcp_rate, self.after_s, self.machine = timing, tcp_rate, after_s, machine
        self.pinger: Pinger | None = None
        self.stream: TcpStream | None = None
        self.processes: list[dict] = []

    def run(self, step=lambda text: None) -> dict:
        step("booting host with a guest network namespace")
        self.host.start()
        gn = self.host.guest_net
        guest, wire, peer = gn.guest_ns(0), gn.wire_ns(0), netns.peer_address(0)
        step(f"guest {netns.guest_address(0)}: ping {peer} every {PING_INTERVAL_S * 1000:g} ms, TCP stream")
        self.pinger = Pinger(guest, peer, PING_INTERVAL_S)
        self.stream = TcpStream(guest, wire, peer, TCP_PORT, self.tcp_rate)
        self.stream.wait_connected()
        if not self.pinger.wait_replies(10, 10):
            raise RuntimeError(f"the guest got no ping replies from {peer}")
        self._note_processes()
        phase_start = time.monotonic_ns()
        time.sleep(WARMUP_S)
        phases = []
        for mode in ORDER:
            step(f"servicing: {mode}")
            result = self.host.service(**REQUESTS[mode])
            window = tuple(self.host.last_servicing["window_ns"])
            self._note_processes()
            time.sleep(self.after_s)
            phase_end = time.monotonic_ns()
            phases.append((mode, result, window, phase_start, phase_end))
            phase_start = phase_end
        step("closing the TCP connection")
        self.pinger.stop()
        tcp = self.stream.close()
        report = self._report(phases, tcp)
        report["drops"] = self._drops()
        return report

    def _drops(self) -> dict:
        """Where frames were dropped over the whole run (device receive, bridge): a loss no servicing explains is
        one of these (at load 10-20 the device found no posted receive buffer, `in_discards_no_wqe`, while the
        worker's relay waited for a CPU)."""
        try:
            c = self.host.devices[0].call("counters")["counters"]
        except Exception as e:  # noqa: BLE001 - a report without it still says what was lost
            return {"error": str(e)}
        out = {k: c[k] for k in ("in_discards_no_wqe", "in_errors_rx_vport_disabled", "rx_dropped_unmapped",
                                 "rx_dropped_link_down", "rx_dropped_removed") if k in c}
        bridge = (self.host.guest_net.status()[0].get("bridge") or {}) if self.host.guest_net else {}
        out["bridge_tx_ring_full"] = bridge.get("tx_ring_full")
        return out

    def _note_processes(self) -> None:
        s = self.host.status()
        pids = [("worker", s["worker"]["pid"])] if s["worker"] else []
        pids += [("device", d["pid"]) for d in s["devices"]] + [("guest-bridge", b["pid"]) for b in s["bridges"]]
        pids += [("ping", self.pinger.proc.pid), ("tcp-sender", self.stream.sender.proc.pid),
                 ("tcp-receiver", self.stream.receiver.proc.pid)]
        for role, pid in pids:
            if not any(p["pid"] == pid for p in self.processes):
                self.processes.append({"role": role, "pid": pid})

    def close(self) -> None:
        """End the load (if still running) and the host; every namespace goes with it."""
        if self.pinger is not None:
            self.pinger.stop()
        if self.stream is not None:
            self.stream.kill()
        self.host.stop()

    def _report(self, phases: list, tcp: dict) -> dict:
        sender, receiver = self.stream.sender, self.stream.receiver
        # A loss is the servicing's when the request's flight met a servicing window: by its send time alone, a
        # request queued for 300 ms on a loaded machine (RTT 300 ms) then lost with the reset's in-flight frames was
        # "lost outside the servicing window" (22 of them once, at load 10-20).
        outside_all = lost_outside(self.pinger.lost_flights(), [tuple(w) for _, _, w, _, _ in phases],
                                   WINDOW_MARGIN_MS * 1_000_000)
        paths = []
        for mode, result, (w0, w1), p0, p1 in phases:
            ping = self.pinger.window(p0, p1)
            outside = [s for s, t in outside_all if p0 <= t < p1]
            r0, r_end, r1 = receiver.at(p0), receiver.at(w1), receiver.at(p1)
            s0, s1 = sender.at(p0), sender.at(p1)
            flowed_after = r1 is not None and r_end is not None and r1["bytes"] > r_end["bytes"]
            paths.append({
                "path": mode, "servicing": result, "window_ns": [w0, w1], "phase_ns": [p0, p1],
                "expectations_failed": unexpected(mode, result),
                "ping_sent": ping["sent"], "ping_lost": ping["lost"], "ping_lost_outside_window": len(outside),
                "ping_lost_outside_window_seqs": outside[:100],
                "ping_max_gap_ms": ping["max_gap_ms"], "ping_rtt_max_ms": ping["rtt_max_ms"],
                "tcp_survived": bool(flowed_after and s1 is not None and s1["state"] == "ESTABLISHED"),
                "tcp_retransmits": (s1["retrans"] - (s0["retrans"] if s0 else 0)) if s1 else None,
                "tcp_bytes": (r1["bytes"] - (r0["bytes"] if r0 else 0)) if r1 else 0,
            })
            kv(log, logging.INFO, "network demo path", path=mode, ping_lost=ping["lost"],
               ping_max_gap_ms=ping["max_gap_ms"], tcp_bytes=paths[-1]["tcp_bytes"],
               tcp_retransmits=paths[-1]["tcp_retransmits"], tcp_survived=paths[-1]["tcp_survived"])
        t0 = phases[0][3]
        series = {
            "ping": [[(r.send_ns - t0) / 1e9, round(r.rtt_ms, 3)] for r in sorted(self.pinger.replies.values(),
                                                                                 key=lambda r: r.send_ns)],
            "tcp_bytes": [[(p["t_ns"] - t0) / 1e9, p["bytes"]] for p in receiver.progress],
        }
        return {"vfkeep_demo_network": 1, "timing": self.timing.to_dict(), "machine": self.machine,
                "guest": {"netns": self.host.guest_net.guest_ns(0), "address": netns.guest_address(0),
                          "peer": netns.peer_address(0), "mac": self.host.guest_net.macs[0].hex(":")},
                "ping_interval_ms": PING_INTERVAL_S * 1000, "tcp_rate_bytes_s": self.tcp_rate,
                "tcp_tool": "python (vfkeep.guest.netload)", "window_margin_ms": WINDOW_MARGIN_MS,
                "t0_ns": t0, "tcp": tcp, "paths": paths, "series": series}


def plot(report: dict, path: pathlib.Path) -> None:
    """RTT of every ping and TCP throughput over the whole run; servicing windows shaded and labelled."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = report["t0_ns"]
    fig, (rtt_ax, tcp_ax) = plt.subplots(2, 1, figsize=(11, 6), sharex=True)
    ping = report["series"]["ping"]
    rtt_ax.plot([p[0] for p in ping], [p[1] for p in ping], ".", markersize=2, color="tab:green",
                label=f"ping RTT (every {report['ping_interval_ms']:g} ms)")
    rtt_ax.set_yscale("log")
    rtt_ax.set_ylabel("RTT ms")
    x, y = _throughput(report["series"]["tcp_bytes"], TCP_BIN_S)
    tcp_ax.step(x, y, where="post", linewidth=0.9, color="tab:blue",
                label=f"TCP delivered (MB/s, {TCP_BIN_S * 1000:g} ms bins)")
    tcp_ax.set_ylabel("MB/s")
    tcp_ax.set_xlabel("seconds")
    for ax in (rtt_ax, tcp_ax):
        for p in report["paths"]:
            w0, w1 = ((t - t0) / 1e9 for t in p["window_ns"])
            ax.axvspan(w0, max(w1, w0 + 0.01), color="tab:orange", alpha=0.3)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", fontsize=8)
    for p in report["paths"]:
        w0 = (p["window_ns"][0] - t0) / 1e9
        rtt_ax.annotate(f"{p['path']}\nlost {p['ping_lost']}, gap {p['ping_max_gap_ms']:.0f} ms",
                        (w0, 1.02), xycoords=("data", "axes fraction"), fontsize=8, va="bottom")
        tcp_ax.annotate(f"retrans {p['tcp_retransmits']}, survived {_yn(p['tcp_survived'])}",
                        (w0, 1.02), xycoords=("data", "axes fraction"), fontsize=8, va="bottom")
    fig.suptitle(f"vfkeep demo --network: ping and one TCP connection across servicing "
                 f"({DeviceTiming.from_dict(report['timing']).describe()}; windows shaded)", fontsize=10, y=0.995)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _throughput(progress: list, bin_s: float) -> tuple[list[float], list[float]]:
    """(bin starts, MB/s) from (t, bytes delivered so far) samples: bytes at a bin edge are those of the
    last sample at or before it."""
    if not progress:
        return [], []
    edges = [progress[0][0] + i * bin_s for i in range(int((progress[-1][0] - progress[0][0]) / bin_s) + 1)]
    at, i = [], 0
    for e in edges:
        while i + 1 < len(progress) and progress[i + 1][0] <= e:
            i += 1
        at.append(progress[i][1])
    return edges[:-1], [(b - a) / bin_s / 1e6 for a, b in zip(at, at[1:])]


def table(report: dict) -> Table:
    paths = report["paths"]
    t = Table(title="real ping and TCP across servicing (guest network namespace)", title_justify="left",
              caption=f"ping every {report['ping_interval_ms']:g} ms; one TCP connection at "
                      f"{report['tcp_rate_bytes_s'] / 1e6:g} MB/s; {DeviceTiming.from_dict(report['timing']).describe()}",
              caption_justify="left")
    t.add_column("")
    for p in paths:
        t.add_column(p["path"], justify="right")

    def row(label, fn):
        t.add_row(label, *[fn(p) for p in paths])

    row("restore path", lambda p: ",".join(sorted({n["restore_path"] for n in p["servicing"]["nics"]})))
    row("servicing ms", lambda p: f"{p['servicing']['phases_ms']['total']:.1f}")
    row("ping replies lost", lambda p: f"{p['ping_lost']}/{p['ping_sent']}")
    row("max reply gap ms", lambda p: f"{p['ping_max_gap_ms']:.1f}")
    row("TCP retransmissions", lambda p: str(p["tcp_retransmits"]))
    row("TCP bytes delivered", lambda p: f"{p['tcp_bytes']:,}")
    row("TCP survived", lambda p: _yn(p["tcp_survived"]))
    return t


def _yn(v: bool) -> str:
    return "yes" if v else "no"


def problems(report: dict) -> list[str]:
    """What the run must show: expected paths, the connection survived and closed with every byte in order,
    ping lost replies only inside servicing windows."""
    out = []
    for p in report["paths"]:
        out += [f"{p['path']}: {m}" for m in p["expectations_failed"]]
        if not p["tcp_survived"]:
            out.append(f"{p['path']}: the TCP connection did not survive")
        if p["ping_lost_outside_window"]:
            out.append(f"{p['path']}: {p['ping_lost_outside_window']} ping replies lost outside the servicing window")
    if any(p["ping_lost_outside_window"] for p in report["paths"]) and (report.get("drops") or {}).get(
            "in_discards_no_wqe"):
        out.append(f"the device dropped {report['drops']['in_discards_no_wqe']} received frames for want of a posted "
                   "receive buffer (in_discards_no_wqe: the worker's relay did not keep up)")
    if not report["tcp"]["ok"]:
        out.append(f"TCP stream: {report['tcp']}")
    return out


def network_demo(out: str, json_path: str | None, timing: DeviceTiming, machine: dict) -> None:
    """The `vfkeep demo --network` command body (`machine`: demo.machine()): run, print, write; exit 1 on a
    problem."""
    console = Console()
    if reason := netns.unavailable_reason(("ip", "ping")):
        raise click.ClickException(reason)
    proc.signals_interrupt()  # (SIGTERM and SIGHUP too, and a second one never cuts the cleanup short)
    run_dir = tempfile.mkdtemp(prefix="vfkeep-demo-net-")
    vlog.setup("host", run_dir)
    t0 = time.monotonic()
    demo = NetDemo(run_dir, timing, machine=machine)
    try:
        with console.status("starting") as status:
            try:
                report = demo.run(lambda text: status.update(text))
            finally:
                status.update("stopping the host")
                demo.close()
        report["processes"] = demo.processes
        report["wall_s"] = round(time.monotonic() - t0, 1)
        out_dir = pathlib.Path(out)
        write_report(report, out_dir, json_path, ("network.png", "network.json"), draw=plot)
    except KeyboardInterrupt as e:
        if left := netns.list_run(netns.run_id(run_dir)):  # (the host removes them best effort: never say it did)
            e.note = (f"every process ended, but namespaces {', '.join(left)} could not be removed (`ip netns del "
                      f"NAME`; see {os.path.join(run_dir, 'host.log')})")
        else:
            shutil.rmtree(run_dir, ignore_errors=True)  # nothing to look at: the user stopped it
            e.note = "every process and namespace ended, temporary run dir removed"
        raise
    except Exception as e:
        kv(log, logging.ERROR, "network demo failed", error=repr(e))
        raise click.ClickException(f"network demo: {one_line(e)} (see {os.path.join(run_dir, 'host.log')})") from e
    console.print(table(report))
    failed = problems(report)
    for msg in failed:
        console.print(f"[red]unexpected:[/red] {msg}")
    if not failed:
        console.print(f"[green]as expected:[/green] the TCP connection survived every servicing and delivered "
                      f"{report['tcp']['received']:,} bytes, all in order; ping lost replies only inside servicing windows")
    console.print(f"wrote {out_dir / 'network.png'} and {out_dir / 'network.json'} in {report['wall_s']} s")
    if failed:
        more = f" (and {len(failed) - 1} more above)" if len(failed) > 1 else ""
        raise click.ClickException(f"network demo: unexpected: {failed[0]}{more} "
                                   f"(see {os.path.join(run_dir, 'host.log')})")
    shutil.rmtree(run_dir, ignore_errors=True)
