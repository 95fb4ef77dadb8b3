"""Where a servicing's guest blackout goes: every process's log lines on one clock, per servicing path.

Each process of a run dir logs `mono=` (CLOCK_MONOTONIC ns, `vfkeep.log`), the clock the guest traffic agents
time their frames with. This runs one host (realistic timing unless told otherwise, data-path keepalive
available, prelaunch on, 1 NIC, guest traffic), services it `--repeat` times on each path of
`vfkeep.servicing_paths.ORDER` (interleaved), and for each servicing takes the first log line of each
milestone below from the host, the old worker, the new worker and the device, plus the guest's blackout start
and end from the agent. Per path it prints the median time of each milestone from the blackout start, and
the median of each step (from the milestone before it, over the servicings that logged both), and the CPU the old
worker's save and the new worker's restore used (from their log lines). With one path of those that do not leave
the worker what they expect themselves (`servicing_paths.FOLLOWS_ITSELF`), each servicing is preceded by one on
the path that does (`preparing`), not counted. Every counted servicing must have taken its path, HWC request
count included (`servicing_paths.unexpected`), else the report lists it and the exit status is 1. A diagnostic,
not part of `make bench`:

    python -m benchmarks.trace_blackout [--repeat 10] [--rate FPS] [--timing ...] [--json PATH] [--keep DIR]
        [--paths keepalive+datapath]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import statistics
import tempfile
import time

from vfkeep import log as vlog
from vfkeep.device.timing import timing_from
from vfkeep.host.vmm import Host, HostConfig
from vfkeep.servicing_paths import FOLLOWS_ITSELF, ORDER, preparing, request, unexpected, wait_steady

from .args import at_least, report_path

#: (label, process, message[, key=value the line must carry]) in the order they happen in a servicing;
#: `old`/`new` are the worker saved and the one that restores. A path shows the ones it passes.
MILESTONES = [
    ("host: save requested", "host", "servicing phase", "phase=save"),
    ("old worker: save request read", "old", "save requested"),
    ("old worker: relay stopped (drained)", "old", "relay stopped"),
    ("guest: blackout starts", "agent", "BLACKOUT_START"),
    ("old worker: state saved", "old", "servicing state saved"),
    ("host: has the state, scrubs", "host", "servicing phase", "phase=handoff"),
    ("host: hands the state over", "host", "servicing phase", "phase=restore"),
    ("new worker: state received", "new", "servicing state received"),
    ("new worker: DMA manager restored", "new", "dma manager restored"),
    ("device: client connected", "device", "client connected"),
    ("new worker: NIC restored / created", "new", ("mana device restored", "mana device created")),
    ("new worker: vport up", "new", ("vport restored from data-path keepalive", "vport open")),
    ("new worker: relay running", "new", "relay running"),
    ("new worker: relay handed frames back", "new", "relay resumed"),
    ("guest: blackout ends", "agent", "BLACKOUT_END"),
    ("new worker: started (probe done)", "new", "worker started"),
]

_LINE = re.compile(r' mono=(\d+) .*? msg=("(?:[^"\\]|\\.)*"|\S+)(.*)$')


def read_log(path: str) -> list[tuple[int, str, str]]:
    """(mono ns, message, the key=value rest) of every line of a vfkeep log that has a `mono` field."""
    out = []
    try:
        with open(path) as f:
            for line in f:
                m = _LINE.search(line)
                if m:
                    out.append((int(m.group(1)), m.group(2).strip('"'), m.group(3)))
    except FileNotFoundError:
        pass
    return out


def milestones(logs: dict[str, list], window: tuple[int, int], blackout: tuple[int, int]) -> dict[str, float]:
    """First line of each milestone from 5 ms before the servicing window until it and the blackout have ended,
    in ms from the blackout start."""
    lo, hi = window[0] - 5_000_000, max(window[1], blackout[1])
    logs = {**logs, "agent": [(blackout[0], "BLACKOUT_START", ""), (blackout[1], "BLACKOUT_END", "")]}
    found = {}
    for label, proc, msg, *extra in MILESTONES:
        msgs = msg if isinstance(msg, tuple) else (msg,)
        for t, m, rest in logs.get(proc, ()):
            if lo <= t <= hi and m in msgs and all(f" {e}" in f" {rest}" for e in extra):
                found[label] = round((t - blackout[0]) / 1e6, 3)
                break
    return found


def worker_cpu_ms(logs: dict[str, list], window: tuple[int, int]) -> dict[str, float]:
    """The CPU the old worker's save and the new worker's restore used (`cpu_ms` of their log lines): what the
    work costs, which on a loaded machine the wall clock does not show."""
    out = {}
    for key, proc, msg in (("save_cpu_ms", "old", "servicing state saved"), ("restore_cpu_ms", "new", "worker started")):
        for t, m, rest in logs.get(proc, ()):
            if m == msg and t >= window[0] - 5_000_000 and (cpu := re.search(r"\bcpu_ms=([0-9.]+)", rest)):
                out[key] = float(cpu.group(1))
                break
    return out


def summarize(samples: list[dict[str, float]]) -> list[dict]:
    """Per milestone, in the order of their median times: the median ms from the blackout start, and the median
    step from the milestone before it in that order, over the servicings that logged both."""
    labels = [m[0] for m in MILESTONES if any(m[0] in s for s in samples)]
    labels.sort(key=lambda label: statistics.median(s[label] for s in samples if label in s))
    rows = []
    for i, label in enumerate(labels):
        at = [s[label] for s in samples if label in s]
        steps = [s[label] - s[labels[i - 1]] for s in samples if i and label in s and labels[i - 1] in s]
        rows.append({"milestone": label, "at_ms": round(statistics.median(at), 3), "n": len(at),
                     "step_ms": round(statistics.median(steps), 3) if steps else None})
    return rows


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=at_least(1, int), default=10)
    ap.add_argument("--rate", type=float, default=5000)
    ap.add_argument("--timing", default="realistic")
    ap.add_argument("--hwc-latency-ms", type=float)
    ap.add_argument("--flr-ms", type=float)
    ap.add_argument("--json", type=report_path)
    ap.add_argument("--keep", metavar="DIR", help="run in DIR and keep it (every log, for a closer look)")
    ap.add_argument("--paths", default=",".join(ORDER),
                    help="comma-separated paths of ORDER (default: all, in ORDER's order) or one path, which then "
                         "follows itself or, if it cannot, the servicing that prepares it (not counted)")
    args = ap.parse_args(argv)
    # In ORDER each path leaves the worker the next one expects, and each path the one it expects itself.
    chosen = set(args.paths.split(","))
    if not (chosen == set(ORDER) or (len(chosen) == 1 and chosen <= set(ORDER))):
        ap.error(f"--paths: all of {', '.join(ORDER)} or one of them, got {args.paths!r}")
    paths = ORDER if len(chosen) > 1 else tuple(chosen)
    prepare = preparing(paths[0]) if len(paths) == 1 and paths[0] not in FOLLOWS_ITSELF else None
    timing = timing_from(args.timing, args.hwc_latency_ms, args.flr_ms)
    load_before = os.getloadavg()
    samples: dict[str, list] = {p: [] for p in paths}
    cpu: dict[str, list] = {p: [] for p in paths}
    blackouts: dict[str, list] = {p: [] for p in paths}
    with (contextlib.nullcontext(args.keep) if args.keep else tempfile.TemporaryDirectory(prefix="vfkeep-trace-")) \
            as run_dir:
        os.makedirs(run_dir, exist_ok=True)
        vlog.setup("host", run_dir)
        host = Host(HostConfig(run_dir=run_dir, nics=1, timing=timing, datapath_keepalive=True,
                               keep_worker_logs=len(paths) * args.repeat * (2 if prepare else 1) + 2))
        host.start()
        try:
            host.traffic("start", rate=args.rate, size=128)
            time.sleep(0.5)
            pending, wrong = [], []
            for i in range(args.repeat):
                if prepare:
                    if bad := unexpected(prepare, host.service(**request(prepare))):
                        raise SystemExit(f"preparing servicing {i + 1} ({prepare}): {'; '.join(bad)}")
                    wait_steady(host.traffic, args.rate)
                    time.sleep(0.2)
                for path in paths:
                    old = host.status()["worker"]["generation"]
                    result = host.service(**request(path))
                    wrong += [f"{path} servicing {i + 1}: {msg}"
                              for msg in unexpected(path, result, count_requests=True)]
                    window = host.last_servicing["window_ns"]
                    agent = (host.traffic("status")["last_servicing"] or [{}])[0]
                    pending.append((path, old, host.status()["worker"]["generation"], window,
                                    (agent.get("blackout_start_ns"), agent.get("blackout_end_ns"))))
                    blackouts[path].append(result["blackout_ms"])
                    wait_steady(host.traffic, args.rate)
                    time.sleep(0.2)
            host.traffic("stop")
        finally:
            host.stop()
        shared = {"host": read_log(os.path.join(run_dir, "host.log")),
                  "device": read_log(os.path.join(run_dir, "device-nic0.log"))}
        for path, old, new, window, blackout in pending:
            if None in blackout:
                continue
            logs = {**shared, "old": read_log(os.path.join(run_dir, f"worker-{old}.log")),
                    "new": read_log(os.path.join(run_dir, f"worker-{new}.log"))}
            samples[path].append(milestones(logs, window, blackout))
            cpu[path].append(worker_cpu_ms(logs, window))
    report = {"timing": timing.to_dict(), "rate_fps": args.rate, "repeat": args.repeat, "prepared_by": prepare,
              "unexpected": wrong,
              "load_average_before": load_before, "load_average_after": os.getloadavg(),
              "paths": {p: {"blackout_ms": statistics.median(b for b in blackouts[p] if b is not None),
                            "blackout_ms_all": blackouts[p], "milestones": summarize(samples[p]),
                            "servicings": samples[p],
                            **{k: statistics.median(c[k] for c in cpu[p] if k in c)
                               for k in ("save_cpu_ms", "restore_cpu_ms") if any(k in c for c in cpu[p])}}
                        for p in paths}}
    print(f"{timing.describe()}, {args.rate:g} frames/s, {args.repeat} servicings per path"
          f"{f' (each after a {prepare} servicing, not counted)' if prepare else ''}; load average "
          f"{load_before[0]:.1f} before, {report['load_average_after'][0]:.1f} after")
    for p in paths:
        r = report["paths"][p]
        print(f"\n{p}: blackout median {r['blackout_ms']:.1f} ms "
              f"(all: {', '.join(f'{b:.1f}' for b in r['blackout_ms_all'] if b is not None)})")
        if "restore_cpu_ms" in r:
            print(f"  worker CPU (median): save {r.get('save_cpu_ms', float('nan')):.1f} ms, restore "
                  f"{r['restore_cpu_ms']:.1f} ms")
        print(f"  {'ms from blackout start':>22}  {'step':>7}  milestone")
        for row in r["milestones"]:
            step = "" if row["step_ms"] is None else f"{row['step_ms']:7.2f}"
            print(f"  {row['at_ms']:22.2f}  {step:>7}  {row['milestone']}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)  # (`report_path` allows new ones)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    if wrong:
        raise SystemExit("servicings that did not take their path (their numbers are above):\n  " + "\n  ".join(wrong))
    return report


if __name__ == "__main__":
    main()
