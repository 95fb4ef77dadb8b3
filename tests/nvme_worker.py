"""A worker-like child process for the NVMe keepalive tests: one paravisor generation with one NVMe disk.

    python nvme_worker.py save    MEMFD LAYOUT SOCKET PARAMS_JSON
    python nvme_worker.py restore MEMFD LAYOUT SOCKET PARAMS_JSON

`save`: fresh init through the NVMe manager (persistent client `nvme_<pci_id>`), then write generation
`gen` to LBAs [0, lbas) at queue depth `qd` (`bpi` blocks per IO, one guest-RAM buffer per slot), and save
the driver while IO is in flight: after `save_after` completions, or — with `delay_ms` — once `qd`
requests were submitted after the controller started delaying completions. `latency_ms` makes every IO
take that long from the start (a disk with latency, so the queue depth is really reached);
`flr_on_disconnect` switches the device to reset_method flr after the save. Prints the saved driver and
DMA manager states, the requests in flight at the save (to be replayed, as storvsp does) and the next LBA
to write, then exits without closing anything (the controller only sees a disconnect).

`restore`: restores the DMA manager and the driver (create_device with the saved state), replays the
in-flight requests once the restored commands drained, writes the remaining LBAs, reads every LBA back and
checks each block (LBA, generation, CRC). Prints the restore path, errors and the check.
"""
from __future__ import annotations

import base64
import json
import os
import sys
import threading
import time

from vfkeep.guest.disk_blocks import BadBlock, check_block, make_blocks
from vfkeep.memory import DmaManager, GuestMemory, MemoryLayout
from vfkeep.nvme import NVM_WRITE
from vfkeep.contract import NvmeConfig
from vfkeep.paravisor.nvme_manager import create_device
from vfkeep.proto import dma_manager_pb2, nvme_driver_pb2
from vfkeep.vfio_user import control_call


class Writer:
    """Keeps up to `qd` writes in flight over LBAs [next_lba, lbas); tracks what is outstanding."""

    def __init__(self, drv, mem, p, next_lba=0):
        self.drv, self.mem, self.p = drv, mem, p
        self.ns = drv.namespace(1)
        self.bytes_per_io = p["bpi"] * self.ns.block_size
        self.base = mem.layout.guest.gpa
        self.next_lba = next_lba
        self.free_slots = list(range(p["qd"]))
        self.inflight: dict[int, tuple[int, int]] = {}  # slot -> (lba, nblocks)
        self.completed = 0
        self.errors = 0
        self.cv = threading.Condition()

    def slot_gpa(self, slot: int) -> int:
        return self.base + slot * self.bytes_per_io

    def _done(self, slot):
        def complete(status, dw0):
            with self.cv:
                self.errors += bool(status)
                self.inflight.pop(slot, None)
                self.free_slots.append(slot)
                self.completed += 1
                self.cv.notify_all()
        return complete

    def submit(self, slot: int, lba: int, n: int, build: bool = True) -> None:
        if build:
            self.mem.write(self.slot_gpa(slot), make_blocks(lba, n, self.p["gen"], self.ns.block_size))
        with self.cv:
            self.inflight[slot] = (lba, n)
            self.cv.notify_all()
        self.drv.submit_io(NVM_WRITE, 1, lba, n, self.slot_gpa(slot), n * self.ns.block_size, self._done(slot),
                           timeout=30)

    def submit_next(self, stop_after: int | None = None) -> int:
        """Submit until LBAs run out or `stop_after` more requests went out; keeps qd in flight."""
        sent = 0
        while self.next_lba < self.p["lbas"] and (stop_after is None or sent < stop_after):
            with self.cv:
                self.cv.wait_for(lambda: self.free_slots, timeout=30)
                slot = self.free_slots.pop()
            n = min(self.p["bpi"], self.p["lbas"] - self.next_lba)
            self.submit(slot, self.next_lba, n)
            self.next_lba += n
            sent += 1
        return sent

    def wait_idle(self, timeout=60.0) -> bool:
        with self.cv:
            return self.cv.wait_for(lambda: not self.inflight, timeout)


def setup(memfd, layout, sock, p, saved=None, dma_state=None):
    mem = GuestMemory.attach(memfd, MemoryLayout.from_str(layout))
    dma = DmaManager(mem, strict_pool=False)
    if dma_state is not None:
        dma.restore(dma_state)
    cfg = NvmeConfig(0, p["pci_id"], sock)
    disk = create_device(cfg, mem, dma, saved=saved, save_restore_supported=True, cpu_count=2,
                         io_queues=p.get("io_queues", 2), ready_timeout_s=60)
    return mem, dma, disk


def save_mode(memfd, layout, sock, p) -> dict:
    mem, dma, disk = setup(memfd, layout, sock, p)
    w = Writer(disk.driver, mem, p)
    if p.get("latency_ms"):  # a disk that takes this long per IO: the writer keeps qd in flight
        control_call(sock + ".ctl", "io_delay", ms=p["latency_ms"])
    if p.get("delay_ms"):
        w.submit_next(stop_after=p["save_after"])
        w.wait_idle()
        control_call(sock + ".ctl", "io_delay", ms=p["delay_ms"])
        w.submit_next(stop_after=p["qd"])
    else:
        feeder = threading.Thread(target=w.submit_next, daemon=True)
        feeder.start()
        with w.cv:  # save mid-stream, with at least 8 requests outstanding
            w.cv.wait_for(lambda: w.completed >= p["save_after"] and len(w.inflight) >= min(8, p["qd"]), 30)
    t = time.perf_counter()
    state = disk.driver.save()
    save_ms = (time.perf_counter() - t) * 1000
    if p.get("flr_on_disconnect"):  # the device is switched to flr after the save: the exit wipes it
        control_call(sock + ".ctl", "set_reset_method", value="flr")
    with w.cv:  # nothing completes after the save: the interrupt thread is stopped
        inflight = sorted(w.inflight.items())
    return {"path": disk.restore_path, "save_ms": save_ms, "errors": w.errors, "completed": w.completed,
            "inflight": inflight, "next_lba": w.next_lba,
            "driver_state": base64.b64encode(state.SerializeToString()).decode(),
            "dma_state": base64.b64encode(dma.save().SerializeToString()).decode(),
            "pool": dma.inspect()["pool"]["devices"]}


def restore_mode(memfd, layout, sock, p) -> dict:
    saved = nvme_driver_pb2.NvmeDriverSavedState.FromString(base64.b64decode(p["driver_state"]))
    dma_state = dma_manager_pb2.OpenhclDmaManagerState.FromString(base64.b64decode(p["dma_state"]))
    t = time.perf_counter()
    mem, dma, disk = setup(memfd, layout, sock, p, saved, dma_state)
    restore_ms = (time.perf_counter() - t) * 1000
    drv = disk.driver
    presave = sum(q["presave_pending"] for q in drv.inspect()["io"])
    t = time.perf_counter()
    drained = drv.wait_drained(30)
    drain_ms = (time.perf_counter() - t) * 1000
    control_call(sock + ".ctl", "clear_faults")  # the rest of the run at full speed
    unclaimed = dma.validate_restore()
    w = Writer(drv, mem, p, next_lba=p["next_lba"])
    for slot, (lba, n) in p["inflight"]:  # replay with the same buffers (guest RAM survived)
        w.free_slots.remove(slot)
        w.submit(slot, lba, n, build=False)
    w.submit_next()
    idle = w.wait_idle()
    # Read everything back, one chunk at a time, into slot 0's buffer.
    ns = w.ns
    bad, gens = [], {}
    chunk = p["bpi"]
    for lba in range(0, p["lbas"], chunk):
        n = min(chunk, p["lbas"] - lba)
        gpa = w.slot_gpa(0)
        mem.write(gpa, bytes(n * ns.block_size))
        ns.read(lba, n, gpa)
        for i in range(n):
            try:
                g = check_block(mem.view(gpa + i * ns.block_size, ns.block_size), lba + i)
                gens[g] = gens.get(g, 0) + 1
            except BadBlock as e:
                bad.append(str(e))
    insp = drv.inspect()
    drv.shutdown()
    return {"path": disk.restore_path, "error": disk.error, "restore_ms": restore_ms, "presave_pending": presave,
            "drained": drained, "drain_ms": drain_ms, "write_errors": w.errors, "idle": idle,
            "generations": {str(k): v for k, v in gens.items()}, "bad": bad[:20], "bad_count": len(bad),
            "unclaimed": len(unclaimed), "counters": insp["counters"], "aer": insp["aer"]}


def main() -> None:
    mode, memfd, layout, sock, params = sys.argv[1:6]
    p = json.loads(params)
    out = save_mode(int(memfd), layout, sock, p) if mode == "save" else restore_mode(int(memfd), layout, sock, p)
    sys.stdout.write(json.dumps(out) + "\n")
    sys.stdout.flush()
    os._exit(0)  # like the worker after a save: no handle closed, no finalizer


if __name__ == "__main__":
    main()
