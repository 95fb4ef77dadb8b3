"""`vfkeep state decode`: a ServicingState blob as a plain tree (bytes as hex, GUIDs as UUIDs)."""
from __future__ import annotations

import uuid

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError, Message

from ..proto import guid_pb2, underhill_pb2


class UndecodableState(Exception):
    """The file is not a ServicingState."""


def decode_file(path: str) -> dict:
    with open(path, "rb") as f:
        blob = f.read()
    if not blob:
        raise UndecodableState(f"{path}: not a ServicingState (empty file)")
    try:
        state = underhill_pb2.ServicingState.FromString(blob)
    except DecodeError as e:
        raise UndecodableState(f"{path}: not a ServicingState ({len(blob)} bytes): {e}") from None
    if not state.HasField("init_state"):  # every saved state has one; bytes that parse as only unknown fields don't
        raise UndecodableState(f"{path}: not a ServicingState ({len(blob)} bytes): no init_state")
    init = state.init_state
    summary = {
        "bytes": len(blob),
        "dma_manager_state": init.HasField("dma_manager_state"),
        "mana_state": (len(init.mana_state.states) if init.HasField("mana_state") else None),
        "mana_pci_ids": [s.pci_id for s in init.mana_state.states],
        "nvme_state": ([d.pci_id for d in init.nvme_state.nvme_state.nvme_disks]
                       if init.HasField("nvme_state") else None),
        "pool_allocations": [
            {"device": s.state.allocated.device_id, "base_pfn": s.base_pfn, "pages": s.size_pages,
             "tag": s.state.allocated.tag}
            for s in init.dma_manager_state.private_pool.state if s.state.WhichOneof("variant") == "allocated"],
    }
    summary["field_numbers"] = {fd.name: fd.number for fd in init.DESCRIPTOR.fields if fd.number >= 10000}
    return {"summary": summary, "state": to_tree(state)}


def to_tree(msg: Message) -> dict:
    """Present fields only, in field-number order, named as in the .proto files (the numbers of the vfkeep and
    OpenHCL extensions, 10000 and up, are in the summary's `field_numbers`)."""
    out = {}
    for fd, value in msg.ListFields():
        key = fd.name
        if fd.is_repeated:
            out[key] = [_value(fd, v) for v in value]
        else:
            out[key] = _value(fd, value)
    return out


def _value(fd: FieldDescriptor, v):
    if fd.type == FieldDescriptor.TYPE_MESSAGE:
        if fd.message_type.full_name == guid_pb2.Guid.DESCRIPTOR.full_name:
            return _guid(v)
        return to_tree(v)
    if fd.type == FieldDescriptor.TYPE_BYTES:
        return v.hex()
    return v


def _guid(g) -> str:
    try:
        return str(uuid.UUID(fields=(g.data1, g.data2, g.data3, g.data4[0], g.data4[1],
                                     int.from_bytes(g.data4[2:8], "big"))))
    except (ValueError, IndexError):
        return f"invalid guid {g.data1:#x}-{g.data2:#x}-{g.data3:#x}-{g.data4.hex()}"
