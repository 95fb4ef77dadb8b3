"""How the guest's blackout depends on the device timing model: four servicing paths over HWC latency x FLR.

`python -m benchmarks.bench_sensitivity [--latencies 0,0.25,1,4] [--flrs 10,100] [--repeat N] [--rate FPS]
[--out PATH]`

No public source gives a MANA per-request HWC latency, so this sweeps it (README "Device timing"). For each
(FLR, HWC latency) cell: one `vfkeep run --no-console --datapath-keepalive` host with those device parameters,
guest traffic at --rate frames/s, one warm-up round, then --repeat rounds of one servicing per path of
`vfkeep.servicing_paths` (reset-flr, reset, keepalive, keepalive+datapath), interleaved, so every path of a
cell sees the same machine load. Per path: the guest's blackout (median, p95) and frames lost, and the HWC
requests, SMC messages and FLRs the device counted.

The floor of a path is the critical path of its necessary steps, each at its best (`floor_terms`), in a
servicing's order from the guest's last frame back (its blackout's start) to its first frame back:
1. save tail: the old worker's save after its relay stopped, before its state leaves (the DMA manager's state, the
   device's, the servicing state encoded and framed). Measured for keepalive+datapath (`save_kept`, in
   `kept_steps_ms`), whose save sends the device nothing; on the other paths that part of the save is mostly device
   requests (the vport's teardown, or the shutdown), counted in 5., and the rest is left out (0: a lower bound).
2. handoff: the saved state to a prelaunched process that parses it and answers one byte: the two process
   wake-ups of a servicing's handoff, the state's to the host and the host's go to the next worker. (The next
   worker's parse itself runs during the scrub: a few us counted in series.)
3. scrub and reconnect: worker RAM filled at memset speed; the vfio-user reconnect of a kept device as a keepalive
   restore makes it (one pipelined batch of VERSION, DEVICE_GET_INFO, DMA_MAP, REGION_INFO and IRQ_INFO, one
   register-map read, one pipelined pair of SET_IRQS). On the keepalive paths the next worker sends that attach
   once it has the state, while the host scrubs (`ManaKind.attach_ahead`), so the two can overlap and the floor
   counts the larger; they do not always overlap on two CPUs shared with the guest agent and the device (the
   attach went out before the go in 78 of 159 traced data-path keepalive servicings in session 13), but the
   design allows it, so the larger is the lower bound. On the reset paths the next worker opens its device only
   after the go: their sum.
4. restore: the next worker's work from the go to its relay running. For keepalive+datapath measured whole
   (`restore_kept`: the DMA manager and the device with its kept vport restored from the attach made ahead, the
   validation, the relay started); on the other paths the relay's start alone (`relay_start`, every path pays it):
   the rest of their restore runs among device requests counted in 5., and its own CPU is left out.
5. the device: per device round trip (HWC request or SMC message) the measured cost of one request at zero
   modelled latency, plus the modelled latency per HWC request and the modelled FLR wait per FLR, counting only the
   round trips and FLRs the device logged before the guest's blackout ended (the ones the data path waited for).
6. one data round trip: the blackout ends only when a frame the guest sent comes back, guest -> relay -> device ->
   relay -> guest, so the floor counts the guest's RTT p50 of the undisturbed traffic at the same rate, measured
   in the same cell between the servicings (`undisturbed`). A lower bound: with no servicing at all the blackout
   metric, the longest gap in its window, reads more than one median round trip (`undisturbed_blackout_ms`,
   printed beside it).
Up to session 13 the floor of every path was 2. + scrub + reconnect + 5. + 6.: a lower bound but not the critical
path (it counted the reconnect in series and left out 1. and 4.). Each row keeps that floor and its ratio beside
the new ones (`old_floor_ms`, `over_old_floor`), so a ratio that moved because the floor changed reads as such.
The device round trips a path waits for are the fewest any of its servicings in the cell waited for (a slow
servicing whose blackout outlasted a deferred request does not raise the floor). The fixed costs are measured in
micro-benchmarks, a batch before the first cell and one after each, each cost the 10th percentile of its samples of
every batch pooled (`at_best`; one batch taken while something else ran moves it little): on a 2-CPU machine shared
with other work a sample also waits for a CPU another process holds, which the step does not need, and the median
counted that (a reconnect read 1.4-2.8 ms by median at load 6-8 while its client and its device each used 0.55-0.75
ms of CPU; its 10th percentile 1.1-1.25). The median of each sampled cost is kept beside it in the JSON
(`*_median_ms`). The scrub is measured on worker RAM that is not in the CPU's caches, as a servicing's scrub finds
it: nothing touches most of it between two servicings, seconds apart while other work runs, and OpenHCL's VTL2 RAM
is larger than any cache (the host's scrub inside a servicing took 0.84-1.3 ms of CPU); before each sample a buffer
twice the largest cache is written. Measured warm, the same 7 MiB stayed in a 32 MiB cache and read 0.19-0.33 ms,
less than a servicing can pay. The reconnect is measured after 5 ms idle, as between two workers (the device has
served the last client's disconnect and waits, the client was blocked), not back to back. The save tail and the
restore are measured in a process that has run them before: an old worker has rehearsed its save
(`Worker._warm_save_path`) and a prelaunched next worker its restore, on scratch things before its hello
(`Worker.rehearse_restore`), but that restore then runs after an idle spell, its caches cold, and pays more than
this (a lower bound). Reported: median / floor
per path. A floor above its path's median is not a lower bound: the run says so (`floors_above_median`).
A servicing the guest traffic did not measure is counted per path (`unmeasured`), not a failed run.
Results: results/sensitivity.json and .png.
"""
from __future__ import annotations

import argparse
import ctypes
import glob
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import time

from vfkeep import proc
from vfkeep.contract import Channel, save_state_messages
from vfkeep.device.main import start_device
from vfkeep.device.timing import MAX_FLR_MS, MAX_HWC_LATENCY_MS, DeviceTiming
from vfkeep.driver.mana import ManaDevice
from vfkeep.guest.ring import ChannelLayout, NicChannel
from vfkeep.guest.stats import percentile
from vfkeep.host.vmm import DEFAULT_RING_SLOTS, WORKER_BASE_PAGES, WORKER_PAGES_PER_NIC
from vfkeep.memory import DmaManager, GuestMemory, MemoryLayout
from vfkeep.paravisor.device_kind import PreviousState
from vfkeep.paravisor.mana_kind import ManaKind
from vfkeep.paravisor.options import KeepAliveConfig
from vfkeep.paravisor.rehearsal import generation, resume, settle
from vfkeep.paravisor.servicing import (begin_servicing_state, decode_servicing_state, finish_servicing_state,
                                        reference_time)
from vfkeep.paravisor.vf_manager import nic_dma_clients
from vfkeep.proto import underhill_pb2
from vfkeep.servicing_paths import ORDER, REQUESTS, unexpected, wait_steady
from vfkeep.vfio_user.control import control_call
from vfkeep.vfio_user import VfioDevice
from vfkeep.vfio_user.backing import open_vfio
from vfkeep.vfio_user.protocol import IRQ_MSIX, REGION_BAR0

from .args import at_least, report_path
from .traffic_host import TrafficHost, pyplot, summary, write

LATENCIES = (0.0, 0.25, 1.0, 4.0)
FLRS = (10.0, 100.0)
#: Worker RAM the host scrubs at each servicing with one NIC.
WORKER_PAGES = WORKER_BASE_PAGES + WORKER_PAGES_PER_NIC
#: An undisturbed window between servicings: long enough for a few hundred frames at the default rate.
UNDISTURBED_S = 0.1
COUNTS = tuple(f"{p}{k}" for p in ("", "critical_") for k in ("hwc_requests", "smc_messages", "device_resets"))
COLORS = {"reset-flr": "tab:red", "reset": "tab:orange", "keepalive": "tab:blue", "keepalive+datapath": "tab:green"}


def service(host: TrafficHost, path: str, rate: float) -> dict:
    """One servicing on `path`, checked to have taken it. Device counts (one NIC): over the whole servicing,
    and `critical_*`: the HWC requests and SMC messages the device logged before the guest's blackout ended
    (what the data path waited for; later ones, e.g. after the relay restarted, cost the guest nothing)."""
    ctl = os.path.join(host.run_dir, "nic0.sock.ctl")
    seq = control_call(ctl, "command_log", since=1 << 62)["last_seq"]
    r = host.service(**REQUESTS[path])
    bad = unexpected(path, r)
    if bad:
        raise RuntimeError(f"{path}: {'; '.join(bad)}: {r}")
    if r["blackout_ms"] is None:  # the guest agent had no numbers for the window: counted, not a failed run
        print(f"  {path}: the guest traffic did not measure this servicing (counted as unmeasured)", flush=True)
        wait_steady(host.traffic, rate)
        return {"blackout_ms": None}
    (window,) = host.traffic("status")["last_servicing"]
    end_s = window["blackout_end_ns"] / 1e9
    before = [e for e in control_call(ctl, "command_log", since=seq)["entries"] if e["t"] < end_s]
    wait_steady(host.traffic, rate)  # the backlog drains before the next servicing
    (nic,) = r["nics"]
    return {"blackout_ms": r["blackout_ms"], "frames_lost": r["frames_lost"],
            **{k: nic[k] for k in ("hwc_requests", "smc_messages", "device_resets")},
            "critical_hwc_requests": sum(e["kind"] == "hwc" for e in before),
            "critical_smc_messages": sum(e["kind"] == "smc" for e in before),
            "critical_device_resets": sum(e["kind"] == "flr" for e in before)}


def undisturbed(host: TrafficHost, window_s: float = UNDISTURBED_S) -> dict:
    """The guest's traffic over a window with no servicing: its RTT p50 (one data round trip, what the floor
    counts) and what its blackout metric reads there."""
    since = time.monotonic_ns()
    time.sleep(window_s)
    (nic,) = host.traffic("stats", since_ns=since, until_ns=time.monotonic_ns())["nics"]
    return {"rtt_ms": nic["rtt_ms"]["p50"], "blackout_ms": nic["blackout_ms"]}


def measure_cell(timing: DeviceTiming, repeat: int, rate: float) -> tuple[dict[str, list[dict]], dict, bytes]:
    """All paths of one cell, interleaved, with an undisturbed window after each round (its median RTT p50 and
    blackout); also the last keepalive+datapath saved state (for the handoff cost)."""
    with TrafficHost.running(1, True, timing, "--datapath-keepalive") as host:
        host.run_traffic(rate)
        for path in ORDER:  # warm-up round: page cache, first restore
            service(host, path, rate)
        samples: dict[str, list[dict]] = {path: [] for path in ORDER}
        quiet = []
        for _ in range(repeat):
            for path in ORDER:
                samples[path].append(service(host, path, rate))
            quiet.append(undisturbed(host))
        with open(os.path.join(host.run_dir, "servicing_state.bin"), "rb") as f:
            blob = f.read()
    return samples, {k: round(statistics.median(q[k] for q in quiet), 3) for k in ("rtt_ms", "blackout_ms")}, blob


# -- fixed costs (micro-benchmarks of the necessary steps) ----------------------------------------------------
CHILD = """
import sys
from vfkeep.proto import underhill_pb2
r, w = sys.stdin.buffer, sys.stdout.buffer
w.write(b"r"); w.flush()
while head := r.read(4):
    underhill_pb2.ServicingState().ParseFromString(r.read(int.from_bytes(head, "little")))
    w.write(b"k"); w.flush()
"""


def handoff_ms(blob: bytes, n: int) -> list[float]:
    """Saved state to a prelaunched process (imports done) that parses it and answers one byte (samples, ms)."""
    child = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
    try:
        assert child.stdout.read(1) == b"r"
        frame = struct.pack("<I", len(blob)) + blob
        samples = []
        for _ in range(n):
            t = time.perf_counter()
            child.stdin.write(frame)
            child.stdout.read(1)
            samples.append((time.perf_counter() - t) * 1000)
        return samples
    finally:
        child.stdin.close()
        proc.end(child)


def cache_bytes() -> int:
    """The largest CPU cache the kernel reports (sysfs), or 32 MiB when it reports none."""
    sizes = []
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        try:
            with open(path) as f:
                text = f.read().strip()
            sizes.append(int(text[:-1]) * {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[text[-1]])
        except (OSError, ValueError, KeyError, IndexError):
            continue
    return max(sizes, default=32 << 20)


def at_best(samples: list[float]) -> float:
    """A fixed cost from its samples: their 10th percentile (nearest rank), what the step costs when no other
    process held a CPU it needed (the module docstring says why not the median)."""
    return percentile(sorted(samples), 10)


def scrub_ms(mem: GuestMemory, n: int) -> list[float]:
    """Worker RAM filled at memset speed as a servicing finds it: not in the CPU's caches. Before each sample a
    buffer twice the largest cache is written, which evicts it. (samples, ms)"""
    region = mem.layout.worker
    view = mem.view(region.base_pfn * 4096, region.pages * 4096)
    buf = (ctypes.c_char * len(view)).from_buffer(view)
    evict = ctypes.create_string_buffer(2 * cache_bytes())
    samples = []
    for _ in range(n):
        ctypes.memset(evict, 0x5A, len(evict))
        t = time.perf_counter()
        ctypes.memset(buf, 0xDB, len(view))
        samples.append((time.perf_counter() - t) * 1000)
    del buf
    view.release()
    return samples


def reconnect_ms(sock: str, mem: GuestMemory, n: int) -> list[float]:
    """vfio-user reconnect of a kept device as a keepalive restore does it: connect, then VERSION, DEVICE_GET_INFO,
    one DMA_MAP, REGION_INFO, IRQ_INFO, the read of the 40-byte register map and SET_IRQS for the HWC's vector and
    a kept vport's, all pipelined (one round trip). Each after 5 ms idle, as in a servicing: the device has served
    the last client's disconnect and waits, the client process was blocked. (samples, ms)"""
    samples = []
    for _ in range(n):
        time.sleep(0.005)
        t = time.perf_counter()
        dev, *_ = VfioDevice.restore_mapped(sock, mem, REGION_BAR0, IRQ_MSIX, read=(0, 40), irqs=(0, 1))
        samples.append((time.perf_counter() - t) * 1000)
        dev.close()
    return samples


def request_ms(sock: str, mem: GuestMemory, n: int) -> list[float]:
    """One HWC request at zero modelled latency, back to back on an up device (the driver's round trip; samples,
    ms)."""
    dma = nic_dma_clients(DmaManager(mem, strict_pool=False), "bench0", True)
    dev = ManaDevice.new(open_vfio(sock, mem, dma), "bench0")
    try:
        for _ in range(10):
            dev.gdma.verify_vf_driver_version()
        samples = []
        for _ in range(n):
            t = time.perf_counter()
            dev.gdma.verify_vf_driver_version()
            samples.append((time.perf_counter() - t) * 1000)
        return samples
    finally:
        dev.shutdown()


#: The guest rings of the kept-state servicings (`kept_steps_ms`): one NIC's, as the host lays them out.
CHANNELS = ChannelLayout(nics=1, slots=DEFAULT_RING_SLOTS)
ENABLED = KeepAliveConfig.ENABLED_HOST_AND_PRIVATE_POOL_PRESENT


def _started(kind: ManaKind, dma: DmaManager) -> None:
    """The rest of a worker's start once its relays run: the deferred probe and the monitor (`VfManager.run`), then
    its rehearsal of the save (`Worker._warm_save_path`), all outside the measured steps."""
    for vf in kind.vf_managers:
        vf.run()
    dma.save()
    kind.rehearse_save(underhill_pb2.ServicingState())


def kept_steps_ms(sock: str, mem: GuestMemory, n: int) -> dict[str, list[float]]:
    """The workers' own steps of a data-path keepalive servicing, each sample one servicing of one NIC run in this
    process with the workers' code (`ManaKind`, `DmaManager`) against the device process (samples, ms):
    - `save_kept`: the old worker's save after its relay stopped (the guest's last frames are back): the DMA
      manager's state, the device's with its HWC and kept vport, the servicing state completed and encoded, and the
      host's messages framed (their send is the handoff's);
    - `restore_kept`: the next worker's restore from the go to its relay running (the attach sent ahead and
      answered and the DMA state checked ahead, as the host's scrub leaves them): the DMA manager and the device
      restored, the validation, the relay started;
    - `relay_start`: the end of `restore_kept`, from the relay's start to it running (every path pays it).
    Each worker generation follows the last, as in servicings; the save path rehearsed as a worker does. Measured
    in a process that has run them before, back to back (a next worker restores once in its life, after its
    rehearsal on scratch things and an idle spell: more than this). A device
    request (HWC or SMC) inside the steps is an error: their round trips are counted apart."""
    ctl = sock + ".ctl"
    rings = NicChannel.create(mem, CHANNELS, 0)
    samples: dict[str, list[float]] = {"save_kept": [], "restore_kept": [], "relay_start": []}
    kind, dma = generation(sock, mem, rings, CHANNELS), DmaManager(mem)
    try:
        kind.configure(dma)
        kind.restore(PreviousState(), ENABLED)
        dma.validate_restore()
        resume(kind, "fresh", CHANNELS)
        _started(kind, dma)
        for i in range(n + 1):  # the first servicing warms up and is not counted
            state = underhill_pb2.ServicingState()
            begin_servicing_state(state, nics=kind.emuplat(), correlation_id=None,
                                  vm_stop_reference_time=reference_time())
            kind.stop()
            seq = control_call(ctl, "command_log", since=1 << 62)["last_seq"]
            t = time.perf_counter()
            dma_state = dma.save()
            outcomes = kind.save(True, state)
            finish_servicing_state(state, dma_state=dma_state, flush_logs_us=0)
            blob = state.SerializeToString()
            for msg in save_state_messages(blob, tuple(outcomes), {"total": 0.0}):
                Channel.frame(msg.to_json())
            save_ms = (time.perf_counter() - t) * 1000
            for vf in kind.vf_managers:
                vf.channel.close()
            decoded = decode_servicing_state(blob, downlevel=False)
            mem.scrub_worker_ram()
            kind, dma = generation(sock, mem, rings, CHANNELS), DmaManager(mem)
            kind.attach_ahead(decoded, ENABLED)
            dma.prepare_restore(decoded.init_state.dma_manager_state)
            settle(kind)
            go = time.monotonic_ns()
            dma.restore(decoded.init_state.dma_manager_state)
            kind.configure(dma)
            kind.restore(PreviousState(decoded), ENABLED)
            dma.validate_restore()
            start = time.monotonic_ns()
            vf = resume(kind, "keepalive", CHANNELS)
            requests = [e["name"] for e in control_call(ctl, "command_log", since=seq)["entries"]
                        if e["kind"] in ("hwc", "smc")]
            if requests:
                raise RuntimeError(f"device requests inside the kept-state steps: {requests}")
            if i:
                samples["save_kept"].append(save_ms)
                samples["restore_kept"].append((vf.relay.running_ns - go) / 1e6)
                samples["relay_start"].append((vf.relay.running_ns - start) / 1e6)
            _started(kind, dma)
        return samples
    finally:
        kind.shutdown()
        for vf in kind.vf_managers:
            if vf.channel is not None:
                vf.channel.close()
        rings.close()


FIXED = ("request", "reconnect", "scrub", "handoff", "save_kept", "restore_kept", "relay_start")


def fixed_cost_samples(blob: bytes | None, n: int = 200) -> dict[str, list[float]]:
    """One batch of samples of each fixed cost, ms (the handoff's only once a cell gave a saved state, `blob`)."""
    layout = MemoryLayout(guest_pages=CHANNELS.total_pages, worker_pages=WORKER_PAGES, pool_pages=512)
    with tempfile.TemporaryDirectory(prefix="vfkeep-bench-") as tmp, GuestMemory.create(layout) as mem:
        sock = os.path.join(tmp, "nic.sock")
        device = start_device(sock, "--timing", "natural", "--reset-method", "none", "--run-dir", tmp)
        try:
            batch = {"request": request_ms(sock, mem, n), "reconnect": reconnect_ms(sock, mem, n // 2),
                     **kept_steps_ms(sock, mem, n // 8), "scrub": scrub_ms(mem, n // 4)}
        finally:
            proc.end(device)
    batch["handoff"] = handoff_ms(blob, n) if blob else []
    return batch


def fixed_costs(batches: list[dict[str, list[float]]], blob_bytes: int) -> dict:
    """Each fixed cost at best (`at_best`) over the samples of every batch pooled, its median beside it. The
    batches were taken apart in time (before the first cell and after each): one taken while something else held
    the CPUs (a request's round trip read 0.72 ms at its 10th percentile in one batch, 0.34-0.38 in the next three)
    then moves the pooled 10th percentile little, where alone it made the floors of the reset paths read above their
    medians."""
    costs: dict = {}
    for name in FIXED:
        pooled = sorted(x for b in batches for x in b[name])
        costs[f"{name}_ms"] = round(at_best(pooled), 4)
        costs[f"{name}_median_ms"] = round(statistics.median(pooled), 4)
        costs[f"{name}_batches_ms"] = [round(at_best(sorted(b[name])), 4) for b in batches if b[name]]
    costs["blob_bytes"] = blob_bytes
    return costs


#: The paths whose next worker sends its device attach ahead, while the host scrubs (`ManaKind.attach_ahead`: saved
#: state and keepalive enabled): their reconnect can overlap the scrub.
ATTACH_AHEAD = frozenset({"keepalive", "keepalive+datapath"})
#: The path whose workers save and restore the kept state with no device request (DESIGN D7): its save's end and its
#: restore are measured whole (`kept_steps_ms`).
KEPT_STATE = "keepalive+datapath"


def floor_terms(path: str, counts: dict, timing: DeviceTiming, costs: dict, rtt_ms: float) -> dict[str, float]:
    """The floor of a servicing on `path` whose data path waited for these device round trips and then carried one
    frame around (`rtt_ms`, the undisturbed traffic's), step by step along its critical path (ms; the module
    docstring says why each is there); the floor is their sum."""
    hwc, smc, flr = (counts[f"critical_{k}"] for k in ("hwc_requests", "smc_messages", "device_resets"))
    kept = path == KEPT_STATE
    scrub, reconnect = costs["scrub_ms"], costs["reconnect_ms"]
    return {"save_tail": costs["save_kept_ms"] if kept else 0.0,
            "handoff": costs["handoff_ms"],
            "scrub_reconnect": max(scrub, reconnect) if path in ATTACH_AHEAD else scrub + reconnect,
            "restore": costs["restore_kept_ms"] if kept else costs["relay_start_ms"],
            "device": (hwc + smc) * costs["request_ms"] + hwc * timing.hwc_latency_ms + flr * timing.flr_ms,
            "data_rtt": rtt_ms}


def floor_ms(path: str, counts: dict, timing: DeviceTiming, costs: dict, rtt_ms: float) -> float:
    """The least a servicing on `path` can cost (`floor_terms`, summed)."""
    return sum(floor_terms(path, counts, timing, costs, rtt_ms).values())


def old_floor_ms(counts: dict, timing: DeviceTiming, costs: dict, rtt_ms: float) -> float:
    """The floor as defined up to session 13, for every path: handoff, scrub and reconnect in series, the device
    round trips and one data round trip; no save tail, no restore. Printed beside the floor so that a ratio that
    moved because the floor changed reads as such."""
    terms = floor_terms("reset", counts, timing, costs, rtt_ms)
    return terms["handoff"] + terms["scrub_reconnect"] + terms["device"] + terms["data_rtt"]


# -- run, summarise, plot ---------------------------------------------------------------------------------------
def run(latencies: list[float], flrs: list[float], repeat: int, rate: float) -> tuple[list[dict], dict]:
    raw, blob = [], b""
    batches = [fixed_cost_samples(None)]
    for flr in flrs:
        for latency in latencies:
            timing = DeviceTiming(hwc_latency_ms=latency, flr_ms=flr)
            load = os.getloadavg()[0]
            t = time.monotonic()
            samples, quiet, blob = measure_cell(timing, repeat, rate)
            samples = {p: measured(p, s) for p, s in samples.items()}
            raw.append((timing, samples, {"datapath_rtt_ms": quiet["rtt_ms"],
                                          "undisturbed_blackout_ms": quiet["blackout_ms"],
                                          "load_before": round(load, 2), "load_after": round(os.getloadavg()[0], 2),
                                          "wall_s": round(time.monotonic() - t, 1)}))
            print(f"FLR {flr:g} ms, HWC {latency:g} ms/request: median blackout " + ", ".join(
                f"{p} {statistics.median(x['blackout_ms'] for x in samples[p][0]):.1f}" for p in ORDER)
                + f" ms; with no servicing: RTT p50 {quiet['rtt_ms']:.2f} ms, longest gap {quiet['blackout_ms']:.2f} ms;"
                f" load {load:.1f}", flush=True)
            batches.append(fixed_cost_samples(blob))
    costs = fixed_costs(batches, len(blob))
    rows = []
    for timing, samples, meta in raw:
        for path in ORDER:
            s, unmeasured = samples[path]
            counts = {k: (min if k.startswith("critical_") else statistics.median)(x[k] for x in s) for k in COUNTS}
            terms = floor_terms(path, counts, timing, costs, meta["datapath_rtt_ms"])
            floor, old = sum(terms.values()), old_floor_ms(counts, timing, costs, meta["datapath_rtt_ms"])
            blackout = summary([x["blackout_ms"] for x in s])
            rows.append({"timing": timing.to_dict(), "path": path, "blackout_ms": blackout,
                         "frames_lost": summary([x["frames_lost"] for x in s]), **counts,
                         "floor_ms": round(floor, 3), "over_floor": round(blackout["median"] / floor, 2),
                         "floor_terms_ms": {k: round(v, 4) for k, v in terms.items()},
                         "old_floor_ms": round(old, 3), "over_old_floor": round(blackout["median"] / old, 2),
                         "unmeasured": unmeasured, **meta})
    return rows, costs


def measured(path: str, samples: list[dict]) -> tuple[list[dict], int]:
    """The servicings of `path` the guest traffic measured, and how many it did not; none measured is an error."""
    ok = [x for x in samples if x["blackout_ms"] is not None]
    if not ok:
        raise RuntimeError(f"{path}: no servicing of the cell was measured")
    return ok, len(samples) - len(ok)


def cell_ratios(rows: list[dict]) -> list[dict]:
    """Per cell: reset and reset-flr median blackout over keepalive+datapath's."""
    out = []
    for key in dict.fromkeys((r["timing"]["flr_ms"], r["timing"]["hwc_latency_ms"]) for r in rows):
        cell = {r["path"]: r["blackout_ms"]["median"] for r in rows
                if (r["timing"]["flr_ms"], r["timing"]["hwc_latency_ms"]) == key}
        base = cell["keepalive+datapath"]
        out.append({"flr_ms": key[0], "hwc_latency_ms": key[1],
                    **{f"{p}_over_datapath": round(cell[p] / base, 2) for p in ORDER if p != "keepalive+datapath"}})
    return out


def floors_above_median(rows: list[dict]) -> list[dict]:
    """The rows whose floor is above their median: there the floor is not the lower bound it claims to be."""
    return [{"flr_ms": r["timing"]["flr_ms"], "hwc_latency_ms": r["timing"]["hwc_latency_ms"], "path": r["path"],
             "over_floor": r["over_floor"]} for r in rows if r["blackout_ms"]["median"] < r["floor_ms"]]


def markdown(rows: list[dict], ratios: list[dict]) -> str:
    n = rows[0]["blackout_ms"]["n"] + rows[0]["unmeasured"]
    lines = [f"Guest blackout, ms: median / p95 of {n} servicings per path, (Nx; old Mx) = median / the path's floor "
             "and / the floor as defined up to session 13 (`old_floor_ms`); the last two columns: median / "
             "keepalive+datapath's.",
             "", "| FLR ms | HWC ms/request | " + " | ".join(ORDER) + " | reset / kp+dp | reset-flr / kp+dp |",
             "|---:|---:|" + "---:|" * (len(ORDER) + 2)]
    for ratio in ratios:
        cell = {r["path"]: r for r in rows
                if (r["timing"]["flr_ms"], r["timing"]["hwc_latency_ms"]) == (ratio["flr_ms"], ratio["hwc_latency_ms"])}
        lines.append(f"| {ratio['flr_ms']:g} | {ratio['hwc_latency_ms']:g} | " + " | ".join(
            f"{cell[p]['blackout_ms']['median']:.1f} / {cell[p]['blackout_ms']['p95']:.1f} "
            f"({cell[p]['over_floor']:.2f}x; old {cell[p]['over_old_floor']:.2f}x"
            f"{', %d unmeasured' % cell[p]['unmeasured'] if cell[p]['unmeasured'] else ''})"
            for p in ORDER)
            + f" | {ratio['reset_over_datapath']:.1f}x | {ratio['reset-flr_over_datapath']:.1f}x |")
    if bad := floors_above_median(rows):
        lines += ["", "NOT A LOWER BOUND: the floor is above the median of " + ", ".join(
            f"{b['path']} (FLR {b['flr_ms']:g}, HWC {b['hwc_latency_ms']:g}: {b['over_floor']:.2f}x)" for b in bad)
            + "; a fixed cost read higher than the servicings paid for it (`fixed_costs.*_batches_ms` in the JSON "
            "has each batch's): re-run on a quieter machine."]
    return "\n".join(lines)


def counts_markdown(rows: list[dict], costs: dict) -> str:
    """What each path cost the device (per servicing, the same in every cell) and the fixed costs."""
    lines = ["Device work per servicing, from the device's counters (first cell; `rows` in the JSON has every cell's); "
             "waited for: logged before the guest's blackout ended (the fewest of the path's servicings).", "",
             "| path | HWC requests | SMC messages | FLRs | waited for: HWC / SMC / FLR |",
             "|---|---:|---:|---:|---|"]
    for path in ORDER:
        r = next(r for r in rows if r["path"] == path)
        lines.append(f"| {path} | {r['hwc_requests']:g} | {r['smc_messages']:g} | {r['device_resets']:g} | "
                     f"{r['critical_hwc_requests']:g} / {r['critical_smc_messages']:g} / "
                     f"{r['critical_device_resets']:g} |")
    c = costs
    lines += ["", "Floor (each cost the 10th percentile of its samples, ms) = the old worker's save after its relay "
                  f"stopped (keepalive+datapath: {c['save_kept_ms']:.3f}; other paths: 0, their device requests are "
                  "counted below)",
              f"  + handoff {c['handoff_ms']:.3f} (a {c['blob_bytes']}-byte saved state to a prelaunched process, "
              "parsed, one byte back)",
              f"  + scrub {c['scrub_ms']:.3f} ({WORKER_PAGES} pages at memset speed, not in the cache) and vfio-user "
              f"reconnect {c['reconnect_ms']:.3f}: the larger of the two for keepalive and keepalive+datapath (the "
              "next worker's attach goes ahead during the scrub), their sum for the reset paths",
              f"  + the next worker's restore from the go to its relay running (keepalive+datapath: "
              f"{c['restore_kept_ms']:.3f}; other paths: the relay's start, {c['relay_start_ms']:.3f})",
              f"  + {c['request_ms']:.3f} per device round trip waited for (HWC request or SMC message) + the "
              "modelled latency per HWC request + the FLR wait per FLR waited for",
              f"  + one data round trip, the guest's RTT p50 with no servicing: {_spread(rows, 'datapath_rtt_ms')}.",
              "Old floor (up to session 13): handoff + scrub + reconnect + the round trips + one data round trip.",
              f"A lower bound: with no servicing the blackout metric (the longest gap) reads "
              f"{_spread(rows, 'undisturbed_blackout_ms')}."]
    return "\n".join(lines)


def _spread(rows: list[dict], key: str) -> str:
    """`key`'s one value in ms, or its range over the cells (naming the JSON key that has each cell's)."""
    lo, hi = min(r[key] for r in rows), max(r[key] for r in rows)
    return f"{lo:.3f} ms" if lo == hi else f"{lo:.3f}–{hi:.3f} ms (by cell: `{key}` in the JSON)"


def plot(rows: list[dict], path) -> None:
    """Blackout vs HWC latency, one line per servicing path (whisker p95), its floor dashed; a panel per FLR."""
    plt = pyplot()
    flrs = sorted({r["timing"]["flr_ms"] for r in rows})
    fig, axes = plt.subplots(1, len(flrs), figsize=(5.2 * len(flrs), 4.4), sharey=True, squeeze=False)
    for ax, flr in zip(axes[0], flrs):
        for name in ORDER:
            cells = sorted((r for r in rows if r["path"] == name and r["timing"]["flr_ms"] == flr),
                           key=lambda r: r["timing"]["hwc_latency_ms"])
            x = [r["timing"]["hwc_latency_ms"] for r in cells]
            med = [r["blackout_ms"]["median"] for r in cells]
            ax.errorbar(x, med, yerr=[[0] * len(cells), [r["blackout_ms"]["p95"] - m for r, m in zip(cells, med)]],
                        marker="o", capsize=3, color=COLORS[name], label=name)
            ax.plot(x, [r["floor_ms"] for r in cells], "--", color=COLORS[name], linewidth=0.9, alpha=0.7)
        ax.set_yscale("log")
        ax.set_xscale("symlog", linthresh=0.25, linscale=0.5)
        ax.set_xticks(sorted({r["timing"]["hwc_latency_ms"] for r in rows}),
                      [f"{v:g}" for v in sorted({r["timing"]["hwc_latency_ms"] for r in rows})])
        ax.set_xlabel("modelled HWC latency, ms per request")
        ax.set_title(f"FLR {flr:g} ms")
        ax.grid(alpha=0.3, which="both")
    axes[0, 0].set_ylabel("guest blackout ms (median, whisker p95; dashed: floor)")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle("Blackout across servicing vs the device timing model", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _ms_list(limit: float):
    """argparse type: comma-separated milliseconds, each in [0, limit] (the device's own bounds)."""
    def parse(text: str) -> list[float]:
        try:
            values = [float(x) for x in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(f"comma-separated numbers of ms expected, got {text!r}") from None
        if not all(0 <= v <= limit for v in values):
            raise argparse.ArgumentTypeError(f"each value must be in [0, {limit:g}] ms, got {text!r}")
        return values
    return parse


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--latencies", type=_ms_list(MAX_HWC_LATENCY_MS), default=list(LATENCIES),
                    help=f"HWC latencies, ms, comma-separated (default: {','.join(f'{x:g}' for x in LATENCIES)})")
    ap.add_argument("--flrs", type=_ms_list(MAX_FLR_MS), default=list(FLRS),
                    help=f"FLR waits, ms, comma-separated (default: {','.join(f'{x:g}' for x in FLRS)})")
    ap.add_argument("--repeat", type=at_least(1, int), default=10, help="servicings per path and cell")
    ap.add_argument("--rate", type=at_least(1), default=10000, help="guest frames/s during the servicings")
    ap.add_argument("--out", type=report_path, help="JSON path (default benchmarks/results/sensitivity.json)")
    args = ap.parse_args(argv)
    t = time.monotonic()
    rows, costs = run(args.latencies, args.flrs, args.repeat, args.rate)
    ratios = cell_ratios(rows)
    path = write("sensitivity", {"repeat": args.repeat, "rate_fps": args.rate, "frame_size": 128, "nics": 1,
                                 "prelaunch": True, "paths": list(ORDER), "fixed_costs": costs,
                                 "wall_s": round(time.monotonic() - t, 1), "rows": rows, "ratios": ratios,
                                 "floors_above_median": floors_above_median(rows)}, args.out)
    plot(rows, path.with_suffix(".png"))
    print(markdown(rows, ratios), counts_markdown(rows, costs), sep="\n\n")
    print(f"wrote {path} and {path.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    proc.signals_interrupt()
    sys.exit(main())
