"""Each check the MANA driver makes of its device, driven by the emulator's hostile-device mode
(`vfkeep/device/hostile.py`): the driver ends with its typed error, nothing leaked (its DMA pages back, the
handle closed), and once the device behaves the VF manager's fresh init brings the NIC up again
(issue 15 item 4)."""
from __future__ import annotations

import pytest

from driver_helpers import InProcessBench, loopback, numbered_frames
from vfkeep.device.control import COMMANDS
from vfkeep.device.hostile import MODES
from vfkeep.driver import gdma_driver
from vfkeep.driver.errors import BadRegisterMap, BringUpError, DeviceMissing, HwcFailure, SmcError
from vfkeep.driver.mana import ManaDevice
from vfkeep.memory import DmaManager, MemoryLayout
from vfkeep.paravisor.vf_manager import fresh_mana_device

LAYOUT = MemoryLayout(guest_pages=16, worker_pages=512, pool_pages=0)

CHECKS = [  # mode, typed error, words of its message
    ("regmap_smc_size", BadRegisterMap, "vf_gdma_sriov_shared_sz is 16"),
    ("regmap_smc_outside_bar0", BadRegisterMap, "does not fit BAR0"),
    ("regmap_db_page_size", BadRegisterMap, "3000"),
    ("regmap_all_ones", DeviceMissing, "reads all ones"),
    ("smc_silent", SmcError, "ESTABLISH_HWC: no SMC reply within"),
    ("smc_pf_owned", SmcError, "ESTABLISH_HWC: no SMC reply within"),
    ("hwc_doorbell_out_of_range", BringUpError, "HWC doorbell: doorbell page id 1000"),
    ("init_event_missing", BringUpError, "did not provide gpa_mkey"),
    ("register_doorbell_out_of_range", BringUpError, "REGISTER_DEVICE gave doorbell page 1000"),
    ("protocol_version", BringUpError, "device speaks gdma protocol"),
    ("short_response", HwcFailure, "is shorter than the"),
]


def test_every_mode_has_its_check():
    assert sorted(m for m, _, _ in CHECKS) == sorted(MODES)


@pytest.mark.parametrize("mode,error,match", CHECKS, ids=[c[0] for c in CHECKS])
def test_driver_check_fires_and_ends_clean(mem, monkeypatch, mode, error, match):
    monkeypatch.setattr(gdma_driver, "HWC_POLL_TIMEOUT_IN_MS", 100)  # the SMC timeout, 10 s by the spec
    bench = InProcessBench(mem)
    dma = DmaManager(mem)
    try:
        assert COMMANDS["hostile"](bench.device, mode=mode) == {"hostile": [mode]}
        with pytest.raises(error, match=match):
            ManaDevice.new(bench.connect(dma, "nic0"), "nic0")
        assert dma.inspect()["worker_ram"]["allocated_pages"] == 0
        assert not bench.device.connected
        COMMANDS["hostile"](bench.device, mode=mode, on=False)
        dev, _ = fresh_mana_device(lambda: bench.connect(dma, "nic0"), bench.set_reset_method, "nic0")
        vport = dev.open_vport(0)
        assert len(loopback(vport, numbered_frames(8))) == 8
        dev.shutdown()
        assert dma.inspect()["worker_ram"]["allocated_pages"] == 0
    finally:
        bench.device.close()


def test_unknown_mode_is_refused(mem):
    bench = InProcessBench(mem)
    with pytest.raises(ValueError, match="unknown hostile mode 'nope'; known: regmap_smc_size"):
        COMMANDS["hostile"](bench.device, mode="nope")
    bench.device.close()
