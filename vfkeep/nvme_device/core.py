"""`NvmeController`: the NVMe emulator's state and behaviour, independent of the transport.

The core is given `dma` (`view(iova, n)` raising `errors.DmaError` outside
the mapped ranges, and optionally `available`: False while no driver has
memory mapped), `irq` (`trigger(vector)`) and `loop` (`call_later(delay_s,
cb)`; needed only for modelled latencies and IO delay faults). BAR0 is
`read(offset, size)` / `write(offset, data)`. It imports nothing from the
vfio-user package.

Controller state machine (spec nvme.md §2.6): CC.EN 0→1 starts the admin
queue from AQA/ASQ/ACQ and CSTS.RDY becomes 1 on the first CSTS read at
least `enable_ms` later; CC.EN 1→0 with RDY=1 stops every queue (in-flight
IO is carried out, its completions dropped) and the reset finishes on the
first CSTS read `disable_ms` later (CSTS, CC, INTMS and doorbells cleared;
AQA/ASQ/ACQ kept). vfkeep departure: EN 1→0 while RDY=0 (an enable not yet
visible, or a fatal CFS) resets at once instead of being ignored, so a
driver's reset never leaves the controller enabling behind its back.

Keepalive (`reset_method` "none"): a driver disconnect changes nothing —
queues, outstanding AERs, fetched and delayed IO stay. Work that needs DMA
while no driver has memory mapped (a delayed completion firing during the
handover) is parked and runs, in order, on the first BAR0 access after the
next driver connected: a real device keeps its IOMMU mappings across a
keepalive servicing, vfio-user drops them with the connection. "flr" wipes
the controller (`flr()`, called by the adapter on disconnect or
DEVICE_RESET); the namespaces' data is never touched.

Timing (DESIGN D9): every modelled cost is a declared parameter — enable
time (CC.EN 0→1 until RDY), disable time (EN 1→0 until RDY=0), FLR time and
per-admin-command latency — counted in `modelled_*_ms_total` counters so
tests need no wall clock. No public source gives these for the Azure NVMe
controller; the presets are conveniences, not claims.
"""
from __future__ import annotations

import logging
import struct
import time
from dataclasses import asdict, dataclass, replace

from vfkeep.nvme import (CAP_TO_500MS, CQE_SIZE, DOORBELL_BASE, IO_DEPTH_PER_SQ, IOCQES,
                         IOSQES, MAX_QES, NVME_VERSION, REG_ACQ, REG_AQA, REG_ASQ, REG_BPINFO,
                         REG_BPRSEL, REG_CAP, REG_CC, REG_CMBLOC, REG_CMBSZ, REG_CSTS, REG_INTMC, REG_INTMS,
                         REG_NSSR, REG_RSVD, REG_VS, REGS_64, SHST_COMPLETE, SQE_SIZE, AdminOpcode, Aqa, Cap, Cc,
                         Command, Csts, admin_name, status_field, status_name)

from . import admin, nvm
from .errors import DmaError, RegisterAccessError
from .faults import AdminFaults, CommandLog
from .namespace import Namespace
from .prp import PrpError, prp_segments
from .queues import Cq, Sq

log = logging.getLogger("vfkeep.nvme_device")

RESET_METHODS = ("none", "flr")


@dataclass(frozen=True)
class Timing:
    enable_ms: float = 0.0
    disable_ms: float = 0.0
    flr_ms: float = 0.0
    admin_ms: float = 0.0

    @property
    def preset(self) -> str:
        """The preset these values equal, else "custom" (as the MANA device's `DeviceTiming`)."""
        return next((name for name, t in TIMINGS.items() if t == self), "custom")

    def to_dict(self) -> dict:
        """The `timing` object the controller reports: the same `preset` key as every other timing object."""
        return {"preset": self.preset, **asdict(self)}


TIMINGS = {
    "natural": Timing(),
    # Conveniences, not claims (DESIGN D9): an enable that costs about what a fresh MANA bring-up does,
    # Linux's 100 ms FLR wait, and a millisecond per admin command.
    "realistic": Timing(enable_ms=100.0, disable_ms=20.0, flr_ms=100.0, admin_ms=1.0),
}


def make_timing(preset: str = "natural", **overrides: float | None) -> Timing:
    """A preset with any of enable_ms/disable_ms/flr_ms/admin_ms overridden (None = keep the preset's)."""
    if preset not in TIMINGS:
        raise ValueError(f"timing preset must be one of {', '.join(TIMINGS)}, got {preset!r}")
    given = {k: float(v) for k, v in overrides.items() if v is not None}
    for k, v in given.items():
        if v < 0:
            raise ValueError(f"{k} must be >= 0, got {v}")
    return replace(TIMINGS[preset], **given)


COUNTERS = (
    "reset_count", "enables", "disables", "modelled_enable_ms_total", "modelled_disable_ms_total",
    "modelled_flr_ms_total", "modelled_admin_ms_total",
    "admin_commands", "admin_errors", "injected_faults", "aens_posted",
    "io_commands", "io_errors", "reads", "writes", "flushes", "dsms", "bytes_read", "bytes_written", "disk_errors",
    "cqes_posted", "cq_full_waits", "interrupts", "dma_faults", "parked", "bad_doorbells", "ignored_doorbells",
    "bad_register_accesses", "queue_failures", "completions_dropped",
)


class _Io:
    """One fetched IO command until its completion is posted."""

    __slots__ = ("sq", "cmd", "generation")

    def __init__(self, sq: Sq, cmd: Command, generation: int):
        self.sq, self.cmd, self.generation = sq, cmd, generation


class NvmeController:
    def __init__(self, dma, irq, loop=None, *, namespaces: list[Namespace], msix_count: int = 16,
                 max_io_queues: int = 16, timing: Timing | str = "natural", reset_method: str = "none",
                 name: str = "nvme0"):
        if not 1 <= msix_count <= 2048 or not 1 <= max_io_queues <= 65534:
            raise ValueError(f"msix_count {msix_count} / max_io_queues {max_io_queues} out of range")
        self.dma, self.irq, self.loop, self.name = dma, irq, loop, name
        self.timing = make_timing(timing) if isinstance(timing, str) else timing
        self.reset_method = reset_method
        self.namespaces = {ns.nsid: ns for ns in namespaces}
        self.msix_count = msix_count
        self.max_io_queues = max_io_queues
        self.identify_controller = admin.identify_controller()
        self.cap = Cap(mqes=MAX_QES - 1, cqr=1, to_500ms=CAP_TO_500MS, css=1).to_int()
        self.counters: dict[str, int | float] = dict.fromkeys(COUNTERS, 0)
        self.command_log = CommandLog()
        self.faults = AdminFaults()
        self.io_delay_ms = 0.0
        self.io_stalled = False
        self.removed = False
        self.epoch = 0
        self.connected = False
        self.generation = 0  # bumped whenever queues are torn down: late timers of older work do nothing
        self._parked: list = []
        self._catch_up = False
        self._accessed_epoch = -1  # connection epoch of the last BAR0 access (see `_dma_ok`)
        self._power_on()

    @property
    def reset_method(self) -> str:
        """"none" or "flr": this controller is the one owner (and check) of its reset method."""
        return self._reset_method

    @reset_method.setter
    def reset_method(self, value: str) -> None:
        if value not in RESET_METHODS:
            raise ValueError(f"reset method must be one of {RESET_METHODS}, got {value!r}")
        self._reset_method = value

    # -- power-on / reset ---------------------------------------------------------------------

    def _power_on(self) -> None:
        self.cc = 0
        self.csts = 0
        self.intms = 0
        self.aqa = self.asq = self.acq = 0
        self._drop_queues()
        self.features: dict[int, int] = {}
        self.granted_queues: int | None = None
        self.changed_namespaces: set[int] = set()
        self.ns_aen_masked = False
        self.pending_aens: list[int] = []

    def _drop_queues(self) -> None:
        self.generation += 1
        self.sqs: dict[int, Sq] = {}
        self.cqs: dict[int, Cq] = {}
        self.doorbells = [0] * (2 * (self.max_io_queues + 1))
        self.aers: list[tuple[int, dict]] = []  # (cid, command-log entry) of outstanding AERs, oldest first
        self.admin_busy = False
        self.stalled: list[_Io] = []  # fetched while the "stop completing" fault is on
        self.delayed: set[_Io] = set()  # waiting for the IO delay fault's timer
        self.enable_at: float | None = None
        self.reset_at: float | None = None
        self._parked.clear()
        self._catch_up = False  # some queue work waits for the driver's memory

    def flr(self, reason: str) -> None:
        """Function-level reset: power-on state after the modelled FLR time. Counters, the command log,
        fault rules, surprise removal and the namespaces' data survive (they are not the function's)."""
        self.counters["reset_count"] += 1
        self.counters["modelled_flr_ms_total"] += self.timing.flr_ms
        self.command_log.add("flr", "FLR", self.epoch, reason=reason, modelled_ms=self.timing.flr_ms)
        if self.timing.flr_ms:
            time.sleep(self.timing.flr_ms / 1000)
        self._power_on()

    def client_connected(self, epoch: int) -> None:
        self.epoch, self.connected = epoch, True
        self.command_log.add("event", "CONNECT", epoch)

    def client_disconnected(self) -> None:
        self.connected = False
        self.command_log.add("event", "DISCONNECT", self.epoch, outstanding_aers=len(self.aers),
                             inflight=sum(sq.inflight for sq in self.sqs.values()))

    # -- BAR0 ---------------------------------------------------------------------------------
    def read(self, offset: int, size: int) -> bytes:
        if self.removed:
            return b"\xff" * size
        self._check_access(offset, size, write=False)
        self._accessed_epoch = self.epoch
        self._resume_parked()
        base = offset & ~7 if offset & ~7 in REGS_64 else offset
        value = self._read_reg(base)
        if size == 4 and base != offset:
            value >>= 32
        return (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")

    def write(self, offset: int, data: bytes) -> None:
        if self.removed:
            return
        self._check_access(offset, len(data), write=True)
        self._accessed_epoch = self.epoch
        self._resume_parked()
        value = int.from_bytes(data, "little")
        if offset >= DOORBELL_BASE:
            self._doorbell((offset - DOORBELL_BASE) // 4, value)
        elif offset == REG_CC:
            self._write_cc(value)
        elif offset == REG_INTMS:
            self.intms |= value
        elif offset == REG_INTMC:
            self.intms &= ~value
        elif offset == REG_AQA:
            self.aqa = value
        else:  # ASQ / ACQ, whole or one half; ignored while enabled
            if Cc.from_int(self.cc).en:
                return
            base = offset & ~7
            old = self.asq if base == REG_ASQ else self.acq
            if len(data) == 4:
                shift = 32 if offset != base else 0
                value = (old & ~(0xFFFFFFFF << shift)) | (value << shift)
            value &= ~0xFFF & ((1 << 64) - 1)
            if base == REG_ASQ:
                self.asq = value
            else:
                self.acq = value

    def _check_access(self, offset: int, size: int, write: bool) -> None:
        def refuse(why: str) -> None:
            self.counters["bad_register_accesses"] += 1
            raise RegisterAccessError(f"BAR0 {'write' if write else 'read'} of {size} bytes at {offset:#x}: {why}")

        if size not in (4, 8) or offset % size:
            refuse("accesses must be 4 or 8 bytes, naturally aligned")
        if offset >= DOORBELL_BASE:
            if size != 4 or not write:
                refuse("doorbells take 4-byte writes only")
            if (offset - DOORBELL_BASE) // 4 >= len(self.doorbells):
                refuse(f"doorbell beyond the {len(self.doorbells)} doorbell slots")
            return
        base = offset & ~7
        if base in REGS_64 and offset in (base, base + 4):
            if size == 8 and offset != base:
                refuse("8-byte access to the upper half of a 64-bit register")
        elif size != 4 or offset not in (REG_VS, REG_INTMS, REG_INTMC, REG_CC, REG_RSVD, REG_CSTS, REG_NSSR, REG_AQA,
                                         REG_CMBLOC, REG_CMBSZ, REG_BPINFO, REG_BPRSEL):
            refuse("no such register")
        if write and base not in (REG_ASQ, REG_ACQ) and offset not in (REG_INTMS, REG_INTMC, REG_CC, REG_AQA):
            refuse("register is read-only")

    def _read_reg(self, offset: int) -> int:
        if offset == REG_CAP:
            return self.cap
        if offset == REG_VS:
            return NVME_VERSION
        if offset in (REG_INTMS, REG_INTMC):
            return self.intms
        if offset == REG_CC:
            return self.cc
        if offset == REG_CSTS:
            self._advance()
            return self.csts
        if offset == REG_AQA:
            return self.aqa
        if offset == REG_ASQ:
            return self.asq
        if offset == REG_ACQ:
            return self.acq
        return 0  # reserved, NSSR, CMB and boot-partition registers

    def _advance(self) -> None:
        """A CSTS read makes a finished enable or reset visible (spec §2.6)."""
        now = time.monotonic()
        csts = Csts.from_int(self.csts)
        if self.enable_at is not None and now >= self.enable_at:
            self.enable_at = None
            csts.rdy = 1
            self.csts = csts.to_int()
            self.command_log.add("register", "READY", self.epoch)
            self._kick(self.sqs.get(0))
        elif self.reset_at is not None and now >= self.reset_at:
            self.reset_at = None
            self.csts = self.cc = self.intms = 0
            self.doorbells = [0] * len(self.doorbells)
            self.command_log.add("register", "RESET_DONE", self.epoch)

    def _write_cc(self, value: int) -> None:
        new, old = Cc.from_int(value), Cc.from_int(self.cc)
        csts = Csts.from_int(self.csts)
        if new.shn:
            csts.shst = SHST_COMPLETE
        if new.en and not old.en:
            if csts.rdy:
                self.command_log.add("register", "CC_ENABLE", self.epoch, value=f"{value:#x}",
                                     ignored="enabling during reset")
                return
            if new.css or new.mps or 2 <= new.ams <= 6:
                csts.cfs = 1
            new.iosqes = new.iosqes or IOSQES
            new.iocqes = new.iocqes or IOCQES
            if new.iosqes != IOSQES or new.iocqes != IOCQES:
                csts.cfs = 1
            if not new.shn:
                csts.shst = 0
            self.cc = Cc(en=1, shn=new.shn, iosqes=new.iosqes, iocqes=new.iocqes).to_int()
            self.csts = csts.to_int()
            self.counters["enables"] += 1
            self.command_log.add("register", "CC_ENABLE", self.epoch, value=f"{value:#x}", cfs=csts.cfs,
                                 modelled_ms=self.timing.enable_ms)
            if not csts.cfs:
                self._start_admin()
        elif old.en and not new.en:
            self.counters["disables"] += 1
            self.command_log.add("register", "CC_DISABLE", self.epoch, value=f"{value:#x}", ready=csts.rdy,
                                 modelled_ms=self.timing.disable_ms if csts.rdy else 0)
            self._stop_queues()
            if csts.rdy:
                self.counters["modelled_disable_ms_total"] += self.timing.disable_ms
                self.cc = Cc(shn=new.shn, iosqes=old.iosqes, iocqes=old.iocqes).to_int()
                self.reset_at = time.monotonic() + self.timing.disable_ms / 1000
                self.csts = csts.to_int()
            else:  # nothing visible was running: reset at once (see module docstring)
                self.csts = self.cc = self.intms = 0
                self.doorbells = [0] * len(self.doorbells)
        else:
            self.cc = Cc(en=old.en, shn=new.shn, iosqes=old.iosqes, iocqes=old.iocqes).to_int()
            self.csts = csts.to_int()

    def _start_admin(self) -> None:
        aqa = Aqa.from_int(self.aqa)
        self.cqs[0] = Cq(0, self.acq, max(aqa.acqs, 1) + 1, iv=0, ien=True)
        self.sqs[0] = Sq(0, self.asq, max(aqa.asqs, 1) + 1, cqid=0)
        self.counters["modelled_enable_ms_total"] += self.timing.enable_ms
        self.enable_at = time.monotonic() + self.timing.enable_ms / 1000

    def _stop_queues(self) -> None:
        """Controller reset: every queue stops; fetched IO is carried out, its completions dropped."""
        inflight = self.stalled + list(self.delayed)
        for op in inflight:
            if self._dma_ok():
                nvm.execute(self, op.cmd)
        dropped = sum(len(cq.overflow) for cq in self.cqs.values()) + len(inflight)
        self.counters["completions_dropped"] += dropped
        self._drop_queues()

    # -- doorbells and queues -----------------------------------------------------------------
    def _doorbell(self, index: int, value: int) -> None:
        qid, is_cq = divmod(index, 2)
        queue = (self.cqs if is_cq else self.sqs).get(qid)
        if queue is None or not Csts.from_int(self.csts).rdy:
            self.doorbells[index] = value
            self.counters["ignored_doorbells"] += 1
            return
        if value >= queue.size:
            self.counters["bad_doorbells"] += 1
            self._fail_queue(queue, f"doorbell value {value} >= queue size {queue.size}")
            return
        self.doorbells[index] = value
        if is_cq:
            self._flush(queue)
            for sq in list(self.sqs.values()):
                if sq.cqid == qid:
                    self._kick(sq)
        else:
            self._kick(queue)

    def _fail_queue(self, queue: Sq | Cq, why: str) -> None:
        queue.failed = why
        self.counters["queue_failures"] += 1
        kind = "CQ" if isinstance(queue, Cq) else "SQ"
        what = "admin queue failure" if queue.qid == 0 else "io handler failed"
        self.command_log.add("event", "QUEUE_FAILED", self.epoch, queue=f"{kind}{queue.qid}", reason=why,
                             what=what)

    def _dma_ok(self) -> bool:
        """The driver's memory is reachable: a driver is attached with memory mapped (`dma.available`) and
        has touched BAR0 in this connection. A driver maps all its memory before its first register
        access, so work due while it is still mapping (a delayed completion firing between two DMA_MAPs)
        waits instead of faulting on a CQ that is not mapped yet."""
        return self._accessed_epoch == self.epoch and getattr(self.dma, "available", True)

    def _park(self, fn) -> None:
        self.counters["parked"] += 1
        self._parked.append(fn)
        self._catch_up = True

    def _resume_parked(self) -> None:
        """Run what waited for the driver's memory, then catch up on every queue (module docstring)."""
        if not self._catch_up or not self._dma_ok():
            return
        self._catch_up = False
        parked, self._parked = self._parked, []
        for fn in parked:
            fn()
        for cq in list(self.cqs.values()):
            self._flush(cq)
        for sq in list(self.sqs.values()):
            self._kick(sq)

    def _kick(self, sq: Sq | None) -> None:
        """Fetch what the driver queued on `sq`: admin one at a time, IO up to 8 in flight (§16)."""
        if sq is None or sq.failed or self.removed or not Csts.from_int(self.csts).rdy:
            return
        if not self._dma_ok():
            self._catch_up = True
            return
        tail = self.doorbells[2 * sq.qid]
        while sq.head != tail and self.sqs.get(sq.qid) is sq and not sq.failed:
            if sq.qid == 0 and self.admin_busy or sq.qid and sq.inflight >= IO_DEPTH_PER_SQ:
                return
            try:
                raw = self.dma.view(sq.base + sq.head * SQE_SIZE, SQE_SIZE)
                cmd = Command.from_buffer_copy(raw)
            except DmaError as e:
                self.counters["dma_faults"] += 1
                self._fail_queue(sq, f"SQ entry not readable: {e}")
                return
            sq.head = (sq.head + 1) % sq.size
            if sq.qid == 0:
                self._admin_start(cmd)
            else:
                self._io_start(sq, cmd)

    # -- admin ----------------------------------------------------------------------------------
    def _admin_start(self, cmd: Command) -> None:
        self.counters["admin_commands"] += 1
        opcode = cmd.opcode
        entry = self.command_log.add("admin", admin_name(opcode), self.epoch, opcode=opcode, cid=cmd.cid,
                                     nsid=cmd.nsid, cdw10=cmd.cdw10, cdw11=cmd.cdw11, status=None, injected=False)
        rule = self.faults.match(opcode, cmd.cdw10, self.epoch)
        delay_ms = self.timing.admin_ms
        if rule is not None:
            self.counters["injected_faults"] += 1
            entry["injected"] = rule.action
            if rule.action == "drop":
                entry["status"] = "dropped"
                return
            if rule.action == "fail":
                self._admin_done(cmd, entry, (rule.status, 0))
                return
            delay_ms += rule.ms
        if delay_ms and self.loop is not None:
            self.counters["modelled_admin_ms_total"] += self.timing.admin_ms
            self.admin_busy = True
            generation = self.generation
            self.loop.call_later(delay_ms / 1000, lambda: self._admin_finish(cmd, entry, generation))
        else:
            self._admin_done(cmd, entry, admin.execute(self, cmd))

    def _admin_finish(self, cmd: Command, entry: dict, generation: int) -> None:
        if generation != self.generation:
            entry["status"] = "dropped by reset"
            return
        if not self._dma_ok():
            self._park(lambda: self._admin_finish(cmd, entry, generation))
            return
        self.admin_busy = False
        self._admin_done(cmd, entry, admin.execute(self, cmd))
        self._kick(self.sqs.get(0))

    def _admin_done(self, cmd: Command, entry: dict, result: tuple[int, int] | None) -> None:
        if result is None:  # an AER the controller now holds
            self.aers.append((cmd.cid, entry))
            return
        status, dw0 = result
        entry["status"] = status
        entry["dw0"] = dw0
        if status:
            self.counters["admin_errors"] += 1
            entry["status_name"] = status_name(status)
        self._complete(self.cqs.get(0), 0, cmd.cid, status, dw0)

    def post_aen(self, dw0: int) -> None:
        """Complete the most recently submitted outstanding AER with `dw0`, or keep the event for the next."""
        self.counters["aens_posted"] += 1
        if not self.aers:
            self.pending_aens.append(dw0)
            return
        cid, entry = self.aers.pop()
        entry["status"], entry["dw0"] = 0, dw0
        self.command_log.add("event", "AEN", self.epoch, cid=cid, dw0=f"{dw0:#010x}")
        self._complete(self.cqs.get(0), 0, cid, 0, dw0)

    def namespace_changed(self, nsid: int) -> None:
        admin.namespace_changed(self, nsid)

    def add_cq(self, cq: Cq) -> None:
        self.cqs[cq.qid] = cq
        self.doorbells[2 * cq.qid + 1] = 0

    def add_sq(self, sq: Sq) -> None:
        self.sqs[sq.qid] = sq
        self.doorbells[2 * sq.qid] = 0

    def delete_sq(self, qid: int) -> None:
        """Its in-flight IO is carried out (reads and writes reach the disk); their completions are dropped."""
        sq = self.sqs.pop(qid)
        sq.failed = "deleted"

    def delete_cq(self, qid: int) -> None:
        cq = self.cqs.pop(qid)
        self.counters["completions_dropped"] += len(cq.overflow)
        cq.failed = "deleted"

    def write_data(self, cmd: Command, data: bytes) -> int:
        """Controller→host data of an admin command through its PRPs; the status to answer with."""
        try:
            offset = 0
            for iova, n in prp_segments(self.dma, cmd.prp1, cmd.prp2, len(data)):
                self.dma.view(iova, n)[:] = data[offset:offset + n]
                offset += n
        except (PrpError, DmaError):
            self.counters["dma_faults"] += 1
            return 0x004
        return 0

    # -- IO -------------------------------------------------------------------------------------
    def _io_start(self, sq: Sq, cmd: Command) -> None:
        self.counters["io_commands"] += 1
        sq.inflight += 1
        op = _Io(sq, cmd, self.generation)
        if self.io_stalled:
            self.stalled.append(op)
        elif self.io_delay_ms and self.loop is not None:
            self.delayed.add(op)
            self.loop.call_later(self.io_delay_ms / 1000, lambda: self._io_run(op))
        else:
            self._io_run(op, kick=False)

    def _io_run(self, op: _Io, kick: bool = True) -> None:
        self.delayed.discard(op)
        if op.generation != self.generation:
            return  # carried out when the controller reset
        if op.sq.failed:  # deleted or broken SQ: the IO still reaches the disk, its completion is dropped
            if self._dma_ok():
                nvm.execute(self, op.cmd)
            self.counters["completions_dropped"] += 1
            return
        if self.io_stalled:
            self.stalled.append(op)
            return
        if not self._dma_ok():
            self._park(lambda: self._io_run(op))
            return
        status = nvm.execute(self, op.cmd)
        if status:
            self.counters["io_errors"] += 1
        self._complete(self.cqs.get(op.sq.cqid), op.sq.qid, op.cmd.cid, status, 0)
        if kick:
            self._kick(op.sq)

    def set_io_stall(self, on: bool) -> None:
        self.io_stalled = on
        if not on:
            stalled, self.stalled = self.stalled, []
            for op in stalled:
                self._io_run(op)

    # -- completions ----------------------------------------------------------------------------
    def _complete(self, cq: Cq | None, sqid: int, cid: int, status: int, dw0: int) -> None:
        if cq is None or cq.failed or self.removed:
            self.counters["completions_dropped"] += 1
            self._retire(sqid)
            return
        cq.overflow.append((sqid, cid, status, dw0))
        self._flush(cq)

    def _retire(self, sqid: int) -> None:
        sq = self.sqs.get(sqid)
        if sqid and sq is not None and sq.inflight:
            sq.inflight -= 1

    def _flush(self, cq: Cq) -> None:
        """Write waiting completions while the CQ has room (§4.3: bytes 0-7, then 8-15 with the phase)."""
        if cq.failed:
            return
        if cq.overflow and not self._dma_ok():
            self._catch_up = True  # written when the driver's memory is back
            return
        head = self.doorbells[2 * cq.qid + 1]
        while cq.overflow:
            if (cq.tail + 1) % cq.size == head:
                self.counters["cq_full_waits"] += 1
                return
            sqid, cid, status, dw0 = cq.overflow.popleft()
            sq = self.sqs.get(sqid)
            entry = struct.pack("<IIHHHH", dw0, 0, sq.head if sq else 0, sqid, cid, status_field(status, cq.phase))
            try:
                view = self.dma.view(cq.base + cq.tail * CQE_SIZE, CQE_SIZE)
                view[:8] = entry[:8]
                view[8:] = entry[8:]
            except DmaError as e:
                self.counters["dma_faults"] += 1
                self._fail_queue(cq, f"CQ entry not writable: {e}")
                return
            self._retire(sqid)
            cq.tail += 1
            if cq.tail == cq.size:
                cq.tail = 0
                cq.phase ^= 1
            self.counters["cqes_posted"] += 1
            if cq.ien:
                self.counters["interrupts"] += 1
                self.irq.trigger(cq.iv)

    # -- inspection -----------------------------------------------------------------------------
    def inspect(self) -> dict:
        cc, csts = Cc.from_int(self.cc), Csts.from_int(self.csts)
        return {
            "name": self.name, "cc": f"{self.cc:#010x}", "csts": f"{self.csts:#010x}", "enabled": bool(cc.en),
            "ready": bool(csts.rdy), "cfs": bool(csts.cfs), "aqa": f"{self.aqa:#010x}", "asq": self.asq,
            "acq": self.acq,
            "sqs": [sq.inspect(self.doorbells[2 * q]) for q, sq in sorted(self.sqs.items())],
            "cqs": [cq.inspect(self.doorbells[2 * q + 1]) for q, cq in sorted(self.cqs.items())],
            "outstanding_aers": [cid for cid, _ in self.aers], "pending_aens": list(self.pending_aens),
            "admin_busy": self.admin_busy, "stalled_io": len(self.stalled), "parked": len(self._parked),
            "granted_queues": self.granted_queues, "namespaces": [ns.inspect() for ns in self.namespaces.values()],
            "reset_method": self.reset_method, "timing": self.timing.to_dict(), "epoch": self.epoch,
            "connected": self.connected, "removed": self.removed, "io_delay_ms": self.io_delay_ms,
            "io_stalled": self.io_stalled, "faults": [r.inspect() for r in self.faults.rules],
        }

    def close(self) -> None:
        for disk in {id(ns.disk): ns.disk for ns in self.namespaces.values()}.values():
            disk.close()


__all__ = ["NvmeController", "Timing", "TIMINGS", "make_timing", "RESET_METHODS", "COUNTERS", "AdminOpcode"]
