"""NVMe benchmark: IO blackout across a driver handover, keepalive vs reset, with IO running; IOPS at QD 1 and 32.

`python -m benchmarks.bench_nvme [--repeat N] [--timing realistic] [--out PATH]`

The controller emulator runs in its own process (declared timing: by default `realistic`, i.e. enable
100 ms, disable 20 ms, FLR 100 ms, 1 ms per admin command — presets, not published figures). Each
handover has two driver generations in two processes, the second prelaunched (imports done, waiting for
the state) as the host does with workers:
- keepalive: generation 1 runs 4 KiB random writes/reads at QD 8, then `save()`s with IO in flight and
  exits; generation 2 `restore()`s (no reset, no admin command), replays the in-flight requests and
  resumes IO;
- reset: generation 1 `shutdown()`s (CC.EN 1→0, the disable time) and exits; generation 2 does a fresh
  init (enable time + IDENTIFY, SET FEATURES, AER, 2 × CREATE IO CQ/SQ, IDENTIFY namespace) and
  resumes IO.
IO blackout = first completion in generation 2 − last completion in generation 1 (CLOCK_MONOTONIC in
both). Then IOPS and latency percentiles of one generation at QD 1 and QD 32 (2 IO queues, 4 KiB,
50 % reads). Then the same two paths as whole servicings of a host (`vfkeep run --nvme 1 --nics 0`, the
guest disk agent at QD 8 and 2000 IO/s, a worker replaced each time): the servicing result's
`io_blackout_ms` and `io_errors`, and every block verified at the end. Results: benchmarks/results/nvme.json.
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import pathlib
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from vfkeep import proc

from .args import at_least, report_path

RESULTS = pathlib.Path(__file__).parent / "results" / "nvme.json"
LAYOUT_STR = "guest=256,worker=1024,pool=512"
BLOCK = 512
IO_BLOCKS = 8  # 4 KiB
NS_BLOCKS = (64 << 20) // BLOCK


class Engine:
    """Random 4 KiB IO at a fixed queue depth through `NvmeDriver.submit_io`, completion times recorded."""

    def __init__(self, drv, mem, qd: int, read_pct: int = 50, seed: int = 1):
        from vfkeep.nvme import NVM_READ, NVM_WRITE
        self.ops = (NVM_READ, NVM_WRITE)
        self.drv, self.mem, self.qd, self.read_pct = drv, mem, qd, read_pct
        self.rng = random.Random(seed)
        self.base = mem.layout.guest.gpa
        self.cv = threading.Condition()
        self.free = list(range(qd))
        self.inflight: dict[int, tuple[int, int, float]] = {}
        self.done: list[tuple[float, float]] = []  # (completion time, latency)
        self.errors = 0
        self.stop = False

    def _submit(self, slot: int, op: int, lba: int) -> None:
        t = time.monotonic()
        with self.cv:
            self.inflight[slot] = (op, lba, t)

        def complete(status: int, dw0: int) -> None:
            now = time.monotonic()
            with self.cv:
                self.errors += bool(status)
                _, _, t0 = self.inflight.pop(slot)
                self.done.append((now, now - t0))
                self.free.append(slot)
                self.cv.notify_all()

        self.drv.submit_io(op, 1, lba, IO_BLOCKS, self.base + slot * 4096, 4096, complete, timeout=30)

    def run(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end and not self.stop:
            with self.cv:
                if not self.cv.wait_for(lambda: self.free or self.stop, 1.0) or self.stop:
                    continue
                slot = self.free.pop()
            op = self.ops[0] if self.rng.randrange(100) < self.read_pct else self.ops[1]
            try:
                self._submit(slot, op, self.rng.randrange(NS_BLOCKS // IO_BLOCKS) * IO_BLOCKS)
            except Exception:  # noqa: BLE001 - the driver was saved or shut down under us: stop
                return

    def replay(self, inflight: list) -> None:
        for slot, op, lba in inflight:
            self.free.remove(slot)
            self._submit(slot, op, lba)


def _child(role: str) -> None:
    """A driver generation: `first MODE SOCK MEMFD` or `second MODE SOCK MEMFD` (waits for the state on stdin)."""
    from vfkeep.memory import DmaManager, GuestMemory, MemoryLayout
    from vfkeep.contract import NvmeConfig
    from vfkeep.paravisor.nvme_manager import create_device
    from vfkeep.proto import dma_manager_pb2, nvme_driver_pb2
    mode, sock, memfd = sys.argv[3], sys.argv[4], int(sys.argv[5])
    mem = GuestMemory.attach(memfd, MemoryLayout.from_str(LAYOUT_STR))
    cfg = NvmeConfig(0, "nvme0", sock)
    if role == "first":
        dma = DmaManager(mem, strict_pool=False)
        disk = create_device(cfg, mem, dma, saved=None, save_restore_supported=True, cpu_count=2)
        eng = Engine(disk.driver, mem, qd=8)
        eng.run(0.5)
        with eng.cv:
            eng.stop = True
            last = max(t for t, _ in eng.done)
        t0 = time.monotonic()
        out = {"last_completion": last, "handover_start": t0, "errors": eng.errors}
        if mode == "keepalive":
            state = disk.driver.save()
            with eng.cv:
                out["inflight"] = [(slot, op, lba) for slot, (op, lba, _) in eng.inflight.items()]
                out["last_completion"] = max(t for t, _ in eng.done)
            out["driver_state"] = base64.b64encode(state.SerializeToString()).decode()
            out["dma_state"] = base64.b64encode(dma.save().SerializeToString()).decode()
        else:
            disk.driver.shutdown()
            with eng.cv:
                out["inflight"] = []
                out["last_completion"] = max(t for t, _ in eng.done)
        out["save_ms"] = (time.monotonic() - t0) * 1000
        print(json.dumps(out), flush=True)
        os._exit(0)
    request = json.loads(sys.stdin.readline())
    t0 = time.monotonic()
    dma = DmaManager(mem, strict_pool=False)
    saved = None
    if mode == "keepalive":
        dma.restore(dma_manager_pb2.OpenhclDmaManagerState.FromString(base64.b64decode(request["dma_state"])))
        saved = nvme_driver_pb2.NvmeDriverSavedState.FromString(base64.b64decode(request["driver_state"]))
    disk = create_device(cfg, mem, dma, saved=saved, save_restore_supported=True, cpu_count=2)
    up = time.monotonic()
    eng = Engine(disk.driver, mem, qd=8, seed=2)
    disk.driver.wait_drained(30)
    eng.replay(request["inflight"])
    eng.run(0.3)
    with eng.cv:
        first = min(t for t, _ in eng.done)
    disk.driver.shutdown()
    print(json.dumps({"path": disk.restore_path, "first_completion": first, "restore_ms": (up - t0) * 1000,
                      "errors": eng.errors}), flush=True)
    os._exit(0)


def _iops(sock: str, mem, qd: int, seconds: float) -> dict:
    from vfkeep.memory import DmaManager
    from vfkeep.contract import NvmeConfig
    from vfkeep.paravisor.nvme_manager import create_device
    dma = DmaManager(mem, strict_pool=False)
    disk = create_device(NvmeConfig(0, "nvme0", sock), mem, dma, saved=None, save_restore_supported=True,
                         cpu_count=2)
    eng = Engine(disk.driver, mem, qd=qd)
    t = time.monotonic()
    eng.run(seconds)
    with eng.cv:
        eng.cv.wait_for(lambda: not eng.inflight, 10)
    elapsed = time.monotonic() - t
    disk.driver.shutdown()
    lat = sorted(latency for _, latency in eng.done)
    return {"qd": qd, "iops": round(len(lat) / elapsed), "errors": eng.errors,
            "latency_ms": {"p50": round(lat[len(lat) // 2] * 1000, 3), "p99": round(lat[int(len(lat) * 0.99)] * 1000, 3),
                           "max": round(lat[-1] * 1000, 3)}}


def handover(sock: str, memfd: int, mode: str) -> dict:
    argv = [sys.executable, "-m", "benchmarks.bench_nvme", "--child"]
    second = subprocess.Popen([*argv, "second", mode, sock, str(memfd)], pass_fds=[memfd], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        first = subprocess.run([*argv, "first", mode, sock, str(memfd)], pass_fds=[memfd], capture_output=True,
                               text=True, timeout=60, check=True)
        out1 = json.loads(first.stdout)
        out2, _ = second.communicate(first.stdout, timeout=60)
        out2 = json.loads(out2)
    finally:
        if second.poll() is None:
            second.kill()
            second.wait()
    return {"mode": mode, "path": out2["path"], "blackout_ms": (out2["first_completion"] - out1["last_completion"]) * 1000,
            "save_ms": out1["save_ms"], "restore_ms": out2["restore_ms"], "inflight_at_save": len(out1["inflight"]),
            "errors": out1["errors"] + out2["errors"]}


#: Guest disk IO of the host-level servicings (paced, so the CPU goes to the servicing, not to IO).
HOST_RATE, HOST_QD = 2000, 8
HOST_REQUESTS = {"keepalive": {"nvme_keepalive": True}, "reset": {}}


def host_servicings(repeat: int, timing: str) -> dict:
    """`repeat` servicings per path on one host, interleaved: the guest's IO blackout and errors per servicing
    (from the servicing results), then every block read back."""
    from vfkeep.host.detached import DetachedHost
    rows = []
    with DetachedHost.running("--nvme", "1", "--timing", timing, nics=0, wait=120) as host:
        host.disk("start", rate=HOST_RATE, qd=HOST_QD)
        time.sleep(0.5)
        for _ in range(repeat):
            for mode, request in HOST_REQUESTS.items():
                r = host.service(**request)
                (n,) = r["nvme"]
                rows.append({"mode": mode, "path": n["restore_path"], "io_blackout_ms": r["io_blackout_ms"],
                             "io_errors": r["io_errors"], "total_ms": r["phases_ms"]["total"],
                             "admin_commands": len(n["admin_commands"])})
                time.sleep(0.3)
        host.disk("verify")
        (disk,) = host.disk("stats")["disks"]
    summary = {}
    for mode in HOST_REQUESTS:
        mine = [r for r in rows if r["mode"] == mode]
        b = sorted(r["io_blackout_ms"] for r in mine)
        summary[mode] = {"io_blackout_ms": {"median": round(statistics.median(b), 1), "min": round(b[0], 1),
                                            "max": round(b[-1], 1)},
                         "total_ms_median": round(statistics.median(r["total_ms"] for r in mine), 1),
                         "paths": sorted({r["path"] for r in mine}), "io_errors": sum(r["io_errors"] for r in mine),
                         "admin_commands": max(r["admin_commands"] for r in mine)}
    return {"rate": HOST_RATE, "qd": HOST_QD, "paths": summary, "runs": rows,
            "verified": {k: disk[k] for k in ("completed", "chunks_written", "errors", "verify_errors", "duplicates")}}


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) > 2 and sys.argv[1] == "--child":
        _child(sys.argv[2])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=at_least(1, int), default=5)
    ap.add_argument("--timing", default="realistic")
    ap.add_argument("--iops-seconds", type=float, default=2.0)
    ap.add_argument("--out", type=lambda text: pathlib.Path(report_path(text)), default=RESULTS)
    args = ap.parse_args(argv)
    from vfkeep import proc
    from vfkeep.memory import GuestMemory, MemoryLayout
    from vfkeep.nvme_device.core import make_timing
    from vfkeep.nvme_device.main import start_nvme_device
    with tempfile.TemporaryDirectory(prefix="vfkeep-bench-nvme-") as tmp:
        sock = os.path.join(tmp, "nvme0.sock")
        dev = start_nvme_device(sock, "--run-dir", tmp, "--disk", os.path.join(tmp, "disk.img"), "--size", "64M",
                                "--timing", args.timing)
        mem = GuestMemory.create(MemoryLayout.from_str(LAYOUT_STR))
        try:
            runs = [handover(sock, mem.fd, mode) for _ in range(args.repeat) for mode in ("keepalive", "reset")]
            iops = [_iops(sock, mem, qd, args.iops_seconds) for qd in (1, 32)]
        finally:
            proc.end(dev)
            mem.close()
    rows = {}
    for mode in ("keepalive", "reset"):
        b = sorted(r["blackout_ms"] for r in runs if r["mode"] == mode)
        rows[mode] = {"blackout_ms": {"median": round(statistics.median(b), 1), "min": round(b[0], 1),
                                      "max": round(b[-1], 1)},
                      "paths": sorted({r["path"] for r in runs if r["mode"] == mode}),
                      "errors": sum(r["errors"] for r in runs if r["mode"] == mode)}
    host = host_servicings(args.repeat, args.timing)
    result = {"timing": make_timing(args.timing).to_dict(), "repeat": args.repeat, "handovers": rows, "runs": runs,
              "iops": iops, "host": host, "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                                      "python": platform.python_version(),
                                                      "load_average": round(os.getloadavg()[0], 2)}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"NVMe IO blackout across a driver handover, {args.timing} timing {result['timing']}, "
          f"{args.repeat} each (median, min-max ms):")
    for mode, row in rows.items():
        print(f"  {mode:9s} {row['blackout_ms']['median']:7.1f}  ({row['blackout_ms']['min']}-{row['blackout_ms']['max']})"
              f"  paths {row['paths']}  errors {row['errors']}")
    for r in iops:
        print(f"  QD {r['qd']:2d}: {r['iops']} IOPS, latency p50 {r['latency_ms']['p50']} ms, p99 {r['latency_ms']['p99']} ms")
    print(f"Whole servicings of a host (guest disk IO {HOST_RATE} IO/s at QD {HOST_QD}; median, min-max ms):")
    for mode, row in host["paths"].items():
        b = row["io_blackout_ms"]
        print(f"  {mode:9s} {b['median']:7.1f}  ({b['min']}-{b['max']})  servicing {row['total_ms_median']} ms  "
              f"paths {row['paths']}  IO errors {row['io_errors']}  admin commands {row['admin_commands']}")
    print(f"  verified: {host['verified']}")
    return 0


if __name__ == "__main__":
    proc.signals_interrupt()
    sys.exit(main())
