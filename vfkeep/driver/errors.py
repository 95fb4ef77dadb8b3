"""Typed driver errors, so the worker can pick a recovery (fallback, FLR, no saved state) by type."""
from __future__ import annotations

from vfkeep import savestate


class DriverError(Exception):
    """Base of every MANA/GDMA driver error."""


class DeviceMissing(DriverError):
    """BAR0 reads as all ones: the device is absent or was surprise-removed (gdma spec 3.3)."""


class BackingError(DriverError):
    """The device backing could not carry out an access: the transport refused it, broke its protocol or
    failed underneath (the transport's own errors never reach the driver)."""


class BackingTimeout(BackingError):
    """The device did not answer an access within the transport's timeout."""


class NoDmaClient(DriverError):
    """The device's manager gave it no DMA client of the kind asked for (servicing spec 4)."""


class BadRegisterMap(DriverError):
    """The BAR0 register map fails the checks of gdma spec 3.4."""


class SmcError(DriverError):
    """An SMC mailbox message (ESTABLISH_HWC, DESTROY_HWC, ...) was refused or never answered."""

    def __init__(self, message: str, msg_type: int, status: int | None = None):
        super().__init__(message)
        self.msg_type = msg_type
        self.status = status


class HwcError(DriverError):
    """An HWC request did not complete successfully."""


class HwcTimeout(HwcError):
    """No HWC response within the timeout; the HWC is marked failed."""

    def __init__(self, message: str, request_type: int):
        super().__init__(message)
        self.request_type = request_type


class HwcFailure(HwcError):
    """The device answered with a non-zero status (`status` set), or the HWC already failed (`status` None)."""

    def __init__(self, message: str, request_type: int, status: int | None):
        super().__init__(message)
        self.request_type = request_type
        self.status = status


class ResetRequestPending(HwcError):
    """The device asked for a VF reset (EQE 135): every HWC request now fails locally."""


class QueueOverflow(DriverError):
    """The device lapped the consumer of a CQ or EQ (owner count neither old nor current)."""


class BringUpError(DriverError):
    """HWC bring-up events or device answers are missing or inconsistent."""


class SaveFailed(DriverError, savestate.SaveError):
    """The driver cannot be saved; the device must be shut down or reset instead."""


class SaveRefusedHwcFailure(SaveFailed):
    """An earlier HWC request failed or timed out: "cannot save/restore after HWC failure"."""


class SaveRefusedResetPending(SaveFailed):
    """A VF reset request is pending: "cannot save/restore with HWC reset request pending"."""


class RestoreError(DriverError, savestate.RestoreError):
    """The saved device could not be taken over; the worker falls back to FLR and a fresh init."""


class InvalidSavedState(RestoreError, savestate.InvalidSavedState):
    """Saved driver state is malformed or does not match this boot; nothing was written to guest memory."""


class RestoredMemoryNotFound(RestoreError):
    """No re-attached pool block starts at the saved HWC base PFN."""

    def __init__(self, base_pfn: int):
        super().__init__(f"gdma restored memory not found for base_pfn {base_pfn}")
        self.base_pfn = base_pfn


class VportError(DriverError):
    """A vport cannot be opened or used."""


class TxHung(VportError):
    """Sends stopped completing although the TX watchdog rang their doorbells again: the function lost its
    queues (e.g. reset behind the driver's back)."""


class BadFrame(VportError, ValueError):
    """A frame is empty or larger than one packet buffer."""


#: What talking to a device can raise: driver errors (transport failures included, translated by the backing)
#: and OS errors (eventfds).
DEVICE_ERRORS = (DriverError, OSError)
