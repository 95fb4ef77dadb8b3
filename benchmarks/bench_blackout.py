"""Blackout and frame loss seen by the guest across servicing: keepalive vs reset paths, natural and realistic
device timing, prelaunch on and off, side by side in one run.

`python -m benchmarks.bench_blackout [--repeat N] [--rate FPS] [--out PATH]`

For each timing x prelaunch, one host with guest traffic at --rate frames/s, then --repeat rounds of one
servicing per path of bench_servicing.PATHS: keepalive; reset (host bit clear: clean shutdown, fresh init,
HWC re-established, no FLR); reset-flr (saved state the new worker does not restore: FLR, fresh init).
blackout_ms and frames_lost are the servicing result's, measured by the guest traffic agent. Reports median
and p95 per cell and the reset / keepalive ratios of the median blackout. Results: results/blackout.json,
results/blackout.png.
"""
from __future__ import annotations

import argparse
import sys
import time

from vfkeep import proc
from vfkeep.device.timing import PRESETS

from .args import at_least, report_path
from .bench_servicing import PATHS, service_rounds
from .traffic_host import TrafficHost, pyplot, save_plot, summary, write

TIMINGS = ("natural", "realistic")  # presets; each row carries its timing object


def run(repeat: int, rate: float) -> list[dict]:
    rows = []
    for timing in TIMINGS:
        for prelaunch in (True, False):
            with TrafficHost.running(1, prelaunch, PRESETS[timing]) as host:
                host.run_traffic(rate)
                host.service_measured("keepalive")  # warm-up
                samples = service_rounds(host.service_measured, repeat)
            for path, results in samples.items():
                row = {"timing": PRESETS[timing].to_dict(), "prelaunch": prelaunch, "path": path,
                       "blackout_ms": summary([r["blackout_ms"] for r in results]),
                       "frames_lost": summary([r["frames_lost"] for r in results]),
                       "total_ms": summary([r["phases_ms"]["total"] for r in results]),
                       "device_reset": any(n["device_reset"] for r in results for n in r["nics"]),
                       "hwc_established": any(n["hwc_established"] for r in results for n in r["nics"])}
                rows.append(row)
                print(f"{timing:9} prelaunch {'on ' if prelaunch else 'off'} {path:9} blackout median "
                      f"{row['blackout_ms']['median']:7.1f} p95 {row['blackout_ms']['p95']:7.1f} ms   lost median "
                      f"{row['frames_lost']['median']:6.0f} p95 {row['frames_lost']['p95']:6.0f}", flush=True)
    return rows


def ratios(rows: list[dict]) -> list[dict]:
    """Median blackout of each reset path over keepalive's, per timing x prelaunch."""
    out = []
    for timing in TIMINGS:
        for prelaunch in (True, False):
            cell = {r["path"]: r for r in rows if r["timing"]["preset"] == timing and r["prelaunch"] == prelaunch}
            base = cell["keepalive"]["blackout_ms"]["median"]
            out.append({"timing": timing, "prelaunch": prelaunch,
                        **{f"{p}_over_keepalive": round(cell[p]["blackout_ms"]["median"] / base, 2)
                           for p in PATHS if p != "keepalive"}})
    return out


def markdown(rows: list[dict]) -> str:
    lines = ["| timing | prelaunch | path | blackout median ms | blackout p95 ms | lost median | lost p95 | "
             "device reset | HWC re-established |", "|---|---|---|---:|---:|---:|---:|---|---|"]
    for r in rows:
        lines.append(f"| {r['timing']['preset']} | {'on' if r['prelaunch'] else 'off'} | {r['path']} | "
                     f"{r['blackout_ms']['median']:.1f} | {r['blackout_ms']['p95']:.1f} | "
                     f"{r['frames_lost']['median']:.0f} | {r['frames_lost']['p95']:.0f} | "
                     f"{'yes' if r['device_reset'] else 'no'} | {'yes' if r['hwc_established'] else 'no'} |")
    return "\n".join(lines)


def plot(rows: list[dict], path) -> None:
    """Median blackout (bars) with p95 (whisker) per configuration, one bar per servicing path."""
    plt = pyplot()
    configs = [(t, p) for t in TIMINGS for p in (True, False)]
    fig, ax = plt.subplots(figsize=(9, 4.2))
    width = 0.8 / len(PATHS)
    for i, name in enumerate(PATHS):
        cells = [next(r for r in rows if (r["timing"]["preset"], r["prelaunch"], r["path"]) == (t, p, name))
                 for t, p in configs]
        med = [c["blackout_ms"]["median"] for c in cells]
        p95 = [c["blackout_ms"]["p95"] - c["blackout_ms"]["median"] for c in cells]
        xs = [k + (i - (len(PATHS) - 1) / 2) * width for k in range(len(configs))]
        ax.bar(xs, med, width, yerr=[[0] * len(p95), p95], capsize=3, label=name)
    ax.set_xticks(range(len(configs)), [f"{t}\nprelaunch {'on' if p else 'off'}" for t, p in configs])
    ax.set_ylabel("guest blackout ms (median, whisker p95)")
    ax.set_title("Blackout across servicing: keepalive vs reset paths")
    save_plot(fig, ax, path, "y")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=at_least(1, int), default=20, help="servicings per path and configuration")
    ap.add_argument("--rate", type=float, default=5000, help="guest frames/s during the servicings")
    ap.add_argument("--out", type=report_path, help="JSON path (default benchmarks/results/blackout.json)")
    args = ap.parse_args(argv)
    t = time.monotonic()
    rows = run(args.repeat, args.rate)
    ratio = ratios(rows)
    path = write("blackout", {"repeat": args.repeat, "rate_fps": args.rate, "frame_size": 128,
                              "wall_s": round(time.monotonic() - t, 1), "rows": rows, "ratios": ratio}, args.out)
    plot(rows, path.with_suffix(".png"))
    print(markdown(rows))
    for r in ratio:
        print(f"{r['timing']:9} prelaunch {'on ' if r['prelaunch'] else 'off'} median blackout ratio: "
              + ", ".join(f"{k.replace('_over_keepalive', '')}/keepalive {v:.2f}x" for k, v in r.items()
                          if k.endswith("_over_keepalive")))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    proc.signals_interrupt()
    sys.exit(main())
