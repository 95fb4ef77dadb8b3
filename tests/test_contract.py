"""The host<->worker contract (vfkeep.contract): one typed form per message, and the host's import boundary."""
from __future__ import annotations

import subprocess
import sys

import pytest

from vfkeep import contract as c

MESSAGES = [
    c.Hello(4242, "0.1.0", "current", 3, {"mana": "enabled", "nvme": "disabled"}),
    c.Start(None),
    c.Start(c.encode_blob(b"\x0a\x00")),
    c.Started((c.NicRestore("d186:00:00.0", c.RestorePath.KEEPALIVE, None, False, 12.5),),
              (c.UnclaimedAllocation("nic_x", 600, 6, "vfio dma"),), None, {"total": 1.0}),
    c.Save(True, False, 60.0, "f3c1", "SERVICING_SAVE_FAIL"),
    c.Saved(c.encode_blob(b"blob"), (c.NicSaveOutcome("d186:00:00.0", c.SaveOutcome.SAVED, None),), {"total": 2.0}),
    c.SaveFailed("test hook", (c.NicSaveOutcome("d186:00:00.0", c.SaveOutcome.SAVE_FAILED, "x"),),
                 (c.NicRestore("d186:00:00.0", c.RestorePath.FALLBACK, "why", True, 3.0),)),
    c.Inspect(),
    c.InspectReply({"pid": 1, "nics": []}),
    c.Shutdown(),
    c.Bye(),
    c.ErrorReply("unexpected message 'save' in this state"),
]


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_every_message_round_trips_through_its_json_form(msg):
    kinds = c.HOST_MESSAGES if type(msg) in c.HOST_MESSAGES.values() else c.WORKER_MESSAGES
    wire = msg.to_json()
    assert wire["type"] == msg.kind
    assert c.decode(wire, kinds) == msg


def test_wire_form_of_a_save_and_a_started():
    """The frames a worker of another version reads and writes: field names and JSON types are the contract."""
    assert c.Save(True, False, 60.0, "id", None).to_json() == {
        "type": "save", "mana_keepalive": True, "nvme_keepalive": False, "timeout_s": 60.0,
        "correlation_id": "id", "test_config": None}
    started = c.decode({"type": "started", "nics": [{"pci_id": "p", "restore_path": "fresh", "error": None,
                                                      "flr": True, "create_ms": 1}],
                        "unclaimed_pool_allocations": [], "error": None, "phases_ms": {}}, c.WORKER_MESSAGES)
    assert started.nics[0].restore_path is c.RestorePath.FRESH and started.nics[0].create_ms == 1.0


@pytest.mark.parametrize("data, problem", [
    ([1, 2], "JSON object"),
    ({"type": "reboot"}, "unexpected message 'reboot'"),
    ({"type": "saved"}, "missing field 'servicing_state'"),
    ({"type": "saved", "servicing_state": 7}, "saved.servicing_state: expected str"),
    ({"type": "started", "nics": [{"pci_id": "p", "restore_path": "sideways"}]}, "nics[0].restore_path"),
    ({"type": "hello", "pid": True, "version": "v", "compat": "current", "generation": 1}, "hello.pid"),
])
def test_a_message_that_does_not_fit_is_a_contract_error(data, problem):
    with pytest.raises(c.ContractError, match=problem.replace("[", r"\[").replace("]", r"\]")):
        c.decode(data, c.WORKER_MESSAGES)


def test_unknown_fields_are_ignored_and_defaults_fill_absent_ones():
    msg = c.decode({"type": "saved", "servicing_state": None, "from_the_future": 1}, c.WORKER_MESSAGES)
    assert msg == c.Saved(None, (), {})


def test_servicing_result_json_form_is_design_section_10():
    r = c.ServicingResult(True, True, False, (c.NicResult("p", c.RestorePath.KEEPALIVE, False, False, 0, 4, 0),), (),
                          {"save": 1.0, "handoff": 2.0, "restore": 3.0, "total": 6.0}, None, None,
                          {"preset": "natural", "hwc_latency_ms": 0.0, "flr_ms": 0.0}, None)
    wire = r.to_json()
    assert list(wire) == ["ok", "mana_keepalive", "nvme_keepalive", "nics", "unclaimed_pool_allocations",
                          "phases_ms", "blackout_ms", "frames_lost", "timing", "error", "status"]
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


def test_host_process_does_not_load_driver_or_gdma():
    """Issue 9: the host imports only the contract from the worker's side."""
    code = ("import vfkeep.host.vmm, sys; "
            "print(sorted(m for m in sys.modules if m.startswith(('vfkeep.driver', 'vfkeep.gdma'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"
