"""A namespace as the driver sees it (spec nvme.md §7-8): geometry from the raw IDENTIFY CNS 0 data.

The identify bytes are kept verbatim: they are what the saved state carries, so a restored namespace
needs no IDENTIFY. `read`/`write` are synchronous helpers over `NvmeDriver.submit_io` (split at the
controller's maximum transfer); a caller with many requests in flight uses `submit_io` directly.
"""
from __future__ import annotations

import threading

from vfkeep.nvme import NVM_READ, NVM_WRITE, IdentifyController, IdentifyNamespace

from .errors import CommandFailed, CommandTimeout, InvalidSavedState


class Namespace:
    def __init__(self, driver, nsid: int, identify: bytes):
        self.driver = driver
        self.nsid = nsid
        self.update(identify)

    def update(self, identify: bytes) -> None:
        """New identify data (a rescan after an AEN): NSZE 0 marks the namespace removed."""
        ns = IdentifyNamespace.from_bytes(identify)
        if ns.flbas & 0xF > ns.nlbaf:
            raise InvalidSavedState(f"namespace {self.nsid}: FLBAS index {ns.flbas & 0xF} > NLBAF {ns.nlbaf}")
        lbads = ns.lba_format().lbads
        if ns.nsze and not 9 <= lbads <= 16:
            raise InvalidSavedState(f"namespace {self.nsid}: LBA data size 2^{lbads} is not 512 B..64 KiB")
        self.identify = bytes(identify)
        self.blocks = ns.nsze
        self.removed = ns.nsze == 0
        self.block_shift = lbads
        self.block_size = 1 << lbads if lbads else 0
        mdts = IdentifyController.from_bytes(self.driver.identify_ctrl).mdts or 255
        self.max_blocks = 1 << min(mdts + 12 - lbads, 16) if lbads else 0

    def _io(self, opcode: int, lba: int, nblocks: int, gpa: int, timeout: float, cpu: int | None) -> None:
        done = threading.Semaphore(0)
        errors: list[int] = []

        def complete(status: int, dw0: int) -> None:
            if status:
                errors.append(status)
            done.release()

        chunks = 0
        while nblocks > 0:
            n = min(nblocks, self.max_blocks)
            self.driver.submit_io(opcode, self.nsid, lba, n, gpa, n << self.block_shift, complete, cpu=cpu,
                                  timeout=timeout)
            lba, gpa, nblocks, chunks = lba + n, gpa + (n << self.block_shift), nblocks - n, chunks + 1
        for _ in range(chunks):
            if not done.acquire(timeout=timeout):
                raise CommandTimeout(f"namespace {self.nsid}: IO did not complete within {timeout} s")
        if errors:
            raise CommandFailed(opcode, errors[0], admin=False)

    def read(self, lba: int, nblocks: int, gpa: int, timeout: float = 30.0, cpu: int | None = None) -> None:
        self._io(NVM_READ, lba, nblocks, gpa, timeout, cpu)

    def write(self, lba: int, nblocks: int, gpa: int, timeout: float = 30.0, cpu: int | None = None) -> None:
        self._io(NVM_WRITE, lba, nblocks, gpa, timeout, cpu)

    def inspect(self) -> dict:
        return {"nsid": self.nsid, "blocks": self.blocks, "block_size": self.block_size, "removed": self.removed}
