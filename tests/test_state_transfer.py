"""The saved-state transfer of servicing spec §2.5 with real worker processes and a test host speaking the
contract: the old worker sends the state in chunks of at most 8192 bytes and the host answers once; the new
worker asks for it with REQUEST_DATA, each response's header length must equal its payload (a mismatch is
fatal), and it reports restore-completed; the bytes arrive unchanged."""
from __future__ import annotations

import contextlib
import hashlib
import re
import time
import os
import threading

import pytest

from vfkeep import proc
from vfkeep.contract import (MAX_CHUNK, Channel, HostCapabilities, InspectReply, Inspect, RestoreCompleted, RestoreState,
                             RestoreStateRequest, Save, SaveState, SaveStateAnswer, Shutdown, Bye, Start, Started,
                             STATE_GO, TransferStatus, restore_state_messages, save_state_messages)
from vfkeep.host.worker_proc import WorkerProcess
from vfkeep.memory import GuestMemory, MemoryLayout
from vfkeep.memory.page_pool import PageAllocator
from vfkeep.paravisor.servicing import complete_servicing_state
from vfkeep.paravisor.worker import EXIT_TRANSFER_FAILED
from vfkeep.proto import dma_manager_pb2, underhill_pb2

from helpers import process_log

POOL_PAGES = 4096
FRAGMENTS = 3000  # free one-page slots (never merged, spec 8.2): about 11 bytes each in the saved slot table


@pytest.fixture
def mem():
    m = GuestMemory.create(MemoryLayout(16, 64, POOL_PAGES))
    yield m
    m.close()


@pytest.fixture
def spawn(mem, tmp_path):
    """Start NIC-less workers on `mem` (MANA keepalive config on); every one is ended by PID at the end."""
    workers: list[WorkerProcess] = []
    env = {**os.environ, "OPENHCL_MANA_KEEP_ALIVE": "host,privatepool",
           "OPENHCL_ENABLE_VTL2_GPA_POOL": str(POOL_PAGES)}

    def start() -> WorkerProcess:
        w = WorkerProcess.spawn(proc.vfkeep_argv("worker"),
                                ["--run-dir", str(tmp_path), "--generation", str(len(workers) + 1),
                                 "--memfd", str(mem.fd), "--memory-layout", mem.layout.to_str()],
                                [mem.fd], env, len(workers) + 1, str(tmp_path))
        workers.append(w)
        w.wait_hello(60)
        return w

    yield start
    for w in workers:
        w.end()


def fragmented_pool_state(mem) -> bytes:
    """A valid ServicingState whose pool slot table has FRAGMENTS free one-page slots: > 3 x 8192 bytes."""
    pool = PageAllocator(mem.layout.pool)
    for slot in [pool.allocate(1, "x", "vfio dma") for _ in range(FRAGMENTS)]:
        pool.free(slot)
    dma = dma_manager_pb2.OpenhclDmaManagerState()
    dma.private_pool.CopyFrom(pool.save())
    state = underhill_pb2.ServicingState()
    complete_servicing_state(state, nics=[], dma_state=dma, correlation_id=None, vm_stop_reference_time=1,
                             flush_logs_us=0)
    return state.SerializeToString()


def restore(w: WorkerProcess, blob: bytes) -> Started:
    """The host side of a restore, message by message: REQUEST_DATA answered with `blob` in chunks."""
    w.send(Start(servicing=True))
    assert w.recv(30, RestoreStateRequest).status is TransferStatus.REQUEST_DATA
    for msg in restore_state_messages(blob):
        w.send(msg)
    assert w.recv(30, RestoreCompleted).status is TransferStatus.SUCCESS
    return w.recv(30, Started)


def inspect(w: WorkerProcess) -> dict:
    return w.request(Inspect(), 30, InspectReply).tree


def test_a_large_state_goes_old_worker_to_host_to_new_worker_in_chunks_unchanged(spawn, mem):
    first = fragmented_pool_state(mem)
    assert len(first) > 3 * MAX_CHUNK
    old = spawn()
    started = restore(old, first)
    assert started.error is None and started.nics == ()
    got = inspect(old)["restore"]
    assert (got["servicing_state_bytes"], got["servicing_state_sha256"]) == (len(first),
                                                                            hashlib.sha256(first).hexdigest())
    assert inspect(old)["pool"]["slots"] == FRAGMENTS + 1

    # Save: chunks of at most 8192 bytes, MORE_DATA on all but the last, SUCCESS on the last; one answer.
    old.send(Save(HostCapabilities.MANA_KEEPALIVE, 30))
    chunks = [old.recv(30, SaveState)]
    while chunks[-1].status is TransferStatus.MORE_DATA:
        chunks.append(old.recv(30, SaveState))
    sizes = [len(c.payload) for c in chunks]
    assert len(chunks) >= 4 and all(s == MAX_CHUNK for s in sizes[:-1]) and 0 < sizes[-1] <= MAX_CHUNK, sizes
    assert [c.status for c in chunks] == [TransferStatus.MORE_DATA] * (len(chunks) - 1) + [TransferStatus.SUCCESS]
    assert chunks[-1].phases_ms["total"] > 0
    old.send(SaveStateAnswer(TransferStatus.SUCCESS))
    # The host has the state: the worker idles (its exit would compete with the next worker's restore for the
    # CPU) until the host closes the channel, then exits.
    assert old.wait_exit(0.2) is None
    assert old.dismiss(30) == 0
    blob = b"".join(c.payload for c in chunks)
    assert len(blob) > 3 * MAX_CHUNK

    new = spawn()
    restore(new, blob)
    got = inspect(new)["restore"]
    assert (got["servicing_state_bytes"], got["servicing_state_sha256"]) == (len(blob), hashlib.sha256(blob).hexdigest())
    assert got["state_error"] is None and got["dma_error"] is None
    assert inspect(new)["pool"]["slots"] == FRAGMENTS + 1
    assert new.request(Shutdown(), 30, Bye) == Bye()


@pytest.mark.parametrize("length, payload", [(MAX_CHUNK, b"s" * 100), (10, b"s" * 11), (0, b"s")])
def test_a_response_whose_length_is_not_its_payload_is_fatal(spawn, mem, tmp_path, length, payload):
    """Never a silent truncation: the new worker logs why and exits before it touches any device."""
    w = spawn()
    w.send(Start(servicing=True))
    w.recv(30, RestoreStateRequest)
    w.send(RestoreState(MAX_CHUNK, TransferStatus.MORE_DATA, b"s" * MAX_CHUNK))
    w.send(RestoreState(length, TransferStatus.SUCCESS, payload))
    assert w.wait_exit(30) == EXIT_TRANSFER_FAILED
    with open(tmp_path / f"worker-{w.generation}.log") as f:
        log = f.read()
    assert "servicing state transfer failed" in log and f"header says {length} bytes" in log


def test_host_failure_aborts_the_transfer_and_the_worker_starts_without_state(spawn):
    w = spawn()
    w.send(Start(servicing=True))
    w.recv(30, RestoreStateRequest)
    w.send(RestoreState(0, TransferStatus.FAILURE))
    assert w.recv(30, RestoreCompleted).status is TransferStatus.FAILURE
    w.recv(30, Started)
    assert inspect(w)["restore"]["state_error"] == "host aborted the servicing state transfer"


def test_a_refused_state_is_a_failed_save_and_the_worker_goes_on(spawn, mem):
    """The host answers the last chunk FAILURE (here: more than it keeps): the worker handles a failed save
    (spec §2.4), reports it with one payload-less FAILURE message and keeps serving."""
    w = spawn()
    w.start(None, 30)
    failed, blob = w.save(Save(HostCapabilities.MANA_KEEPALIVE, 30), 30, max_bytes=10)
    assert blob is None and failed.status is TransferStatus.FAILURE and failed.payload == b""
    assert "host did not take the servicing state" in failed.error
    assert w.alive() and inspect(w)["last_save_error"] == failed.error
    # ... and a later save that the host keeps works.
    done, blob = w.save(Save(HostCapabilities.MANA_KEEPALIVE, 30), 30)
    assert done.status is TransferStatus.SUCCESS and blob and w.dismiss(30) == 0


def test_a_worker_gone_after_sending_its_whole_state_still_hands_it_over():
    """Kill-anywhere finding (issue 15 item 2, point `save.state_sent`): a worker killed after its last chunk,
    before it read the host's answer, made the servicing fail (and its NICs take an FLR) whenever the host's
    answer found the channel closed, and succeed when it did not: a race. The state is complete (the worker
    released its devices for it), so the host keeps it either way."""
    ours, theirs = Channel.pair()
    blob = os.urandom(3 * MAX_CHUNK + 5)

    closed = threading.Event()

    def worker_killed_after_its_last_chunk():
        theirs.recv(5)  # the save request
        for msg in save_state_messages(blob):
            theirs.send(msg.to_json())
        theirs.close()
        closed.set()

    t = threading.Thread(target=worker_killed_after_its_last_chunk)
    t.start()
    t.join(0)
    sleeper = proc.spawn(["sleep", "60"])
    try:
        w = WorkerProcess(sleeper, ours, 1, ["sleep"])
        send = w.send
        w.send = lambda msg, frame=None: (closed.wait(5) if isinstance(msg, SaveStateAnswer) else None,
                                          send(msg, frame))[1]
        last, state = w.save(Save(int(HostCapabilities.MANA_KEEPALIVE)), timeout=5)
    finally:
        t.join(5)
        proc.end(sleeper)
        ours.close()
    assert last.status is TransferStatus.SUCCESS and state == blob


class _ScriptedHost:
    """The host end of a worker run in this process: `recv` hands out `script` (then waits forever), `send` keeps
    what the worker sent with the worker's log file as it was at that moment (the worker's own thread sends)."""

    def __init__(self, script: list, log_path):
        self.script, self.log_path, self.sent = list(script), log_path, []

    def recv(self, timeout=None):
        if not self.script:
            threading.Event().wait()
        return self.script.pop(0).to_json()

    def ready(self) -> bool:
        return bool(self.script)

    def take(self, frame: bytes, timeout=None) -> bool:
        if self.script and Channel.frame(self.script[0].to_json()) == frame:
            self.script.pop(0)
            return True
        return False

    def send(self, msg: dict) -> None:
        self.sent.append((msg["type"], time.monotonic_ns(),
                          self.log_path.read_text() if self.log_path.exists() else ""))


def _restore_in_process(mem, tmp_path, monkeypatch) -> _ScriptedHost:
    """A NIC-less worker of this process restores `fragmented_pool_state` (its log: tmp_path/worker-2.log); what it
    sent, with `kind_start` where its device kinds started."""
    from vfkeep.paravisor.worker import Worker

    monkeypatch.setenv("OPENHCL_MANA_KEEP_ALIVE", "host,privatepool")
    with process_log("worker-2", tmp_path):
        host = _ScriptedHost([Start(servicing=True), *restore_state_messages(fragmented_pool_state(mem)),
                              Shutdown()], tmp_path / "worker-2.log")
        worker = Worker(host, mem, [], 2, False, None)
        for kind in worker.kinds:
            start = kind.start
            monkeypatch.setattr(kind, "start", lambda start=start: (host.send({"type": "kind_start"}), start())[1])
        assert worker.serve() == 0
    return host


def test_the_new_worker_reports_restore_completed_once_its_devices_run(mem, tmp_path, monkeypatch):
    """Spec §3 step 8: the VPs start, then the host is told how the restore went. Told before the relays started,
    the host woke (and took a CPU) just when the relays' first passes needed it, inside the guest's blackout."""
    kinds = [kind for kind, _, _ in _restore_in_process(mem, tmp_path, monkeypatch).sent]
    assert kinds == ["hello", "restore_state_request", "kind_start", "kind_start", "restore_completed", "started",
                     "bye"], kinds


def test_the_new_worker_writes_its_restore_lines_once_it_has_restored(mem, tmp_path, monkeypatch):
    """Each log line the new worker formats and writes before its relays run is CPU inside the guest's blackout:
    from its state request until it has restored, the lines are held (`vfkeep.log.hold_lines`) and written just
    before `started`, each with the time it was logged (its `mono`)."""
    host = _restore_in_process(mem, tmp_path, monkeypatch)
    sent = {kind: (t, log) for kind, t, log in host.sent}
    completed_at, log_at_completed = sent["restore_completed"]
    assert "servicing state requested" in log_at_completed  # (written: the host may end a worker waiting for it)
    for line in ("servicing state received", "dma manager restored", "worker started"):
        assert line not in log_at_completed
        held = [entry for entry in sent["started"][1].splitlines() if f'msg="{line}"' in entry]
        assert len(held) == 1 and int(re.search(r" mono=(\d+) ", held[0]).group(1)) < sent["started"][0]
    received = next(entry for entry in sent["started"][1].splitlines() if 'msg="servicing state received"' in entry)
    assert int(re.search(r" mono=(\d+) ", received).group(1)) < completed_at  # logged then, written later


def test_a_state_sent_ahead_is_restored_only_at_its_go_and_not_at_all_when_the_host_aborts(spawn, mem):
    """The host sends the state ahead (all MORE_DATA: `offer_state`) and scrubs; the worker restores nothing
    until the transfer's end: with the go (SUCCESS, no payload) it restores that state; with FAILURE instead it
    starts without state (spec §2.5), although it held every byte of a valid one."""
    blob = fragmented_pool_state(mem)
    for end, slots in ((STATE_GO, FRAGMENTS + 1), (RestoreState(0, TransferStatus.FAILURE), 1)):
        w = spawn()
        w.begin_servicing()
        assert w.take_state_request(30) is True
        assert w.offer_state(blob) is True
        w.send(end)
        completed = w.recv(30, RestoreCompleted).status
        w.recv(30, Started)
        got = inspect(w)
        assert completed is (TransferStatus.SUCCESS if end is STATE_GO else TransferStatus.FAILURE)
        assert got["pool"]["slots"] == slots
        assert got["restore"]["servicing_state_bytes"] == (len(blob) if end is STATE_GO else None)


def test_bytes_that_come_with_the_success_are_decoded_with_the_ones_before():
    """A worker waiting between chunks decodes what it has (`_fetch_servicing_state`); when the SUCCESS brings
    more bytes, the state it restores is decoded from all of them, not from that earlier part."""
    from vfkeep.paravisor.worker import Worker

    state = underhill_pb2.ServicingState()
    complete_servicing_state(state, nics=[], dma_state=None, correlation_id=None, vm_stop_reference_time=123456789,
                             flush_logs_us=0)
    blob = state.SerializeToString()
    head, tail = blob[:len(blob) // 2], blob[len(blob) // 2:]
    host, theirs = Channel.pair()
    w = Worker.__new__(Worker)
    w.chan, w.downlevel, w._early_decode = theirs, False, None
    decoded_head = threading.Event()
    decode = w._decode_state
    w._decode_state = lambda b: (decode(b), b == head and decoded_head.set())[0]
    got = []
    t = threading.Thread(target=lambda: got.append(w._fetch_servicing_state()))
    try:
        host.send(RestoreState(len(head), TransferStatus.MORE_DATA, head).to_json())
        t.start()
        assert decoded_head.wait(10)
        host.send(RestoreState(len(tail), TransferStatus.SUCCESS, tail).to_json())
        t.join(10)
        assert got == [blob]
        restored, error = w._decode_state(blob)
        assert error is None and restored.init_state.vm_stop_reference_time == 123456789
    finally:
        host.close()
        theirs.close()


def test_the_go_after_a_state_sent_ahead_is_known_by_its_bytes_and_anything_else_decoded_as_before(monkeypatch):
    """Between the state sent ahead and the host's go the new worker waits: the go (`STATE_GO_FRAME`) is recognized
    without parsing or decoding a message (`Channel.take`), inside the guest's blackout; any other response there
    (a FAILURE, a chunk with more bytes) is decoded and checked as before."""
    from vfkeep.paravisor import worker as worker_mod

    decoded = []
    real_decode = worker_mod.decode
    monkeypatch.setattr(worker_mod, "decode", lambda data, kinds: (decoded.append(data["status"]),
                                                                     real_decode(data, kinds))[1])
    for end, expect in ((STATE_GO, b"state"), (RestoreState(0, TransferStatus.FAILURE), None),
                        (RestoreState(3, TransferStatus.SUCCESS, b"end"), b"stateend")):
        host, theirs = Channel.pair()
        w = worker_mod.Worker.__new__(worker_mod.Worker)
        w.chan, w.downlevel, w._early_decode = theirs, False, None
        try:
            decoded.clear()
            host.send(RestoreState(5, TransferStatus.MORE_DATA, b"state").to_json())
            host.send(end.to_json())
            assert w._fetch_servicing_state() == expect
            assert decoded == [TransferStatus.MORE_DATA.value] + ([] if end is STATE_GO else [end.status.value])
            assert not theirs.ready()
        finally:
            host.close()
            theirs.close()


def test_the_save_makes_the_top_level_state_before_the_relays_stop(mem, monkeypatch):
    """Step 1 of the save (the emulation platform's state) and the rest of the top-level state that needs no device
    stopped (correlation id, VM stop time) are made before the device kinds stop their IO: while the relays still
    serve the guest, not in its blackout. What follows the stop only adds the DMA manager's and the devices' parts."""
    import uuid

    from vfkeep.paravisor import worker as worker_mod
    from vfkeep.paravisor.servicing import decode_servicing_state, guid_from_uuid

    order = []
    begin, finish = worker_mod.begin_servicing_state, worker_mod.finish_servicing_state
    monkeypatch.setattr(worker_mod, "begin_servicing_state",
                        lambda state, **kw: (order.append("begin"), begin(state, **kw))[1])
    monkeypatch.setattr(worker_mod, "finish_servicing_state",
                        lambda state, **kw: (order.append("finish"), finish(state, **kw))[1])
    monkeypatch.setenv("OPENHCL_MANA_KEEP_ALIVE", "host,privatepool")
    def record_stops(w):
        for kind in w.kinds:
            monkeypatch.setattr(kind, "stop", lambda kind=kind: order.append(f"stop {kind.name}"))

    with _started_worker(mem, record_stops) as host:
        host.send(Inspect().to_json())  # (answered once the rehearsal after `started` is done)
        assert host.recv(10)["type"] == InspectReply.kind
        order.clear()
        cid = str(uuid.uuid4())
        host.send(Save(HostCapabilities.MANA_KEEPALIVE, 30, cid).to_json())
        last = host.recv(10)
        assert last["type"] == "save_state" and last["status"] == TransferStatus.SUCCESS
        assert order == ["begin", "stop nvme", "stop mana", "finish"]
        init = decode_servicing_state(last["payload"], downlevel=False).init_state
        assert init.correlation_id == guid_from_uuid(uuid.UUID(cid)) and init.vm_stop_reference_time > 0
        assert init.HasField("dma_manager_state")


def test_a_started_worker_rehearses_its_save_and_the_save_it_then_makes_is_its_own(mem, monkeypatch):
    """After `started` (outside any blackout) the worker runs its save's side-effect-free steps once (their first
    calls in a process cost two to four times more, and a worker saves once, inside the next blackout); that
    changes nothing: the pool is as it was and the later save carries that save's correlation id."""
    import uuid

    from vfkeep.paravisor import worker as worker_mod
    from vfkeep.paravisor.servicing import decode_servicing_state, guid_from_uuid

    calls = []
    begin = worker_mod.begin_servicing_state
    monkeypatch.setattr(worker_mod, "begin_servicing_state",
                        lambda state, **kw: (calls.append(kw["correlation_id"]), begin(state, **kw))[1])
    monkeypatch.setenv("OPENHCL_MANA_KEEP_ALIVE", "host,privatepool")
    with _started_worker(mem) as host:
        host.send(Inspect().to_json())
        tree = host.recv(10)["tree"]
        assert len(calls) == 1 and tree["pool"]["slots"] == 1 and tree["last_save_error"] is None
        cid = str(uuid.uuid4())
        host.send(Save(HostCapabilities.MANA_KEEPALIVE, 30, cid).to_json())
        last = host.recv(10)
        assert last["type"] == "save_state" and last["status"] == TransferStatus.SUCCESS
        state = decode_servicing_state(last["payload"], downlevel=False)
        assert calls[1:] == [cid] and state.init_state.correlation_id == guid_from_uuid(uuid.UUID(cid))
        assert [s.state.WhichOneof("variant") for s in state.init_state.dma_manager_state.private_pool.state] == ["free"]


@contextlib.contextmanager
def _started_worker(mem, before_serving=lambda w: None):
    """A worker serving on a thread, said hello and started (`before_serving(worker)` first); yields the host's
    end of its channel, closed and the thread joined after."""
    from vfkeep.paravisor import worker as worker_mod

    host, theirs = Channel.pair()
    w = worker_mod.Worker(theirs, mem, [], 1, False, None)
    before_serving(w)
    t = threading.Thread(target=w.serve, daemon=True)
    t.start()
    try:
        assert host.recv(10)["type"] == "hello"
        host.send(Start().to_json())
        assert host.recv(10)["type"] == "started"
        yield host
    finally:
        host.close()
        t.join(10)
        theirs.close()
