"""Regression tests for host/worker robustness bugs found in review (no device processes needed)."""
from __future__ import annotations

import contextlib
import os
import threading
import time
import types

import pytest

from vfkeep.contract import (HOST_MESSAGES, Hello, RestoreStateRequest, Save, SaveState, SaveStateAnswer, Start, Started,
                             TransferStatus)
from vfkeep.host.worker_proc import WorkerProcess
from vfkeep.paravisor.net_relay import NetRelay


class _Bell:
    def __init__(self):
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    def clear(self):
        pass


class _Ring:
    head = tail = 0

    def __init__(self):
        self.doorbell = _Bell()

    def __len__(self):
        return 0

    def pop_many(self, n):
        return []

    def push_many(self, frames):
        return len(frames)


class _Vport:
    """A vport's data path that never has work."""

    tx_free = tx_outstanding = 0

    def __init__(self):
        self._fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    def fileno(self):
        return self._fd

    def sync(self):
        pass

    def prepare_wait(self, need_tx=True):
        return True

    def rearm(self):
        pass

    def send(self, frames):
        return 0

    def rx_pending(self):
        return False

    def receive_batch(self, consume, n, consume_block=None):
        return 0

    def doorbells_batched(self):
        return contextlib.nullcontext()

    def take_events(self):
        return False


@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")  # the relay thread must not die
def test_relay_stop_twice_leaves_other_fds_alone():
    """A NIC whose revive failed keeps its stopped relay; the next save stops it again. The second stop
    must not write to (or close) the stop eventfd's number, which by then may be another open file."""
    channel = types.SimpleNamespace(tx=_Ring(), rx=types.SimpleNamespace(max_frame=2048, head=0, tail=0,
                                                                       push_many=lambda f: len(f)))
    vport = _Vport()
    relay = NetRelay(channel, vport, "test:00:00.0")
    relay.start()
    assert relay.resumed.wait(5), "the relay never reached its idle wait"
    stop_fd = relay._stop_fd
    relay.stop()
    other = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)  # the lowest free number: the stop fd's
    try:
        assert other == stop_fd
        relay.stop()  # must be a no-op
        os.fstat(other)  # still open
        try:
            value = os.eventfd_read(other)
        except BlockingIOError:
            value = 0
        assert value == 0, "the second stop signalled another file"
    finally:
        os.close(other)
        os.close(vport._fd)
        os.close(channel.tx.doorbell.fd)


class _DeadWorker:
    generation, pid = 1, 12345
    child = types.SimpleNamespace(returncode=-9)

    def alive(self):
        return False

    def end(self):
        return -9


def test_actor_survives_a_failing_replacement(tmp_path, monkeypatch):
    """A worker that died outside servicing is replaced from the idle tick; if spawning the replacement
    raises something other than WorkerFailed (EMFILE, ENOMEM...), the actor thread must not die: it owns
    every child (PDEATHSIG) and every later request waits on it."""
    from vfkeep.host.vmm import Host, HostConfig

    host = Host(HostConfig(run_dir=str(tmp_path), nics=0))
    calls = []

    def spawn_fails(*a, **k):
        calls.append(1)
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(host, "_start_worker", spawn_fails)
    host.worker = _DeadWorker()
    host._actor.start()
    try:
        deadline = time.monotonic() + 5
        while not calls and time.monotonic() < deadline:
            time.sleep(0.05)
        assert calls, "the idle tick never tried a replacement"
        time.sleep(0.1)
        assert host._actor.is_alive()
        result: list = []
        t = threading.Thread(target=lambda: result.append(host._submit(lambda: 42)), daemon=True)
        t.start()
        t.join(5)
        assert result == [42]
    finally:
        host._stopped.set()
        host._jobs.put(None)
        host._actor.join(5)


class _FakeWorker:
    """Stands in for WorkerProcess in Host._service: scripted replies, records what it was sent."""

    def __init__(self, generation, replies=(), fail_with=None):
        self.generation, self.pid = generation, 50000 + generation
        self.child = types.SimpleNamespace(returncode=None)
        self.replies = list(replies)
        self.fail_with = fail_with
        self.sent: list[dict] = []
        self.ended = False
        self.servicing_begun = False
        self._state_request = None
        self._request_ready = False
        self._offered = None
        self._handed_over = False
        self._answer_due = False
        self._answer_sent = False

    def alive(self):
        return not self.ended

    def end(self):
        self.ended = True
        return 0

    def wait_exit(self, timeout):
        return 0

    def dismiss(self, timeout):
        return 0

    def send(self, msg, frame=None):
        self.sent.extend([msg] if msg is not None else _messages_in(frame))

    def requested_early(self):
        """Its REQUEST_DATA read and checked before the save, as `take_state_request` does."""
        self._state_request, self._request_ready = RestoreStateRequest().to_json(), True

    def recv(self, timeout, *expected, grace=0.0, first=None):
        from vfkeep.contract import _HEADER, Channel
        from vfkeep.host.worker_proc import WorkerFailed
        if self.fail_with or not self.replies:
            raise WorkerFailed(self.fail_with or f"worker {self.generation} did not answer within {timeout} s")
        msg = self.replies.pop(0)
        if first is not None:  # the frame's JSON text and payload, as `Channel.recv` shows them
            frame = Channel.frame(msg.to_json())
            n, _ = _HEADER.unpack_from(frame)
            first(frame[_HEADER.size:_HEADER.size + n], frame[_HEADER.size + n:])
        return msg

    def request(self, msg, timeout, *expected, grace=0.0):
        self.send(msg)
        return self.recv(timeout, *expected)

    save = WorkerProcess.save  # the transfer protocol over the scripted send/recv
    answer_kept = WorkerProcess.answer_kept
    offer_state = WorkerProcess.offer_state
    handed_over = WorkerProcess.handed_over
    hand_over = WorkerProcess.hand_over
    _check = WorkerProcess._check
    begin_servicing = WorkerProcess.begin_servicing

    def take_state_request(self, wait_s):
        return False  # (the scripted replies hold it, for start to read)

    def wait_message(self, timeout_s):
        pass  # (the scripted replies are there already)

    start = WorkerProcess.start
    _recv_by = WorkerProcess._recv_by


def _messages_in(frames: bytes) -> list:
    """The host messages in frames made ahead (`state_ahead_frames`), as the worker reads them."""
    from vfkeep.contract import Channel, decode

    ours, theirs = Channel.pair()
    try:
        ours.send_frame(frames)
        out = [decode(theirs.recv(1.0), HOST_MESSAGES)]
        while theirs.ready():
            out.append(decode(theirs.recv(1.0), HOST_MESSAGES))
        return out
    finally:
        ours.close()
        theirs.close()


_STARTED = Started(nics=())


def _fake_host(tmp_path, monkeypatch, old, spawned, scrub=None):
    from vfkeep.host.vmm import Host, HostConfig

    host = Host(HostConfig(run_dir=str(tmp_path), nics=0, prelaunch=True))
    host.mem = types.SimpleNamespace(scrub_worker_ram=scrub or (lambda: None), layout=None)
    host.worker = old
    queue_ = list(spawned)
    monkeypatch.setattr(host, "_start_worker", lambda env, cmd, configured: queue_.pop(0))
    return host


def test_service_never_leaks_the_prelaunched_worker(tmp_path, monkeypatch):
    """Anything that raises between prelaunch and the handover must end the prelaunched worker."""
    import pytest

    old = _FakeWorker(1, [SaveState(TransferStatus.SUCCESS)])
    new = _FakeWorker(2, [_STARTED])

    def scrub():
        raise OSError(5, "scrub failed")

    host = _fake_host(tmp_path, monkeypatch, old, [new], scrub=scrub)
    with pytest.raises(OSError):
        host._service(mana_keepalive=True)
    assert new.ended, "the prelaunched worker was left running"


def test_service_broken_state_transfer_is_d4_not_a_crash(tmp_path, monkeypatch):
    """An old worker whose state transfer breaks spec §2.5 (a chunk over 8192 bytes): the host takes none of
    it, ends the worker, and a worker without state starts (D4; the prelaunched one, already waiting for a
    state, is ended); the result says why, nothing escapes."""
    old = _FakeWorker(1, [SaveState(TransferStatus.MORE_DATA, b"x" * 8192),
                          SaveState(TransferStatus.SUCCESS, b"x" * 8193)])
    new = _FakeWorker(2)
    fresh = _FakeWorker(3, [_STARTED])
    host = _fake_host(tmp_path, monkeypatch, old, [new, fresh])
    result = host._service(mana_keepalive=True)
    assert result["ok"] is False and "more than 8192" in result["error"]
    assert old.ended and not any(isinstance(m, SaveStateAnswer) for m in old.sent)
    assert new.sent == [Start(servicing=True)] and new.ended
    assert fresh.sent == [Start()]
    assert host.worker is fresh and old.ended and not fresh.ended


def test_service_replacement_that_fails_too_falls_back_to_fresh(tmp_path, monkeypatch):
    """The next worker hangs in restore and so does its replacement (same command, same blob): the host
    must not keep a hung worker as the current one (no NIC would ever come back); a default worker starts
    without state instead (D4)."""
    blob = b"\x0a\x00"
    old = _FakeWorker(1, [SaveState(TransferStatus.SUCCESS, blob)])
    new = _FakeWorker(2)                 # hangs in restore
    replacement = _FakeWorker(3)         # hangs too
    fresh = _FakeWorker(4, [_STARTED])
    host = _fake_host(tmp_path, monkeypatch, old, [new, replacement, fresh])
    result = host._service(mana_keepalive=True, timeout=1)
    assert new.ended and replacement.ended
    assert old.sent[-1] == SaveStateAnswer(TransferStatus.SUCCESS)
    assert replacement.sent[0] == Start(servicing=True)
    assert fresh.sent == [Start()]
    assert host.worker is fresh and not fresh.ended
    assert result["ok"] is False and "restore" in result["error"]


def test_worker_garbage_message_is_worker_failed(tmp_path):
    """A worker (any --worker-cmd) that writes a frame that is not a JSON object is a WorkerFailed (D4
    handles it), not a ValueError/AttributeError escaping the servicing."""
    import json
    import struct
    import subprocess

    import pytest

    from vfkeep.host.worker_proc import WorkerFailed, WorkerProcess
    from vfkeep.contract import Channel

    ours, theirs = Channel.pair()
    child = subprocess.Popen(["sleep", "30"])
    w = WorkerProcess(child, ours, 1, ["sleep"])
    try:
        for body in (b"{not json", json.dumps([1, 2]).encode()):
            theirs.sock.sendall(struct.pack("<II", len(body), 0) + body)
            with pytest.raises(WorkerFailed):
                w.recv(2.0, Hello)
    finally:
        w.end()
        theirs.close()


def test_supervise_does_not_keep_a_hung_replacement(tmp_path, monkeypatch):
    """A replacement that comes up but never answers `start` must be ended, or it stays the current
    worker forever (alive, so never replaced) and its NICs stay dead (D4)."""
    from vfkeep.host.vmm import Host, HostConfig

    host = Host(HostConfig(run_dir=str(tmp_path), nics=0))
    hung = _FakeWorker(2)  # never answers
    monkeypatch.setattr(host, "_start_worker", lambda env, cmd, configured: hung)
    host.worker = _DeadWorker()
    host._supervise()
    assert hung.ended and not host.worker.alive()


def test_probe_refused_while_a_traffic_agent_owns_the_rings(tmp_path):
    """The guest rings are SPSC: a probe pushing into the tx ring and popping the rx ring while the traffic
    agent does the same corrupts counters and steals the agent's frames. The host must refuse it."""
    import pytest

    from vfkeep.host.agents import Agent
    from vfkeep.host.traffic import GuestTraffic
    from vfkeep.host.vmm import Host, HostConfig, HostError

    class _Poisoned:
        def __getattr__(self, name):
            raise AssertionError(f"probe touched the ring ({name}) while the agent owns it")

    host = Host(HostConfig(run_dir=str(tmp_path), nics=1))
    host.channel_layout = types.SimpleNamespace(slots=16)
    host.channels = [types.SimpleNamespace(tx=_Poisoned(), rx=_Poisoned())]
    host.guest_traffic = GuestTraffic(str(tmp_path), None, host.channel_layout, host.channels)
    host.guest_traffic._agents[0] = Agent(0, types.SimpleNamespace(poll=lambda: None, pid=1), "x.sock")
    with pytest.raises(HostError, match="traffic agent"):
        host._probe(0, 4, 0.1)


def test_start_relay_with_broken_guest_rings_costs_only_that_nic(tmp_path):
    """The rings live in guest RAM, which the guest can scribble on. A ring header the worker cannot attach
    to must not raise out of Worker.start (the worker would crash on every restart and take every NIC down):
    that NIC gets no relay and reports why."""
    from vfkeep.guest.ring import ChannelLayout
    from vfkeep.memory import GuestMemory, MemoryLayout
    from vfkeep.contract import NicConfig
    from vfkeep.paravisor.vf_manager import VfManager

    layout = ChannelLayout(nics=1, slots=16)
    mem = GuestMemory.create(MemoryLayout(layout.total_pages + 4, 4, 0))
    tx, rx = os.eventfd(0, os.EFD_CLOEXEC), os.eventfd(0, os.EFD_CLOEXEC)
    try:
        # rings never formatted: magic 0, as after a guest zeroed them
        vf = VfManager(NicConfig(0, "d186:00:00.0", str(tmp_path / "nic0.sock"), tx, rx), mem, None)
        vf.vport = object()
        vf.channel_layout = layout.to_str()
        vf.start_relay()
        assert vf.relay is None
        assert "guest channel unusable" in vf.error
    finally:
        os.close(tx)
        os.close(rx)
        mem.close()


def test_late_inspect_reply_is_not_taken_for_the_save_answer(tmp_path):
    """An inspect that timed out leaves its reply in the channel; the next request (a save) must not read
    it as its answer, or the host ends a worker that is saving fine (and its NICs take the FLR path)."""
    import subprocess

    from vfkeep.host.worker_proc import WorkerProcess
    from vfkeep.contract import Channel

    ours, theirs = Channel.pair()
    child = subprocess.Popen(["sleep", "30"])
    w = WorkerProcess(child, ours, 1, ["sleep"])
    try:
        theirs.send({"type": "inspect", "tree": {}})  # late reply of an inspect the host gave up on
        theirs.send({"type": "save_state", "status": 0, "nics": []})
        assert isinstance(w.recv(2.0, SaveState), SaveState)
    finally:
        w.end()
        theirs.close()


def test_save_transport_timeout_is_save_failed_for_that_nic_only(tmp_path, monkeypatch):
    """A transport error in one NIC's save (e.g. the device stops answering) is that NIC's SaveFailed
    (FLR + release), not an exception that takes the worker and every other NIC's saved state with it."""
    from vfkeep.contract import NicConfig
    from vfkeep.driver.errors import BackingTimeout
    from vfkeep.memory import GuestMemory, MemoryLayout
    from vfkeep.paravisor.vf_manager import VfManager

    class TimingOut:
        closed = False

        def present(self):
            return True

        def save(self):  # what the vfio-user backing makes of the transport's VfioTimeout
            raise BackingTimeout("no reply to REGION_READ within 5 s")

    mem = GuestMemory.create(MemoryLayout(4, 4, 0))
    try:
        vf = VfManager(NicConfig(0, "d186:00:00.0", str(tmp_path / "nic0.sock"), -1, -1), mem, None)
        vf.dev = TimingOut()
        released = []
        monkeypatch.setattr(vf, "_set_flr_and_release", lambda: released.append(True))
        assert vf.save() == ("SaveFailed", None)
        assert released == [True] and "BackingTimeout" in vf.error
    finally:
        mem.close()


def test_the_state_goes_to_the_next_worker_before_the_scrub_and_its_go_after(tmp_path, monkeypatch):
    """The handoff (DESIGN: scrub before the new worker restores): the prelaunched worker, whose REQUEST_DATA the
    host read before the save, gets every byte of the state as MORE_DATA before the host scrubs worker RAM, and the
    transfer's end (SUCCESS, no payload: its go to restore, spec §2.5) only after the scrub."""
    from vfkeep.contract import STATE_GO, RestoreCompleted, RestoreState, RestoreStateRequest

    blob = b"\x0a\x00" * 5000  # two chunks
    old = _FakeWorker(1, [SaveState(TransferStatus.MORE_DATA, blob[:8192]), SaveState(TransferStatus.SUCCESS,
                                                                                      blob[8192:])])
    new = _FakeWorker(2, [RestoreCompleted(TransferStatus.SUCCESS), _STARTED])
    new.requested_early()
    at_scrub = []
    host = _fake_host(tmp_path, monkeypatch, old, [new], scrub=lambda: at_scrub.append(list(new.sent)))
    result = host._service(mana_keepalive=True)
    assert result["ok"] is True, result["error"]
    ahead = [m for m in at_scrub[0] if isinstance(m, RestoreState)]
    assert [m.status for m in ahead] == [TransferStatus.MORE_DATA] * 2
    assert b"".join(m.payload for m in ahead) == blob
    assert new.sent == [Start(servicing=True), *ahead, STATE_GO]
    assert STATE_GO == RestoreState(0, TransferStatus.SUCCESS, b"")


def test_a_next_worker_whose_state_request_is_not_in_yet_gets_the_whole_state_after_the_scrub(tmp_path,
                                                                                             monkeypatch):
    """Nothing goes ahead to a worker the host has no REQUEST_DATA from: after the scrub it gets the state whole,
    its last chunk SUCCESS, once it asked (spec §2.5)."""
    from vfkeep.contract import RestoreCompleted, RestoreState, RestoreStateRequest

    old = _FakeWorker(1, [SaveState(TransferStatus.SUCCESS, b"state")])
    new = _FakeWorker(2, [RestoreStateRequest(), RestoreCompleted(TransferStatus.SUCCESS), _STARTED])
    at_scrub = []
    host = _fake_host(tmp_path, monkeypatch, old, [new], scrub=lambda: at_scrub.append(list(new.sent)))
    assert host._service(mana_keepalive=True)["ok"] is True
    assert at_scrub == [[Start(servicing=True)]]
    assert new.sent == [Start(servicing=True), RestoreState(5, TransferStatus.SUCCESS, b"state")]


@pytest.mark.parametrize("nvme", [False, True])
def test_the_host_sends_the_go_right_after_the_scrub_and_decodes_the_report_after_it(tmp_path, monkeypatch, nvme):
    """Once the old worker's last chunk says SUCCESS (it has saved and released its devices) the state goes ahead
    and worker RAM is scrubbed, and the go follows the scrub at once: nothing but the scrub stands between the
    state's arrival and the go. The old worker's answer (spec §2.5: once, SUCCESS: the state is kept whatever the
    report holds) follows, and only then is the last message's report decoded. With NVMe controllers the answer
    goes at once (the old worker then releases the handles the next one attaches to) and the host yields its CPU
    (the woken worker may be queued on it); without, the host first waits for the next worker's first message
    (`wait_message`, bounded), off the CPUs its restore needs."""
    from vfkeep.contract import STATE_GO, RestoreCompleted, RestoreState
    from vfkeep.host.vmm import DEFAULT_TIMEOUT_S, QUIET_AFTER_GO_S

    order = []

    class Decoding(_FakeWorker):
        def recv(self, timeout, *expected, grace=0.0, first=None):
            msg = super().recv(timeout, *expected, grace=grace, first=first)  # (`first` sees the frame first)
            order.append("decode")
            return msg

    old = Decoding(1, [SaveState(TransferStatus.SUCCESS, b"state")])
    new = _FakeWorker(2, [RestoreCompleted(TransferStatus.SUCCESS), _STARTED])
    new.requested_early()
    for w, who in ((old, "old"), (new, "new")):
        w.sent = types.SimpleNamespace(append=lambda m, who=who: order.append((who, m)),
                                       extend=lambda ms, who=who: order.extend((who, m) for m in ms))
    new.wait_message = lambda timeout_s: order.append(("wait", timeout_s))
    host = _fake_host(tmp_path, monkeypatch, old, [new], scrub=lambda: order.append("scrub"))
    host.config.nvme = int(nvme)  # (what the branch is decided by; no controller is spawned here)
    monkeypatch.setattr(os, "sched_yield", lambda: order.append("yield"))
    assert host._service(mana_keepalive=True)["ok"] is True
    assert order[0] == ("new", Start(servicing=True)) and order[1][0] == "old" and isinstance(order[1][1], Save)
    answer = ("old", SaveStateAnswer(TransferStatus.SUCCESS))
    assert order[2:] == [("new", RestoreState(5, TransferStatus.MORE_DATA, b"state")), "scrub", ("new", STATE_GO),
                         *([answer, "yield"] if nvme else [("wait", min(QUIET_AFTER_GO_S, DEFAULT_TIMEOUT_S)), answer]),
                         "decode"], order


class _MalformedLastMessage(_FakeWorker):
    """An old worker whose last frame says SUCCESS (its state goes ahead) and whose message then fails to decode."""

    def save(self, request, timeout, grace=0.0, ahead=None, answer=True):
        from vfkeep.host.worker_proc import WorkerFailed

        self._answer_due = True  # (as `WorkerProcess.save` does on the last frame's SUCCESS)
        ahead(b"state")
        raise WorkerFailed("worker 1 sent a malformed message: nics")


def test_a_last_message_whose_report_fails_to_decode_after_the_go_keeps_the_state(tmp_path, monkeypatch):
    """The state went ahead, worker RAM was scrubbed and the go sent on the frame's SUCCESS; then the message's
    report turns out unusable (WorkerFailed). The state was complete and the next worker restores from it (it
    validates any state): the servicing reports the error, the old worker (answered once: the state is kept) is
    ended, and no second scrub, no worker without state follows."""
    from vfkeep.contract import STATE_GO, RestoreCompleted

    scrubs = []
    old = _MalformedLastMessage(1)
    new = _FakeWorker(2, [RestoreCompleted(TransferStatus.SUCCESS), _STARTED])
    new.requested_early()
    host = _fake_host(tmp_path, monkeypatch, old, [new], scrub=lambda: scrubs.append((old.ended, new.ended)))
    result = host._service(mana_keepalive=True)
    assert result["ok"] is False and "malformed" in result["error"]
    assert scrubs == [(False, False)]
    assert old.ended and not new.ended and host.worker is new
    assert new.sent[-1] == STATE_GO and new.sent.count(STATE_GO) == 1
    assert [m for m in old.sent if isinstance(m, SaveStateAnswer)] == [SaveStateAnswer(TransferStatus.SUCCESS)]
    with open(os.path.join(host.run_dir, "servicing_state.bin"), "rb") as f:
        assert f.read() == b"state"


def test_a_last_message_that_fails_to_decode_before_any_go_is_d4(tmp_path, monkeypatch):
    """No go went (the next worker's state request was not in before the save, so nothing went ahead): a last
    message that fails to decode is D4 as ever. The prelaunched worker is ended; the old worker is ended and its
    RAM scrubbed again (it may have run after the first scrub); a worker without state starts."""

    scrubs = []
    old = _MalformedLastMessage(1)
    new = _FakeWorker(2)
    fresh = _FakeWorker(3, [_STARTED])
    host = _fake_host(tmp_path, monkeypatch, old, [new, fresh],
                      scrub=lambda: scrubs.append((old.ended, new.ended)))
    result = host._service(mana_keepalive=True)
    assert result["ok"] is False and "malformed" in result["error"]
    assert scrubs == [(False, False), (True, True)]
    assert new.ended and old.ended and host.worker is fresh and fresh.sent == [Start()]
    assert new.sent == [Start(servicing=True)]


def test_the_old_worker_is_dismissed_after_the_servicing_window_is_measured(tmp_path, monkeypatch):
    """The old worker's exit (1-3 ms of CPU) waits until the guest's frames of the window are back and measured:
    right after `started` it took the two CPUs from the new relay's first passes and the guest's catching up. On
    an error after the handover it is still dismissed."""
    from vfkeep.contract import RestoreCompleted

    for fail in (False, True):
        old = _FakeWorker(1, [SaveState(TransferStatus.SUCCESS, b"state")])
        new = _FakeWorker(2, [RestoreStateRequest(), RestoreCompleted(TransferStatus.SUCCESS), _STARTED])
        host = _fake_host(tmp_path, monkeypatch, old, [new])
        old_alive_when_measured = []

        def measure(start_ns, end_ns, old=old, fail=fail):
            old_alive_when_measured.append(not old.ended)
            if fail:
                raise RuntimeError("measurement failed")
            return 1.0, 0

        monkeypatch.setattr(host, "_traffic_window", measure)
        if fail:
            with pytest.raises(RuntimeError):
                host._service(mana_keepalive=True)
        else:
            assert host._service(mana_keepalive=True)["ok"] is True
        assert old_alive_when_measured == [True]
        assert old.ended, "the old worker was left running"
