"""Hostile-device mode: named misbehaviours a real function could show, one per check the driver makes of
its device (gdma.md §3.4 register map, §5 SMC, §6.4 bring-up events, §8 HWC responses, §9.1 version), so a
test can watch each check fire and the driver end with its typed error and nothing leaked (issue 15).

| mode | what the device does | the driver's check |
|---|---|---|
| `regmap_smc_size` | RegMap `vf_gdma_sriov_shared_sz` 16 | `BadRegisterMap` |
| `regmap_smc_outside_bar0` | SMC window start past the end of BAR0 | `BadRegisterMap` |
| `regmap_db_page_size` | `vf_db_page_sz` 3000 (not a power of two) | `BadRegisterMap` |
| `regmap_all_ones` | BAR0 reads all ones while the function is there | `DeviceMissing` |
| `smc_silent` | takes SMC messages and never answers | `SmcError` (timeout) |
| `smc_pf_owned` | answers with `owner_is_pf` set, forever | `SmcError` (timeout) |
| `hwc_doorbell_out_of_range` | INIT_EQ_ID_DB names doorbell page 1000 | `BringUpError` |
| `init_event_missing` | no INIT_DATA for GPA_MKEY before INIT_DONE | `BringUpError` |
| `register_doorbell_out_of_range` | REGISTER_DEVICE gives doorbell page 1000 | `BringUpError` |
| `protocol_version` | VERIFY_VF_DRIVER_VERSION answers a protocol the driver did not offer | `BringUpError` |
| `short_response` | HWC responses declare (and carry) half their body | `HwcFailure` |
| `bringup_stray_event` | a test event among the bring-up events | `BringUpError` |
| `init_done_missing` | no INIT_DONE after the bring-up events | `BringUpError` (timeout) |
| `no_mana_device` | LIST_DEVICES names only the HWC | `BringUpError` |
| `rx_len_overstated` | RX completions claim 4096 bytes more than the frame | the frame is an RX error, never handed up |

Modes are set on the core (`GdmaDevice.hostile`, control command `hostile`), survive an FLR like fault
rules do, and are off by default: the emulator is faithful unless a test asks otherwise.
"""
from __future__ import annotations

from vfkeep.gdma.constants import EMU_BAR0_SIZE
from vfkeep.gdma.regs import RegMap

MODES = ("regmap_smc_size", "regmap_smc_outside_bar0", "regmap_db_page_size", "regmap_all_ones", "smc_silent",
         "smc_pf_owned", "hwc_doorbell_out_of_range", "init_event_missing", "register_doorbell_out_of_range",
         "protocol_version", "short_response", "bringup_stray_event", "init_done_missing", "no_mana_device",
         "rx_len_overstated")
BAD_DOORBELL_PAGE = 1000


class Hostile:
    """The set of active modes."""

    def __init__(self) -> None:
        self.modes: set[str] = set()

    def set(self, mode: str, on: bool = True) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown hostile mode {mode!r}; known: {', '.join(MODES)}")
        (self.modes.add if on else self.modes.discard)(mode)

    def __contains__(self, mode: str) -> bool:
        return mode in self.modes

    def regmap(self, regmap: bytes) -> bytes:
        """The register map as this device shows it."""
        if not self.modes & {"regmap_smc_size", "regmap_smc_outside_bar0", "regmap_db_page_size",
                             "regmap_all_ones"}:
            return regmap
        if "regmap_all_ones" in self.modes:
            return b"\xff" * len(regmap)
        regs = RegMap.from_bytes(regmap)
        if "regmap_smc_size" in self.modes:
            regs.vf_gdma_sriov_shared_sz = 16
        if "regmap_smc_outside_bar0" in self.modes:
            regs.vf_gdma_sriov_shared_reg_start = EMU_BAR0_SIZE
        if "regmap_db_page_size" in self.modes:
            regs.vf_db_page_sz = 3000
        return regs.to_bytes()

    def inspect(self) -> list[str]:
        return sorted(self.modes)


__all__ = ["Hostile", "MODES", "BAD_DOORBELL_PAGE"]
