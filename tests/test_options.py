"""Keepalive env grammar (servicing spec §1.1) and effective mode (§1.4)."""
import logging

import pytest

from vfkeep.contract import MANA_KEEPALIVE_ENV as MANA_ENV
from vfkeep.contract import NVME_KEEPALIVE_ENV as NVME_ENV
from vfkeep.paravisor.options import (KeepAliveConfig, KeepAliveParseError,
                                      WorkerOptions, effective_keepalive, keepalive_from_env, parse_keepalive)

E = KeepAliveConfig


@pytest.mark.parametrize("value,variant", [
    ("host,privatepool", E.ENABLED_HOST_AND_PRIVATE_POOL_PRESENT),
    ("HOST,PrivatePool", E.ENABLED_HOST_AND_PRIVATE_POOL_PRESENT),
    ("enabled", E.ENABLED_HOST_AND_PRIVATE_POOL_PRESENT),
    ("host,noprivatepool", E.ENABLED_HOST_AND_PRIVATE_POOL_NOT_PRESENT),
    ("nohost,privatepool", E.DISABLED_HOST_AND_PRIVATE_POOL_PRESENT),
    ("nohost,noprivatepool", E.DISABLED),
    ("disabled", E.DISABLED),
    ("disabled,host,privatepool", E.DISABLED),
    ("DISABLED,anything", E.DISABLED),
])
def test_grammar(value, variant):
    assert parse_keepalive(value) is variant
    assert parse_keepalive(value).is_enabled == (variant is E.ENABLED_HOST_AND_PRIVATE_POOL_PRESENT)


@pytest.mark.parametrize("value", ["1", "true", "host", "", "host, privatepool", " enabled", "enabled ", "disabledx"])
def test_parse_errors(value):
    with pytest.raises(KeepAliveParseError):
        parse_keepalive(value)


@pytest.mark.parametrize("variant", list(E))
def test_canonical_round_trip(variant):
    assert parse_keepalive(variant.canonical) is variant


def test_env_absent_is_disabled():
    assert keepalive_from_env({}, MANA_ENV) is E.DISABLED


def test_env_bad_value_warns_and_disables(caplog):
    with caplog.at_level(logging.WARNING):
        assert keepalive_from_env({MANA_ENV: "1"}, MANA_ENV) is E.DISABLED
    assert any(MANA_ENV in str(getattr(r, "kv", {})) and "'1'" not in r.getMessage() for r in caplog.records)
    assert any(getattr(r, "kv", {}).get("value") == "1" for r in caplog.records)


@pytest.mark.parametrize("host_mana,host_nvme,pool,mana,nvme", [
    (True, True, True, True, True),
    (False, True, True, False, True),
    (True, False, True, True, False),
    (True, True, False, True, False),  # MANA trusts its string; NVMe cross-checks the pool
])
def test_effective_mode(host_mana, host_nvme, pool, mana, nvme):
    opts = WorkerOptions.from_env({MANA_ENV: "host,privatepool", NVME_ENV: "host,privatepool"})
    eff = effective_keepalive(opts, host_mana=host_mana, host_nvme=host_nvme, pool_present=pool)
    assert (eff.mana, eff.nvme) == (mana, nvme)
    assert eff.any == (mana or nvme)


def test_effective_mode_needs_config():
    opts = WorkerOptions.from_env({MANA_ENV: "nohost,privatepool"})
    assert not effective_keepalive(opts, host_mana=True, host_nvme=True, pool_present=True).mana
