"""Private pool size from the boot-shim variables (servicing spec §1.2)."""
from __future__ import annotations

import logging
import re
from typing import Mapping

from vfkeep.contract import POOL_CONFIG_ENV, POOL_OVERRIDE_ENV
from vfkeep.log import kv

log = logging.getLogger("vfkeep.memory.pool_config")

#: `release` / `debug`: the reference looks the size up by VP count x VTL2 memory; vfkeep models one
#: small VM, so both map to 512 pages (2 MiB), the size OpenHCL's tests use.
HEURISTIC_POOL_PAGES = 512


def pool_pages_from_env(environ: Mapping[str, str]) -> int:
    """Pool pages: the override wins when present; a number = pages; `off`, `0` or unparsable = no
    pool (unparsable is warned about); `release`/`debug` or nothing = heuristic default."""
    if POOL_OVERRIDE_ENV in environ:
        name, value = POOL_OVERRIDE_ENV, environ[POOL_OVERRIDE_ENV]
    elif POOL_CONFIG_ENV in environ:
        name, value = POOL_CONFIG_ENV, environ[POOL_CONFIG_ENV]
    else:
        return HEURISTIC_POOL_PAGES
    text = value.strip().lower()
    if text in ("release", "debug"):
        return HEURISTIC_POOL_PAGES
    if text == "off":
        return 0
    if re.fullmatch(r"[0-9]+", text):
        return int(text)
    kv(log, logging.WARNING, "unparsable pool config, no private pool", variable=name, value=value)
    return 0
