"""The order of the handoff's steps that keep work out of a servicing's critical path (docs/internals.md,
"A servicing, end to end"): what may happen before the old worker stops its relay does, and nothing the spec
orders is reordered."""
from __future__ import annotations

import subprocess
import threading

from vfkeep.contract import (HOST_MESSAGES, Channel, RestoreCompleted, RestoreStateRequest, Start, Started,
                             TransferStatus, decode)
from vfkeep.host.worker_proc import WorkerProcess


class _Peer:
    """The worker's side of a host channel, answering a restore as a worker does (spec §2.5)."""

    def __init__(self):
        self.ours, self.theirs = Channel.pair()
        self.child = subprocess.Popen(["sleep", "30"])
        self.host_side = WorkerProcess(self.child, self.ours, 2, ["sleep"])
        self.received: list = []

    def restore(self, send_request: bool) -> threading.Thread:
        def run():
            if send_request:
                self.theirs.send(RestoreStateRequest().to_json())
            while True:
                msg = decode(self.theirs.recv(5.0), HOST_MESSAGES)
                self.received.append(msg)
                if msg.status is TransferStatus.SUCCESS:
                    break
            self.theirs.send(RestoreCompleted(TransferStatus.SUCCESS).to_json())
            self.theirs.send(Started(nics=()).to_json())
        t = threading.Thread(target=run, daemon=True)
        t.start()
        return t

    def close(self):
        self.host_side.end()
        self.theirs.close()


def test_prelaunched_workers_state_request_is_read_before_the_save():
    """The host reads a prelaunched worker's REQUEST_DATA when it begins the servicing, not in the window: with
    the state in hand it answers at once, without waiting for a request (spec §2.5 order unchanged)."""
    peer = _Peer()
    try:
        w = peer.host_side
        w.begin_servicing()
        assert decode(peer.theirs.recv(5.0), HOST_MESSAGES) == Start(servicing=True)
        peer.theirs.send(RestoreStateRequest().to_json())
        assert w.take_state_request(5.0) is True
        t = peer.restore(send_request=False)  # nothing more comes from the worker before the state
        assert w.start(b"saved state", 5.0) == Started(nics=())
        t.join(5.0)
        assert b"".join(m.payload for m in peer.received) == b"saved state"
    finally:
        peer.close()


def test_state_request_not_there_yet_is_read_in_the_window_as_before():
    """A worker that has not asked (yet) by then costs only the early read: `start` waits for its request."""
    peer = _Peer()
    try:
        w = peer.host_side
        w.begin_servicing()
        assert decode(peer.theirs.recv(5.0), HOST_MESSAGES) == Start(servicing=True)
        assert w.take_state_request(0.01) is False
        t = peer.restore(send_request=True)
        assert w.start(b"saved state", 5.0) == Started(nics=())
        t.join(5.0)
        assert b"".join(m.payload for m in peer.received) == b"saved state"
    finally:
        peer.close()


def test_the_state_goes_ahead_without_decoding_or_encoding_a_message(monkeypatch):
    """`take_state_request` checks the early REQUEST_DATA when it reads it (before the save), so `offer_state`,
    between the old worker's last frame and the scrub, decodes nothing and encodes no message (its frames are
    `state_ahead_frames`, the same bytes `Channel.frame` makes of `restore_state_messages(final=False)`); a request
    that is not a REQUEST_DATA is never answered ahead (`start` reports it)."""
    import pytest

    from vfkeep.contract import MAX_CHUNK, Record, restore_state_messages, state_ahead_frames

    for size in (0, 1, 760, MAX_CHUNK, MAX_CHUNK + 1, 3 * MAX_CHUNK + 5):
        blob = (bytes(range(256)) * (size // 256 + 1))[:size]
        assert state_ahead_frames(blob) == b"".join(Channel.frame(m.to_json())
                                                    for m in restore_state_messages(blob, final=False))
    for status, ahead in ((TransferStatus.REQUEST_DATA, True), (TransferStatus.FAILURE, False)):
        peer = _Peer()
        try:
            w = peer.host_side
            w.begin_servicing()
            decode(peer.theirs.recv(5.0), HOST_MESSAGES)
            peer.theirs.send(RestoreStateRequest(status).to_json())
            assert w.take_state_request(5.0) is True
            with monkeypatch.context() as m:
                def no_codec(*args, **kwargs):
                    raise AssertionError("a message decoded or encoded while the state goes ahead")
                for name in ("to_json", "from_json"):
                    m.setattr(Record, name, no_codec)
                m.setattr(Channel, "frame", no_codec)
                assert w.offer_state(b"saved state") is ahead
            if ahead:
                msg = decode(peer.theirs.recv(5.0), HOST_MESSAGES)
                assert (msg.status, msg.payload) == (TransferStatus.MORE_DATA, b"saved state")
            else:
                assert not peer.theirs.ready()
                with pytest.raises(Exception, match="FAILURE"):
                    w.hand_over(b"saved state", 1.0)
        finally:
            peer.close()


def test_mana_kind_prepare_attaches_each_nics_rings_for_its_relay(tmp_path):
    """`ManaKind.prepare` (before the saved state arrives) attaches every NIC's guest rings; the NIC's VF manager
    is created with them, so its relay start attaches nothing in the window."""
    import os

    from vfkeep.contract import NicConfig
    from vfkeep.guest.ring import ChannelLayout, NicChannel
    from vfkeep.memory import GuestMemory, MemoryLayout
    from vfkeep.paravisor.device_kind import PreviousState
    from vfkeep.paravisor.mana_kind import ManaKind
    from vfkeep.paravisor.options import KeepAliveConfig
    from vfkeep.paravisor import vf_manager

    layout = ChannelLayout(nics=1, slots=16)
    mem = GuestMemory.create(MemoryLayout(layout.total_pages + 4, 16, 16))
    NicChannel.create(mem, layout, 0)
    tx, rx = os.eventfd(0, os.EFD_CLOEXEC), os.eventfd(0, os.EFD_CLOEXEC)
    kind = ManaKind([NicConfig(0, "nic0", str(tmp_path / "none.sock"), tx, rx)], mem, layout.to_str())
    created = []
    original = vf_manager.VfManager.create
    try:
        kind.prepare()
        channel = kind.channels[0]
        assert channel.tx.gpa == layout.tx_gpa(0) and channel.rx.gpa == layout.rx_gpa(0)
        vf_manager.VfManager.create = classmethod(lambda cls, cfg, mem, dma, **kw: created.append(kw["channel"]))
        kind.restore(PreviousState(), KeepAliveConfig.DISABLED)
        assert created == [channel]
    finally:
        vf_manager.VfManager.create = original
        kind.channels[0].close()
        mem.close()


def test_the_save_watchdog_is_armed_not_started_by_a_save_and_fires_once_at_the_last_deadline():
    """Spec §2.1's watchdog thread exists before any save (starting one in the save cost it 0.1-0.25 ms before the
    relay stopped); arming sets the deadline (timeout minus dump-collection time), disarming clears it, and a
    re-armed watchdog fires at its new deadline only."""
    from vfkeep.paravisor.worker import DUMP_COLLECTION_S, Watchdog

    fired: list[float] = []
    done = threading.Event()
    before = threading.active_count()
    dog = Watchdog(fire=lambda timeout_s: (fired.append(timeout_s), done.set()))
    assert threading.active_count() == before + 1
    dog.arm(DUMP_COLLECTION_S + 60)
    dog.disarm()
    dog.arm(DUMP_COLLECTION_S + 0.05)
    assert threading.active_count() == before + 1  # armed, not started
    assert done.wait(5.0)
    assert fired == [DUMP_COLLECTION_S + 0.05]


def test_save_hands_the_state_ahead_on_the_last_frame_before_decoding_it():
    """`WorkerProcess.save(ahead=)`: called once, with the whole state, when the last chunk's frame says SUCCESS,
    before its report is decoded (a malformed report is WorkerFailed after that) and answered; not for MORE_DATA
    chunks, a FAILURE or a state over the size limit."""
    import pytest

    from vfkeep.contract import MAX_CHUNK, Save, SaveState, SaveStateAnswer, save_state_messages
    from vfkeep.host.worker_proc import WorkerFailed

    blob = bytes(range(256)) * 40  # two chunks
    for report, limit, expect_ahead, expect_ok in ((None, 1 << 20, True, True), ("bogus", 1 << 20, True, False),
                                                  (None, MAX_CHUNK, False, True)):
        peer = _Peer()
        try:
            msgs = [m.to_json() for m in save_state_messages(blob)]
            if report is not None:
                msgs[-1]["nics"] = report
            if limit == MAX_CHUNK:  # refused: the worker reports its failed save (spec §2.4)
                msgs.append(SaveState(TransferStatus.FAILURE, error="host did not take it").to_json())
            for m in msgs:
                peer.theirs.send(m)
            seen = []
            w = peer.host_side
            ahead = lambda state: seen.append((state, peer.theirs.ready()))  # noqa: E731
            if expect_ok:
                last, state = w.save(Save(2), 5.0, max_bytes=limit, ahead=ahead, answer=False)
                assert w._answer_due is (limit > MAX_CHUNK)
                w.answer_kept()
            else:
                with pytest.raises(WorkerFailed, match="malformed"):
                    w.save(Save(2), 5.0, max_bytes=limit, ahead=ahead, answer=False)
            assert seen == ([(blob, True)] if expect_ahead else []), seen  # (the save request: not read yet)
            replies = []
            while peer.theirs.ready():
                replies.append(decode(peer.theirs.recv(1.0), {**HOST_MESSAGES}))
            answers = [r for r in replies if isinstance(r, SaveStateAnswer)]
            assert answers == ([SaveStateAnswer(TransferStatus.SUCCESS)] if expect_ok and limit > MAX_CHUNK else
                               [SaveStateAnswer(TransferStatus.FAILURE)] if limit == MAX_CHUNK else [])
        finally:
            peer.close()


def test_save_knows_the_last_frame_by_how_its_text_begins():
    """`save(ahead=)` acts on the last frame before parsing it, by how its JSON text begins: a SUCCESS written with
    other spacing (a foreign worker) is not recognised (no `ahead`; the state is still taken), and one that begins as
    SUCCESS but decodes as MORE_DATA (a second `status` key) is WorkerFailed after the `ahead`."""
    import json

    import pytest

    from vfkeep.contract import _HEADER, Save
    from vfkeep.host.worker_proc import WorkerFailed

    def frame(text: str) -> bytes:
        return _HEADER.pack(len(text), 5) + text.encode() + b"state"

    spaced = frame(json.dumps({"type": "save_state", "status": TransferStatus.SUCCESS.value}))
    twice = frame('{"type":"save_state","status":%d,"status":%d}' % (TransferStatus.SUCCESS.value,
                                                                   TransferStatus.MORE_DATA.value))
    for raw, expect_ok in ((spaced, True), (twice, False)):
        peer = _Peer()
        try:
            peer.theirs.send_frame(raw)
            seen = []
            if expect_ok:
                last, state = peer.host_side.save(Save(2), 5.0, ahead=seen.append, answer=False)
                assert state == b"state" and last.status is TransferStatus.SUCCESS and seen == []
            else:
                with pytest.raises(WorkerFailed, match="begins as SUCCESS and decodes as MORE_DATA"):
                    peer.host_side.save(Save(2), 5.0, ahead=seen.append, answer=False)
                assert seen == [b"state"]
        finally:
            peer.close()
