"""NVMe wire formats (spec `nvme.md`): the single source of truth for the emulator and the driver.

Modules: `constants` (every named value), `regs` (CAP, AQA, CC, CSTS,
doorbells), `commands` (SQE/CQE and command dwords), `identify` (identify
controller/namespace). Everything public is re-exported here.
"""
from . import commands, constants, identify, regs
from .commands import *  # noqa: F403
from .constants import *  # noqa: F403
from .identify import *  # noqa: F403
from .regs import *  # noqa: F403

__all__ = [*commands.__all__, *constants.__all__, *identify.__all__, *regs.__all__]
