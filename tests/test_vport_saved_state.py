"""Validation of an untrusted kept-vport saved state (DESIGN D7, `save_restore.validate_vport_state`): the
state a real driver saved passes, and each bad field is refused with an `InvalidSavedState` naming it."""
from __future__ import annotations

import pytest

from driver_helpers import InProcessBench, loopback, numbered_frames
from vfkeep.driver.errors import InvalidSavedState
from vfkeep.driver.mana import ManaDevice
from vfkeep.driver.save_restore import validate_vport_state
from vfkeep.memory import DmaManager, GuestMemory, MemoryLayout
from vfkeep.paravisor.vf_manager import KEPT_VPORT

LAYOUT = MemoryLayout(guest_pages=16, worker_pages=256, pool_pages=512)


@pytest.fixture(scope="module")
def saved():
    """(vport state, bar0 layout, db_id, num_msix) as a driver saved them after some traffic."""
    mem = GuestMemory.create(LAYOUT)
    bench = InProcessBench(mem)
    dev = ManaDevice.new(bench.connect(DmaManager(mem), "nic0"), "nic0")
    vport = dev.open_vport(0, KEPT_VPORT, persistent=True)
    assert len(loopback(vport, numbered_frames(100))) == 100
    layout = dev.gdma.layout
    state = dev.save()
    bench.device.close()
    mem.close()
    return state.vports[0], layout, state.gdma.db_id, state.gdma.num_msix


def validate(saved, state):
    _, layout, db_id, num_msix = saved
    validate_vport_state(state, layout, LAYOUT.pool, db_id, num_msix)


def test_saved_state_passes(saved):
    validate(saved, saved[0])


def _set(path: str, value):
    """Set a field by dotted path (digits index repeated fields); a callable value gets the field's parent."""
    def change(s):
        *parents, leaf = path.split(".")
        for p in parents:
            s = s[int(p)] if p.isdigit() else getattr(s, p)
        setattr(s, leaf, value(s) if callable(value) else value)
    return change


CASES = {
    "index": (_set("vport_index", 1 << 24), "index does not fit 24 bits"),
    "no rx_cq": (lambda s: s.ClearField("rx_cq"), "has no rx_cq"),
    "doorbell": (_set("eq.doorbell.doorbell_id", 1), "eq doorbell page is not the device's db_id"),
    "mac": (_set("mac", 1 << 48), "wider than 48 bits"),
    "vector": (_set("vector", lambda s: 64), "vector 64 is not below"),
    "buffer small": (_set("buffer_size", 63), "buffer size 63 is not in"),
    "buffer large": (_set("buffer_size", 65536), "buffer size 65536 is not in"),
    "eq size": (_set("eq.size", 3000), "power of two"),
    "buffer counts": (_set("tx_buffers", lambda s: s.tx_buffers + 1), "buffer counts"),
    "outstanding": (_set("tx_posted", lambda s: s.tx_done + s.tx_buffers + 1), "sends outstanding"),
    "sq tail": (_set("sq.tail", lambda q: q.tail + 1), "sq head .* not multiples of 32"),
    "rq tail": (_set("rq.tail", lambda q: (q.tail + 32) % (q.mask + 1)), "rq head .* and tail"),
    "posted vs sq tail": (_set("tx_posted", lambda s: s.tx_posted + 1), "sq head .* expected 32"),
    "blocks": (lambda s: s.mem.pop(), "memory blocks, expected 7"),
    "block length": (_set("mem.0.len", lambda m: m.len + 4096), "eq block length"),
    "block outside pool": (_set("mem.6.base_pfn", 0), "rx_buffers block pfn 0"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_field_is_refused(saved, case):
    change, match = CASES[case]
    state = type(saved[0])()
    state.CopyFrom(saved[0])
    change(state)
    with pytest.raises(InvalidSavedState, match=match):
        validate(saved, state)
