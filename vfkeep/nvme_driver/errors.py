"""Typed NVMe driver errors, so the NVMe manager picks a recovery (fresh path, FLR) by type."""
from __future__ import annotations

from vfkeep import savestate
from vfkeep.driver.errors import BackingError
from vfkeep.driver.errors import DeviceMissing as TransportMissing
from vfkeep.nvme import admin_name, status_name


class NvmeError(Exception):
    """Base of every NVMe driver error."""


class DeviceGone(NvmeError):
    """CSTS reads all ones, or the transport to the device is gone."""


class UnsupportedController(NvmeError):
    """CAP says the controller cannot be driven (MPSMIN != 0, MQES = 0, no MSI-X)."""


class ControllerFatal(NvmeError):
    """CSTS.CFS became 1 while enabling ("device had fatal error")."""


class ReadyTimeout(NvmeError):
    """CSTS.RDY did not reach the wanted value within CAP.TO (vfkeep bounds what the reference does not)."""


class CommandFailed(NvmeError):
    """A command completed with a non-zero status."""

    def __init__(self, opcode: int, status: int, admin: bool = True):
        name = admin_name(opcode) if admin else f"IO opcode {opcode:#04x}"
        super().__init__(f"{name} failed: {status_name(status)} ({status:#05x})" if status >= 0
                         else f"{name} was abandoned: the driver stopped or the device failed")
        self.opcode = opcode
        self.status = status


class CommandTimeout(NvmeError):
    """A command the caller waited on did not complete in time (it stays pending)."""


class DriverStopped(NvmeError):
    """The driver was saved or shut down: it accepts no more commands."""


class SaveFailed(NvmeError, savestate.SaveError):
    """The driver cannot be saved (e.g. never initialised: no identify data)."""


class RestoreError(NvmeError, savestate.RestoreError):
    """The driver cannot be restored; nothing outside the device's own pages was written."""


class InvalidSavedState(RestoreError, savestate.InvalidSavedState):
    """The saved state is malformed or does not fit this boot (untrusted input, checked before any use)."""


class RestoredMemoryNotFound(InvalidSavedState):
    """No re-attached block has a queue pair's saved (mem_len, base_pfn)."""


class DeviceNotReady(RestoreError):
    """CSTS.RDY is 0 at restore: the controller was reset during the handover."""


#: What talking to an NVMe device can raise: driver errors, the backing's (transport errors translated), OS errors.
DEVICE_ERRORS = (NvmeError, TransportMissing, BackingError, OSError)
