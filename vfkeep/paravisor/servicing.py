"""The `ServicingState` blob: assembled by the old worker (spec §2.2, §2.6), decoded by the new one (§3).

The blob is untrusted input for the reader: decoding failures are a typed error the worker
recovers from (DESIGN §6), and a downlevel reader drops what it does not know (field 10003).
"""
from __future__ import annotations

import enum
# uuid.uuid5 imports hashlib on first use (~10 ms of OpenSSL loading): imported here, before the worker's
# hello, so the save on the servicing's critical path does not pay for it.
import hashlib  # noqa: F401
import functools
import logging
import time
import uuid
from typing import Mapping

from google.protobuf.message import DecodeError

from ..contract import TEST_CONFIG_ENV
from ..log import kv
from ..proto import guid_pb2, underhill_pb2

log = logging.getLogger(__name__)


class TestConfig(enum.Enum):
    """Mirrors OpenHCL's `OPENHCL_TEST_CONFIG` servicing hooks (spec §2.4)."""

    SERVICING_SAVE_FAIL = "SERVICING_SAVE_FAIL"      # fail after the inner save succeeded
    SERVICING_SAVE_STUCK = "SERVICING_SAVE_STUCK"    # hang before doing anything
    SERVICING_SAVE_CRASH = "SERVICING_SAVE_CRASH"    # die after the drivers were saved (DESIGN D4)
    SERVICING_RESTORE_STUCK = "SERVICING_RESTORE_STUCK"  # new worker hangs before fetching the state


def parse_test_config(value: str | None, source: str) -> TestConfig | None:
    """Unknown values are warned about and ignored, like any bad setting (never fatal)."""
    if not value:
        return None
    try:
        return TestConfig(value.upper())
    except ValueError:
        kv(log, logging.WARNING, "unknown test config, ignored", source=source, value=value,
           expected="|".join(t.value for t in TestConfig))
        return None


def test_config_from_env(environ: Mapping[str, str]) -> TestConfig | None:
    return parse_test_config(environ.get(TEST_CONFIG_ENV), TEST_CONFIG_ENV)


class ServicingStateError(Exception):
    """The servicing state handed to this worker cannot be decoded."""


@functools.cache
def _instance_uuid(pci_id: str) -> uuid.UUID:
    return uuid.uuid5(uuid.NAMESPACE_URL, f"vfkeep:nic:{pci_id}")


def instance_guid(pci_id: str) -> guid_pb2.Guid:
    """Stable VTL2 VF instance id of a NIC, derived from its PCI id (the uuid5 once per NIC and process: its first
    one cost 0.1 ms, in the save)."""
    u = _instance_uuid(pci_id)
    return guid_pb2.Guid(data1=u.fields[0], data2=u.fields[1], data3=u.fields[2], data4=u.bytes[8:])


def guid_from_uuid(u: uuid.UUID) -> guid_pb2.Guid:
    return guid_pb2.Guid(data1=u.fields[0], data2=u.fields[1], data3=u.fields[2], data4=u.bytes[8:])


def reference_time() -> int:
    """Stand-in for the hypervisor reference time (100 ns units), comparable across processes."""
    return time.monotonic_ns() // 100


def complete_servicing_state(state: underhill_pb2.ServicingState, *, nics: list[dict], dma_state,
                             correlation_id: str | None, vm_stop_reference_time: int, flush_logs_us: int) -> None:
    """Add the worker's own parts of the top-level state (spec §2.6) to `state`, which holds the device
    kinds' parts already (MANA: field 10003): `begin_servicing_state`'s, then `finish_servicing_state`'s.

    nics: [{pci_id, mac (6 bytes), adapter_index, vports}] for the netvsp state, saved regardless of
    keepalive. dma_state: `OpenhclDmaManagerState` or None (present iff a keepalive mode was effective).
    """
    begin_servicing_state(state, nics=nics, correlation_id=correlation_id,
                          vm_stop_reference_time=vm_stop_reference_time)
    finish_servicing_state(state, dma_state=dma_state, flush_logs_us=flush_logs_us)


def begin_servicing_state(state: underhill_pb2.ServicingState, *, nics: list[dict], correlation_id: str | None,
                          vm_stop_reference_time: int) -> None:
    """The parts of the top-level state known before the worker stops any IO (the emulation platform's, the ids,
    the VM stop time): the old worker adds them before its relays stop, outside the guest's blackout."""
    init = state.init_state
    init.firmware_type.none.SetInParent()
    init.vm_stop_reference_time = vm_stop_reference_time
    if correlation_id:
        init.correlation_id.CopyFrom(guid_from_uuid(uuid.UUID(correlation_id)))
    index_list = init.emuplat.network_adapter_index
    index_list.SetInParent()
    for nic in nics:
        netvsp = init.emuplat.netvsp_state.add()
        netvsp.instance_id.CopyFrom(instance_guid(nic["pci_id"]))
        # vfkeep's guest reaches the NIC through the channel rings, never through a VTL0 VF.
        for _ in range(nic["vports"]):
            netvsp.direction_to_vtl0.add(value=False)
        if nic["mac"]:
            index_list.entries.add(mac_address=nic["mac"], adapter_index=nic["adapter_index"])


def finish_servicing_state(state: underhill_pb2.ServicingState, *, dma_state, flush_logs_us: int) -> None:
    """The parts known only once the devices are saved: the DMA manager's state and the log flush's time."""
    init = state.init_state
    init.flush_logs_result.duration_us = flush_logs_us
    if dma_state is not None:
        init.dma_manager_state.CopyFrom(dma_state)


def decode_servicing_state(blob: bytes, *, downlevel: bool) -> underhill_pb2.ServicingState:
    """Decode the blob; a downlevel worker (built before MANA keepalive) ignores field 10003."""
    try:
        state = underhill_pb2.ServicingState.FromString(blob)
    except (DecodeError, ValueError) as e:
        raise ServicingStateError(f"failed to decode servicing state ({len(blob)} bytes): {e}") from None
    if not state.HasField("init_state"):
        raise ServicingStateError(f"servicing state of {len(blob)} bytes has no init_state")
    # An enum travels as a oneof message; a missing or unknown variant is a decode error (spec §7 encoding
    # rules), not a default: protobuf alone would accept it (unknown fields are kept, WhichOneof is None).
    if state.init_state.firmware_type.WhichOneof("variant") is None:
        raise ServicingStateError(f"failed to decode servicing state ({len(blob)} bytes): "
                                  "Firmware has no known variant")
    if downlevel and state.init_state.HasField("mana_state"):
        kv(log, logging.INFO, "downlevel worker ignores mana_state (field 10003)",
           entries=len(state.init_state.mana_state.states))
        state.init_state.ClearField("mana_state")
    return state


def mana_states_by_pci_id(state: underhill_pb2.ServicingState | None) -> list:
    """The saved `ManaSavedState` list in order (spec §3 step 6 picks the first match per pci_id)."""
    if state is None or not state.init_state.HasField("mana_state"):
        return []
    return list(state.init_state.mana_state.states)


def adapter_index_map(state: underhill_pb2.ServicingState | None) -> dict[bytes, int]:
    """MAC -> adapter index; absent in older state, so allocation restarts at 0."""
    if state is None or not state.init_state.emuplat.HasField("network_adapter_index"):
        return {}
    return {e.mac_address: e.adapter_index for e in state.init_state.emuplat.network_adapter_index.entries}

