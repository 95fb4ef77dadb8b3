"""Test helpers shared by the device and driver tests: the emulator cores in-process behind the drivers' backing
interface (`InProcessBacking`, `InProcessBench` for MANA, `NvmeBacking` for NVMe), a held device loop
(`HeldLoop`) and loopback traffic helpers."""
from __future__ import annotations

import os
import threading

from vfkeep.device.core import GdmaDevice
from vfkeep.device.dma import MappedMemory
from vfkeep.driver.backing import DmaClients
from vfkeep.memory import DmaManager, GuestMemory
from vfkeep.nvme import BAR0_LEN
from vfkeep.nvme_device.core import NvmeController
from vfkeep.paravisor.vf_manager import nic_dma_clients


class EventfdIrqs:
    """`irq` of the emulator core: raise a vector by writing its eventfd; latch while it has none."""

    def __init__(self):
        self.fds: dict[int, int] = {}
        self.latched: set[int] = set()
        self.count = 0  # interrupts raised

    def trigger(self, vector: int) -> None:
        self.count += 1
        fd = self.fds.get(vector)
        if fd is None:
            self.latched.add(vector)
        else:
            os.eventfd_write(fd, 1)

    def attach(self, vector: int) -> int:
        """A new eventfd for `vector` (the old one closed); an interrupt latched meanwhile is delivered on it."""
        fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        old = self.fds.pop(vector, None)
        if old is not None:
            os.close(old)
        self.fds[vector] = fd
        if vector in self.latched:
            self.latched.discard(vector)
            os.eventfd_write(fd, 1)
        return fd

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


class InProcessBacking:
    """BAR0 and MSI-X of an in-process `GdmaDevice` with `VfioDevice`'s method names, and the DMA clients (the
    driver's `DeviceBacking`); construction is a client connect (epoch `epoch`), `close()` a disconnect."""

    def __init__(self, device: GdmaDevice, irqs: EventfdIrqs, epoch: int, dma: DmaClients | None = None):
        self.device, self.irqs, self.dma = device, irqs, dma
        self.bar0_len = device.bar0.size
        self.msix_count = 64
        device.client_connected(epoch)

    def read(self, offset, size):
        return self.device.bar0.read(offset, size)

    def read32(self, offset):
        return int.from_bytes(self.device.bar0.read(offset, 4), "little")

    def read64(self, offset):
        return int.from_bytes(self.device.bar0.read(offset, 8), "little")

    def write32(self, offset, value, posted=False):
        self.device.bar0.write(offset, value.to_bytes(4, "little"))

    def write64(self, offset, value, posted=False):
        self.device.bar0.write(offset, value.to_bytes(8, "little"))

    def write64_posted_many(self, writes):
        for offset, value in writes:
            self.write64(offset, value, posted=True)

    def set_irq(self, vector):
        return self.irqs.attach(vector)

    def set_irqs(self, vectors):
        return [self.irqs.attach(v) for v in vectors]

    def clear_irqs(self):
        self.irqs.close()

    def close(self):
        self.clear_irqs()
        self.device.client_disconnected()
        if self.dma is not None:
            self.dma.close()


class HeldLoop:
    """The device's loop, for a modelled latency: a delayed answer waits in `timers` as (delay, callback) until
    the test runs it."""

    def __init__(self):
        self.timers = []

    def call_later(self, delay, callback):
        self.timers.append((delay, callback))


class InProcessBench:
    """One emulator core over a guest memory; `connect()` gives a new backing (a new connection epoch)."""

    def __init__(self, mem: GuestMemory, **device_kwargs):
        self.mem = mem
        self.irqs = EventfdIrqs()
        self.device = GdmaDevice(MappedMemory(mem), self.irqs, None, **device_kwargs)
        self.epoch = 0

    def connect(self, dma: DmaManager, pci_id: str = "nic0", fresh: bool = True,
                persistent: bool | None = None) -> InProcessBacking:
        """Like `open_vfio`: `VfioDevice.new` (fresh: an flr device is reset on open) or `.restore` (never
        resets), with the NIC's DMA clients as the VF manager makes them (persistent: default when the
        memory has a pool)."""
        persistent = dma.has_pool if persistent is None else persistent
        self.epoch += 1
        backing = InProcessBacking(self.device, self.irqs, self.epoch, nic_dma_clients(dma, pci_id, persistent))
        if fresh and self.device.reset_method == "flr":
            self.device.flr("open")
        return backing

    def set_reset_method(self, method: str) -> None:
        self.device.reset_method = method

    def log_since(self, seq: int) -> list[str]:
        return [e["name"] for e in self.device.command_log.since(seq) if e["kind"] != "event"]


def numbered_frames(n: int, size: int = 64) -> list[bytes]:
    """Distinct frames: a 4-byte counter repeated (the loopback swaps the MACs, bytes 0-11)."""
    return [i.to_bytes(4, "little") * (size // 4) for i in range(n)]


def loopback(vport, frames: list[bytes], batch: int = 64, timeout: float = 2.0) -> list[bytes]:
    """Send `frames` through a loopback device and collect them; never more in flight than the vport has
    receive buffers, so a correct driver loses nothing."""
    window = vport.data._rx_nbuf
    got: list[bytes] = []
    sent = 0
    while len(got) < len(frames):
        room = min(batch, window - (sent - len(got)), len(frames) - sent)
        if room > 0:
            sent += vport.data.send(frames[sent:sent + room])
        received = vport.data.receive(256, timeout=timeout if sent - len(got) > 0 else 0)
        if not received and sent == len(frames):
            break
        got += received
    return got


def same_payloads(got: list[bytes], sent: list[bytes]) -> bool:
    return [g[12:] for g in got] == [s[12:] for s in sent]


class NvmeBacking:
    """The NVMe controller core behind the driver's backing interface (the emulator answers each doorbell
    before the write returns)."""

    msix_count = 16

    def __init__(self, ctrl: NvmeController, irqs: EventfdIrqs):
        self.bar0_len = BAR0_LEN
        self.ctrl, self.irqs = ctrl, irqs
        self.lock = threading.Lock()
        ctrl.client_connected(ctrl.epoch + 1)

    def read32(self, off):
        with self.lock:
            return int.from_bytes(self.ctrl.read(off, 4), "little")

    def read64(self, off):
        with self.lock:
            return int.from_bytes(self.ctrl.read(off, 8), "little")

    def write32(self, off, value, posted=False):
        with self.lock:
            self.ctrl.write(off, value.to_bytes(4, "little"))

    def write64(self, off, value, posted=False):
        with self.lock:
            self.ctrl.write(off, value.to_bytes(8, "little"))

    def write64_posted_many(self, writes):
        for off, value in writes:
            self.write64(off, value, posted=True)

    def set_irq(self, vector):
        return self.irqs.attach(vector)

    def clear_irqs(self):
        pass

    def close(self):
        self.irqs.close()
        self.ctrl.client_disconnected()
