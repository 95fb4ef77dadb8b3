"""Keepalive policy every device kind's manager shares (servicing spec 6.2, 6.4): the NoReset -> FLR dance
of a fresh init and "attach then free" of saved buffers nobody will restore. The drivers know only their
device backing; when to reset a device and what happens to its saved memory is decided here."""
from __future__ import annotations

import logging
from typing import Callable, TypeVar

from vfkeep.log import kv
from vfkeep.memory import DmaManager

log = logging.getLogger("vfkeep.worker.device")

B = TypeVar("B")
D = TypeVar("D")


class CreateFailed(Exception):
    """Both the NoReset and the FLR attempt of a fresh init failed ("failed to create mana device")."""


def create_fresh(open_device: Callable[[], B], create: Callable[[B], D], set_reset_method: Callable[[str], None],
                 pci_id: str, *, what: str, errors: tuple[type[BaseException], ...],
                 force_flr: bool = False) -> tuple[D, bool]:
    """Fresh init with the NoReset -> FLR retry of servicing spec 6.4. Returns (device, flr_happened).

    `open_device` opens a new backing (a vfio-user device resets on open when its method is `flr`),
    `create` brings the device up on it (and closes it on failure); `set_reset_method` writes the
    device's reset method ("none" or "flr"); failing to write it is only a warning. `errors` are what a
    failed attempt raises (the kind's device errors; anything else propagates at once). `force_flr` skips
    the NoReset attempt (DESIGN D2 fallback after a failed restore). `what` names the device in the error.
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
