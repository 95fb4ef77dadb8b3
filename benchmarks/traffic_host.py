"""Shared by the traffic benchmarks: a `vfkeep run --no-console` host with guest traffic, and summaries.

The host is bench_servicing's (same servicing paths, same checks); this adds the traffic agents and
servicings whose results carry the guest's blackout and loss.
"""
from __future__ import annotations

import json
import pathlib
import statistics
import time

from vfkeep.demo import machine
from vfkeep.guest.stats import percentile
from vfkeep.servicing_paths import wait_steady
from .bench_servicing import PATHS
from .bench_servicing import Host as ServicingHost

RESULTS = pathlib.Path(__file__).parent / "results"


class TrafficHost(ServicingHost):
    def run_traffic(self, rate: float, size: int = 128, warmup_s: float = 0.5, backpressure: bool = False) -> None:
        """Start (or re-pace) traffic on every NIC and let it reach a steady state; `backpressure`: the agents'
        blocking sender (a host of older code does not know the argument: it is only sent when set)."""
        self.rate = rate
        self.traffic("start", rate=rate, size=size, **({"backpressure": True} if backpressure else {}))
        time.sleep(warmup_s)

    def service_measured(self, path: str) -> dict:
        """One servicing on `path` (bench_servicing.PATHS) with traffic running: the servicing result, checked
        to have taken that path; then until the backlog it left has drained (`wait_steady`), so the next
        servicing's blackout does not include it."""
        r = self.service(**PATHS[path])
        want = "keepalive" if path == "keepalive" else "fresh"
        if not r["ok"] or r["blackout_ms"] is None or any(n["restore_path"] != want for n in r["nics"]):
            raise RuntimeError(f"unexpected servicing result for {path}: {r}")
        wait_steady(self.traffic, self.rate)
        return r


def summary(values: list[float]) -> dict:
    """median, p95 (nearest rank), mean, min, max."""
    s = sorted(values)
    return {"median": round(statistics.median(s), 3), "p95": round(percentile(s, 95), 3),
            "mean": round(statistics.fmean(s), 3), "min": round(s[0], 3), "max": round(s[-1], 3), "n": len(s)}


def write(name: str, result: dict, out: str | None = None) -> pathlib.Path:
    """benchmarks/results/<name>.json (or `out`), with the machine it ran on."""
    path = pathlib.Path(out) if out else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"benchmark": name, "machine": machine(), **result}, indent=1) + "\n")
    return path


def pyplot():
    """matplotlib with the Agg backend (no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_plot(fig, ax, path, grid_axis: str = "both") -> None:
    """The finish every benchmark plot shares: legend, light grid, tight layout, PNG at `path`, figure closed."""
    ax.legend()
    ax.grid(axis=grid_axis, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
