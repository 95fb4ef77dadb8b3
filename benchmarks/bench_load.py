"""Frames lost across servicing vs offered guest load (1k, 10k, 50k frames/s), keepalive vs reset paths.

`python -m benchmarks.bench_load [--repeat N] [--rates 1000,10000,50000] [--timing realistic] [--hwc-latency-ms MS]
[--flr-ms MS] [--out PATH]`

One host (prelaunch on); per offered rate: the loss of a quiet window of the same length as a servicing
window first (what the data path loses at that load without any servicing), then --repeat rounds of one
servicing per path. Per servicing the guest's frames_lost and blackout, and how the loss splits between the
guest tx ring refusing frames while no worker runs and drops elsewhere (device, relay). Results:
results/loss_vs_load.json, results/loss_vs_load.png.
"""
from __future__ import annotations

import argparse
import functools
import sys
import time

from vfkeep import proc
from vfkeep.device.timing import DeviceTiming

from .args import at_least, report_path
from .bench_servicing import PATHS, add_timing_arguments, service_rounds, timing_of
from .traffic_host import TrafficHost, pyplot, save_plot, summary, write

QUIET_S = 1.0


def quiet_loss(host: TrafficHost, seconds: float) -> dict:
    """Loss and achieved rates in a window without servicing."""
    t0 = time.monotonic_ns()
    time.sleep(seconds)
    t1 = time.monotonic_ns()
    (s,) = host.traffic("stats", since_ns=t0, until_ns=t1, settle_ms=300)["nics"]
    return {"seconds": round((t1 - t0) / 1e9, 3), "sent_fps": round(s["sent"] * 1e9 / (t1 - t0)),
            "received_fps": round(s["received"] * 1e9 / (t1 - t0)), "frames_lost": s["frames_lost"],
            "lost_per_s": round(s["frames_lost"] * 1e9 / (t1 - t0), 1)}


def servicing_loss(host: TrafficHost, path: str) -> dict:
    """One servicing on `path`: its blackout and loss, and what the guest sent and lost to a full tx ring."""
    r = host.service_measured(path)
    (w,) = host.traffic("status")["last_servicing"]
    return {"blackout_ms": r["blackout_ms"], "frames_lost": r["frames_lost"], "sent": w["sent"],
            "lost_tx_ring_full": w["lost_tx_ring_full"]}


def run(rates: list[float], repeat: int, timing: DeviceTiming) -> list[dict]:
    rows = []
    with TrafficHost.running(1, True, timing) as host:
        for rate in rates:
            host.run_traffic(rate)
            quiet = quiet_loss(host, QUIET_S)
            host.service_measured("keepalive")  # warm-up at this rate
            samples = service_rounds(functools.partial(servicing_loss, host), repeat)
            for path, s in samples.items():
                row = {"rate_fps": rate, "path": path, "quiet": quiet,
                       "frames_lost": summary([x["frames_lost"] for x in s]),
                       "lost_tx_ring_full": summary([x["lost_tx_ring_full"] for x in s]),
                       "lost_elsewhere": summary([x["frames_lost"] - x["lost_tx_ring_full"] for x in s]),
                       "sent_in_window": summary([x["sent"] for x in s]),
                       "blackout_ms": summary([x["blackout_ms"] for x in s])}
                rows.append(row)
                print(f"{rate:>7.0f} fps {path:9} lost median {row['frames_lost']['median']:6.0f} p95 "
                      f"{row['frames_lost']['p95']:6.0f} (tx ring full {row['lost_tx_ring_full']['median']:.0f}) "
                      f"of {row['sent_in_window']['median']:.0f} sent; blackout median "
                      f"{row['blackout_ms']['median']:.1f} ms; quiet window loss {quiet['lost_per_s']}/s, "
                      f"delivered {quiet['received_fps']}/s", flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| offered frames/s | path | lost median | lost p95 | of which tx ring full | blackout median ms | "
             "quiet loss /s | delivered /s (quiet) |", "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['rate_fps']:.0f} | {r['path']} | {r['frames_lost']['median']:.0f} | "
                     f"{r['frames_lost']['p95']:.0f} | {r['lost_tx_ring_full']['median']:.0f} | "
                     f"{r['blackout_ms']['median']:.1f} | {r['quiet']['lost_per_s']:.0f} | "
                     f"{r['quiet']['received_fps']} |")
    return "\n".join(lines)


def plot(rows: list[dict], path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for name in PATHS:
        cells = [r for r in rows if r["path"] == name]
        x = [r["rate_fps"] for r in cells]
        ax.errorbar(x, [r["frames_lost"]["median"] for r in cells],
                    yerr=[[0] * len(cells), [r["frames_lost"]["p95"] - r["frames_lost"]["median"] for r in cells]],
                    marker="o", capsize=3, label=name)
    quiet = {r["rate_fps"]: r["quiet"]["frames_lost"] for r in rows}
    ax.plot(list(quiet), list(quiet.values()), "k:", marker="x", label=f"no servicing ({QUIET_S:g} s window)")
    ax.set_xscale("log")
    ax.set_yscale("symlog", linthresh=1)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("offered guest load, frames/s")
    ax.set_ylabel("frames lost per servicing (median, whisker p95)")
    ax.set_title("Loss across servicing vs offered load")
    save_plot(fig, ax, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=at_least(1, int), default=10, help="servicings per path and rate")
    ap.add_argument("--rates", default="1000,10000,50000", help="comma-separated offered frames/s")
    add_timing_arguments(ap)
    ap.add_argument("--out", type=report_path, help="JSON path (default benchmarks/results/loss_vs_load.json)")
    args = ap.parse_args(argv)
    rates = [float(x) for x in args.rates.split(",")]
    t = time.monotonic()
    rows = run(rates, args.repeat, timing_of(args))
    path = write("loss_vs_load", {"repeat": args.repeat, "timing": timing_of(args).to_dict(), "prelaunch": True, "frame_size": 128,
                                  "wall_s": round(time.monotonic() - t, 1), "rows": rows}, args.out)
    plot(rows, path.with_suffix(".png"))
    print(markdown(rows))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    proc.signals_interrupt()
    sys.exit(main())
