"""`vfkeep worker`: the paravisor process ("VTL2") that the host replaces at every servicing.

It speaks the host<->worker contract (`vfkeep.contract`): hello once its imports are done, then
start -> started (fetching the saved state first in a servicing scenario, spec §2.5), save -> the saved
state in chunks (and exit without resetting kept devices once the host has it) or a FAILURE (keep
running, spec §2.4, DESIGN D5), inspect -> inspect, shutdown -> bye. What start and save do is the
servicing sequence of spec §3 and §2.2 over the DMA manager and the device kinds (`device_kind.DeviceKind`:
MANA today), each kind behind the same seam.
"""
from __future__ import annotations

import hashlib
import logging
import os
import select
import sys
import threading
import time
import uuid

import click

from .. import __version__, kill_points, proc
from .. import log as vlog
from ..contract import (DATAPATH_KEEPALIVE_ENV, HOST_MESSAGES, PRELAUNCHED_ENV, STATE_GO_FRAME, Bye, Channel,
                        ChannelClosed, ContractError, ErrorReply, Hello, Inspect, InspectReply, Message, NicConfig,
                        NicSaveOutcome, NvmeConfig, RestoreCompleted, RestoreState, RestoreStateRequest, Save, SaveOutcome,
                        SaveState, SaveStateAnswer, Shutdown, Start, Started, TransferStatus, decode, save_state_messages)
from ..log import kv
from ..memory import DmaError, DmaManager, GuestMemory, MemoryLayout, RestoreError, UnrestoredAllocations
from ..proto import underhill_pb2
from .device_kind import DeviceKind, PreviousState
from .mana_kind import ManaKind
from .nvme_kind import NvmeKind
from .nvme_manager import always_flr_from_env
from .options import KeepAliveConfig, WorkerOptions, effective_keepalive
from .servicing import (ServicingStateError, TestConfig, begin_servicing_state, decode_servicing_state,
                        finish_servicing_state, parse_test_config, reference_time, test_config_from_env)

log = logging.getLogger("vfkeep.worker")


def _ms(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1000, 3)


def _cpu_ms(t0: float) -> float:
    """CPU this process used since `process_time()` was `t0`, in the save and restore log lines: under a
    loaded machine the wall time says more about the load, this about the work."""
    return round((time.process_time() - t0) * 1000, 3)


DUMP_COLLECTION_S = 0.5
#: Exit status of a worker whose saved-state transfer broke (spec §2.5: fatal, never a truncated state).
EXIT_TRANSFER_FAILED = 3


class StateTransferError(Exception):
    """The host's saved-state responses broke the protocol (a header length that is not the payload's, an
    unexpected message or status): fatal for this worker."""


def _watchdog_fired(timeout_s: float) -> None:
    kv(log, logging.ERROR, "servicing watchdog fired: save did not finish in time", timeout_s=timeout_s)
    logging.shutdown()
    os._exit(71)


class Watchdog:
    """Spec §2.1: a thread that ends the worker at a save's deadline minus the dump-collection time rather than let
    the host wait forever. Started with the worker and armed per save: a thread started in the save (it was a
    `threading.Timer`) cost the save 0.1-0.25 ms under load before the relay stopped, and gave the GIL to the relay.
    `fire(timeout_s)` is called at the deadline (default: log, flush, exit 71)."""

    def __init__(self, fire=_watchdog_fired):
        self._fire = fire
        self._cond = threading.Condition()
        self._deadline: float | None = None
        self._timeout_s = 0.0
        threading.Thread(target=self._run, name="servicing-watchdog", daemon=True).start()

    def arm(self, timeout_s: float) -> None:
        with self._cond:
            self._timeout_s = timeout_s
            self._deadline = time.monotonic() + max(0.0, timeout_s - DUMP_COLLECTION_S)
            self._cond.notify()

    def disarm(self) -> None:
        with self._cond:
            self._deadline = None  # (the thread wakes at the old deadline once, finds none and waits again)

    def _run(self) -> None:
        with self._cond:
            while True:
                if self._deadline is None:
                    self._cond.wait()
                elif (remaining := self._deadline - time.monotonic()) > 0:
                    self._cond.wait(remaining)
                else:
                    self._deadline = None
                    self._fire(self._timeout_s)


class Worker:
    """One paravisor generation: the DMA manager and the device kinds, servicing save/restore."""

    def __init__(self, chan: Channel, mem: GuestMemory, nics: list[NicConfig], generation: int,
                 downlevel: bool, channel_layout: str, nvme: list[NvmeConfig] = (), block_layout: str | None = None):
        self.chan = chan
        self.mem = mem
        self.generation = generation
        self.downlevel = downlevel
        options = WorkerOptions.from_env(os.environ)
        if downlevel:  # built before MANA keepalive: the variable does not exist for it
            options = WorkerOptions(KeepAliveConfig.DISABLED, options.nvme_keepalive)
        self.options = options
        # DESIGN D7 (vfkeep option, not in OpenHCL): keep the vport data path across keepalive servicing.
        datapath_keepalive = not downlevel and os.environ.get(DATAPATH_KEEPALIVE_ENV) == "1"
        self.test_config = test_config_from_env(os.environ)
        self.prelaunched = os.environ.get(PRELAUNCHED_ENV) == "1"
        kill_points.arm_from_env(os.environ)
        self.dma: DmaManager | None = None
        self.mana = ManaKind(nics, mem, channel_layout, datapath_keepalive=datapath_keepalive)
        self.nvme = NvmeKind(list(nvme), mem, block_layout, always_flr=always_flr_from_env(os.environ))
        #: In the order of spec §3 steps 4-6 and §2.2 steps 3-5 (NVMe, then networking).
        self.kinds: list[DeviceKind] = [self.nvme, self.mana]
        names = [n for kind in self.kinds for n in kind.client_names()]
        if len(set(names)) != len(names):
            raise ValueError(f"device kinds share DMA client names: {sorted(names)}")
        self.restore_info: dict = {}
        #: (bytes, state, error) of the saved state decoded while waiting for the end of its transfer, else None.
        self._early_decode: tuple | None = None
        #: The decoded state whose restore `_prepare_ahead` prepared.
        self._prepared_for: underhill_pb2.ServicingState | None = None
        self.last_save_error: str | None = None
        self.watchdog = Watchdog()

    # -- start / restore (spec §3) ------------------------------------------------------------
    def start(self, msg: Start) -> Started:
        t_all, cpu = time.perf_counter(), time.process_time()
        phases: dict[str, float] = {}
        if self.test_config is TestConfig.SERVICING_RESTORE_STUCK:
            kv(log, logging.WARNING, "test hook: hanging before fetching the servicing state")
            threading.Event().wait()
        blob, state_error = None, None
        if msg.servicing:
            t = time.perf_counter()
            kill_points.reached("restore.before_state")
            self.send(RestoreStateRequest())
            kv(log, logging.INFO, "servicing state requested")
        for kind in self.kinds:  # before the state arrives: a prelaunched worker does this outside the window
            kind.prepare()
        # Step 2's DMA manager depends on nothing: built before the state arrives, restored after it (below).
        self.dma = DmaManager(self.mem)
        if msg.servicing:
            # The restore's lines are held until it is done (`serve` writes them before `started`), each stamped
            # when it was logged (`vlog.hold_lines`): formatting and writing the ten or so before the relay runs
            # took the new worker 20-60 us of CPU each, inside the guest's blackout.
            vlog.hold_lines()
            blob = self._fetch_servicing_state()
            kill_points.reached("restore.state_received")
            phases["fetch"] = _ms(t)
            kv(log, logging.INFO, "servicing state received", bytes=None if blob is None else len(blob))
            if blob is None:
                state_error = "host aborted the servicing state transfer"
                kv(log, logging.ERROR, "no servicing state, every NIC takes the fallback path", error=state_error)
        t = time.perf_counter()
        state = None
        if blob is not None:
            state, state_error = self._decode_state(blob)
            if state_error is not None:
                kv(log, logging.ERROR, "servicing state unusable, every NIC takes the fallback path", error=state_error)
        phases["decode"] = _ms(t)
        self._prepare_ahead(state)

        # Step 2: the DMA manager restores before any client exists.
        t = time.perf_counter()
        dma_error = None
        if state is not None and state.init_state.HasField("dma_manager_state"):
            try:
                self.dma.restore(state.init_state.dma_manager_state)
            except RestoreError as e:
                dma_error = f"dma manager restore failed: {e}"
                kv(log, logging.ERROR, "dma manager restore failed; saved NIC state cannot be re-attached",
                   error=str(e))
        phases["dma_restore"] = _ms(t)
        kill_points.reached("restore.dma_restored")

        # Steps 4-6: each device kind, once the DMA manager exists (its clients come after its restore).
        previous = PreviousState(state, state_error or dma_error)
        for kind in self.kinds:
            t = time.perf_counter()
            kind.configure(self.dma)
            kind.restore(previous, self._config(kind))
            phases[f"{kind.name}_restore"] = _ms(t)

        # Step 7: post-restore validation (DESIGN D3).
        t = time.perf_counter()
        error = None
        unclaimed = []
        try:
            unclaimed = self.dma.validate_restore()
        except UnrestoredAllocations as e:
            error = str(e)
            unclaimed = e.allocations
            kv(log, logging.ERROR, "strict pool validation failed", error=error)
        phases["validate"] = _ms(t)
        kill_points.reached("restore.validated")

        # Step 8: guest IO moves again, then the host is told how the restore went (spec §3 step 8, §2.5): not
        # before, where its wake-up took CPU from the relays' first passes, inside the guest's blackout.
        for kind in self.kinds:
            kind.start()
        if msg.servicing:
            status = TransferStatus.SUCCESS if error is None and state_error is None else TransferStatus.FAILURE
            self.send(RestoreCompleted(status))
        phases["total"] = _ms(t_all)
        self.restore_info = {"servicing_state_bytes": None if blob is None else len(blob),
                             "servicing_state_sha256": None if blob is None else hashlib.sha256(blob).hexdigest(),
                             "state_error": state_error, "dma_error": dma_error,
                             "unclaimed_pool_allocations": [u.to_json() for u in unclaimed], "phases_ms": phases}
        nics, disks = self.mana.reports(), self.nvme.reports()
        kv(log, logging.INFO, "worker started", nics=len(nics), paths=",".join(n.restore_path for n in nics),
           nvme=len(disks), nvme_paths=",".join(n.restore_path for n in disks), unclaimed=len(unclaimed),
           total_ms=phases["total"], cpu_ms=_cpu_ms(cpu))
        return Started(tuple(nics), tuple(unclaimed), error, phases, tuple(disks))

    def _prepare_ahead(self, state: underhill_pb2.ServicingState | None) -> None:
        """What the restore of `state` can do before the host's go, nothing of the state applied (the order of spec
        §3 holds): each device's attach sent (`_attach_ahead`) and the DMA manager's saved state checked
        (`DmaManager.prepare_restore`). Once per state: from the decode made while the host scrubbed, else after
        the go."""
        if state is None or state is self._prepared_for:
            return
        self._prepared_for = state
        self._attach_ahead(state)
        if state.init_state.HasField("dma_manager_state"):
            self.dma.prepare_restore(state.init_state.dma_manager_state)

    def _attach_ahead(self, state: underhill_pb2.ServicingState) -> None:
        """The devices the kinds will restore from `state` have their attach sent (`DeviceKind.attach_ahead`: no
        DMA client, nothing of the state applied): each device answers it while this worker waits for the end of
        the transfer or restores what comes before the device (the DMA manager, the kinds before it)."""
        for kind in self.kinds:
            kind.attach_ahead(state, self._config(kind))

    def _config(self, kind: DeviceKind) -> KeepAliveConfig:
        """The kind's keepalive option (`OPENHCL_<NAME>_KEEP_ALIVE`)."""
        return getattr(self.options, f"{kind.name}_keepalive")

    def _decode_state(self, blob: bytes) -> tuple[underhill_pb2.ServicingState | None, str | None]:
        """(the decoded state, None) or (None, why it is unusable); the decode made while the host scrubbed
        (`_fetch_servicing_state`) when it was of these same bytes."""
        early, self._early_decode = self._early_decode, None
        if early is not None and early[0] == blob:
            return early[1], early[2]
        try:
            return decode_servicing_state(blob, downlevel=self.downlevel), None
        except ServicingStateError as e:
            return None, str(e)

    def _fetch_servicing_state(self) -> bytes | None:
        """Spec §2.5, new side, once REQUEST_DATA went out: the host's responses until SUCCESS (the state) or
        FAILURE (aborted: None). Each header's length must equal its payload; anything else is StateTransferError.
        A host that sends the state ahead and its end (SUCCESS) once it has scrubbed worker RAM leaves this worker
        waiting between the two: it decodes what it has meanwhile and prepares that state's restore (`_prepare_ahead`;
        nothing is restored before the SUCCESS), and the restore uses that decode if the SUCCESS added no bytes (an
        attach that does not fit the final state is cancelled, a DMA state check not of the final state redone)."""
        parts: list[bytes] = []
        self._early_decode = None
        while True:
            if parts and self.chan.take(STATE_GO_FRAME):  # the go after the state went ahead: known by its bytes
                return b"".join(parts)
            try:
                msg = decode(self.chan.recv(), HOST_MESSAGES)
            except (ContractError, ValueError) as e:
                raise StateTransferError(f"unreadable saved-state response: {e}") from None
            if not isinstance(msg, RestoreState):
                raise StateTransferError(f"expected a saved-state response, got {msg.kind!r}")
            if msg.length != len(msg.payload):
                raise StateTransferError(f"saved-state response header says {msg.length} bytes, its payload has "
                                         f"{len(msg.payload)}")
            if msg.status is TransferStatus.FAILURE:
                return None
            if msg.status not in (TransferStatus.MORE_DATA, TransferStatus.SUCCESS):
                raise StateTransferError(f"saved-state response with status {msg.status.name}")
            parts.append(msg.payload)
            if msg.status is TransferStatus.SUCCESS:
                return b"".join(parts)
            if not self.chan.ready():
                blob = b"".join(parts)
                self._early_decode = (blob, *self._decode_state(blob))
                if self._early_decode[1] is not None:
                    self._prepare_ahead(self._early_decode[1])
                    self._settle_ahead()

    def _settle_ahead(self) -> None:
        """Until the host's next message (its go, mostly): the devices' answers to the attaches sent ahead read as
        they come, each attach finished once all of its answers are in (`DeviceKind.settle_ahead`)."""
        waiting = [fd for kind in self.kinds for fd in kind.settle_ahead()]
        while waiting and not self.chan.ready():
            select.select([self.chan, *waiting], [], [])
            waiting = [fd for kind in self.kinds for fd in kind.settle_ahead()]

    # -- save (spec §2.2-2.4) -----------------------------------------------------------------
    def save(self, msg: Save) -> bool:
        """Save and hand the state to the host (spec §2.3 step 5, §2.5) under the watchdog (§2.1). True when the
        host kept it (the worker must now exit); False after a failed save (reported; the worker goes on)."""
        hook = parse_test_config(msg.test_config, "save request") or self.test_config
        if msg.kill_point is not None:
            kill_points.arm(msg.kill_point)
        kill_points.reached("save.requested")
        if hook is TestConfig.SERVICING_SAVE_STUCK:
            kv(log, logging.WARNING, "test hook: save stuck")
            threading.Event().wait()
        self.watchdog.arm(msg.timeout_s)
        # The save's lines are written once this worker is done: at its exit after a kept state (it idles while
        # the next worker restores), else when the failed save returns (`vlog.hold_lines`: formatting and writing
        # them took the old worker 30-40 us of CPU each under load, half a dozen inside the blackout).
        vlog.hold_lines()
        kept = False
        try:
            result = self._save(msg, hook)
            if isinstance(result, SaveState):  # failed: one FAILURE message, no answer comes
                self.send(result)
                return False
            blob, outcomes, phases = result
            for chunk in save_state_messages(blob, outcomes[self.mana.name], phases, outcomes[self.nvme.name]):
                self.send(chunk)
            kill_points.reached("save.state_sent")
            answer = self._save_answer()
            if answer is TransferStatus.SUCCESS:
                kill_points.reached("save.answered")
                kept = True
                return True
            self.send(self._save_failed(f"host did not take the servicing state ({answer.name})", outcomes))
            return False
        finally:
            self.watchdog.disarm()
            if not kept:
                vlog.write_held_lines()

    def _save_answer(self) -> TransferStatus:
        """The host's one answer to the last chunk; anything but a SUCCESS answer counts as FAILURE."""
        try:
            msg = decode(self.chan.recv(), HOST_MESSAGES)
        except (ContractError, ValueError) as e:
            kv(log, logging.ERROR, "unreadable answer to the servicing state", error=str(e))
            return TransferStatus.FAILURE
        if not isinstance(msg, SaveStateAnswer):
            kv(log, logging.ERROR, "expected the host's answer to the servicing state", got=msg.kind)
            return TransferStatus.FAILURE
        return TransferStatus.SUCCESS if msg.status is TransferStatus.SUCCESS else TransferStatus.FAILURE

    def _save(self, msg: Save, hook: TestConfig | None) -> tuple[bytes, dict, dict] | SaveState:
        """The save itself: (blob, outcomes per kind name, phases), or the FAILURE message after a failed save."""
        t_all, cpu = time.perf_counter(), time.process_time()
        phases: dict[str, float] = {}
        eff = effective_keepalive(self.options, host_mana=msg.mana_keepalive, host_nvme=msg.nvme_keepalive,
                                  pool_present=self.dma.has_pool)
        kv(log, logging.INFO, "save requested", capabilities=hex(msg.capabilities),
           timeout_hint_s=msg.timeout_hint_s, effective_mana=eff.mana, effective_nvme=eff.nvme)
        # 1: emulation-platform state, before NICs are torn down: with the rest of the top-level state that needs
        # no device stopped (its ids, the VM stop time), made while the relays still run (not in the blackout).
        state = underhill_pb2.ServicingState()
        begin_servicing_state(state, nics=self.mana.emuplat(), correlation_id=msg.correlation_id,
                              vm_stop_reference_time=reference_time())

        t = time.perf_counter()
        for kind in self.kinds:
            kind.stop()
        phases["stop_io"] = _ms(t)
        kill_points.reached("save.io_stopped")

        # 2: DMA manager state before any device's, only when a keepalive mode is effective.
        t = time.perf_counter()
        try:
            dma_state = self.dma.save() if eff.any else None
        except DmaError as e:  # e.g. allocations still pending after a strict validation failure
            return self._save_failed(f"dma manager save failed: {e}", {})
        phases["dma_save"] = _ms(t)
        kill_points.reached("save.dma_saved")
        # 3, 5: the device kinds (destructive), each saved only under its effective keepalive.
        outcomes: dict[str, list] = {}
        for kind in self.kinds:
            t = time.perf_counter()
            outcomes[kind.name] = kind.save(getattr(eff, kind.name), state)
            phases[f"{kind.name}_save"] = _ms(t)
        kill_points.reached("save.devices_saved")

        if hook is TestConfig.SERVICING_SAVE_CRASH:
            kv(log, logging.WARNING, "test hook: crashing after the drivers were saved")
            logging.shutdown()
            os._exit(70)
        if hook is TestConfig.SERVICING_SAVE_FAIL:
            return self._save_failed("test hook SERVICING_SAVE_FAIL after the inner save succeeded", outcomes)

        t = time.perf_counter()
        for h in logging.getLogger().handlers:
            h.flush()
        flush_us = int((time.perf_counter() - t) * 1e6)
        finish_servicing_state(state, dma_state=dma_state, flush_logs_us=flush_us)
        blob = state.SerializeToString()
        phases["total"] = _ms(t_all)
        init = state.init_state
        kv(log, logging.INFO, "servicing state saved", bytes=len(blob), dma_state=dma_state is not None,
           mana_states=len(init.mana_state.states) if init.HasField("mana_state") else -1,
           nvme_disks=len(init.nvme_state.nvme_state.nvme_disks) if init.HasField("nvme_state") else -1,
           total_ms=phases["total"], cpu_ms=_cpu_ms(cpu))
        return blob, outcomes, phases

    def _save_failed(self, error: str, outcomes: dict[str, list[NicSaveOutcome]]) -> SaveState:
        """Spec §2.4 keeps the worker running but leaves saved drivers dead (E5); vfkeep revives them
        through the fresh path instead (DESIGN D4), and keepalive stays allowed for later requests (D5)."""
        kv(log, logging.ERROR, "servicing save failed, reviving NICs", error=error)
        self.last_save_error = error
        for kind in self.kinds:
            kind.revive()
        for kind in self.kinds:
            kind.start()
        return SaveState(TransferStatus.FAILURE, nics=tuple(outcomes.get(self.mana.name, ())), error=error,
                         revived=tuple(self.mana.reports()), nvme=tuple(outcomes.get(self.nvme.name, ())),
                         revived_nvme=tuple(self.nvme.reports()))

    def _exit_after_save(self) -> None:
        """The host has the state: do nothing (spec §2.3 step 5) until the host closes the channel, then exit
        without closing device handles or running finalizers: kept devices must not see a teardown (the VFIO
        handle is "leaked" as in spec §5.2). Exiting at once would spend the CPU a process exit takes while
        the next worker restores on the same CPUs, inside the guest's blackout; the host ends this worker once
        the next one runs."""
        for kind in self.kinds:
            kind.handed_over()
        kv(log, logging.DEBUG, "state handed over, idle until the host ends this worker")
        try:
            while True:
                self.chan.recv()  # nothing is expected; anything the host still sends is ignored
        except (ChannelClosed, ValueError, OSError):
            pass
        kv(log, logging.INFO, "exiting after save")
        logging.shutdown()
        os._exit(0)

    def _warm_save_path(self) -> None:
        """The save's steps that change nothing, once, their results dropped, after `started` (outside any
        blackout): a worker saves once, inside the next servicing's blackout, and there each of these cost two to
        four times more as the first call in the process (the DMA manager's slot table, each MANA device's state
        with its kept vports' queues, the top-level state and its encoding, the save messages and their framing:
        0.3-0.5 ms of the old worker's CPU after its relay stopped, under load)."""
        try:
            try:
                dma_state = self.dma.save() if self.dma is not None and self.dma.has_pool else None
            except DmaError:  # (a slot still pending restore: the save refuses it too)
                dma_state = None
            state = underhill_pb2.ServicingState()
            begin_servicing_state(state, nics=self.mana.emuplat(), correlation_id=str(uuid.uuid4()),
                                  vm_stop_reference_time=reference_time())
            if not self.downlevel:
                self.mana.rehearse_save(state)
            finish_servicing_state(state, dma_state=dma_state, flush_logs_us=0)
            nics, disks = ([NicSaveOutcome(n.pci_id, SaveOutcome.SAVED, None, {}) for n in kind.reports()]
                           for kind in (self.mana, self.nvme))
            for msg in save_state_messages(state.SerializeToString(), nics, {"total": 0.0}, disks):
                Channel.frame(msg.to_json())
        except Exception as e:  # noqa: BLE001 - a rehearsal: the save itself reports what fails there
            kv(log, logging.WARNING, "warming the save path failed", error=f"{type(e).__name__}: {e}")

    def rehearse_restore(self) -> None:
        """A prelaunched worker with data-path keepalive runs the kept-vport servicing once on scratch things before
        it says hello (`rehearse_kept_restore`; seconds before the state comes, outside any blackout, kill points
        off): its one real restore is then not the first run of that code in the process. A failure is one warning;
        nothing else changes."""
        if not (self.prelaunched and self.mana.datapath_keepalive and self.options.mana_keepalive.is_enabled
                and self.mana.nic_configs):
            return
        from . import rehearsal  # (here: its MANA emulator is 0.1 s of imports a worker that does not rehearse,
        #                           a replacement started inside the blackout among them, must not pay)
        t = time.perf_counter()
        try:
            with kill_points.disarmed():
                rehearsal.rehearse_kept_restore()
        except Exception as e:  # noqa: BLE001 - a rehearsal: the restore itself reports what fails there
            kv(log, logging.WARNING, "rehearsing the kept-vport restore failed", error=f"{type(e).__name__}: {e}")
            return
        kv(log, logging.DEBUG, "kept-vport restore rehearsed", ms=_ms(t))

    # -- other requests -----------------------------------------------------------------------
    def inspect(self) -> dict:
        return {
            "pid": os.getpid(), "version": __version__, "compat": "downlevel" if self.downlevel else "current",
            "generation": self.generation,
            "keepalive": {"mana": self.options.mana_keepalive.canonical,
                          "nvme": self.options.nvme_keepalive.canonical},
            "test_config": self.test_config.value if self.test_config else None,
            **(self.dma.inspect() if self.dma else {"pool": None, "worker_ram": None}),
            **{key: value for kind in self.kinds for key, value in kind.inspect().items()},
            "restore": self.restore_info,
            "last_save_error": self.last_save_error,
        }

    def shutdown(self) -> None:
        for kind in self.kinds:
            kind.shutdown()

    def hello(self) -> Hello:
        return Hello(os.getpid(), __version__, "downlevel" if self.downlevel else "current", self.generation,
                     {"mana": self.options.mana_keepalive.canonical, "nvme": self.options.nvme_keepalive.canonical})

    def send(self, msg: Message) -> None:
        self.chan.send(msg.to_json())

    def serve(self) -> int:
        self.send(self.hello())
        try:
            while True:
                data = self.chan.recv()
                try:
                    msg = decode(data, HOST_MESSAGES)
                except ContractError as e:
                    self.send(ErrorReply(str(e)))
                    continue
                if isinstance(msg, Start) and self.dma is None:
                    try:
                        started = self.start(msg)
                    except StateTransferError as e:
                        kv(log, logging.CRITICAL, "servicing state transfer failed", error=str(e))
                        return EXIT_TRANSFER_FAILED
                    vlog.write_held_lines()  # (before `started`: whoever reads this log after it finds them)
                    self.send(started)
                    self._warm_save_path()
                    kill_points.reached("restore.started")
                    # A restore point the restore did not reach (a kept vport opens no vport: `restore.vport`) is
                    # over: run-time re-creations (hot-add, EQE 135) pass the same code and must not die there.
                    kill_points.arm(None)
                elif isinstance(msg, Save) and self.dma is not None:
                    if self.save(msg):
                        self._exit_after_save()
                elif isinstance(msg, Inspect):
                    self.send(InspectReply(self.inspect()))
                elif isinstance(msg, Shutdown):
                    self.shutdown()
                    kv(log, logging.INFO, "normal shutdown done")  # before "bye": the host ends us once it has it
                    self.send(Bye())
                    return 0
                else:
                    self.send(ErrorReply(f"unexpected message {msg.kind!r} in this state"))
        except ChannelClosed:
            kv(log, logging.WARNING, "host closed the channel, exiting")
            return 1


@click.command("worker")
@click.option("--run-dir", required=True, type=click.Path(file_okay=False))
@click.option("--generation", type=int, default=0, show_default=True)
@click.option("--channel-fd", type=int, required=True, help="host channel socket (inherited)")
@click.option("--memfd", type=int, required=True, help="guest memory file (inherited)")
@click.option("--memory-layout", required=True, help="guest=N,worker=N,pool=N")
@click.option("--channel-layout", default=None, help="nics=N,slots=N,slot_size=N,base=GPA (with NICs)")
@click.option("--nic", "nics", multiple=True, help="INDEX,PCI_ID,SOCKET,TX_EVENTFD,RX_EVENTFD (repeat per NIC)")
@click.option("--nvme", "nvme", multiple=True,
              help="INDEX,PCI_ID,SOCKET[,REQUEST_EVENTFD,COMPLETION_EVENTFD] (repeat per NVMe controller; the "
                   "eventfds: the guest block channel of disk INDEX)")
@click.option("--block-layout", default=None, help="disks=N,slots=N,data_pages=N,base=GPA (with block channels)")
@click.option("--compat", type=click.Choice(["current", "downlevel"]), default="current", show_default=True,
              help="downlevel: behave like a worker built before MANA keepalive")
def worker_command(run_dir, generation, channel_fd, memfd, memory_layout, channel_layout, nics, nvme, block_layout,
                   compat):
    """Paravisor worker process (started by `vfkeep run`)."""
    vlog.setup(f"worker-{generation}", run_dir)
    try:
        configs = [NicConfig.parse(text) for text in nics]
        disks = [NvmeConfig.parse(text) for text in nvme]
        mem = GuestMemory.attach(memfd, MemoryLayout.from_str(memory_layout), populate=True)
        worker = Worker(Channel.from_fd(channel_fd), mem, configs, generation, compat == "downlevel", channel_layout,
                        disks, block_layout)
    except ValueError as e:
        kv(log, logging.ERROR, "bad worker arguments", error=str(e))
        raise click.BadParameter(str(e)) from e
    kv(log, logging.INFO, "worker up", generation=generation, compat=compat, nics=len(configs), nvme=len(disks),
       pid=os.getpid())
    worker.rehearse_restore()
    vlog.cache_levels()
    proc.freeze_heap()
    try:
        code = worker.serve()
    except Exception:
        log.critical("worker crashed", exc_info=True)
        raise
    sys.exit(code)
