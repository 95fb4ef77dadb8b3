"""The user-mode NVMe driver (spec nvme.md §2.6, §6-8, §10-13): bring-up, queues, namespaces, AER,
save and restore.

`NvmeDriver.new(backing, dma, device_id)` is a fresh init: reset if enabled, admin queue, enable,
IDENTIFY controller, SET FEATURES Number of Queues, an outstanding AER, and `io_queues` IO queue pairs
(qid q on MSI-X vector q-1, so IO queue 1 shares vector 0 with the admin queue). `NvmeDriver.restore(
backing, dma, device_id, saved)` re-attaches to a controller that kept running: it checks CSTS.RDY,
re-attaches the queue memory by (mem_len, base_pfn) among the blocks the device's persistent DMA client
still holds, and writes nothing to the controller's registers — no reset, no AQA/ASQ/ACQ/CC, no IDENTIFY,
no SET FEATURES, no CREATE IO CQ/SQ, and no new AER while the saved one is outstanding. IO queues that
had commands pending drain them before any new IO is admitted (§13.5).

The driver knows only its device backing (`DeviceBacking`: BAR0 and MSI-X eventfds) and a DMA client
(`allocate_dma_buffer`, `attach_pending_buffers`); which client, which reset method and when to fall
back are the NVMe manager's decisions. vfkeep departures (each safer than the reference): enable/reset
waits are bounded by CAP.TO (§2.6 decision); an unknown CID or a wrong SQID in a CQE is counted and
skipped instead of panicking; a saved state that does not fit is `InvalidSavedState` instead of a
panic; allocator pages named by restored pending commands stay reserved (§19 N6); all IO queues are
restored at once (what the reference does for `allow_lazy_restore` absent), which is a superset of the
lazy restore and creates no queue.

Threads: submitters call `submit_io` / admin helpers from any thread; one interrupt thread waits on
the MSI-X eventfds and reaps every queue pair, running callbacks `(status, dw0)` (status -1 =
abandoned: the driver stopped or the device failed). Callbacks must not block on the driver.
"""
from __future__ import annotations

import itertools
import logging
import os
import select
import threading
import time

from vfkeep.log import kv
from vfkeep.nvme import (AEN_NOTICE, AQA_256, CC_ENABLE_VALUE, CHANGED_NS_ALL, CHANGED_NS_LOG_CDW10, CNS_CONTROLLER,
                         CNS_NAMESPACE, CSTS_GONE, FEAT_NUMBER_OF_QUEUES, IDENTIFY_SIZE, MAX_QES,
                         PAGE_SIZE, QUEUE_PAIR_MEM_LEN, REG_ACQ, REG_AQA, REG_ASQ, REG_CAP, REG_CC, REG_CSTS,
                         ADMIN_QUEUE_ENTRIES, AdminOpcode, AsyncEventDw0, Cap, Command, CreateIoCqCdw11,
                         CreateIoQueueCdw10, CreateIoSqCdw11, Csts, IdentifyController, NumberOfQueues)
from vfkeep.proto import nvme_driver_pb2 as pb

from .errors import (CommandFailed, CommandTimeout, ControllerFatal, DeviceGone, DeviceNotReady, DriverStopped,
                     NvmeError, ReadyTimeout, SaveFailed, UnsupportedController)
from .namespace import Namespace
from .queues import ABANDONED, QueuePair
from .saved_state import decode, match_blocks, validate

log = logging.getLogger("vfkeep.nvme_driver")

ADMIN_TIMEOUT_S = 30.0
POLL_INTERVAL_S = 0.5  # the interrupt thread also sweeps the CQs this often (a lost wake-up costs no more)


def read_csts(backing, device_id: str) -> Csts:
    value = backing.read32(REG_CSTS)
    if value == CSTS_GONE:
        raise DeviceGone(f"{device_id}: CSTS reads all ones, the device is gone")
    return Csts.from_int(value)


def wait_ready(backing, device_id: str, want: bool, timeout_s: float) -> None:
    """Poll CSTS.RDY with backoff (plain re-reads, then 1 ms, then 15 ms sleeps), bounded by `timeout_s`
    (CAP.TO: the reference waits forever, §19 N7). CFS while waiting for RDY=1 is `ControllerFatal`."""
    deadline = time.monotonic() + timeout_s
    for attempt in itertools.count():
        csts = read_csts(backing, device_id)
        if want and csts.cfs:
            raise ControllerFatal(f"{device_id}: device had fatal error (CSTS.CFS) while enabling")
        if bool(csts.rdy) == want:
            return
        if time.monotonic() >= deadline:
            raise ReadyTimeout(f"{device_id}: CSTS.RDY did not become {int(want)} within {timeout_s} s")
        if attempt >= 50:
            time.sleep(0.001 if attempt < 300 else 0.015)


def reset_controller(backing, device_id: str, timeout_s: float | None = None) -> None:
    """CC.EN 1→0 with the rest of CC kept, then wait for RDY=0 (spec §2.6 `Bar0::reset`; also the
    manager's `clear_existing_state`). `timeout_s` defaults to CAP.TO."""
    if timeout_s is None:
        timeout_s = Cap.from_int(backing.read64(REG_CAP)).to_500ms * 0.5
    cc = backing.read32(REG_CC)
    if cc == CSTS_GONE:
        raise DeviceGone(f"{device_id}: CC reads all ones, the device is gone")
    backing.write32(REG_CC, cc & ~1)
    wait_ready(backing, device_id, False, timeout_s)


class NvmeDriver:
    def __init__(self, backing, dma, device_id: str, cpu_count: int):
        self.backing = backing
        self.dma = dma
        self.device_id = device_id
        self.cpu_count = max(1, cpu_count)
        self.admin: QueuePair | None = None
        self.io: list[QueuePair] = []
        self.identify_ctrl: bytes | None = None
        self.namespaces: dict[int, Namespace] = {}
        self.qsize = 0
        self.max_io_queues = 0
        self.ready_timeout_s = 0.0
        self.keepalive = False  # set by save(): teardown must not touch the controller
        self.failed: str | None = None
        self.aer_cid: int | None = None
        self.last_aen: int | None = None
        self.aer_failed = False
        self.counters = {"aens": 0, "namespace_rescans": 0, "phantom_completions": 0, "abandoned": 0}
        self._irq_fds: dict[int, int] = {}
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._thread: threading.Thread | None = None
        self._stop = False
        self._drained = threading.Event()
        self._drained.set()
        self._presave_io = 0
        self._rr = itertools.count()
        self._lock = threading.Lock()

    # -- bring-up -------------------------------------------------------------------------------
    @classmethod
    def new(cls, backing, dma, device_id: str, *, cpu_count: int = 1, io_queues: int = 2,
            ready_timeout_s: float | None = None) -> NvmeDriver:
        """Fresh init (spec §2.6 steps 1-8); any failure resets the controller, frees memory, re-raises."""
        drv = cls(backing, dma, device_id, cpu_count)
        try:
            drv._bring_up(io_queues, ready_timeout_s)
        except BaseException:
            drv._teardown(reset=drv.admin is not None)
            raise
        return drv

    def _bring_up(self, io_queues: int, ready_timeout_s: float | None) -> None:
        cap = Cap.from_int(self.backing.read64(REG_CAP))
        if cap.to_int() == (1 << 64) - 1:
            raise DeviceGone(f"{self.device_id}: CAP reads all ones, the device is gone")
        self.ready_timeout_s = cap.to_500ms * 0.5 if ready_timeout_s is None else ready_timeout_s
        csts = self._csts()
        if self.backing.read32(REG_CC) & 1 or csts.rdy:
            self._reset()
        if cap.mpsmin != 0:
            raise UnsupportedController(f"{self.device_id}: unsupported minimum page size 2^{12 + cap.mpsmin}")
        if cap.mqes == 0:
            raise UnsupportedController(f"{self.device_id}: mqes cannot be 0")
        if self.backing.msix_count < 1:
            raise UnsupportedController(f"{self.device_id}: the device has no MSI-X vectors")
        self.admin = QueuePair(self.backing, self.dma.allocate_dma_buffer(QUEUE_PAIR_MEM_LEN), 0,
                               ADMIN_QUEUE_ENTRIES, ADMIN_QUEUE_ENTRIES, iv=0)
        self._map_vector(0)
        self.backing.write32(REG_AQA, AQA_256)
        self.backing.write64(REG_ASQ, self.admin.sq_base)
        self.backing.write64(REG_ACQ, self.admin.cq_base)
        self.backing.write32(REG_CC, CC_ENABLE_VALUE)
        self._wait_ready(True)
        self._start_thread()
        self.identify_ctrl = self._admin_data(Command(cdw0=AdminOpcode.IDENTIFY, cdw10=CNS_CONTROLLER),
                                              IDENTIFY_SIZE)
        wanted = max(1, min(io_queues, self.backing.msix_count))
        dw0 = self._admin(Command(cdw0=AdminOpcode.SET_FEATURES, cdw10=FEAT_NUMBER_OF_QUEUES,
                                  cdw11=NumberOfQueues(nsq=wanted - 1, ncq=wanted - 1).to_int()))
        granted = NumberOfQueues.from_int(dw0)
        self.max_io_queues = min(wanted, granted.nsq + 1, granted.ncq + 1)
        self.qsize = min(cap.mqes + 1, MAX_QES)
        self._arm_aer()
        for index in range(self.max_io_queues):
            self.io.append(self._create_io_queue(index + 1, cpu=index % self.cpu_count))
        kv(log, logging.INFO, "nvme controller initialised", device=self.device_id, io_queues=len(self.io),
           qsize=self.qsize, max_io_queues=self.max_io_queues)

    def _create_io_queue(self, qid: int, cpu: int) -> QueuePair:
        iv = (qid - 1) % self.backing.msix_count
        block = self.dma.allocate_dma_buffer(QUEUE_PAIR_MEM_LEN)
        qp = QueuePair(self.backing, block, qid, self.qsize, self.qsize, iv, cpu)
        qsize = CreateIoQueueCdw10(qid=qid, qsize=self.qsize - 1).to_int()
        try:
            self._map_vector(iv)
            self._admin(Command(cdw0=AdminOpcode.CREATE_IO_CQ, prp1=qp.cq_base, cdw10=qsize,
                                cdw11=CreateIoCqCdw11(pc=1, ien=1, iv=iv).to_int()))
            try:
                self._admin(Command(cdw0=AdminOpcode.CREATE_IO_SQ, prp1=qp.sq_base, cdw10=qsize,
                                    cdw11=CreateIoSqCdw11(pc=1, cqid=qid).to_int()))
            except CommandFailed:
                self._admin(Command(cdw0=AdminOpcode.DELETE_IO_CQ, cdw10=qid))
                raise
        except BaseException:
            block.free()
            raise
        return qp

    def _csts(self) -> Csts:
        return read_csts(self.backing, self.device_id)

    def _wait_ready(self, want: bool) -> None:
        try:
            wait_ready(self.backing, self.device_id, want, self.ready_timeout_s)
        except ControllerFatal:
            self._reset()
            raise

    def _reset(self) -> None:
        reset_controller(self.backing, self.device_id, self.ready_timeout_s)

    def _map_vector(self, iv: int) -> None:
        """Assign `iv` an eventfd (the backing owns it) and let the interrupt thread watch it."""
        if iv not in self._irq_fds:
            fd = self.backing.set_irq(iv)
            os.set_blocking(fd, False)
            self._irq_fds[iv] = fd
            if self._thread is not None:
                os.eventfd_write(self._wake, 1)

    # -- admin commands -------------------------------------------------------------------------
    def _submit_wait(self, qp: QueuePair, cmd: Command, timeout: float, pages=()) -> tuple[int, int]:
        done = threading.Event()
        result: list[tuple[int, int]] = []

        def complete(status: int, dw0: int) -> None:
            result.append((status, dw0))
            done.set()

        qp.submit(cmd, complete, pages, timeout=timeout)
        if not done.wait(timeout):
            raise CommandTimeout(f"{self.device_id}: opcode {cmd.opcode:#04x} on queue {qp.qid} did not complete "
                                 f"within {timeout} s")
        return result[0]

    def _admin(self, cmd: Command, timeout: float = ADMIN_TIMEOUT_S) -> int:
        """Run an admin command without data; its DW0, or CommandFailed."""
        opcode = cmd.opcode
        status, dw0 = self._submit_wait(self.admin, cmd, timeout)
        if status:
            raise CommandFailed(opcode, status)
        return dw0

    def _admin_data(self, cmd: Command, length: int, timeout: float = ADMIN_TIMEOUT_S) -> bytes:
        """Run an admin command that returns `length` (≤ one page) bytes through an allocator page. The admin
        queue is held from start to end: an event handler may run while the driver shuts down."""
        admin = self._admin_queue()
        page = admin.alloc_page()
        if page is None:
            raise BufferError(f"{self.device_id}: no admin allocator page free")
        cmd.prp1 = page
        status, _ = self._submit_wait(admin, cmd, timeout)
        # On a timeout the page stays taken: the controller may still write it.
        data = bytes(admin.block.view[page - admin.block.gpa:page - admin.block.gpa + length])
        admin.free_pages([page])
        if status:
            raise CommandFailed(cmd.opcode, status)
        return data

    def _admin_queue(self) -> QueuePair:
        admin = self.admin
        if admin is None:
            raise DriverStopped(f"{self.device_id}: the driver is shut down")
        return admin

    def _arm_aer(self) -> None:
        """Keep exactly one AER outstanding (non-fused; §11.5)."""
        if self.aer_failed or self.aer_cid is not None:
            return
        self.aer_cid = self._admin_queue().submit(Command(cdw0=AdminOpcode.ASYNC_EVENT_REQUEST), self._on_aen)

    def _on_aen(self, status: int, dw0: int) -> None:
        self.aer_cid = None
        if status:
            if status != ABANDONED:
                self.aer_failed = True
                kv(log, logging.WARNING, "AER failed, event processing stops until restore", device=self.device_id,
                   status=status)
            return
        self.counters["aens"] += 1
        self.last_aen = dw0
        threading.Thread(target=self._handle_aen, args=(dw0,), name=f"aen-{self.device_id}", daemon=True).start()

    def _handle_aen(self, dw0: int) -> None:
        """NOTICE → GET LOG PAGE 4 → rescan the listed namespaces; other events are logged only (§6)."""
        event = AsyncEventDw0.from_int(dw0)
        kv(log, logging.INFO, "asynchronous event", device=self.device_id, dw0=f"{dw0:#010x}", type=event.event_type)
        try:
            if event.event_type == AEN_NOTICE:
                raw = self._admin_data(Command(cdw0=AdminOpcode.GET_LOG_PAGE, nsid=0xFFFFFFFF,
                                               cdw10=CHANGED_NS_LOG_CDW10), PAGE_SIZE)
                ids = [int.from_bytes(raw[i:i + 4], "little") for i in range(0, len(raw), 4)]
                changed = set(self.namespaces) if ids[0] == CHANGED_NS_ALL else {i for i in ids if i}
                for nsid in changed & set(self.namespaces):
                    self._rescan(nsid)
            self.last_aen = None
            self._arm_aer()
        except NvmeError as e:  # stopped, timed out, failed, or identify data that does not parse
            kv(log, logging.WARNING, "event handling stopped", device=self.device_id, error=str(e))

    def _rescan(self, nsid: int) -> None:
        data = self._admin_data(Command(cdw0=AdminOpcode.IDENTIFY, nsid=nsid, cdw10=CNS_NAMESPACE), IDENTIFY_SIZE)
        self.counters["namespace_rescans"] += 1
        self.namespaces[nsid].update(data)

    def namespace(self, nsid: int) -> Namespace:
        """The namespace handle, from the cache (restored namespaces included) or IDENTIFY CNS 0."""
        with self._lock:
            ns = self.namespaces.get(nsid)
            if ns is None:
                data = self._admin_data(Command(cdw0=AdminOpcode.IDENTIFY, nsid=nsid, cdw10=CNS_NAMESPACE),
                                        IDENTIFY_SIZE)
                ns = Namespace(self, nsid, data)
                self.namespaces[nsid] = ns
            return ns

    @property
    def controller(self) -> IdentifyController:
        return IdentifyController.from_bytes(self.identify_ctrl)

    # -- IO -------------------------------------------------------------------------------------
    def queue_for(self, cpu: int | None) -> QueuePair:
        """The issuer of `cpu` (the queue created for it, else the nearest lower CPU's); None = round robin."""
        if not self.io:
            raise DriverStopped(f"{self.device_id}: no IO queue")
        if cpu is None:
            return self.io[next(self._rr) % len(self.io)]
        candidates = [q for q in self.io if q.cpu <= cpu % self.cpu_count]
        return max(candidates, key=lambda q: q.cpu) if candidates else self.io[0]

    def submit_io(self, opcode: int, nsid: int, lba: int, nblocks: int, gpa: int, nbytes: int, callback,
                  *, cpu: int | None = None, fua: bool = False, timeout: float | None = None) -> int:
        """Queue one READ/WRITE of `nblocks` blocks at `lba` to/from guest memory `gpa`; returns the CID.
        Waits (up to `timeout`) while a post-restore drain is in progress (§13.5)."""
        if self.failed:
            raise DriverStopped(f"{self.device_id}: {self.failed}")
        if not self._drained.is_set() and not self._drained.wait(timeout):
            raise TimeoutError(f"{self.device_id}: restored commands still draining after {timeout} s")
        qp = self.queue_for(cpu)
        prp1, prp2, pages = qp.prps(gpa, nbytes)
        cmd = Command(cdw0=opcode, nsid=nsid, prp1=prp1, prp2=prp2, cdw10=lba & 0xFFFFFFFF, cdw11=lba >> 32,
                      cdw12=(nblocks - 1) | (int(fua) << 30))
        try:
            return qp.submit(cmd, callback, pages, timeout=timeout)
        except BaseException:
            qp.free_pages(pages)
            raise

    @property
    def draining(self) -> bool:
        return not self._drained.is_set()

    def wait_drained(self, timeout: float | None = None) -> bool:
        return self._drained.wait(timeout)

    # -- interrupt thread -----------------------------------------------------------------------
    def _start_thread(self) -> None:
        self._stop = False
        self._thread = threading.Thread(target=self._run, name=f"nvme-{self.device_id}", daemon=True)
        self._thread.start()

    def _queue_pairs(self) -> list[QueuePair]:
        return ([self.admin] if self.admin else []) + list(self.io)

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self._wake, select.POLLIN)
        registered = set()
        while not self._stop:
            # Reap first: after a restore, completions the controller wrote during the handover raised
            # their interrupt on the old process's eventfds, so nothing would wake us for them.
            try:
                for qp in self._queue_pairs():
                    for entry, status, dw0 in qp.reap():
                        self._completed(qp, entry, status, dw0)
            except Exception as e:  # noqa: BLE001 - the device or transport failed: stop and tell every waiter
                self._fail(f"interrupt thread stopped: {type(e).__name__}: {e}")
                return
            for fd in self._irq_fds.values():
                if fd not in registered:
                    poller.register(fd, select.POLLIN)
                    registered.add(fd)
            for fd, _ in poller.poll(POLL_INTERVAL_S * 1000):
                try:
                    os.read(fd, 8)
                except BlockingIOError:
                    pass

    def _completed(self, qp: QueuePair, entry, status: int, dw0: int) -> None:
        if entry.presave and qp.qid:
            with self._lock:
                self._presave_io -= 1
                if self._presave_io == 0:
                    self._drained.set()
                    kv(log, logging.INFO, "restored commands drained", device=self.device_id)
        if entry.callback is None:
            return  # a pre-save command: its requester was in the old process (replayed by the guest side)
        try:
            entry.callback(status, dw0)
        except Exception:  # noqa: BLE001 - a broken callback must not stop completions for everyone else
            log.exception("completion callback failed")

    def _fail(self, why: str) -> None:
        self.failed = why
        kv(log, logging.ERROR, "nvme driver failed", device=self.device_id, reason=why)
        for qp in self._queue_pairs():
            for entry in qp.stop(why):
                self.counters["abandoned"] += 1
                if entry.callback is not None:
                    try:
                        entry.callback(ABANDONED, 0)
                    except Exception:  # noqa: BLE001
                        log.exception("completion callback failed")
        self._drained.set()

    def _stop_thread(self) -> None:
        self._stop = True
        if self._thread is not None:
            os.eventfd_write(self._wake, 1)
            if self._thread is not threading.current_thread():
                self._thread.join(5)
        self._thread = None

    # -- save / restore / teardown ----------------------------------------------------------------
    def save(self) -> pb.NvmeDriverSavedState:
        """Stop every queue (no more submissions, completions or doorbells) and return the state; the
        controller is not touched and keeps any in-flight IO (§12)."""
        if self.identify_ctrl is None or self.admin is None:
            raise SaveFailed(f"{self.device_id}: the driver was never initialised (no identify data)")
        self.keepalive = True
        self._stop_thread()
        state = pb.NvmeDriverSavedState(identify_ctrl=self.identify_ctrl, device_id=self.device_id)
        for qp in self._queue_pairs():
            qp.stop("saved")
        aer = pb.AerHandlerSavedState()
        if self.last_aen is not None:
            aer.last_aen = self.last_aen
        if self.aer_cid is not None:
            aer.await_aen_cid = self.aer_cid
        w = state.worker_data
        w.admin.CopyFrom(self.admin.save(aer))
        for qp in self.io:
            w.io.add(cpu=qp.cpu, iv=qp.iv, queue_data=qp.save(), unmapped=False)
        w.qsize, w.max_io_queues, w.allow_lazy_restore = self.qsize, self.max_io_queues, True
        for ns in self.namespaces.values():
            if not ns.removed:
                state.namespaces.add(nsid=ns.nsid, identify_ns=ns.identify)
        kv(log, logging.INFO, "nvme driver saved", device=self.device_id,
           admin_pending=len(w.admin.handler_data.pending_cmds.commands),
           io_pending=sum(len(q.queue_data.handler_data.pending_cmds.commands) for q in w.io))
        return state

    @classmethod
    def restore(cls, backing, dma, device_id: str, saved: pb.NvmeDriverSavedState | bytes, *,
                cpu_count: int) -> NvmeDriver:
        """Keepalive restore (§13.3). `InvalidSavedState` / `DeviceNotReady` / `DeviceGone` leave the
        re-attached blocks freed and the controller untouched; the manager then takes the fresh path."""
        state = decode(saved)
        validate(state, msix_count=backing.msix_count, cpu_count=cpu_count)
        value = backing.read32(REG_CSTS)
        if value == CSTS_GONE:
            raise DeviceGone(f"{device_id}: CSTS reads all ones, the device is gone")
        if not Csts.from_int(value).rdy:
            raise DeviceNotReady(f"{device_id}: device is not ready during restore")
        cap = Cap.from_int(backing.read64(REG_CAP))
        blocks = dma.attach_pending_buffers()
        try:
            matched = match_blocks(state, blocks)
        except BaseException:
            for b in blocks:
                b.free()
            raise
        for b in blocks:
            if b not in matched.values():
                b.free()
        drv = cls(backing, dma, device_id, cpu_count)
        try:
            drv._restore_from(state, matched, cap)
        except BaseException:
            drv._teardown(reset=False, free_memory=False)
            for b in matched.values():
                b.free()
            raise
        return drv

    def _restore_from(self, state: pb.NvmeDriverSavedState, matched: dict, cap: Cap) -> None:
        self.ready_timeout_s = cap.to_500ms * 0.5
        self.identify_ctrl = bytes(state.identify_ctrl)
        w = state.worker_data
        self.admin = QueuePair.restore(self.backing, matched[0], w.admin, iv=0)
        self._map_vector(0)
        aer = w.admin.handler_data.aer_handler
        if w.admin.handler_data.HasField("aer_handler"):
            if aer.HasField("await_aen_cid"):
                entry = self.admin.pending[aer.await_aen_cid & 0x3FF]
                entry.callback, entry.presave = self._on_aen, False
                self.aer_cid = aer.await_aen_cid
            if aer.HasField("last_aen"):
                self.last_aen = aer.last_aen
        if self.admin.peek_phantom():
            self.counters["phantom_completions"] += 1
            kv(log, logging.INFO, "completion already at the admin CQ head after restore", device=self.device_id)
        for q in w.io:
            qp = QueuePair.restore(self.backing, matched[q.queue_data.qid], q.queue_data, q.iv, q.cpu)
            self._map_vector(q.iv)
            self.io.append(qp)
        self._presave_io = sum(len(qp.pending) for qp in self.io)
        if self._presave_io:
            self._drained.clear()
        self.qsize, self.max_io_queues = w.qsize, w.max_io_queues
        for ns in state.namespaces:
            self.namespaces[ns.nsid] = Namespace(self, ns.nsid, bytes(ns.identify_ns))
        # Decided from the saved state, before the interrupt thread can deliver the saved AER's event.
        pending_aen, awaiting = self.last_aen, self.aer_cid is not None
        # Logged before the threads start: an event handler may shut the driver down at once.
        kv(log, logging.INFO, "nvme driver restored", device=self.device_id, io_queues=len(self.io),
           admin_pending=len(self.admin.pending), io_pending=self._presave_io, awaiting_aen=self.aer_cid)
        self._start_thread()
        if pending_aen is not None:
            threading.Thread(target=self._handle_aen, args=(pending_aen,), name=f"aen-{self.device_id}",
                             daemon=True).start()
        elif not awaiting:
            self._arm_aer()

    def shutdown(self) -> None:
        """Normal teardown: CC.EN 1→0 (bounded wait), close the handle, free the queue memory. After `save()`
        nothing is touched (§11.7): the handle is closed without a reset and the memory stays allocated."""
        self._teardown(reset=not self.keepalive, free_memory=not self.keepalive)

    def release_handle(self) -> None:
        """After a save the servicing kept: close the device handle without a command (the controller keeps
        running the saved queues, its memory stays allocated for the next driver), as a process exit would."""
        self.backing.close()

    def reset_after_save(self) -> None:
        """The servicing this driver was saved for failed (DESIGN D4): the controller still runs the saved
        queues, so reset it (CC.EN 1→0) and free the queue memory, as a normal teardown would."""
        self._teardown(reset=True, free_memory=True)

    def _teardown(self, reset: bool, free_memory: bool = True) -> None:
        if self._wake < 0:
            return  # already torn down
        self._stop_thread()
        for qp in self._queue_pairs():
            qp.stop("shut down")
        quiet = not reset  # a teardown without reset frees only what no controller was given (or nothing)
        if reset:
            try:
                self._reset()
                quiet = True
            except DeviceGone:
                quiet = True  # a function that is gone writes nothing
            except Exception as e:  # noqa: BLE001 - a failed reset must not stop the teardown
                kv(log, logging.WARNING, "controller reset at teardown failed", device=self.device_id, error=str(e))
        try:
            self.backing.close()
        finally:
            self._irq_fds.clear()  # the backing owned and closed them
            if free_memory and quiet:
                for qp in self._queue_pairs():
                    qp.block.free()
            elif free_memory and self._queue_pairs():
                kv(log, logging.WARNING, "queue memory kept allocated: the controller was not reset and may "
                   "still write it", device=self.device_id,
                   pages=sum(qp.block.pages for qp in self._queue_pairs()))
            self.admin, self.io = None, []
            os.close(self._wake)
            self._wake = -1

    def inspect(self) -> dict:
        return {"device_id": self.device_id, "keepalive": self.keepalive, "failed": self.failed,
                "qsize": self.qsize, "max_io_queues": self.max_io_queues, "draining": self.draining,
                "aer": {"outstanding_cid": self.aer_cid, "last_aen": self.last_aen, "failed": self.aer_failed},
                "admin": self.admin.inspect() if self.admin else None, "io": [q.inspect() for q in self.io],
                "namespaces": [ns.inspect() for ns in self.namespaces.values()], "counters": dict(self.counters)}


__all__ = ["NvmeDriver", "reset_controller", "wait_ready", "read_csts"]
