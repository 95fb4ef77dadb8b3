"""A tiny register/interrupt/DMA device for exercising the vfio-user layer on its own.

BAR0 (4 KiB, 32-bit little-endian registers; DMA_ADDR is 64-bit):

    0x00 ID          RO  0x7E57DE71
    0x04 SCRATCH     RW  kept across a disconnect unless reset_method is flr
    0x08 DOORBELL    WO  writing N raises MSI-X vector N
    0x0C COUNTER     RO  BAR0 write accesses since reset (checks posted-write ordering)
    0x10 DMA_ADDR    RW  IOVA for DMA_CMD (64-bit)
    0x18 DMA_LEN     RW
    0x1C DMA_CMD     WO  1 = CRC32 of [ADDR, ADDR+LEN) into DMA_RESULT; 2 = fill it with SCRATCH
    0x20 DMA_RESULT  RO
    0x24 DMA_STATUS  RO  0 = ok, 1 = DMA fault
    0x28 IRQ_COUNT   RO  doorbells since reset

Config space carries vendor 0x1414 / device 0x7E57; 4 MSI-X vectors. Run it with
`python -m vfkeep.vfio_user.testdev --socket PATH [--reset-method none|flr]`.
"""
from __future__ import annotations

import errno
import logging
import os
import signal
import struct
import subprocess
import sys
import time
import zlib

import click

from vfkeep import log as vlog
from vfkeep import pci
from vfkeep.log import kv
from vfkeep.proc import spawn

from .control import wait_until_answering
from .device import RESET_METHODS, RESET_NONE, VfioUserDevice, check_reset_method
from .dma import DmaFault
from .protocol import (DEFAULT_MAX_DMA_MAPS, IRQ_MSIX, REGION_BAR0, REGION_CONFIG, REGION_INFO_READ,
                       REGION_INFO_WRITE, CommandError)
from .server import VfioUserServer

log = logging.getLogger("vfkeep.vfio_user.testdev")

VENDOR_ID = 0x1414
DEVICE_ID = 0x7E57
BAR0_SIZE = 4096
MSIX_VECTORS = 4
ID_VALUE = 0x7E57DE71

REG_ID = 0x00
REG_SCRATCH = 0x04
REG_DOORBELL = 0x08
REG_COUNTER = 0x0C
REG_DMA_ADDR = 0x10
REG_DMA_LEN = 0x18
REG_DMA_CMD = 0x1C
REG_DMA_RESULT = 0x20
REG_DMA_STATUS = 0x24
REG_IRQ_COUNT = 0x28
_REG_END = 0x2C

DMA_CMD_CRC32 = 1
DMA_CMD_FILL = 2
_WRITABLE = {REG_SCRATCH, REG_DMA_ADDR, REG_DMA_ADDR + 4, REG_DMA_LEN}


class TestDevice(VfioUserDevice):
    __test__ = False  # not a pytest class

    def __init__(self, reset_method: str = RESET_NONE, flr_s: float = 0.0):
        super().__init__()
        self.reset_method = reset_method
        self.flr_s = flr_s
        self.config = pci.ConfigSpace(VENDOR_ID, DEVICE_ID, class_code=0xFF0000)  # nothing writable
        self.regs = bytearray(_REG_END)
        self.reset_regs()

    def reset_regs(self) -> None:
        self.regs[:] = bytes(_REG_END)
        struct.pack_into("<I", self.regs, REG_ID, ID_VALUE)

    def reg(self, offset: int) -> int:
        return struct.unpack_from("<I", self.regs, offset)[0]

    def _set(self, offset: int, value: int) -> None:
        struct.pack_into("<I", self.regs, offset, value & 0xFFFFFFFF)

    # -- VfioUserDevice -------------------------------------------------------------------------
    @property
    def reset_method(self) -> str:
        return self._reset_method

    @reset_method.setter
    def reset_method(self, value: str) -> None:
        self._reset_method = check_reset_method(value)

    def regions(self) -> dict[int, tuple[int, int]]:
        rw = REGION_INFO_READ | REGION_INFO_WRITE
        return {REGION_BAR0: (BAR0_SIZE, rw), REGION_CONFIG: (pci.CONFIG_SIZE, rw)}

    def irq_count(self, index: int) -> int:
        return MSIX_VECTORS if index == IRQ_MSIX else 0

    def region_read(self, index: int, offset: int, count: int) -> bytes:
        if index == REGION_CONFIG:
            return self.config.read(offset, count)
        self._check_reg_access(offset, count)
        return bytes(self.regs[offset:offset + count])

    def region_write(self, index: int, offset: int, data: bytes) -> None:
        if index == REGION_CONFIG:
            return self.config.write(offset, data)
        self._check_reg_access(offset, len(data))
        self._set(REG_COUNTER, self.reg(REG_COUNTER) + 1)
        for off in range(offset, offset + len(data), 4):
            self._write_reg(off, struct.unpack_from("<I", data, off - offset)[0])

    def reset(self) -> None:
        if self.flr_s:
            time.sleep(self.flr_s)  # the modelled FLR: the function is unavailable meanwhile
        self.reset_regs()

    def attached(self, server: VfioUserServer) -> None:
        super().attached(server)
        server.control.register("raise_irq", self._raise_irq)
        server.control.register("state", self.inspect)

    # -- behaviour ------------------------------------------------------------------------------
    def _check_reg_access(self, offset: int, count: int) -> None:
        if count not in (4, 8) or offset % count or offset + count > _REG_END:
            raise CommandError(errno.EINVAL, f"BAR0 access of {count} bytes at {offset:#x}: registers are "
                                             f"aligned 32/64-bit in [0, {_REG_END:#x})")

    def _write_reg(self, offset: int, value: int) -> None:
        if offset in _WRITABLE:
            self._set(offset, value)
        elif offset == REG_DOORBELL:
            try:
                self._raise_irq(value)
            except ValueError as e:
                raise CommandError(errno.EINVAL, str(e)) from None
        elif offset == REG_DMA_CMD:
            self._dma(value)

    def _raise_irq(self, vector: int) -> dict:
        """Doorbell and control command `raise_irq {"vector": N}`; latched while unassigned."""
        delivered = self.server.irqs.trigger(vector)
        self._set(REG_IRQ_COUNT, self.reg(REG_IRQ_COUNT) + 1)
        kv(log, logging.INFO, "interrupt raised", vector=vector, delivered=delivered)
        return {"vector": vector, "delivered": delivered}

    def _dma(self, cmd: int) -> None:
        if cmd not in (DMA_CMD_CRC32, DMA_CMD_FILL):
            raise CommandError(errno.EINVAL, f"unknown DMA command {cmd}")
        addr = struct.unpack_from("<Q", self.regs, REG_DMA_ADDR)[0]
        length = self.reg(REG_DMA_LEN)
        try:
            with self.server.dma.view(addr, length) as data:  # bounds the length by the mapping first
                if cmd == DMA_CMD_CRC32:
                    self._set(REG_DMA_RESULT, zlib.crc32(data))
                else:
                    pattern = bytes(self.regs[REG_SCRATCH:REG_SCRATCH + 4]) * (length // 4 + 1)
                    self.server.dma.write(addr, pattern[:length])
        except DmaFault as e:
            kv(log, logging.WARNING, "dma fault", cmd=cmd, error=e)
            self._set(REG_DMA_STATUS, 1)
            return
        self._set(REG_DMA_STATUS, 0)

    def inspect(self) -> dict:
        """Registers and server-side view, for tests and the smoke scenario."""
        s = self.server
        return {"scratch": self.reg(REG_SCRATCH), "counter": self.reg(REG_COUNTER),
                "irq_count": self.reg(REG_IRQ_COUNT), "pending": s.irqs.pending(), "irqs_delivered": s.irqs.delivered,
                "irqs_latched": s.irqs.latched, "resets": s.resets,
                "dma_maps": len(s.dma), "retired_dma_maps": s.dma.retired, "files_mapped": s.dma.files_mapped,
                "epoch": s.epoch, "connected": s.connected,
                "reset_method": self.reset_method}


def start_testdev(socket_path: str | os.PathLike, *, reset_method: str = RESET_NONE,
                  run_dir: str | os.PathLike | None = None, max_dma_maps: int | None = None,
                  flr_ms: float = 0.0, timeout: float = 10.0) -> subprocess.Popen:
    """Start the test device in its own process and return once its control channel answers."""
    argv = [sys.executable, "-m", "vfkeep.vfio_user.testdev", "--socket", os.fspath(socket_path),
            "--reset-method", reset_method, "--flr-ms", str(flr_ms)]
    if run_dir is not None:
        argv += ["--run-dir", os.fspath(run_dir)]
    if max_dma_maps is not None:
        argv += ["--max-dma-maps", str(max_dma_maps)]
    proc = spawn(argv)
    wait_until_answering(proc, f"{socket_path}.ctl", timeout, "test device")
    return proc


@click.command()
@click.option("--socket", "socket_path", required=True, type=click.Path(), help="vfio-user socket to create")
@click.option("--reset-method", type=click.Choice(RESET_METHODS), default=RESET_NONE, show_default=True)
@click.option("--run-dir", type=click.Path(file_okay=False), default=None, help="log to DIR/testdev.log")
@click.option("--max-dma-maps", type=int, default=DEFAULT_MAX_DMA_MAPS, show_default=True)
@click.option("--flr-ms", type=float, default=0.0, show_default=True, help="modelled FLR time")
def main(socket_path: str, reset_method: str, run_dir: str | None, max_dma_maps: int, flr_ms: float) -> None:
    """Serve the test device until SIGTERM."""
    vlog.setup("testdev", run_dir)
    server = VfioUserServer(socket_path, TestDevice(reset_method, flr_ms / 1000), max_dma_maps=max_dma_maps)
    signal.signal(signal.SIGTERM, lambda *_: server.stop())
    try:
        server.run()
    finally:
        server.close()


if __name__ == "__main__":
    main()
