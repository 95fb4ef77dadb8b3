"""The NVMe device kind (`DeviceKind`, DESIGN D10): the worker's NVMe manager behind the seam.

Its part of the servicing state is field 10000 (`nvme_state`: `NvmeManagerSavedState`, absent unless
NVMe keepalive was effective and every controller saved) and one "storvsp/<pci_id>" state unit per disk
with a guest block channel (the guest requests in flight, replayed by the next worker). The worker drives
it first: restore before networking (servicing spec §3 step 4), save before MANA (§2.2 step 3).
"""
from __future__ import annotations

import logging

from ..contract import NicRestore, NicSaveOutcome, NvmeConfig
from ..guest.block import BlockChannel, BlockLayout
from ..log import kv
from ..memory import DmaManager, GuestMemory
from ..proto import underhill_pb2
from .device_kind import PreviousState
from .nvme_manager import NvmeManager, dma_client_name
from .options import KeepAliveConfig

log = logging.getLogger("vfkeep.worker")


class NvmeKind:
    """Every configured NVMe controller of one worker; a controller whose config names block-channel
    eventfds gets a relay to disk INDEX of `block_layout` (`BlockLayout.to_str()` form)."""

    name = "nvme"

    def __init__(self, configs: list[NvmeConfig], mem: GuestMemory, block_layout: str | None, *,
                 always_flr: bool = False, cpu_count: int = 2, io_queues: int = 2):
        self.configs = configs
        self.mem = mem
        self.always_flr, self.cpu_count, self.io_queues = always_flr, cpu_count, io_queues
        self.channels: dict[str, BlockChannel] = {}
        with_channel = [c for c in configs if c.request_fd >= 0]
        if with_channel:
            if block_layout is None:
                raise ValueError("--nvme with block-channel eventfds needs --block-layout")
            layout = BlockLayout.from_str(block_layout)
            for c in with_channel:
                self.channels[c.pci_id] = BlockChannel.attach(mem, layout, c.index, c.request_fd, c.completion_fd)
        self.dma: DmaManager | None = None
        self.manager: NvmeManager | None = None

    def client_names(self) -> list[str]:
        return [dma_client_name(c.pci_id) for c in self.configs]

    def prepare(self) -> None:
        """Nothing: the block relays attach their rings when they start."""

    def attach_ahead(self, state, config: KeepAliveConfig) -> None:
        """Nothing: the NVMe manager's restore opens its controllers."""

    def settle_ahead(self) -> list[int]:
        """Nothing was attached ahead."""
        return []

    def configure(self, dma: DmaManager) -> None:
        self.dma = dma

    def restore(self, previous: PreviousState, config: KeepAliveConfig) -> None:
        """The spawner decision table per controller (nvme.md §13.2); an unusable blob or DMA state makes
        every controller with saved state a fallback (fresh init; the controller is reset first)."""
        self.manager = NvmeManager(self.configs, self.mem, self.dma, keepalive_enabled=config.is_enabled,
                                   cpu_count=self.cpu_count, io_queues=self.io_queues, always_flr=self.always_flr,
                                   channels=self.channels)
        results = self.manager.restore(previous.state, forced_fallback=previous.unusable)
        for r in results:
            kv(log, logging.INFO, "nvme controller up", pci_id=r["pci_id"], path=r["restore_path"], error=r["error"],
               keepalive_config=config.canonical)

    def reports(self) -> list[NicRestore]:
        return self.manager.reports() if self.manager is not None else []

    def start(self) -> None:
        self.manager.start()

    def stop(self) -> None:
        if self.manager is not None:
            self.manager.stop()

    def save(self, keepalive: bool, state: underhill_pb2.ServicingState) -> list[NicSaveOutcome]:
        """Field 10000 under effective NVMe keepalive (else every controller is shut down), and the relays'
        in-flight guest requests as state units either way."""
        saved, outcomes = self.manager.save(keepalive)
        if saved is not None:
            state.init_state.nvme_state.nvme_state.CopyFrom(saved)
        state.units.extend(self.manager.units())
        return outcomes

    def revive(self) -> None:
        self.manager.revive()

    def handed_over(self) -> None:
        if self.manager is not None:
            self.manager.handed_over()

    def shutdown(self) -> None:
        if self.manager is not None:
            self.manager.shutdown()

    def inspect(self) -> dict:
        return {"nvme": self.manager.inspect() if self.manager is not None else None}
