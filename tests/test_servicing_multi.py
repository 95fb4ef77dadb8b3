"""Two NICs, no prelaunch, and a downlevel first worker (`vfkeep run --worker-cmd`): skew downlevel ->
current, multi-NIC keepalive, and a NIC that vanishes from the configuration (D3)."""
import os
import sys

import pytest

from servicing_helpers import HostRun
from vfkeep.host.devices import nic_mac
from vfkeep.paravisor.servicing import adapter_index_map
from vfkeep.proto import underhill_pb2

CURRENT = f"{sys.executable} -m vfkeep.cli worker"
DOWNLEVEL = f"{CURRENT} --compat downlevel"
PCI = ["d186:00:00.0", "d187:00:00.0"]


def names(entries):
    return [e["name"] for e in entries]


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    h = HostRun(tmp_path_factory.mktemp("multi") / "run", "--no-prelaunch", "--worker-cmd", DOWNLEVEL, nics=2)
    yield h
    h.stop()


def test_downlevel_first_worker_then_current(host):
    """`--worker-cmd` ran a downlevel first worker; with the MANA bit set it still shuts both NICs down
    normally, and the current worker fresh-inits them without a reset."""
    assert host.inspect("worker/compat") == "downlevel"
    r, logs = host.serviced(devices=2, mana_keepalive=True, next_worker_cmd=CURRENT)
    assert r["ok"] and host.inspect("worker/compat") == "current"
    for n, entries in zip(r["nics"], logs):
        assert (n["restore_path"], n["device_reset"], n["hwc_established"]) == ("fresh", False, True)
        assert names(entries).index("SMC_MSG_TYPE_DESTROY_HWC") < names(entries).index("SMC_MSG_TYPE_ESTABLISH_HWC")
    assert host.inspect("last_servicing/prelaunch") is False
    assert all(host.probe(i)["ok"] for i in range(2))


def test_two_nics_keepalive(host):
    r, logs = host.serviced(devices=2, mana_keepalive=True, next_worker_cmd=CURRENT)
    assert r["ok"] and [n["pci_id"] for n in r["nics"]] == PCI
    for n, entries in zip(r["nics"], logs):
        assert (n["restore_path"], n["device_reset"], n["hwc_established"]) == ("keepalive", False, False)
        assert not {"SMC_MSG_TYPE_ESTABLISH_HWC", "GDMA_REGISTER_DEVICE", "FLR"} & set(names(entries))
    assert all(host.probe(i)["ok"] for i in range(2))


def test_vanished_nic_pages_freed_and_reported_then_back(host):
    """E3 -> D3: NIC 0 is not configured in the next worker: its saved pages are unclaimed, freed and
    listed; NIC 1 keeps alive. When NIC 0 is configured again it comes back fresh (its HWC still ran: FLR)."""
    base_pfn = host.inspect("worker/nics/0/device/hwc_buffer/base_pfn")
    r = host.service(mana_keepalive=True, next_worker_cmd=CURRENT, nics=[1])
    assert r["ok"] and [(n["pci_id"], n["restore_path"]) for n in r["nics"]] == [(PCI[1], "keepalive")]
    assert r["unclaimed_pool_allocations"] == [{"device": f"nic_{PCI[0]}", "base_pfn": base_pfn, "pages": 6,
                                                "tag": "vfio dma"}]
    assert host.inspect("worker/pool/devices") == {f"nic_{PCI[1]}": 6}
    assert "saved state for a NIC that is not configured" in host.worker_log(host.inspect("worker/generation"))
    assert host.probe(1)["ok"]

    r, (log0, _) = host.serviced(devices=2, mana_keepalive=True, next_worker_cmd=CURRENT, nics=[0, 1])
    n0, n1 = r["nics"]
    assert (n0["restore_path"], n0["device_reset"], n0["hwc_established"]) == ("fresh", True, True)
    first = names(log0).index("SMC_MSG_TYPE_ESTABLISH_HWC")
    assert log0[first]["status"] != 0 and "FLR" in names(log0)[first:]
    assert (n1["restore_path"], n1["device_reset"]) == ("keepalive", False)
    assert r["unclaimed_pool_allocations"] == []
    assert all(host.probe(i)["ok"] for i in range(2))


def test_two_nics_have_distinct_macs_stable_across_servicings(host):
    """Each NIC's MAC comes from its index (the host passes it to its device): two NICs can share a wire, and
    the saved MAC -> adapter index map holds each MAC once, the same after keepalive and fresh servicings."""
    macs = [nic_mac(i) for i in range(2)]
    assert [m.hex(":") for m in macs] == ["00:15:5d:12:12:12", "00:15:5d:12:12:22"]
    for request in ({"mana_keepalive": True}, {}):
        r = host.service(next_worker_cmd=CURRENT, **request)
        assert r["ok"]
        assert [host.inspect(f"worker/nics/{i}/vport/mac") for i in range(2)] == [m.hex(":") for m in macs]
        with open(os.path.join(host.run_dir, "servicing_state.bin"), "rb") as f:
            state = underhill_pb2.ServicingState.FromString(f.read())
        assert adapter_index_map(state) == {macs[0]: 0, macs[1]: 1}
        assert len(state.init_state.emuplat.network_adapter_index.entries) == 2
