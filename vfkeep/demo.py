"""`vfkeep demo`: guest traffic across two servicings, with MANA keepalive and without, side by side.

One host in a temporary run dir (default: one NIC, realistic device timing), a traffic agent per NIC,
a servicing with `--mana-keepalive`, then one without it. What each servicing cost the guest comes
from the agents (blackout, frames lost); what it did to the device comes from the device itself
(reset counter, command log). Output: a table, `<out>/timeline.png` (delivery and RTT around each
servicing) and `<out>/results.json`. Exits 1 when a servicing did not take the path it should.
"""
from __future__ import annotations

import json
import logging
import os
import pathlib
import platform
import shutil
import signal
import tempfile
import time

import click
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from . import __version__
from . import log as vlog
from .contract import DATAPATH_KEEPALIVE_ENV
from .device.timing import DeviceTiming, timing_from, timing_options
from .host.traffic import DEFAULT_SIZE
from .host.vmm import DATAPATH_POOL_PAGES_PER_NIC, Host, HostConfig
from .memory import pool_pages_from_env
from .log import kv

log = logging.getLogger("vfkeep.demo")

#: (mode, servicing request) in the order they run.
MODES = (("keepalive", {"mana_keepalive": True}), ("reset", {"mana_keepalive": False}))
#: With --datapath-keepalive (DESIGN D7): the first servicing's new worker opens its vport in the pool, the
#: second keeps that vport across the handover (its successor restores it, and tears it down at the reset).
MODES_DATAPATH = (("keepalive", {"mana_keepalive": True, "next_env": {DATAPATH_KEEPALIVE_ENV: "1"}}),
                  ("keepalive+datapath", {"mana_keepalive": True, "next_env": {DATAPATH_KEEPALIVE_ENV: "0"}}),
                  ("reset", {"mana_keepalive": False}))
WARMUP_S = 1.0
#: Steady traffic kept after each servicing, so the plot shows it recovering.
AFTER_S = 0.6
#: Plotted around each servicing window.
PLOT_BEFORE_MS = 200
PLOT_AFTER_MS = 400
BIN_MS = 5
#: Progress steps besides one per servicing.
STEPS = 5


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"platform": platform.platform(), "machine": platform.machine(), "cpu": cpu, "cpus": os.cpu_count(),
            "python": platform.python_version(), "vfkeep": __version__}


def expectations(mode: str, result: dict) -> list[str]:
    """What a servicing of this mode must show (DESIGN §10); the failed expectations."""
    if mode.startswith("keepalive"):
        want = {"restore_path": "keepalive", "device_reset": False, "hwc_established": False}
    else:
        want = {"restore_path": "fresh", "hwc_established": True}
    bad = [] if result["ok"] else [f"servicing failed: {result['error']}"]
    for n in result["nics"]:
        bad += [f"{n['pci_id']}: {k} is {n[k]!r}, expected {v!r}" for k, v in want.items() if n[k] != v]
    return bad


class Demo:
    def __init__(self, run_dir: str, timing: DeviceTiming, rate: float, nics: int, progress: Progress,
                 datapath: bool = False):
        # Data-path keepalive needs pool room for the kept vports, fixed at boot.
        pool = pool_pages_from_env(os.environ) + DATAPATH_POOL_PAGES_PER_NIC * nics if datapath else None
        self.host = Host(HostConfig(run_dir=run_dir, nics=nics, timing=timing, pool_pages=pool))
        self.modes = MODES_DATAPATH if datapath else MODES
        self.rate, self.nics, self.timing = rate, nics, timing
        self.progress = progress
        self.task = progress.add_task("starting", total=STEPS + len(self.modes))
        self.processes: list[dict] = []

    def step(self, text: str) -> None:
        self.progress.update(self.task, description=text)

    def done(self) -> None:
        self.progress.advance(self.task)

    def note_processes(self) -> None:
        """Every child PID the host has had, so the report (and a test) can check none outlived the demo."""
        s = self.host.status()
        pids = [("worker", s["worker"]["pid"])] if s["worker"] else []
        pids += [("device", d["pid"]) for d in s["devices"]]
        pids += [("traffic-agent", a["pid"]) for a in self.host.traffic("status")["agents"]]
        for role, pid in pids:
            if not any(p["pid"] == pid for p in self.processes):
                self.processes.append({"role": role, "pid": pid})

    def run(self) -> dict:
        self.step(f"booting host: {self.nics} NIC(s), {self.timing.describe()}")
        self.host.start()
        self.done()
        self.step(f"guest traffic: {self.rate:g} frames/s per NIC")
        self.host.traffic("start", rate=self.rate, size=DEFAULT_SIZE)
        self.note_processes()
        time.sleep(WARMUP_S)
        self.done()
        runs = []
        for mode, request in self.modes:
            self.step(f"servicing: {mode}")
            result = self.host.service(**request)
            record = self.host.last_servicing
            window = self.host.traffic("status")["last_servicing"] or []
            self.note_processes()
            kv(log, logging.INFO, "demo servicing", mode=mode, blackout_ms=result["blackout_ms"],
               frames_lost=result["frames_lost"], total_ms=result["phases_ms"]["total"])
            time.sleep(AFTER_S)
            runs.append({"mode": mode, **result, "datapath_keepalive": mode == "keepalive+datapath",
                         "window_ns": record["window_ns"],
                         "prelaunch_ms": record["prelaunch_ms"],
                         "worker_save_phases_ms": record["worker_save_phases_ms"],
                         "worker_restore_phases_ms": record["worker_restore_phases_ms"],
                         "traffic": [_window_stats(w) for w in window], "expectations_failed": expectations(mode, result)})
            self.done()
        self.step("collecting traffic timelines")
        self.host.traffic("stop")
        overall = self.host.traffic("stats", settle_ms=200)["nics"]
        for run in runs:
            start, end = run["window_ns"]
            run["timeline"] = self.host.traffic("timeline", nic=0, bin_ms=BIN_MS,
                                                since_ns=start - PLOT_BEFORE_MS * 1_000_000,
                                                until_ns=end + PLOT_AFTER_MS * 1_000_000)
        self.done()
        return {"vfkeep_demo": 1, "timing": self.timing.to_dict(), "rate_fps": self.rate, "frame_size": DEFAULT_SIZE,
                "nics": self.nics, "prelaunch": self.host.config.prelaunch, "machine": machine(),
                "traffic": [_window_stats(s) for s in overall], "runs": runs}


def _window_stats(s: dict) -> dict:
    """Agent stats without the bulky per-request parts."""
    return {k: v for k, v in s.items() if k not in ("lost_seqs", "agent", "window")}


def plot(report: dict, path: pathlib.Path) -> None:
    """One panel per mode: delivered frames/s and RTT around the servicing, window and blackout shaded."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = report["runs"]
    fig, axes = plt.subplots(len(runs), 1, figsize=(10, 3.4 * len(runs)), sharex=True, squeeze=False)
    for ax, run in zip(axes[:, 0], runs):
        start, end = run["window_ns"]
        tl = run["timeline"]
        bins = tl["bins"]
        if bins:
            x = [(tl["t0_ns"] - start) / 1e6 + b["start_ms"] for b in bins]
            ax.step(x, [b["delivered"] * 1000 / BIN_MS for b in bins], where="post", color="tab:blue",
                    label="delivered frames/s")
            lost = [(xi, b["lost"] * 1000 / BIN_MS) for xi, b in zip(x, bins) if b["lost"]]
            if lost:
                ax.bar([p[0] for p in lost], [p[1] for p in lost], width=BIN_MS, align="edge", color="tab:red",
                       alpha=0.6, label="lost (by send time), frames/s")
            rtt_ax = ax.twinx()
            rtt_x = [xi for xi, b in zip(x, bins) if b["rtt_max_ms"] is not None]
            rtt_ax.plot(rtt_x, [b["rtt_max_ms"] for b in bins if b["rtt_max_ms"] is not None], ".",
                        color="tab:green", markersize=3, label="RTT max (ms)")
            rtt_ax.plot(rtt_x, [b["rtt_p50_ms"] for b in bins if b["rtt_max_ms"] is not None], "-",
                        color="tab:olive", linewidth=0.8, label="RTT p50 (ms)")
            rtt_ax.set_ylabel("RTT ms")
            rtt_ax.legend(loc="upper right", fontsize=8)
        ax.axvspan(0, (end - start) / 1e6, color="tab:orange", alpha=0.2, label="servicing (save → restored)")
        for t in run["traffic"]:
            if t.get("blackout_start_ns") is not None:
                ax.axvspan((t["blackout_start_ns"] - start) / 1e6, (t["blackout_end_ns"] - start) / 1e6,
                           fill=False, hatch="//", edgecolor="tab:red", linewidth=0, label=f"blackout nic {t['nic']}")
        paths = ",".join(sorted({n["restore_path"] for n in run["nics"]}))
        ax.set_title(f"{run['mode']}: restore path {paths}, blackout {_fmt(run['blackout_ms'])} ms, "
                     f"frames lost {run['frames_lost']}, servicing {run['phases_ms']['total']:.1f} ms", fontsize=10)
        ax.set_ylabel("frames/s (nic 0)")
        ax.legend(loc="upper left", fontsize=8)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("ms since the save request")
    fig.suptitle(f"vfkeep demo: {report['rate_fps']:g} frames/s of {report['frame_size']} B, "
                 f"{DeviceTiming.from_dict(report['timing']).describe()}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(report: dict) -> Table:
    runs = report["runs"]
    t = Table(title="servicing with and without MANA keepalive", title_justify="left", min_width=64,
              caption=f"{DeviceTiming.from_dict(report['timing']).describe()}, {report['rate_fps']:g} "
                      f"frames/s of {report['frame_size']} B "
                      f"per NIC, {report['nics']} NIC(s)", caption_justify="left")
    t.add_column("")
    for run in runs:
        t.add_column(run["mode"], justify="right")

    def row(label, fn):
        t.add_row(label, *[fn(r) for r in runs])

    row("restore path", lambda r: ",".join(sorted({n["restore_path"] for n in r["nics"]})))
    row("HWC re-established", lambda r: _yn(any(n["hwc_established"] for n in r["nics"])))
    row("device resets", lambda r: str(sum(n["device_reset"] for n in r["nics"])))
    row("blackout ms", lambda r: _fmt(r["blackout_ms"]))
    row("frames lost", lambda r: "-" if r["frames_lost"] is None else str(r["frames_lost"]))
    for phase in ("save", "handoff", "restore", "total"):
        row(f"{phase} ms", lambda r, p=phase: f"{r['phases_ms'][p]:.1f}")
    return t


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def _yn(v: bool) -> str:
    return "yes" if v else "no"


def _interrupt(signum, frame):
    raise KeyboardInterrupt


@click.command("demo")
@click.option("--out", default="demo-report", show_default=True, type=click.Path(file_okay=False),
              help="directory for timeline.png and results.json")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="also write the results JSON here")
@timing_options("realistic")
@click.option("--rate", type=click.FloatRange(min=1, max=200_000), default=5000, show_default=True,
              help="guest frames per second per NIC")
@click.option("--nics", type=click.IntRange(1, 8), default=1, show_default=True)
@click.option("--datapath-keepalive", "datapath", is_flag=True,
              help="add a third servicing that also keeps the vport's data-path queues (DESIGN D7)")
def demo_command(out, json_path, timing, hwc_latency_ms, flr_ms, rate, nics, datapath):
    """Guest traffic across a servicing with MANA keepalive and one without: table, plot, JSON."""
    console = Console()
    run_dir = tempfile.mkdtemp(prefix="vfkeep-demo-")
    vlog.setup("host", run_dir)
    signal.signal(signal.SIGTERM, _interrupt)
    t0 = time.monotonic()
    report = demo = None
    try:
        with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                      console=Console(stderr=True), transient=True) as progress:
            demo = Demo(run_dir, timing_from(timing, hwc_latency_ms, flr_ms), rate, nics, progress, datapath)
            try:
                report = demo.run()
            finally:
                demo.step("stopping the host")
                demo.host.stop()
            report["processes"] = demo.processes
            report["wall_s"] = round(time.monotonic() - t0, 1)
            demo.step("writing the report")
            out_dir = pathlib.Path(out)
            out_dir.mkdir(parents=True, exist_ok=True)
            plot(report, out_dir / "timeline.png")
            text = json.dumps(report, indent=1) + "\n"
            (out_dir / "results.json").write_text(text)
            if json_path:
                pathlib.Path(json_path).write_text(text)
    except KeyboardInterrupt:
        console.print(f"[yellow]interrupted; every process ended; logs in {run_dir}[/yellow]")
        raise SystemExit(130) from None
    except Exception as e:
        kv(log, logging.ERROR, "demo failed", error=repr(e))
        raise click.ClickException(f"demo failed: {e} (logs in {run_dir})") from e
    console.print(table(report))
    failed = [f"{r['mode']}: {msg}" for r in report["runs"] for msg in r["expectations_failed"]]
    for msg in failed:
        console.print(f"[red]unexpected:[/red] {msg}")
    if not failed:
        console.print("[green]as expected:[/green] keepalive kept the device (no reset, no ESTABLISH_HWC); "
                      "without it the HWC was re-established")
    console.print(f"wrote {out_dir / 'timeline.png'} and {out_dir / 'results.json'} in {report['wall_s']} s")
    if failed:
        console.print(f"logs kept in {run_dir}")
        raise SystemExit(1)
    shutil.rmtree(run_dir, ignore_errors=True)
