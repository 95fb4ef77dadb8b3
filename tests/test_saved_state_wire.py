"""Every saved-state message pinned to its field table: servicing spec §2.6 and §7, nvme spec §14 (and the
vfkeep extensions docs/internals.md names: `ManaDeviceSavedState.vports`, `VportSavedState`, storvsp's
`SavedBlockRequests`).

`SPEC` below is those tables transcribed (field number, name, spec type). Two independent checks bite on any
field-number change (say `WqSavedState` head/tail swapped, or the pagepool slot fields):
- each generated message's descriptor equals its table row for row, and every message of `vfkeep/proto` is
  in a table;
- golden bytes (`golden/saved_state_wire.json`): each message with every field set to a distinct value, encoded
  by protobuf, equals the bytes a small encoder written from the table alone produces, and equals the file.
Regenerate the file only for an intended schema change: `VFKEEP_UPDATE_GOLDEN=1 pytest this file`.
"""
from __future__ import annotations

import itertools
import json
import os
import pathlib

import pytest
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import FieldDescriptor as FD

from vfkeep.proto import (dma_manager_pb2, guid_pb2, mana_driver_pb2, netvsp_pb2, network_adapter_index_pb2,
                          nvme_driver_pb2, pagepool_pb2, storvsp_pb2, topology_pb2, underhill_pb2)

GOLDEN = pathlib.Path(__file__).parent / "golden" / "saved_state_wire.json"
MODULES = (dma_manager_pb2, guid_pb2, mana_driver_pb2, netvsp_pb2, network_adapter_index_pb2, nvme_driver_pb2,
           pagepool_pb2, storvsp_pb2, topology_pb2, underhill_pb2)

# Spec types: u16/u32/u64/usize/bool varints, string, bytes (fixed-size arrays and opaque blobs), a message
# name (same package unless qualified). "opt " = Option<T> (present even when zero); "rep " = repeated;
# "oneof " = a variant of an enum-as-message (§7.1).
SPEC: dict[str, list[tuple[int, str, str]]] = {
    # servicing spec §2.6
    "underhill.ServicingState": [(1, "init_state", "ServicingInitState"), (2, "units", "rep SavedStateUnit")],
    "underhill.SavedStateUnit": [(1, "name", "string"), (2, "state", "bytes")],
    "underhill.ServicingInitState": [
        (1, "firmware_type", "Firmware"), (2, "vm_stop_reference_time", "u64"), (3, "correlation_id", "opt guid.Guid"),
        (4, "emuplat", "EmuplatSavedState"), (5, "flush_logs_result", "opt FlushLogsResult"), (6, "vmgs", "bytes"),
        (7, "overlay_shutdown_device", "bool"), (8, "hibernate", "opt HibernateSavedState"),
        (10000, "nvme_state", "opt NvmeSavedState"),
        (10001, "dma_manager_state", "opt openhcl.openhcldmamanager.OpenhclDmaManagerState"),
        (10002, "vmbus_client", "bytes"), (10003, "mana_state", "opt ManaSavedStateList")],
    "underhill.Firmware": [(1, "uefi", "oneof Unit"), (2, "pcat", "oneof Unit"), (3, "none", "oneof Unit")],
    "underhill.Unit": [],
    "underhill.FlushLogsResult": [(1, "duration_us", "u64"), (2, "error", "opt string")],
    "underhill.HibernateSavedState": [(1, "token", "u64")],
    "underhill.EmuplatSavedState": [
        (1, "rtc_local_clock", "bytes"), (2, "get_backed_adjust_gpa_range", "bytes"),
        (3, "netvsp_state", "rep underhill.emuplat.netvsp.SavedState"),
        (4, "network_adapter_index", "opt NetworkAdapterIndexList")],
    "underhill.NetworkAdapterIndexList": [  # Option<Vec<T>>: the wrapper message of §7.1
        (1, "entries", "rep network_adapter_index.NetworkAdapterIndexSavedState")],
    "network_adapter_index.NetworkAdapterIndexSavedState": [(1, "mac_address", "bytes"), (2, "adapter_index", "u32")],
    "underhill.emuplat.netvsp.SavedState": [
        (1, "instance_id", "guid.Guid"), (2, "direction_to_vtl0", "rep OptionalBool"), (3, "hidden_vtl0", "opt bool")],
    "underhill.emuplat.netvsp.OptionalBool": [(1, "value", "opt bool")],  # Vec<Option<bool>> element (§7.1)
    "guid.Guid": [(1, "data1", "u32"), (2, "data2", "u16"), (3, "data3", "u16"), (4, "data4", "bytes")],
    "underhill.ManaSavedStateList": [(1, "states", "rep mana_driver.ManaSavedState")],  # field 10003 layout, §7.1
    # servicing spec §7.2
    "mana_driver.ManaSavedState": [(1, "mana_device", "ManaDeviceSavedState"), (2, "pci_id", "string")],
    "mana_driver.ManaDeviceSavedState": [(1, "gdma", "GdmaDriverSavedState"),
                                         (2, "vports", "rep VportSavedState")],  # 2: vfkeep extension
    "mana_driver.GdmaDriverSavedState": [
        (1, "mem", "SavedMemoryState"), (2, "eq", "CqEqSavedState"), (3, "cq", "CqEqSavedState"),
        (4, "rq", "WqSavedState"), (5, "sq", "WqSavedState"), (6, "db_id", "u64"), (7, "gpa_mkey", "u32"),
        (8, "pdid", "u32"), (9, "hwc_activity_id", "u32"), (10, "num_msix", "u32"), (11, "min_queue_avail", "u32"),
        (12, "link_toggle", "rep LinkToggle")],
    "mana_driver.LinkToggle": [(1, "vport_index", "u32"), (2, "link_up", "bool")],  # the (u32, bool) tuple
    "mana_driver.CqEqSavedState": [
        (1, "doorbell", "DoorbellSavedState"), (2, "doorbell_addr", "u32"), (3, "id", "u32"), (4, "next", "u32"),
        (5, "size", "u32"), (6, "shift", "u32")],
    "mana_driver.WqSavedState": [
        (1, "doorbell", "DoorbellSavedState"), (2, "doorbell_addr", "u32"), (3, "id", "u32"), (4, "head", "u32"),
        (5, "tail", "u32"), (6, "mask", "u32")],
    "mana_driver.DoorbellSavedState": [(1, "doorbell_id", "u64"), (2, "page_count", "u32")],
    "mana_driver.SavedMemoryState": [(1, "base_pfn", "u64"), (2, "len", "u64")],
    "mana_driver.VportSavedState": [  # vfkeep extension: data-path keepalive (DESIGN D7, docs/internals.md)
        (1, "vport_index", "u32"), (2, "vport_handle", "u64"), (3, "tx_vport_offset", "u32"), (4, "mac", "u64"),
        (5, "vector", "u32"), (6, "eq", "CqEqSavedState"), (7, "tx_cq", "CqEqSavedState"),
        (8, "rx_cq", "CqEqSavedState"), (9, "sq", "WqSavedState"), (10, "rq", "WqSavedState"),
        (11, "tx_wq_obj", "u64"), (12, "rx_wq_obj", "u64"), (13, "mem", "rep SavedMemoryState"),
        (14, "buffer_size", "u32"), (15, "tx_buffers", "u32"), (16, "rx_buffers", "u32"), (17, "short_form", "bool"),
        (18, "tx_posted", "u64"), (19, "tx_done", "u64"), (20, "rx_done", "u64"), (21, "direction_to_vtl0", "bool")],
    # servicing spec §7.3
    "openhcl.openhcldmamanager.OpenhclDmaManagerState": [
        (1, "shared_pool", "opt openvmm.pagepool.PagePoolState"),
        (2, "private_pool", "opt openvmm.pagepool.PagePoolState")],
    "openvmm.pagepool.PagePoolState": [(1, "state", "rep SlotSavedState"), (2, "ranges", "rep topology.MemoryRange")],
    "topology.MemoryRange": [(1, "start", "u64"), (2, "end", "u64")],
    "openvmm.pagepool.SlotSavedState": [(1, "base_pfn", "u64"), (2, "size_pages", "u64"),
                                        (3, "state", "InnerSlotState")],
    "openvmm.pagepool.InnerSlotState": [(1, "free", "oneof Unit"), (2, "allocated", "oneof SlotOwner"),
                                        (3, "leaked", "oneof SlotOwner")],
    "openvmm.pagepool.SlotOwner": [(1, "device_id", "string"), (2, "tag", "string")],
    "openvmm.pagepool.Unit": [],
    # nvme spec §14
    "underhill.NvmeSavedState": [(1, "nvme_state", "NvmeManagerSavedState")],
    "underhill.NvmeManagerSavedState": [(1, "cpu_count", "u32"), (2, "nvme_disks", "rep NvmeSavedDiskConfig")],
    "underhill.NvmeSavedDiskConfig": [(1, "pci_id", "string"), (2, "driver_state", "nvme_driver.NvmeDriverSavedState")],
    "nvme_driver.NvmeDriverSavedState": [
        (1, "identify_ctrl", "bytes"), (2, "device_id", "string"), (3, "namespaces", "rep SavedNamespaceData"),
        (4, "worker_data", "NvmeDriverWorkerSavedState")],
    "nvme_driver.NvmeDriverWorkerSavedState": [
        (1, "admin", "opt QueuePairSavedState"), (2, "io", "rep IoQueueSavedState"), (3, "qsize", "u16"),
        (4, "max_io_queues", "u16"), (5, "allow_lazy_restore", "opt bool")],
    "nvme_driver.IoQueueSavedState": [(1, "cpu", "u32"), (2, "iv", "u32"), (3, "queue_data", "QueuePairSavedState"),
                                      (4, "unmapped", "bool")],
    "nvme_driver.QueuePairSavedState": [
        (1, "mem_len", "u64"), (2, "base_pfn", "u64"), (3, "qid", "u16"), (4, "sq_entries", "u16"),
        (5, "cq_entries", "u16"), (6, "handler_data", "QueueHandlerSavedState")],
    "nvme_driver.QueueHandlerSavedState": [
        (1, "sq_state", "SubmissionQueueSavedState"), (2, "cq_state", "CompletionQueueSavedState"),
        (3, "pending_cmds", "PendingCommandsSavedState"), (4, "aer_handler", "opt AerHandlerSavedState")],
    "nvme_driver.SubmissionQueueSavedState": [(1, "sqid", "u16"), (2, "head", "u32"), (3, "tail", "u32"),
                                              (4, "committed_tail", "u32"), (5, "len", "u32")],
    "nvme_driver.CompletionQueueSavedState": [(1, "cqid", "u16"), (2, "head", "u32"), (3, "committed_head", "u32"),
                                              (4, "len", "u32"), (5, "phase", "bool")],
    "nvme_driver.PendingCommandsSavedState": [(1, "commands", "rep PendingCommandSavedState"),
                                              (2, "next_cid_high_bits", "u16"), (3, "cid_key_bits", "u32")],
    "nvme_driver.PendingCommandSavedState": [(1, "command", "bytes")],
    "nvme_driver.SavedNamespaceData": [(1, "nsid", "u32"), (2, "identify_ns", "bytes")],
    "nvme_driver.AerHandlerSavedState": [(1, "last_aen", "opt u32"), (2, "await_aen_cid", "opt u16")],
    # vfkeep extension: the storvsp relay's in-flight requests (docs/internals.md)
    "storvsp.SavedBlockRequests": [(1, "requests", "rep bytes")],
}
VARINTS = {"u16": FD.TYPE_UINT32, "u32": FD.TYPE_UINT32, "u64": FD.TYPE_UINT64, "bool": FD.TYPE_BOOL}
LEN = {"string": FD.TYPE_STRING, "bytes": FD.TYPE_BYTES}


def parse(msg: str, spec_type: str) -> tuple[str, str]:
    """(modifier, type) of a table entry; message types resolved to full names."""
    mod, _, typ = spec_type.rpartition(" ")
    if typ not in VARINTS and typ not in LEN and "." not in typ:
        typ = f"{msg.rpartition('.')[0]}.{typ}"
    return mod, typ


def variants(msg: str) -> list[str | None]:
    """The oneof variant names of an enum-as-message, or [None]."""
    oneofs = [name for _, name, t in SPEC[msg] if t.startswith("oneof ")]
    return oneofs or [None]


# -- the spec encoder (§7.1), independent of protobuf --------------------------------------------------------
def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def key(number: int, wire: int) -> bytes:
    return varint(number << 3 | wire)


class Values:
    """Distinct values in fill order, so that two fields trading numbers trade different bytes."""

    def __init__(self):
        self.n = itertools.count(1)

    def scalar(self, typ: str):
        i = next(self.n)
        return {"u16": 0x100 + i, "u32": 0x10000 + i, "u64": (1 << 40) + i, "bool": i % 2 == 1,
                "string": f"s{i}", "bytes": i.to_bytes(3, "little")}[typ]


def spec_encode(msg: str, values: Values, variant: str | None = None) -> bytes:
    out = b""
    for number, name, spec_type in SPEC[msg]:
        mod, typ = parse(msg, spec_type)
        if mod == "oneof" and name != variant:
            continue
        for _ in range(2 if mod == "rep" else 1):
            if typ in VARINTS:
                v = values.scalar(typ)
                if v or mod:  # a plain field at its default is not written; `Some(false)` is
                    out += key(number, 0) + varint(int(v))
            elif typ in LEN:
                v = values.scalar(typ)
                raw = v.encode() if typ == "string" else v
                out += key(number, 2) + varint(len(raw)) + raw
            else:
                body = spec_encode(typ, values, variants(typ)[-1])
                out += key(number, 2) + varint(len(body)) + body
    return out


# -- the same values through protobuf -------------------------------------------------------------------------
def pb_fill(m, values: Values, variant: str | None = None):
    msg = m.DESCRIPTOR.full_name
    for _, name, spec_type in SPEC[msg]:
        mod, typ = parse(msg, spec_type)
        if mod == "oneof" and name != variant:
            continue
        for _ in range(2 if mod == "rep" else 1):
            if typ in VARINTS or typ in LEN:
                v = values.scalar(typ)
                if mod == "rep":
                    getattr(m, name).append(v)
                else:
                    setattr(m, name, v)
            else:
                sub = getattr(m, name).add() if mod == "rep" else getattr(m, name)
                sub.SetInParent()
                pb_fill(sub, values, variants(typ)[-1])
    return m


def message_class(full_name: str):
    return descriptor_pool.Default().FindMessageTypeByName(full_name)._concrete_class


CASES = [(msg, v) for msg in SPEC for v in variants(msg)]


def case_id(msg: str, variant: str | None) -> str:
    return msg if variant is None else f"{msg}:{variant}"


def every_message():
    def walk(desc):
        yield desc
        for nested in desc.nested_types:
            yield from walk(nested)
    for mod in MODULES:
        for desc in mod.DESCRIPTOR.message_types_by_name.values():
            yield from walk(desc)


def test_every_message_has_a_table():
    assert sorted(d.full_name for d in every_message()) == sorted(SPEC)


def enum(f) -> bool:
    """A variant of a real oneof (an enum on the wire), not proto3 `optional`'s synthetic one."""
    return f.containing_oneof is not None and len(f.containing_oneof.fields) > 1


@pytest.mark.parametrize("msg", sorted(SPEC))
def test_descriptor_equals_the_spec_table(msg):
    desc = message_class(msg).DESCRIPTOR
    got = [(f.number, f.name, f.type, f.is_repeated, f.has_presence and f.type != FD.TYPE_MESSAGE and not enum(f),
            f.message_type.full_name if f.message_type else None, enum(f))
           for f in sorted(desc.fields, key=lambda f: f.number)]
    want = []
    for number, name, spec_type in SPEC[msg]:
        mod, typ = parse(msg, spec_type)
        scalar = VARINTS.get(typ) or LEN.get(typ)
        want.append((number, name, scalar or FD.TYPE_MESSAGE, mod == "rep", mod == "opt" and scalar is not None,
                     None if scalar else typ, mod == "oneof"))
    assert got == want


@pytest.fixture(scope="module")
def golden() -> dict[str, str]:
    if os.environ.get("VFKEEP_UPDATE_GOLDEN") == "1":
        GOLDEN.write_text(json.dumps({case_id(m, v): spec_encode(m, Values(), v).hex() for m, v in CASES},
                                     indent=1, sort_keys=True) + "\n")
    return json.loads(GOLDEN.read_text())


@pytest.mark.parametrize("msg,variant", CASES, ids=[case_id(*c) for c in CASES])
def test_golden_bytes(msg, variant, golden):
    spec = spec_encode(msg, Values(), variant)
    wire = pb_fill(message_class(msg)(), Values(), variant).SerializeToString()
    assert wire.hex() == spec.hex(), f"{case_id(msg, variant)}: protobuf encoding differs from the spec table"
    assert golden.get(case_id(msg, variant)) == spec.hex(), "golden file differs from the spec table"


def test_golden_file_has_exactly_the_cases(golden):
    assert sorted(golden) == sorted(case_id(*c) for c in CASES)


def test_known_keys_and_lengths_from_the_spec_text():
    """Byte strings the spec text itself gives."""
    assert mana_driver_pb2.SavedMemoryState(len=24576).SerializeToString() == bytes.fromhex("1080c001")
    assert nvme_driver_pb2.NvmeDriverWorkerSavedState(allow_lazy_restore=True).SerializeToString() == b"\x28\x01"
    assert nvme_driver_pb2.PendingCommandSavedState(command=bytes(64)).SerializeToString()[:2] == b"\x0a\x40"
    assert nvme_driver_pb2.NvmeDriverSavedState(identify_ctrl=bytes(4096)).SerializeToString()[:3] == b"\x0a\x80\x20"
    init = underhill_pb2.ServicingInitState()
    init.nvme_state.SetInParent()
    assert init.SerializeToString() == bytes.fromhex("82f10400")
