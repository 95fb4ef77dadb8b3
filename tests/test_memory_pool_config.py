"""Private pool size from OPENHCL_* pool variables (servicing spec §1.2)."""
import logging

import pytest

from vfkeep.memory import HEURISTIC_POOL_PAGES, pool_pages_from_env, strict_pool_from_env

OVR, CFG = "OPENHCL_ENABLE_VTL2_GPA_POOL", "OPENHCL_IGVM_VTL2_GPA_POOL_CONFIG"


@pytest.mark.parametrize("env,pages", [
    ({}, HEURISTIC_POOL_PAGES),
    ({CFG: "release"}, HEURISTIC_POOL_PAGES),
    ({CFG: "debug"}, HEURISTIC_POOL_PAGES),
    ({CFG: "512"}, 512),
    ({CFG: "1024"}, 1024),
    ({CFG: "off"}, 0),
    ({CFG: "0"}, 0),
    ({OVR: "64", CFG: "release"}, 64),  # the override wins
    ({OVR: "off", CFG: "512"}, 0),
    ({OVR: "Debug", CFG: "off"}, HEURISTIC_POOL_PAGES),
    ({OVR: " 16 "}, 16),
])
def test_pool_pages(env, pages):
    assert pool_pages_from_env(env) == pages


@pytest.mark.parametrize("value", ["lots", "-5", "0x200", "1.5", "", "5_0"])
def test_unparsable_means_no_pool_with_a_warning(value, caplog):
    with caplog.at_level(logging.WARNING, logger="vfkeep.memory.pool_config"):
        assert pool_pages_from_env({OVR: value, CFG: "512"}) == 0
    assert caplog.records[0].kv == {"variable": OVR, "value": value}


def test_heuristic_default_is_512():
    assert HEURISTIC_POOL_PAGES == 512


@pytest.mark.parametrize("value,strict", [(None, False), ("1", True), ("0", False), ("yes", False)])
def test_strict_pool_env(value, strict):
    assert strict_pool_from_env({} if value is None else {"VFKEEP_STRICT_POOL": value}) is strict
