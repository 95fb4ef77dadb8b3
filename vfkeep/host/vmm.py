"""The host VMM: owns guest memory, device processes, guest channel rings and the worker's lifecycle.

Every operation that starts or ends a child runs on one long-lived actor thread. That serialises
state changes (only one servicing at a time) and keeps children alive: PR_SET_PDEATHSIG fires when
the *thread* that spawned a child exits, so children must not be spawned from short-lived
request threads.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import inspect
import json
import logging
import os
import queue
import shlex
import signal
import threading
import time
import uuid
from dataclasses import dataclass, field

from .. import __version__, kill_points, netns, proc, rpc
from .. import log as vlog
from ..contract import (DATAPATH_KEEPALIVE_ENV, MANA_KEEPALIVE_ENV, NO_TIMEOUT_HINT_S, NO_TIMEOUT_S,
                        NVME_KEEPALIVE_ENV, POOL_CONFIG_ENV, POOL_OVERRIDE_ENV, PRELAUNCHED_ENV, SAVE_TEST_CONFIGS, Bye,
                        Inspect, InspectReply, NicConfig, NicResult, NicRestore, NvmeConfig, NvmeResult, RestorePath, Save,
                        SaveState, ServicingResult, Shutdown, Started, TransferStatus, UnclaimedAllocation,
                        capability_word, timeout_hint)
from ..device.timing import PRESETS, DeviceTiming
from ..guest.block import BlockChannel, BlockLayout
from ..guest.ring import ChannelLayout, NicChannel
from ..guest.stats import make_frame, parse_frame
from ..log import kv, kv_at
from ..memory import GuestMemory, MemoryLayout, pool_pages_from_env
from ..memory.guest_memory import PAGE_SIZE
from .devices import DeviceProcess, NvmeDeviceProcess, nic_mac
from .disks import DiskError, GuestDisks
from .events import EventBus
from .guest_net import GuestNetError, GuestNetwork
from .leftovers import created_files, forget_created, record_created
from .outcome import nic_reason, servicing_status
from .tamper import TAMPER_MODES, tamper_blob
from .traffic import GuestTraffic, TrafficError
from .worker_proc import WorkerFailed, WorkerProcess

log = logging.getLogger("vfkeep.host")

STATE_FILE = "servicing_state.bin"
#: With `--tamper`: the old worker's save as it sent it (STATE_FILE holds the tampered blob the new worker got).
UNTAMPERED_STATE_FILE = "servicing_state.untampered.bin"
DEFAULT_TIMEOUT_S = 60.0
HELLO_TIMEOUT_S = 60.0
#: How long the host waits for a prelaunched worker's REQUEST_DATA before it asks for the save (it comes within
#: a millisecond; one that does not is read inside the window, as without prelaunch).
STATE_REQUEST_WAIT_S = 0.05
#: After the go of a servicing with no NVMe controller, how long at most the host waits for the next worker's first
#: message (its restore's end) before it answers the old worker and decodes its report (`hand_ahead`).
QUIET_AFTER_GO_S = 0.1
BOOT_TIMEOUT_S = 60.0
#: Guest RAM beyond the channel rings (guest buffers), and worker RAM for ephemeral DMA: vport queues and
#: packet buffers take about 450 pages per NIC (256 TX + 512 RX buffers of 2 KiB, queues).
GUEST_SPARE_PAGES = 256
WORKER_BASE_PAGES = 1024
WORKER_PAGES_PER_NIC = 768
DATAPATH_POOL_PAGES_PER_NIC = 256  # a kept vport (202 pages) and the HWC buffer (6), with room to spare
#: Pool pages each NIC's persistent allocations need: the 6-page HWC buffer (spec gdma.md), plus a kept
#: vport (202 pages) under data-path keepalive.
HWC_BUFFER_PAGES = 6
KEPT_VPORT_PAGES = 202
#: An interrupt during a servicing waits this long for it to complete (a safe point) before the host ends
#: the workers; devices are ended after the workers either way.
SAFE_POINT_S = 10.0
#: Worker logs (`worker-G.log`, `.stderr`) of this many generations are kept; older ones are removed.
KEEP_WORKER_LOGS = 10
#: sun_path holds 108 bytes with the terminating NUL.
MAX_SOCKET_PATH = 107
#: NVMe: each controller's queue pairs (admin + 2 IO queues, 69 pages each, spec nvme.md §11.1) live in the
#: pool under keepalive, else in worker RAM. The default pool gets room for two sets per disk: a servicing
#: without the NVMe bit (E1) leaves the old set pending in the snapshot until the validation frees it, and
#: the fresh init allocates the new one before that.
NVME_QUEUE_PAGES = 3 * 69
NVME_POOL_PAGES_PER_DISK = 2 * NVME_QUEUE_PAGES
MAX_NVME = 16
DEFAULT_DISK_SIZE = 64 << 20
#: Blocks of each disk the guest disk agent uses (from LBA 0): 2048 chunks of 8 blocks, so a full
#: verification reads back at most 8 MiB.
DISK_AGENT_LBAS = 16384
#: Guest block channel geometry: 256-slot rings, 64 data pages (queue depth up to 64 with 4 KiB IO).
BLOCK_SLOTS = 256
BLOCK_DATA_PAGES = 64


def socket_names(nics: int, nvme: int = 0, guest: str = "agent") -> list[str]:
    """The sockets a host with `nics` NICs, `nvme` disks and this `guest` creates in its run dir, the last of
    each kind (sun_path length check: the message names one the run would really create)."""
    names = ["host.sock"]
    if nics:
        guest_sock = "guest-bridge" if guest == "netns" else "guest-agent"
        names += [f"nic{nics - 1}.sock.ctl", f"{guest_sock}-{nics - 1}.sock"]
    if nvme:
        names += [f"nvme{nvme - 1}.sock.ctl", f"disk-agent-{nvme - 1}.sock"]
    return names


#: Guest channel ring depth: frames the guest sends while no worker relays wait here, so the ring
#: must hold a whole servicing window (4096 slots = 0.8 s at 5000 frames/s, 80 ms at 50k).
DEFAULT_RING_SLOTS = 4096


class HostError(Exception):
    """A host operation was refused (bad request, busy, stopped)."""


@dataclass
class HostConfig:
    run_dir: str
    nics: int = 1
    backend: str = "loopback"
    pool_pages: int | None = None
    timing: DeviceTiming = PRESETS["realistic"]
    prelaunch: bool = True
    ring_slots: int = DEFAULT_RING_SLOTS
    worker_cmd: str | None = None
    worker_env: dict[str, str] = field(default_factory=dict)
    datapath_keepalive: bool = False  # DESIGN D7: every worker keeps the vport data path across keepalive
    keep_worker_logs: int = KEEP_WORKER_LOGS
    guest: str = "agent"  # "agent": traffic agents on request; "netns": a network namespace per NIC (root)
    nvme: int = 0  # NVMe controllers (device processes), each with a guest block channel
    disks: list[str] = field(default_factory=list)  # backing files of the first disks; the rest: sparse, run dir
    disk_size: int = DEFAULT_DISK_SIZE

    def worker_argv(self, override: str | None = None) -> list[str]:
        cmd = override or self.worker_cmd
        return shlex.split(cmd) if cmd else proc.vfkeep_argv("worker")

    def check(self) -> None:
        """Refuse values that would fail only once processes run (HostError naming the option), so a bad
        option costs nothing to start and nothing to clean up."""
        from ..device.backends import BackendError, parse_backend  # the host never loads the device otherwise

        if not 0 <= self.nics <= 64:
            raise HostError(f"--nics {self.nics} out of range [0, 64]")
        if not 0 <= self.nvme <= MAX_NVME:
            raise HostError(f"--nvme {self.nvme} out of range [0, {MAX_NVME}]")
        if self.disks and not self.nvme:
            raise HostError("--disk needs --nvme N: it backs one of the N NVMe controllers")
        if len(self.disks) > self.nvme:
            raise HostError(f"{len(self.disks)} --disk files for --nvme {self.nvme}: at most one per NVMe controller")
        self._check_disks()
        if self.disk_size < DISK_AGENT_LBAS * 512 or self.disk_size % 4096:
            raise HostError(f"--disk-size {self.disk_size}: a multiple of 4096 bytes, at least "
                            f"{DISK_AGENT_LBAS * 512} (the guest disk agent's blocks)")
        if self.ring_slots < 1 or self.ring_slots & (self.ring_slots - 1) or self.ring_slots > 1 << 20:
            raise HostError(f"--ring-slots {self.ring_slots}: slot count must be a power of two in [1, {1 << 20}]")
        try:
            backend = parse_backend(self.backend)
        except BackendError as e:
            raise HostError(f"--backend: {e}") from None
        if getattr(backend, "kind", None) == "tap" and self.nics > 1:
            raise HostError(f"--backend {self.backend} with --nics {self.nics}: every device would open the same "
                            "TAP interface (busy); use one NIC per TAP backend")
        name = max(socket_names(self.nics, self.nvme, self.guest), key=len)
        longest = os.path.join(os.path.abspath(self.run_dir), name)
        if len(longest.encode()) > MAX_SOCKET_PATH:
            raise HostError(f"--run-dir {os.path.abspath(self.run_dir)} is too long for UNIX sockets in it "
                            f"({len(longest.encode())} > {MAX_SOCKET_PATH} bytes for {name}); "
                            "use a shorter path")
        if self.worker_cmd is not None:
            try:
                argv = shlex.split(self.worker_cmd)
            except ValueError as e:
                raise HostError(f"--worker-cmd {self.worker_cmd!r}: {e}") from None
            if not argv:
                raise HostError("--worker-cmd is empty")


    def _check_disks(self) -> None:
        """Each disk its own file (two controllers on one file corrupt each other's blocks), a --disk file
        that can be opened, and never the user's file taken for one of this run's own sparse files."""
        seen: dict[str, int] = {}
        for i, disk in enumerate(self.disks):
            real = os.path.realpath(disk)
            if real in seen:
                raise HostError(f"--disk {disk} given for disks {seen[real]} and {i}: two NVMe controllers on one "
                                "file corrupt each other's blocks")
            seen[real] = i
            if os.path.isdir(real) or not os.path.isdir(os.path.dirname(real)):
                raise HostError(f"--disk {disk}: not a file in an existing directory")
            if not os.access(real if os.path.exists(real) else os.path.dirname(real), os.R_OK | os.W_OK):
                raise HostError(f"--disk {disk}: no permission to read and write it")
        ours = set(created_files(self.run_dir))
        for i in range(len(self.disks), self.nvme):
            own = self.temp_disk(i)
            if os.path.realpath(own) in seen:
                raise HostError(f"--disk {own} is where disk {i}'s sparse file of this run goes (--nvme {self.nvme}, "
                                f"{len(self.disks)} --disk); give every disk a --disk file or use another name")
            if os.path.lexists(own) and os.path.basename(own) not in ours:
                raise HostError(f"{own} exists and vfkeep did not create it: disk {i}'s sparse file of this run "
                                "would replace it; pass it with --disk to use it, or move it")

    def temp_disk(self, index: int) -> str:
        """Disk `index`'s sparse file when no --disk names one: this run's only, removed at teardown."""
        return os.path.join(os.path.abspath(self.run_dir), f"nvme{index}.disk")


def _timeout(value: float | None) -> float:
    if value is None:
        return DEFAULT_TIMEOUT_S
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:  # (nan too: a control client's)
        raise HostError(f"timeout must be a positive number of seconds, got {value!r}")
    return NO_TIMEOUT_S if value >= NO_TIMEOUT_HINT_S else float(value)


def _ms(a_ns: int, b_ns: int) -> float:
    """Milliseconds between two CLOCK_MONOTONIC stamps: a phase's `phase_done` event and `phases_ms` entry alike."""
    return round((b_ns - a_ns) / 1e6, 3)


class Host:
    def __init__(self, config: HostConfig):
        self.config = config
        self.run_dir = os.path.abspath(config.run_dir)
        self.mem: GuestMemory | None = None
        self.channel_layout: ChannelLayout | None = None
        self.channels: list[NicChannel] = []
        self.devices: list[DeviceProcess] = []
        self.nvme_devices: list[NvmeDeviceProcess] = []
        self.block_layout: BlockLayout | None = None
        self.block_channels: list[BlockChannel] = []
        self.guest_disks: GuestDisks | None = None
        self._temp_disks: list[str] = []  # sparse disk files this run created (removed at teardown)
        #: Request-ring positions of the guest's disks when a worker stopped taking requests (saved, died or
        #: ended): once the next worker runs the guest re-issues the ones it still waits for, so none is lost
        #: whether or not a saved state carried them (the next relay ignores those it replays itself).
        self._lost_requests: dict[int, int] | None = None
        self.worker: WorkerProcess | None = None
        self.configured = list(range(config.nics))
        self.generation = 0
        self.last_servicing: dict | None = None
        self.guest_traffic: GuestTraffic | None = None
        self.guest_net: GuestNetwork | None = None
        self.servicings = 0
        #: Boot-time problems the user should know about (e.g. a pool too small for keepalive); in inspect.
        self.warnings: list[str] = []
        #: The servicing in progress: {"phase", "since_ns"} (phase names as in phases_ms), None when idle.
        self._servicing: dict | None = None
        self._stopping = threading.Event()
        self._idle = threading.Event()  # clear while a servicing runs on the actor
        self._booted = threading.Event()
        self._starting: WorkerProcess | None = None  # the worker spawned last (during boot: the one it waits for)
        self._idle.set()
        #: What the stop did to the devices (`_teardown`): {"worker", "nics_shut_down", "nvme_shut_down",
        #: "summary"}; None until a teardown ran. `vfkeep stop` gets it in the host_stopped event.
        self.stop_outcome: dict | None = None
        #: What the control socket's `events` streams (host/events.py); `_nic_states` is the last NIC state
        #: published per pci_id, so `nic_state` is sent on changes only.
        self.events = EventBus()
        self._nic_states: dict[str, tuple] = {}
        self._jobs: queue.Queue = queue.Queue()
        self._busy = threading.Lock()
        self._stopped = threading.Event()
        self._actor = threading.Thread(target=self._run_actor, name="host-actor", daemon=True)

    # -- actor ---------------------------------------------------------------------------------
    def _run_actor(self) -> None:
        while True:
            try:
                job = self._jobs.get(timeout=0.5)
            except queue.Empty:
                try:
                    self._supervise()
                except Exception as e:  # noqa: BLE001 - the actor must outlive a failed replacement (its
                    # children die with it, and every later request would wait for it forever)
                    kv(log, logging.ERROR, "supervision failed; retrying at the next idle tick", error=repr(e))
                continue
            if job is None:
                return
            fn, args, kwargs, fut = job
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn(*args, **kwargs))
            except BaseException as e:  # noqa: BLE001 - delivered to the caller
                fut.set_exception(e)

    def _submit(self, fn, *args, **kwargs):
        if self._stopped.is_set():
            raise HostError("host is stopping")
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._jobs.put((fn, args, kwargs, fut))
        while not concurrent.futures.wait([fut], timeout=0.2).done:
            pass  # (waking up: a signal another thread took runs its handler here, e.g. SIGTERM during boot)
        return fut.result()

    def start(self) -> None:
        """Boot: memory, rings, devices, first worker. Raises if anything fails to come up."""
        self._actor.start()
        try:
            self._submit(self._boot)
        except BaseException:
            self.stop()
            raise
        self._booted.set()

    def servicing_phase(self) -> str | None:
        """The phase of the servicing in progress (prelaunch, save, handoff, restore, measure), or None."""
        s = self._servicing
        return None if s is None else s["phase"]

    def stop(self, safe_point_s: float = SAFE_POINT_S) -> None:
        """End every child (worker first, with a normal NIC shutdown), then the actor. A servicing in progress
        gets `safe_point_s` to complete; after that its workers are ended (so its save or restore wait ends)
        and it stops without starting another."""
        if self._stopped.is_set():
            return
        self._stopping.set()
        self.events.publish("host_stopping", cause="stop requested", servicing_phase=self.servicing_phase())
        if self._servicing is not None:
            kv(log, logging.WARNING, "stop requested during a servicing; waiting for a safe point",
               phase=self.servicing_phase(), limit_s=safe_point_s)
            if self.servicing_phase() == "prelaunch":
                self._abandon_prelaunch()
            if not self._idle.wait(safe_point_s):
                kv(log, logging.ERROR, "servicing did not reach a safe point in time; ending its workers",
                   phase=self.servicing_phase())
                for w in list(self._servicing_workers()):
                    w.kill()
        if not self._booted.is_set() and self._starting is not None:
            self._starting.kill()  # an interrupted boot waiting (up to a minute) for its first worker ends now
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._jobs.put((self._teardown, (), {}, fut))
        self._stopped.set()
        self._jobs.put(None)
        if self._actor.is_alive():
            try:
                fut.result(timeout=30)
            except Exception as e:  # noqa: BLE001 - teardown is best effort, children end regardless
                kv(log, logging.ERROR, "teardown failed", error=repr(e))
            self._actor.join(timeout=30)
        if self.stop_outcome is None:  # (no teardown ran to its end: nothing is known to have been shut down)
            self.stop_outcome = stop_outcome("unknown", [], [], "the teardown did not complete (host log): no NIC "
                                             "is known to have been shut down")
        self.events.publish("host_stopped", **self.stop_outcome)
        self.events.close()

    def _abandon_prelaunch(self) -> None:
        """A stop during the prelaunch: nothing is saved yet, so the next worker, still starting (1-2 s of imports,
        up to HELLO_TIMEOUT_S when hung), is ended now and the servicing ends before its save (`_service_one`)."""
        nxt = self._starting
        if nxt is not None and nxt is not self.worker and not nxt.handed_over:
            nxt.kill()

    def _servicing_workers(self):
        """Workers a servicing in progress may be waiting on (current and prelaunched)."""
        s = self._servicing
        for w in (self.worker, None if s is None else s.get("next")):
            if w is not None:
                yield w

    # -- public operations (any thread) --------------------------------------------------------
    def service(self, mana_keepalive: bool = False, nvme_keepalive: bool = False, timeout: float | None = None,
                test_config: str | None = None, next_env: dict[str, str] | None = None,
                next_worker_cmd: str | None = None, nics: list[int] | None = None, tamper: str | None = None,
                kill_point: str | None = None) -> dict:
        """One servicing; the servicing result's JSON form (`contract.ServicingResult`). `kill_point` (test hook,
        `vfkeep.kill_points`): a save point goes to the current worker with its save request, a restore point to
        the next worker's environment (only that worker: a replacement runs without it)."""
        if not self._busy.acquire(blocking=False):
            raise HostError(f"a servicing is already in progress (phase {self.servicing_phase() or 'starting'})")
        try:
            return self._submit(self._service, mana_keepalive, nvme_keepalive, timeout, test_config, next_env,
                                next_worker_cmd, nics, tamper, kill_point)
        finally:
            self._busy.release()

    def inspect(self, path: str | None = None):
        """The live tree. During a servicing the actor is busy with it, so the answer comes from this thread:
        host, devices and the servicing's phase, with the worker shown by process only."""
        if self._servicing is not None:
            return _select(self._inspect_host_side(), path)
        return _select(self._submit(self._inspect), path)

    def status(self) -> dict:
        """Processes at a glance; answered on the caller's thread (never waits behind a servicing)."""
        return self._status()

    def probe(self, nic: int = 0, count: int = 8, timeout: float = 2.0) -> dict:
        return self._submit(self._probe, nic, count, timeout)

    def exec(self, nic: int, argv: list[str], timeout: float = 30.0) -> dict:
        """Run a command in guest `nic`'s network namespace (--guest netns) to completion, on the caller's
        thread (it may take long; the actor stays free for servicing)."""
        if self.guest_net is None:
            raise HostError("exec needs a host started with --guest netns (a network namespace per NIC)")
        try:
            return self.guest_net.exec(nic, argv, timeout)
        except GuestNetError as e:
            raise HostError(str(e)) from None

    def traffic(self, action: str, **args):
        """`vfkeep traffic`: start spawns agents, so it runs on the actor thread (children die with the
        thread that spawned them); stop/stats/timeline/status answer at once, even during a servicing."""
        if self.guest_traffic is None:
            raise HostError("host is not booted")
        if not self.config.nics:  # (`stats` and `stop` said to start traffic first)
            raise HostError("this host has no NICs: start it with `vfkeep run --nics N`")
        if self.guest_net is not None and action == "start":
            raise HostError("this host's guest is a network namespace per NIC (--guest netns): its bridges own the "
                            "rings; use `exec N CMD` (e.g. ping) instead of traffic agents")
        fn = self.guest_traffic.operation(action)
        try:
            inspect.signature(fn).bind(**args)
        except TypeError as e:
            raise HostError(f"traffic {action}: {e}") from None
        return self._submit(fn, **args) if action == "start" else fn(**args)

    def disk(self, action: str, **args):
        """`vfkeep disk`: as `traffic`, start (spawns agents) on the actor thread, the rest at once."""
        if self.guest_disks is None:
            raise HostError("host is not booted" if self.config.nvme else
                            "this host has no NVMe disks: start it with `vfkeep run --nvme N`")
        fn = self.guest_disks.operation(action)
        try:
            inspect.signature(fn).bind(**args)
        except TypeError as e:
            raise HostError(f"disk {action}: {e}") from None
        return self._submit(fn, **args) if action == "start" else fn(**args)

    # -- boot / teardown -------------------------------------------------------------------------
    def _boot(self) -> None:
        cfg = self.config
        if cfg.nics < 0:
            raise HostError(f"--nics must be >= 0, got {cfg.nics}")
        if cfg.guest not in ("agent", "netns"):
            raise HostError(f"unknown guest {cfg.guest!r}: agent or netns")
        if cfg.guest == "netns":
            if cfg.backend != "loopback":
                raise HostError(f"--guest netns brings its own wire (a TAP per NIC in its peer namespace); "
                                f"--backend {cfg.backend} cannot be combined with it")
            self.guest_net = GuestNetwork(self.run_dir, cfg.nics)
            try:
                self.guest_net.prepare()  # namespaces first: the devices create their TAPs inside them
            except netns.NetnsError as e:
                raise HostError(str(e)) from None
        pool = pool_pages_from_env(os.environ) if cfg.pool_pages is None else cfg.pool_pages
        pool_from_env = POOL_OVERRIDE_ENV in os.environ or POOL_CONFIG_ENV in os.environ
        if cfg.datapath_keepalive and cfg.pool_pages is None and not pool_from_env:
            pool += DATAPATH_POOL_PAGES_PER_NIC * cfg.nics  # kept vports live in the pool (fixed for the VM's life)
        if cfg.pool_pages is None and not pool_from_env:
            pool += NVME_POOL_PAGES_PER_DISK * cfg.nvme
        if cfg.nics:
            self.channel_layout = ChannelLayout(nics=cfg.nics, slots=cfg.ring_slots)
        ring_pages = self.channel_layout.total_pages if self.channel_layout else 0
        if cfg.nvme:
            self.block_layout = BlockLayout(cfg.nvme, BLOCK_SLOTS, BLOCK_DATA_PAGES, ring_pages * PAGE_SIZE)
        block_pages = self.block_layout.total_pages if self.block_layout else 0
        layout = MemoryLayout(ring_pages + block_pages + GUEST_SPARE_PAGES,
                              WORKER_BASE_PAGES + WORKER_PAGES_PER_NIC * cfg.nics + NVME_QUEUE_PAGES * cfg.nvme, pool)
        self.mem = GuestMemory.create(layout)
        # Poisoned once now, so the host's mapping of worker RAM is populated: the scrub of each servicing then
        # runs at memset speed instead of taking a page fault per page inside the blackout.
        self.mem.scrub_worker_ram()
        kv(log, logging.INFO, "guest memory created", layout=layout.to_str(), bytes=layout.size)
        for i in range(cfg.nics):
            self.channels.append(NicChannel.create(self.mem, self.channel_layout, i))
        self.guest_traffic = GuestTraffic(self.run_dir, self.mem, self.channel_layout, self.channels)
        for i in range(cfg.nvme):
            self.block_channels.append(BlockChannel.create(self.mem, self.block_layout, i))
        if cfg.nvme:
            self.guest_disks = GuestDisks(self.run_dir, self.mem, self.block_layout, self.block_channels,
                                          DISK_AGENT_LBAS)
        for i in range(cfg.nics):
            backend = self.guest_net.device_backend(i) if self.guest_net else cfg.backend
            self.devices.append(DeviceProcess.spawn(i, self.run_dir, backend, cfg.timing))
        for i in range(cfg.nvme):
            if i < len(cfg.disks):
                disk = os.path.abspath(cfg.disks[i])
            else:  # a sparse file of this run only: data persists across servicings, never across runs
                disk = cfg.temp_disk(i)
                record_created(self.run_dir, disk)  # so a SIGKILLed host's next run or stop removes it
                self._temp_disks.append(disk)
            self.nvme_devices.append(NvmeDeviceProcess.spawn(i, self.run_dir, disk, cfg.disk_size, cfg.timing))
        # The first worker's imports (1-2 s of CPU) run while the devices start up: it connects to them only when
        # `start` tells it to, once every device answered.
        first = self._spawn_early({}, None, self.configured)
        try:
            for d in [*self.devices, *self.nvme_devices]:
                d.wait_ready(BOOT_TIMEOUT_S, self._stopping)
            if self.guest_net is not None:
                for i in range(cfg.nics):
                    self.guest_net.wire_up(i)
                try:
                    self.guest_net.start_bridges(self.mem, self.channel_layout, self.channels,
                                                 [nic_mac(i) for i in range(cfg.nics)])
                except GuestNetError as e:
                    raise HostError(str(e)) from None
        except BaseException:
            first.end()  # (not the host's worker yet: nobody else would end it)
            raise
        self.worker = self._hello(first)
        started = self.worker.start(None, BOOT_TIMEOUT_S)
        need = (HWC_BUFFER_PAGES + (KEPT_VPORT_PAGES if cfg.datapath_keepalive else 0)) * cfg.nics
        if pool < need:
            self.warnings.append(f"private pool of {pool} pages is smaller than the {need} pages the NICs' persistent "
                                 "allocations need: MANA keepalive is not possible for every NIC")
        elif pool < (need := need + NVME_QUEUE_PAGES * cfg.nvme):
            self.warnings.append(f"private pool of {pool} pages is smaller than the {need} pages the NICs' and NVMe "
                                 "controllers' persistent allocations need: NVMe keepalive is not possible for every "
                                 "disk")
        self.warnings += [f"nic {n.pci_id}: {n.error}" for n in started.nics if n.error]
        self.warnings += [f"nvme {n.pci_id}: {n.error}" for n in started.nvme if n.error]
        for w in self.warnings:
            kv(log, logging.WARNING, "boot warning", warning=w)
        self._publish_nics(started.nics, "boot")
        kv(log, logging.INFO, "host booted", nics=cfg.nics, nvme=cfg.nvme, pool_pages=pool, worker_pid=self.worker.pid,
           paths=",".join(n.restore_path for n in (*started.nics, *started.nvme)))

    def _teardown(self) -> None:
        for who, pid in self._children():  # continued, a stopped child stops in order as the others do (the worker
            if proc.process_state(pid) == "T":  # shuts its NICs down): it was ended after timeouts
                kv(log, logging.WARNING, "continuing a stopped child to stop it", child=who)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
        if self.guest_traffic is not None:  # the guest first: no frames pushed at a NIC shutting down
            self.guest_traffic.close()
        if self.guest_disks is not None:
            self.guest_disks.close()
        if self.guest_net is not None:
            self.guest_net.end_bridges()
        outcome = self._end_worker()
        for d in [*self.devices, *self.nvme_devices]:
            kv(log, logging.INFO, "device ended", pci_id=d.pci_id, exit_status=d.end())
        for path in self._temp_disks:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        if self._temp_disks:
            forget_created(self.run_dir)
        if self.guest_net is not None:  # after the devices: their TAPs are gone, nothing runs inside but leftovers
            self.guest_net.remove_namespaces()
        for c in [*self.channels, *self.block_channels]:
            c.close()
        if self.mem is not None:
            self.mem.close()
        self.stop_outcome = outcome
        kv(log, logging.INFO, "host stopped", servicings=self.servicings, worker=outcome["worker"],
           nics_shut_down=len(outcome["nics_shut_down"]))

    def _end_worker(self) -> dict:
        """The teardown's end of the worker: a normal shutdown of its NICs (and NVMe controllers) when it can take
        one; what happened (`stop_outcome`), which `vfkeep stop` says instead of "NICs shut down" whatever the case."""
        nics = [self.devices[i].pci_id for i in self.configured if i < len(self.devices)]
        nvme = [d.pci_id for d in self.nvme_devices]
        owned = " and ".join(filter(None, (_count(len(nics), "NIC"), nvme and _count(len(nvme), "NVMe controller"))))
        its = f"its {owned} {'were' if len(nics) + len(nvme) > 1 else 'was'}" if nics or nvme else None
        if self.worker is None:
            return stop_outcome("none", [], [], "no worker was running: no NIC was shut down")
        w = f"worker {self.worker.generation} (pid {self.worker.pid})"
        if self.worker.state_taken:  # saved for a servicing the stop abandoned: it answers no shutdown
            self.worker.dismiss(5.0)  # (asked anyway, the teardown waited 10 s for the Bye)
            outcome = stop_outcome("abandoned_servicing", [], [], f"{w} had saved its state for the servicing the "
                                   f"stop abandoned: {f'{its} left as saved, not shut down' if its else 'it had no NIC'}")
        elif self.worker.alive():
            try:
                self.worker.request(Shutdown(), 10.0, Bye)
            except WorkerFailed as e:
                kv(log, logging.WARNING, "worker did not shut down cleanly", error=str(e))
                outcome = stop_outcome("no_shutdown", [], [], f"{w} did not confirm its shutdown ({e}); it was ended"
                                       + (f": {its} perhaps not shut down" if its else ""))
            else:
                outcome = stop_outcome("shut_down", nics, nvme,
                                       f"{w} shut {owned} down" if its else f"{w} had no NIC to shut down")
        else:
            how = proc.exit_description(self.worker.child.returncode)
            outcome = stop_outcome("dead", [], [], f"{w} had exited ({how}): "
                                   + (f"{its} not shut down" if its else "it had no NIC"))
        code = self.worker.end()
        kv(log, logging.INFO, "worker shut down", generation=self.worker.generation, exit_status=code)
        self.worker = None
        return outcome

    # -- workers ---------------------------------------------------------------------------------
    def worker_env(self, extra: dict[str, str]) -> dict[str, str]:
        """The caller's environment, OpenVMM's test-harness defaults where unset, then overrides."""
        env = dict(os.environ)
        env.setdefault(MANA_KEEPALIVE_ENV, "host,privatepool")
        if self.config.nvme:  # the boot shim's string when the host advertises NVMe keepalive and a pool exists
            env.setdefault(NVME_KEEPALIVE_ENV, "host,privatepool")
        if self.config.datapath_keepalive:
            env[DATAPATH_KEEPALIVE_ENV] = "1"
        if POOL_OVERRIDE_ENV not in env and POOL_CONFIG_ENV not in env:
            env[POOL_OVERRIDE_ENV] = str(self.mem.layout.pool_pages)
        env.update(self.config.worker_env)
        env.update(extra)
        return env

    def _spawn_worker(self, extra_env: dict[str, str], worker_cmd: str | None,
                      configured: list[int]) -> WorkerProcess:
        self.generation += 1
        args = ["--run-dir", self.run_dir, "--generation", str(self.generation), "--memfd", str(self.mem.fd),
                "--memory-layout", self.mem.layout.to_str()]
        fds = [self.mem.fd]
        if self.channel_layout is not None:
            args += ["--channel-layout", self.channel_layout.to_str()]
        for i in configured:
            tx, rx = self.channels[i].bell_fds()
            args += ["--nic", NicConfig(i, self.devices[i].pci_id, self.devices[i].socket, tx, rx).to_arg()]
            fds += [tx, rx]
        if self.block_layout is not None:
            args += ["--block-layout", self.block_layout.to_str()]
        for d, ch in zip(self.nvme_devices, self.block_channels):
            req, cpl = ch.bell_fds()
            args += ["--nvme", NvmeConfig(d.index, d.pci_id, d.socket, req, cpl).to_arg()]
            fds += [req, cpl]
        return WorkerProcess.spawn(self.config.worker_argv(worker_cmd), args, fds, self.worker_env(extra_env),
                                   self.generation, self.run_dir)

    def _start_worker(self, extra_env: dict[str, str], worker_cmd: str | None, configured: list[int]) -> WorkerProcess:
        """Spawn a worker and wait for its hello (imports done); a worker that does not come up is ended."""
        return self._hello(self._spawn_early(extra_env, worker_cmd, configured))

    def _spawn_early(self, extra_env: dict[str, str], worker_cmd: str | None, configured: list[int]) -> WorkerProcess:
        """Spawn a worker as the one a stop during the boot (prelaunch) ends; its hello is `_hello`'s to wait for."""
        w = self._starting = self._spawn_worker(extra_env, worker_cmd, configured)
        if self._stopping.is_set() and (not self._booted.is_set() or self.servicing_phase() == "prelaunch"):
            w.kill()  # an interrupted boot's (prelaunch's) stop came during the spawn, before it could see this worker
        return w

    def _hello(self, w: WorkerProcess) -> WorkerProcess:
        """Wait for a spawned worker's hello; one that does not come up is ended."""
        try:
            w.wait_hello(HELLO_TIMEOUT_S)
        except WorkerFailed:
            w.end()
            raise
        return w

    def _supervise(self) -> None:
        """A worker that died outside a servicing is replaced through the fresh path (a NIC is never
        left dead, DESIGN D4). A device process that died is reported once (host log, status warnings):
        nothing restarts it, its NIC or disk is gone for the VM's life."""
        self._report_dead_devices()
        w = self.worker
        if w is None or self._stopped.is_set() or w.alive():
            return
        kv(log, logging.ERROR, "worker died outside servicing, starting a replacement", generation=w.generation,
           pid=w.pid, exit_status=w.child.returncode)
        w.end()
        self._lost_requests = self._disk_positions()
        new = None
        try:
            new = self.worker = self._start_worker({}, None, self.configured)
            self._publish_nics(new.start(None, BOOT_TIMEOUT_S).nics, "replacement")
            self._requeue_lost()
        except WorkerFailed as e:
            kv(log, logging.ERROR, "replacement worker failed", error=str(e))
            if new is not None:
                new.end()  # a hung replacement would look alive forever; dead, the next idle tick retries

    def _guest_io_positions(self) -> tuple[tuple[int, int], ...]:
        """Where the worker side of every guest ring stands (net tx head and rx tail, disk request head and
        completion tail). A restoring worker moves them only once its relays run, i.e. once it has resumed the
        kept devices from the saved state: their queue positions are then past the ones the state records, and a
        replacement resuming them from it would take completions twice and post where the device has been
        (chaos seed 1, servicing 865)."""
        return (*((c.tx.head, c.rx.tail) for c in self.channels),
                *((c.requests.head, c.completions.tail) for c in self.block_channels))

    def _disk_positions(self) -> dict[int, int] | None:
        return self.guest_disks.popped() if self.guest_disks is not None else None

    def _requeue_lost(self) -> None:
        """After a worker stopped with guest disk requests in flight (its save, its death) and the next one
        runs: the guest re-issues them (its disk agents)."""
        lost, self._lost_requests = self._lost_requests, None
        if lost is not None:
            self.guest_disks.requeue(lost)

    # -- servicing -------------------------------------------------------------------------------
    def _phase(self, name: str, at_ns: int | None = None) -> int:
        """The servicing enters phase `name`, now or (`at_ns`, CLOCK_MONOTONIC) when that happened: a phase whose
        start was on the critical path is entered once the path is done, its line stamped with its start. Returns
        the stamp, the one the result's `phases_ms` is measured from too: the event's `ms` is the same number."""
        at_ns = time.monotonic_ns() if at_ns is None else at_ns
        s = self._servicing
        if s is None:  # (a servicing driven by hand, as unit tests do)
            return at_ns
        self.events.publish("phase_done", servicing=s["number"], phase=s["phase"], ms=_ms(s["since_ns"], at_ns))
        s.update(phase=name, since_ns=at_ns)
        kv_at(log, logging.INFO, at_ns, "servicing phase", phase=name)
        return at_ns

    def _prune_worker_logs(self) -> None:
        """Keep the logs of the last `keep_worker_logs` worker generations (the run dir must not grow forever)."""
        oldest = self.generation - self.config.keep_worker_logs
        for name in os.listdir(self.run_dir):
            stem, _, ext = name.partition(".")
            if stem.startswith("worker-") and ext in ("log", "stderr") and stem[7:].isdigit() \
                    and int(stem[7:]) <= oldest:
                try:
                    os.unlink(os.path.join(self.run_dir, name))
                except FileNotFoundError:
                    pass

    def _publish_nics(self, nics, cause: str) -> None:
        """A `nic_state` event for each NIC whose path or error changed (boot: every NIC)."""
        gen = self.worker.generation if self.worker is not None else None
        for n in nics:
            state = (str(n.restore_path), n.error)
            if self._nic_states.get(n.pci_id) != state:
                self._nic_states[n.pci_id] = state
                self.events.publish("nic_state", pci_id=n.pci_id, restore_path=state[0], error=n.error,
                                    worker_generation=gen, cause=cause)

    def _report_dead_devices(self) -> list[str]:
        """Every dead device's line; each new one logged and added to the warnings."""
        deaths = [death for d in [*self.devices, *self.nvme_devices] if (death := d.death())]
        for death in deaths:
            if death not in self.warnings:
                kv(log, logging.ERROR, "device died", detail=death)
                self.warnings.append(death)
        return deaths

    def _service(self, mana_keepalive: bool = False, nvme_keepalive: bool = False, *args, **kwargs) -> dict:
        if self._stopping.is_set():
            raise HostError("host is stopping")
        if deaths := self._report_dead_devices():
            raise HostError(f"{'; '.join(deaths)}: a servicing needs every device running; stop the VM and run it "
                            "again")
        if stopped := self._stopped_children(self._named_devices()):  # (its worker's save or restore would wait out their timeouts on it)
            raise HostError(f"{'; '.join(stopped)}: a servicing needs every device running")
        self._servicing = {"phase": "prelaunch", "since_ns": time.monotonic_ns(), "started": time.time(), "next": None,
                           "number": self.servicings + 1}
        self._idle.clear()
        try:
            return self._service_one(mana_keepalive, nvme_keepalive, *args, **kwargs)
        except HostError as e:
            if self._servicing["number"] == self.servicings:  # it had started: it failed, before any result
                self._record_failed(str(e), mana_keepalive, nvme_keepalive)
            raise
        finally:
            self._servicing = None
            self._idle.set()

    def _service_one(self, mana_keepalive: bool = False, nvme_keepalive: bool = False, timeout: float | None = None,
                     test_config: str | None = None, next_env: dict[str, str] | None = None,
                     next_worker_cmd: str | None = None, nics: list[int] | None = None,
                     tamper: str | None = None, kill_point: str | None = None) -> dict:
        """One servicing (DESIGN §1): prelaunch, save, scrub, hand the blob over, restore; D4 on failure."""
        timeout_s = _timeout(timeout)
        # Checked before it counts as a servicing: a value of the wrong type failed after `servicing_started`.
        for name, flag in (("mana_keepalive", mana_keepalive), ("nvme_keepalive", nvme_keepalive)):
            if not isinstance(flag, bool):
                raise HostError(f"{name} must be true or false, got {flag!r}")
        if next_env is not None and not (isinstance(next_env, dict) and all(
                isinstance(k, str) and isinstance(v, str) for k, v in next_env.items())):
            raise HostError(f"next_env must be an object of strings, {{KEY: VALUE}}, got {next_env!r}")
        if next_worker_cmd is not None and not isinstance(next_worker_cmd, str):
            raise HostError(f"next_worker_cmd must be a command line (a string), got {next_worker_cmd!r}")
        if kill_point is not None:
            try:
                kill_points.check(kill_point)
            except kill_points.UnknownKillPoint as e:
                raise HostError(str(e)) from None
        if tamper is not None and tamper not in TAMPER_MODES:
            raise HostError(f"unknown tamper mode {tamper!r}; known: {', '.join(TAMPER_MODES)}")
        if test_config is not None and (not isinstance(test_config, str) or test_config.upper() not in
                                        SAVE_TEST_CONFIGS):
            raise HostError(f"unknown test config {test_config!r}; known: {', '.join(SAVE_TEST_CONFIGS)}")
        if nics is not None:
            if not isinstance(nics, list) or not nics:
                raise HostError(f"nics must name at least one NIC of [0, {len(self.devices)}), got {nics!r}")
            bad = [i for i in nics if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < len(self.devices)]
            if bad:
                raise HostError(f"nics {bad} out of range [0, {len(self.devices)})")
        old = self.worker
        if old is None or not old.alive():
            raise HostError("no running worker to service")
        self.servicings += 1
        self.events.publish("servicing_started", servicing=self.servicings, mana_keepalive=bool(mana_keepalive),
                            nvme_keepalive=bool(nvme_keepalive),
                            nics=[self.devices[i].pci_id for i in (self.configured if nics is None else sorted(set(nics)))])
        before = {"nics": [d.snapshot() for d in self.devices], "nvme": [d.snapshot() for d in self.nvme_devices],
                  "disks": self.guest_disks.snapshot() if self.guest_disks is not None else {}}
        errors: list[str] = []
        next_env = dict(next_env or {})
        if kill_point in kill_points.RESTORE_POINTS:
            next_env[kill_points.KILL_POINT_ENV] = kill_point
        configured = self.configured if nics is None else sorted(set(nics))

        t_pre = time.monotonic_ns()
        if self._servicing is not None:  # the prelaunch phase starts here: its event's ms is `prelaunch_ms`
            self._servicing["since_ns"] = t_pre
        new = None
        if self.config.prelaunch:
            try:
                new = self._servicing["next"] = self._start_worker({**next_env, PRELAUNCHED_ENV: "1"},
                                                                   next_worker_cmd, configured)
                # It asks for the saved state now; the host reads that request now and answers it once it has the
                # state, so no start/request round trip is left inside the window (spec §2.5 order unchanged).
                new.begin_servicing()
                new.take_state_request(STATE_REQUEST_WAIT_S)
            except WorkerFailed as e:
                if new is not None:
                    new.end()
                if self._stopping.is_set():  # (its stop ended it: `_abandon_prelaunch`)
                    raise HostError("servicing abandoned before the save: the host is stopping") from None
                raise HostError(f"servicing failed before the save: the next worker did not start (the current "
                                f"worker, untouched, runs on): {e}") from None
        if self._stopping.is_set():  # the last point where the old worker is untouched: no save
            if new is not None:
                new.end()
            raise HostError("servicing abandoned before the save: the host is stopping")
        retiring: WorkerProcess | None = None  # the old worker once the next one runs, until `_retire` ends it

        try:
            # The host's lines are written once the next worker has started (or the servicing ended): each one
            # formatted and written in the window is CPU taken from the blackout (the save phase's own line too).
            vlog.hold_lines()
            # Save: the old worker stops its relay and saves (spec §2.2).
            t0 = window_start = self._phase("save")
            prelaunch_ms = _ms(t_pre, t0)
            correlation_id = str(uuid.uuid4())
            blob, saved = None, None
            request = Save(capability_word(mana_keepalive=bool(mana_keepalive), nvme_keepalive=bool(nvme_keepalive)),
                           timeout_hint(DEFAULT_TIMEOUT_S if timeout is None else timeout), correlation_id, test_config,
                           kill_point if kill_point in kill_points.SAVE_POINTS else None)
            early: dict = {}

            def hand_ahead(state: bytes) -> None:
                """The old worker's last chunk says SUCCESS: it has saved and released its devices. Its state goes
                ahead (MORE_DATA) to the prelaunched worker, which reads and decodes it meanwhile, worker RAM is
                scrubbed, and the go (`hand_over`) follows the scrub at once, then the old worker's answer; the
                message's report is decoded after those (a malformed one no longer holds the complete state back: see
                below), then the bookkeeping. No go while the host is stopping, nor to a worker the state could not
                go ahead to (then as before: after the decode)."""
                early.update(mono=time.monotonic_ns())
                handed = tamper_blob(state, tamper, self.mem.layout) if tamper else state
                early.update(state=state, handed=handed)
                offered = new.offer_state(handed)
                # Where the guest rings stand: nothing moves them until the next worker's relays run, after the go.
                early["io"] = self._guest_io_positions()
                self.mem.scrub_worker_ram()
                if offered and not self._stopping.is_set():
                    try:
                        # Stamped before it is sent: the woken worker often takes this CPU at once, and a stamp
                        # taken after the send came when the host got it back (up to 6 ms later under load).
                        go = time.monotonic_ns()
                        new.hand_over(handed, timeout_s)  # (only the go)
                        # The restore's time (`timeout`) runs from the go, the wait below included.
                        early.update(go=go, deadline=time.monotonic() + timeout_s)
                    except WorkerFailed:  # gone: not this save's failure; the hand_over below meets it again
                        return
                    # The state is kept now whatever the report holds. With NVMe controllers the old worker's answer
                    # goes at once (it then releases what it still holds: NVMe handles the next worker attaches to)
                    # and the woken worker, often queued on this CPU (the scheduler places a wakee by its waker),
                    # runs before the decode and the bookkeeping below. Without, the next worker needs nothing of
                    # the old one, and the host keeps off the two CPUs until the next worker's first message (its
                    # restore's end) or QUIET_AFTER_GO_S: the old worker's answer (its wake-up) and the report's
                    # decode and bookkeeping took 0.3-0.6 ms of CPU right after the go, when the next worker's
                    # restore and the device serving its attach need them (inside the guest's blackout).
                    if self.config.nvme:
                        old.answer_kept()
                        os.sched_yield()
                    else:
                        new.wait_message(min(QUIET_AFTER_GO_S, timeout_s))
                        old.answer_kept()

            try:
                saved, blob = old.save(request, timeout_s, grace=1.0, ahead=hand_ahead if new is not None else None,
                                       answer=False)
                if saved.status is TransferStatus.SUCCESS:  # its relays stopped before it saved
                    self._lost_requests = self._disk_positions()
            except WorkerFailed as e:
                errors.append(f"save: {e}")
                if new is not None and new.handed_over:
                    # The go went with the scrub: the state was complete (its frame said SUCCESS, every byte in
                    # bounds) and the next worker restores from it, validating it as any state; only the report
                    # the old worker sent with it is unusable. The old worker (answered: the state is kept) is ended.
                    kv(log, logging.ERROR, "worker's last save message unusable; its state, complete and handed "
                       "over, is kept", error=str(e))
                    saved, blob = SaveState(TransferStatus.SUCCESS), early["state"]
                    old.end()
                    self._lost_requests = self._disk_positions()
                else:
                    kv(log, logging.ERROR, "worker failed during save; starting a new worker anyway (D4)",
                       error=str(e))
            t_saved = early.get("mono") or time.monotonic_ns()

            if saved is not None and saved.status is TransferStatus.FAILURE:
                # Spec §2.4: the old worker keeps running (it revived its NICs); no new worker.
                if new is not None:
                    new.end()
                self._phase("measure", at_ns=t_saved)
                window = (window_start, time.monotonic_ns())
                phases = {"save": _ms(t0, t_saved), "handoff": None, "replacement": None, "restore": None,
                          "total": _ms(t0, t_saved)}
                result = self._result(False, mana_keepalive, nvme_keepalive, saved.revived, saved.revived_nvme, (),
                                      before, phases, f"save failed: {saved.error}", window, saved=saved, old=old,
                                      new=old)
                return self._record(result, saved=saved, started=None, prelaunch_ms=prelaunch_ms, worker=old,
                                    window=window)
            if self._stopping.is_set() and not (new is not None and new.handed_over):
                # The host is stopping (its interrupt ended the worker): no new worker, the teardown follows. A
                # worker that did not answer its save is stuck: ended now, not asked for a clean shutdown. (One
                # that got the go restores, as after any go: the stop waits for its safe point.)
                if saved is None:
                    old.kill()
                    old.wait_exit(5.0)  # reaped before the teardown looks: it must not ask a killed worker
                else:
                    old.answer_kept()  # (it idles until the teardown ends it)
                raise HostError(f"servicing abandoned: the host is stopping ({'; '.join(errors) or 'after the save'})")
            # Handoff: worker RAM is poisoned and the blob handed over (with a prelaunched worker: done by
            # `hand_ahead` already, but for the go). A worker that sent `saved` has released its devices and
            # touches nothing any more, so the state file waits until the next worker is up and its exit until the
            # window is measured (off the critical path, `_retire`); one that failed (D4) may still run: ended
            # first, then its RAM scrubbed (again).
            if saved is not None and early:
                handed, io_at_handoff = early["handed"], early["io"]
            else:
                handed = tamper_blob(blob, tamper, self.mem.layout) if blob is not None and tamper else blob
                self._phase("handoff" if saved is not None else "replacement", at_ns=t_saved)  # (as phases_ms)
                if saved is None:
                    old.end()
                    self._lost_requests = self._disk_positions()
                    if new is not None:  # it waits for a saved state there is none of: D4 starts one without
                        new.end()
                        new = None
                io_at_handoff = self._guest_io_positions()
                self.mem.scrub_worker_ram()
            if new is None:
                try:
                    new = self._start_worker(next_env, next_worker_cmd, configured)
                except WorkerFailed as e:  # the old worker is gone: any worker is better than none (D4)
                    errors.append(f"next worker: {e}")
                    new = self._start_worker({}, None, configured)
            self.worker, self.configured = new, configured
            started = None
            t_handoff = early.get("go") or time.monotonic_ns()  # (the handoff ends with the go)
            deadline = early.get("deadline") or time.monotonic() + timeout_s
            try:
                try:
                    if handed is not None:
                        new.hand_over(handed, timeout_s, deadline)  # (unless `hand_ahead` sent the go)
                finally:
                    if saved is not None:
                        old.answer_kept()
                    if saved is not None and early:
                        self._phase("handoff", at_ns=early["mono"])
                    self._phase("restore", at_ns=t_handoff)
                started = new.start(handed, timeout_s, deadline)
            except WorkerFailed as e:
                # The new worker hung or died before it finished restoring: replace it, with the same blob
                # unless the dead worker had resumed guest IO from it (then the devices moved past it).
                errors.append(f"restore: {e}")
                kv(log, logging.ERROR, "new worker failed to restore, starting a replacement", error=str(e))
                new.end()
                again = handed
                if handed is not None and self._guest_io_positions() != io_at_handoff:
                    kv(log, logging.WARNING, "the failed worker had resumed guest IO: its saved state is stale, "
                       "the replacement starts without it")
                    errors.append("replacement: without the saved state (the failed worker had resumed guest IO)")
                    again = None
                started = self._replace_worker(again, next_worker_cmd, configured, timeout_s, errors)
            finally:
                t_done = time.monotonic_ns()
                window = (window_start, t_done)
                vlog.write_held_lines()
                if saved is not None:
                    self._keep_handed_state(blob, handed)
                    retiring = old
            self._requeue_lost()
            self._phase("measure", at_ns=t_done)
            if started.error:
                errors.append(started.error)
            # No state handed over (the save failed, D4): no handoff phase; ending the failed worker and starting
            # one without state is `replacement` instead (null otherwise), so the phases add up to the total.
            between = _ms(t_saved, t_handoff)
            phases = {"save": _ms(t0, t_saved), "handoff": None if saved is None else between,
                      "replacement": between if saved is None else None, "restore": _ms(t_handoff, t_done),
                      "total": _ms(t0, t_done)}
            result = self._result(not errors, mana_keepalive, nvme_keepalive, started.nics, started.nvme,
                                  started.unclaimed_pool_allocations, before, phases, "; ".join(errors) or None,
                                  window, saved=saved, old=old, new=self.worker)
            if retiring is not None:
                retiring, done = None, retiring
                self._retire(done)
            return self._record(result, saved=saved, started=started, prelaunch_ms=prelaunch_ms, worker=self.worker,
                                window=window)
        except BaseException:
            if retiring is not None:
                self._retire(retiring)
            # Never leak the prelaunched (or just started) next worker: it is nobody's once we raise.
            if new is not None and new is not self.worker:
                new.end()
            raise
        finally:
            vlog.write_held_lines()

    def _retire(self, old: WorkerProcess) -> None:
        """The old worker, idle since it handed its state over, is dismissed once the next one runs and the
        servicing window is measured (on an error, at once), ended if it does not exit. Its exit (1-3 ms of CPU,
        the kernel freeing its address space) came right after `started` before, on the same two CPUs as the new
        relay's first passes and the guest's receiver catching up: it made the guest's blackout longer."""
        if old.dismiss(5.0) is None:
            kv(log, logging.WARNING, "old worker did not exit after save, ending it", pid=old.pid)
        old.end()

    def _keep_handed_state(self, blob: bytes | None, handed: bytes | None) -> None:
        """The blob the new worker was given is kept in the run dir for `vfkeep state decode` (STATE_FILE); when
        a test hook tampered with it, the old worker's own save is kept beside it (UNTAMPERED_STATE_FILE)."""
        untampered = os.path.join(self.run_dir, UNTAMPERED_STATE_FILE)
        if handed is not None:
            with open(os.path.join(self.run_dir, STATE_FILE), "wb") as f:
                f.write(handed)
        if blob is not None and handed is not None and handed != blob:
            with open(untampered, "wb") as f:
                f.write(blob)
        elif os.path.exists(untampered):
            os.unlink(untampered)  # of an earlier servicing: it would pass for this one's

    def _replace_worker(self, blob: bytes | None, worker_cmd: str | None, configured: list[int], timeout_s: float,
                        errors: list[str]) -> Started:
        """The next worker failed before `started`: a replacement gets the same blob; if that one fails too
        (the blob or the command hangs it), a default worker starts without state, so the NICs come back
        through the fresh path (D4) — in the default time, as a servicing's `timeout` too short for any
        worker must not leave none. A worker that did not start is ended, never left current."""
        attempts = [(worker_cmd, blob, timeout_s), (None, None, max(timeout_s, DEFAULT_TIMEOUT_S))]
        for i, (cmd, state, limit) in enumerate(attempts):
            if self._stopping.is_set():
                raise HostError(f"servicing abandoned: the host is stopping ({'; '.join(errors)})")
            self._lost_requests = self._disk_positions()  # what the ended workers had taken is theirs no more
            try:
                w = self._start_worker({}, cmd, configured)  # (ended by _start_worker if it fails)
                self.worker = w
                return w.start(state, limit)
            except WorkerFailed as e:
                if self.worker is not None:
                    self.worker.end()  # dead, so the idle tick replaces it if this was the last attempt
                errors.append(f"replacement: {e}")
                kv(log, logging.ERROR, "replacement worker failed to start", attempt=i + 1, error=str(e),
                   with_state=state is not None)
                if i == len(attempts) - 1:
                    raise
        raise AssertionError("unreachable")

    def _result(self, ok: bool, mana: bool, nvme: bool, nics: tuple[NicRestore, ...], disks: tuple[NicRestore, ...],
                unclaimed: tuple[UnclaimedAllocation, ...], before: dict, phases: dict, error: str | None,
                window: tuple[int, int], *, saved: SaveState | None, old: WorkerProcess,
                new: WorkerProcess | None) -> ServicingResult:
        """The servicing result of DESIGN §10; device_reset / hwc_established come from the device, each NIC's
        reason and the status from what the workers reported (host/outcome.py). The guest's numbers first: they
        wait for the window's frames to come back, and the device's control requests would compete with the
        recovering data path for the device's one loop."""
        blackout_ms, frames_lost = self._traffic_window(*window)
        io_blackout_ms, io_errors = (self.guest_disks.window(before["disks"], *window) if self.guest_disks is not None
                                     else (None, None))
        by_pci = {d.pci_id: (d, b) for d, b in zip(self.devices, before["nics"])}
        outcomes = {o.pci_id: o for o in saved.nics} if saved is not None else {}
        old_cfg, new_cfg = _keepalive_config(old, "mana"), _keepalive_config(new, "mana")
        out, degraded = [], []
        for n in nics:
            dev, snap = by_pci[n.pci_id]
            seen = dev.since(snap)
            reason, worse = nic_reason(bool(mana), n.restore_path, n.error, outcomes.get(n.pci_id), old_cfg, new_cfg)
            degraded.append(worse)
            out.append(NicResult(n.pci_id, n.restore_path, seen["device_reset"], seen["hwc_established"],
                                 seen["device_resets"], seen["hwc_requests"], seen["smc_messages"], n.error, reason,
                                 RestorePath.KEEPALIVE if mana else RestorePath.FRESH))
        nvme_by_pci = {d.pci_id: (d, b) for d, b in zip(self.nvme_devices, before["nvme"])}
        nvme_outcomes = {o.pci_id: o for o in saved.nvme} if saved is not None else {}
        old_cfg, new_cfg = _keepalive_config(old, "nvme"), _keepalive_config(new, "nvme")
        nvme_out = []
        for n in disks:
            dev, snap = nvme_by_pci[n.pci_id]
            seen = dev.since(snap)
            reason, worse = nic_reason(bool(nvme), n.restore_path, n.error, nvme_outcomes.get(n.pci_id), old_cfg,
                                       new_cfg, kind="NVMe")
            degraded.append(worse)
            nvme_out.append(NvmeResult(n.pci_id, n.restore_path, seen["device_reset"], seen["controller_enabled"],
                                       n.error, reason, RestorePath.KEEPALIVE if nvme else RestorePath.FRESH,
                                       tuple(seen["admin_commands"])))
        for dev in (*self.devices, *self.nvme_devices):  # the servicing's lines each holds since the disconnect
            with contextlib.suppress(rpc.RpcError):  # (in its log when we answer; a dead device has none to write)
                dev.call("write_log")
        return ServicingResult(ok, bool(mana), bool(nvme), tuple(out), unclaimed, phases, blackout_ms, frames_lost,
                               self.config.timing.to_dict(), error, servicing_status(not ok, degraded),
                               tuple(nvme_out), io_blackout_ms, io_errors)

    def _record_failed(self, error: str, mana: bool, nvme: bool) -> None:
        """A servicing that started and failed without a result (its next worker did not start, or the host's stop
        abandoned it) is the last servicing as any failed one: `status` told of the one before it."""
        result = ServicingResult(False, bool(mana), bool(nvme), (), (), dict.fromkeys(
            ("save", "handoff", "replacement", "restore", "total")), timing=self.config.timing.to_dict(), error=error,
            status=servicing_status(True, []))
        self.last_servicing = {"result": result.to_json(), "at": time.time(), "window_ns": None,
                               "prelaunch": self.config.prelaunch, "prelaunch_ms": None,
                               "worker_generation": self.worker.generation if self.worker is not None else None,
                               "save_outcomes": None, "worker_save_phases_ms": None, "worker_restore_phases_ms": None,
                               "worker_nics": None}
        with open(os.path.join(self.run_dir, "last_servicing.json"), "w") as f:
            json.dump(self.last_servicing, f, indent=1)
        self.events.publish("servicing_completed", servicing=self.servicings, status=str(result.status), ok=False,
                            error=error, phases_ms=result.phases_ms, nics=[], nvme=[], io_blackout_ms=None,
                            io_errors=None)

    def _traffic_window(self, start_ns: int, end_ns: int) -> tuple[float | None, int | None]:
        """Blackout and frames lost in [start_ns, end_ns] (CLOCK_MONOTONIC), from the guest traffic agents
        when traffic runs; null otherwise."""
        if self.guest_traffic is None:
            return None, None
        return self.guest_traffic.window(start_ns, end_ns)

    def _record(self, result: ServicingResult, *, saved: SaveState | None, started: Started | None,
                prelaunch_ms: float, worker: WorkerProcess, window: tuple[int, int]) -> dict:
        """Keep the result (`inspect last_servicing`, last_servicing.json) and return its JSON form."""
        self.last_servicing = {
            "result": result.to_json(), "at": time.time(), "window_ns": list(window),
            "prelaunch": self.config.prelaunch, "prelaunch_ms": prelaunch_ms,
            "worker_generation": worker.generation,
            "save_outcomes": [n.to_json() for n in saved.nics] if saved else None,
            "worker_save_phases_ms": saved.phases_ms if saved and saved.status is TransferStatus.SUCCESS else None,
            "worker_restore_phases_ms": started.phases_ms if started else None,
            "worker_nics": [n.to_json() for n in started.nics] if started else None,
        }
        with open(os.path.join(self.run_dir, "last_servicing.json"), "w") as f:
            json.dump(self.last_servicing, f, indent=1)
        self._phase("done")
        self.events.publish("servicing_completed", servicing=self.servicings, status=str(result.status), ok=result.ok,
                            error=result.error, phases_ms=result.phases_ms,
                            nics=[{"pci_id": n.pci_id, "restore_path": str(n.restore_path), "reason": n.reason}
                                  for n in result.nics],
                            nvme=[{"pci_id": n.pci_id, "restore_path": str(n.restore_path), "reason": n.reason}
                                  for n in result.nvme], io_blackout_ms=result.io_blackout_ms,
                            io_errors=result.io_errors)
        self._publish_nics(result.nics, "servicing")
        self._prune_worker_logs()
        devices = (*result.nics, *result.nvme)
        kv(log, logging.INFO, "servicing done", status=result.status, total_ms=result.phases_ms["total"],
           paths=",".join(n.restore_path for n in result.nics), nvme_paths=",".join(n.restore_path for n in result.nvme),
           error=result.error, reasons="; ".join(f"{n.pci_id}: {n.reason}" for n in devices if n.reason))
        return self.last_servicing["result"]

    # -- inspection ------------------------------------------------------------------------------
    def _status(self) -> dict:
        w, last = self.worker, self.last_servicing
        return {"host_pid": os.getpid(), "version": __version__, "run_dir": self.run_dir,
                "nics": len(self.devices), "configured_nics": list(self.configured),
                "ring_slots": self.config.ring_slots,
                "worker": None if w is None else {"pid": w.pid, "generation": w.generation, "alive": w.alive(),
                                                   "compat": w.hello.compat if w.hello else None},
                "devices": [{"pci_id": d.pci_id, "pid": d.child.pid, "alive": d.alive()} for d in self.devices],
                "nvme_devices": [{"pci_id": d.pci_id, "pid": d.child.pid, "alive": d.alive(), "disk": d.disk}
                                 for d in self.nvme_devices],
                "guest": self.config.guest,
                "bridges": [{"nic": b.nic, "pid": b.child.pid, "alive": b.child.poll() is None}
                            for b in self.guest_net.bridges.values()] if self.guest_net else [],
                "servicing": self._servicing_view(), "servicings": self.servicings,
                "last_servicing_ok": None if last is None else last["result"]["ok"],
                "last_servicing_status": None if last is None else last["result"]["status"],
                "warnings": self.warnings + self._stopped_children(), "event_subscribers": self.events.subscribers}

    def _stopped_children(self, named: list[tuple[str, int]] | None = None) -> list[str]:
        """A line for each child process (of `named`, (name, pid) pairs; default: every child) stopped by SIGSTOP:
        it answers nothing until continued, while `alive` says only that it exists (status showed a stopped worker
        or device as alive, and nothing else; probe and inspect waited out their timeouts on it)."""
        return [line for who, pid in (self._children() if named is None else named)
                if (line := proc.stopped_line(who, pid))]

    def _children(self) -> list[tuple[str, int]]:
        """(name, pid) of every child process: worker, devices, guest bridges and agents."""
        named = self._named_worker() + self._named_devices()
        if self.guest_net is not None:
            named += [(f"nic {b.nic}: its guest bridge (pid {b.child.pid})", b.child.pid)
                      for b in list(self.guest_net.bridges.values())]
        for pool in (self.guest_traffic, self.guest_disks):
            named += self._named_agents(pool)
        return named

    @staticmethod
    def _named_agents(pool, index: int | None = None) -> list[tuple[str, int]]:
        """(name, pid) of the running agents of `pool` (guest traffic or disks; None: none), or of its `index`."""
        return [] if pool is None else [(f"{pool.noun} {a.index}: its {pool.what} (pid {a.child.pid})", a.child.pid)
                                        for a in pool.running() if index is None or a.index == index]

    def _named_worker(self) -> list[tuple[str, int]]:
        w = self.worker
        return [] if w is None else [(f"worker {w.generation} (pid {w.pid})", w.pid)]

    def _named_devices(self, devices=None) -> list[tuple[str, int]]:
        """(name, pid) of `devices` (default: every MANA and NVMe device process)."""
        return [(f"device {d.pci_id} (pid {d.child.pid})", d.child.pid)
                for d in ([*self.devices, *self.nvme_devices] if devices is None else devices)]

    def _servicing_view(self) -> dict | None:
        """The servicing in progress for status/inspect: {"phase", "phase_s", "elapsed_s"}, None when idle."""
        s = self._servicing
        if s is None:
            return None
        return {"phase": s["phase"], "phase_s": round((time.monotonic_ns() - s["since_ns"]) / 1e9, 3),
                "elapsed_s": round(time.time() - s["started"], 3)}

    def _inspect_host_side(self) -> dict:
        """inspect while the actor runs a servicing: what the host knows without asking the worker."""
        w = self.worker
        tree = self._host_tree()
        tree["worker"] = None if w is None else {
            "pid": w.pid, "generation": w.generation, "alive": w.alive(),
            "note": "a servicing is in progress; the worker's own tree is shown once it completes"}
        tree["devices"], tree["nvme_devices"] = self._devices_tree(self.devices), self._devices_tree(self.nvme_devices)
        return tree

    def _host_tree(self) -> dict:
        return {"host": {"pid": os.getpid(), "version": __version__, "run_dir": self.run_dir,
                         "prelaunch": self.config.prelaunch, "timing": self.config.timing.to_dict(),
                         "backend": self.config.backend, "guest": self.config.guest,
                         "memory": self.mem.layout.to_str(),
                         "channel": self.channel_layout.to_str() if self.channel_layout else None,
                         "block_channel": self.block_layout.to_str() if self.block_layout else None,
                         "warnings": self.warnings + self._stopped_children(),
                         "rings": [{"nic": c.nic, "tx": c.tx.stats().to_dict(), "rx": c.rx.stats().to_dict()}
                                   for c in self.channels]},
                "servicing": self._servicing_view(), "last_servicing": self.last_servicing,
                **({"guest_net": self.guest_net.status()} if self.guest_net else {})}

    def _devices_tree(self, processes: list[DeviceProcess]) -> list[dict]:
        devices = []
        for d in processes:
            entry = {"pci_id": d.pci_id, "pid": d.child.pid, "socket": d.socket, "alive": d.alive()}
            if stopped := self._stopped_children(self._named_devices([d])):  # (its counters: 5 s of silence)
                entry["error"] = stopped[0]
                devices.append(entry)
                continue
            try:
                entry["counters"] = d.call("counters")
            except Exception as e:  # noqa: BLE001 - a dead device is shown, not fatal
                entry["error"] = str(e)
            devices.append(entry)
        return devices

    def _inspect(self) -> dict:
        self._supervise()  # a worker that died since the last idle tick is replaced before it is shown
        worker = None
        for attempt in range(2):
            if self.worker is None or not self.worker.alive():
                break
            try:
                worker = self.worker.request(Inspect(), 10.0, InspectReply).tree
                break
            except WorkerFailed as e:
                worker = {"error": str(e)}
                if attempt == 0 and self.worker.wait_exit(1.0) is not None:
                    self._supervise()  # it just died: replace it now rather than at the next idle tick
        tree = self._host_tree()
        tree["worker"], tree["devices"] = worker, self._devices_tree(self.devices)
        tree["nvme_devices"] = self._devices_tree(self.nvme_devices)
        return tree

    def _probe(self, nic: int, count: int, timeout: float) -> dict:
        """Act as the guest for a moment: push `count` frames into NIC `nic`'s tx ring and wait for
        them to come back on its rx ring (loopback backend)."""
        if not 0 <= nic < len(self.channels):
            raise HostError(f"nic {nic} out of range [0, {len(self.channels)})")
        if not 1 <= count <= self.channel_layout.slots:
            raise HostError(f"count {count} out of range [1, {self.channel_layout.slots}]")
        if nic not in self.configured:  # nothing would answer: say why rather than "0 of N came back"
            raise HostError(f"nic {nic} is not configured in the worker (configured: "
                            f"{','.join(map(str, self.configured)) or 'none'}; `service --nics` chooses them)")
        named = self._named_worker() + self._named_devices(self.devices[nic:nic + 1])
        if stopped := self._stopped_children(named + self._named_agents(self.guest_traffic, nic)):  # (the frames would not come back: "0/8", after 2 s)
            them = "them" if len(stopped) > 1 else "it"
            raise HostError(f"{'; '.join(stopped)}: a probe of nic {nic} needs {them} running")
        if self.guest_traffic is not None and self.guest_traffic.has_agent(nic):
            # The rings are single-producer/single-consumer and the agent is the guest's producer and consumer:
            # it probes (refused while its traffic runs).
            try:
                r = self.guest_traffic.agent(nic).call("probe", count=count, timeout_s=timeout)
            except (TrafficError, rpc.RpcError) as e:
                raise HostError(f"{e}; nic {nic}'s rings belong to its traffic agent") from None
            return {"nic": nic, "sent": r["sent"], "received": r["received"], "ok": r["received"] == count}
        if self.guest_net is not None and self.guest_net.owns_rings(nic):
            raise HostError(f"nic {nic}'s rings belong to its guest bridge (--guest netns); use `exec {nic} ping ...`")
        ch = self.channels[nic]
        ch.rx.pop_many(ch.rx.slots)  # stale frames from earlier probes
        mac = bytes([0x02, 0, 0, 0, 0, nic])
        base = time.monotonic_ns()
        frames = [make_frame(base + i, 64, time.monotonic_ns(), mac, mac) for i in range(count)]
        pushed = ch.tx.push_many(frames)
        want = {base + i for i in range(pushed)}
        got: set[int] = set()
        deadline = time.monotonic() + timeout
        while want - got and time.monotonic() < deadline:
            ch.rx.wait(max(0.0, deadline - time.monotonic()))
            for f in ch.rx.pop_many(ch.rx.slots):
                parsed = parse_frame(f)
                if parsed is not None:
                    got.add(parsed.seq)
        received = len(want & got)
        return {"nic": nic, "sent": pushed, "received": received, "ok": received == count}


def stop_outcome(worker: str, nics: list[str], nvme: list[str], summary: str) -> dict:
    """What a host's stop did (the host_stopped event's data): `worker` is how its worker ended (shut_down: it
    confirmed the normal shutdown of `nics` / `nvme`; none, dead, no_shutdown, abandoned_servicing, unknown:
    nothing was shut down); `summary`, the sentence `vfkeep stop` prints."""
    return {"worker": worker, "nics_shut_down": nics, "nvme_shut_down": nvme, "summary": summary}


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}" if n else f"no {noun}"


def _keepalive_config(w: WorkerProcess | None, kind: str) -> str | None:
    """A worker's canonical keepalive setting of device kind `kind` ("mana", "nvme"), from its hello (a
    downlevel worker has none: disabled)."""
    hello = getattr(w, "hello", None)
    return None if hello is None else hello.keepalive.get(kind, "disabled")


def _select(tree, path: str | None):
    """Sub-tree at a slash-separated path (`worker/nics/0/pdid`); list items by index."""
    if not path:
        return tree
    node = tree
    parts = [p for p in path.strip("/").split("/") if p]
    for i, part in enumerate(parts):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif isinstance(node, (dict, list)):
            keys = ", ".join(sorted(node)) if isinstance(node, dict) else f"0..{len(node) - 1}" if node else "nothing"
            raise HostError(f"path {path!r}: no {part!r} here (have: {keys})")
        else:  # (was "no 'x' here (have: none)")
            raise HostError(f"path {path!r}: {'/'.join(parts[:i])!r} is a value ({json.dumps(node)}), not a tree")
    return node
