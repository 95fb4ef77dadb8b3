"""The vfio-user subset between driver (client) and device (server), spec vfio-user.md."""
from .client import (DeviceInfo, DeviceMissing, IrqInfo, ProtocolError, RegionInfo, VfioClientError, VfioDevice,
                     VfioError, VfioTimeout)
from .control import control_call, control_server
from .device import RESET_FLR, RESET_METHODS, RESET_NONE, CoreBackedDevice, VfioUserDevice, check_reset_method
from .dma import DmaFault, DmaSpace
from .irqs import IrqTable
from .loop import EventLoop, Timer
from .protocol import CommandError
from .server import VfioUserServer

__all__ = [
    "DeviceInfo", "DeviceMissing", "IrqInfo", "ProtocolError", "RegionInfo", "VfioClientError", "VfioDevice",
    "VfioError", "VfioTimeout",
    "control_call", "control_server",
    "RESET_FLR", "RESET_METHODS", "RESET_NONE", "CoreBackedDevice", "VfioUserDevice", "check_reset_method",
    "DmaFault", "DmaSpace", "IrqTable", "EventLoop", "Timer", "CommandError", "VfioUserServer",
]
