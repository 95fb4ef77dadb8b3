"""Per-NIC VF manager: DMA clients, MANA device + vport, the restore decision table (spec §6.1, DESIGN D2)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class NicConfig:
    """What the host tells a worker about NIC `index`: its PCI id, vfio-user socket and ring eventfds."""

    index: int
    pci_id: str
    socket: str
    tx_bell_fd: int
    rx_bell_fd: int

    @classmethod
    def parse(cls, index: int, text: str) -> "NicConfig":
        parts = text.split(",")
        if len(parts) != 4 or not parts[0] or not parts[1]:
            raise ValueError(f"bad --nic {text!r}: expected PCI_ID,SOCKET,TX_EVENTFD,RX_EVENTFD")
        try:
            return cls(index, parts[0], parts[1], int(parts[2]), int(parts[3]))
        except ValueError:
            raise ValueError(f"bad --nic {text!r}: eventfds must be integers") from None

    def to_arg(self) -> str:
        return f"{self.pci_id},{self.socket},{self.tx_bell_fd},{self.rx_bell_fd}"


class VfManager:
    """Placeholder until the driver lands."""
