"""MAC addresses of the emulated vports (no other imports: the host derives each NIC's MAC from these too).

A device's vport i has its base MAC + i (48-bit sum); `vfkeep run` gives NIC n the base
`DEFAULT_MAC` + `MAX_VPORTS` × n (`host/devices.py: nic_mac`), so no two vports of a host share one.
"""
from __future__ import annotations

DEFAULT_MAC = bytes.fromhex("00155d121212")
#: Vports one device may have (`--vports`); a NIC's vport MACs are its base MAC + 0..MAX_VPORTS-1.
MAX_VPORTS = 16


def vport_mac(base: bytes, index: int) -> bytes:
    """MAC of vport `index`: the base MAC plus `index` (as a 48-bit number)."""
    return ((int.from_bytes(base, "big") + index) % (1 << 48)).to_bytes(6, "big")


__all__ = ["DEFAULT_MAC", "MAX_VPORTS", "vport_mac"]
