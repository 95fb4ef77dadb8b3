"""Worker options from the environment (servicing spec §1.1, §1.4).

`OPENHCL_MANA_KEEP_ALIVE` and `OPENHCL_NVME_KEEP_ALIVE` share one grammar.
Only the "host supports it AND a private pool exists" variant enables
keepalive; a parse error is a warning and means Disabled, never fatal.
"""
from __future__ import annotations

import enum
import logging
from dataclasses import dataclass
from typing import Mapping

from ..contract import MANA_KEEPALIVE_ENV, NVME_KEEPALIVE_ENV
from ..log import kv

log = logging.getLogger(__name__)


class KeepAliveConfig(enum.Enum):
    ENABLED_HOST_AND_PRIVATE_POOL_PRESENT = "enabled"
    ENABLED_HOST_AND_PRIVATE_POOL_NOT_PRESENT = "host,noprivatepool"
    DISABLED_HOST_AND_PRIVATE_POOL_PRESENT = "nohost,privatepool"
    DISABLED = "disabled"

    @property
    def is_enabled(self) -> bool:
        return self is KeepAliveConfig.ENABLED_HOST_AND_PRIVATE_POOL_PRESENT

    @property
    def canonical(self) -> str:
        """String that parses back to this variant."""
        return self.value


class KeepAliveParseError(ValueError):
    pass


_EXACT = {
    "host,privatepool": KeepAliveConfig.ENABLED_HOST_AND_PRIVATE_POOL_PRESENT,
    "enabled": KeepAliveConfig.ENABLED_HOST_AND_PRIVATE_POOL_PRESENT,
    "host,noprivatepool": KeepAliveConfig.ENABLED_HOST_AND_PRIVATE_POOL_NOT_PRESENT,
    "nohost,privatepool": KeepAliveConfig.DISABLED_HOST_AND_PRIVATE_POOL_PRESENT,
    "nohost,noprivatepool": KeepAliveConfig.DISABLED,
    "disabled": KeepAliveConfig.DISABLED,
}


def parse_keepalive(value: str) -> KeepAliveConfig:
    """Parse one keepalive string; case-insensitive, no trimming (spec §1.1)."""
    v = value.lower()
    if v in _EXACT:
        return _EXACT[v]
    if v.startswith("disabled,"):
        return KeepAliveConfig.DISABLED
    raise KeepAliveParseError(f"invalid keepalive value {value!r}: expected host,privatepool | enabled | "
                              "host,noprivatepool | nohost,privatepool | nohost,noprivatepool | disabled[,...]")


def keepalive_from_env(environ: Mapping[str, str], name: str) -> KeepAliveConfig:
    """Read `name` from the environment; absent → Disabled; bad value → warning + Disabled."""
    if name not in environ:
        return KeepAliveConfig.DISABLED
    try:
        return parse_keepalive(environ[name])
    except KeepAliveParseError as e:
        kv(log, logging.WARNING, "bad keepalive setting, using disabled", variable=name, value=environ[name],
           error=str(e))
        return KeepAliveConfig.DISABLED


@dataclass(frozen=True)
class WorkerOptions:
    mana_keepalive: KeepAliveConfig
    nvme_keepalive: KeepAliveConfig

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> "WorkerOptions":
        return cls(keepalive_from_env(environ, MANA_KEEPALIVE_ENV), keepalive_from_env(environ, NVME_KEEPALIVE_ENV))


@dataclass(frozen=True)
class EffectiveKeepAlive:
    """Per-servicing decision (spec §1.4): host flag AND config AND (NVMe only) pool present."""

    mana: bool
    nvme: bool

    @property
    def any(self) -> bool:
        return self.mana or self.nvme


def effective_keepalive(options: WorkerOptions, *, host_mana: bool, host_nvme: bool,
                        pool_present: bool) -> EffectiveKeepAlive:
    """MANA trusts its config string (spec §1.1); NVMe also needs a real pool."""
    return EffectiveKeepAlive(
        mana=host_mana and options.mana_keepalive.is_enabled,
        nvme=host_nvme and options.nvme_keepalive.is_enabled and pool_present,
    )
