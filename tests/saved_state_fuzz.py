"""Fuzzing whole saved states at scale (issue 15 item 3): `make fuzz` (100,000 cases), `make fuzz-ci` (10,000),
and a seeded slice in the suite (tests/test_saved_state_fuzz.py). Run: `python tests/saved_state_fuzz.py
--cases N --seed S [--case I] [--json PATH]`.

The golden state is a real save, made once: guest memory with a private pool; a MANA NIC (in-process GDMA
emulator) with its HWC in the pool and a kept vport (data-path keepalive, so the GDMA driver, queue and vport
states are all in it); an NVMe controller (in-process emulator) with its queues in the pool and one written
block; another device's pool allocation; saved in the worker's order (DMA manager, then MANA field 10003,
NVMe field 10000, the worker's own parts). The devices and memory after that save are the template every case
starts from (copied, so each case sees the device exactly as the blob describes it).

Each case parses the golden blob into a tree of fields (every field of every message, from the descriptors),
applies 1-3 structure-aware mutations (below) and runs the worker's restore sequence on the result in-process:
decode → DMA manager restore → MANA `ManaDevice.restore` (then the vport and the deferred HWC probe) → NVMe
`NvmeDriver.restore` → `validate_restore`, then a functional check of each restored device (frames through the
vport; the written block read back). The verdict:
- crash: an exception that is not a typed saved-state or device error (`TYPED`) escaped, or any exception ended
  a thread (a driver's event handler);
- out-of-bounds write: a device wrote (its DMA, recorded per device) or guest memory changed outside the pages
  that device's DMA clients attached or allocated in this case;
- pool violation: pages still pending after validation, a slot table that does not tile the pool, or pages
  still allocated once every restored device was shut down (leaked);
- equivalence violation: a mutation that keeps the state's meaning (field order, unknown fields, non-minimal
  varints, a message split in two, a shadowed duplicate, an explicit default) did not restore working devices.
Otherwise the case counts as restored (every device restored and working) or refused (a typed error).

Mutations, with the state they leave: equivalent (as above); values (near the current one, boundaries, another
field's value of the same type, random; bytes and strings edited); structure (a field or repeated element
dropped or duplicated, a message emptied, a field absent from the golden state added, a wire type changed, a
sub-message or the blob truncated); raw byte flips. Each case's randomness is `Random(f"{seed}:{case}")`, so
`--case I` replays one.
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import multiprocessing
import os
import pickle
import random
import sys
import threading
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from unittest import mock

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from google.protobuf.descriptor import FieldDescriptor  # noqa: E402

from driver_helpers import EventfdIrqs, InProcessBench, NvmeBacking, loopback, numbered_frames, same_payloads  # noqa: E402
from vfkeep import savestate  # noqa: E402
from vfkeep.device.dma import MappedMemory  # noqa: E402
from vfkeep.driver import gdma_driver  # noqa: E402
from vfkeep.driver.errors import DEVICE_ERRORS as MANA_DEVICE_ERRORS  # noqa: E402
from vfkeep.driver.mana import ManaDevice  # noqa: E402
from vfkeep.memory import DmaError, DmaManager, GuestMemory, MemoryLayout  # noqa: E402
from vfkeep.memory.dma_manager import DmaClient  # noqa: E402
from vfkeep.nvme_device.core import NvmeController  # noqa: E402
from vfkeep.nvme_device.dma import MemoryDma  # noqa: E402
from vfkeep.nvme_device.namespace import Disk, make_namespaces  # noqa: E402
from vfkeep.nvme_driver.driver import NvmeDriver  # noqa: E402
from vfkeep.nvme_driver.errors import DEVICE_ERRORS as NVME_DEVICE_ERRORS  # noqa: E402
from vfkeep.paravisor.nvme_manager import saved_driver_states  # noqa: E402
from vfkeep.paravisor.servicing import (ServicingStateError, complete_servicing_state,  # noqa: E402
                                        decode_servicing_state, mana_states_by_pci_id)
from vfkeep.paravisor.vf_manager import KEPT_VPORT  # noqa: E402
from vfkeep.proto import underhill_pb2  # noqa: E402

PAGE = 4096
LAYOUT = MemoryLayout(guest_pages=16, worker_pages=64, pool_pages=384)
NIC, DISK = "nic0", "nvme0"
#: Clients (owners) of each device: what its DMA may touch is what these attached or allocated.
OWNERS = {NIC: ("nic_nic0", "nic_nic0_ephemeral"), DISK: ("nvme_nvme0", "nvme_nvme0_check")}
NEIGHBOUR = "nic_nic1"
CPU_COUNT = 2
#: Errors a hostile saved state may legitimately end in: the saved-state vocabulary, the DMA manager's, and what
#: each device kind says talking to its device can raise (a state that passes validation but does not match
#: the device fails on the device).
TYPED = (savestate.RestoreError, savestate.SaveError, ServicingStateError, DmaError, *MANA_DEVICE_ERRORS,
         *NVME_DEVICE_ERRORS)
#: The in-process emulators answer a doorbell before the driver waits: a request that is not answered at once
#: never will be, so waiting 20 ms is plenty (the product's 10 s would make a case cost seconds).
HWC_TIMEOUT_MS = 20
#: The NVMe read that checks a restored driver: its completion comes from the driver's interrupt thread, which a
#: loaded machine may not schedule for a while.
IO_TIMEOUT_S = 1.0
BLOCK = bytes(range(256)) * 16  # the NVMe block written before the save (4096 bytes, 8 LBAs of 512)


# -- the protobuf wire format as a tree ---------------------------------------------------------------------
VARINT, FIXED64, LEN, FIXED32 = 0, 1, 2, 5


@dataclass
class Node:
    """One field occurrence: number, wire type, value (int, bytes, or the fields of a known sub-message),
    its descriptor (None: unknown), and `pad` extra bytes of a non-minimal varint."""

    number: int
    wtype: int
    value: int | bytes | list
    desc: FieldDescriptor | None = None
    msg: object = None  # the message descriptor of a sub-message's fields (for absent-field additions)
    pad: int = 0
    cut: int | None = None  # a sub-message serialized and truncated to this many bytes


def clone(n: Node) -> Node:
    """A deep copy sharing the descriptors."""
    value = [clone(c) for c in n.value] if isinstance(n.value, list) else n.value
    return Node(n.number, n.wtype, value, n.desc, n.msg, n.pad, n.cut)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = data[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7


def _varint(value: int, pad: int = 0) -> bytes:
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        if value or pad:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)
        if not value:
            for _ in range(pad - 1):
                out.append(0x80)
            out.append(0)
            return bytes(out)


def parse(data: bytes, descriptor) -> list[Node]:
    """The fields of a well-formed message (the golden state), sub-messages of known fields parsed too."""
    nodes, pos = [], 0
    while pos < len(data):
        tag, pos = _read_varint(data, pos)
        number, wtype = tag >> 3, tag & 7
        desc = descriptor.fields_by_number.get(number)
        if wtype == VARINT:
            value, pos = _read_varint(data, pos)
        elif wtype == FIXED64:
            value, pos = int.from_bytes(data[pos:pos + 8], "little"), pos + 8
        elif wtype == FIXED32:
            value, pos = int.from_bytes(data[pos:pos + 4], "little"), pos + 4
        else:
            n, pos = _read_varint(data, pos)
            value, pos = data[pos:pos + n], pos + n
            if desc is not None and desc.type == FieldDescriptor.TYPE_MESSAGE:
                nodes.append(Node(number, wtype, parse(value, desc.message_type), desc, desc.message_type))
                continue
        nodes.append(Node(number, wtype, value, desc))
    return nodes


def serialize(nodes: list[Node]) -> bytes:
    out = bytearray()
    for n in nodes:
        out += _varint(n.number << 3 | n.wtype)
        if n.wtype == VARINT:
            out += _varint(n.value if isinstance(n.value, int) else 0, n.pad)
        elif n.wtype in (FIXED64, FIXED32):
            size = 8 if n.wtype == FIXED64 else 4
            out += (n.value if isinstance(n.value, int) else 0).to_bytes(size, "little", signed=False) \
                if isinstance(n.value, int) and 0 <= n.value < 1 << (8 * size) else bytes(size)
        else:
            body = serialize(n.value) if isinstance(n.value, list) else bytes(n.value) if isinstance(n.value, bytes) \
                else _varint(n.value)
            if n.cut is not None:
                body = body[:n.cut]
            out += _varint(len(body)) + body
    return bytes(out)


def walk(nodes: list[Node], parent_msg) -> list[tuple[list[Node], Node, object]]:
    """(containing list, node, containing message descriptor) of every node, depth first."""
    out = []
    for n in nodes:
        out.append((nodes, n, parent_msg))
        if isinstance(n.value, list):
            out += walk(n.value, n.msg)
    return out


def messages(nodes: list[Node], descriptor) -> list[tuple[list[Node], object]]:
    """Every message in the tree (the root too): (its field list, its descriptor)."""
    out = [(nodes, descriptor)]
    for n in nodes:
        if isinstance(n.value, list):
            out += messages(n.value, n.msg)
    return out


def all_fields(descriptor, seen=None) -> set[str]:
    """Full names of every field reachable from a message type (what "every field" means)."""
    seen = set() if seen is None else seen
    if descriptor.full_name in seen:
        return set()
    seen.add(descriptor.full_name)
    out = set()
    for f in descriptor.fields:
        out.add(f.full_name)
        if f.type == FieldDescriptor.TYPE_MESSAGE:
            out |= all_fields(f.message_type, seen)
    return out


# -- mutations ---------------------------------------------------------------------------------------------
_INT_BITS = {FieldDescriptor.TYPE_UINT32: 32, FieldDescriptor.TYPE_UINT64: 64, FieldDescriptor.TYPE_INT32: 64,
             FieldDescriptor.TYPE_INT64: 64, FieldDescriptor.TYPE_BOOL: 1, FieldDescriptor.TYPE_ENUM: 32,
             FieldDescriptor.TYPE_FIXED32: 32, FieldDescriptor.TYPE_FIXED64: 64}
NAMES = [b"nic_nic0", b"nic_nic1", b"nvme_nvme0", b"", b"vfio dma", b"nic0", b"nvme0", b"x" * 300, b"nic_nic0\xc3\xa9"]


@dataclass
class Mutation:
    kind: str       # equivalent | value | structure | raw
    op: str
    field: str      # full names of the fields mutated, comma-separated ("" for whole-blob edits)

    def __str__(self) -> str:
        return f"{self.op}({self.field})" if self.field else self.op


class Mutator:
    """Applies mutations to a parsed tree with one case's Random."""

    EQUIVALENT = ("reorder", "unknown", "pad_varint", "shadow", "explicit_default", "split")

    def __init__(self, rng: random.Random, root_desc):
        self.rng, self.root_desc = rng, root_desc

    def pick_node(self, tree, pred=lambda n: True):
        nodes = [t for t in walk(tree, self.root_desc) if pred(t[1])]
        return self.rng.choice(nodes) if nodes else None

    # equivalent ---------------------------------------------------------------------------------
    def reorder(self, tree) -> Mutation | None:
        """Fields of one message regrouped by number in a random order (occurrences of a number keep theirs)."""
        fields, desc = self.rng.choice([m for m in messages(tree, self.root_desc) if len(m[0]) > 1] or [(None, None)])
        if fields is None:
            return None
        keys = {n.number: self.rng.random() for n in fields}
        fields.sort(key=lambda n: keys[n.number])
        return Mutation("equivalent", "reorder", desc.full_name)

    def unknown(self, tree) -> Mutation:
        fields, desc = self.rng.choice(messages(tree, self.root_desc))
        known = {f.number for f in desc.fields}
        number = self.rng.choice([n for n in (15, 16, 99, 1000, 2047, 9999, 12345, 536870911) if n not in known])
        wtype = self.rng.choice([VARINT, FIXED64, LEN, FIXED32])
        value = self.rng.randbytes(self.rng.randint(0, 12)) if wtype == LEN else self.rng.getrandbits(32)
        fields.insert(self.rng.randint(0, len(fields)), Node(number, wtype, value))
        return Mutation("equivalent", "unknown_field", desc.full_name)

    def pad_varint(self, tree) -> Mutation | None:
        t = self.pick_node(tree, lambda n: n.wtype == VARINT and n.desc is not None)
        if t is None:
            return None
        n = t[1]
        used = len(_varint(n.value))
        if used >= 10:
            return None
        n.pad = self.rng.randint(1, 10 - used)
        return Mutation("equivalent", "non_minimal_varint", n.desc.full_name)

    def split(self, tree) -> Mutation | None:
        """A singular sub-message sent as two occurrences that merge back into it."""
        t = self.pick_node(tree, lambda n: isinstance(n.value, list) and not n.desc.is_repeated
                           and len(n.value) > 1)
        if t is None:
            return None
        fields, n, _ = t
        k = self.rng.randint(1, len(n.value) - 1)
        second = Node(n.number, n.wtype, n.value[k:], n.desc, n.msg)
        n.value = n.value[:k]
        fields.insert(fields.index(n) + 1, second)
        return Mutation("equivalent", "split_message", n.desc.full_name)

    def shadow(self, tree) -> Mutation | None:
        """A singular scalar preceded by another occurrence with a different value: the last one wins."""
        t = self.pick_node(tree, lambda n: n.desc is not None and not isinstance(n.value, list)
                           and not n.desc.is_repeated and n.wtype != LEN)
        if t is None:
            return None
        fields, n, _ = t
        fields.insert(fields.index(n), Node(n.number, n.wtype, self.rng.getrandbits(16), n.desc))
        return Mutation("equivalent", "shadowed_duplicate", n.desc.full_name)

    def explicit_default(self, tree) -> Mutation | None:
        """An absent implicit-presence scalar written out with its default value."""
        choices = []
        for fields, desc in messages(tree, self.root_desc):
            present = {n.number for n in fields}
            for f in desc.fields:
                if f.number not in present and not f.has_presence and not f.is_repeated \
                        and f.type != FieldDescriptor.TYPE_MESSAGE:
                    choices.append((fields, f))
        if not choices:
            return None
        fields, f = self.rng.choice(choices)
        wtype = LEN if f.type in (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES) else \
            FIXED64 if f.type in (FieldDescriptor.TYPE_FIXED64, FieldDescriptor.TYPE_DOUBLE) else \
            FIXED32 if f.type in (FieldDescriptor.TYPE_FIXED32, FieldDescriptor.TYPE_FLOAT) else VARINT
        fields.insert(self.rng.randint(0, len(fields)), Node(f.number, wtype, b"" if wtype == LEN else 0, f))
        return Mutation("equivalent", "explicit_default", f.full_name)

    # values -------------------------------------------------------------------------------------
    def value(self, tree) -> Mutation | None:
        t = self.pick_node(tree, lambda n: n.desc is not None and not isinstance(n.value, list))
        if t is None:
            return None
        n = t[1]
        rng = self.rng
        if isinstance(n.value, int):
            bits = _INT_BITS.get(n.desc.type, 64)
            limit = (1 << bits) - 1
            others = [o.value for _, o, _ in walk(tree, self.root_desc)
                      if isinstance(o.value, int) and o.desc is not None and o.desc.type == n.desc.type and o is not n]
            op = rng.choice(["near", "near", "near", "copy", "copy", "boundary", "random"])
            if op == "near":
                new = n.value + rng.choice([-1, 1, -2, 2, -8, 8, -64, 64, -PAGE, PAGE, rng.randint(-300, 300)])
            elif op == "copy" and others:
                new = rng.choice(others)
            elif op == "boundary":
                new = rng.choice([0, 1, 2, limit, limit >> 1, (limit >> 1) + 1, n.value * 2, n.value // 2, 4096,
                                  65535, 65536])
            else:
                op, new = "random", rng.getrandbits(bits)
            n.value = min(max(new, 0), limit) if n.wtype == VARINT or bits < 64 else new % (limit + 1)
            if n.desc.type == FieldDescriptor.TYPE_BOOL:
                op, n.value = "flip", int(not n.value) if op != "random" else n.value
            return Mutation("value", op, n.desc.full_name)
        data = bytearray(n.value)
        if n.desc.type == FieldDescriptor.TYPE_STRING and rng.random() < 0.6:
            op, data = "name", bytearray(rng.choice(NAMES))
        else:
            op = rng.choice(["flip", "truncate", "extend", "copy", "empty"])
            if op == "flip" and data:
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
            elif op == "truncate" and data:
                del data[rng.randrange(len(data)):]
            elif op == "extend":
                data += rng.randbytes(rng.randint(1, 16))
            elif op == "copy":
                others = [o.value for _, o, _ in walk(tree, self.root_desc) if isinstance(o.value, bytes)
                          and o.desc is not None and o.desc.type == n.desc.type]
                data = bytearray(rng.choice(others))
            else:
                op, data = "empty", bytearray()
        n.value = bytes(data)
        return Mutation("value", op, n.desc.full_name)

    # structure ----------------------------------------------------------------------------------
    def structure(self, tree) -> Mutation | None:
        rng = self.rng
        op = rng.choice(["drop", "drop", "duplicate", "duplicate", "empty_message", "add_absent", "add_absent",
                         "wire_type", "cut_message"])
        if op == "add_absent":
            choices = []
            for fields, desc in messages(tree, self.root_desc):
                present = {n.number for n in fields}
                choices += [(fields, f) for f in desc.fields if f.number not in present]
            if not choices:
                return None
            fields, f = rng.choice(choices)
            node, names = self.new_node(f)
            fields.insert(rng.randint(0, len(fields)), node)
            return Mutation("structure", op, ",".join(names))
        t = self.pick_node(tree, lambda n: n.desc is not None)
        if t is None:
            return None
        fields, n, _ = t
        if op == "drop":
            fields.remove(n)
        elif op == "duplicate":
            fields.insert(fields.index(n) + rng.randint(0, 1), clone(n))
        elif op == "empty_message" and isinstance(n.value, list):
            n.value = []
        elif op == "wire_type":
            n.wtype = rng.choice([w for w in (VARINT, FIXED64, LEN, FIXED32) if w != n.wtype])
            if n.wtype != LEN and not isinstance(n.value, int):
                n.value = len(n.value)
            elif n.wtype == LEN and isinstance(n.value, int):
                n.value = _varint(n.value)
        elif op == "cut_message" and isinstance(n.value, list) and n.value:
            n.cut = rng.randrange(len(serialize(n.value)))
        else:
            return None
        return Mutation("structure", op, n.desc.full_name)

    def new_node(self, f: FieldDescriptor) -> tuple[Node, list[str]]:
        """A plausible occurrence of field `f`; a message gets one field of its own half the time (so fields of
        messages the golden state lacks are reached too). Returns it and the full names of the fields added."""
        rng = self.rng
        if f.type == FieldDescriptor.TYPE_MESSAGE:
            node = Node(f.number, LEN, [], f, f.message_type)
            names = [f.full_name]
            if f.message_type.fields and rng.random() < 0.5:
                child, more = self.new_node(rng.choice(f.message_type.fields))
                node.value.append(child)
                names += more
            return node, names
        if f.type in (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES):
            return Node(f.number, LEN, rng.choice(NAMES), f), [f.full_name]
        return Node(f.number, VARINT, rng.choice([0, 1, 2, 6, 24, 4096, rng.getrandbits(32)]), f), [f.full_name]

    def mutate(self, tree) -> list[Mutation]:
        """1-3 mutations of one class; the equivalent class alone keeps the state's meaning (applied in the order
        of `EQUIVALENT`: a default is only known to be absent while no message is split in two)."""
        rng = self.rng
        kind = rng.choices(["equivalent", "value", "structure", "raw"], weights=[40, 38, 17, 5])[0]
        if kind == "raw":
            return []
        ops = [getattr(self, name) for name in self.EQUIVALENT] if kind == "equivalent" else \
            [self.value] if kind == "value" else [self.structure]
        chosen = sorted(rng.choices(range(len(ops)), k=rng.choice([1, 1, 1, 2, 3])))
        done: list[Mutation] = []
        for i in chosen:
            for _attempt in range(4):
                m = ops[i](tree)
                if m is not None:
                    done.append(m)
                    break
        return done


def raw_edit(rng: random.Random, blob: bytes) -> tuple[bytes, Mutation]:
    out = bytearray(blob)
    op = rng.choice(["flip", "flip", "truncate", "insert"])
    at = rng.randrange(len(out))
    if op == "flip":
        out[at] ^= 1 << rng.randrange(8)
    elif op == "truncate":
        del out[at:]
    else:
        out[at:at] = rng.randbytes(rng.randint(1, 8))
    return bytes(out), Mutation("raw", f"raw_{op}", "")


# -- the devices and their golden save -------------------------------------------------------------------------
class RecordingDma(MappedMemory):
    """The MANA emulator's DMA space, recording every range it writes (a write window is narrowed to the range
    asked for, so each write range passes through here)."""

    def __init__(self, mem, writes: list):
        super().__init__(mem)
        self.writes = writes

    def mapping(self, iova, n, write=False):
        if not write:
            return super().mapping(iova, n, write)
        self.view(iova, n)  # DmaFault outside the mapped ranges
        self.writes.append((iova, n))
        return self.mem.view(iova, n), iova

    def write(self, iova, data):
        self.writes.append((iova, len(data)))
        super().write(iova, data)


class RecordingNvmeDma(MemoryDma):
    """The NVMe emulator's DMA space; it hands out views for reads and writes alike, so every range it reaches
    is recorded and the pages it changed are those of these ranges that differ afterwards."""

    def __init__(self, mem, touched: list):
        super().__init__(mem)
        self.touched = touched

    def view(self, iova, n):
        v = super().view(iova, n)
        self.touched.append((iova, n))
        return v


class Template:
    """A device model frozen right after the save (pickled once: unpickling is the cheapest deep copy); its
    guest memory, DMA space and interrupts are left out and replaced by each copy's own."""

    def __init__(self, device, mem: GuestMemory):
        shared = {id(mem): "mem", id(device.dma): "dma", id(device.irq): "irq"}
        buf = io.BytesIO()
        pickler = pickle.Pickler(buf, pickle.HIGHEST_PROTOCOL)
        pickler.persistent_id = lambda obj: shared.get(id(obj))
        pickler.dump(device)
        self.data = buf.getvalue()

    def copy(self, mem: GuestMemory, dma, irq):
        unpickler = pickle.Unpickler(io.BytesIO(self.data))
        unpickler.persistent_load = {"mem": mem, "dma": dma, "irq": irq}.__getitem__
        return unpickler.load()


@dataclass
class Golden:
    blob: bytes
    tree: list                # the blob parsed
    image: bytes              # guest memory right after the save
    mana_device: Template     # the MANA emulator core right after the save
    nvme_ctrl: Template       # the NVMe controller right after the save


def build_golden(mem: GuestMemory) -> Golden:
    """The golden save (module docstring)."""
    bench = InProcessBench(mem)
    dma = DmaManager(mem, strict_pool=False)
    dev = ManaDevice.new(bench.connect(dma, NIC), NIC)
    dev.open_vport(0, KEPT_VPORT, persistent=True)
    irqs = EventfdIrqs()
    ctrl = NvmeController(MemoryDma(mem), irqs, None, namespaces=make_namespaces(Disk(None, 1 << 20), 1, 1 << 20))
    drv = NvmeDriver.new(NvmeBacking(ctrl, irqs), dma.new_client(OWNERS[DISK][0], persistent=True), DISK,
                         cpu_count=CPU_COUNT, io_queues=1)
    buf = dma.new_client("io", persistent=False).allocate_dma_buffer(PAGE)
    mem.write(buf.gpa, BLOCK)
    drv.namespace(1).write(0, 8, buf.gpa)
    dma.new_client(NEIGHBOUR, persistent=True).allocate_dma_buffer(2 * PAGE)
    state = underhill_pb2.ServicingState()
    dma_state = dma.save()  # before any device's (servicing spec §2.2)
    state.init_state.mana_state.states.add(pci_id=NIC).mana_device.CopyFrom(dev.save())
    nvme = state.init_state.nvme_state.nvme_state
    nvme.cpu_count = CPU_COUNT
    nvme.nvme_disks.add(pci_id=DISK).driver_state.CopyFrom(drv.save())
    drv.shutdown()  # saved: the handle closes without a reset
    complete_servicing_state(state, nics=[{"pci_id": NIC, "mac": bytes(6), "adapter_index": 0, "vports": 1}],
                             dma_state=dma_state, correlation_id="0b1e3d6c-9f84-4a6b-9a55-5d3f3a51c0de",
                             vm_stop_reference_time=123456789, flush_logs_us=42)
    mem.scrub_worker_ram()
    blob = state.SerializeToString()
    return Golden(blob, parse(blob, underhill_pb2.ServicingState.DESCRIPTOR), mem.read(0, mem.size),
                  Template(bench.device, mem), Template(ctrl, mem))


# -- one case ----------------------------------------------------------------------------------------------------
@dataclass
class Outcome:
    verdict: str                      # restored | refused | crash | oob_write | pool | equivalence
    detail: str = ""
    devices: dict = field(default_factory=dict)   # device -> restored | refused:<Type> | absent | broken:<why>


class Case:
    """The restore of one blob on fresh copies of the golden devices and memory."""

    def __init__(self, mem: GuestMemory, golden: Golden):
        self.mem, self.golden = mem, golden
        mem.view(0, mem.size)[:] = golden.image
        self.mana_writes: list = []
        self.nvme_touched: list = []
        self.blocks: dict[str, list] = {}  # owner -> blocks attached or allocated in this case
        self.bench = InProcessBench(mem)
        self.irqs = self.bench.irqs
        self.bench.device = golden.mana_device.copy(mem, RecordingDma(mem, self.mana_writes), self.irqs)
        self.bench.epoch = self.bench.device.epoch
        self.nvme_irqs = EventfdIrqs()
        self.ctrl = golden.nvme_ctrl.copy(mem, RecordingNvmeDma(mem, self.nvme_touched), self.nvme_irqs)
        self.dma = DmaManager(mem, strict_pool=False)
        self.mana: ManaDevice | None = None
        self.leaked: list = []  # blocks of a dropped MANA device whose teardown failed (ManaDevice.leaked)
        self.nvme: NvmeDriver | None = None

    def record(self, blocks):
        for b in blocks:
            self.blocks.setdefault(b.device, []).append(b)
        return blocks

    def allowed(self, device: str) -> set[int]:
        return {b.base_pfn + i for owner in OWNERS[device] for b in self.blocks.get(owner, ()) for i in range(b.pages)}

    def run(self, blob: bytes) -> dict:
        out: dict[str, str] = {}
        try:
            state = decode_servicing_state(blob, downlevel=False)
        except ServicingStateError as e:
            return {NIC: f"refused:{type(e).__name__}", DISK: f"refused:{type(e).__name__}"}
        if state.init_state.HasField("dma_manager_state"):
            try:
                self.dma.restore(state.init_state.dma_manager_state)
            except savestate.RestoreError as e:
                return {NIC: f"refused:{type(e).__name__}", DISK: f"refused:{type(e).__name__}"}
        saved = next((s for s in mana_states_by_pci_id(state) if s.pci_id == NIC), None)
        out[NIC] = self.restore_mana(saved) if saved is not None else self.release(NIC)
        disks, _ = saved_driver_states(state)
        out[DISK] = self.restore_nvme(disks[DISK]) if DISK in disks else self.release(DISK)
        self.dma.validate_restore()
        return out

    def release(self, device: str) -> str:
        """No saved state for the device: its saved buffers are attached and freed (spec §6.2)."""
        client = self.dma.new_client(OWNERS[device][0], persistent=True)
        for b in self.record(client.attach_pending_buffers()):
            b.free()
        client.close()
        return "absent"

    def restore_mana(self, saved) -> str:
        try:
            dev = ManaDevice.restore(self.bench.connect(self.dma, NIC, fresh=False), NIC, saved.mana_device,
                                     defer_probe=True)
            self.mana = dev
            vport = dev.vports.get(0) or dev.open_vport(0, KEPT_VPORT, persistent=True)
            if dev.probe_pending:
                dev.probe(HWC_TIMEOUT_MS)
        except TYPED as e:
            if self.mana is not None:
                self.mana.drop_restored()
                self.leaked, self.mana = self.mana.leaked, None
            return f"refused:{type(e).__name__}"
        frames = numbered_frames(4)
        try:
            got = loopback(vport, frames, timeout=0.05)
        except TYPED as e:
            return f"broken:{type(e).__name__}"
        return "restored" if same_payloads(got, frames) else f"broken:{len(got)} of {len(frames)} frames back"

    def restore_nvme(self, saved) -> str:
        client = self.dma.new_client(OWNERS[DISK][0], persistent=True)
        try:
            self.nvme = NvmeDriver.restore(NvmeBacking(self.ctrl, self.nvme_irqs), client, DISK, saved,
                                           cpu_count=CPU_COUNT)
        except TYPED as e:
            client.close()
            return f"refused:{type(e).__name__}"
        check = self.dma.new_client(OWNERS[DISK][1], persistent=False)  # worker RAM: a hostile pool may be full
        buf = check.allocate_dma_buffer(PAGE)
        try:
            self.nvme.namespace(1).read(0, 8, buf.gpa, timeout=IO_TIMEOUT_S)
            data = self.mem.read(buf.gpa, PAGE)
        except TYPED as e:
            return f"broken:{type(e).__name__}"
        finally:
            buf.free()
            check.close()
        return "restored" if data == BLOCK else "broken:the written block reads back different"

    def held(self, owners) -> set[tuple[int, int]]:
        """(base pfn, pages) of every allocated slot of `owners`, pool and worker RAM."""
        return {(s["base_pfn"], s["pages"]) for region in self.dma.inspect().values() for s in region["slot_table"]
                if s["state"] == "allocated" and s["owner"] in owners}

    def check_live_blocks(self) -> str | None:
        """The MANA NIC's allocations are exactly the blocks its restored driver uses (its HWC buffer and its
        vport's blocks), or none when it was not restored but those a failed teardown had to leave to the FLR
        fallback (`ManaDevice.leaked`): nothing else held, nothing held twice."""
        dev = self.mana
        live = {(b.base_pfn, b.pages) for b in self.leaked}
        if dev is not None and not dev.closed:
            live |= {(b.base_pfn, b.pages) for b in [dev.gdma.hwc_mem, *dev.leaked,
                                                     *(blk for v in dev.vports.values() for blk in v._blocks)]}
        held = self.held(OWNERS[NIC])
        if held != live:
            return f"{NIC} holds {sorted(held)}, its driver uses {sorted(live)}"
        return None

    def teardown(self) -> None:
        """The NVMe driver's shutdown (its interrupt thread ends; its memory must all come back); the MANA
        driver is dropped (it has no thread, and its live blocks were checked)."""
        if self.nvme is not None:
            self.nvme.shutdown()
        for t in threading.enumerate():
            if t.name == f"aen-{DISK}":  # an event handler the restore started (a saved, unhandled event)
                t.join(1.0)
        self.irqs.close()
        for fd in self.nvme_irqs.fds.values():
            os.close(fd)


def changed_pages(before: bytes, after: bytes) -> set[int]:
    if before == after:
        return set()
    return {i for i in range(len(before) // PAGE) if before[i * PAGE:(i + 1) * PAGE] != after[i * PAGE:(i + 1) * PAGE]}


def pages_of(ranges) -> set[int]:
    return {p for a, n in ranges for p in range(a // PAGE, (a + max(n, 1) - 1) // PAGE + 1)}


def check_pool(dma: DmaManager) -> str | None:
    pool = dma.inspect()["pool"]
    if pool["pending_pages"]:
        return f"{pool['pending_pages']} pages still pending after validation"
    table = pool["slot_table"]
    at = LAYOUT.guest_pages + LAYOUT.worker_pages
    for s in table:
        if s["base_pfn"] != at:
            return f"slot table does not tile the pool at pfn {at}: {s}"
        at += s["pages"]
    if at != LAYOUT.guest_pages + LAYOUT.worker_pages + LAYOUT.pool_pages:
        return f"slot table ends at pfn {at}"
    return None


def run_case(mem: GuestMemory, golden: Golden, seed: int, index: int) -> tuple[Outcome, list[Mutation]]:
    rng = random.Random(f"{seed}:{index}")
    if index == 0:
        blob, mutations = golden.blob, []  # case 0: the golden state itself must restore
    else:
        tree = [clone(n) for n in golden.tree]
        mutations = Mutator(rng, underhill_pb2.ServicingState.DESCRIPTOR).mutate(tree)
        blob = serialize(tree)
        if not mutations:
            blob, m = raw_edit(rng, blob)
            mutations = [m]
    equivalent = all(m.kind == "equivalent" for m in mutations)
    case = Case(mem, golden)
    _CASE[:] = [case]
    before = golden.image
    try:
        devices = case.run(blob)
    except Exception as e:  # noqa: BLE001 - the thing being looked for
        case.teardown()
        return Outcome("crash", "".join(traceback.format_exception(e)[-6:])), mutations
    after = mem.read(0, mem.size)
    changed = changed_pages(before, after)
    mana_pages, nvme_pages = pages_of(case.mana_writes), pages_of(case.nvme_touched) & changed
    outcome = None
    for device, pages in ((NIC, mana_pages), (DISK, nvme_pages)):
        outside = pages - case.allowed(device)
        if outside:
            outcome = Outcome("oob_write", f"{device} wrote pages {sorted(outside)[:8]} outside its own", devices)
    stray = changed - case.allowed(NIC) - case.allowed(DISK)
    if outcome is None and stray:
        outcome = Outcome("oob_write", f"guest memory changed outside the devices' pages: {sorted(stray)[:8]}",
                          devices)
    if outcome is None and (problem := check_pool(case.dma) or case.check_live_blocks()):
        outcome = Outcome("pool", problem, devices)
    try:
        case.teardown()
    except Exception as e:  # noqa: BLE001
        return Outcome("crash", "teardown: " + "".join(traceback.format_exception(e)[-6:]), devices), mutations
    if _THREAD_ERRORS:
        e = _THREAD_ERRORS.pop(0).exc_value
        _THREAD_ERRORS.clear()
        return Outcome("crash", "in a thread: " + "".join(traceback.format_exception(e)[-6:]), devices), mutations
    if outcome is None and (held := case.held(OWNERS[DISK])):
        outcome = Outcome("pool", f"pages still allocated after the NVMe driver shut down: {held}", devices)
    if outcome is None:
        ok = all(v == "restored" for v in devices.values())
        if equivalent and not ok:
            outcome = Outcome("equivalence", f"a state equivalent to the golden one gave {devices}", devices)
        else:
            outcome = Outcome("restored" if ok else "refused", "", devices)
    return outcome, mutations


# -- the campaign -------------------------------------------------------------------------------------------------
@dataclass
class Report:
    cases: int = 0
    seed: int = 0
    seconds: float = 0.0
    verdicts: Counter = field(default_factory=Counter)
    device_outcomes: Counter = field(default_factory=Counter)
    mutation_kinds: Counter = field(default_factory=Counter)
    fields_mutated: set = field(default_factory=set)
    findings: list = field(default_factory=list)  # crashes and violations: {case, verdict, detail, mutations}

    FAILURES = ("crash", "oob_write", "pool", "equivalence")

    def add(self, index: int, outcome: Outcome, mutations: list[Mutation]) -> None:
        self.cases += 1
        self.verdicts[outcome.verdict] += 1
        for device, result in outcome.devices.items():
            self.device_outcomes[f"{device} {result}"] += 1
        for m in mutations:
            self.mutation_kinds[f"{m.kind}:{m.op}"] += 1
            self.fields_mutated.update(name for name in m.field.split(",") if name)
        if outcome.verdict in self.FAILURES:
            self.findings.append({"case": index, "verdict": outcome.verdict, "detail": outcome.detail,
                                  "mutations": [str(m) for m in mutations]})

    @property
    def failures(self) -> int:
        return sum(self.verdicts[v] for v in self.FAILURES)

    def to_json(self) -> dict:
        total = all_fields(underhill_pb2.ServicingState.DESCRIPTOR)
        return {"cases": self.cases, "seed": self.seed, "seconds": round(self.seconds, 1),
                "cases_per_s": round(self.cases / self.seconds, 1) if self.seconds else None,
                "crashes": self.verdicts["crash"], "out_of_bounds_writes": self.verdicts["oob_write"],
                "pool_violations": self.verdicts["pool"], "equivalence_violations": self.verdicts["equivalence"],
                "restored": self.verdicts["restored"], "refused": self.verdicts["refused"],
                "restore_rate": round(self.verdicts["restored"] / self.cases, 4) if self.cases else None,
                "device_outcomes": dict(self.device_outcomes.most_common()),
                "mutation_kinds": dict(self.mutation_kinds), "fields": len(total),
                "fields_mutated": len(self.fields_mutated & total),
                "fields_never_mutated": sorted(total - self.fields_mutated), "findings": self.findings}


def run_cases(indices, seed: int):
    """Yield (index, outcome, mutations) for each case index, in one process (logging off meanwhile)."""
    logging.disable(logging.CRITICAL)
    mem = GuestMemory.create(LAYOUT)
    try:
        with mock.patch.object(threading, "excepthook", _THREAD_ERRORS.append), \
                mock.patch.object(gdma_driver, "HWC_TIMEOUT_DEFAULT_IN_MS", HWC_TIMEOUT_MS), \
                mock.patch.object(gdma_driver, "random", random.Random(0)), _recording_clients():
            golden = build_golden(mem)  # the same in every process: the activity id is the only randomness
            for index in indices:
                yield (index, *run_case(mem, golden, seed, index))
    finally:
        mem.close()
        logging.disable(logging.NOTSET)


def _job(indices, seed: int, results) -> None:
    for item in run_cases(indices, seed):
        results.put(item)


def campaign(cases: int, seed: int, *, only: int | None = None, jobs: int = 1, progress=None) -> Report:
    """Run cases [0, cases) (or only case `only`) in `jobs` processes and report; `progress(report)` after
    each case."""
    indices = [only] if only is not None else list(range(cases))
    report = Report(seed=seed)
    t0 = time.perf_counter()
    procs = []
    try:
        if jobs <= 1:
            stream = run_cases(indices, seed)
        else:
            ctx = multiprocessing.get_context("fork")
            results = ctx.Queue()
            procs = [ctx.Process(target=_job, args=(indices[j::jobs], seed, results), daemon=True)
                     for j in range(jobs)]
            for p in procs:
                p.start()
            stream = (results.get(timeout=300) for _ in indices)
        for index, outcome, mutations in stream:
            report.add(index, outcome, mutations)
            if progress is not None:
                progress(report)
    finally:
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join()
        report.seconds = time.perf_counter() - t0
    return report


_CASE: list = []  # the case whose DMA clients are being recorded
_THREAD_ERRORS: list = []  # exceptions that ended a thread (threading.excepthook) during the running case


class _recording_clients:
    """Every block a DMA client attaches or allocates is recorded for the running case (its owner's pages)."""

    def __enter__(self):
        attach, allocate = DmaClient.attach_pending_buffers, DmaClient.allocate_dma_buffer

        def recording_attach(client):
            return _CASE[-1].record(attach(client)) if _CASE else attach(client)

        def recording_allocate(client, nbytes):
            block = allocate(client, nbytes)
            if _CASE:
                _CASE[-1].record([block])
            return block

        self._patches = [mock.patch.object(DmaClient, "attach_pending_buffers", recording_attach),
                         mock.patch.object(DmaClient, "allocate_dma_buffer", recording_allocate)]
        for p in self._patches:
            p.start()
        return self

    def __exit__(self, *exc):
        for p in reversed(self._patches):
            p.stop()
        _CASE.clear()


def main(argv=None) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--case", type=int, default=None, help="replay this one case of the seed")
    ap.add_argument("--json", default=None, help="write the report here")
    ap.add_argument("--jobs", type=int, default=1, help="processes (cases are split between them)")
    args = ap.parse_args(argv)
    console = Console(stderr=True)
    columns = [TextColumn("fuzz"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[line]}"),
               TimeElapsedColumn()]
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task("fuzz", total=1 if args.case is not None else args.cases, line="")
        shown = [0]

        def progress(r: Report) -> None:
            if r.findings and len(r.findings) > shown[0]:
                for f in r.findings[shown[0]:]:
                    bar.console.print(f"[red]case {f['case']} {f['verdict']}[/red]: {', '.join(f['mutations'])}\n"
                                      f"{f['detail']}")
                shown[0] = len(r.findings)
            if r.cases % 50 == 0 or r.cases == args.cases:
                rate = r.cases / max(time.perf_counter() - t0, 1e-9)
                bar.update(task, completed=r.cases, line=f"{rate:,.0f}/s  restored {r.verdicts['restored']:,}  "
                                                         f"failures {r.failures}")

        t0 = time.perf_counter()
        report = campaign(args.cases, args.seed, only=args.case, jobs=args.jobs, progress=progress)
        bar.update(task, completed=report.cases)
    data = report.to_json()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(data, f, indent=1)
    summary = {k: data[k] for k in ("cases", "seed", "seconds", "cases_per_s", "crashes", "out_of_bounds_writes",
                                    "pool_violations", "equivalence_violations", "restored", "refused",
                                    "restore_rate", "fields", "fields_mutated")}
    for k, v in summary.items():
        print(f"{k}: {v}")
    print("device outcomes: " + ", ".join(f"{k} {v}" for k, v in list(data["device_outcomes"].items())[:12]))
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
