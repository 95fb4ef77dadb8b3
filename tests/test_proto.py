"""Saved-state schema: generated modules are current, field numbers and wire bytes match the servicing spec."""
import pathlib

import pytest

from vfkeep.paravisor.servicing import ServicingStateError, decode_servicing_state
from vfkeep.proto import dma_manager_pb2, generate, mana_driver_pb2, underhill_pb2

PROTO_DIR = pathlib.Path(generate.__file__).parent


def test_generated_modules_are_current(tmp_path):
    generate.generate(tmp_path)
    for fresh in tmp_path.glob("*_pb2.py"):
        committed = PROTO_DIR / fresh.name
        assert committed.exists(), f"{fresh.name} is not committed; run `make proto`"
        assert committed.read_text() == fresh.read_text(), f"{fresh.name} is stale; run `make proto`"


@pytest.mark.parametrize("field,key", [
    ("nvme_state", "82f104"), ("dma_manager_state", "8af104"), ("mana_state", "9af104"),
])
def test_extension_field_keys(field, key):
    init = underhill_pb2.ServicingInitState()
    getattr(init, field).SetInParent()
    assert init.SerializeToString().hex().startswith(key)


def test_vmbus_client_key():
    assert underhill_pb2.ServicingInitState(vmbus_client=b"\x00").SerializeToString().hex().startswith("92f104")


def test_mana_state_some_empty_list_is_present_and_empty():
    init = underhill_pb2.ServicingInitState()
    init.mana_state.SetInParent()
    assert init.SerializeToString() == bytes.fromhex("9af10400")
    back = underhill_pb2.ServicingInitState.FromString(init.SerializeToString())
    assert back.HasField("mana_state") and len(back.mana_state.states) == 0
    assert not underhill_pb2.ServicingInitState().HasField("mana_state")


def test_hwc_buffer_len_encoding():
    assert mana_driver_pb2.SavedMemoryState(len=24576).SerializeToString() == bytes.fromhex("1080c001")


def _full_gdma_state() -> mana_driver_pb2.GdmaDriverSavedState:
    g = mana_driver_pb2.GdmaDriverSavedState(db_id=3, gpa_mkey=7, pdid=9, hwc_activity_id=0xABCD0005, num_msix=2,
                                             min_queue_avail=64)
    g.mem.base_pfn, g.mem.len = 5120, 24576
    for q, qid in ((g.eq, 24), (g.cq, 24)):
        q.doorbell.doorbell_id, q.doorbell.page_count = 0, 1
        q.id, q.next, q.size, q.shift = qid, 4096 + 64, 4096, 12
    for q in (g.rq, g.sq):
        q.id, q.head, q.tail, q.mask = 24, 4096, 32, 4095
    g.link_toggle.add(vport_index=0, link_up=True)
    g.link_toggle.add()  # index 0 + false encodes as an empty element
    return g


def test_mana_round_trip_and_field_numbers():
    s = mana_driver_pb2.ManaSavedState(pci_id="d186:00:00.0")
    s.mana_device.gdma.CopyFrom(_full_gdma_state())
    blob = s.SerializeToString()
    assert mana_driver_pb2.ManaSavedState.FromString(blob) == s
    desc = mana_driver_pb2.GdmaDriverSavedState.DESCRIPTOR
    assert {f.name: f.number for f in desc.fields} == {
        "mem": 1, "eq": 2, "cq": 3, "rq": 4, "sq": 5, "db_id": 6, "gpa_mkey": 7, "pdid": 8,
        "hwc_activity_id": 9, "num_msix": 10, "min_queue_avail": 11, "link_toggle": 12}
    assert _full_gdma_state().link_toggle[1].SerializeToString() == b""


def test_servicing_state_round_trip_with_all_parts():
    st = underhill_pb2.ServicingState()
    st.init_state.vm_stop_reference_time = 123456789
    st.init_state.firmware_type.uefi.SetInParent()
    m = st.init_state.mana_state.states.add(pci_id="nic0")
    m.mana_device.gdma.CopyFrom(_full_gdma_state())
    slot = st.init_state.dma_manager_state.private_pool.state.add(base_pfn=5120, size_pages=6)
    slot.state.allocated.device_id, slot.state.allocated.tag = "nic_nic0", "vfio dma"
    st.init_state.dma_manager_state.private_pool.ranges.add(start=5120 * 4096, end=5632 * 4096)
    st.units.add(name="net", state=b"\x01\x02")
    assert underhill_pb2.ServicingState.FromString(st.SerializeToString()) == st


@pytest.mark.parametrize("firmware", [None, b"", b"\x22\x00", b"\x1a\x00"])
def test_firmware_variant_missing_or_unknown_is_a_decode_error(firmware):
    """`Firmware` is an enum on the wire (a oneof message): no variant or an unknown one (4) does not decode;
    the known unit variant `none` (field 3, b"\\x1a\\x00") does."""
    st = underhill_pb2.ServicingState()
    st.init_state.vm_stop_reference_time = 1
    if firmware is not None:
        st.init_state.firmware_type.MergeFromString(firmware)
    blob = st.SerializeToString()
    if firmware == b"\x1a\x00":
        assert decode_servicing_state(blob, downlevel=False).init_state.firmware_type.HasField("none")
        return
    with pytest.raises(ServicingStateError, match="failed to decode servicing state"):
        decode_servicing_state(blob, downlevel=False)
