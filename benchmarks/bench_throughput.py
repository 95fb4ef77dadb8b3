"""Data-path round trip throughput: guest -> worker -> device -> worker -> guest, 64 B and 1500 B frames.

`python -m benchmarks.bench_throughput [--rates 5000,...] [--seconds S] [--out PATH]`

One host (natural timing: nothing is modelled on the data path anyway), loopback backend, the guest
traffic agent offering each rate in turn. Per offered rate and frame size, over a window of --seconds:
frames/s sent and delivered back to the guest, Mbit/s delivered (frame bytes, each direction), loss and RTT.
Summary per size: the highest delivered rate (saturation) and the highest offered rate delivered with under
0.1 % loss. Everything on the path is Python processes (agent, worker relay, device), so this measures the
model, not a NIC. Results: results/throughput.json, results/throughput.png.
"""
from __future__ import annotations

import argparse
import sys
import time

from vfkeep.device.timing import PRESETS

from .traffic_host import TrafficHost, pyplot, save_plot, write

SIZES = (64, 1500)
RATES = (5000, 10000, 20000, 30000, 40000, 60000)
LOSSLESS = 0.001


def measure(host: TrafficHost, rate: float, size: int, seconds: float) -> dict:
    host.run_traffic(rate, size, warmup_s=0.3)
    t0 = time.monotonic_ns()
    time.sleep(seconds)
    t1 = time.monotonic_ns()
    (s,) = host.traffic("stats", since_ns=t0, until_ns=t1, settle_ms=300)["nics"]
    dur = (t1 - t0) / 1e9
    delivered = s["sent"] - s["frames_lost"]
    return {"offered_fps": rate, "frame_bytes": size, "seconds": round(dur, 3), "sent_fps": round(s["sent"] / dur),
            "delivered_fps": round(delivered / dur), "mbit_per_s": round(delivered * size * 8 / dur / 1e6, 1),
            "loss": round(s["frames_lost"] / s["sent"], 5) if s["sent"] else None,
            "lost_tx_ring_full": s["lost_tx_ring_full"], "rtt_ms": s["rtt_ms"]}


def run(rates: list[float], seconds: float) -> tuple[list[dict], list[dict]]:
    rows = []
    with TrafficHost.running(1, True, PRESETS["natural"]) as host:
        for size in SIZES:
            for rate in rates:
                row = measure(host, rate, size, seconds)
                rows.append(row)
                print(f"{size:>5} B offered {rate:>7.0f}/s: sent {row['sent_fps']:>7}/s delivered "
                      f"{row['delivered_fps']:>7}/s {row['mbit_per_s']:>7.1f} Mbit/s loss {row['loss']:.2%} "
                      f"RTT p50 {row['rtt_ms']['p50'] or 0:.2f} ms", flush=True)
            host.traffic("stop")
            time.sleep(0.3)  # let the rings drain between sizes
    summary = []
    for size in SIZES:
        cells = [r for r in rows if r["frame_bytes"] == size]
        best = max(cells, key=lambda r: r["delivered_fps"])
        lossless = [r for r in cells if r["loss"] is not None and r["loss"] < LOSSLESS]
        top = max(lossless, key=lambda r: r["delivered_fps"]) if lossless else None
        summary.append({"frame_bytes": size, "max_delivered_fps": best["delivered_fps"],
                        "max_mbit_per_s": best["mbit_per_s"],
                        "lossless_fps": top["delivered_fps"] if top else None,
                        "lossless_mbit_per_s": top["mbit_per_s"] if top else None})
    return rows, summary


def plot(rows: list[dict], path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for size in SIZES:
        cells = [r for r in rows if r["frame_bytes"] == size]
        ax.plot([r["offered_fps"] for r in cells], [r["delivered_fps"] for r in cells], marker="o",
                label=f"{size} B delivered")
    top = max(r["offered_fps"] for r in rows)
    ax.plot([0, top], [0, top], "k:", label="offered")
    ax.set_xlabel("offered frames/s (guest)")
    ax.set_ylabel("frames/s delivered back to the guest")
    ax.set_title("Round trip guest → worker → device → worker → guest (loopback)")
    save_plot(fig, ax, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rates", default=",".join(map(str, RATES)), help="comma-separated offered frames/s")
    ap.add_argument("--seconds", type=float, default=2.0, help="measurement window per rate and size")
    ap.add_argument("--out", help="JSON path (default benchmarks/results/throughput.json)")
    args = ap.parse_args(argv)
    t = time.monotonic()
    rows, summary = run([float(x) for x in args.rates.split(",")], args.seconds)
    path = write("throughput", {"timing": PRESETS["natural"].to_dict(), "backend": "loopback", "wall_s": round(time.monotonic() - t, 1),
                                "rows": rows, "summary": summary}, args.out)
    plot(rows, path.with_suffix(".png"))
    for s in summary:
        print(f"{s['frame_bytes']:>5} B: max {s['max_delivered_fps']} frames/s ({s['max_mbit_per_s']} Mbit/s); "
              f"under {LOSSLESS:.1%} loss {s['lossless_fps']} frames/s ({s['lossless_mbit_per_s']} Mbit/s)")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
