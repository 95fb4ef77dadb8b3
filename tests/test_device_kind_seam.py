"""The worker drives every device kind through one seam (DESIGN D10) in the order of servicing spec §3 (restore)
and §2.2 (save): a recording kind stands in for the next one (NVMe) beside the MANA kind, in-process."""
import threading

import pytest

from vfkeep.contract import (MANA_KEEPALIVE_ENV, NVME_KEEPALIVE_ENV, WORKER_MESSAGES, Channel, HostCapabilities,
                             NicSaveOutcome, SaveOutcome,
                             Save, SaveState, SaveStateAnswer, Start, TransferStatus, decode)
from vfkeep.memory import DmaManager, MemoryLayout
from vfkeep.paravisor import worker as worker_module
from vfkeep.paravisor.device_kind import DeviceKind
from vfkeep.paravisor.mana_kind import ManaKind
from vfkeep.proto import underhill_pb2

LAYOUT = MemoryLayout(guest_pages=4, worker_pages=16, pool_pages=16)


class RecordingKind:
    """A second device kind: records every call; saves a marker state unit."""

    name = "nvme"

    def __init__(self, calls: list):
        self.calls = calls
        self.settled = threading.Event()

    def client_names(self):
        return ["nvme_recording"]

    def prepare(self):
        self.calls.append(("nvme", "prepare"))

    def attach_ahead(self, state, config):
        self.calls.append(("nvme", "attach_ahead", state is None, config.canonical))

    def settle_ahead(self):
        self.calls.append(("nvme", "settle_ahead"))
        self.settled.set()
        return []

    def configure(self, dma):
        self.calls.append(("nvme", "configure", type(dma).__name__))

    def restore(self, previous, config):
        self.calls.append(("nvme", "restore", previous.state is None, config.canonical))

    def start(self):
        self.calls.append(("nvme", "start"))

    def stop(self):
        self.calls.append(("nvme", "stop"))

    def save(self, keepalive, state):
        self.calls.append(("nvme", "save", keepalive))
        state.units.add(name="recording", state=b"kept")
        return [NicSaveOutcome("recording", SaveOutcome.SAVED)]

    def revive(self):
        self.calls.append(("nvme", "revive"))

    def shutdown(self):
        self.calls.append(("nvme", "shutdown"))

    def inspect(self):
        return {"nvme": {"recording": True}}


def recording(calls: list, cls, name: str, methods: tuple[str, ...], monkeypatch):
    """Record calls to `cls.<methods>` as (name, method[, keepalive]) before running them."""
    for method in methods:
        original = getattr(cls, method)

        def wrapper(self, *args, _original=original, _method=method):
            calls.append((name, _method, *(a for a in args if isinstance(a, bool))))
            return _original(self, *args)

        monkeypatch.setattr(cls, method, wrapper)


@pytest.fixture
def worker(mem, monkeypatch):
    monkeypatch.setenv(MANA_KEEPALIVE_ENV, "host,privatepool")
    monkeypatch.setenv(NVME_KEEPALIVE_ENV, "host,privatepool")
    calls: list = []
    recording(calls, ManaKind, "mana", ("prepare", "attach_ahead", "configure", "restore", "start", "stop", "save",
                                        "revive"), monkeypatch)
    recording(calls, DmaManager, "dma", ("save", "prepare_restore", "restore", "validate_restore"), monkeypatch)
    host, chan = Channel.pair()
    w = worker_module.Worker(chan, mem, [], generation=1, downlevel=False, channel_layout=None)
    # In the NVMe kind's place: before networking (spec §3 step 4, §2.2 step 3).
    w.kinds[w.kinds.index(w.nvme)] = RecordingKind(calls)
    w.calls, w.host = calls, host
    yield w
    host.close()
    chan.close()


def saved_state(worker) -> list[SaveState]:
    """What the worker sent the host for one save, up to its SUCCESS or FAILURE message."""
    msgs = [decode(worker.host.recv(5), WORKER_MESSAGES)]
    while msgs[-1].status is TransferStatus.MORE_DATA:
        msgs.append(decode(worker.host.recv(5), WORKER_MESSAGES))
    return msgs


def test_the_mana_kind_implements_the_seam():
    missing = [m for m in ("name", *(n for n in vars(DeviceKind) if not n.startswith("_")))
               if not hasattr(ManaKind, m)]
    assert missing == []


def test_restore_order_configure_restore_validate_then_start(worker):
    started = worker.start(Start())
    assert started.error is None and started.nics == ()
    assert worker.calls == [
        ("nvme", "prepare"), ("mana", "prepare"),  # (no saved state: nothing to attach ahead)
        ("nvme", "configure", "DmaManager"), ("nvme", "restore", True, "enabled"),
        ("mana", "configure"), ("mana", "restore"),
        ("dma", "validate_restore"),
        ("nvme", "start"), ("mana", "start"),
    ]
    assert set(started.phases_ms) == {"decode", "dma_restore", "nvme_restore", "mana_restore", "validate", "total"}
    tree = worker.inspect()
    assert tree["nvme"] == {"recording": True} and tree["nics"] == [] and "slot_table" in tree["pool"]


def test_next_worker_asks_for_the_state_then_prepares_its_kinds_before_reading_it(worker):
    """As the next worker of a servicing: REQUEST_DATA goes out first (the host reads it before the save), then
    every kind prepares (a prelaunched worker: outside the window), and only then does the worker wait for the
    state; an aborted transfer still brings every kind up."""
    import select

    from vfkeep.contract import RestoreState, RestoreStateRequest

    def prepare():  # whether the request already waits for the host, and the host's answer for the worker
        worker.calls.append(("nvme", "prepare", bool(select.select([worker.host.sock], [], [], 0)[0]),
                             bool(select.select([worker.chan.sock], [], [], 0)[0])))

    worker.kinds[0].prepare = prepare
    worker.host.send(RestoreState(0, TransferStatus.FAILURE).to_json())
    worker.start(Start(servicing=True))
    assert decode(worker.host.recv(5), WORKER_MESSAGES) == RestoreStateRequest()
    assert worker.calls[:2] == [("nvme", "prepare", True, True), ("mana", "prepare")]  # the answer, still unread


def test_save_order_stop_dma_then_each_kind_with_its_effective_keepalive(worker):
    worker.start(Start())
    worker.calls.clear()
    worker.host.send(SaveStateAnswer(TransferStatus.SUCCESS).to_json())  # the host's answer, queued ahead
    assert worker.save(Save(HostCapabilities.MANA_KEEPALIVE, 30)) is True
    saved = saved_state(worker)
    assert worker.calls == [
        ("nvme", "stop"), ("mana", "stop"),
        ("dma", "save"),
        ("nvme", "save", False), ("mana", "save", True),
    ]
    state = underhill_pb2.ServicingState.FromString(b"".join(m.payload for m in saved))
    assert [u.name for u in state.units] == ["recording"]  # the kind wrote its own part
    assert state.init_state.HasField("dma_manager_state") and not state.init_state.HasField("mana_state")


def test_failed_save_revives_every_kind_then_restarts_its_io(worker):
    worker.start(Start())
    worker.calls.clear()
    assert worker.save(Save(HostCapabilities.MANA_KEEPALIVE | HostCapabilities.NVME_KEEPALIVE, 30,
                            test_config="SERVICING_SAVE_FAIL")) is False
    (failed,) = saved_state(worker)
    assert failed.status is TransferStatus.FAILURE and "SERVICING_SAVE_FAIL" in failed.error
    assert worker.calls[-4:] == [("nvme", "revive"), ("mana", "revive"), ("nvme", "start"), ("mana", "start")]


def test_every_kind_gets_the_decoded_state_to_attach_ahead_before_the_dma_manager_restores(worker, mem):
    """As the next worker of a servicing: once the state is decoded, each kind may send its devices' attach
    (`attach_ahead`, so a device answers while the restore runs) before the DMA manager restores (step 2) and
    before any kind is configured or restores."""
    from vfkeep.contract import RestoreState
    from vfkeep.paravisor.servicing import complete_servicing_state

    state = underhill_pb2.ServicingState()
    complete_servicing_state(state, nics=[], dma_state=DmaManager(mem).save(), correlation_id=None,
                             vm_stop_reference_time=0, flush_logs_us=0)
    blob = state.SerializeToString()
    worker.host.send(RestoreState(len(blob), TransferStatus.SUCCESS, blob).to_json())
    started = worker.start(Start(servicing=True))
    assert started.error is None
    first = worker.calls.index(("nvme", "attach_ahead", False, "enabled"))
    assert worker.calls[first:first + 6] == [
        ("nvme", "attach_ahead", False, "enabled"), ("mana", "attach_ahead"), ("dma", "prepare_restore"),
        ("dma", "restore"), ("nvme", "configure", "DmaManager"), ("nvme", "restore", False, "enabled")]


def test_a_state_sent_ahead_is_prepared_before_the_go_and_restored_only_after_it(worker, mem):
    """The host sends the state ahead (MORE_DATA), scrubs, then sends its go: meanwhile the worker decodes the state,
    each kind sends its attaches and reads their answers (`attach_ahead`, `settle_ahead`) and the DMA manager checks
    its saved state (`prepare_restore`); nothing is restored, configured or started before the go."""
    from vfkeep.contract import STATE_GO, RestoreState
    from vfkeep.paravisor.servicing import complete_servicing_state

    state = underhill_pb2.ServicingState()
    complete_servicing_state(state, nics=[], dma_state=DmaManager(mem).save(), correlation_id=None,
                             vm_stop_reference_time=0, flush_logs_us=0)
    blob = state.SerializeToString()
    nvme = worker.kinds[0]
    worker.host.send(RestoreState(len(blob), TransferStatus.MORE_DATA, blob).to_json())
    started = []
    thread = threading.Thread(target=lambda: started.append(worker.start(Start(servicing=True))))
    thread.start()
    try:
        assert nvme.settled.wait(10)
        before_go = list(worker.calls)
    finally:
        worker.host.send(STATE_GO.to_json())
        thread.join(10)
    assert before_go[-4:] == [("nvme", "attach_ahead", False, "enabled"), ("mana", "attach_ahead"),
                              ("dma", "prepare_restore"), ("nvme", "settle_ahead")]
    assert started and started[0].error is None
    after_go = worker.calls[len(before_go):]
    assert after_go[:3] == [("dma", "restore"), ("nvme", "configure", "DmaManager"), ("nvme", "restore", False, "enabled")]
