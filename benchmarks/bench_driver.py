"""Driver benchmark: fresh bring-up vs keepalive restore, and data-path frames/s.

`python -m benchmarks.bench_driver [--repeat N] [--frames N] [--out PATH]`

For each device timing profile (`natural`: nothing modelled; `realistic`: FLR 100 ms, 1 ms per HWC
request) against the emulator in its own process over vfio-user:
- fresh: `ManaDevice.new` on a device without an HWC (connect, map memory, ESTABLISH_HWC, ... QUERY_DEV_CONFIG);
- fresh after keepalive state without restoring it: the NoReset attempt fails, FLR, fresh init
  (`fresh_mana_device`), what a servicing without keepalive costs when the old driver left the HWC alive;
- restore: `ManaDevice.restore` from saved state (no ESTABLISH_HWC, no REGISTER_DEVICE, no FLR);
each also with the first vport opened ("+ vport"). Then loopback frames/s over vfio-user and in-process
(the emulator core called directly: the driver's own cost). Results go to benchmarks/results/driver.json.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import platform
import statistics
import sys
import tempfile
import time

from vfkeep import proc
from vfkeep.device.main import start_device
from vfkeep.device.timing import PRESETS
from vfkeep.driver.mana import ManaDevice
from vfkeep.memory import DmaManager, GuestMemory, MemoryLayout
from vfkeep.paravisor.vf_manager import fresh_mana_device, nic_dma_clients, release_nic_buffers
from vfkeep.vfio_user import control_call
from vfkeep.vfio_user.backing import open_vfio, reset_method_setter

from .args import at_least, report_path

LAYOUT = MemoryLayout(guest_pages=16, worker_pages=2048, pool_pages=64)
PCI_ID = "bench0"
RESULTS = pathlib.Path(__file__).parent / "results" / "driver.json"


def ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def summary(samples: list[float]) -> dict:
    return {"median_ms": ms(statistics.median(samples)), "min_ms": ms(min(samples)), "max_ms": ms(max(samples)),
            "n": len(samples)}


def timed(fn):
    t = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - t


def handover(dma: DmaManager, mem: GuestMemory) -> DmaManager:
    """What the next worker sees: a DMA manager restored from this one's state, worker RAM scrubbed."""
    state = dma.save()
    mem.scrub_worker_ram()
    new = DmaManager(mem, strict_pool=False)
    new.restore(state)
    return new


def bench_bringup(sock: str, mem: GuestMemory, repeat: int) -> dict:
    """Samples of fresh, fresh-with-FLR and restore, each without and with the first vport."""
    samples: dict[str, list[float]] = {k: [] for k in ("fresh", "fresh_vport", "fresh_flr", "fresh_flr_vport",
                                                        "restore", "restore_vport")}
    setter = reset_method_setter(sock)
    for round_ in range(repeat + 1):  # round 0 warms caches and the device up and is not counted
        dma = DmaManager(mem, strict_pool=False)
        t0 = time.perf_counter()
        dev = ManaDevice.new(open_vfio(sock, mem, nic_dma_clients(dma, PCI_ID, True)), PCI_ID)
        t1 = time.perf_counter()
        dev.open_vport(0)
        samples["fresh"].append(t1 - t0)
        samples["fresh_vport"].append(time.perf_counter() - t0)
        state = dev.save()

        dma = handover(dma, mem)
        t0 = time.perf_counter()
        dev = ManaDevice.restore(open_vfio(sock, mem, nic_dma_clients(dma, PCI_ID, True), restore=True), PCI_ID,
                                 state.SerializeToString())
        t1 = time.perf_counter()
        dev.open_vport(0)
        samples["restore"].append(t1 - t0)
        samples["restore_vport"].append(time.perf_counter() - t0)
        dev.save()

        # Non-keepalive path over a device that still has the HWC: NoReset fails, FLR, fresh init.
        dma = handover(dma, mem)
        release_nic_buffers(dma, PCI_ID)
        t0 = time.perf_counter()
        dev, flr = fresh_mana_device(lambda: open_vfio(sock, mem, nic_dma_clients(dma, PCI_ID, True)), setter, PCI_ID)
        t1 = time.perf_counter()
        dev.open_vport(0)
        assert flr, "the NoReset attempt was expected to fail on a device that kept its HWC"
        samples["fresh_flr"].append(t1 - t0)
        samples["fresh_flr_vport"].append(time.perf_counter() - t0)
        dev.shutdown()
        if round_ == 0:
            for v in samples.values():
                v.clear()
    return {k: summary(v) for k, v in samples.items()}


def loop_frames(vport, frames: list[bytes]) -> int:
    """Loop `frames` through the device with at most one receive ring of frames in flight."""
    window, sent, got, n = vport.data._rx_nbuf, 0, 0, len(frames)
    while got < n:
        room = min(128, window - (sent - got), n - sent)
        if room > 0:
            sent += vport.data.send(frames[sent:sent + room])
        received = vport.data.receive_into(lambda view: None, 256, timeout=1.0 if sent > got else 0)
        if not received and sent == n and sent > got and not vport.data.wait(1.0):
            break
        got += received
    return got


def bench_datapath(make_device, nframes: int, size: int) -> dict:
    dev = make_device()
    vport = dev.open_vport(0)
    frames = [i.to_bytes(4, "little") * (size // 4) for i in range(nframes)]
    loop_frames(vport, frames[:256])  # warm up
    got, elapsed = timed(lambda: loop_frames(vport, frames))
    dev.shutdown()
    return {"frames": nframes, "frame_bytes": size, "received": got, "seconds": round(elapsed, 4),
            "frames_per_s": round(got / elapsed), "mbit_per_s": round(got * size * 8 / elapsed / 1e6, 1)}


def bench_inprocess(nframes: int, size: int) -> dict:
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "tests"))
    from driver_helpers import InProcessBench  # the emulator core behind the driver's backing interface

    with GuestMemory.create(LAYOUT) as mem:
        bench = InProcessBench(mem)
        try:
            return bench_datapath(lambda: ManaDevice.new(bench.connect(DmaManager(mem, strict_pool=False), PCI_ID),
                                                         PCI_ID), nframes, size)
        finally:
            bench.device.close()


def run(repeat: int, nframes: int) -> dict:
    results: dict = {"bringup": {}, "datapath": {}}
    with tempfile.TemporaryDirectory(prefix="vfkeep-bench-") as tmp, GuestMemory.create(LAYOUT) as mem:
        for timing in ("natural", "realistic"):
            sock = os.path.join(tmp, f"{timing}.sock")
            dev_proc = start_device(sock, *PRESETS[timing].to_args(), "--reset-method", "none", "--run-dir", tmp)
            try:
                results["bringup"][timing] = bench_bringup(sock, mem, repeat)
                if timing == "natural":
                    for size in (64, 1500):
                        results["datapath"][f"vfio_user_{size}"] = bench_datapath(
                            lambda: ManaDevice.new(open_vfio(sock, mem, nic_dma_clients(
                                DmaManager(mem, strict_pool=False), PCI_ID, True)), PCI_ID), nframes, size)
                results["bringup"][timing]["timing"] = PRESETS[timing].to_dict()
                results["bringup"][timing]["device_counters"] = {
                    k: v for k, v in control_call(sock + ".ctl", "counters")["counters"].items()
                    if k in ("reset_count", "modelled_flr_ms_total", "modelled_hwc_ms_total", "hwc_requests")}
            finally:
                proc.end(dev_proc)
    results["datapath"]["in_process_64"] = bench_inprocess(nframes, 64)
    for timing, r in results["bringup"].items():
        r["ratios"] = {
            "fresh_over_restore": round(r["fresh"]["median_ms"] / r["restore"]["median_ms"], 2),
            "fresh_flr_over_restore": round(r["fresh_flr"]["median_ms"] / r["restore"]["median_ms"], 2),
            "fresh_vport_over_restore_vport": round(r["fresh_vport"]["median_ms"] / r["restore_vport"]["median_ms"],
                                                    2),
        }
    results["meta"] = {"repeat": repeat, "python": platform.python_version(), "machine": platform.machine(),
                       "cpus": os.cpu_count(), "layout": LAYOUT.to_str(),
                       "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    return results


def report(results: dict) -> None:
    print("bring-up (median ms)        natural  realistic")
    rows = [("fresh", "fresh"), ("fresh + vport", "fresh_vport"), ("fresh after FLR", "fresh_flr"),
            ("fresh after FLR + vport", "fresh_flr_vport"), ("restore (keepalive)", "restore"),
            ("restore + vport", "restore_vport")]
    b = results["bringup"]
    for label, key in rows:
        print(f"  {label:<25} {b['natural'][key]['median_ms']:>8.2f} {b['realistic'][key]['median_ms']:>10.2f}")
    for ratio in ("fresh_over_restore", "fresh_flr_over_restore", "fresh_vport_over_restore_vport"):
        print(f"  {ratio:<25} {b['natural']['ratios'][ratio]:>7.2f}x {b['realistic']['ratios'][ratio]:>9.2f}x")
    print("data path (loopback)")
    for name, d in results["datapath"].items():
        print(f"  {name:<25} {d['frames_per_s']:>8} frames/s  {d['mbit_per_s']:>8} Mbit/s  "
              f"({d['received']}/{d['frames']} frames)")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=at_least(1, int), default=9, help="bring-up samples per path and timing")
    ap.add_argument("--frames", type=at_least(1, int), default=20000, help="frames per data-path run")
    ap.add_argument("--out", type=lambda text: pathlib.Path(report_path(text)), default=RESULTS)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)  # the NoReset -> FLR retry warns by design
    results = run(args.repeat, args.frames)
    report(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    proc.signals_interrupt()
    main()
