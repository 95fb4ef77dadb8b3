"""NVMe manager: per-controller creation decisions, save and shutdown (spec nvme.md §12-13, servicing §9).

Spawner decision (nvme.md §13.2) for one controller; S = saved driver state for its PCI id, K =
`save_restore_supported` (OPENHCL_NVME_KEEP_ALIVE enabled AND a private pool exists):

  S   K    path
  yes yes  reset_method none; open without reset; `NvmeDriver.restore` on the persistent client
           `nvme_<pci_id>`                                                  restore_path "keepalive"
           ... if the restore fails (bad saved state, controller not ready, device gone): its blocks are
           freed and the fresh path below runs                              restore_path "fallback"
  yes no   attach and free the saved pool pages; open without reset; CC.EN 1→0 and wait RDY=0 (a
           failure there is only warned); close; fresh path, ephemeral client  restore_path "fresh"
  no  any  fresh path                                                       restore_path "fresh"

Fresh path: reset methods `none` then `flr` (only `flr` with OPENHCL_NVME_ALWAYS_FLR=1|true), each
written to the device (the sysfs stand-in) before the attempt; a success after `flr` writes `none` back
(not with ALWAYS_FLR). DMA client `nvme_<pci_id>`: persistent iff K (all queue memory in the pool),
else ephemeral (worker RAM).

The saved pages are freed before the controller is reset, as in the reference; a fresh init resets an
enabled controller (or FLRs it) before it allocates, so nothing is handed them while it may still write
them. If no fresh init succeeds, the controller may still run its old queues there: unless
`clear_existing_state` disables it then, the pages are quarantined (pool slots `Leaked`, never allocated,
carried through saves) until a later fresh init of the controller succeeds.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Mapping

from ..contract import NVME_ALWAYS_FLR_ENV, NicRestore, NicSaveOutcome, NvmeConfig, RestorePath, SaveOutcome
from ..log import kv
from ..memory import DmaError, DmaManager, GuestMemory
from ..nvme_driver.driver import NvmeDriver, reset_controller
from ..nvme_driver.errors import DEVICE_ERRORS
from ..proto import nvme_driver_pb2, underhill_pb2
from ..vfio_user.backing import open_vfio, reset_method_setter
from .block_relay import BlockRelay, unit_name

log = logging.getLogger("vfkeep.worker.nvme")


def always_flr_from_env(environ: Mapping[str, str]) -> bool:
    """`OPENHCL_NVME_ALWAYS_FLR`: `1` or `true` (any case) makes the fresh path use FLR only."""
    return environ.get(NVME_ALWAYS_FLR_ENV, "").lower() in ("1", "true")


def dma_client_name(pci_id: str) -> str:
    return f"nvme_{pci_id}"


@dataclass
class NvmeDisk:
    """One controller as the manager holds it, and how it came up."""

    config: NvmeConfig
    driver: NvmeDriver
    restore_path: RestorePath
    flr: bool = False
    error: str | None = None


def _set_method(cfg: NvmeConfig, method: str) -> None:
    try:
        reset_method_setter(cfg.socket)(method)
    except Exception as e:  # noqa: BLE001 - the reference only warns when sysfs cannot be written
        kv(log, logging.WARNING, "setting reset method failed", pci_id=cfg.pci_id, method=method, error=e)


def release_pending_buffers(client) -> int:
    """Attach and free every saved pool allocation of the client's device (spec 6.2); pages freed."""
    blocks = client.attach_pending_buffers()
    for block in blocks:
        block.free()
    return sum(b.pages for b in blocks)


def create_fresh(cfg: NvmeConfig, mem: GuestMemory, client, *, cpu_count: int, io_queues: int, always_flr: bool,
                 ready_timeout_s: float | None = None) -> tuple[NvmeDriver, bool]:
    """Fresh init over reset methods [none, flr] (or [flr]); returns (driver, flr happened); the last
    error if every attempt failed (the client is then closed: its name is free for a later attempt)."""
    methods = ["flr"] if always_flr else ["none", "flr"]
    for i, method in enumerate(methods):
        _set_method(cfg, method)
        try:
            drv = NvmeDriver.new(open_vfio(cfg.socket, mem, None), client, cfg.pci_id, cpu_count=cpu_count,
                                 io_queues=io_queues, ready_timeout_s=ready_timeout_s)
        except DEVICE_ERRORS as e:
            kv(log, logging.WARNING, "nvme fresh init failed", pci_id=cfg.pci_id, reset_method=method, error=e)
            if i == len(methods) - 1:
                client.close()
                raise
            continue
        if method == "flr" and not always_flr:
            _set_method(cfg, "none")
        return drv, method == "flr"
    raise AssertionError("unreachable")


def clear_existing_state(cfg: NvmeConfig, mem: GuestMemory, ready_timeout_s: float | None) -> str | None:
    """Open without reset, CC.EN 1→0 and wait RDY=0 (spec §13.2); None once the controller is disabled,
    else why not (only warned, as in the reference)."""
    try:
        backing = open_vfio(cfg.socket, mem, None, restore=True)
        try:
            reset_controller(backing, cfg.pci_id, ready_timeout_s)
        finally:
            backing.close()
    except DEVICE_ERRORS as e:
        kv(log, logging.WARNING, "clearing the controller's existing state failed", pci_id=cfg.pci_id, error=e)
        return f"{type(e).__name__}: {e}"
    return None


def create_device(cfg: NvmeConfig, mem: GuestMemory, dma: DmaManager, *, saved, save_restore_supported: bool,
                  cpu_count: int, io_queues: int = 2, always_flr: bool = False,
                  ready_timeout_s: float | None = None) -> NvmeDisk:
    """The spawner decision table of the module docstring. The saved pages are freed before the controller
    is reset (the spec's order); if no fresh init then succeeds and the controller cannot be disabled, they
    are quarantined — never handed out again while it may still write them — until a fresh init resets it."""
    name = dma_client_name(cfg.pci_id)
    saved_pages = dma.saved_pages(name) if saved is not None else []
    try:
        disk = _create_device(cfg, mem, dma, name, saved=saved, save_restore_supported=save_restore_supported,
                              cpu_count=cpu_count, io_queues=io_queues, always_flr=always_flr,
                              ready_timeout_s=ready_timeout_s)
    except DEVICE_ERRORS + (DmaError,):
        if saved_pages and clear_existing_state(cfg, mem, ready_timeout_s) is not None:
            dma.quarantine(name, saved_pages)
        raise
    if disk.restore_path != RestorePath.KEEPALIVE:  # a fresh init reset (or FLRed) the controller
        dma.release_quarantined(name)
    return disk


def _create_device(cfg: NvmeConfig, mem: GuestMemory, dma: DmaManager, name: str, *, saved,
                   save_restore_supported: bool, cpu_count: int, io_queues: int, always_flr: bool,
                   ready_timeout_s: float | None) -> NvmeDisk:
    error = None
    if saved is not None and save_restore_supported:
        _set_method(cfg, "none")
        client = dma.new_client(name, persistent=True)
        backing = None
        try:
            backing = open_vfio(cfg.socket, mem, None, restore=True)
            drv = NvmeDriver.restore(backing, client, cfg.pci_id, saved, cpu_count=cpu_count)
            kv(log, logging.INFO, "nvme device restored for keepalive", pci_id=cfg.pci_id)
            return NvmeDisk(cfg, drv, RestorePath.KEEPALIVE)
        except DEVICE_ERRORS as e:
            error = f"{type(e).__name__}: {e}"
            kv(log, logging.ERROR, "nvme keepalive restore failed, falling back to fresh init", pci_id=cfg.pci_id,
               error=error)
            if backing is not None:
                backing.close()
            release_pending_buffers(client)  # blocks the restore did not attach (it frees its own)
        drv, flr = create_fresh(cfg, mem, client, cpu_count=cpu_count, io_queues=io_queues, always_flr=always_flr,
                                ready_timeout_s=ready_timeout_s)
        return NvmeDisk(cfg, drv, RestorePath.FALLBACK, flr, error)
    if saved is not None:
        kv(log, logging.WARNING, "nvme saved state present but keepalive not supported; clearing the controller",
           pci_id=cfg.pci_id)
        try:
            client = dma.new_client(name, persistent=True)
            try:
                freed = release_pending_buffers(client)
            finally:
                client.close()
            kv(log, logging.INFO, "freed saved nvme buffers", pci_id=cfg.pci_id, pages=freed)
        except DmaError as e:
            kv(log, logging.WARNING, "could not free saved nvme buffers", pci_id=cfg.pci_id, error=e)
        clear_existing_state(cfg, mem, ready_timeout_s)
    client = dma.new_client(name, persistent=save_restore_supported)
    drv, flr = create_fresh(cfg, mem, client, cpu_count=cpu_count, io_queues=io_queues, always_flr=always_flr,
                            ready_timeout_s=ready_timeout_s)
    return NvmeDisk(cfg, drv, RestorePath.FRESH, flr)


def saved_driver_states(state: underhill_pb2.ServicingState | None) -> tuple[dict[str, nvme_driver_pb2.NvmeDriverSavedState],
                                                                          int]:
    """pci_id -> saved driver state (first match), and the saver's cpu_count (field 10000)."""
    if state is None or not state.init_state.HasField("nvme_state"):
        return {}, 0
    manager = state.init_state.nvme_state.nvme_state
    out: dict[str, nvme_driver_pb2.NvmeDriverSavedState] = {}
    for disk in manager.nvme_disks:
        out.setdefault(disk.pci_id, disk.driver_state)
    return out, manager.cpu_count


class NvmeManager:
    """The worker's NVMe manager: one `NvmeDisk` (and guest block relay, when the disk has a channel) per
    configured controller. `NvmeKind` puts it behind the worker's device-kind seam (DESIGN D10).

    `save_restore_supported` = OPENHCL_NVME_KEEP_ALIVE enabled AND a private pool (spec §13.1). In the
    worker's save order (servicing §2.2) the DMA manager is saved first, then `save(keepalive)`: with
    effective NVMe keepalive each driver is saved (a failure makes the whole NVMe state absent, as in the
    reference, §12 item 1; vfkeep then resets every controller so the next worker finds them clean);
    without it each controller is shut down (CC.EN 1→0, memory freed). Either way the relays stop first and
    their in-flight guest requests become "storvsp/<pci_id>" units, replayed by the next worker. Pool pages
    of controllers that were not saved stay in the DMA snapshot; the next worker's validation frees and
    lists them (DESIGN D3/D8).
    """

    kind = "nvme"

    def __init__(self, configs: list[NvmeConfig], mem: GuestMemory, dma: DmaManager, *, keepalive_enabled: bool,
                 cpu_count: int = 2, io_queues: int = 2, always_flr: bool = False, channels: dict | None = None):
        self.configs = configs
        self.mem, self.dma = mem, dma
        self.save_restore_supported = keepalive_enabled and dma.has_pool
        self.cpu_count, self.io_queues, self.always_flr = cpu_count, io_queues, always_flr
        self.channels = channels or {}  # pci_id -> BlockChannel
        self.disks: list[NvmeDisk] = []
        self.relays: dict[str, BlockRelay] = {}
        self._replay: dict[str, list] = {}  # pci_id -> saved guest requests, re-issued at start()
        self.errors: dict[str, str] = {}
        self.create_ms: dict[str, float] = {}

    def client_names(self) -> list[str]:
        return [dma_client_name(c.pci_id) for c in self.configs]

    def restore(self, state: underhill_pb2.ServicingState | None, *, forced_fallback: str | None = None) -> list[dict]:
        """Bring every controller up (keepalive restore where the state and the config allow) and prepare its
        relay with the requests the previous worker had in flight; `start()` starts the relays. One result per
        controller. `forced_fallback`: the saved state cannot be used (why): a controller with saved state
        (every controller, when there is no state) is initialised fresh and reported as a fallback."""
        saved, _ = saved_driver_states(state)
        units = {u.name: u.state for u in state.units} if state is not None else {}
        results = []
        for cfg in self.configs:
            t = time.perf_counter()
            mine = saved.get(cfg.pci_id)
            try:
                disk = create_device(cfg, self.mem, self.dma, saved=None if forced_fallback else mine,
                                     save_restore_supported=self.save_restore_supported, cpu_count=self.cpu_count,
                                     io_queues=self.io_queues, always_flr=self.always_flr)
            except DEVICE_ERRORS + (DmaError,) as e:
                self.errors[cfg.pci_id] = f"{type(e).__name__}: {e}"
                kv(log, logging.ERROR, "nvme device could not be created", pci_id=cfg.pci_id, error=e)
                results.append({"pci_id": cfg.pci_id, "restore_path": RestorePath.FRESH, "flr": False,
                                "error": self.errors[cfg.pci_id]})
                continue
            if forced_fallback and (state is None or mine is not None):
                disk.restore_path, disk.error = RestorePath.FALLBACK, forced_fallback
            self.create_ms[cfg.pci_id] = round((time.perf_counter() - t) * 1000, 3)
            self.disks.append(disk)
            if cfg.pci_id in self.channels:
                name = unit_name(cfg.pci_id)
                self._replay[cfg.pci_id] = BlockRelay.saved_requests(units[name]) if name in units else []
                self.relays[cfg.pci_id] = BlockRelay(self.channels[cfg.pci_id], disk.driver, pci_id=cfg.pci_id)
            results.append({"pci_id": cfg.pci_id, "restore_path": disk.restore_path, "flr": disk.flr,
                            "error": disk.error})
        return results

    def start(self) -> None:
        """Start every relay not running (replaying its saved requests once the restored commands drained)."""
        for pci_id, relay in self.relays.items():
            if not relay.running:
                relay.start(self._replay.pop(pci_id, []))

    def stop(self) -> None:
        """Stop popping guest requests; what is in flight stays in flight."""
        for relay in self.relays.values():
            relay.stop()

    def save(self, keepalive: bool) -> tuple[underhill_pb2.NvmeManagerSavedState | None, list[NicSaveOutcome]]:
        """Stop the relays, then save (effective keepalive) or shut down every controller. Returns field
        10000's payload (None when nothing was saved) and one outcome per controller."""
        self.stop()
        if keepalive and self.save_restore_supported and self.disks:
            state = underhill_pb2.NvmeManagerSavedState(cpu_count=self.cpu_count)
            outcomes = []
            for disk in self.disks:
                try:
                    driver_state = disk.driver.save()
                except DEVICE_ERRORS as e:
                    kv(log, logging.ERROR, "nvme save failed: no NVMe state is saved", pci_id=disk.config.pci_id,
                       error=e)
                    self._abandon_save()
                    failed = f"{type(e).__name__}: {e}"
                    return None, [NicSaveOutcome(d.config.pci_id, SaveOutcome.SAVE_FAILED,
                                                 failed if d is disk else "another controller's save failed")
                                  for d in self.disks]
                state.nvme_disks.add(pci_id=disk.config.pci_id).driver_state.CopyFrom(driver_state)
                outcomes.append(NicSaveOutcome(disk.config.pci_id, SaveOutcome.SAVED))
            kv(log, logging.INFO, "nvme manager saved", disks=len(state.nvme_disks))
            return state, outcomes
        for disk in self.disks:
            disk.driver.shutdown()
        return None, [NicSaveOutcome(d.config.pci_id, SaveOutcome.SHUTDOWN) for d in self.disks]

    def _abandon_save(self) -> None:
        """A save that will not be handed over: every controller is reset and its memory freed."""
        for disk in self.disks:
            if disk.driver.keepalive:
                disk.driver.reset_after_save()
            else:
                disk.driver.shutdown()

    def units(self) -> list[underhill_pb2.SavedStateUnit]:
        """The relays' in-flight guest requests (call after `save`: nothing completes any more)."""
        return [underhill_pb2.SavedStateUnit(name=unit_name(pci_id), state=relay.save().SerializeToString())
                for pci_id, relay in self.relays.items()]

    def revive(self) -> None:
        """After a failed servicing (DESIGN D4): every controller the save touched is reset and initialised
        fresh; each relay comes back with the guest requests that were in flight (call `start()` next)."""
        self._abandon_save()
        old, self.disks = self.disks, []
        for disk in old:
            cfg = disk.config
            disk.driver.dma.close()  # its name passes to the new driver's client
            try:
                new = create_device(cfg, self.mem, self.dma, saved=None,
                                    save_restore_supported=self.save_restore_supported, cpu_count=self.cpu_count,
                                    io_queues=self.io_queues, always_flr=self.always_flr)
            except DEVICE_ERRORS + (DmaError,) as e:
                self.errors[cfg.pci_id] = f"{type(e).__name__}: {e}"
                kv(log, logging.ERROR, "nvme device could not be revived", pci_id=cfg.pci_id, error=e)
                continue
            self.disks.append(new)
            relay = self.relays.pop(cfg.pci_id, None)
            if relay is not None:
                self._replay[cfg.pci_id] = relay.inflight()
                relay.close()
                self.relays[cfg.pci_id] = BlockRelay(self.channels[cfg.pci_id], new.driver, pci_id=cfg.pci_id)

    def reports(self) -> list[NicRestore]:
        """How each controller came up (`started`, `save_state` FAILURE's revived list)."""
        up = {d.config.pci_id: d for d in self.disks}
        out = []
        for cfg in self.configs:
            d = up.get(cfg.pci_id)
            if d is None:
                out.append(NicRestore(cfg.pci_id, RestorePath.FRESH, self.errors.get(cfg.pci_id, "not created")))
            else:
                out.append(NicRestore(cfg.pci_id, d.restore_path, d.error, d.flr, self.create_ms.get(cfg.pci_id, 0.0)))
        return out

    def handed_over(self) -> None:
        """The servicing took the saved state: each saved driver's handle is released without touching the
        controller (a revive would have needed it for the reset)."""
        for disk in self.disks:
            if disk.driver.keepalive:
                disk.driver.release_handle()

    def shutdown(self) -> None:
        """Normal teardown (no servicing): relays stopped, every controller reset."""
        for relay in self.relays.values():
            relay.stop()
            relay.close()
        for disk in self.disks:
            disk.driver.shutdown()

    def inspect(self) -> dict:
        return {"save_restore_supported": self.save_restore_supported,
                "disks": [{"pci_id": d.config.pci_id, "restore_path": d.restore_path, "flr": d.flr, "error": d.error,
                           "driver": d.driver.inspect(),
                           "relay": self.relays[d.config.pci_id].inspect() if d.config.pci_id in self.relays else None}
                          for d in self.disks],
                "errors": dict(self.errors)}
