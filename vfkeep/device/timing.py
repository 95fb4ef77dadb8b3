"""The device timing model (DESIGN D9): every modelled cost is a declared parameter, reported with every result.

`DeviceTiming` holds the parameters; the presets are conveniences, not claims:

- `flr_ms`: the wait after an FLR before the function is usable again. Public anchor: PCIe (and Linux,
  `pcie_flr`) wait 100 ms after initiating an FLR; a 2025 MANA patch proposed 10 ms for VF removal.
- `hwc_latency_ms`: the time the NIC's firmware takes to answer one HWC request (a management round trip).
  No public source gives a MANA per-request latency; OpenHCL's HWC request *timeout* (10 s) is only an
  upper bound. Benchmarks sweep it instead of asserting a value.

Nothing else is modelled: SMC messages, doorbells and the data path run at emulator speed.
`vfkeep device`, `vfkeep run` and `vfkeep demo` take the same options (`timing_options`): a preset
(`--timing`) whose values `--hwc-latency-ms` / `--flr-ms` override.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import click

from ..cli import FloatRange

#: Longest modelled HWC latency accepted: the HWC request timeout (a slower device would time out every request).
MAX_HWC_LATENCY_MS = 10_000.0
MAX_FLR_MS = 60_000.0


@dataclass(frozen=True)
class DeviceTiming:
    hwc_latency_ms: float = 0.0
    flr_ms: float = 0.0

    def __post_init__(self):
        for name, value, limit in (("hwc_latency_ms", self.hwc_latency_ms, MAX_HWC_LATENCY_MS),
                                   ("flr_ms", self.flr_ms, MAX_FLR_MS)):
            if not 0 <= value <= limit:
                raise ValueError(f"{name} must be in [0, {limit:g}], got {value!r}")

    @property
    def preset(self) -> str:
        """The preset these values equal, else "custom"."""
        return next((name for name, t in PRESETS.items() if t == self), "custom")

    def to_dict(self) -> dict:
        """The `timing` object every report carries."""
        return {"preset": self.preset, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "DeviceTiming":
        return cls(hwc_latency_ms=float(d["hwc_latency_ms"]), flr_ms=float(d["flr_ms"]))

    def to_args(self) -> list[str]:
        """`vfkeep device` options that give a device these parameters."""
        return ["--hwc-latency-ms", f"{self.hwc_latency_ms:g}", "--flr-ms", f"{self.flr_ms:g}"]

    def describe(self) -> str:
        """One line for humans, e.g. "realistic timing (HWC 1 ms/request, FLR 100 ms)"."""
        return f"{self.preset} timing (HWC {self.hwc_latency_ms:g} ms/request, FLR {self.flr_ms:g} ms)"


PRESETS = {
    "natural": DeviceTiming(hwc_latency_ms=0.0, flr_ms=0.0),
    "realistic": DeviceTiming(hwc_latency_ms=1.0, flr_ms=100.0),
}


def timing_from(preset: str = "natural", hwc_latency_ms: float | None = None,
                flr_ms: float | None = None) -> DeviceTiming:
    """A preset with some of its values overridden."""
    base = PRESETS[preset]
    return DeviceTiming(hwc_latency_ms=base.hwc_latency_ms if hwc_latency_ms is None else float(hwc_latency_ms),
                        flr_ms=base.flr_ms if flr_ms is None else float(flr_ms))


def timing_options(default_preset: str):
    """Click options `--timing PRESET`, `--hwc-latency-ms MS`, `--flr-ms MS` (arguments `timing`,
    `hwc_latency_ms`, `flr_ms`; `timing_from(...)` turns them into a `DeviceTiming`)."""
    def decorate(fn):
        fn = click.option("--flr-ms", type=FloatRange(0, MAX_FLR_MS), default=None,
                          help="modelled wait after an FLR [default: the preset's]")(fn)
        fn = click.option("--hwc-latency-ms", type=FloatRange(0, MAX_HWC_LATENCY_MS), default=None,
                          help="modelled latency of each HWC request [default: the preset's]")(fn)
        return click.option("--timing", type=click.Choice(sorted(PRESETS)), default=default_preset,
                            show_default=True, help="device timing preset: natural = nothing modelled; "
                            "realistic = HWC 1 ms per request, FLR 100 ms")(fn)
    return decorate


__all__ = ["DeviceTiming", "PRESETS", "timing_from", "timing_options", "MAX_HWC_LATENCY_MS", "MAX_FLR_MS"]
