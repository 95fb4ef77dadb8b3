"""Run every benchmark and summarise them in one markdown file (the README's "Measurements").

`python -m benchmarks.run_all [--quick]` (`make bench`)

(a) bench_blackout: guest blackout and loss, keepalive vs reset paths, natural/realistic, prelaunch on/off;
(b) bench_load: loss across servicing at 1k, 10k, 50k frames/s; (c) bench_throughput: round trip frames/s and
Mbit/s at 64 B and 1500 B; (d) bench_servicing: servicing phase times for 1, 2, 4, 8 NICs; (e) bench_sensitivity:
blackout of reset-flr, reset, keepalive and keepalive+datapath over HWC latency x FLR, against each path's floor;
(f) bench_nvme: NVMe IO blackout keepalive vs reset with IO running (driver handover and whole servicings), IOPS.
JSON and PNGs go to benchmarks/results/ (with --quick, fewer repetitions, to benchmarks/results/quick/ so the full
results stay), then summary.md there.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

from vfkeep import proc
from vfkeep.device.timing import DeviceTiming

from . import bench_blackout, bench_load, bench_nvme, bench_sensitivity, bench_servicing, bench_throughput
from .traffic_host import RESULTS, pyplot, save_plot

FULL = {
    "blackout": ["--repeat", "20"],
    "loss_vs_load": ["--repeat", "10"],
    "throughput": ["--seconds", "2"],
    "servicing": ["--repeat", "5"],
    "sensitivity": ["--repeat", "10"],
    "nvme": ["--repeat", "5"],
}
QUICK = {
    "blackout": ["--repeat", "3"],
    "loss_vs_load": ["--repeat", "2"],
    "throughput": ["--seconds", "0.5", "--rates", "10000,40000,100000", "--servicings", "1", "--previous", "none"],
    "servicing": ["--repeat", "1", "--nics", "1,4"],
    "sensitivity": ["--repeat", "2", "--latencies", "0,1", "--flrs", "100"],
    "nvme": ["--repeat", "2", "--iops-seconds", "0.5"],
}
MODULES = {"blackout": bench_blackout, "loss_vs_load": bench_load, "throughput": bench_throughput,
           "servicing": bench_servicing, "sensitivity": bench_sensitivity, "nvme": bench_nvme}


def summary_markdown(results: dict[str, dict]) -> str:
    m = results["blackout"]["machine"]
    out = [f"Machine: {m['cpu']}, {m['cpus']} CPUs, {m['platform']}, Python {m['python']}.", ""]

    b = results["blackout"]
    paths = list(bench_servicing.PATHS)
    out += [f"Guest blackout and frames lost per servicing ({b['rate_fps']:g} frames/s of {b['frame_size']} B, "
            f"{b['repeat']} servicings per cell; median / p95):", "",
            "| timing | prelaunch | " + " | ".join(f"{p} blackout ms" for p in paths) + " | "
            + " | ".join(f"{p} lost" for p in paths) + " | reset / keepalive | reset-flr / keepalive |",
            "|---|---|" + "---:|" * (2 * len(paths) + 2)]
    for ratio in b["ratios"]:
        cell = {r["path"]: r for r in b["rows"]
                if (r["timing"]["preset"], r["prelaunch"]) == (ratio["timing"], ratio["prelaunch"])}
        out.append(f"| {ratio['timing']} | {'on' if ratio['prelaunch'] else 'off'} | "
                   + " | ".join(f"{cell[p]['blackout_ms']['median']:.1f} / {cell[p]['blackout_ms']['p95']:.1f}"
                                for p in paths) + " | "
                   + " | ".join(f"{cell[p]['frames_lost']['median']:.0f} / {cell[p]['frames_lost']['p95']:.0f}"
                                for p in paths)
                   + f" | {ratio['reset_over_keepalive']:.2f}x | {ratio['reset-flr_over_keepalive']:.2f}x |")

    ld = results["loss_vs_load"]
    out += ["", f"Frames lost per servicing vs offered load ({DeviceTiming.from_dict(ld['timing']).describe()}, "
                f"prelaunch on, {ld['repeat']} servicings per cell; median / p95; the last column is what the same load loses in "
                f"{bench_load.QUIET_S:g} s without servicing):", "",
            "| offered frames/s | " + " | ".join(paths) + " | lost without servicing |",
            "|---:|" + "---:|" * (len(paths) + 1)]
    for rate in sorted({r["rate_fps"] for r in ld["rows"]}):
        cell = {r["path"]: r for r in ld["rows"] if r["rate_fps"] == rate}
        out.append(f"| {rate:.0f} | " + " | ".join(
            f"{cell[p]['frames_lost']['median']:.0f} / {cell[p]['frames_lost']['p95']:.0f}" for p in paths)
            + f" | {cell[paths[0]]['quiet']['frames_lost']} |")

    tp = results["throughput"]
    out += ["", "Round trip guest → worker → device → worker → guest (loopback, one NIC; load average before/after "
                "each path in the last column):", "",
            "| data path | max frames/s 64 B | < 0.1 % loss 64 B | < 0.1 % loss 1500 B | Mbit/s 1500 B | idle CPU % "
            "device / worker / agent | load |", "|---|---:|---:|---:|---:|---|---|"]
    for name, p in tp["paths"].items():
        idle = p["idle_cpu_percent"]
        out.append(f"| {name} | {p['max_delivered_fps_64']} | {p['max_lossless_fps_64'] or '-'} | "
                   f"{p['max_lossless_fps_1500'] or '-'} | {p['mbit_s_1500'] or '-'} | "
                   f"{idle['device']} / {idle['worker']} / {idle['agent']} | "
                   f"{p['loadavg_before'][0]} / {p['loadavg_after'][0]} |")

    sv = results["servicing"]
    out += ["", f"Servicing phases vs NICs ({DeviceTiming.from_dict(sv['timing']).describe()}, prelaunch on, "
                f"median of {sv['repeat']}; ms):", "",
            "| NICs | path | save | handoff | restore | total |", "|---:|---|---:|---:|---:|---:|"]
    for r in sv["rows"]:
        if r["prelaunch"]:
            out.append(f"| {r['nics']} | {r['path']} | " + " | ".join(
                f"{r[k]['median_ms']:.1f}" for k in bench_servicing.PHASES) + " |")

    se = results["sensitivity"]
    out += ["", f"Guest blackout vs the device timing model ({se['rate_fps']:g} frames/s of {se['frame_size']} B, "
                "paths interleaved):",
            "", bench_sensitivity.markdown(se["rows"], se["ratios"]), "",
            bench_sensitivity.counts_markdown(se["rows"], se["fixed_costs"])]

    nv = results["nvme"]
    t = nv["timing"]
    out += ["", f"NVMe IO blackout across a driver handover with IO running (enable {t['enable_ms']:g} ms, disable "
                f"{t['disable_ms']:g} ms, admin {t['admin_ms']:g} ms; {nv['repeat']} each; median, min-max ms):", "",
            "| path | IO blackout | IO errors |", "|---|---:|---:|"]
    for mode, row in nv["handovers"].items():
        b = row["blackout_ms"]
        out.append(f"| {mode} | {b['median']:.1f} ({b['min']:.1f}-{b['max']:.1f}) | {row['errors']} |")
    out += [""] + [f"NVMe QD {r['qd']}: {r['iops']} IOPS, p50 {r['latency_ms']['p50']} ms, p99 {r['latency_ms']['p99']} ms"
                   for r in nv["iops"]]
    hs = nv["host"]
    out += ["", f"NVMe across whole servicings of a host (guest disk IO {hs['rate']} IO/s at QD {hs['qd']}; median, "
                "min-max ms):", "", "| path | IO blackout | servicing | admin commands | IO errors |",
            "|---|---:|---:|---:|---:|"]
    for mode, row in hs["paths"].items():
        b = row["io_blackout_ms"]
        out.append(f"| {mode} | {b['median']:.1f} ({b['min']:.1f}-{b['max']:.1f}) | {row['total_ms_median']:.1f} | "
                   f"{row['admin_commands']} | {row['io_errors']} |")
    return "\n".join(out) + "\n"


def plot_servicing(result: dict, path: pathlib.Path) -> None:
    """(d) as a picture: save / handoff / restore stacked per NIC count, one group per servicing path."""
    plt = pyplot()
    rows = [r for r in result["rows"] if r["prelaunch"]]
    nics = sorted({r["nics"] for r in rows})
    paths = list(bench_servicing.PATHS)
    fig, ax = plt.subplots(figsize=(8, 4.2))
    width = 0.8 / len(paths)
    colors = {"save": "tab:blue", "handoff": "tab:orange", "restore": "tab:green"}
    for i, name in enumerate(paths):
        xs = [k + (i - (len(paths) - 1) / 2) * width for k in range(len(nics))]
        bottom = [0.0] * len(nics)
        for phase, color in colors.items():
            v = [next(r for r in rows if (r["nics"], r["path"]) == (n, name))[phase]["median_ms"] for n in nics]
            ax.bar(xs, v, width, bottom=bottom, color=color, edgecolor="white", label=phase if i == 0 else None)
            bottom = [b + x for b, x in zip(bottom, v)]
        for x, top in zip(xs, bottom):
            ax.text(x, top, name, rotation=90, ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(nics)), [f"{n} NIC{'s' if n > 1 else ''}" for n in nics])
    ax.set_ylabel("ms (median)")
    ax.set_title(f"Servicing phases vs NICs ({DeviceTiming.from_dict(result['timing']).describe()}, prelaunch on)",
                 fontsize=9)
    ax.margins(y=0.25)
    save_plot(fig, ax, path, "y")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="few repetitions (about 2 min), results in results/quick/")
    args = ap.parse_args(argv)
    out_dir = RESULTS / "quick" if args.quick else RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    t = time.monotonic()
    results = {}
    for name, module in MODULES.items():
        path = out_dir / f"{name}.json"
        print(f"== {name} ==", flush=True)
        module.main([*(QUICK if args.quick else FULL)[name], "--out", str(path)])
        results[name] = json.loads(path.read_text())
    plot_servicing(results["servicing"], out_dir / "servicing.png")
    text = summary_markdown(results)
    (out_dir / "summary.md").write_text(text)
    print(text)
    print(f"all benchmarks in {time.monotonic() - t:.0f} s; wrote {out_dir / 'summary.md'}")
    return 0


if __name__ == "__main__":
    proc.signals_interrupt()
    sys.exit(main())
