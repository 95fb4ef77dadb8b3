"""Hostile saved state (DESIGN §6, servicing spec 6-8), fuzzed with hypothesis against the in-process emulator.

A valid `ManaDeviceSavedState` and `OpenhclDmaManagerState` pair, taken from a real save, is mutated (bit flips,
truncation, inserted bytes, field values set to boundary or random values, messages cleared or extended) and
the worker's restore path runs on it: `DmaManager.restore` → `ManaDevice.restore` → `validate_restore`. Whatever
the blob, the outcome is a restored device or a typed error (`vfkeep.memory.RestoreError` from the DMA
manager, a `DriverError` from the driver; a `RestoreError` of the driver means nothing was written at all),
guest memory changes only inside the pool blocks the NIC re-attached (or the device's own HWC pages), the
pool is left consistent, and the fallback (FLR + fresh init, DESIGN D2) brings the NIC back, unless the
hostile pool table left no free run for the HWC buffer (then it fails with `OutOfPoolMemory`, typed).
"""
from __future__ import annotations

from unittest import mock

import pytest
from google.protobuf.descriptor import FieldDescriptor
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from driver_helpers import InProcessBench
from vfkeep.driver import gdma_driver
from vfkeep.driver.errors import DriverError
from vfkeep.driver.errors import RestoreError as DriverRestoreError
from vfkeep.driver.mana import ManaDevice
from vfkeep.gdma.constants import DRV_HWC_NUM_PAGES
from vfkeep.memory import DmaManager, GuestMemory, MemoryLayout, OutOfPoolMemory
from vfkeep.memory import RestoreError as DmaRestoreError
from vfkeep.memory.dma_manager import DmaClient
from vfkeep.paravisor.vf_manager import fresh_mana_device
from vfkeep.proto import dma_manager_pb2, mana_driver_pb2

LAYOUT = MemoryLayout(guest_pages=16, worker_pages=512, pool_pages=64)
pytestmark = pytest.mark.usefixtures("quiet_vfkeep_logs")
SETTINGS = settings(max_examples=300, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
PAGE = 4096
#: A restore that gets past validation with a state the device does not share fails on an HWC timeout: keep
#: that short (the probe is bounded separately by `probe_timeout_ms`).
HWC_TIMEOUT_MS = 100


@pytest.fixture(scope="module")
def mem():
    m = GuestMemory.create(LAYOUT)
    yield m
    m.close()


# -- mutations ----------------------------------------------------------------------------------
def _field_paths(descriptor, prefix=()):
    """(path, field) of every field reachable from a message type, nested messages included."""
    for f in descriptor.fields:
        yield prefix + (f.name,), f
        if f.type == FieldDescriptor.TYPE_MESSAGE:
            yield from _field_paths(f.message_type, prefix + (f.name,))


MANA_PATHS = list(_field_paths(mana_driver_pb2.ManaDeviceSavedState.DESCRIPTOR))
DMA_PATHS = list(_field_paths(dma_manager_pb2.OpenhclDmaManagerState.DESCRIPTOR))
_LIMITS = {FieldDescriptor.TYPE_UINT32: (1 << 32) - 1, FieldDescriptor.TYPE_UINT64: (1 << 64) - 1}
#: Device names and tags a hostile pool table could use: ours, a neighbour's, empty, odd ones.
NAMES = ["nic_nic0", "nic_nic1", "", "vfio dma", "nic_nic0\u00e9", "x" * 300]


def _scalar(data, field, current: int):
    if field.type == FieldDescriptor.TYPE_BOOL:
        return data.draw(st.booleans(), label="bool")
    if field.type == FieldDescriptor.TYPE_STRING:
        return data.draw(st.sampled_from(NAMES) | st.text(max_size=12), label="string")
    limit = _LIMITS[field.type]
    near = [current + d for d in (-64, -32, -16, -6, -1, 1, 6, 16, 32, 64, PAGE)]
    value = data.draw(st.sampled_from([0, 1, 6, 24, 25, 4095, 4096, 24576, 1 << 24, limit, current * 2] + near)
                      | st.integers(0, limit), label="number")
    return min(max(value, 0), limit)


def mutate_fields(data, msg, paths) -> None:
    """Set one field somewhere in `msg` (a repeated element chosen at random) to a drawn value, or clear /
    extend a nested message."""
    path, field = data.draw(st.sampled_from(paths), label="field")
    target = msg
    for name in path[:-1]:
        value = getattr(target, name)
        if target.DESCRIPTOR.fields_by_name[name].is_repeated:
            if not value:
                value.add()
            target = value[data.draw(st.integers(0, len(value) - 1), label="element")]
        else:
            target = value
    name = path[-1]
    repeated = field.is_repeated
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        if repeated:
            getattr(target, name).add()
        else:
            target.ClearField(name)
    elif repeated:
        getattr(target, name).append(_scalar(data, field, 0))
    else:
        setattr(target, name, _scalar(data, field, getattr(target, name)))


def mutate_bytes(data, blob: bytes) -> bytes:
    out = bytearray(blob)
    for _ in range(data.draw(st.integers(1, 3), label="byte edits")):
        kind = data.draw(st.sampled_from(["flip", "flip", "cut", "insert"]), label="edit")
        at = data.draw(st.integers(0, max(len(out) - 1, 0)), label="at")
        if kind == "flip" and out:
            out[at] ^= 1 << data.draw(st.integers(0, 7), label="bit")
        elif kind == "cut":
            del out[at:]
        else:
            out[at:at] = data.draw(st.binary(min_size=1, max_size=8), label="inserted")
    return bytes(out)


def mutated_pair(data, mana_state, dma_state) -> tuple[bytes, bytes]:
    """At least one of the two blobs is changed, by fields and/or bytes."""
    targets = data.draw(st.sampled_from(["mana", "dma", "both"]), label="target")
    blobs = {}
    for name, msg, paths in (("mana", mana_state, MANA_PATHS), ("dma", dma_state, DMA_PATHS)):
        if targets not in (name, "both"):
            blobs[name] = msg.SerializeToString()
            continue
        for _ in range(data.draw(st.integers(0, 3), label="field edits")):
            mutate_fields(data, msg, paths)
        blob = msg.SerializeToString()
        if data.draw(st.booleans(), label="byte edits"):
            blob = mutate_bytes(data, blob)
        blobs[name] = blob
    return blobs["mana"], blobs["dma"]


# -- the restore path under test ----------------------------------------------------------------
def saved_nic(mem):
    """A NIC brought up and saved for keepalive, with a neighbour's allocation in the pool as well."""
    bench = InProcessBench(mem)
    dma = DmaManager(mem, strict_pool=False)
    dev = ManaDevice.new(bench.connect(dma, "nic0"), "nic0")
    dma.new_client("nic_nic1", persistent=True).allocate_dma_buffer(2 * PAGE)
    hwc_pfns = set(dev.gdma.hwc_mem.pfns)
    dma_state = dma.save()  # before the device save (servicing spec 2.2)
    return bench, dev.save(), dma_state, hwc_pfns


def changed_pages(before: bytes, after: bytes) -> set[int]:
    return {i for i in range(len(before) // PAGE) if before[i * PAGE:(i + 1) * PAGE] != after[i * PAGE:(i + 1) * PAGE]}


@SETTINGS
@given(data=st.data())
def test_mutated_saved_state_restores_or_fails_typed_and_writes_only_attached_memory(mem, data):
    bench, mana_state, dma_state, hwc_pfns = saved_nic(mem)
    mana_blob, dma_blob = mutated_pair(data, mana_state, dma_state)
    mem.scrub_worker_ram()
    before = mem.read(0, mem.size)
    attached: list = []
    attach = DmaClient.attach_pending_buffers

    def recording_attach(client):
        blocks = attach(client)
        attached.extend(blocks)
        return blocks

    dma = DmaManager(mem, strict_pool=False)
    dev = None
    with mock.patch.object(DmaClient, "attach_pending_buffers", recording_attach), \
            mock.patch.object(gdma_driver, "HWC_TIMEOUT_DEFAULT_IN_MS", HWC_TIMEOUT_MS):
        try:
            dma.restore(dma_blob)
        except DmaRestoreError:
            event("dma manager state refused")
            assert mem.read(0, mem.size) == before
            assert dma.inspect()["pool"]["free_pages"] == LAYOUT.pool_pages  # left fresh
        else:
            try:
                dev = ManaDevice.restore(bench.connect(dma, "nic0", fresh=False), "nic0", mana_blob, probe_timeout_ms=50)
                event("restored")
            except DriverRestoreError:
                event("mana state refused")
                assert mem.read(0, mem.size) == before, "a refused restore wrote guest memory"
            except DriverError as e:
                event(f"restore failed: {type(e).__name__}")
        after = mem.read(0, mem.size)
        allowed = hwc_pfns.union(*(b.pfns for b in attached))
        assert not changed_pages(before, after) - allowed, "guest memory written outside the attached blocks"
        unclaimed = dma.validate_restore()
        usage = dma.inspect()["pool"]
        assert usage["pending_pages"] == 0
        if dev is None:
            assert usage["allocated_pages"] == 0, "a failed restore left pool pages allocated"
            if usage["largest_free_run"] < DRV_HWC_NUM_PAGES:
                # A pool table whose free slots were all saved as Leaked (valid per servicing spec 8.3) leaves
                # no room for a persistent HWC buffer: the fallback fails typed (the worker reports the NIC down).
                event("fallback starved of pool pages")
                with pytest.raises(OutOfPoolMemory):
                    fresh_mana_device(lambda: bench.connect(dma, "nic0"), bench.set_reset_method, "nic0",
                                      force_flr=True)
                bench.device.close()
                return
            # DESIGN D2: otherwise the fallback brings the NIC back whatever the blob was.
            dev, flr = fresh_mana_device(lambda: bench.connect(dma, "nic0"), bench.set_reset_method, "nic0",
                                         force_flr=True)
            assert flr
        else:
            assert usage["allocated_pages"] == 6 and not any(u.device == "nic_nic0" for u in unclaimed)
    assert dev.shutdown() is True
    bench.device.close()
