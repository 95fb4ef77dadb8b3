"""NVM command set of the emulator (spec nvme.md §7, §16): READ, WRITE (FUA), FLUSH, DSM deallocate.

`execute(ctrl, cmd)` runs one IO command against its namespace and returns
the 11-bit status. Data moves directly between the disk file and the
driver's pages named by the PRPs. Reservations are not supported (ONCS bit 5
is clear), so their opcodes answer INVALID COMMAND OPCODE like any other.
"""
from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from vfkeep.nvme import (MAX_TRANSFER, NVM_DSM, NVM_FLUSH, NVM_READ, NVM_WRITE, SC_DATA_TRANSFER_ERROR,
                         SC_INVALID_COMMAND_OPCODE, SC_INVALID_FIELD, SC_INVALID_NAMESPACE_OR_FORMAT,
                         SC_LBA_OUT_OF_RANGE, SC_SUCCESS, Command)

from .errors import DmaError
from .prp import PrpError, prp_segments

if TYPE_CHECKING:
    from .core import NvmeController

DSM_RANGE_SIZE = 16
DSM_ATTR_DEALLOCATE = 1 << 2


def execute(ctrl: NvmeController, cmd: Command) -> int:
    opcode = cmd.opcode
    ns = ctrl.namespaces.get(cmd.nsid)
    if ns is None:
        return SC_INVALID_NAMESPACE_OR_FORMAT
    counters = ctrl.counters
    if opcode == NVM_READ or opcode == NVM_WRITE:
        slba = cmd.cdw10 | (cmd.cdw11 << 32)
        nlb = (cmd.cdw12 & 0xFFFF) + 1
        nbytes = nlb << ns.block_shift
        if nbytes > MAX_TRANSFER:
            return SC_INVALID_FIELD
        if slba + nlb > ns.blocks:
            return SC_LBA_OUT_OF_RANGE
        try:
            views = [ctrl.dma.view(iova, n) for iova, n in prp_segments(ctrl.dma, cmd.prp1, cmd.prp2, nbytes)]
        except (PrpError, DmaError):
            counters["dma_faults"] += 1
            return SC_DATA_TRANSFER_ERROR
        try:
            if opcode == NVM_READ:
                ns.disk.readv(ns.byte_offset(slba), views)
                counters["reads"] += 1
                counters["bytes_read"] += nbytes
            else:
                ns.disk.writev(ns.byte_offset(slba), views)
                counters["writes"] += 1
                counters["bytes_written"] += nbytes
        except OSError:
            counters["disk_errors"] += 1
            return SC_DATA_TRANSFER_ERROR
        return SC_SUCCESS
    if opcode == NVM_FLUSH:
        counters["flushes"] += 1  # writes reach the file at once: nothing is cached in the controller
        return SC_SUCCESS
    if opcode == NVM_DSM:
        return _dsm(ctrl, ns, cmd)
    return SC_INVALID_COMMAND_OPCODE


def _dsm(ctrl: NvmeController, ns, cmd: Command) -> int:
    count = (cmd.cdw10 & 0xFF) + 1
    try:
        raw = b"".join(bytes(ctrl.dma.view(iova, n))
                       for iova, n in prp_segments(ctrl.dma, cmd.prp1, cmd.prp2, count * DSM_RANGE_SIZE))
    except (PrpError, DmaError):
        ctrl.counters["dma_faults"] += 1
        return SC_DATA_TRANSFER_ERROR
    ranges = [struct.unpack_from("<IIQ", raw, i * DSM_RANGE_SIZE)[1:] for i in range(count)]
    if any(slba + nlb > ns.blocks for nlb, slba in ranges):
        return SC_LBA_OUT_OF_RANGE
    if cmd.cdw11 & DSM_ATTR_DEALLOCATE:
        for nlb, slba in ranges:
            ns.disk.zero(ns.byte_offset(slba), nlb << ns.block_shift)
    ctrl.counters["dsms"] += 1
    return SC_SUCCESS
