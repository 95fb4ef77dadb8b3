"""DMA manager state across real processes: old worker saves, host scrubs worker RAM, new worker
restores and re-attaches the same PFNs with the same bytes."""
import sys

from helpers import run_json
from vfkeep.memory import POISON, GuestMemory, MemoryLayout

LAYOUT = MemoryLayout(guest_pages=16, worker_pages=64, pool_pages=512)

OLD_WORKER = """
import json, sys
from vfkeep.memory import DmaManager, GuestMemory, MemoryLayout
mem = GuestMemory.attach(int(sys.argv[1]), MemoryLayout.from_str(sys.argv[2]))
dma = DmaManager(mem, strict_pool=False)
nic, eph = dma.new_client("nic_1", True), dma.new_client("nic_1_ephemeral", False)
hwc = nic.allocate_dma_buffer(6 * 4096)
nic.allocate_dma_buffer(4096).free()
bounce = nic.allocate_dma_buffer(3 * 4096)
eq = eph.allocate_dma_buffer(4096)
for i, b in enumerate((hwc, bounce, eq)):
    b.view[:] = bytes([0x11 * (i + 1)]) * b.len
open(sys.argv[3], "wb").write(dma.save().SerializeToString())
print(json.dumps({"pool": [hwc.pfns, bounce.pfns], "eq": eq.pfns}))
"""

NEW_WORKER = """
import hashlib, json, sys
from vfkeep.memory import DmaManager, GuestMemory, MemoryLayout
mem = GuestMemory.attach(int(sys.argv[1]), MemoryLayout.from_str(sys.argv[2]))
dma = DmaManager(mem, strict_pool=False)
dma.restore(open(sys.argv[3], "rb").read())
nic = dma.new_client("nic_1", True)
blocks = nic.attach_pending_buffers()
print(json.dumps({"pool": [b.pfns for b in blocks], "bytes": [bytes(b.view).hex() for b in blocks],
                  "again": len(nic.attach_pending_buffers()), "unclaimed": len(dma.validate_restore()),
                  "usage": dma.inspect()["pool"]}))
"""


def run_worker(script, mem, blob_path):
    return run_json([sys.executable, "-c", script, str(mem.fd), LAYOUT.to_str(), str(blob_path)], [mem.fd], timeout=20)


def test_save_in_one_process_restore_in_another(tmp_path):
    blob = tmp_path / "dma_manager_state.bin"
    with GuestMemory.create(LAYOUT) as mem:
        guest = b"guest ram survives" * 100
        mem.write(0, guest)
        old = run_worker(OLD_WORKER, mem, blob)
        assert all(LAYOUT.pool.contains_pfn(p) for b in old["pool"] for p in b)

        mem.scrub_worker_ram()  # host, between the workers
        assert mem.read(old["eq"][0] << 12, 4096) == POISON

        new = run_worker(NEW_WORKER, mem, blob)
        assert new["pool"] == old["pool"]
        assert new["bytes"] == [(b"\x11" * 6 * 4096).hex(), (b"\x22" * 3 * 4096).hex()]
        assert (new["again"], new["unclaimed"]) == (0, 0)
        assert new["usage"]["devices"] == {"nic_1": 9} and new["usage"]["pending_pages"] == 0
        assert mem.read(0, len(guest)) == guest


def test_a_populated_mapping_is_the_same_memory():
    """A prelaunched worker maps guest memory with its page tables filled (`populate`) before the host scrubs
    worker RAM: it sees the scrub, and its writes are everyone's."""
    with GuestMemory.create(LAYOUT) as host, GuestMemory.attach(host.fd, LAYOUT, populate=True) as worker:
        host.scrub_worker_ram()
        assert worker.read(LAYOUT.worker.gpa, 4096) == POISON
        worker.write(LAYOUT.pool.gpa, b"kept")
        assert host.read(LAYOUT.pool.gpa, 4) == b"kept"
