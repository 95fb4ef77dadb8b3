"""A minimal worker process for the driver's process tests (servicing spec 12.1 keepalive proof).

`python driver_worker.py MODE MEMFD LAYOUT SOCKET DIR FRAMES` with MODE:
- `save`: fresh init, open vport 0, loop FRAMES frames back, save; writes DIR/mana.bin and DIR/dma.bin;
- `restore`: restore the DMA manager and the NIC from those files, open vport 0, loop FRAMES frames back,
  shut down cleanly;
- `fresh`: restore the DMA manager, free the NIC's saved buffers and fresh-init it (NoReset -> FLR).
Prints one JSON object: what happened, or the error type and message.
"""
import json
import pathlib
import sys
import time

from driver_helpers import loopback, numbered_frames, same_payloads

from vfkeep.driver.mana import ManaDevice
from vfkeep.memory import DmaManager, GuestMemory, MemoryLayout
from vfkeep.paravisor.vf_manager import fresh_mana_device, nic_dma_clients, release_nic_buffers
from vfkeep.vfio_user.backing import open_vfio, reset_method_setter

PCI_ID = "d186:00:00.0"


def traffic(dev, n):
    frames = numbered_frames(n)
    got = loopback(dev.open_vport(0), frames)
    return {"sent": n, "received": len(got), "intact": same_payloads(got, frames)}


def main():
    mode, fd, layout, sock, out, nframes = sys.argv[1:7]
    out, nframes = pathlib.Path(out), int(nframes)
    mem = GuestMemory.attach(int(fd), MemoryLayout.from_str(layout))
    dma = DmaManager(mem, strict_pool=False)
    result = {"mode": mode}
    try:
        if mode == "save":
            dev = ManaDevice.new(open_vfio(sock, mem, nic_dma_clients(dma, PCI_ID, True)), PCI_ID)
            result["traffic"] = traffic(dev, nframes)
            (out / "dma.bin").write_bytes(dma.save().SerializeToString())  # before the device save (spec 2.2)
            state = dev.save()
            (out / "mana.bin").write_bytes(state.SerializeToString())
            result["base_pfn"] = state.gdma.mem.base_pfn
        elif mode == "restore":
            dma.restore((out / "dma.bin").read_bytes())
            t = time.perf_counter()
            backing = open_vfio(sock, mem, nic_dma_clients(dma, PCI_ID, True), restore=True)
            dev = ManaDevice.restore(backing, PCI_ID, (out / "mana.bin").read_bytes())
            result["restore_ms"] = (time.perf_counter() - t) * 1000
            result["base_pfn"] = dev.gdma.hwc_mem.base_pfn
            result["unclaimed"] = len(dma.validate_restore())
            result["traffic"] = traffic(dev, nframes)
            result["clean_shutdown"] = dev.shutdown()
        elif mode == "fresh":
            dma.restore((out / "dma.bin").read_bytes())
            result["freed_pages"] = release_nic_buffers(dma, PCI_ID)
            dev, result["flr"] = fresh_mana_device(lambda: open_vfio(sock, mem, nic_dma_clients(dma, PCI_ID, True)),
                                                   reset_method_setter(sock), PCI_ID)
            result["traffic"] = traffic(dev, nframes)
            result["clean_shutdown"] = dev.shutdown()
    except Exception as e:
        result["error"] = {"type": type(e).__name__, "message": str(e)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
