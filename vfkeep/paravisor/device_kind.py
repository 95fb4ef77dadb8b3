"""The device-kind seam (DESIGN D10) and the keepalive policy every kind shares.

A keepalive device kind (MANA: `mana_kind.ManaKind`; NVMe next) is everything the worker does for the
devices of that kind, behind one small protocol, `DeviceKind`, which the worker drives in the order of
servicing spec §3 (restore) and §2.2 (save). Shared policy (servicing spec 6.2, 6.4): the NoReset -> FLR
dance of a fresh init and "attach then free" of saved buffers nobody will restore. The drivers know only
their device backing; when to reset a device and what happens to its saved memory is decided here and in
the kinds.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Protocol, TypeVar

from vfkeep.log import kv
from vfkeep.memory import DmaManager
from vfkeep.proto import underhill_pb2

from .options import KeepAliveConfig

log = logging.getLogger("vfkeep.worker.device")

B = TypeVar("B")
D = TypeVar("D")


@dataclass(frozen=True)
class PreviousState:
    """What the previous worker left for the device kinds (spec §3): the decoded blob (None: no servicing,
    or a blob that does not decode) and, when the blob or the DMA manager's part of it cannot be used, why.
    Then every device with saved state (every device, when `state` is None) takes its fallback path: its
    saved memory is not there to re-attach (DESIGN D2)."""

    state: underhill_pb2.ServicingState | None = None
    unusable: str | None = None


class DeviceKind(Protocol):
    """One keepalive device kind in the worker. The worker calls, in this order:

    - restore (spec §3): `prepare()` before the saved state is fetched, `attach_ahead(state, config)` once it is
      decoded, `settle_ahead()` while the worker still waits for the host's go, `configure(dma)` once the DMA
      manager exists and has restored its state (step 2), `restore(previous, config)` (steps 4 and 6: NVMe, then
      networking), the DMA manager's validation (step 7), then `start()` (step 8: guest IO moves again);
    - save (spec §2.1-2.2): `stop()` (guest IO stops), the emulation-platform state and the DMA manager's
      (steps 1-2), then `save(keepalive, state)` per kind (steps 3 and 5: NVMe before MANA, destructive);
      if the servicing then fails, `revive()` and `start()` (DESIGN D4); once the host has the state,
      `handed_over()`;
    - `shutdown()` for a normal stop, `inspect()` at any time.

    A kind never raises for one device: a device that cannot come up or be saved is reported in its
    results (the servicing goes on for the others)."""

    #: "mana", "nvme": the kind's keepalive option and effective flag (`OPENHCL_<NAME>_KEEP_ALIVE`).
    name: str

    def client_names(self) -> list[str]:
        """The DMA client names this kind's devices own (servicing spec 4, 9); no two kinds share one."""

    def prepare(self) -> None:
        """Before the saved state is fetched (a prelaunched worker: while the previous one still runs): what does
        not depend on the state and touches no device, so that it is not done in the servicing window."""

    def attach_ahead(self, state: underhill_pb2.ServicingState, config: KeepAliveConfig) -> None:
        """Once the saved state is decoded (not without one), before the DMA manager restores: send the transport
        attach of each device `restore` will take the keepalive path for (no DMA client, nothing of the state
        applied), so the device answers while the worker restores; `restore` reads the answers (any other path
        cancels it)."""

    def settle_ahead(self) -> list[int]:
        """While the worker waits for the host's go after `attach_ahead`: read the answers the devices have sent,
        without waiting, and finish each attach they complete (nothing of the state applied, no DMA client), so
        `restore` does not read them after the go. Returns the fds to wait on for the answers still to come."""

    def configure(self, dma: DmaManager) -> None:
        """This boot's DMA manager, before any of its clients exists (spec 8.3)."""

    def restore(self, previous: PreviousState, config: KeepAliveConfig) -> None:
        """Bring every configured device up by the kind's decision table: keepalive restore where the saved
        state and `config` (the kind's keepalive option) allow, else fresh or fallback."""

    def start(self) -> None:
        """Start the kind's guest IO (relays) once validation is done."""

    def stop(self) -> None:
        """Stop the kind's guest IO: nothing moves between the guest and the devices any more."""

    def save(self, keepalive: bool, state: underhill_pb2.ServicingState) -> list[Any]:
        """Effective keepalive: save every device (kept running, handle released without reset) into the
        kind's part of `state`; else shut every device down. Returns one outcome per device."""

    def revive(self) -> None:
        """After a failed servicing, bring back in place every device `save` tore down (E5, DESIGN D4)."""

    def handed_over(self) -> None:
        """The host has the state and this worker will only exit: release every handle a saved device still
        holds, as the exit would (no command, no reset), so the next worker can attach before this one ends."""

    def shutdown(self) -> None:
        """Normal teardown (no servicing): stop IO, shut every device down."""

    def inspect(self) -> dict:
        """The kind's part of the worker's inspect tree (its top-level keys, e.g. `nics`)."""


class CreateFailed(Exception):
    """Both the NoReset and the FLR attempt of a fresh init failed ("failed to create mana device")."""


def create_fresh(open_device: Callable[[], B], create: Callable[[B], D], set_reset_method: Callable[[str], None],
                 pci_id: str, *, what: str, errors: tuple[type[BaseException], ...],
                 missing: tuple[type[BaseException], ...] = (), force_flr: bool = False) -> tuple[D, bool]:
    """Fresh init with the NoReset -> FLR retry of servicing spec 6.4. Returns (device, flr_happened).

    `open_device` opens a new backing (a vfio-user device resets on open when its method is `flr`),
    `create` brings the device up on it (and closes it on failure); `set_reset_method` writes the
    device's reset method ("none" or "flr"); failing to write it is only a warning. `errors` are what a
    failed attempt raises (the kind's device errors; anything else propagates at once); of those, `missing`
    ones mean the device is not there: raised as they are, without an FLR attempt or a reset-method change
    (a reset cannot bring a removed function back). `force_flr` skips the NoReset attempt (DESIGN D2
    fallback after a failed restore). `what` names the device in the error.
    """
    def set_method(method: str) -> None:
        try:
            set_reset_method(method)
        except Exception as e:  # noqa: BLE001 - spec 6.4: only a warning
            kv(log, logging.WARNING, "setting reset method failed", pci_id=pci_id, method=method, error=e)

    if not force_flr:
        set_method("none")
        try:
            return create(open_device()), False
        except missing:
            raise
        except errors as e:
            kv(log, logging.WARNING, "fresh init without reset failed; retrying with flr", pci_id=pci_id, error=e)
    set_method("flr")
    try:
        dev = create(open_device())
    except errors as e:
        raise CreateFailed(f"failed to create {what} {pci_id}: {e}") from e
    set_method("none")
    return dev, True


def release_pending_buffers(dma: DmaManager, client_name: str) -> int:
    """Attach and free every saved pool allocation of persistent client `client_name` (spec 6.2 "attach then
    drop"): for a device whose saved state will not be restored. Returns the number of pages freed."""
    client = dma.new_client(client_name, persistent=True)
    try:
        blocks = client.attach_pending_buffers()
        for block in blocks:
            block.free()
        return sum(b.pages for b in blocks)
    finally:
        client.close()
