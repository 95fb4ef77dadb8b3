"""Per-NIC VF manager: DMA clients, MANA device + vport, net relay, and the restore decision table.

Restore decision (servicing spec §6.1, with vfkeep's DESIGN D2 fallback); S = saved state for this
pci_id exists, K = this worker's MANA keepalive config is enabled:

  S  K   path
  no *   fresh init, NoReset -> FLR (HWC buffer from the pool iff K)            restore_path "fresh"
  yes no attach + free the saved pool buffers, fresh init NoReset -> FLR        restore_path "fresh"
  yes yes keepalive restore: no ESTABLISH_HWC, no REGISTER_DEVICE              restore_path "keepalive"
          ... and if that fails: free the buffers, set FLR, reset, fresh init   restore_path "fallback"

While the NIC runs (`run()` until `quiesce()`), its VF manager watches the device on a thread of its own:
- a VF reset request (EQE 135, gdma spec 6.4) is a VF reconfiguration: the NIC is torn down without HWC
  requests, the function reset and the NIC created fresh; guest traffic resumes, no servicing involved;
- a device that is gone (BAR0 reads all ones: surprise removal) is torn down without a command and without
  a reset-method change, its memory freed (spec 5.2: the next save reports DeviceMissing and the pool
  snapshot holds none of its pages); once it answers again (hot-add) the NIC is created fresh.
"""
from __future__ import annotations

import logging
import os
import select
import threading
import time
from typing import Callable

from ..contract import POOL_EXHAUSTED, NicConfig, NicRestore, RestorePath, SaveOutcome
from ..driver.backing import DeviceBacking, DmaClients
from ..driver.errors import DEVICE_ERRORS, DeviceMissing, InvalidSavedState, SaveFailed
from ..driver.gdma_driver import bar0_layout
from ..driver.mana import RESTORE_FIRST_READ, ManaDevice, fresh_vectors, restore_vectors
from ..driver.save_restore import CheckedState, check_device_state
from ..driver.vport import VportConfig
from ..guest.ring import ChannelLayout, NicChannel, RingError
from ..log import kv
from ..memory import DmaError, DmaManager, GuestMemory, OutOfPoolMemory, Region
from ..proto import mana_driver_pb2
from ..vfio_user.backing import (PendingAttach, VfioBacking, attach_ahead, open_vfio, presence_probe,
                                 reset_method_setter)
from .device_kind import CreateFailed, create_fresh, release_pending_buffers
from .net_relay import NetRelay, RelayStats, RelayThread

#: The relay's vport: 512 send buffers and 512 receive buffers (the reference's cap; 541 pages with the queues).
#: The relay receives everything before it sends, and posts the buffers again before the SQ doorbell, so the
#: device finds a posted buffer for every frame in flight; the two 256-frame batches in flight carry a round
#: trip to the device that waits for a CPU (a loaded machine) with twice the frames the 256 of before did.
RELAY_VPORT = VportConfig(tx_cq_size=32768, rx_cq_size=32768)
#: The relay's vport under data-path keepalive (DESIGN D7): in the private pool, so smaller (128 TX / 256 RX
#: buffers, 202 pages with the queues) to leave room for other NICs; 2:1 RX:TX. The TX buffers bound the frames
#: per device round trip, so after a servicing the relay drains the guest's backlog while it keeps sending
#: (64 of them could not outrun 50k frames/s on a loaded machine).
KEPT_VPORT = VportConfig(tx_wq_size=4096, tx_cq_size=8192, rx_wq_size=8192, rx_cq_size=16384)

log = logging.getLogger("vfkeep.worker.vf")

#: What bringing a NIC up can raise without it being a bug: the device's errors and the DMA manager's.
NIC_ERRORS = (*DEVICE_ERRORS, DmaError, CreateFailed)
#: How often a running NIC's VF manager checks that its device is still there (surprise removal), and the
#: first wait between probes for a missing one coming back; that wait doubles up to HOTPLUG_POLL_MAX_S.
PRESENCE_POLL_S = 0.2
HOTPLUG_POLL_MAX_S = 5.0


def dma_client_names(pci_id: str) -> tuple[str, str]:
    """(persistent, ephemeral) DMA client names of a NIC (servicing spec 4)."""
    return f"nic_{pci_id}", f"nic_{pci_id}_ephemeral"


def nic_dma_clients(dma: DmaManager, pci_id: str, persistent: bool) -> DmaClients:
    """A NIC's DMA clients: the ephemeral one always, the persistent (private pool) one when `persistent`
    (keepalive config enabled or saved state to restore)."""
    p_name, e_name = dma_client_names(pci_id)
    pclient = dma.new_client(p_name, persistent=True) if persistent else None
    try:
        return DmaClients(ephemeral=dma.new_client(e_name, persistent=False), persistent=pclient)
    except BaseException:
        if pclient is not None:
            pclient.close()
        raise


def fresh_mana_device(open_device: Callable[[], DeviceBacking], set_reset_method: Callable[[str], None], pci_id: str,
                      *, force_flr: bool = False) -> tuple[ManaDevice, bool]:
    """Fresh init of one MANA NIC with the NoReset -> FLR retry (spec 6.4) on backings from `open_device`.
    Returns (device, flr_happened); `force_flr` is the D2 fallback's half after a failed restore."""
    return create_fresh(open_device, lambda backing: ManaDevice.new(backing, pci_id), set_reset_method, pci_id,
                        what="mana device", errors=DEVICE_ERRORS, missing=(DeviceMissing,), force_flr=force_flr)


def attach_ahead_for(cfg: NicConfig, mem: GuestMemory, saved: mana_driver_pb2.ManaSavedState) -> PendingAttach | None:
    """The attach `VfManager.create`'s keepalive restore of `saved` makes (`_open`), sent now: the device serves it
    while the worker restores its DMA manager and the kinds before networking (it needs no DMA client and applies
    nothing of the saved state). None if it could not be sent (the restore then finds out for itself)."""
    try:
        return attach_ahead(cfg.socket, mem, prefetch=RESTORE_FIRST_READ, irqs=restore_vectors(saved.mana_device))
    except DEVICE_ERRORS as e:
        kv(log, logging.WARNING, "attaching ahead failed", pci_id=cfg.pci_id, error=str(e))
        return None


def check_ahead(ahead: PendingAttach, saved: mana_driver_pb2.ManaSavedState, pool: Region) -> CheckedState | None:
    """`saved`'s device state checked against what the device answered to the attach sent ahead (its register map
    and MSI-X vector count) and this boot's `pool`, once that attach settled (`PendingAttach.settle`, before the
    servicing's go): the keepalive restore then does not check it again. None when the attach failed or the state
    does not pass: the restore meets the same error itself, where it handles it."""
    answers = ahead.answers()
    if answers is None:
        return None
    bar0, msix, regmap = answers
    try:
        return check_device_state(saved.mana_device, bar0_layout(bar0.size, regmap or b""), pool, msix.count)
    except (*DEVICE_ERRORS, InvalidSavedState):
        return None


def _cancel(ahead: PendingAttach, pci_id: str) -> None:
    """An attach sent ahead that the NIC's path does not use: disconnected (once the device has taken it)."""
    try:
        ahead.cancel()
    except Exception as e:  # noqa: BLE001 - the path that follows opens its own connection
        kv(log, logging.WARNING, "cancelling the attach sent ahead failed", pci_id=pci_id, error=str(e))


def release_nic_buffers(dma: DmaManager, pci_id: str) -> int:
    """Attach and free a NIC's saved pool buffers (spec 6.2) when its saved state is not used; pages freed."""
    return release_pending_buffers(dma, dma_client_names(pci_id)[0])


class VfManager:
    #: Run-time re-creations (VF reset, hot-add) of every NIC take turns: memory one NIC's teardown freed
    #: must not become another NIC's queues before the first NIC's function has been reset.
    _recreating = threading.Lock()

    def __init__(self, cfg: NicConfig, mem: GuestMemory, dma: DmaManager):
        self.cfg = cfg
        self.pci_id = cfg.pci_id
        self.mem = mem
        self.dma = dma
        self.dev: ManaDevice | None = None
        self.vport = None
        self.relay: NetRelay | None = None
        self.channel: NicChannel | None = None
        self.restore_path = RestorePath.FRESH
        self.error: str | None = None
        self.flr = False
        self.create_ms = 0.0
        self.keepalive = False
        self.datapath_keepalive = False
        self.hwc_persistent = False
        self.set_reset_method = reset_method_setter(cfg.socket)
        self.device_present = presence_probe(cfg.socket)
        self.missing = False  # the device is gone (spec 5.2 DeviceMissing) until it comes back
        self.vf_resets = 0    # run-time VF reconfigurations (EQE 135)
        self.relay_failure_resets = 0  # run-time function resets after the relay failed (`_relay_failed`)
        self.hot_adds = 0     # NICs re-created after their device came back
        self.recoveries = 0   # NICs re-created by the watcher after their init failed
        self.relay_stats = RelayStats()  # across the relays of this worker's re-created vports
        self.channel_layout: str | None = None
        self._monitor: threading.Thread | None = None
        #: Blocks a failed teardown of a dropped device left allocated (ManaDevice.leaked); freed once an FLR has
        #: reset the function (`_free_leaked`).
        self._leaked: list = []
        self._monitor_stop: int | None = None
        #: The relay thread `ManaKind.prepare` started for this NIC: the first relay runs on it.
        self.relay_thread: RelayThread | None = None

    # -- creation ---------------------------------------------------------------------------
    @classmethod
    def create(cls, cfg: NicConfig, mem: GuestMemory, dma: DmaManager, *, saved, keepalive: bool,
               force_fallback: str | None, datapath_keepalive: bool = False,
               channel: NicChannel | None = None, relay_thread: RelayThread | None = None,
               ahead: PendingAttach | None = None, checked: CheckedState | None = None) -> "VfManager":
        """Bring the NIC up by the decision table. Never raises: a NIC that cannot come up is reported
        with its error (and shows as DeviceMissing at the next save). `datapath_keepalive` (DESIGN D7)
        puts the vport in the pool so a keepalive save keeps it running. `channel`: the NIC's guest rings,
        attached already (else its relay start attaches them); `relay_thread`: the thread its first relay runs on
        (started already, else the relay starts one); `ahead`: the keepalive restore's attach, sent already
        (`attach_ahead_for`; cancelled first on any other path); `checked`: the saved device state's checks made
        ahead (`check_ahead`)."""
        vf = cls(cfg, mem, dma)
        vf.channel, vf.relay_thread = channel, relay_thread
        vf.keepalive = keepalive
        vf.datapath_keepalive = datapath_keepalive and keepalive
        t = time.perf_counter()
        try:
            if ahead is not None and (force_fallback or saved is None or not keepalive):
                _cancel(ahead, vf.pci_id)
                ahead = None
            if force_fallback:
                vf._fallback(force_fallback)
            elif saved is not None and keepalive:
                vf._keepalive_restore(saved, ahead, checked)
            elif saved is not None:
                kv(log, logging.WARNING, "have saved state from keepalive but restoring on an unsupported host",
                   pci_id=vf.pci_id)
                vf._release_saved_buffers()
                vf._fresh(persistent_hwc=False)
            else:
                vf._fresh(persistent_hwc=keepalive)
        except NIC_ERRORS as e:
            vf.error = f"{type(e).__name__}: {e}"
            vf.dev = vf.vport = None
            vf.missing = isinstance(e, DeviceMissing)
            kv(log, logging.ERROR, "nic could not be brought up", pci_id=vf.pci_id, error=vf.error)
        vf.create_ms = round((time.perf_counter() - t) * 1000, 3)
        return vf

    def _keepalive_restore(self, saved: mana_driver_pb2.ManaSavedState, ahead: PendingAttach | None = None,
                           checked: CheckedState | None = None) -> None:
        kv(log, logging.INFO, "restoring gdma driver", pci_id=self.pci_id, base_pfn=saved.mana_device.gdma.mem.base_pfn)
        try:
            backing = self._open(persistent=True, restore=True, irqs=restore_vectors(saved.mana_device), ahead=ahead)
            self.dev = ManaDevice.restore(backing, self.pci_id, saved.mana_device, defer_probe=True, checked=checked)
            self.hwc_persistent = True
            self.vport = self.dev.vports.get(0) or self._open_vport(self.dev, self.hwc_persistent)
        except DeviceMissing:
            if self.dev is not None:  # gone after the restore: nothing to reset, nothing to send
                self.dev.remove()
            self.dev = self.vport = None
            self._release_saved_buffers()  # and wait for it to come back
            raise
        except (*DEVICE_ERRORS, DmaError) as e:
            self._drop_device()
            self._fallback(f"keepalive restore failed: {type(e).__name__}: {e}")
            return
        self.restore_path = RestorePath.KEEPALIVE

    def finish_restore(self) -> None:
        """Run the HWC probe a keepalive restore with kept vports left for after the relay restarted (DESIGN
        D7; docs/internals.md says why), called once the relay has resumed the guest's traffic (`ManaKind.start`).
        If it fails, the device lost its state during the handover: the relay
        is abandoned while the device is still open (its drain still reaches it; sends it never completed are
        counted in `tx_stranded`), then the NIC takes the D2 fallback and a relay starts on the new vport (a
        device that is gone waits for the monitor instead)."""
        if self.dev is None or not self.dev.probe_pending:
            return
        try:
            self.dev.probe()
        except (*DEVICE_ERRORS, DmaError) as e:
            if self.relay is not None:
                self.relay.abandon()
                self.relay = None
            self.dev.drop_restored()
            self.dev = self.vport = None
            if isinstance(e, DeviceMissing):
                self.missing, self.error = True, f"device missing: {e}"
                kv(log, logging.WARNING, "device vanished after the keepalive restore", pci_id=self.pci_id)
                return
            try:
                self._fallback(f"keepalive restore failed: {type(e).__name__}: {e}")
            except NIC_ERRORS as e2:
                self.error = f"{type(e2).__name__}: {e2}"
                self.dev = self.vport = None
                self.missing = isinstance(e2, DeviceMissing)
                kv(log, logging.ERROR, "nic could not be brought up", pci_id=self.pci_id, error=self.error)
                return
            self.start_relay()

    def _fallback(self, reason: str, *, reset_done: bool = False) -> None:
        """DESIGN D2: free whatever this NIC still has pending in the pool, switch the device to FLR,
        reset it and fresh-init (`reset_done`: `reset_saved` has reset it already). Logged as an error;
        reported with the reason."""
        kv(log, logging.ERROR, "falling back to fresh init with flr", pci_id=self.pci_id, reason=reason)
        self.restore_path, self.error = RestorePath.FALLBACK, reason
        self._release_saved_buffers()
        self._create(persistent_hwc=self.dma.has_pool, force_flr=not reset_done)
        self.flr = True
        self._free_leaked()  # reset by the fresh init or, before it, by `reset_saved`

    def _fresh(self, persistent_hwc: bool, force_flr: bool = False) -> None:
        """Fresh init with the NoReset -> FLR retry (spec 6.4). A config that claims a pool this boot
        does not have (E6) gets an ephemeral HWC buffer instead of a dead NIC."""
        if persistent_hwc and not self.dma.has_pool:
            self.error = "no sources available for private persistent allocations; HWC buffer is ephemeral"
            kv(log, logging.ERROR, "keepalive config claims a private pool that does not exist", pci_id=self.pci_id)
            persistent_hwc = False
        kv(log, logging.INFO, "creating new VFIO device", pci_id=self.pci_id, persistent_hwc=persistent_hwc)
        self.restore_path = RestorePath.FRESH
        self._create(persistent_hwc=persistent_hwc, force_flr=force_flr)

    def _create(self, persistent_hwc: bool, force_flr: bool = False) -> None:
        """Fresh device + vport. A pool too full for the HWC buffer (e.g. saved state that left it all Leaked)
        gives an ephemeral buffer: the NIC works and only its next keepalive is lost, never a dead NIC."""
        try:
            (self.dev, self.vport), self.flr = self._create_fresh(persistent_hwc, force_flr)
        except OutOfPoolMemory as e:
            if not persistent_hwc:
                raise
            note = f"{POOL_EXHAUSTED} ({e}); HWC buffer is ephemeral"
            self.error = f"{self.error}; {note}" if self.error else note
            kv(log, logging.ERROR, "no pool pages for the HWC buffer, using worker RAM", pci_id=self.pci_id)
            persistent_hwc = False
            (self.dev, self.vport), self.flr = self._create_fresh(persistent_hwc, force_flr)
        self.hwc_persistent = persistent_hwc
        if self.flr:
            self._free_leaked()

    def _free_leaked(self) -> None:
        """The function was reset: memory earlier failed teardowns left to it is ours again."""
        leaked, self._leaked = self._leaked, []
        for block in leaked:
            block.free()
        if leaked:
            kv(log, logging.INFO, "freed queue memory left to the device before its reset", pci_id=self.pci_id,
               pages=sum(b.pages for b in leaked))

    def _create_fresh(self, persistent_hwc: bool, force_flr: bool) -> tuple[tuple[ManaDevice, object], bool]:
        """NoReset -> FLR (spec 6.4) over the device and its vport; the HWC buffer comes from the pool iff
        `persistent_hwc`. A vport that does not open (an HWC request failed) fails the attempt like a device
        that does not come up: the device is shut down, its memory freed, and the FLR retry starts clean."""
        def bring_up(backing):
            dev = ManaDevice.new(backing, self.pci_id)
            try:
                return dev, self._open_vport(dev, persistent_hwc)
            except BaseException:
                try:
                    dev.shutdown()
                except DEVICE_ERRORS as e:
                    kv(log, logging.WARNING, "shutting down the device whose vport failed", pci_id=self.pci_id,
                       error=str(e))
                self._leaked += dev.leaked
                raise

        method = [None]  # the reset method create_fresh has set (None: not set, or setting it failed)

        def set_reset_method(value: str) -> None:
            method[0] = None
            self.set_reset_method(value)
            method[0] = value

        # With the method set to none the open cannot reset the device (no DEVICE_RESET to decide on): the attach
        # is one pipelined round trip, as a restore's, instead of the handshake's answer and then the mapping.
        return create_fresh(lambda: self._open(persistent=persistent_hwc, restore=method[0] == "none"), bring_up,
                            set_reset_method, self.pci_id, what="mana device", errors=DEVICE_ERRORS,
                            missing=(DeviceMissing,), force_flr=force_flr)

    def _open(self, *, persistent: bool, restore: bool = False, irqs: tuple[int, ...] | None = None,
              ahead: PendingAttach | None = None) -> VfioBacking:
        """This NIC's device backing with its DMA clients (a fresh open resets a device whose method is flr;
        `restore`: never resets). The attach also fetches the register map and assigns `irqs` (default: those of a
        fresh init), what the driver needs first: one round trip for all of it with the mapping; `ahead`: that
        attach, sent already (`attach_ahead_for`)."""
        try:
            clients = nic_dma_clients(self.dma, self.pci_id, persistent)
        except BaseException:
            if ahead is not None:
                _cancel(ahead, self.pci_id)
            raise
        return open_vfio(self.cfg.socket, self.mem, clients, restore=restore, prefetch=RESTORE_FIRST_READ,
                         irqs=fresh_vectors() if irqs is None else irqs, ahead=ahead)

    def _open_vport(self, dev: ManaDevice, hwc_persistent: bool):
        """Vport 0 for the relay: in the pool under data-path keepalive (if the HWC is too and the pool has
        room; otherwise the NIC still works, only its queues are rebuilt at the next servicing)."""
        if self.datapath_keepalive and hwc_persistent:
            try:
                return dev.open_vport(0, KEPT_VPORT, persistent=True)
            except OutOfPoolMemory as e:
                note = f"{POOL_EXHAUSTED} ({e}); vport queues are ephemeral"
                self.error = f"{self.error}; {note}" if self.error else note
                kv(log, logging.ERROR, "no pool pages for the vport, using worker RAM", pci_id=self.pci_id)
        return dev.open_vport(0, RELAY_VPORT)

    def _release_saved_buffers(self) -> None:
        if self.dma.has_pool:
            pages = release_nic_buffers(self.dma, self.pci_id)
            if pages:
                kv(log, logging.INFO, "freed saved pool buffers", pci_id=self.pci_id, pages=pages)

    def _drop_device(self) -> None:
        """Give up on a device the keepalive restore brought half up (the FLR that follows cleans the rest). One
        whose deferred probe has not run cannot tear its kept vports down (no BNIC yet): it is abandoned."""
        if self.dev is not None and self.dev.probe_pending:
            self.dev.drop_restored()
        elif self.dev is not None:
            try:
                self.dev.shutdown()
            except DEVICE_ERRORS as e:
                kv(log, logging.WARNING, "shutting down the half-restored device failed", pci_id=self.pci_id,
                   error=str(e))
        if self.dev is not None:
            self._leaked += self.dev.leaked  # freed by the fallback once its FLR reset the function
        self.dev = self.vport = None

    # -- relay ------------------------------------------------------------------------------
    def start_relay(self) -> None:
        thread, self.relay_thread = self.relay_thread, None
        if self.vport is None:
            if thread is not None:
                thread.cancel()
            return
        if self.channel is None:
            try:
                self.channel = NicChannel.attach(self.mem, ChannelLayout.from_str(self.channel_layout),
                                                 self.cfg.index, self.cfg.tx_bell_fd, self.cfg.rx_bell_fd)
            except RingError as e:  # the rings live in guest RAM: a guest that broke them costs only this NIC
                note = f"guest channel unusable: {e}"
                self.error = f"{self.error}; {note}" if self.error else note
                kv(log, logging.ERROR, "guest channel rings unusable, no relay", pci_id=self.pci_id, error=str(e))
                if thread is not None:
                    thread.cancel()
                return
        self.relay = NetRelay(self.channel, self.vport.data, self.pci_id, self.relay_stats)
        self.relay.start(thread)

    def stop_relay(self) -> None:
        if self.relay is not None:
            self.relay.stop()

    def _abandon_relay(self) -> None:
        """Stop the relay of a vport about to be dropped without teardown (device gone, VF reset): sends the
        device never completed die with its queues, counted in `tx_stranded` (once: the relay is forgotten)."""
        if self.relay is not None:
            self.relay.abandon()
            self.relay = None

    # -- run time: VF reset requests, surprise removal, hot-add -------------------------------------
    def start_traffic(self, channel_layout: str | None) -> None:
        """Guest traffic moves: the relay starts (`run` follows once it has resumed)."""
        self.channel_layout = channel_layout
        self.start_relay()

    def wait_resumed(self, deadline: float) -> bool:
        """Wait until the relay has handed the guest its first frames back or has nothing to do
        (`NetRelay.resumed`), at most until `deadline` (time.monotonic()); True if it has (or there is none)."""
        relay = self.relay
        return relay is None or relay.resumed.wait(max(0.0, deadline - time.monotonic()))

    def run(self) -> None:
        """After `start_traffic`: a deferred HWC probe (`finish_restore`), then the device is watched, until
        `quiesce()`."""
        self.finish_restore()
        self._monitor_stop = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._monitor = threading.Thread(target=self._watch, name=f"vf-{self.pci_id}", daemon=True)
        self._monitor.start()

    def quiesce(self) -> None:
        """Stop watching (a re-creation in progress finishes first) and stop the relay. A device found gone
        is torn down now, without a command and without a reset-method change, so the DMA snapshot that
        follows holds none of its pages (spec 5.2 DeviceMissing). The relay's last register read tells."""
        self._stop_monitor()
        relay = self.relay
        self.stop_relay()
        dev = self.dev
        if dev is None or dev.closed:
            return
        if relay is not None and (relay.device_missing or relay.error is None):
            gone = relay.device_missing
        else:
            gone = not dev.present()
        if gone:
            self._removed()

    def _stop_monitor(self) -> None:
        if self._monitor is None:
            return
        os.eventfd_write(self._monitor_stop, 1)
        self._monitor.join()
        os.close(self._monitor_stop)
        self._monitor = self._monitor_stop = None

    def _watch(self) -> None:
        """The monitor thread: wake on an HWC event (the device's vector 0), a presence tick or `quiesce`."""
        backoff = PRESENCE_POLL_S
        while True:
            fds, wait_s = [self._monitor_stop], PRESENCE_POLL_S
            dev = self.dev
            if dev is not None and not dev.closed:
                backoff = PRESENCE_POLL_S
                try:
                    if dev.prepare_event_wait():
                        fds.append(dev.event_fd)
                    else:
                        wait_s = 0.0  # events are waiting
                except DEVICE_ERRORS:
                    wait_s = 0.0  # _check finds out what is wrong
            else:  # missing (wait for the hot-add) or its init failed (retry): the same backoff
                wait_s, backoff = backoff, min(backoff * 2, HOTPLUG_POLL_MAX_S)
            poller = select.poll()
            for fd in fds:
                poller.register(fd, select.POLLIN)
            ready = poller.poll(None if wait_s is None else int(wait_s * 1000))
            if any(fd == self._monitor_stop for fd, _ in ready):
                return
            self._check()

    def _check(self) -> None:
        dev = self.dev
        if dev is not None and not dev.closed:
            try:
                dev.poll_events()
                if dev.reset_pending:
                    self._vf_reset()
                elif self.relay is not None and self.relay.device_failed:
                    self._relay_failed()
                elif (self.relay is not None and self.relay.device_missing) or not dev.present():
                    self._removed()
            except DeviceMissing:
                self._removed()
            except DEVICE_ERRORS as e:
                kv(log, logging.WARNING, "device check failed", pci_id=self.pci_id, error=str(e))
        elif self.missing:
            if self.device_present():
                kv(log, logging.INFO, "device is back (hot-add): creating the NIC fresh", pci_id=self.pci_id)
                # FLR first: the function may still hold queues on memory its removal freed.
                if self._recreate(force_flr=True):
                    self.hot_adds += 1
        elif dev is None:
            kv(log, logging.WARNING, "nic did not come up: retrying with flr", pci_id=self.pci_id, error=self.error)
            if self._recreate(force_flr=True):
                self.recoveries += 1

    def _vf_reset(self) -> None:
        """EQE 135 at run time, a VF reconfiguration: stop the relay, tear down without HWC requests (the
        driver skips them with a reset request pending: no vport teardown, no DEREGISTER, no DESTROY_HWC),
        then reset the function and create the NIC fresh; the new relay resumes the guest's traffic."""
        kv(log, logging.WARNING, "vf reset requested by the device: reconfiguring the nic", pci_id=self.pci_id,
           revoke_vtl0_vf=self.dev.gdma.events.revoke_vtl0_vf)
        self._abandon_relay()
        with VfManager._recreating:
            try:
                self.dev.shutdown()
            except DEVICE_ERRORS as e:
                kv(log, logging.WARNING, "teardown after the reset request failed", pci_id=self.pci_id, error=str(e))
            self.dev = self.vport = self.relay = None
            if self._recreate(force_flr=True, locked=True):
                self.vf_resets += 1

    def _relay_failed(self) -> None:
        """The relay stopped on a device error: its vport is unusable. Mostly sends that stopped completing
        although the TX watchdog rang their doorbells again (`TxHung`): the function lost its queues behind the
        driver's back (an FLR), which no register or event shows; or a queue the device overflowed. Like a
        removal that came back: tear down without a request (the HWC may be gone too), the outstanding sends
        counted in `tx_stranded`, then reset the function and create the NIC fresh."""
        kv(log, logging.WARNING, "relay failed: resetting the nic", pci_id=self.pci_id, error=self.relay.error)
        self._abandon_relay()
        with VfManager._recreating:
            try:
                self.dev.remove()
            except DEVICE_ERRORS as e:
                kv(log, logging.WARNING, "teardown of the hung device failed", pci_id=self.pci_id, error=str(e))
            self.dev = self.vport = self.relay = None
            if self._recreate(force_flr=True, locked=True):
                self.relay_failure_resets += 1

    def _removed(self) -> None:
        kv(log, logging.WARNING, "device missing: tearing the nic down", pci_id=self.pci_id)
        self._abandon_relay()
        try:
            self.dev.remove()
        except DEVICE_ERRORS as e:
            kv(log, logging.WARNING, "teardown of the missing device failed", pci_id=self.pci_id, error=str(e))
        self.dev = self.vport = self.relay = None
        self.missing, self.error = True, "device missing"

    def _recreate(self, *, force_flr: bool, locked: bool = False) -> bool:
        """Create the NIC fresh at run time and resume its relay; False (error kept) if it did not come up."""
        if not locked:
            with VfManager._recreating:
                return self._recreate(force_flr=force_flr, locked=True)
        t = time.perf_counter()
        self.error = None
        try:
            self._fresh(persistent_hwc=self.keepalive, force_flr=force_flr)
        except NIC_ERRORS as e:
            self.error = f"{type(e).__name__}: {e}"
            self.dev = self.vport = None
            self.missing = isinstance(e, DeviceMissing)
            kv(log, logging.ERROR, "nic could not be re-created", pci_id=self.pci_id, error=self.error)
            return False
        self.missing = False
        self.create_ms = round((time.perf_counter() - t) * 1000, 3)
        self.start_relay()
        return True

    # -- save / shutdown --------------------------------------------------------------------
    def save(self) -> tuple[SaveOutcome, mana_driver_pb2.ManaSavedState | None]:
        """Spec §5.2 outcomes: Saved (device kept, handle released without reset), SaveFailed (device
        switched to FLR and released, so it resets), DeviceMissing (nothing to save: `quiesce` found it gone
        and freed its pages, or it never came up)."""
        if self.dev is None or self.dev.closed:
            kv(log, logging.WARNING, "no device to save", pci_id=self.pci_id, missing=self.missing)
            return SaveOutcome.DEVICE_MISSING, None
        try:
            state = self.dev.save()
        except SaveFailed as e:
            self.error = f"save failed: {e}"
            kv(log, logging.ERROR, "mana save failed, resetting the device", pci_id=self.pci_id, error=str(e))
            self._set_flr_and_release()
            return SaveOutcome.SAVE_FAILED, None
        except DeviceMissing as e:
            self.error = f"device missing: {e}"
            kv(log, logging.WARNING, "device vanished during save", pci_id=self.pci_id, error=str(e))
            return SaveOutcome.DEVICE_MISSING, None
        except DEVICE_ERRORS as e:  # e.g. a transport timeout: this NIC only
            self.error = f"save failed: {type(e).__name__}: {e}"
            self._set_flr_and_release()
            return SaveOutcome.SAVE_FAILED, None
        return SaveOutcome.SAVED, mana_driver_pb2.ManaSavedState(mana_device=state, pci_id=self.pci_id)

    def rehearse_save(self) -> mana_driver_pb2.ManaSavedState | None:
        """What `save` would record now, changing nothing (`ManaDevice.rehearse_save`); None without a device."""
        if self.dev is None or self.dev.closed:
            return None
        return mana_driver_pb2.ManaSavedState(mana_device=self.dev.rehearse_save(), pci_id=self.pci_id)

    def _set_flr_and_release(self) -> None:
        try:
            self.set_reset_method("flr")
        except Exception as e:  # noqa: BLE001 - spec 5.2: failing to set it is only a warning
            kv(log, logging.WARNING, "setting reset method failed", pci_id=self.pci_id, error=str(e))
        self.shutdown()

    def shutdown(self) -> None:
        """Normal shutdown (spec 5.3): vports, DEREGISTER_DEVICE, DESTROY_HWC; an unclean one switches the
        device to FLR so the next open resets it."""
        if self.dev is None or self.dev.closed:
            return
        try:
            clean = self.dev.shutdown()
        except DEVICE_ERRORS as e:
            kv(log, logging.ERROR, "shutdown failed", pci_id=self.pci_id, error=str(e))
            clean = False
        if not clean:
            try:
                self.set_reset_method("flr")
            except Exception as e:  # noqa: BLE001 - only a warning
                kv(log, logging.WARNING, "setting reset method failed", pci_id=self.pci_id, error=str(e))

    def reset_saved(self) -> None:
        """Before any NIC is revived: a device saved for keepalive still runs its HWC (and kept vports) on
        pages its save returned to the pool (spec 2.2); reset it so no device uses them when they are handed
        out again. A fresh open of a function whose reset method is flr resets it."""
        if self.dev is None or not self.dev.saved:
            return
        try:
            self.set_reset_method("flr")
            backing = self._open(persistent=False)
            self.set_reset_method("none")  # (so the close below does not reset it a second time)
            backing.close()
        except DEVICE_ERRORS as e:
            kv(log, logging.WARNING, "resetting the saved device failed", pci_id=self.pci_id, error=str(e))

    def revive(self) -> None:
        """After a failed servicing (spec §2.4 leaves these NICs dead, E5): bring the NIC back in this
        worker. A device saved for keepalive (reset by `reset_saved` first) takes the fallback path."""
        if self.dev is not None and not self.dev.closed:
            return  # the save never reached this device
        t = time.perf_counter()
        self.error = None  # the old error (e.g. a failed create) is history once the NIC comes back
        kept = self.dev is not None and self.dev.saved
        try:
            if kept:
                self.dev = self.vport = None
                self._fallback("servicing failed after the device was saved", reset_done=True)
            else:
                self.dev = self.vport = None
                self._fresh(persistent_hwc=self.keepalive)
        except NIC_ERRORS as e:
            self.error = f"{type(e).__name__}: {e}"
            self.dev = self.vport = None
            self.missing = isinstance(e, DeviceMissing)
        self.create_ms = round((time.perf_counter() - t) * 1000, 3)

    # -- reporting --------------------------------------------------------------------------
    def restore_report(self) -> NicRestore:
        return NicRestore(self.pci_id, self.restore_path, self.error, self.flr, self.create_ms)

    def relay_counters(self) -> dict[str, int]:
        """This worker's relay counters of the NIC (every relay it ran), for its save outcome."""
        return dict(vars(self.relay_stats))  # (ints only: asdict's deep copy costs 20 us in the save window)

    def emuplat_info(self) -> dict:
        return {"pci_id": self.pci_id, "mac": self.vport.mac if self.vport else b"", "adapter_index": self.cfg.index,
                "vports": 1 if self.vport else 0}

    def inspect(self) -> dict:
        out = {"pci_id": self.pci_id, "restore_path": self.restore_path, "error": self.error, "flr": self.flr,
               "create_ms": self.create_ms, "missing": self.missing, "vf_resets": self.vf_resets,
               "relay_failure_resets": self.relay_failure_resets, "hot_adds": self.hot_adds, "recoveries": self.recoveries, "device": None}
        if self.dev is not None and not self.dev.closed:
            out["device"] = self.dev.inspect()
        if self.vport is not None and not self.vport.closed:
            out["vport"] = self.vport.inspect()
        if self.relay is not None:
            out["relay"] = self.relay.inspect()
        return out
