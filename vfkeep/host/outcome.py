"""Why a NIC did not take the path the host asked for, and the servicing status that follows.

A servicing that completes can still have lost what was asked of it: keepalive requested, but the save
was refused (HWC failure, reset request, device missing), the old or new worker is not configured for
it, the saved state was rejected (FLR fallback), or the pool had no room. Each such NIC gets a
`reason` and the servicing is `degraded`; `failed` is for servicings whose save, worker or restore
failed (`error`). Computed by the host from what the workers reported; nothing here talks to a process.
"""
from __future__ import annotations

from ..contract import POOL_EXHAUSTED, NicSaveOutcome, RestorePath, SaveOutcome, ServicingStatus

NOT_REQUESTED = "keepalive not requested"
_SAVE_FAILED_PREFIX = "save failed: "


def nic_reason(requested_keepalive: bool, path: RestorePath, error: str | None, save: NicSaveOutcome | None,
               old_config: str | None, new_config: str | None, kind: str = "MANA") -> tuple[str | None, bool]:
    """(reason, degraded) for one device (a NIC, or with `kind` "NVMe" a controller). `save` is the old
    worker's outcome for it (None when the save did not complete); `old_config`/`new_config` are the workers'
    canonical keepalive settings of that kind."""
    if path is RestorePath.KEEPALIVE:
        return error, error is not None  # e.g. the kept vport did not fit the pool
    if not requested_keepalive:  # fresh was asked of it: degraded only if it did not come up that way
        down = path is RestorePath.FALLBACK or (error is not None and not error.startswith(POOL_EXHAUSTED))
        return (f"{NOT_REQUESTED}; {error}" if error else NOT_REQUESTED), down
    if save is None:
        reason = "save did not complete"
    elif save.save_outcome is SaveOutcome.SAVE_FAILED:
        detail = save.error or "the driver refused"
        reason = "save refused: " + (detail[len(_SAVE_FAILED_PREFIX):] if detail.startswith(_SAVE_FAILED_PREFIX)
                                     else detail)
    elif save.save_outcome is SaveOutcome.DEVICE_MISSING:
        reason = "save refused: device missing"
    elif save.save_outcome is SaveOutcome.SHUTDOWN:
        reason = (f"keepalive not configured in the old worker ({kind} keepalive {old_config})"
                  if old_config != "enabled" else "the old worker could not save for keepalive (no private pool)")
    elif path is RestorePath.FRESH and new_config != "enabled":
        reason = f"keepalive not configured in the new worker ({kind} keepalive {new_config})"
    elif path is RestorePath.FRESH:  # saved, but the state the new worker got has none for it
        reason = "no saved state for it reached the new worker"
    else:
        reason = None
    if path is RestorePath.FALLBACK and error:
        device_side = error.startswith(("keepalive restore failed", "servicing failed")) \
            and "InvalidSavedState" not in error  # the device failed the restore, not the state
        rejected = error if device_side else f"saved state rejected: {error}"
        reason = rejected if reason is None else f"{reason}; {rejected}"
    elif error and error not in (reason or ""):
        reason = f"{reason}; {error}"
    return reason, True


def servicing_status(failed: bool, degraded: list[bool]) -> ServicingStatus:
    if failed:
        return ServicingStatus.FAILED
    return ServicingStatus.DEGRADED if any(degraded) else ServicingStatus.OK
