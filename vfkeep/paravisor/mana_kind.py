"""The MANA device kind (`DeviceKind`, DESIGN D10): the worker's networking, one `VfManager` per NIC.

NICs come up, are saved and shut down concurrently (one thread each: each NIC is its own device process,
so their HWC round trips overlap). The kind's part of the servicing state is field 10003 (`mana_state`,
one `ManaSavedState` per saved NIC; absent when there are no NICs or no effective MANA keepalive), and it
provides the NICs' emulation-platform state (netvsp, MAC -> adapter index) for spec §2.2 step 1.
"""
from __future__ import annotations

import concurrent.futures
import logging
import time

from ..contract import NicConfig, NicRestore, NicSaveOutcome, SaveOutcome
from ..guest.ring import ChannelLayout, NicChannel, RingError
from ..log import kv
from ..memory import DmaManager, GuestMemory
from ..proto import underhill_pb2
from .device_kind import PreviousState
from .options import KeepAliveConfig
from .servicing import mana_states_by_pci_id
from .net_relay import RelayThread
from .vf_manager import VfManager, attach_ahead_for, check_ahead, dma_client_names

#: The networking step of the worker: its lines read as the worker's (`vfkeep.worker`).
log = logging.getLogger("vfkeep.worker")
#: After a start or restore the worker waits at most this long (for all NICs) for the relays to hand the guest
#: its first frames (`NetRelay.resumed`) before anything else runs: a deferred HWC probe (data-path keepalive),
#: the monitors, the `started` reply. A relay that moves nothing says so at once (it goes idle).
RESUME_WAIT_S = 0.1


def _each(fn, items: list) -> list:
    """fn over every NIC at once; results in order, the first exception re-raised."""
    if len(items) <= 1:
        return [fn(i) for i in items]
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(items), thread_name_prefix="nic") as pool:
        return list(pool.map(fn, items))


class ManaKind:
    """Every configured MANA NIC of one worker. `channel_layout` places the NICs' guest rings; with
    `datapath_keepalive` (DESIGN D7) a keepalive save also keeps each vport's queues."""

    name = "mana"

    def __init__(self, nics: list[NicConfig], mem: GuestMemory, channel_layout: str | None, *,
                 datapath_keepalive: bool = False):
        self.nic_configs = nics
        self.mem = mem
        self.channel_layout = channel_layout
        self.datapath_keepalive = datapath_keepalive
        self.dma: DmaManager | None = None
        self.vf_managers: list[VfManager] = []
        #: Guest rings attached by `prepare`, by NIC index.
        self.channels: dict[int, NicChannel] = {}
        #: Relay threads started by `prepare`, by NIC index (each NIC's first relay runs on its own).
        self.relay_threads: dict[int, RelayThread] = {}
        #: Device attaches `attach_ahead` sent, by NIC index, until `restore` hands them to the VF managers.
        self.ahead: dict = {}
        #: The saved state each of those attaches was sent for, and its checks once made (`settle_ahead`).
        self.ahead_saved: dict = {}
        self.checked: dict = {}

    def client_names(self) -> list[str]:
        return [name for cfg in self.nic_configs for name in dma_client_names(cfg.pci_id)]

    def prepare(self) -> None:
        """Attach each NIC's guest rings now (their header checks and views, block views included, about 0.15 ms
        per NIC in a new process) and start its relay's thread (`RelayThread`), so the relays that start at the end
        of the restore find both ready. Nothing is cached in a ring object, so attaching while the previous worker's
        relay still moves frames is safe; a ring that does not attach is left to the NIC's relay start, which
        reports it."""
        if self.channel_layout is None:
            return
        layout = ChannelLayout.from_str(self.channel_layout)
        for cfg in self.nic_configs:
            if cfg.index not in self.relay_threads:
                self.relay_threads[cfg.index] = RelayThread(f"relay-{cfg.pci_id}")
            if cfg.index not in self.channels:
                try:
                    self.channels[cfg.index] = NicChannel.attach(self.mem, layout, cfg.index, cfg.tx_bell_fd,
                                                                 cfg.rx_bell_fd)
                    self.channels[cfg.index].block_views()  # (not in the relay's first passes)
                except RingError:
                    pass

    def attach_ahead(self, state: underhill_pb2.ServicingState, config: KeepAliveConfig) -> None:
        """Each NIC that will take the keepalive restore (its saved state, keepalive enabled) has its device attach
        sent now (`attach_ahead_for`): the device answers while the DMA manager and the kinds before networking
        restore, not while the NIC's restore waits (0.5-0.8 ms of the guest's blackout under data-path keepalive)."""
        if not config.is_enabled:
            return
        saved = mana_states_by_pci_id(state)
        for cfg in self.nic_configs:
            match = next((s for s in saved if s.pci_id == cfg.pci_id), None)
            if match is not None and cfg.index not in self.ahead:
                pending = attach_ahead_for(cfg, self.mem, match)
                if pending is not None:
                    self.ahead[cfg.index], self.ahead_saved[cfg.index] = pending, match

    def settle_ahead(self) -> list[int]:
        """Each attach sent ahead that the device has answered in full is finished now (`PendingAttach.settle`:
        its answers read and checked, 0.2-0.45 ms of the new worker's CPU that otherwise falls after the go, in the
        guest's blackout), and the saved state it was sent for checked against those answers (`check_ahead`: the
        restore does not check it again, 0.1-0.2 ms more); the sockets of those still waiting for answers."""
        waiting = []
        for index, pending in self.ahead.items():
            if not pending.settle():
                waiting.append(pending.fileno())
            elif index not in self.checked:
                self.checked[index] = check_ahead(pending, self.ahead_saved[index], self.mem.layout.pool)
        return waiting

    def configure(self, dma: DmaManager) -> None:
        self.dma = dma

    # -- restore (spec §3 step 6) ---------------------------------------------------------------
    def restore(self, previous: PreviousState, config: KeepAliveConfig) -> None:
        """Per configured NIC the first saved state with its pci_id, then `VfManager.create` (the decision
        table); saved state for a NIC that is not configured is only warned about (D3 frees its pages)."""
        saved = mana_states_by_pci_id(previous.state)

        def create(cfg: NicConfig) -> VfManager:
            self.ahead_saved.pop(cfg.index, None)
            match = next((s for s in saved if s.pci_id == cfg.pci_id), None)
            kv(log, logging.INFO, "nic saved state lookup", pci_id=cfg.pci_id, found=match is not None,
               keepalive_config=config.canonical)
            forced = previous.unusable if previous.state is None or match is not None else None
            return VfManager.create(cfg, self.mem, self.dma, saved=match, keepalive=config.is_enabled,
                                    force_fallback=forced, datapath_keepalive=self.datapath_keepalive,
                                    channel=self.channels.get(cfg.index),
                                    relay_thread=self.relay_threads.pop(cfg.index, None),
                                    ahead=self.ahead.pop(cfg.index, None), checked=self.checked.pop(cfg.index, None))

        self.vf_managers = _each(create, self.nic_configs)
        known = {c.pci_id for c in self.nic_configs}
        for s in saved:
            if s.pci_id not in known:
                kv(log, logging.WARNING, "saved state for a NIC that is not configured", pci_id=s.pci_id)

    def reports(self) -> list[NicRestore]:
        """How each NIC came up (the `started` and `save_failed` replies)."""
        return [vf.restore_report() for vf in self.vf_managers]

    def start(self) -> None:
        """Every NIC's relay starts; once they have handed the guest its first frames back (or have nothing to
        do; `RESUME_WAIT_S` at most, for all of them), deferred HWC probes run and each VF manager watches its
        device (VF reset requests, removal, hot-add). The worker's `started` reply waits for it too: that reply
        sets the host going (the old worker's exit, the traffic marks and statistics), and all of it, like the
        probes and the rest of this start, would take the two CPUs and this process's GIL from the relays' first
        passes, inside the guest's blackout."""
        for vf in self.vf_managers:
            vf.start_traffic(self.channel_layout)
        deadline = time.monotonic() + RESUME_WAIT_S
        for vf in self.vf_managers:
            vf.wait_resumed(deadline)
        for vf in self.vf_managers:
            vf.run()

    # -- save (spec §2.2 steps 1 and 5) --------------------------------------------------------------
    def stop(self) -> None:
        """Relays and watching stop; a NIC whose device is gone is torn down now, before the DMA snapshot."""
        _each(VfManager.quiesce, self.vf_managers)

    def emuplat(self) -> list[dict]:
        """Step 1: each NIC's netvsp state and adapter index, taken before any NIC is torn down."""
        return [vf.emuplat_info() for vf in self.vf_managers]

    def save(self, keepalive: bool, state: underhill_pb2.ServicingState) -> list[NicSaveOutcome]:
        """Step 5 under effective MANA keepalive: `VfManager.save` per NIC into field 10003. Without it,
        spec 2.3 unload_for_servicing: normal shutdown (DEREGISTER_DEVICE, DESTROY_HWC), handle leaked."""
        if not (keepalive and self.vf_managers):
            _each(VfManager.shutdown, self.vf_managers)
            return [NicSaveOutcome(vf.pci_id, SaveOutcome.DEVICE_MISSING if vf.missing else SaveOutcome.SHUTDOWN,
                                   vf.error, vf.relay_counters()) for vf in self.vf_managers]
        wrapper = state.init_state.mana_state
        wrapper.SetInParent()
        outcomes = []
        for vf, (outcome, saved) in zip(self.vf_managers, _each(VfManager.save, self.vf_managers)):
            outcomes.append(NicSaveOutcome(vf.pci_id, outcome, vf.error, vf.relay_counters()))
            if saved is not None:
                wrapper.states.add().CopyFrom(saved)
        kv(log, logging.INFO, "MANA device state successfully saved for keepalive", count=len(wrapper.states))
        return outcomes

    def rehearse_save(self, state: underhill_pb2.ServicingState) -> None:
        """Field 10003 as a save under keepalive would fill it now, into a scratch `state`, changing nothing
        (`Worker._warm_save_path`)."""
        wrapper = state.init_state.mana_state
        wrapper.SetInParent()
        for vf in self.vf_managers:
            saved = vf.rehearse_save()
            if saved is not None:
                wrapper.states.add().CopyFrom(saved)

    def handed_over(self) -> None:
        """Nothing is left open: a saved MANA device released its handle in `save`."""

    def revive(self) -> None:
        """Every saved device is reset before any NIC allocates again (their saves returned their pool pages
        while the devices kept using them), then each NIC comes back."""
        _each(VfManager.reset_saved, self.vf_managers)
        _each(VfManager.revive, self.vf_managers)

    # -- other ----------------------------------------------------------------------------------------
    def shutdown(self) -> None:
        for vf in self.vf_managers:
            vf.quiesce()
            vf.shutdown()

    def inspect(self) -> dict:
        return {"nics": [vf.inspect() for vf in self.vf_managers]}
