"""Each check the MANA driver makes of its device, driven by the emulator's hostile-device mode
(`vfkeep/device/hostile.py`): the driver ends with its typed error, nothing leaked (its DMA pages back, the
handle closed), and once the device behaves the VF manager's fresh init brings the NIC up again
(issue 15 item 4)."""
from __future__ import annotations

import time

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
    ("bringup_stray_event", BringUpError, "unexpected event type 64 during HWC bring-up"),
    ("init_done_missing", BringUpError, "HWC init events incomplete after 200 ms"),
    ("no_mana_device", BringUpError, "LIST_DEVICES reports no MANA device"),
]


def test_every_mode_has_its_check():
    assert sorted([m for m, _, _ in CHECKS] + ["rx_len_overstated"]) == sorted(MODES)


@pytest.mark.parametrize("mode,error,match", CHECKS, ids=[c[0] for c in CHECKS])
def test_driver_check_fires_and_ends_clean(mem, monkeypatch, mode, error, match):
    monkeypatch.setattr(gdma_driver, "HWC_POLL_TIMEOUT_IN_MS", 100)  # the SMC timeout, 10 s by the spec
    monkeypatch.setattr(gdma_driver, "HWC_TIMEOUT_DEFAULT_IN_MS", 200)  # bring-up events and requests, 10 s
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


def test_rx_completion_longer_than_its_buffer_is_an_error(mem):
    """A receive completion whose length exceeds the posted buffer: the driver counts an RX error and hands
    nothing up (reading past the buffer would give the guest another frame's bytes)."""
    bench = InProcessBench(mem)
    dev = ManaDevice.new(bench.connect(DmaManager(mem), "nic0"), "nic0")
    data = dev.open_vport(0).data
    COMMANDS["hostile"](bench.device, mode="rx_len_overstated")
    assert data.send(numbered_frames(20)) == 20
    deadline = time.monotonic() + 5
    while data.stats.rx_errors < 20 and time.monotonic() < deadline:
        assert data.receive(64, timeout=0.05) == []
    assert (data.stats.rx_errors, data.stats.rx_frames) == (20, 0)
    COMMANDS["hostile"](bench.device, mode="rx_len_overstated", on=False)
    assert len(loopback(dev.vports[0], numbered_frames(20))) == 20
    dev.shutdown()
    bench.device.close()


def test_unknown_mode_is_refused(mem):
    bench = InProcessBench(mem)
    with pytest.raises(ValueError, match="unknown hostile mode 'nope'; known: regmap_smc_size"):
        COMMANDS["hostile"](bench.device, mode="nope")
    bench.device.close()
