"""Data-path round trip throughput, this checkout and the previous data path side by side in one run.

`python -m benchmarks.bench_throughput [--previous REV|none] [--rates 10000,...] [--seconds S]
[--servicings N] [--out PATH]`

Two paths, measured one after the other on the same machine: `current` (this checkout) and `previous`, the
data path before issue 16's batching (`PREVIOUS_DATAPATH`, or --previous REV). The previous code runs from a
temporary `git worktree` of that commit (its host, worker, device and agent processes import it through
`cwd` and PYTHONPATH), so it is exactly the code of that commit, not a mode of this one. For each path: one
host (natural timing, loopback backend, one NIC); the guest traffic agent offers rising rates of 64 B and
1500 B frames until two rates in a row lose 0.1 % or more. Per rate: frames/s sent and delivered back,
Mbit/s delivered, loss, RTT, and the CPU each process used (device, worker, agent), also per delivered frame
(`cpu_us_per_frame`: CPU-time counters, the comparison that holds on a shared machine). Per path and size: the
highest delivered rate with under 0.1 % loss (`max_lossless_fps_64`, `max_lossless_fps_1500`), and at
1500 B its Mbit/s (`mbit_s_1500`); the previous path's are the same keys with `previous_` in front.
Then per path: frames lost (never delivered, counted once the backlog has drained; the servicing result's own
count, frames not back within 200 ms, is kept as `not_back_in_200ms`) across keepalive servicings (HWC kept,
vport queues recreated) at 10k, 50k and
100k frames/s (`keepalive_servicing`), across data-path keepalive servicings (`--datapath-keepalive`, the
vport's queues and buffers kept too) at 50k frames/s (`datapath_keepalive_servicing`, the host's default
4096-slot guest rings: with the agent's non-blocking sender, whose frames the full tx ring refuses, and with
its blocking one (`traffic start --backpressure`, this checkout only), whose frames wait in a guest queue and
which stops sending while that is full: `backpressured` counts the frames it did not send then, delayed by
the guest and not lost), and the CPU an idle device, worker and agent use (`idle_cpu_percent`). The load average is recorded before and
after each path: the machine may be shared. Everything on the path is Python processes, so this measures
the model, not a NIC. Results: results/throughput.json, results/throughput.png.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import pathlib
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

from vfkeep import proc
from vfkeep.device.timing import timing_from

from .args import report_path
from .traffic_host import TrafficHost, pyplot, save_plot, summary, write

#: main before issue 16 (batched data path): the "previous" path of the side-by-side comparison.
PREVIOUS_DATAPATH = "5b26661"
SIZES = (64, 1500)
RATES = (2500, 5000, 10000, 20000, 30000, 40000, 60000, 80000, 100000, 120000, 150000, 200000)
LOSSLESS = 0.001
SERVICE_RATES = (10000, 50000, 100000)
DATAPATH_SERVICE_RATES = (50000,)
#: The host's default guest rings (82 ms at 50k frames/s).
DEFAULT_RING_SLOTS = 4096
#: Data-path keepalive servicings with the non-blocking guest sender and the blocking one.
DATAPATH_SERVICE_SENDERS = (False, True)
IDLE_S = 5.0
REPO = pathlib.Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def checkout(rev: str) -> Iterator[pathlib.Path]:
    """A temporary detached git worktree of `rev`, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="vfkeep-previous-") as tmp:
        tree = pathlib.Path(tmp) / "tree"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "--quiet", str(tree), rev],
                       check=True)
        try:
            yield tree
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], check=False)


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Processes:
    """CPU time of the host's device, worker and traffic agent between two points."""

    def __init__(self, host: TrafficHost):
        st = host.status()
        agents = host.traffic("status")["agents"]
        self.pids = {"device": st["devices"][0]["pid"], "worker": st["worker"]["pid"], "agent": agents[0]["pid"]}
        self.mark()

    def mark(self) -> None:
        self.t0, self.c0 = time.monotonic(), {k: cpu_seconds(p) for k, p in self.pids.items()}

    def seconds(self) -> dict[str, float]:
        """CPU seconds each process used since `mark`."""
        return {k: cpu_seconds(p) - self.c0[k] for k, p in self.pids.items()}

    def percent(self) -> dict[str, float]:
        dt = time.monotonic() - self.t0
        return {k: round(100 * used / dt, 1) for k, used in self.seconds().items()}


def measure(host: TrafficHost, procs: Processes, rate: float, size: int, seconds: float) -> dict:
    host.run_traffic(rate, size, warmup_s=0.3)
    procs.mark()
    t0 = time.monotonic_ns()
    time.sleep(seconds)
    t1 = time.monotonic_ns()
    cpu, used = procs.percent(), procs.seconds()
    (s,) = host.traffic("stats", since_ns=t0, until_ns=t1, settle_ms=300)["nics"]
    dur = (t1 - t0) / 1e9
    delivered = s["sent"] - s["frames_lost"]
    per_frame = {k: round(1e6 * v / delivered, 2) if delivered else None for k, v in used.items()}
    return {"offered_fps": rate, "frame_bytes": size, "seconds": round(dur, 3), "sent_fps": round(s["sent"] / dur),
            "delivered_fps": round(delivered / dur), "mbit_per_s": round(delivered * size * 8 / dur / 1e6, 1),
            "loss": round(s["frames_lost"] / s["sent"], 5) if s["sent"] else None,
            "lost_tx_ring_full": s["lost_tx_ring_full"], "rtt_ms": s["rtt_ms"], "cpu_percent": cpu,
            "cpu_us_per_frame": per_frame,
            "loadavg_1m": round(os.getloadavg()[0], 2)}


def lossless(row: dict) -> bool:
    return row["loss"] is not None and row["loss"] < LOSSLESS


def sweep(host: TrafficHost, procs: Processes, size: int, rates: list[float], seconds: float) -> list[dict]:
    """Rising rates until two in a row are lossy."""
    rows, lossy = [], 0
    for rate in rates:
        row = measure(host, procs, rate, size, seconds)
        rows.append(row)
        print(f"  {size:>5} B offered {rate:>7.0f}/s: sent {row['sent_fps']:>7}/s delivered {row['delivered_fps']:>7}/s"
              f" {row['mbit_per_s']:>7.1f} Mbit/s loss {row['loss']:.3%} cpu {row['cpu_percent']} "
              f"us/frame {row['cpu_us_per_frame']} "
              f"load {row['loadavg_1m']}", flush=True)
        lossy = 0 if lossless(row) else lossy + 1
        if lossy == 2:
            break
    host.traffic("stop")
    time.sleep(0.3)  # let the rings drain
    return rows


def servicing_losses(code_dir: pathlib.Path | None, rates: tuple[int, ...], servicings: int, datapath: bool,
                     backpressure: bool = False) -> list[dict]:
    """Frames lost and blackout per keepalive servicing, per offered rate: on a host whose workers keep the
    vport's data path (`datapath`, DESIGN D7: `--datapath-keepalive`), or one whose vport queues are destroyed
    and recreated (the HWC kept, as OpenHCL); the guest's blocking sender (`backpressure`) or non-blocking one."""
    out = []
    args = ("--datapath-keepalive",) if datapath else ()
    with TrafficHost.running(1, True, timing_from("natural"), *args, "--ring-slots", str(DEFAULT_RING_SLOTS),
                             code_dir=code_dir) as host:
        for rate in rates:
            host.run_traffic(rate, 64, warmup_s=0.5, backpressure=backpressure)
            results = [servicing_counted(host) for _ in range(servicings)]
            row = {"offered_fps": rate, "frames_lost": [s["frames_lost"] for _, s in results],
                   "lost_tx_ring_full": [s["lost_tx_ring_full"] for _, s in results],
                   "backpressured": [s["backpressured"] for _, s in results],
                   "not_back_in_200ms": [r["frames_lost"] for r, _ in results],
                   "frame_bytes": 64, "datapath_kept": datapath, "ring_slots": DEFAULT_RING_SLOTS,
                   "backpressure": backpressure, "rtt_max_ms": [s["rtt_ms"]["max"] for _, s in results],
                   "blackout_ms": summary([r["blackout_ms"] for r, _ in results]),
                   "loadavg_1m": round(os.getloadavg()[0], 2)}
            out.append(row)
            print(f"  {'data-path ' if datapath else ''}keepalive servicing at {rate:>7}/s, "
                  f"{'blocking' if backpressure else 'non-blocking'} sender: frames lost {row['frames_lost']} "
                  f"(tx ring full {row['lost_tx_ring_full']}; not back within 200 ms {row['not_back_in_200ms']}; "
                  f"backpressured {row['backpressured']}) blackout median {row['blackout_ms']['median']:.1f} ms",
                  flush=True)
        host.traffic("stop")
    return out


def servicing_counted(host: TrafficHost) -> tuple[dict, dict]:
    """One keepalive servicing: its result (whose `frames_lost` counts what had not come back 200 ms after the
    window, late frames included) and, once the backlog has drained, the window's frames that never came back
    (the agent's stats with a 2 s settle; `lost_tx_ring_full` of them refused by the full guest ring) and the
    frames a blocking sender did not send from the servicing until its backlog drained (`backpressured`)."""
    before = host.traffic("status")["agents"][0].get("backpressured", 0)
    result = host.service_measured("keepalive")
    status = host.traffic("status")
    (window,) = status["last_servicing"]
    (stats,) = host.traffic("stats", since_ns=window["start_ns"], until_ns=window["end_ns"], settle_ms=2000)["nics"]
    stats["backpressured"] = status["agents"][0].get("backpressured", 0) - before
    return result, stats


def run_path(name: str, code_dir: pathlib.Path | None, rates: list[float], seconds: float, servicings: int) -> dict:
    print(f"== {name} data path ({code_dir or 'this checkout'}) ==", flush=True)
    load_before = os.getloadavg()
    rows: list[dict] = []
    with TrafficHost.running(1, True, timing_from("natural"), code_dir=code_dir) as host:
        host.run_traffic(1000, 64, warmup_s=0.3)  # spawns the agent
        procs = Processes(host)
        for size in SIZES:
            rows += sweep(host, procs, size, rates, seconds)
        procs.mark()
        time.sleep(IDLE_S)
        idle = procs.percent()
        print(f"  idle cpu % {idle}", flush=True)
    service = servicing_losses(code_dir, SERVICE_RATES, servicings, datapath=False) if servicings else []
    senders = DATAPATH_SERVICE_SENDERS if code_dir is None else (False,)  # older agents have no blocking sender
    kept = [row for blocking in senders
            for row in servicing_losses(code_dir, DATAPATH_SERVICE_RATES, servicings, True, blocking)] \
        if servicings else []
    out: dict = {"code": str(code_dir) if code_dir else "this checkout", "rows": rows, "idle_cpu_percent": idle,
                 "keepalive_servicing": service, "datapath_keepalive_servicing": kept,
                 "loadavg_before": [round(x, 2) for x in load_before],
                 "loadavg_after": [round(x, 2) for x in os.getloadavg()]}
    for size in SIZES:
        best = max((r for r in rows if r["frame_bytes"] == size and lossless(r)), key=lambda r: r["delivered_fps"],
                   default=None)
        out[f"max_lossless_fps_{size}"] = best["delivered_fps"] if best else None
        out[f"cpu_us_per_frame_at_max_lossless_{size}"] = best["cpu_us_per_frame"] if best else None
        if size == 1500:
            out["mbit_s_1500"] = best["mbit_per_s"] if best else None
        out[f"max_delivered_fps_{size}"] = max(r["delivered_fps"] for r in rows if r["frame_bytes"] == size)
    return out


def plot(paths: dict[str, dict], path: pathlib.Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    styles = {"current": "-", "previous": "--"}
    for name, result in paths.items():
        for size in SIZES:
            cells = [r for r in result["rows"] if r["frame_bytes"] == size]
            ax.plot([r["offered_fps"] for r in cells], [r["delivered_fps"] for r in cells], styles[name],
                    marker="o", label=f"{name}, {size} B")
    top = max(r["offered_fps"] for p in paths.values() for r in p["rows"])
    ax.plot([0, top], [0, top], "k:", label="offered")
    ax.set_xlabel("offered frames/s (guest)")
    ax.set_ylabel("frames/s delivered back to the guest")
    ax.set_title("Round trip guest → worker → device → worker → guest (loopback)")
    save_plot(fig, ax, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--previous", default=PREVIOUS_DATAPATH,
                    help=f"git revision of the previous data path (default {PREVIOUS_DATAPATH}); 'none' to skip it")
    ap.add_argument("--rates", default=",".join(map(str, RATES)), help="comma-separated offered frames/s, rising")
    ap.add_argument("--seconds", type=float, default=2.0, help="measurement window per rate and size")
    ap.add_argument("--servicings", type=int, default=3,
                    help="keepalive servicings per rate for the loss-across-servicing part (0: skip it)")
    ap.add_argument("--out", type=report_path, help="JSON path (default benchmarks/results/throughput.json)")
    args = ap.parse_args(argv)
    rates = [float(x) for x in args.rates.split(",")]
    t = time.monotonic()
    paths = {"current": run_path("current", None, rates, args.seconds, args.servicings)}
    if args.previous != "none":
        with checkout(args.previous) as tree:
            paths["previous"] = run_path("previous", tree, rates, args.seconds, args.servicings)
    result = {"timing": "natural", "backend": "loopback", "wall_s": round(time.monotonic() - t, 1),
              "previous_rev": None if args.previous == "none" else args.previous, "paths": paths}
    for name, p in paths.items():
        p["keepalive_lost"] = {str(r["offered_fps"]): r["frames_lost"] for r in p["keepalive_servicing"]}
        p["datapath_keepalive_lost"] = {f"{r['offered_fps']}/s, {'blocking' if r['backpressure'] else 'non-blocking'}"
                                        f" sender": r["frames_lost"] for r in p["datapath_keepalive_servicing"]}
    for key in ("max_lossless_fps_64", "max_lossless_fps_1500", "mbit_s_1500", "keepalive_lost",
                "datapath_keepalive_lost", "idle_cpu_percent", "cpu_us_per_frame_at_max_lossless_64"):
        result[key] = paths["current"][key]
        if "previous" in paths:
            result[f"previous_{key}"] = paths["previous"][key]
    if "previous" in paths and paths["previous"]["max_lossless_fps_64"]:
        result["lossless_64_speedup"] = round(result["max_lossless_fps_64"] / result["previous_max_lossless_fps_64"], 2)
    path = write("throughput", result, args.out)
    plot(paths, path.with_suffix(".png"))
    for name, p in paths.items():
        print(f"{name}: lossless 64 B {p['max_lossless_fps_64']} frames/s, 1500 B {p['max_lossless_fps_1500']} frames/s"
              f" ({p['mbit_s_1500']} Mbit/s); idle cpu % {p['idle_cpu_percent']}; lost per keepalive servicing "
              f"{p['keepalive_lost']}, per data-path keepalive servicing {p['datapath_keepalive_lost']}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    proc.signals_interrupt()
    sys.exit(main())
