"""The saved-state fuzz harness (tests/saved_state_fuzz.py, issue 15 item 3): a seeded slice of the campaign
`make fuzz` runs at 100,000 cases, and checks that the harness itself is sound (its wire tree re-encodes the
golden state byte for byte, its "equivalent" mutations keep the state's meaning, its oracles report what they
are for)."""
import random
import threading

import pytest

import saved_state_fuzz as fuzz
from vfkeep.proto import underhill_pb2

SLICE = 400
SEED = 15


@pytest.fixture(scope="module")
def golden():
    mem = fuzz.GuestMemory.create(fuzz.LAYOUT)
    try:
        return fuzz.build_golden(mem)
    finally:
        mem.close()


def test_seeded_slice_has_no_crash_no_stray_write_no_pool_violation_and_mostly_restores():
    report = fuzz.campaign(SLICE, SEED)
    data = report.to_json()
    assert report.cases == SLICE
    assert report.findings == [], report.findings
    assert data["restore_rate"] > 0.5, data
    kinds = {k.split(":")[0] for k in data["mutation_kinds"]}
    assert kinds == {"equivalent", "value", "structure", "raw"}, kinds
    # The MANA, NVMe and DMA manager states are all reached, and the devices both restore and refuse.
    mutated = report.fields_mutated
    for prefix in ("mana_driver.", "nvme_driver.", "openvmm.pagepool.", "openhcl.openhcldmamanager."):
        assert any(f.startswith(prefix) for f in mutated), prefix
    outcomes = data["device_outcomes"]
    for device in (fuzz.NIC, fuzz.DISK):
        assert outcomes.get(f"{device} restored", 0) > SLICE / 3
        assert any(k.startswith(f"{device} refused:") for k in outcomes)


def test_wire_tree_reencodes_the_golden_state_exactly(golden):
    assert fuzz.serialize(golden.tree) == golden.blob


@pytest.mark.parametrize("seed", range(40))
def test_equivalent_mutations_keep_the_meaning(golden, seed):
    rng = random.Random(seed)
    tree = [fuzz.clone(n) for n in golden.tree]
    mutator = fuzz.Mutator(rng, underhill_pb2.ServicingState.DESCRIPTOR)
    for name in fuzz.Mutator.EQUIVALENT:
        assert getattr(mutator, name)(tree) is not None
    mutated = underhill_pb2.ServicingState.FromString(fuzz.serialize(tree))
    mutated.DiscardUnknownFields()
    assert mutated == underhill_pb2.ServicingState.FromString(golden.blob)


def test_a_stray_write_is_reported(monkeypatch):
    run = fuzz.Case.run

    def stray(self, blob):
        out = run(self, blob)
        self.mem.write(self.mem.layout.guest.gpa, b"!")
        return out

    monkeypatch.setattr(fuzz.Case, "run", stray)
    report = fuzz.campaign(1, SEED)
    assert [f["verdict"] for f in report.findings] == ["oob_write"]


def test_a_device_write_outside_its_pages_is_reported(monkeypatch):
    monkeypatch.setattr(fuzz.Case, "allowed", lambda self, device: set() if device == fuzz.NIC else {
        p for owner in fuzz.OWNERS[device] for b in self.blocks.get(owner, ()) for p in range(b.base_pfn,
                                                                                              b.base_pfn + b.pages)})
    report = fuzz.campaign(1, SEED)
    assert report.findings and report.findings[0]["detail"].startswith(f"{fuzz.NIC} wrote pages")


def test_a_leaked_block_is_reported(monkeypatch):
    def leaky_restore(self, saved):
        client = self.dma.new_client(fuzz.OWNERS[fuzz.NIC][0], persistent=True)
        client.attach_pending_buffers()  # attached and dropped: never freed
        return "refused:Leaky"

    monkeypatch.setattr(fuzz.Case, "restore_mana", leaky_restore)
    report = fuzz.campaign(1, SEED)
    assert [f["verdict"] for f in report.findings] == ["pool"], report.findings


def test_an_exception_in_a_thread_is_a_crash(monkeypatch):
    run = fuzz.Case.run

    def failing_thread(self, blob):
        t = threading.Thread(target=lambda: 1 / 0, name=f"aen-{fuzz.DISK}")
        t.start()
        t.join()
        return run(self, blob)

    monkeypatch.setattr(fuzz.Case, "run", failing_thread)
    report = fuzz.campaign(1, SEED)
    assert [f["verdict"] for f in report.findings] == ["crash"]
    assert "ZeroDivisionError" in report.findings[0]["detail"]
