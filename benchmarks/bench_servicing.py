"""Servicing benchmark: phase timings (save, handoff, restore, total) of whole servicings with real processes.

`python -m benchmarks.bench_servicing [--repeat N] [--nics 1,2,4,8] [--timing realistic|natural]
[--hwc-latency-ms MS] [--flr-ms MS] [--out PATH]`

For each NIC count and prelaunch on/off, one `vfkeep run --no-console` host; on it, in turn, servicings on the
three paths of `PATHS`: keepalive (no ESTABLISH_HWC, no REGISTER_DEVICE, no FLR), reset-flr (saved state
the new worker does not restore: NoReset fails, FLR, fresh init) and reset (host bit clear: the old worker
shuts the NIC down cleanly, the new one fresh-inits it without a reset). The phases are
the host's: save = save request until the state arrives; handoff = old worker exit, worker-RAM scrub,
(without prelaunch: starting the next worker until its hello), state handed over; restore = until the new
worker reports its NICs up; total = save + handoff + restore. Prelaunch time (next worker start-up before
the save request, outside the blackout) is reported separately. Results: benchmarks/results/servicing.json.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

from vfkeep import proc
from vfkeep.device.timing import PRESETS, DeviceTiming, timing_from
from vfkeep.host.detached import DetachedHost

from .args import at_least, report_path

RESULTS = pathlib.Path(__file__).parent / "results" / "servicing.json"
PHASES = ("save", "handoff", "restore", "total")
#: Servicing requests per path, measured in this order so each leaves the worker the next one expects:
#: keepalive (default -> default worker), reset-flr (-> a worker with keepalive disabled), reset (-> default).
PATHS = {
    "keepalive": {"mana_keepalive": True},
    # Saved state the new worker will not restore (spec 6.1 S=yes K=no): NoReset fails on the live HWC, FLR.
    "reset-flr": {"mana_keepalive": True, "next_env": {"OPENHCL_MANA_KEEP_ALIVE": "disabled"}},
    # Host bit clear: clean shutdown (DEREGISTER_DEVICE, DESTROY_HWC), fresh init without reset.
    "reset": {"mana_keepalive": False},
}


def add_timing_arguments(ap: argparse.ArgumentParser, preset: str = "realistic") -> None:
    """--timing PRESET, --hwc-latency-ms, --flr-ms: the device timing parameters (DESIGN D9)."""
    ap.add_argument("--timing", choices=sorted(PRESETS), default=preset,
                    help=f"device timing preset (default {preset}; realistic: HWC 1 ms per request, FLR 100 ms)")
    ap.add_argument("--hwc-latency-ms", type=float, help="override the preset's modelled HWC request latency")
    ap.add_argument("--flr-ms", type=float, help="override the preset's modelled FLR wait")


def timing_of(args: argparse.Namespace) -> DeviceTiming:
    return timing_from(args.timing, args.hwc_latency_ms, args.flr_ms)


def no_console_option(code_dir: pathlib.Path) -> str:
    """How that tree's `vfkeep run` starts without a console: `--no-console`, or `--detach` before it."""
    out = subprocess.run([sys.executable, "-m", "vfkeep.cli", "run", "--help"], cwd=code_dir, capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": str(code_dir)}).stdout
    return "--no-console" if "--no-console" in out else "--detach"


class Host(DetachedHost):
    """A benchmark host: `DetachedHost` with the timing parameters and prelaunch on/off, and measured servicings."""

    def __init__(self, run_dir: str, nics: int, prelaunch: bool, timing: DeviceTiming, *args: str,
                 code_dir: pathlib.Path | None = None):
        """`code_dir`: run vfkeep from that source tree (e.g. a worktree of another commit), not this one."""
        if code_dir is not None:
            self.no_console_option = no_console_option(code_dir)
        env = None if code_dir is None else {
            "PYTHONPATH": os.pathsep.join(filter(None, (str(code_dir), os.environ.get("PYTHONPATH"))))}
        super().__init__(run_dir, *timing.to_args(), "--prelaunch" if prelaunch else "--no-prelaunch", *args,
                         nics=nics, wait=300, boot_timeout=120, env=env,
                         cwd=None if code_dir is None else str(code_dir))
        self.timing = timing

    def sample(self, path: str) -> dict:
        """One servicing on `path` (PATHS), checked to have taken it: its phases and what the device saw."""
        r = self.service(**PATHS[path])
        want = "keepalive" if path == "keepalive" else "fresh"
        if not r["ok"] or any(n["restore_path"] != want or n["device_reset"] != (path == "reset-flr")
                              for n in r["nics"]):
            raise RuntimeError(f"unexpected servicing result for {path}: {r}")
        last = self.inspect("last_servicing", wait=60)
        return {**r["phases_ms"], "prelaunch_start": last["prelaunch_ms"],
                "device_reset": any(n["device_reset"] for n in r["nics"]),
                "hwc_established": any(n["hwc_established"] for n in r["nics"])}


def service_rounds(service: Callable[[str], dict], repeat: int) -> dict[str, list[dict]]:
    """`repeat` rounds of one servicing per path, in PATHS order so each leaves the worker the next one expects;
    `service(path)` gives one sample."""
    samples: dict[str, list[dict]] = {path: [] for path in PATHS}
    for _ in range(repeat):
        for path in PATHS:
            samples[path].append(service(path))
    return samples


def summarize(samples: list[dict]) -> dict:
    out = {}
    for key in (*PHASES, "prelaunch_start"):
        values = [s[key] for s in samples]
        out[key] = {"median_ms": round(statistics.median(values), 3), "min_ms": round(min(values), 3),
                    "max_ms": round(max(values), 3)}
    out["device_reset"] = any(s["device_reset"] for s in samples)
    out["hwc_established"] = any(s["hwc_established"] for s in samples)
    out["n"] = len(samples)
    return out


def run(nic_counts: list[int], repeat: int, timing: DeviceTiming) -> list[dict]:
    rows = []
    for nics in nic_counts:
        for prelaunch in (True, False):
            with Host.running(nics, prelaunch, timing) as host:
                host.sample("keepalive")  # warm-up: page cache, first restore
                samples = service_rounds(host.sample, repeat)
            for path, s in samples.items():
                row = {"nics": nics, "prelaunch": prelaunch, "path": path, **summarize(s)}
                rows.append(row)
                print(f"nics={nics} prelaunch={'on ' if prelaunch else 'off'} {path:9} "
                      + "  ".join(f"{k} {row[k]['median_ms']:8.1f}" for k in (*PHASES, "prelaunch_start")) + " ms",
                      flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| NICs | prelaunch | path | save | handoff | restore | total | device reset | HWC established |",
             "|---:|---|---|---:|---:|---:|---:|---|---|"]
    for r in rows:
        lines.append(f"| {r['nics']} | {'on' if r['prelaunch'] else 'off'} | {r['path']} | "
                     + " | ".join(f"{r[k]['median_ms']:.1f}" for k in PHASES)
                     + f" | {'yes' if r['device_reset'] else 'no'} | {'yes' if r['hwc_established'] else 'no'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=at_least(1, int), default=5,
                    help="servicings per path and configuration (median reported)")
    ap.add_argument("--nics", default="1,2,4,8", help="comma-separated NIC counts")
    add_timing_arguments(ap)
    ap.add_argument("--out", type=report_path, default=str(RESULTS))
    args = ap.parse_args(argv)
    nic_counts = [int(x) for x in args.nics.split(",")]
    t = time.monotonic()
    rows = run(nic_counts, args.repeat, timing_of(args))
    result = {"benchmark": "servicing", "timing": timing_of(args).to_dict(), "repeat": args.repeat, "unit": "ms (median)",
              "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
              "wall_s": round(time.monotonic() - t, 1), "rows": rows}
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(markdown(rows))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    proc.signals_interrupt()
    sys.exit(main())
