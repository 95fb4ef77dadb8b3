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
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Mapping

from ..contract import NVME_ALWAYS_FLR_ENV, NvmeConfig, RestorePath
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
    error if every attempt failed."""
    methods = ["flr"] if always_flr else ["none", "flr"]
    for i, method in enumerate(methods):
        _set_method(cfg, method)
        try:
            drv = NvmeDriver.new(open_vfio(cfg.socket, mem, None), client, cfg.pci_id, cpu_count=cpu_count,
                                 io_queues=io_queues, ready_timeout_s=ready_timeout_s)
        except DEVICE_ERRORS as e:
            kv(log, logging.WARNING, "nvme fresh init failed", pci_id=cfg.pci_id, reset_method=method, error=e)
            if i == len(methods) - 1:
                raise
            continue
        if method == "flr" and not always_flr:
            _set_method(cfg, "none")
        return drv, method == "flr"
    raise AssertionError("unreachable")


def create_device(cfg: NvmeConfig, mem: GuestMemory, dma: DmaManager, *, saved, save_restore_supported: bool,
                  cpu_count: int, io_queues: int = 2, always_flr: bool = False,
                  ready_timeout_s: float | None = None) -> NvmeDisk:
    """The spawner decision table of the module docstring."""
    name = dma_client_name(cfg.pci_id)
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
        try:
            backing = open_vfio(cfg.socket, mem, None, restore=True)
            try:
                reset_controller(backing, cfg.pci_id, ready_timeout_s)
            finally:
                backing.close()
        except DEVICE_ERRORS as e:
            kv(log, logging.WARNING, "clearing the controller's existing state failed", pci_id=cfg.pci_id, error=e)
    client = dma.new_client(name, persistent=save_restore_supported)
    drv, flr = create_fresh(cfg, mem, client, cpu_count=cpu_count, io_queues=io_queues, always_flr=always_flr,
                            ready_timeout_s=ready_timeout_s)
    return NvmeDisk(cfg, drv, RestorePath.FRESH, flr)


def save_disks(disks: list[NvmeDisk], cpu_count: int) -> underhill_pb2.NvmeManagerSavedState:
    """Save every controller's driver (§12 item 1); the first failure propagates (the caller then
    saves no NVMe state at all, as the reference does)."""
    state = underhill_pb2.NvmeManagerSavedState(cpu_count=cpu_count)
    for disk in disks:
        state.nvme_disks.add(pci_id=disk.config.pci_id).driver_state.CopyFrom(disk.driver.save())
    return state


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
    configured controller, shaped for the worker's device-kind seam (DESIGN D10): `restore`, `save`,
    `units`, `shutdown`, `inspect`, `client_names`.

    `save_restore_supported` = OPENHCL_NVME_KEEP_ALIVE enabled AND a private pool (spec §13.1). In the
    worker's save order (servicing §2.2) the DMA manager is saved first, then `save(keepalive)`: with
    effective NVMe keepalive each driver is saved (the first failure makes the whole NVMe state absent,
    as in the reference, §12 item 1); without it each controller is shut down (CC.EN 1→0, memory freed).
    Either way the relays stop first and their in-flight guest requests become "storvsp/<pci_id>" units,
    replayed by the next worker. Pool pages of controllers that were not saved stay in the DMA snapshot;
    the next worker's validation frees and lists them (DESIGN D3/D8).
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
        self.relays: dict = {}  # pci_id -> BlockRelay
        self.errors: dict[str, str] = {}

    def client_names(self) -> list[str]:
        return [dma_client_name(c.pci_id) for c in self.configs]

    def restore(self, state: underhill_pb2.ServicingState | None) -> list[dict]:
        """Bring every controller up (keepalive restore where the state and the config allow), then start the
        relays with the requests the previous worker had in flight. One result per controller."""
        saved, _ = saved_driver_states(state)
        units = {u.name: u.state for u in state.units} if state is not None else {}
        results = []
        for cfg in self.configs:
            try:
                disk = create_device(cfg, self.mem, self.dma, saved=saved.get(cfg.pci_id),
                                     save_restore_supported=self.save_restore_supported, cpu_count=self.cpu_count,
                                     io_queues=self.io_queues, always_flr=self.always_flr)
            except DEVICE_ERRORS + (DmaError,) as e:
                self.errors[cfg.pci_id] = f"{type(e).__name__}: {e}"
                kv(log, logging.ERROR, "nvme device could not be created", pci_id=cfg.pci_id, error=e)
                results.append({"pci_id": cfg.pci_id, "restore_path": RestorePath.FRESH, "error": self.errors[cfg.pci_id]})
                continue
            self.disks.append(disk)
            channel = self.channels.get(cfg.pci_id)
            if channel is not None:
                replay = BlockRelay.saved_requests(units[unit_name(cfg.pci_id)]) \
                    if unit_name(cfg.pci_id) in units else []
                relay = BlockRelay(channel, disk.driver, pci_id=cfg.pci_id)
                relay.start(replay)
                self.relays[cfg.pci_id] = relay
            results.append({"pci_id": cfg.pci_id, "restore_path": disk.restore_path, "flr": disk.flr,
                            "error": disk.error})
        return results

    def save(self, keepalive: bool) -> underhill_pb2.NvmeManagerSavedState | None:
        """Stop the relays, then save (effective keepalive) or shut down every controller."""
        for relay in self.relays.values():
            relay.stop()
        if keepalive and self.save_restore_supported:
            try:
                return save_disks(self.disks, self.cpu_count)
            except DEVICE_ERRORS as e:
                kv(log, logging.ERROR, "nvme save failed: no NVMe state is saved", error=e)
                return None
        for disk in self.disks:
            disk.driver.shutdown()
        return None

    def units(self) -> list[underhill_pb2.SavedStateUnit]:
        """The relays' in-flight guest requests (call after `save`: nothing completes any more)."""
        return [underhill_pb2.SavedStateUnit(name=unit_name(pci_id), state=relay.save().SerializeToString())
                for pci_id, relay in self.relays.items()]

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
