"""GDMA/MANA wire formats (spec `gdma.md`): the single source of truth for device and driver.

Modules: `constants` (every named value), `regs` (BAR0, doorbells, SMC),
`queues` (WQE/SGE/CQE/EQE, owner counting), `hwc` (HWC OOBs, message headers),
`requests` (GDMA bodies), `bnic` (MANA bodies), `datapath` (TX/RX OOBs),
`messages` (code → body table, header builders), `layout` (`vfkeep layout`).
Everything public is re-exported here, except `codec` (precompiled `struct`
codecs for the data path, derived from these structs; import the module).
"""
from .base import BitfieldWord, WireStruct, struct_layout
from .bnic import *  # noqa: F403
from .constants import *  # noqa: F403
from .datapath import *  # noqa: F403
from .hwc import *  # noqa: F403
from .messages import *  # noqa: F403
from .queues import *  # noqa: F403
from .regs import *  # noqa: F403
from .requests import *  # noqa: F403
from . import bnic, constants, datapath, hwc, messages, queues, regs, requests

__all__ = [
    "BitfieldWord",
    "WireStruct",
    "struct_layout",
    "WIRE_STRUCTS",
    *bnic.__all__,
    *constants.__all__,
    *datapath.__all__,
    *hwc.__all__,
    *messages.__all__,
    *queues.__all__,
    *regs.__all__,
    *requests.__all__,
]

# Every concrete wire struct (bitfield words included), in module order; `vfkeep layout` dumps these.
WIRE_STRUCTS: dict[str, type[WireStruct]] = {
    name: obj
    for mod in (regs, queues, hwc, requests, bnic, datapath)
    for name in mod.__all__
    if isinstance(obj := getattr(mod, name), type) and issubclass(obj, WireStruct)
}
