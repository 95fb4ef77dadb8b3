"""ManaDevice: a GDMA driver plus the MANA (BNIC) device on it, its vports, save and restore.

Entry points for the device's manager (the worker's VF manager, which owns the keepalive policy: DMA
clients, NoReset -> FLR, releasing unused saved buffers):
- `ManaDevice.new(backing, pci_id)`: fresh init of a device that has no HWC;
- `ManaDevice.restore(backing, pci_id, saved)`: keepalive restore (servicing spec 6.3);
- `dev.open_vport(i)`, `dev.save()`, `dev.shutdown()`.

The driver's memory comes from the DMA clients of its backing: the HWC buffer from the default client
(the persistent one when the manager gave one), vports from the ephemeral one. Data-path keepalive
(DESIGN D7, opt-in): a vport opened with `persistent=True` lives in the private pool; `save()` keeps it
(a vfkeep extension in the saved state) and `restore` resumes it without queue commands.
"""
from __future__ import annotations

import contextlib
import logging

from vfkeep.gdma.constants import DRV_DEFAULT_LINK_SPEED_BPS, DRV_HWC_MSIX, HWC_TIMEOUT_FOR_SHUTDOWN_IN_MS
from vfkeep.gdma.hwc import GdmaDevId
from vfkeep import kill_points
from vfkeep.log import kv
from vfkeep.proto import mana_driver_pb2

from .backing import DeviceBacking, DmaBuffer, DmaClient, posted_batch
from .bnic_driver import BnicDriver
from .errors import (DEVICE_ERRORS, BringUpError, DeviceMissing, DriverError, InvalidSavedState, NoDmaClient,
                     RestoreError, RestoredMemoryNotFound)
from .gdma_driver import REGMAP_SIZE, GdmaDriver, map_bar0
from .save_restore import CheckedState, check_device_state, check_hwc_block, decode_device_state, vport_block_sizes
from .vport import SAVED_BLOCKS, Vport, VportConfig

log = logging.getLogger("vfkeep.driver.mana")

#: VTL2 processors the driver spreads interrupts over: vector 0 carries the HWC, data EQs use the others.
DEFAULT_NUM_VPS = 2
#: (offset, size) of the BAR0 read `ManaDevice.restore` (and `.new`) makes first (the register map): a backing may
#: fetch it while it attaches (`open_vfio(prefetch=)`), one device round trip less in a servicing's window.
RESTORE_FIRST_READ = (0, REGMAP_SIZE)


def fresh_vectors(num_vps: int = DEFAULT_NUM_VPS) -> tuple[int, ...]:
    """The MSI-X vectors `ManaDevice.new(num_vps=)` assigns first, in its order (the HWC's, then the data vectors
    1 .. num_vps - 1 in the same exchange), for a backing to assign while it attaches (`open_vfio(irqs=)`); a
    device with fewer vectors gets its own assignment instead."""
    return (DRV_HWC_MSIX, *range(1, num_vps))


def _vectors(saved: mana_driver_pb2.ManaDeviceSavedState) -> tuple[int, ...]:
    """Every MSI-X vector the restored device uses, in the order `ManaDevice.restore` assigns them: the HWC's,
    the kept vports', then the data vectors a vport opened later takes (1 .. num_msix - 1), so that opening one
    assigns none (each assignment is a round trip inside the servicing's window)."""
    return tuple(dict.fromkeys((DRV_HWC_MSIX, *(v.vector for v in saved.vports), *range(1, saved.gdma.num_msix))))


def restore_vectors(saved: mana_driver_pb2.ManaDeviceSavedState) -> tuple[int, ...]:
    """The MSI-X vectors `ManaDevice.restore` of `saved` assigns first, in its order, for a backing to assign
    while it attaches (`open_vfio(irqs=)`); () when one is not below the saved state's own vector count (the
    restore's validation then refuses the state with its own error)."""
    vectors = _vectors(saved)
    if not all(v < saved.gdma.num_msix for v in vectors):
        return ()
    return vectors


class ManaDevice:
    """One MANA NIC: its GDMA driver, the MANA device id and configuration, and open vports."""

    def __init__(self, gdma: GdmaDriver, pci_id: str):
        self.gdma = gdma
        self.pci_id = pci_id
        self.dma = gdma.backing.dma
        self.dev_id: GdmaDevId | None = None
        self.bnic: BnicDriver | None = None
        self.dev_config = None
        self.vports: dict[int, Vport] = {}
        self.probe_pending = False  # a defer_probe restore: probe() still to run
        self._kept_blocks: list[DmaBuffer] = []  # re-attached by restore(); freed if it or probe() fails
        #: Blocks of vports whose teardown failed: the device may still DMA into them, so they are neither freed
        #: nor reused until the function is reset; whoever resets it frees them.
        self.leaked: list[DmaBuffer] = []
        self._link: dict[int, bool] = {}
        self.closed = False

    # -- construction -----------------------------------------------------------------------
    @classmethod
    def new(cls, backing: DeviceBacking, pci_id: str, *, num_vps: int = DEFAULT_NUM_VPS) -> ManaDevice:
        """Fresh init (gdma spec 13.1 steps 1-11). The HWC buffer comes from the backing's default DMA client:
        the private pool when the manager gave a persistent client, which is what makes the device savable.
        On failure the backing is closed and everything allocated is freed."""
        gdma = GdmaDriver.new(backing, num_vps=num_vps)
        dev = cls(gdma, pci_id)
        dev._init_device(register=True)
        kv(log, logging.INFO, "mana device created", pci_id=pci_id, vports=dev.num_vports,
           hwc_persistent=backing.dma.persistent is not None)
        return dev

    @classmethod
    def restore(cls, backing: DeviceBacking, pci_id: str, saved: mana_driver_pb2.ManaDeviceSavedState | bytes, *,
                probe_timeout_ms: int | None = None, defer_probe: bool = False,
                checked: CheckedState | None = None) -> ManaDevice:
        """Keepalive restore (servicing spec 6.3): validate the saved state, re-attach the HWC buffer through
        the backing's persistent DMA client, rebuild the HWC without ESTABLISH_HWC or REGISTER_DEVICE, then
        continue like a fresh device. On failure the backing is closed, attached pool buffers are freed, and
        the error is a `RestoreError` (`InvalidSavedState`: bad state, nothing written) or the driver error
        that stopped the bring-up.

        The first request (the test event) proves the device still serves the saved HWC; a device that
        lost it (reset during the handover) ignores the doorbells, so `probe_timeout_ms` (default: the
        HWC timeout, 10 s) bounds how long that takes to find out.

        `defer_probe` with kept vports (DESIGN D7): those need no HWC request to run, so they are resumed
        first and the HWC requests (test event ... QUERY_DEV_CONFIG) are left to `probe()`, which the
        caller runs once the data path is back (`probe_pending`).

        `checked`: the state's checks made ahead (`check_device_state`, e.g. before the servicing's go): skipped
        here when they were of this state object, this backing's register map and vector count and its pool."""
        try:
            persistent = backing.dma.persistent
            if persistent is None:
                raise RestoreError(f"no persistent dma client for {pci_id}")
            state = decode_device_state(saved)
            if not state.HasField("gdma"):
                raise InvalidSavedState("saved mana device state has no gdma state")
            layout = map_bar0(backing)
            if checked is None or not checked.covers(state, layout, persistent.region, backing.msix_count):
                check_device_state(state, layout, persistent.region, backing.msix_count)
            hwc_mem, kept = _attach_saved_buffers(persistent, state)
        except BaseException:
            backing.close()
            raise
        kept_blocks = [b for group in kept for b in group]
        deferred = defer_probe and bool(state.vports)
        dev = None
        try:
            # Deferred: the HWC's arms and the kept vports' go to the device in one burst (one device wake-up).
            with posted_batch(backing) if deferred else contextlib.nullcontext():
                try:
                    gdma = GdmaDriver.restore(backing, layout, hwc_mem, state.gdma, _vectors(state)[1:])
                except BaseException:
                    for block in (hwc_mem, *kept_blocks):
                        block.free()
                    backing.close()
                    raise
                dev = cls(gdma, pci_id)
                dev._kept_blocks = kept_blocks
                if deferred:
                    dev._restore_vports(state.vports, kept)
                    dev.probe_pending = True
            if not deferred:
                dev._init_device(register=False, probe_timeout_ms=probe_timeout_ms)
                dev._check_kept_indices(s.vport_index for s in state.vports)
                dev._restore_vports(state.vports, kept)
                dev._kept_blocks = []  # the vports own them now
        except BaseException:
            if dev is not None:
                dev.drop_restored()
            raise
        counts = {"kept_vports": len(dev.vports), "probe_pending": True} if dev.probe_pending else \
            {"vports": dev.num_vports}
        kv(log, logging.INFO, "mana device restored", pci_id=pci_id, **counts, base_pfn=hwc_mem.base_pfn,
           pdid=gdma.pdid, db_id=gdma.db_id)
        return dev

    def probe(self, probe_timeout_ms: int | None = None) -> None:
        """The HWC requests a `defer_probe` restore left out (test event, VERIFY_VF_DRIVER_VERSION,
        LIST_DEVICES, QUERY_DEV_CONFIG), then the kept vports' indices against the device's vport count. On
        failure the error is raised with the device still open (a failed request marks the HWC failed, so
        nothing more is sent on it): the caller first stops what uses its vports, then `drop_restored()`."""
        self._init_device(register=False, probe_timeout_ms=probe_timeout_ms, abandon=False)
        self._check_kept_indices(list(self.vports))
        self.probe_pending = False
        self._kept_blocks = []

    def drop_restored(self) -> None:
        """Give up a device being restored (or whose deferred probe failed): abandon it without tearing its
        vports down (the FLR fallback follows) and free their re-attached blocks."""
        self.vports.clear()
        if not self.closed:
            self._abandon()
        for block in self._kept_blocks:
            block.free()
        self._kept_blocks = []

    def _init_device(self, *, register: bool, probe_timeout_ms: int | None = None, abandon: bool = True) -> None:
        """Over the HWC: test event, VERIFY_VF_DRIVER_VERSION, LIST_DEVICES, REGISTER_DEVICE (fresh only: a
        restored driver keeps the saved pdid, gpa_mkey and db_id), QUERY_DEV_CONFIG (gdma spec 13.1 steps 7-11,
        13.3). On failure the half-built device is abandoned (unless `abandon` is false: the caller does)."""
        gdma = self.gdma
        try:
            gdma.test_eq(probe_timeout_ms)
            if not register:
                kill_points.reached("restore.hwc")
            gdma.verify_vf_driver_version()
            self.dev_id = gdma.mana_dev_id()
            if register:
                gdma.register_device(self.dev_id)
            self.bnic = BnicDriver(gdma, self.dev_id)
            self.dev_config = self.bnic.query_dev_config()
            if self.dev_config.max_num_vports == 0:
                raise BringUpError("device reports no vports")
        except BaseException:
            if abandon:
                self._abandon()
            raise

    def _restore_vports(self, states, groups: list[list]) -> None:
        """Resume the kept vports (DESIGN D7) over their re-attached blocks, once no index is taken twice."""
        seen: set[int] = set()
        for state in states:
            if state.vport_index in seen:
                raise InvalidSavedState(f"saved vport {state.vport_index} is not a free vport: saved twice")
            seen.add(state.vport_index)
        for state, blocks in zip(states, groups):
            Vport.restore(self, state, blocks)

    def _check_kept_indices(self, indices) -> None:
        """Every kept vport must be one the device has (its count comes from QUERY_DEV_CONFIG)."""
        for index in indices:
            if index >= self.num_vports:
                raise InvalidSavedState(f"saved vport {index} is not a free vport of the device's {self.num_vports}")

    def _abandon(self) -> None:
        """Drop a half-built device: teardown by the usual table, release the handle and the clients."""
        self.closed = True
        self.gdma.close()

    # -- properties -----------------------------------------------------------------------------
    @property
    def num_vports(self) -> int:
        return self.dev_config.max_num_vports

    @property
    def link_speed_bps(self) -> int:
        mbps = self.dev_config.adapter_link_speed_mbps
        return mbps * 1_000_000 if mbps else DRV_DEFAULT_LINK_SPEED_BPS

    def data_vector(self, vport_index: int) -> int:
        """MSI-X vector of a vport's EQ: anything but the HWC's vector 0 when there are two or more."""
        n = self.gdma.num_msix
        return 1 + vport_index % (n - 1) if n > 1 else 0

    # -- vports ---------------------------------------------------------------------------------
    def open_vport(self, index: int = 0, config: VportConfig | None = None, persistent: bool = False) -> Vport:
        """Query the vport, build its EQ and TX/RX queue pairs from ephemeral memory (from the pool when
        `persistent`, which lets `save()` keep it) and start traffic."""
        if self.closed:
            raise DriverError("mana device is closed")
        if self.probe_pending:
            raise DriverError(f"vport {index} cannot be opened before the deferred probe: the device's vport "
                              "count and configuration are not known yet")
        if not 0 <= index < self.num_vports:
            raise ValueError(f"vport index {index} is not below the device's {self.num_vports} vports")
        if index in self.vports:
            raise ValueError(f"vport {index} is already open")
        if persistent and self.dma.persistent is None:
            raise NoDmaClient(f"vport {index}: a persistent vport needs a persistent dma client")
        vport = Vport(self, index, config or VportConfig(), persistent)
        self.vports[index] = vport
        try:
            vport._open()
        except BaseException:
            vport.close()
            raise
        return vport

    def _vport_closed(self, vport: Vport) -> None:
        if self.vports.get(vport.index) is vport:
            del self.vports[vport.index]

    def close_vports(self) -> None:
        for vport in list(self.vports.values()):
            vport.close()

    # -- events and status ----------------------------------------------------------------------
    @property
    def event_fd(self) -> int:
        """Eventfd of the HWC's vector: after `prepare_event_wait()`, readable when the device posts an HWC
        event (link change, reset request). Events seen while an HWC request waits are kept for
        `poll_events()` without waking this fd."""
        return self.gdma.irq.fd(0)

    def prepare_event_wait(self) -> bool:
        """Arm for `event_fd`; False if events or undelivered link changes are waiting (poll instead)."""
        return self.gdma.arm_events() and not self.gdma.events.link_toggle

    def poll_events(self) -> list[tuple[int, bool]]:
        """Handle pending HWC events and deliver link changes; returns them as (vport index, link up)."""
        if self.closed:
            return []
        self.gdma.process_events()
        toggles = self.gdma.take_link_toggles()
        for index, up in toggles:
            self._link[index] = up
        return toggles

    def link_up(self, vport_index: int) -> bool:
        self.poll_events()
        return self._link.get(vport_index, True)

    @property
    def reset_pending(self) -> bool:
        return self.gdma.reset_pending

    @property
    def saved(self) -> bool:
        """`save()` succeeded: the device still runs the HWC on pool memory the next driver re-attaches."""
        return self.gdma.saved

    def present(self) -> bool:
        """False if the device is gone: BAR0 reads all ones (surprise removal) or the transport vanished."""
        try:
            map_bar0(self.gdma.backing)
        except DeviceMissing:
            return False
        return True

    def inspect(self) -> dict:
        """The GDMA driver's state (HWC ids, buffer, failure flags); vports inspect themselves."""
        return self.gdma.inspect()

    def query_stats(self) -> dict[str, int]:
        """Adapter-wide counters (MANA_QUERY_STATS, all of them)."""
        resp = self.bnic.query_stats()
        return {name: getattr(resp, name) for name, *_ in resp._fields_ if name != "reported_statistics"}

    # -- save and shutdown ----------------------------------------------------------------------
    def save(self) -> mana_driver_pb2.ManaDeviceSavedState:
        """Close the vports (only the HWC survives) except persistent ones (DESIGN D7: kept running, saved in
        the `vports` extension), save the GDMA driver, release the handle without a reset and without
        DESTROY_HWC. The driver's pool memory (HWC buffer, kept vports) then returns to the pool although the
        device keeps using it, as dropping the reference's driver does (servicing spec 2.2): the worker's pool
        snapshot, taken before, is what carries it to the next driver. Refused (SaveFailed subclasses) after
        an HWC failure or with a reset request pending; the device is then still open and should be shut
        down."""
        if self.closed:
            raise DriverError("mana device is closed")
        keep = [v for v in self.vports.values()
                if v.persistent and not v.data.tx_failed and not self.gdma.reset_pending]
        for vport in list(self.vports.values()):
            if vport not in keep:
                vport.close()
        kill_points.reached("save.vports_closed")
        state = mana_driver_pb2.ManaDeviceSavedState(gdma=self.gdma.save())
        for vport in keep:
            state.vports.append(vport.save())
        self.closed = True
        self.gdma.close()
        for vport in keep:
            vport.release_kept()
        kv(log, logging.INFO, "mana device state successfully saved for keepalive", pci_id=self.pci_id,
           base_pfn=state.gdma.mem.base_pfn, activity_id=hex(state.gdma.hwc_activity_id))
        return state

    def rehearse_save(self) -> mana_driver_pb2.ManaDeviceSavedState:
        """The state `save` would return now, changing nothing (no check, nothing closed or marked saved): the
        worker runs it once after it started, so the save's first calls in the process are not inside the next
        servicing's blackout."""
        state = mana_driver_pb2.ManaDeviceSavedState(gdma=self.gdma.saved_state())
        for vport in self.vports.values():
            if vport.persistent and not vport.closed:
                state.vports.append(vport.rehearse_save())
        return state

    def shutdown(self) -> bool:
        """Normal (non-keepalive) shutdown: vports, DEREGISTER_DEVICE with a 100 ms timeout, DESTROY_HWC
        (servicing spec 5.3). Returns False if the device was not shut down cleanly; the caller should then
        switch it to FLR so the next open resets it."""
        if self.closed:
            return True
        self.close_vports()
        gdma = self.gdma
        clean = not (gdma.silent_teardown or gdma.hwc_failure)
        if clean:
            try:
                gdma.deregister_device(self.dev_id, timeout_ms=HWC_TIMEOUT_FOR_SHUTDOWN_IN_MS)
            except DEVICE_ERRORS as e:
                clean = False
                kv(log, logging.ERROR, "deregister device failed", pci_id=self.pci_id, error=e)
        self.closed = True
        gdma.close()
        kv(log, logging.INFO, "mana device shut down", pci_id=self.pci_id, clean=clean)
        return clean

    def remove(self) -> None:
        """The function is gone (surprise removal; servicing spec 5.2's DeviceMissing): tear it down without a
        single request or SMC message, free all of its memory (the HWC buffer too, so no pool snapshot holds
        it) and release the handle."""
        if self.closed:
            return
        self.gdma.mark_gone()
        self.close_vports()
        self.closed = True
        self.gdma.close()
        kv(log, logging.INFO, "mana device removed", pci_id=self.pci_id)


def _attach_saved_buffers(client: DmaClient, state: mana_driver_pb2.ManaDeviceSavedState) -> tuple[DmaBuffer, list[list[DmaBuffer]]]:
    """Re-attach this NIC's saved pool buffers (spec 6.2): keep the HWC buffer and, per kept vport, its
    blocks in `SAVED_BLOCKS` order; free the rest. Returns (hwc block, [vport block lists])."""
    blocks = client.attach_pending_buffers()
    kill_points.reached("restore.pool_buffers_attached")
    by_pfn = {b.base_pfn: b for b in blocks}
    try:
        hwc = by_pfn.pop(state.gdma.mem.base_pfn, None)
        if hwc is None:
            raise RestoredMemoryNotFound(state.gdma.mem.base_pfn)
        check_hwc_block(hwc)
        groups = []
        for v in state.vports:
            group = []
            for part, m, size in zip(SAVED_BLOCKS, v.mem, vport_block_sizes(v)):
                block = by_pfn.pop(m.base_pfn, None)  # popped: no block serves twice
                if block is None or block.len < size:
                    raise InvalidSavedState(f"saved vport {v.vport_index} {part} block at pfn {m.base_pfn} is not "
                                            f"a re-attached block of at least {size} bytes")
                group.append(block)
            groups.append(group)
    except RestoreError:
        for b in blocks:
            b.free()
        raise
    for b in by_pfn.values():
        kv(log, logging.INFO, "freeing unused restored buffer", base_pfn=b.base_pfn, pages=b.pages)
        b.free()
    return hwc, groups
