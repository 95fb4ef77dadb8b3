"""The host<->worker contract (vfkeep.contract): one typed form per message, and the host's import boundary."""
from __future__ import annotations

import json
import struct
import subprocess
import sys

import pytest

from vfkeep import contract as c

MESSAGES = [
    c.Hello(4242, "0.1.0", "current", 3, {"mana": "enabled", "nvme": "disabled"}),
    c.Start(),
    c.Start(servicing=True),
    c.RestoreStateRequest(),
    c.RestoreState(2, c.TransferStatus.SUCCESS, b"\x0a\x00"),
    c.RestoreCompleted(c.TransferStatus.FAILURE),
    c.Started((c.NicRestore("d186:00:00.0", c.RestorePath.KEEPALIVE, None, False, 12.5),),
              (c.UnclaimedAllocation("nic_x", 600, 6, "vfio dma"),), None, {"total": 1.0}),
    c.Save(c.HostCapabilities.MANA_KEEPALIVE, 60, "f3c1", "SERVICING_SAVE_FAIL"),
    c.SaveState(c.TransferStatus.MORE_DATA, b"blob"),
    c.SaveState(c.TransferStatus.SUCCESS, b"blob", (c.NicSaveOutcome("d186:00:00.0", c.SaveOutcome.SAVED, None),),
                {"total": 2.0}),
    c.SaveState(c.TransferStatus.FAILURE, nics=(c.NicSaveOutcome("d186:00:00.0", c.SaveOutcome.SAVE_FAILED, "x"),),
                error="test hook", revived=(c.NicRestore("d186:00:00.0", c.RestorePath.FALLBACK, "why", True, 3.0),)),
    c.SaveStateAnswer(c.TransferStatus.SUCCESS),
    c.Inspect(),
    c.InspectReply({"pid": 1, "nics": []}),
    c.Shutdown(),
    c.Bye(),
    c.ErrorReply("unexpected message 'save' in this state"),
]


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_every_message_round_trips_through_its_json_form_and_the_channel(msg):
    kinds = c.HOST_MESSAGES if type(msg) in c.HOST_MESSAGES.values() else c.WORKER_MESSAGES
    wire = msg.to_json()
    assert wire["type"] == msg.kind
    assert c.decode(wire, kinds) == msg
    a, b = c.Channel.pair()
    try:
        a.send(msg.to_json())
        assert c.decode(b.recv(5), kinds) == msg
    finally:
        a.close()
        b.close()


def test_wire_form_of_a_save_and_a_started():
    """The frames a worker of another version reads and writes: field names and JSON types are the contract."""
    save = c.Save(c.capability_word(mana_keepalive=True, nvme_keepalive=False), c.timeout_hint(59.2), "id", None)
    assert save.to_json() == {"type": "save", "capabilities": 2, "timeout_hint_s": 60, "correlation_id": "id",
                              "test_config": None, "kill_point": None}
    assert (save.mana_keepalive, save.nvme_keepalive, save.timeout_s) == (True, False, 60.0)
    assert c.capability_word(mana_keepalive=False, nvme_keepalive=True) == 1
    assert c.capability_word(mana_keepalive=True, nvme_keepalive=True) == 3
    started = c.decode({"type": "started", "nics": [{"pci_id": "p", "restore_path": "fresh", "error": None,
                                                      "flr": True, "create_ms": 1}],
                        "unclaimed_pool_allocations": [], "error": None, "phases_ms": {}}, c.WORKER_MESSAGES)
    assert started.nics[0].restore_path is c.RestorePath.FRESH and started.nics[0].create_ms == 1.0


@pytest.mark.parametrize("data, problem", [
    ([1, 2], "JSON object"),
    ({"type": "reboot"}, "unexpected message 'reboot'"),
    ({"type": "save_state"}, "missing field 'status'"),
    ({"type": "save_state", "status": 7}, "save_state.status: 7 is not one of"),
    ({"type": "save_state", "status": True}, "save_state.status: True is not one of"),
    ({"type": "save_state", "status": 0, "payload": "text"}, "save_state.payload: expected bytes"),
    ({"type": "started", "nics": [{"pci_id": "p", "restore_path": "sideways"}]}, "nics[0].restore_path"),
    ({"type": "hello", "pid": True, "version": "v", "compat": "current", "generation": 1}, "hello.pid"),
])
def test_a_message_that_does_not_fit_is_a_contract_error(data, problem):
    with pytest.raises(c.ContractError, match=problem.replace("[", r"\[").replace("]", r"\]")):
        c.decode(data, c.WORKER_MESSAGES)


def test_unknown_fields_are_ignored_and_defaults_fill_absent_ones():
    msg = c.decode({"type": "save_state", "status": 0, "from_the_future": 1}, c.WORKER_MESSAGES)
    assert msg == c.SaveState(c.TransferStatus.SUCCESS, b"", (), {})


@pytest.mark.parametrize("data, problem", [
    ({"type": "save", "capabilities": 4}, "bits 2..63 are reserved"),
    ({"type": "save", "capabilities": 1 << 63}, "bits 2..63 are reserved"),
    ({"type": "save", "capabilities": -1}, "u64"),
    ({"type": "save", "capabilities": 3, "timeout_hint_s": 65536}, "not a u16"),
    ({"type": "save", "mana_keepalive": True, "nvme_keepalive": False}, "missing field 'capabilities'"),
])
def test_a_save_request_carries_the_capability_word_with_reserved_bits_zero(data, problem):
    """Spec §1.3: a u64 with bit 0 NVMe, bit 1 MANA, bits 2..63 reserved (zero); the timeout hint is a u16."""
    with pytest.raises(c.ContractError, match=problem):
        c.decode(data, c.HOST_MESSAGES)


def test_timeout_hint_rounds_up_and_no_timeout_is_65535_then_200_s():
    """Spec §2.1: whole seconds; a hint >= 65535 means no timeout, replaced by 200 s in the worker."""
    assert [c.timeout_hint(t) for t in (0.2, 1.0, 59.5, 65534.0, 65535.0, 1e9)] == [1, 1, 60, 65534, 65535, 65535]
    assert c.Save(0, 65535).timeout_s == 200.0 and c.Save(0, 7).timeout_s == 7.0


@pytest.mark.parametrize("size, chunks", [
    (0, [0]), (1, [1]), (8192, [8192]), (8193, [8192, 1]), (3 * 8192 + 5424, [8192, 8192, 8192, 5424]),
])
def test_saved_state_goes_in_chunks_of_at_most_8192_bytes(size, chunks):
    """Spec §2.5: MORE_DATA on every chunk but the last, SUCCESS on the last; the host's responses likewise,
    each header's length equal to its payload; the bytes join back to the state."""
    blob = bytes(i * 7 % 251 for i in range(size))
    saves = c.save_state_messages(blob, (c.NicSaveOutcome("p", c.SaveOutcome.SAVED),), {"total": 1.0})
    assert [len(m.payload) for m in saves] == chunks
    assert [m.status for m in saves] == [c.TransferStatus.MORE_DATA] * (len(chunks) - 1) + [c.TransferStatus.SUCCESS]
    assert [m.nics for m in saves][-1] and not any(m.nics or m.phases_ms for m in saves[:-1])
    assert b"".join(m.payload for m in saves) == blob
    responses = c.restore_state_messages(blob)
    assert [(m.length, len(m.payload)) for m in responses] == [(n, n) for n in chunks]
    assert [m.status for m in responses][-1] is c.TransferStatus.SUCCESS
    assert b"".join(m.payload for m in responses) == blob


def test_channel_frames_carry_the_payload_raw():
    """One framing for every message: u32 JSON length, u32 payload length, JSON, payload bytes (no base64)."""
    a, b = c.Channel.pair()
    try:
        a.send(c.SaveState(c.TransferStatus.MORE_DATA, b"\x00" * 8192).to_json())
        raw = b.sock.recv(1 << 16)
        n, p = struct.unpack_from("<II", raw)
        assert p == 8192 and len(raw) == 8 + n + p and raw[8 + n:] == b"\x00" * 8192
        assert json.loads(raw[8:8 + n]) == {"type": "save_state", "status": 2, "nics": [], "phases_ms": {},
                                             "error": None, "revived": [], "nvme": [], "revived_nvme": []}
    finally:
        a.close()
        b.close()


def test_servicing_result_json_form_is_design_section_10():
    r = c.ServicingResult(True, True, False, (c.NicResult("p", c.RestorePath.KEEPALIVE, False, False, 0, 4, 0),), (),
                          {"save": 1.0, "handoff": 2.0, "restore": 3.0, "total": 6.0}, None, None,
                          {"preset": "natural", "hwc_latency_ms": 0.0, "flr_ms": 0.0}, None)
    wire = r.to_json()
    assert list(wire) == ["ok", "mana_keepalive", "nvme_keepalive", "nics", "unclaimed_pool_allocations",
                          "phases_ms", "blackout_ms", "frames_lost", "timing", "error", "status", "nvme",
                          "io_blackout_ms", "io_errors"]
    assert wire["status"] == "ok"
    assert wire["nics"] == [{"pci_id": "p", "restore_path": "keepalive", "device_reset": False,
                             "hwc_established": False, "device_resets": 0, "hwc_requests": 4, "smc_messages": 0,
                             "error": None, "reason": None, "requested_path": "fresh"}]
    assert c.ServicingResult.from_json(wire) == r


def test_nic_config_argument_round_trips():
    cfg = c.NicConfig(2, "d188:00:00.0", "/run/nic2.sock", 7, 8)
    assert c.NicConfig.parse(cfg.to_arg()) == cfg
    with pytest.raises(ValueError, match="expected INDEX"):
        c.NicConfig.parse("1,2")


def test_nvme_config_argument_round_trips_with_and_without_a_block_channel():
    with_channel = c.NvmeConfig(1, "a101:00:00.0", "/run/nvme1.sock", 9, 10)
    assert c.NvmeConfig.parse(with_channel.to_arg()) == with_channel
    assert c.NvmeConfig.parse("0,a100:00:00.0,/run/nvme0.sock") == c.NvmeConfig(0, "a100:00:00.0", "/run/nvme0.sock")
    with pytest.raises(ValueError, match="expected INDEX"):
        c.NvmeConfig.parse("0,a100:00:00.0")


def test_host_process_does_not_load_driver_or_gdma():
    """Issue 9: the host imports only the contract from the worker's side."""
    code = ("import vfkeep.host.vmm, sys; "
            "print(sorted(m for m in sys.modules if m.startswith(('vfkeep.driver', 'vfkeep.gdma'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"
