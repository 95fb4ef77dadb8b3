"""One worker process as the host sees it: the child, its channel, its generation."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import time

from .. import proc
from ..contract import (MAX_CHUNK, MAX_SERVICING_STATE, STATE_GO, STATE_GO_FRAME, Channel, ChannelClosed,
                        ChannelTimeout, ContractError, Hello, InspectReply, Message, RestoreCompleted, RestoreStateRequest, Save,
                        SaveState, SaveStateAnswer, Start, Started, TransferStatus, restore_state_messages,
                        state_ahead_frames)
from ..log import kv
from .devices import last_line, remove_if_empty

log = logging.getLogger("vfkeep.host.worker")

#: The SUCCESS answer to a kept state, made once: it leaves right after the go, inside the guest's blackout.
_KEPT_FRAME = Channel.frame(SaveStateAnswer(TransferStatus.SUCCESS).to_json())
#: How the JSON text of the old worker's last message (SUCCESS) begins, as `Channel.frame` makes it: `save` knows the
#: last frame by it before parsing it.
_SAVED_START = json.dumps({"type": SaveState.kind, "status": TransferStatus.SUCCESS.value},
                          separators=(",", ":")).encode()[:-1]


#: While a message is awaited, how often the worker is looked at for being stopped (`_recv_watched`).
STOPPED_CHECK_S = 1.0


class WorkerFailed(Exception):
    """The worker died, closed its channel, answered wrongly or not in time."""


class WorkerProcess:
    def __init__(self, child: subprocess.Popen, chan: Channel, generation: int, argv: list[str],
                 stderr_path: str | None = None):
        self.child = child
        self.stderr_path = stderr_path
        self.chan = chan
        self.generation = generation
        self.argv = argv
        self.hello: Hello | None = None
        self.spawned_at = time.perf_counter()
        self.spawned_wall = time.time()
        self.servicing_begun = False
        #: Its REQUEST_DATA as received by `take_state_request` (`hand_over` reports what is wrong with it), else None.
        self._state_request = None
        #: `take_state_request` found that request a REQUEST_DATA: `offer_state` may answer it.
        self._request_ready = False
        #: The state `offer_state` sent ahead (all of it as MORE_DATA), else None; `hand_over` then sends the go.
        self._offered: bytes | None = None
        #: The state transfer ended (SUCCESS sent): `start` only waits for the restore.
        self._handed_over = False
        #: `save(answer=False)` took a state and left its SUCCESS answer for `answer_kept`.
        self._answer_due = False
        #: That answer went (once: spec §2.5).
        self._answer_sent = False

    @property
    def pid(self) -> int:
        return self.child.pid

    @property
    def state_taken(self) -> bool:
        """`save` took its complete state: it idles, answering nothing more, until `dismiss` (or `end`)."""
        return self._answer_due or self._answer_sent

    @property
    def handed_over(self) -> bool:
        """The state transfer to this worker ended (SUCCESS sent): it restores."""
        return self._handed_over

    @classmethod
    def spawn(cls, argv_prefix: list[str], args: list[str], pass_fds: list[int], env: dict[str, str],
              generation: int, run_dir: str) -> "WorkerProcess":
        """Start a worker; its end of the channel is inherited as `--channel-fd`."""
        ours, theirs = Channel.pair()
        argv = [*argv_prefix, "--channel-fd", str(theirs.fileno()), *args]
        stderr_path = os.path.join(run_dir, f"worker-{generation}.stderr")
        stderr = open(stderr_path, "ab")
        try:
            child = proc.spawn(argv, pass_fds=[theirs.fileno(), *pass_fds], env=env, stdout=stderr, stderr=stderr)
        finally:
            theirs.close()
            stderr.close()
        kv(log, logging.INFO, "worker spawned", generation=generation, pid=child.pid, argv=" ".join(argv))
        return cls(child, ours, generation, argv, stderr_path)

    def wait_hello(self, timeout: float) -> Hello:
        msg = self.recv(timeout, Hello)
        self.hello = msg
        kv(log, logging.INFO, "worker hello", generation=self.generation, pid=self.pid, version=msg.version,
           compat=msg.compat, startup_ms=round((time.perf_counter() - self.spawned_at) * 1000, 1))
        return msg

    def send(self, msg: Message | None, frame: bytes | None = None) -> None:
        """`frame`: `msg` as `Channel.frame` made it ahead of time (or the frames of several, `msg` None)."""
        try:
            self.chan.send_frame(frame or Channel.frame(msg.to_json()))
        except ChannelClosed as e:
            raise WorkerFailed(f"worker {self.generation} (pid {self.pid}) is gone: {e}") from None

    def recv(self, timeout: float | None, *expected: type[Message], grace: float = 0.0, first=None) -> Message:
        """Next message, which must be of one of the `expected` types, within `timeout` (+ `grace`, which errors
        do not mention: the timeout is the one the user gave). A late `inspect` reply (its request timed out) is
        skipped: the worker never sends one unasked, and taking it for the answer to the next request (a save!)
        would end a worker that is doing fine. `first(text, payload)` sees each frame before it is parsed
        (`Channel.recv`)."""
        deadline = None if timeout is None else time.monotonic() + timeout + grace
        while True:
            msg = self._recv_one(None if deadline is None else max(0.0, deadline - time.monotonic()), timeout, first)
            if isinstance(msg, dict) and msg.get("type") == InspectReply.kind and InspectReply not in expected:
                kv(log, logging.WARNING, "skipping a late inspect reply", generation=self.generation)
                continue
            break
        return self._check(msg, expected)

    def _recv_one(self, remaining: float | None, timeout: float | None, first=None):
        try:
            return self._recv_watched(remaining, first)
        except ChannelTimeout:
            raise WorkerFailed(f"worker {self.generation} (pid {self.pid}) did not answer within {timeout:g} s") from None
        except ChannelClosed as e:
            raise WorkerFailed(f"worker {self.generation} (pid {self.pid}) closed its channel ({e}); "
                               f"{self.exit_note()}") from None
        except ValueError as e:  # not JSON (a foreign --worker-cmd, or a torn write)
            raise WorkerFailed(f"worker {self.generation} (pid {self.pid}) sent an unreadable message: {e}") from None

    def _recv_watched(self, remaining: float | None, first=None):
        """`chan.recv`, looking every STOPPED_CHECK_S whether the worker is stopped (SIGSTOP): it answers nothing
        until continued, and a save waited out its whole timeout (60 s) and an `inspect` 20 s for it, then said only
        that it did not answer. (A partial frame stays buffered across the looks.)"""
        deadline = None if remaining is None else time.monotonic() + remaining
        while True:
            left = STOPPED_CHECK_S if deadline is None else min(STOPPED_CHECK_S, deadline - time.monotonic())
            try:
                return self.chan.recv(max(0.0, left), first)
            except ChannelTimeout:
                if deadline is not None and time.monotonic() >= deadline:
                    raise
                if line := proc.stopped_line(f"worker {self.generation} (pid {self.pid})", self.pid):
                    raise WorkerFailed(line) from None

    def _check(self, msg, expected: tuple[type[Message], ...]) -> Message:
        if not isinstance(msg, dict):
            raise WorkerFailed(f"worker {self.generation} sent {type(msg).__name__}, expected a JSON object")
        kinds = {m.kind: m for m in expected}
        if msg.get("type") not in kinds:
            raise WorkerFailed(f"worker {self.generation} sent {msg.get('type')!r}, expected {'|'.join(kinds)}: "
                               f"{msg.get('error', '')}")
        try:
            return kinds[msg["type"]].from_json(msg, msg["type"])
        except ContractError as e:
            raise WorkerFailed(f"worker {self.generation} sent a malformed message: {e}") from None

    def request(self, msg: Message, timeout: float | None, *expected: type[Message], grace: float = 0.0) -> Message:
        self.send(msg)
        return self.recv(timeout, *expected, grace=grace)

    def exit_note(self) -> str:
        """How the worker ended, for errors: its exit status (it closed its channel, so it is exiting) and the
        last line it printed, with where to read more."""
        code = self.wait_exit(1.0)
        status = "still running" if code is None else (f"killed by signal {-code}" if code < 0 else f"exit status {code}")
        last = last_line(self.stderr_path) if self.stderr_path else ""
        where = self.log_to_read(bool(last)) if self.stderr_path else None
        where = f" (see {where})" if where else ""
        return f"{status}{': ' + last if last else ''}{where}"

    def log_to_read(self, printed: bool) -> str | None:
        """A file that exists and says more: the stderr file when the worker printed something (an empty one
        is removed), else its own log; None when it wrote neither (e.g. a foreign --worker-cmd: the host's
        log, which every failure line names anyway)."""
        if printed:
            return self.stderr_path
        own = os.path.join(os.path.dirname(self.stderr_path), f"worker-{self.generation}.log")
        try:  # (not a previous host's worker of the same generation)
            return own if os.path.getmtime(own) >= self.spawned_wall - 1 else None
        except OSError:
            return None

    # -- the saved-state transfer (servicing spec §2.5) -------------------------------------------
    def _recv_by(self, deadline: float, timeout: float, *expected: type[Message], first=None) -> Message:
        """`recv` against the deadline of a whole exchange; errors name its `timeout`."""
        return self.recv(timeout, *expected, grace=deadline - time.monotonic() - timeout, first=first)

    def save(self, request: Save, timeout: float, grace: float = 0.0, max_bytes: int = MAX_SERVICING_STATE,
             ahead=None, answer: bool = True) -> tuple[SaveState, bytes | None]:
        """Ask for a save and collect the state: (the last message, the state) after SUCCESS, answered once;
        (the FAILURE message, None) when the save failed, including when the state exceeds `max_bytes`
        (answered FAILURE: the worker then reports its failed save). A chunk that breaks the protocol is
        WorkerFailed; a worker gone after its complete state is not (the state is kept). `timeout` (+ `grace`)
        bounds the whole exchange. `ahead(state)` is called with the state as soon as the last chunk's frame says
        SUCCESS (its JSON text begins as a SUCCESS `save_state`'s does: `_SAVED_START`), before that text is parsed
        (the report it carries) and answered; with `answer` False the SUCCESS answer waits for `answer_kept`, which
        `ahead` may call already: from that frame on the state is kept, whatever the report holds (a message that
        then decodes as anything but SUCCESS is WorkerFailed). A frame made otherwise (a foreign worker's JSON
        spacing) is not recognised: its state is handed over after the decode, as without `ahead`."""
        deadline = time.monotonic() + timeout + grace
        self.send(request)
        parts: list[bytes] = []
        size = 0
        went_ahead = False

        def last_chunk(text: bytes, payload: bytes) -> None:
            nonlocal went_ahead
            end = len(_SAVED_START)
            if ahead is not None and text.startswith(_SAVED_START) and text[end:end + 1] in (b",", b"}") and \
                    len(payload) <= MAX_CHUNK and size + len(payload) <= max_bytes:
                self._answer_due = went_ahead = True
                ahead(b"".join((*parts, payload)))

        while True:
            msg = self._recv_by(deadline, timeout, SaveState, first=last_chunk)
            if went_ahead and msg.status is not TransferStatus.SUCCESS:
                raise WorkerFailed(f"worker {self.generation} sent a save_state whose frame begins as SUCCESS and "
                                   f"decodes as {msg.status.name}")
            if msg.status is TransferStatus.FAILURE:
                if msg.payload:
                    raise WorkerFailed(f"worker {self.generation} sent a FAILURE save_state with a payload")
                return msg, None
            if msg.status not in (TransferStatus.MORE_DATA, TransferStatus.SUCCESS):
                raise WorkerFailed(f"worker {self.generation} sent a save_state with status {msg.status.name}")
            if len(msg.payload) > MAX_CHUNK:
                raise WorkerFailed(f"worker {self.generation} sent {len(msg.payload)} saved-state bytes in one "
                                   f"message, more than {MAX_CHUNK}")
            size += len(msg.payload)
            if size <= max_bytes:
                parts.append(msg.payload)
            if msg.status is TransferStatus.MORE_DATA:
                continue
            if size > max_bytes:
                kv(log, logging.ERROR, "servicing state too large, refused", bytes=size, limit=max_bytes)
                self.send(SaveStateAnswer(TransferStatus.FAILURE))
                failed = self._recv_by(deadline, timeout, SaveState)
                if failed.status is not TransferStatus.FAILURE:
                    raise WorkerFailed(f"worker {self.generation} did not report the refused save as failed")
                return failed, None
            self._answer_due = not self._answer_sent
            if answer:
                self.answer_kept()
            return msg, b"".join(parts)

    def answer_kept(self) -> None:
        """The SUCCESS answer to a state `save` took, if not sent yet: the worker, idle until then, exits once the
        host closes the channel."""
        if not self._answer_due:
            return
        self._answer_due, self._answer_sent = False, True
        try:
            self.send(SaveStateAnswer(TransferStatus.SUCCESS), _KEPT_FRAME)
        except WorkerFailed as e:
            # Gone after its last chunk (killed before it read the answer): the state is complete and the
            # worker released its devices for it, so it is used, whether or not the answer got there first.
            kv(log, logging.WARNING, "worker gone before the answer to its complete state; keeping the state",
               generation=self.generation, error=str(e))

    def wait_message(self, timeout_s: float) -> None:
        """Until the worker has sent something or gone (its channel readable), `timeout_s` at most; nothing read."""
        try:
            self.chan.ready(timeout_s)
        except (OSError, ValueError):  # (closed: what follows meets it)
            pass

    def begin_servicing(self) -> None:
        """`start` a prelaunched worker as the next one of a servicing before the saved state exists: it
        requests the state (REQUEST_DATA) and waits for it, so `start(blob)` answers a request already there."""
        self.send(Start(servicing=True))
        self.servicing_begun = True

    def take_state_request(self, wait_s: float) -> bool:
        """Read the REQUEST_DATA a `begin_servicing` worker sends at once, if it comes within `wait_s`, so that
        reading it is not left for the servicing window; `start` checks it as if it had read it itself. A
        worker that does not send it in time (hung, dead, a foreign command) is left to `start` as before."""
        if not self.servicing_begun or self._state_request is not None:
            return self._state_request is not None
        try:
            self._state_request = self.chan.recv(wait_s)
        except (ChannelTimeout, ChannelClosed, ValueError):  # (a torn or bad frame stays buffered for start)
            return False
        try:  # checked now, before the save: `offer_state` runs inside the guest's blackout
            self._request_ready = self._check(self._state_request, (RestoreStateRequest,)).status \
                is TransferStatus.REQUEST_DATA
        except WorkerFailed:
            self._request_ready = False
        return True

    def offer_state(self, blob: bytes) -> bool:
        """Send `blob` ahead, before the host scrubs worker RAM, to a worker whose REQUEST_DATA `take_state_request`
        took: every chunk as MORE_DATA, so the worker reads (and decodes) it while the host scrubs, and the transfer's
        end, the SUCCESS `hand_over` sends after the scrub, is the go to restore (spec §2.5 unchanged: the state is
        complete only with SUCCESS; DESIGN: scrub before the new worker restores). False, nothing sent, when there
        is no such request or it is not a REQUEST_DATA (then `start` reports it); a worker gone meanwhile is found by
        `hand_over` too. One send of frames made without a message object (`state_ahead_frames`): this runs between
        the old worker's last frame and the scrub."""
        if not self._request_ready or self._offered is not None or self._handed_over:
            return False
        try:
            self.send(None, state_ahead_frames(blob))
        except WorkerFailed:
            return False
        self._state_request, self._request_ready, self._offered = None, False, blob
        return True

    def hand_over(self, blob: bytes, timeout: float, deadline: float | None = None) -> None:
        """Spec §2.5, host side: answer the worker's REQUEST_DATA with `blob`, ending with SUCCESS (after an
        `offer_state` of the same blob, only that SUCCESS, empty: the go). `Start` first unless `begin_servicing`
        sent it. `timeout` bounds the wait for the request (by `deadline` when given). Once per worker: a second call
        for the same blob sends nothing."""
        if self._offered is not None and self._offered is not blob:
            raise ValueError("a worker that was offered one saved state cannot be handed another")
        if self._handed_over:
            return
        deadline = time.monotonic() + timeout if deadline is None else deadline
        if not self.servicing_begun:
            self.begin_servicing()
        if self._offered is None:
            early, self._state_request, self._request_ready = self._state_request, None, False
            req = self._check(early, (RestoreStateRequest,)) if early is not None else \
                self._recv_by(deadline, timeout, RestoreStateRequest)
            if req.status is not TransferStatus.REQUEST_DATA:
                raise WorkerFailed(f"worker {self.generation} asked for the state with status {req.status.name}")
            for msg in restore_state_messages(blob):
                self.send(msg)
        else:
            self.send(STATE_GO, STATE_GO_FRAME)
        self._handed_over = True

    def start(self, blob: bytes | None, timeout: float, deadline: float | None = None) -> Started:
        """`start` (unless `begin_servicing` sent it); with a saved state (a servicing) hand it over (unless
        `hand_over` did) and take the worker's restore-completed report before `started`; all of it within
        `timeout` (by `deadline`, when given: the one `hand_over` had)."""
        if self.servicing_begun and blob is None:
            raise ValueError("a worker told to restore a saved state cannot start without one")
        deadline = time.monotonic() + timeout if deadline is None else deadline
        if blob is not None:
            if not self._handed_over:
                self.hand_over(blob, timeout, deadline)
            done = self._recv_by(deadline, timeout, RestoreCompleted)
            if done.status is not TransferStatus.SUCCESS:
                kv(log, logging.WARNING, "worker reported a failed restore", generation=self.generation)
        elif not self.servicing_begun:
            self.send(Start(servicing=False))
        return self._recv_by(deadline, timeout, Started)

    def dismiss(self, timeout: float) -> int | None:
        """After its saved state was taken (it idles until then): close the channel, on which the worker exits;
        its exit status, or None if it did not exit within `timeout` (then the caller ends it)."""
        self.chan.close()
        return self.wait_exit(timeout)

    def alive(self) -> bool:
        return self.child.poll() is None

    def wait_exit(self, timeout: float) -> int | None:
        try:
            return self.child.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        """SIGKILL from any thread, with its process group (what a `--worker-cmd` wrapper started): whoever waits
        on this worker's channel gets WorkerFailed (and ends it)."""
        proc.kill_group(self.child)

    def end(self) -> int | None:
        """End by PID (SIGTERM, then SIGKILL) and release the channel; an empty stderr file goes too."""
        code = proc.end(self.child)
        self.chan.close()
        remove_if_empty(self.stderr_path)
        return code
