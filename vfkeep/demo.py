"""`vfkeep demo`: guest traffic across the four servicing paths, side by side, each the median of several servicings.

One host in a temporary run dir (default: one NIC, realistic device timing, data-path keepalive available),
a traffic agent per NIC, then `--servicings` rounds of one servicing per path of `servicing_paths`
(reset-flr, reset, keepalive, keepalive+datapath), interleaved so every path sees the same machine load.
What each servicing cost the guest comes from the agents (blackout, frames lost); what it did to the
device comes from the device itself (HWC requests, FLRs, command log). Output: a table, a verdict that
compares the medians and says plainly when the expected ordering did not hold (and the likely cause),
`<out>/timeline.png` (delivery around each path's median servicing) and `<out>/results.json`. Exits 1 when
a servicing did not take its path. With `--nvme N` the host also has N NVMe disks with guest disk IO running
throughout (1000 IO/s, queue depth 8); each path takes the disks along (`servicing_paths.request`), the table adds the
IO blackout per path, and every block is read back and verified at the end.
"""
from __future__ import annotations

import json
import logging
import os
import pathlib
import platform
import resource
import shutil
import statistics
import tempfile
import time

import click
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from . import __version__
from . import log as vlog
from . import proc
from .cli import FloatRange, one_line, output_dir, output_file
from .device.timing import DeviceTiming, timing_from, timing_options
from .host import render
from .host.traffic import DEFAULT_SIZE
from .host.vmm import Host, HostConfig
from .log import kv
from .servicing_paths import ORDER, request, unexpected, wait_steady

log = logging.getLogger("vfkeep.demo")

#: Shortest blackout first: what each path avoids should show as a shorter blackout than the next.
EXPECTED_ORDER = ("keepalive+datapath", "keepalive", "reset", "reset-flr")
DEFAULT_SERVICINGS = 5
WARMUP_S = 0.5
#: Plotted around each path's median servicing; also the pause between servicings, so its plot shows
#: steady traffic before and the recovery after.
PLOT_BEFORE_MS = 150
PLOT_AFTER_MS = 300
BIN_MS = 5
#: Progress steps besides one per servicing.
STEPS = 4
#: Guest disk IO of `--nvme`: requests per second and in flight per disk (paced: disk IO as fast as it goes
#: would take the CPU the NIC's relay needs).
DISK_RATE = 1000
DISK_QD = 8
#: CPU time other work took during the demo, per CPU, above which its medians are not trusted (the demo's own
#: processes are not counted: they are what is measured).
CONTENDED_LOAD_PER_CPU = 0.5


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"platform": platform.platform(), "machine": platform.machine(), "cpu": cpu, "cpus": os.cpu_count(),
            "python": platform.python_version(), "vfkeep": __version__}


def cpu_seconds() -> tuple[float, float]:
    """(CPU seconds the whole machine has been busy, including time the hypervisor gave to others (steal);
    CPU seconds this process and its reaped children used): two of them bracket the demo's run so that
    `other_cpus` can tell other work's load from the demo's own."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    busy = (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    own = sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                resource.getrusage(resource.RUSAGE_CHILDREN)))
    return busy, own


def other_cpus(before: tuple[float, float], after: tuple[float, float], wall_s: float) -> float:
    """CPUs' worth of work other than the demo's during it (average over `wall_s`): what competed with its
    servicings for the CPUs (the load average before the demo says only what ran in the minute before it)."""
    other = (after[0] - before[0]) - (after[1] - before[1])
    return max(0.0, other / wall_s) if wall_s > 0 else 0.0


class Demo:
    def __init__(self, run_dir: str, timing: DeviceTiming, rate: float, nics: int, servicings: int,
                 progress: Progress, nvme: int = 0):
        # Data-path keepalive on: the pool gets room for the kept vports (fixed at boot); the requests of
        # servicing_paths choose per servicing whether the next worker keeps its vport.
        self.host = Host(HostConfig(run_dir=run_dir, nics=nics, timing=timing, datapath_keepalive=True, nvme=nvme))
        self.rate, self.nics, self.timing, self.servicings, self.nvme = rate, nics, timing, servicings, nvme
        self.progress = progress
        self.task = progress.add_task("starting", total=STEPS + servicings * len(ORDER))
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
        if self.nvme:
            pids += [("nvme-device", d["pid"]) for d in s["nvme_devices"]]
            pids += [("disk-agent", a["pid"]) for a in self.host.disk("status")["agents"]]
        for role, pid in pids:
            if not any(p["pid"] == pid for p in self.processes):
                self.processes.append({"role": role, "pid": pid})

    def run(self) -> dict:
        self.step(f"booting host: {self.nics} NIC(s), {self.timing.describe()}")
        self.host.start()
        self.done()
        self.step(f"guest traffic: {self.rate:g} frames/s per NIC")
        self.host.traffic("start", rate=self.rate, size=DEFAULT_SIZE)
        if self.nvme:
            self.host.disk("start", rate=DISK_RATE, qd=DISK_QD)
        self.note_processes()
        time.sleep(WARMUP_S)
        self.done()
        samples: dict[str, list[dict]] = {mode: [] for mode in ORDER}
        for i in range(self.servicings):
            for mode in ORDER:
                self.step(f"servicing {i + 1}/{self.servicings}: {mode}")
                samples[mode].append(self.service(mode))
                self.done()
        self.step("collecting traffic timelines")
        self.host.traffic("stop")
        overall = self.host.traffic("stats", settle_ms=200)["nics"]
        disks = None
        if self.nvme:
            self.step("verifying every disk block written")
            self.host.disk("verify")
            disks = [{k: v for k, v in d.items() if k != "last_servicing"} for d in self.host.disk("stats")["disks"]]
        runs = [summarize(mode, samples[mode]) for mode in ORDER]
        for run in runs:
            start, end = run["median_servicing"]["window_ns"]
            run["timeline"] = self.host.traffic("timeline", nic=0, bin_ms=BIN_MS,
                                                since_ns=start - PLOT_BEFORE_MS * 1_000_000,
                                                until_ns=end + PLOT_AFTER_MS * 1_000_000)
        self.done()
        return {"vfkeep_demo": 2, "timing": self.timing.to_dict(), "rate_fps": self.rate, "frame_size": DEFAULT_SIZE,
                "nics": self.nics, "nvme": self.nvme, "disk_qd": DISK_QD if self.nvme else None,
                "disk_rate": DISK_RATE if self.nvme else None,
                "servicings": self.servicings, "prelaunch": self.host.config.prelaunch,
                "machine": machine(), "traffic": [_window_stats(s) for s in overall], "disks": disks, "runs": runs}

    def service(self, mode: str) -> dict:
        """One servicing on `mode`'s path, then until the backlog it left has drained (else the next one's
        blackout would include draining it) and at least the plot's margins have passed."""
        result = self.host.service(**request(mode, nvme=bool(self.nvme)))
        record = self.host.last_servicing
        window = self.host.traffic("status")["last_servicing"] or []
        self.note_processes()
        kv(log, logging.INFO, "demo servicing", mode=mode, blackout_ms=result["blackout_ms"],
           frames_lost=result["frames_lost"], io_blackout_ms=result["io_blackout_ms"], io_errors=result["io_errors"],
           total_ms=result["phases_ms"]["total"])
        waited = wait_steady(self.host.traffic, self.rate)
        time.sleep(max(0.0, (PLOT_BEFORE_MS + PLOT_AFTER_MS) / 1000 - waited))
        return {"result": result, "window_ns": record["window_ns"], "prelaunch_ms": record["prelaunch_ms"],
                "worker_save_phases_ms": record["worker_save_phases_ms"],
                "worker_restore_phases_ms": record["worker_restore_phases_ms"],
                "traffic": [_window_stats(w) for w in window]}


def _window_stats(s: dict) -> dict:
    """Agent stats without the bulky per-request parts."""
    return {k: v for k, v in s.items() if k not in ("lost_seqs", "agent", "window")}


def _median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize(mode: str, samples: list[dict]) -> dict:
    """One path's servicings: medians (blackout, device counts, phases), every value, and its median servicing
    (the one whose blackout is the lower median) for the timeline."""
    results = [s["result"] for s in samples]
    blackouts = [r["blackout_ms"] for r in results]
    lost = [r["frames_lost"] for r in results]
    hwc = [sum(n["hwc_requests"] for n in r["nics"]) for r in results]
    resets = [sum(n["device_resets"] for n in r["nics"]) for r in results]
    ranked = sorted(range(len(samples)), key=lambda i: (blackouts[i] is None, blackouts[i] or 0.0))
    median_i = ranked[(len([b for b in blackouts if b is not None]) - 1) // 2] if any(
        b is not None for b in blackouts) else 0
    return {
        "mode": mode, "servicings": len(samples),
        "blackout_ms": _median(blackouts), "blackout_ms_all": blackouts,
        "measured": len([b for b in blackouts if b is not None]),
        "frames_lost": None if all(v is None for v in lost) else sum(v for v in lost if v is not None),
        "frames_lost_all": lost,
        "io_blackout_ms": _median([r["io_blackout_ms"] for r in results]),
        "io_blackout_ms_all": [r["io_blackout_ms"] for r in results],
        "io_errors": None if all(r["io_errors"] is None for r in results) else sum(r["io_errors"] or 0
                                                                                   for r in results),
        "nvme_path": ",".join(sorted({n["restore_path"] for r in results for n in r["nvme"]})) or None,
        "hwc_requests": _median(hwc), "hwc_requests_all": hwc,
        "device_resets": _median(resets), "device_resets_all": resets,
        "restore_path": ",".join(sorted({n["restore_path"] for r in results for n in r["nics"]})),
        "hwc_established": any(n["hwc_established"] for r in results for n in r["nics"]),
        "phases_ms": {k: _median([r["phases_ms"][k] for r in results]) for k in ("save", "handoff", "restore", "total")},
        "timing": results[0]["timing"],
        "expectations_failed": [f"servicing {i + 1}: {msg}" for i, r in enumerate(results) for msg in unexpected(mode, r)],
        "median_servicing": {"index": median_i, **samples[median_i]},
        "results": results,
    }


# -- verdict ----------------------------------------------------------------------------------------------------
def verdict(runs: list[dict], timing: DeviceTiming, busy: float, cpus: int) -> tuple[bool, list[str]]:
    """Compare the median blackouts in EXPECTED_ORDER. (True, [summary]) when every path was shorter than the
    next; else (False, [summary, one line per pair that did not hold, with its likely cause]). `busy`: CPUs'
    worth of other work during the demo (`other_cpus`)."""
    by_mode = {r["mode"]: r for r in runs}
    order = [m for m in EXPECTED_ORDER if by_mode.get(m, {}).get("blackout_ms") is not None]
    chain = " < ".join(f"{m} {by_mode[m]['blackout_ms']:.1f} ms" for m in order)
    reversed_pairs = [(a, b) for a, b in zip(order, order[1:])
                      if by_mode[a]["blackout_ms"] >= by_mode[b]["blackout_ms"]]
    if not reversed_pairs:
        ratios = [f"{m} / {order[0]} {by_mode[m]['blackout_ms'] / by_mode[order[0]]['blackout_ms']:.1f}x"
                  for m in order[1:] if by_mode[order[0]]["blackout_ms"] > 0]
        lines = [f"expected ordering held (median blackout): {chain}" + (f"; {', '.join(ratios)}" if ratios
                                                                              else "")]
        if busy >= CONTENDED_LOAD_PER_CPU * cpus:
            lines.append(f"the machine was busy (other work used {busy:.1f} of {cpus} CPUs during the demo): the "
                         "ratios are noisy")
        return True, lines + unmeasured(runs)
    lines = ["expected ordering did NOT hold (median blackout; expected " + " < ".join(order) + ")"]
    for a, b in reversed_pairs:
        ra, rb = by_mode[a], by_mode[b]
        lines.append(f"{a} ({ra['blackout_ms']:.1f} ms) was not shorter than {b} ({rb['blackout_ms']:.1f} ms): "
                     + likely_cause(ra, rb, timing, busy, cpus))
    return False, lines + unmeasured(runs)


def unmeasured(runs: list[dict]) -> list[str]:
    """One line per path with servicings the guest traffic did not measure (a stats call failed or nothing was
    sent in the window): its median and frames lost cover only the measured ones."""
    lines = []
    for r in runs:
        values = r["blackout_ms_all"]
        missing = len([v for v in values if v is None])
        if missing:
            lines.append(f"{r['mode']}: {missing} of {len(values)} servicings not measured (no traffic numbers for "
                         "the window, see host.log): its median and frames lost cover the other "
                         f"{len(values) - missing}")
    return lines


def likely_cause(fast: dict, slow: dict, timing: DeviceTiming, busy: float, cpus: int) -> str:
    """Why `fast` (expected shorter) was not, from the run itself: the device time the timing model puts between
    the two paths (their device counters × the timing parameters) against the run-to-run spread of their
    blackouts; then other work's CPU load during the demo; else unexplained."""
    terms = [(slow[key] - fast[key], name, cost) for key, name, cost in (
        ("device_resets", "FLR", timing.flr_ms), ("hwc_requests", "HWC requests", timing.hwc_latency_ms))
        if slow[key] is not None and fast[key] is not None and slow[key] != fast[key]]
    modelled = sum(n * cost for n, _, cost in terms)
    model = " ".join(f"{'−' if n < 0 else '+' if i else ''} {abs(n):g} {name} × {cost:g} ms"
                     for i, (n, name, cost) in enumerate(terms)).strip() or "no device work apart"
    spread, widest = max(((max(v) - min(v), r["mode"]) for r in (fast, slow)
                          if (v := [b for b in r["blackout_ms_all"] if b is not None])), key=lambda s: s[0])
    if modelled < 0:
        return (f"the timing model itself makes {slow['mode']} {-modelled:.1f} ms shorter ({model}; "
                f"{timing.describe()})")
    if modelled <= spread:
        return (f"the modelled difference {modelled:.1f} ms ({model}) is within the measured spread {spread:.1f} ms "
                f"(min–max of {widest}): try more servicings (--servicings)")
    if busy >= CONTENDED_LOAD_PER_CPU * cpus:
        return (f"likely CPU contention: other work used {busy:.1f} of {cpus} CPUs during the demo (the modelled "
                f"difference {modelled:.1f} ms exceeds the measured spread {spread:.1f} ms)")
    return (f"unexplained: the modelled difference {modelled:.1f} ms ({model}) exceeds the measured spread "
            f"{spread:.1f} ms and other work used only {busy:.1f} of {cpus} CPUs; see the phases in results.json "
            "and host.log")


# -- output -----------------------------------------------------------------------------------------------------
def plot(report: dict, path: pathlib.Path) -> None:
    """One panel per path (shared axes): delivered frames/s around its median servicing, the offered rate,
    the servicing window (band on top, edges) and the blackout (hatched) both visible."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = report["runs"]
    fig, axes = plt.subplots(len(runs), 1, figsize=(10, 2.6 * len(runs)), sharex=True, sharey=True, squeeze=False)
    for ax, run in zip(axes[:, 0], runs):
        med = run["median_servicing"]
        start, end = med["window_ns"]
        end_ms = (end - start) / 1e6
        tl = run["timeline"]
        if tl["bins"]:
            x = [(tl["t0_ns"] - start) / 1e6 + b["start_ms"] for b in tl["bins"]]
            ax.step(x, [b["delivered"] * 1000 / BIN_MS for b in tl["bins"]], where="post", color="tab:blue",
                    label="delivered frames/s")
            lost = [(xi, b["lost"] * 1000 / BIN_MS) for xi, b in zip(x, tl["bins"]) if b["lost"]]
            if lost:
                ax.bar([p[0] for p in lost], [p[1] for p in lost], width=BIN_MS, align="edge", color="tab:red",
                       alpha=0.6, label="lost (by send time), frames/s")
        ax.axhline(report["rate_fps"], color="gray", linestyle="--", linewidth=1, label="offered frames/s")
        for t in med["traffic"]:
            if t.get("blackout_start_ns") is not None:
                ax.axvspan((t["blackout_start_ns"] - start) / 1e6, (t["blackout_end_ns"] - start) / 1e6,
                           facecolor="none", hatch="//", edgecolor="tab:red", linewidth=0, alpha=0.5,
                           label="guest blackout")
        ax.axvspan(0, end_ms, ymin=0.92, ymax=1.0, color="tab:orange", alpha=0.8,
                   label="servicing (save request → NICs up)")
        for edge in (0, end_ms):
            ax.axvline(edge, color="tab:orange", linewidth=1.2)
        ax.set_title(f"{run['mode']}: median of {_measured_count(run)}: blackout {_fmt(run['blackout_ms'])} ms, "
                     f"{_count(run['hwc_requests'])} HWC requests, {_count(run['device_resets'])} FLR, "
                     f"frames lost {_count(run['frames_lost'])} in all", fontsize=9)
        ax.set_ylabel("frames/s (nic 0)")
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylim(bottom=0)
    axes[-1, 0].set_xlabel("ms since the save request")
    fig.suptitle(f"vfkeep demo: {report['rate_fps']:g} frames/s of {report['frame_size']} B, "
                 f"{DeviceTiming.from_dict(report['timing']).describe()}", fontsize=11)
    handles = {label: h for ax in axes[:, 0] for h, label in zip(*ax.get_legend_handles_labels())}
    fig.legend(handles.values(), handles.keys(), loc="upper center", ncol=len(handles), fontsize=8,
               bbox_to_anchor=(0.5, 0.965), frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(report: dict) -> Table:
    runs = report["runs"]
    t = Table(title=f"servicing paths side by side: per servicing, median of {report['servicings']} "
                    "(interleaved); frames lost: all of them",
              title_justify="left", min_width=64,
              caption=f"{DeviceTiming.from_dict(report['timing']).describe()}, {report['rate_fps']:g} frames/s of "
                      f"{report['frame_size']} B per NIC, {report['nics']} NIC(s)"
                      + (f", {report['nvme']} NVMe disk(s): {report['disk_rate']} IO/s at queue depth "
                         f"{report['disk_qd']}" if report.get("nvme")
                         else "") + f"; other work used {report['other_cpus']:.1f} of {report['machine']['cpus']} "
                      "CPUs during the demo",
              caption_justify="left")
    t.add_column("", no_wrap=True)
    for run in runs:
        t.add_column(run["mode"], justify="right", no_wrap=True)
    base = next((r["blackout_ms"] for r in runs if r["mode"] == EXPECTED_ORDER[0]), None)

    def row(label, fn):
        t.add_row(label, *[fn(r) for r in runs])

    row("restore path", lambda r: r["restore_path"])
    row("HWC re-established", lambda r: "yes" if r["hwc_established"] else "no")
    row("HWC requests", lambda r: _count(r["hwc_requests"]))
    row("device resets", lambda r: _count(r["device_resets"]))
    row("blackout ms", lambda r: _fmt(r["blackout_ms"]) + _of_measured(r))
    row("  min–max", lambda r: _range(r["blackout_ms_all"]))
    row("  / kp+datapath", lambda r: "-" if not base or r["blackout_ms"] is None
        else f"{r['blackout_ms'] / base:.1f}x")
    row("frames lost", lambda r: _count(r["frames_lost"]) + _of_measured(r))
    if report.get("nvme"):
        row("disk path", lambda r: r["nvme_path"] or "-")
        row("disk IO blackout ms", lambda r: _fmt(r["io_blackout_ms"]))
        row("  min–max", lambda r: _range(r["io_blackout_ms_all"]))
        row("disk IO errors", lambda r: _count(r["io_errors"]))
    for phase in ("save", "handoff", "restore"):
        row(f"{phase} ms", lambda r, p=phase: _fmt(r["phases_ms"][p]))
    return t


def _measured_count(run: dict) -> str:
    """'5', or '4/5' when one servicing was not measured."""
    n = len(run["blackout_ms_all"])
    m = len([v for v in run["blackout_ms_all"] if v is not None])
    return str(n) if m == n else f"{m}/{n}"


def _of_measured(run: dict) -> str:
    """' (4/5 measured)' when the guest traffic measured only some of the path's servicings."""
    count = _measured_count(run)
    return f" ({count} measured)" if "/" in count else ""


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def _count(v: float | None) -> str:
    return "-" if v is None else f"{v:g}"


def _range(values: list) -> str:
    values = [v for v in values if v is not None]
    return f"{min(values):.0f}–{max(values):.0f}" if values else "-"


def write_report(report: dict, out_dir: pathlib.Path, json_path: str | None,
                 names: tuple[str, str] = ("timeline.png", "results.json"), draw=None) -> None:
    """OUT/timeline.png, OUT/results.json (`names`) and the --json copy; `draw(report, path)` makes the picture
    (this module's `plot` unless given: the network demo has its own)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (draw or plot)(report, out_dir / names[0])
    text = json.dumps(report, indent=1) + "\n"
    (out_dir / names[1]).write_text(text)
    if json_path:
        pathlib.Path(json_path).write_text(text)


@click.command("demo")
@click.option("--out", default="demo-report", show_default=True, type=click.Path(file_okay=False), callback=output_dir,
              help="directory for timeline.png and results.json")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), callback=output_file,
              help="also write the results JSON here")
@timing_options("realistic")
@click.option("--rate", type=FloatRange(min=1, max=200_000), default=5000, show_default=True,
              help="guest frames per second per NIC")
@click.option("--nics", type=click.IntRange(1, 8), default=1, show_default=True)
@click.option("--nvme", type=click.IntRange(0, 4), default=0, show_default=True,
              help="NVMe disks with guest disk IO (1000 IO/s, queue depth 8) across the same servicings; the table "
                   "adds the disk IO blackout per path")
@click.option("--servicings", type=click.IntRange(1, 100), default=DEFAULT_SERVICINGS, show_default=True,
              help="servicings per path (the table shows medians)")
@click.option("--network", is_flag=True, help="instead: real ping and TCP from a guest network namespace across "
              "every servicing path; writes OUT/network.png and OUT/network.json (needs root; vfkeep/demo_net.py)")
def demo_command(out, json_path, timing, hwc_latency_ms, flr_ms, rate, nics, nvme, servicings, network):
    """Guest traffic across reset-flr, reset, keepalive and keepalive+datapath servicings: table, verdict,
    plot, JSON."""
    if network:
        from .demo_net import network_demo
        return network_demo(out, json_path, timing_from(timing, hwc_latency_ms, flr_ms), machine())
    console = render.console()  # lines are not wrapped when piped (a table still fits its width)
    timing = timing_from(timing, hwc_latency_ms, flr_ms)
    load = os.getloadavg()[0]
    proc.signals_interrupt()  # (before the run dir exists: an interrupt from here on removes it)
    t0, cpu_before = time.monotonic(), cpu_seconds()
    report = demo = run_dir = None
    try:
        run_dir = tempfile.mkdtemp(prefix="vfkeep-demo-")
        vlog.setup("host", run_dir)
        err = Console(stderr=True)  # (not on a terminal: no progress at all, not even the empty line it leaves)
        with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                      console=err, transient=True, disable=not err.is_terminal) as progress:
            demo = Demo(run_dir, timing, rate, nics, servicings, progress, nvme=nvme)
            try:
                report = demo.run()
            finally:
                demo.step("stopping the host")
                demo.host.stop()
            report["processes"] = demo.processes
            report["wall_s"] = round(time.monotonic() - t0, 1)
            report["load_average_before"] = round(load, 2)
            report["load_average_after"] = round(os.getloadavg()[0], 2)
            # rounded as the table's caption shows it (rounding twice gave "3.5" there and "3.6" in the verdict)
            report["other_cpus"] = round(other_cpus(cpu_before, cpu_seconds(), time.monotonic() - t0), 2)
            held, lines = verdict(report["runs"], timing, report["other_cpus"], report["machine"]["cpus"] or 1)
            report["verdict"] = {"ordering_held": held, "lines": lines}
            demo.step("writing the report")
            out_dir = pathlib.Path(out)
            try:
                write_report(report, out_dir, json_path)
            except OSError as e:  # (checked up front, `output_dir`: e.g. the disk filled up meanwhile)
                shutil.rmtree(run_dir, ignore_errors=True)  # every process has ended; its logs do not explain it
                raise click.ClickException(f"cannot write the report to {out_dir}: {e.strerror or e}") from e
    except KeyboardInterrupt as e:
        if run_dir is not None:
            shutil.rmtree(run_dir, ignore_errors=True)  # nothing to look at: the user stopped it
        e.note = "every process ended, temporary run dir removed"
        raise
    except click.ClickException:
        raise
    except Exception as e:
        kv(log, logging.ERROR, "demo failed", error=repr(e))
        raise click.ClickException(f"{one_line(e)} (see {os.path.join(run_dir, 'host.log')})") from e
    console.print(table(report))
    held, lines = report["verdict"]["ordering_held"], report["verdict"]["lines"]
    console.print(("[green]verdict:[/green] " if held and len(lines) == 1 else "[yellow]verdict:[/yellow] ")
                  + lines[0])
    for line in lines[1:]:
        console.print(f"  [yellow]•[/yellow] {line}")
    failed = [f"{r['mode']}: {msg}" for r in report["runs"] for msg in r["expectations_failed"]]
    for msg in failed:
        console.print(f"[red]unexpected:[/red] {msg}")
    for d in report.get("disks") or []:
        if d["errors"] or d["verify_errors"] or d["duplicates"]:
            failed.append(f"disk {d['disk']}: {d['errors']} IO errors, {d['verify_errors']} bad blocks, "
                          f"{d['duplicates']} duplicate completions")
            console.print(f"[red]unexpected:[/red] {failed[-1]}")
    if not failed:
        console.print("every servicing took its path: keepalive kept the device (no FLR, no ESTABLISH_HWC); "
                      "reset re-established the HWC; reset-flr reset the device")
        for d in report.get("disks") or []:
            console.print(f"disk {d['disk']}: {d['completed']} requests, 0 errors, every one of "
                          f"{d['chunks_written']} chunks written read back and verified")
    console.print(f"wrote {out_dir / 'timeline.png'} and {out_dir / 'results.json'}; the demo took "
                  f"{proc.age_s():.1f} s in all")
    if failed:
        more = f" (and {len(failed) - 1} more above)" if len(failed) > 1 else ""
        raise click.ClickException(f"unexpected: {failed[0]}{more} (see {os.path.join(run_dir, 'host.log')})")
    shutil.rmtree(run_dir, ignore_errors=True)
