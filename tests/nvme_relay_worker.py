"""A worker-like child with one NVMe disk and its guest block relay (stdin/stdout JSON lines).

    python nvme_relay_worker.py MEMFD LAYOUT BLOCK_LAYOUT SOCKET REQ_FD CPL_FD PARAMS_JSON

Reads one JSON line: `{"driver_state", "dma_state", "requests"}` (base64; absent fields = fresh), brings the
disk up through the NVMe manager (keepalive restore when a state is given), starts the relay (replaying
the saved requests), prints `{"path", ...}`, then waits for a line: `save` (relay stopped, driver saved,
in-flight requests listed; exits without closing anything) or `quit` (clean shutdown).
"""
from __future__ import annotations

import base64
import json
import os
import sys

from vfkeep.contract import NvmeConfig
from vfkeep.guest.block import BlockChannel, BlockLayout
from vfkeep.memory import DmaManager, GuestMemory, MemoryLayout
from vfkeep.paravisor.block_relay import BlockRelay
from vfkeep.paravisor.nvme_manager import create_device
from vfkeep.proto import dma_manager_pb2, nvme_driver_pb2, storvsp_pb2


def b64(msg) -> str:
    return base64.b64encode(msg.SerializeToString()).decode()


def main() -> None:
    memfd, layout, block_layout, sock, req_fd, cpl_fd, params = sys.argv[1:8]
    p = json.loads(params)
    mem = GuestMemory.attach(int(memfd), MemoryLayout.from_str(layout))
    channel = BlockChannel.attach(mem, BlockLayout.from_str(block_layout), 0, int(req_fd), int(cpl_fd))
    start = json.loads(sys.stdin.readline())
    dma = DmaManager(mem, strict_pool=False)
    saved, replay = None, []
    if start.get("dma_state"):
        dma.restore(dma_manager_pb2.OpenhclDmaManagerState.FromString(base64.b64decode(start["dma_state"])))
    if start.get("driver_state"):
        saved = nvme_driver_pb2.NvmeDriverSavedState.FromString(base64.b64decode(start["driver_state"]))
    if start.get("requests"):
        replay = BlockRelay.saved_requests(storvsp_pb2.SavedBlockRequests.FromString(
            base64.b64decode(start["requests"])))
    disk = create_device(NvmeConfig(0, "nvme0", sock), mem, dma, saved=saved, save_restore_supported=p["keepalive"],
                         cpu_count=2, ready_timeout_s=60)
    relay = BlockRelay(channel, disk.driver, pci_id="nvme0")
    relay.start(replay)
    print(json.dumps({"path": disk.restore_path, "error": disk.error, "replay": len(replay),
                      "unclaimed": len(dma.validate_restore())}), flush=True)
    command = sys.stdin.readline().strip()
    relay.stop()
    if command == "save":
        state = disk.driver.save() if p["keepalive"] else None
        if state is None:
            disk.driver.shutdown()
        out = {"requests": b64(relay.save()), "inflight": len(relay.inflight()), "relay": relay.counters,
               "driver_state": b64(state) if state else None, "dma_state": b64(dma.save()) if p["keepalive"] else None}
        print(json.dumps(out), flush=True)
        os._exit(0)
    disk.driver.shutdown()
    print(json.dumps({"relay": relay.counters}), flush=True)


if __name__ == "__main__":
    main()
