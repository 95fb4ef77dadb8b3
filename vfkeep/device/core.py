"""`GdmaDevice`: the MANA emulator's state and behaviour, independent of the transport.

The core is given three things: `dma` (`view/read/write(iova, ...)`, raising
`dma.DmaFault` outside the mapped ranges), `irq` (`trigger(vector)`) and `loop`
(`call_later(delay_s, cb)`, `add_reader(fd, cb)`, `remove_reader(fd)`). Over
vfio-user these are the server's (adapted by `server.py`); in-process they can
be a `MappedMemory` over a `GuestMemory`, a recorder and a small loop. It
imports nothing from the transport. BAR0, config space and
BAR4 are `bar0`, `config`, `msix_bar` (`read(offset, size)` / `write(offset,
data)`).

Reset and timing (DESIGN D6, vfio-user spec §5.4):
- `reset_method` "none": a disconnect keeps everything (HWC, queues with
  their counters and armed flags, posted receive WQEs, DMA regions,
  registration) and the data path keeps running: received frames land in
  posted buffers while the driver's memory is mapped, and are counted as
  drops otherwise. DEVICE_RESET is refused by the transport.
- "flr": DEVICE_RESET, or a disconnect, is a function-level reset: all
  function state returns to power-on defaults (`_power_on`). Counters, the
  command log, fault rules, link state and surprise removal survive: they
  belong to the test bench / the wire, not to the function.
- Timing (`timing.py`, DESIGN D9): declared parameters, `flr_ms` and
  `hwc_latency_ms`; presets `natural` (nothing modelled) and `realistic`
  (FLR 100 ms, 1 ms per HWC request). The FLR blocks the device (the
  function is unavailable while it resets); HWC latency is scheduled on the
  loop so the data path keeps running. `modelled_flr_ms_total` /
  `modelled_hwc_ms_total` count the modelled time, so tests need no wall
  clock: modelled HWC time = `hwc_requests` x `hwc_latency_ms`.

Queue ids: lowest free per kind from 24; unlike the reference emulator,
which never returns them, ids go back to their pool when the owning queue is
destroyed (DISABLE_QUEUE, DESTROY_WQ_OBJ, DESTROY_HWC, FLR), so a
re-established HWC gets id 24 again and nothing leaks across HWC
re-establishment. For Linux's driver (gdma.md Appendix L.2) every CQ id is
below the MAX_NUM_CQS the HWC announces (128), so there are 104 CQ ids, not
the reference's 128 (QUERY_MAX_RESOURCES still reports its `max_cq` 128; a
vport has one SQ and one RQ, so no driver comes near either), and EQ ids fit
the 16-bit `id` Linux writes in EQ doorbells (OpenHCL's driver writes the
24-bit §4.2 field; both decode the same).

Which driver needs what: OpenHCL's driver (and vfkeep's) is the reference
(spec body); Linux's `mana` 6.1+ reaches the device through a third-party
VMM's vfio-user client and needs Appendix L: see `hwc.py` (HWC completion
fields), `bnic.py` (FENCE_RQ, CONFIG_VPORT_RX v2, `adapter_mtu`), `bar0.py`
(8-byte reads), `requests.py` (capabilities) and `vport.py` (no zero-length
RX completions).

A DMA fault is never an exception out of the device: it is counted
(`dma_faults`) and the request or completion carries an error.
"""
from __future__ import annotations

import contextlib
import enum
import logging
import operator
import time
from typing import Callable

import numpy as np

from vfkeep.gdma.constants import (
    DB_CQ,
    DB_EQ,
    DB_RQ,
    DB_RQ_CLIENT_DATA,
    DB_SQ,
    EMU_DB_PAGE_SIZE,
    EMU_HWC_MAX_NUM_CQS,
    EMU_MANA_DEV_INSTANCE,
    EMU_NUM_EQ,
    EMU_NUM_RQ,
    EMU_NUM_SQ,
    EMU_QUEUE_ID_OFFSET,
    GDMA_DEVICE_MANA,
    PAGE_SIZE,
)
from vfkeep.gdma.hwc import GdmaDevId
from vfkeep.gdma.codec import CQ_EQ_DOORBELL as _CQ_EQ_DB
from vfkeep.gdma.codec import WQ_DOORBELL as _WQ_DB

from .backends import LoopbackBackend
from .hostile import Hostile
from .bar0 import Bar0
from .bnic import STAT_NAMES
from .dma import DmaFault
from .faults import CommandLog, FaultInjector
from .hwc import Hwc
from .mac import DEFAULT_MAC, MAX_VPORTS, vport_mac
from .pci import ConfigSpace, MsixBar
from .queues import Cq, Eq, IdPool, QueueMemory, Wq
from .requests import DmaRegions, Refused
from .smc import Smc
from .timing import PRESETS, DeviceTiming
from .vport import Vport

log = logging.getLogger("vfkeep.device")

#: CQ ids stay below INIT_DATA MAX_NUM_CQS (Linux sizes its CQ table by it): 24..127, not the reference's 24..151.
CQ_ID_SLOTS = EMU_HWC_MAX_NUM_CQS - EMU_QUEUE_ID_OFFSET
# Linux reads the EQ doorbell `id` as 16 bits (bits 16-31 zero): every EQ id must fit.
assert EMU_QUEUE_ID_OFFSET + EMU_NUM_EQ <= 1 << 16
_BROADCAST = b"\xff" * 6
_FIRST_BYTE = operator.itemgetter(0)
_GROUP_BIT = bytes(b & 1 for b in range(256))  # translate table: byte -> its group (multicast) bit
#: The counters of a batch of frames by direction ("in" received, "out" sent): frames, bytes, then QUERY_STATS'
#: octets, unicast packets/octets, broadcast packets/octets, multicast packets/octets (named once, not per batch).
_COUNTER_KEYS = {d: (f"frames_{x}", f"bytes_{x}", f"hc_{d}_octets", f"hc_{d}_ucast_pkts", f"hc_{d}_ucast_octets",
                     f"hc_{d}_broadcast_pkts", f"hc_{d}_broadcast_octets", f"hc_{d}_multicast_pkts",
                     f"hc_{d}_multicast_octets") for d, x in (("in", "rx"), ("out", "tx"))}


class ResetMethod(str, enum.Enum):
    """Stand-in for the sysfs `reset_method` attribute (DESIGN D6; "" in Linux is "none" here): whether a
    disconnect or DEVICE_RESET resets the function. The device owns it; the transport only reads it."""

    NONE = "none"
    FLR = "flr"


RESET_METHODS = tuple(m.value for m in ResetMethod)


COUNTERS = (
    "reset_count", "modelled_flr_ms_total", "modelled_hwc_ms_total",
    "smc_messages", "smc_failures", "hwc_requests", "hwc_requests_failed", "bad_requests", "malformed_wqes",
    "dma_faults", "bad_doorbells", "ignored_doorbells", "eqes_posted", "cqes_posted", "interrupts",
    "lost_notifications",
    "frames_tx", "bytes_tx", "tx_errors", "tx_dropped_link_down", "tx_backend_errors",
    "frames_rx", "bytes_rx", "rx_truncated", "rx_errors", "rx_dropped_unmapped", "rx_dropped_link_down",
    "rx_dropped_no_vport", "rx_dropped_removed", "rx_backend_errors",
    *STAT_NAMES,
)


class GdmaDevice:
    """One MANA VF: BAR0, SMC, HWC, GDMA/BNIC state, vports and the data path."""

    def __init__(self, dma, irq, loop=None, *, vports: int = 1, mac: bytes = DEFAULT_MAC, backend=None,
                 timing: DeviceTiming | str = "natural", reset_method: str = "none", name: str = "mana0",
                 received_at: Callable[[], float] | None = None):
        if vports < 1:
            raise ValueError(f"a device needs at least one vport, got {vports}")
        self.dma, self.irq, self.loop, self.name = dma, irq, loop, name
        #: When the message being handled had reached the device (CLOCK_MONOTONIC s, from the transport): an
        #: HWC request's modelled latency runs from its doorbell's arrival. None (in-process): from when it
        #: is taken, which is when it was rung.
        self.received_at = received_at
        self.timing = PRESETS[timing] if isinstance(timing, str) else timing
        self.reset_method = reset_method
        self.counters: dict[str, int | float] = dict.fromkeys(COUNTERS, 0)
        self.command_log = CommandLog()
        self.faults = FaultInjector()
        self.hostile = Hostile()  # like the fault rules: the test's, not the function's; survives an FLR
        self.epoch = 0
        self.connected = False
        self.removed = False
        self.hwc_stalled = False
        self.mana_dev_id = GdmaDevId(ty=GDMA_DEVICE_MANA, instance=EMU_MANA_DEV_INSTANCE).to_int()
        self.pools = {"SQ": IdPool(EMU_NUM_SQ, EMU_QUEUE_ID_OFFSET), "RQ": IdPool(EMU_NUM_RQ, EMU_QUEUE_ID_OFFSET),
                      "CQ": IdPool(CQ_ID_SLOTS, EMU_QUEUE_ID_OFFSET), "EQ": IdPool(EMU_NUM_EQ, EMU_QUEUE_ID_OFFSET)}
        self.vports = [Vport(self, i, vport_mac(mac, i)) for i in range(vports)]
        self.bar0 = Bar0(self)
        self.config = ConfigSpace()
        self.msix_bar = MsixBar()
        self.hwc: Hwc | None = None
        self._held_interrupts: dict[int, None] | None = None  # `interrupts_held`: vectors raised meanwhile
        self._power_on()
        self.backend = backend if backend is not None else LoopbackBackend()
        self.backend.attach(self)

    @property
    def reset_method(self) -> str:
        """"none" or "flr"; set by the CLI, the control channel or a test, checked here only."""
        return self._reset_method.value

    @reset_method.setter
    def reset_method(self, value: str) -> None:
        try:
            self._reset_method = ResetMethod(value)
        except ValueError:
            raise ValueError(f"reset method must be one of {', '.join(RESET_METHODS)}, got {value!r}") from None

    def _power_on(self) -> None:
        """Function state at power-on / after FLR."""
        if self.hwc is not None:
            self.hwc.stopped = True
        for pool in self.pools.values():
            pool.reset()
        self.eqs: dict[int, Eq] = {}
        self.cqs: dict[int, Cq] = {}
        self.sqs: dict[int, Wq] = {}
        self.rqs: dict[int, Wq] = {}
        self.regions = DmaRegions()
        self.registered = False
        self.driver_info: dict | None = None
        self.hwc = None
        self.smc = Smc(self)
        for vport in self.vports:
            vport.reset()

    # -- connection and reset ---------------------------------------------------------------------
    def client_connected(self, epoch: int) -> None:
        self.epoch = epoch
        self.connected = True
        self.command_log.add("event", "CONNECT", epoch)

    def client_disconnected(self, reset: bool = True) -> None:
        """The driver is gone. With `flr` this resets the function unless the caller (the vfio-user
        server, which calls `reset()` itself) passes `reset=False`."""
        self.connected = False
        self.command_log.add("event", "DISCONNECT", self.epoch, reset_method=self.reset_method)
        if reset and self._reset_method is ResetMethod.FLR:
            self.flr("disconnect")

    def flr(self, reason: str) -> None:
        """Function-level reset: wipe the function and spend the modelled FLR time (blocking)."""
        self._power_on()
        self.counters["reset_count"] += 1
        self.counters["modelled_flr_ms_total"] += self.timing.flr_ms
        self.command_log.add("flr", "FLR", self.epoch, reason=reason, modelled_ms=self.timing.flr_ms)
        log.info("FLR (%s), modelled %s ms", reason, self.timing.flr_ms)
        if self.timing.flr_ms:
            time.sleep(self.timing.flr_ms / 1000)

    def call_later(self, delay_s: float, callback) -> None:
        self.loop.call_later(delay_s, callback)

    # -- HWC lifetime (SMC) -----------------------------------------------------------------------
    def establish_hwc(self, eq_addr: int, cq_addr: int, rq_addr: int, sq_addr: int, msix: int) -> str | None:
        """Create the HWC queues on four pages and post the bring-up EQEs; an error string on failure."""
        for what, addr in (("EQ", eq_addr), ("CQ", cq_addr), ("RQ", rq_addr), ("SQ", sq_addr)):
            try:
                self.dma.view(addr, PAGE_SIZE)
            except DmaFault:
                self.dma_fault(f"HWC {what} page", addr)
                return f"HWC {what} page {addr:#x} is not DMA-mapped"
        try:
            eq = self.create_eq(QueueMemory([eq_addr], 0, PAGE_SIZE), msix)
            try:
                rq, cq = self.create_wq_cq("RQ", QueueMemory([rq_addr], 0, PAGE_SIZE),
                                           QueueMemory([cq_addr], 0, PAGE_SIZE), eq)
            except Refused:
                self.destroy_eq(eq)
                raise
            sq = self._create_wq("SQ", QueueMemory([sq_addr], 0, PAGE_SIZE))
        except Refused as e:
            return str(e)
        hwc = self.hwc = Hwc(self, eq, cq, rq, sq)
        rq.on_doorbell = sq.on_doorbell = hwc.doorbell
        try:
            hwc.post_bringup_eqes()
        except DmaFault:
            self.dma_fault("HWC EQ", eq.id)
            self.destroy_hwc()
            return "HWC EQ became unreachable during bring-up"
        return None

    def destroy_hwc(self) -> None:
        hwc = self.hwc
        if hwc is None:
            return
        hwc.stopped = True
        self.destroy_wq_cq(hwc.rq, hwc.cq)
        self._destroy_wq(hwc.sq)
        self.destroy_eq(hwc.eq)
        self.hwc = None

    # -- queue objects ----------------------------------------------------------------------------
    def _alloc(self, kind: str) -> int:
        qid = self.pools[kind].alloc()
        if qid is None:
            raise Refused(f"no free {kind} id")
        return qid

    def create_eq(self, mem: QueueMemory, msix: int) -> Eq:
        eq = Eq(self, self._alloc("EQ"), mem, msix)
        self.eqs[eq.id] = eq
        return eq

    def destroy_eq(self, eq: Eq) -> None:
        eq.alive = False
        del self.eqs[eq.id]
        self.pools["EQ"].release(eq.id)

    def _create_wq(self, kind: str, mem: QueueMemory) -> Wq:
        wq = Wq(self, self._alloc(kind), kind, mem)
        (self.sqs if kind == "SQ" else self.rqs)[wq.id] = wq
        return wq

    def _destroy_wq(self, wq: Wq) -> None:
        del (self.sqs if wq.kind == "SQ" else self.rqs)[wq.id]
        self.pools[wq.kind].release(wq.id)

    def create_wq_cq(self, kind: str, wq_mem: QueueMemory, cq_mem: QueueMemory, parent: Eq) -> tuple[Wq, Cq]:
        wq = self._create_wq(kind, wq_mem)
        try:
            cq = Cq(self, self._alloc("CQ"), cq_mem, parent)
        except Refused:
            self._destroy_wq(wq)
            raise
        self.cqs[cq.id] = cq
        return wq, cq

    def destroy_wq_cq(self, wq: Wq, cq: Cq) -> None:
        self._destroy_wq(wq)
        del self.cqs[cq.id]
        self.pools["CQ"].release(cq.id)

    # -- doorbells and notifications --------------------------------------------------------------
    def doorbell(self, offset: int, value: int) -> None:
        """An 8-byte write at `offset` in the doorbell zone (only page 0 exists)."""
        queue_offset = offset % EMU_DB_PAGE_SIZE
        if queue_offset in (DB_SQ, DB_RQ):
            wq = (self.sqs if queue_offset == DB_SQ else self.rqs).get(_WQ_DB.get(value, "id"))
            if wq is None:
                self.counters["bad_doorbells"] += 1
            elif wq.doorbell(_WQ_DB.get(value, "tail")):
                wq.on_doorbell()
            else:
                self.counters["ignored_doorbells"] += 1
        elif queue_offset in (DB_CQ, DB_EQ):
            queue = (self.cqs if queue_offset == DB_CQ else self.eqs).get(_CQ_EQ_DB.get(value, "id"))
            if queue is None:
                self.counters["bad_doorbells"] += 1
            else:
                queue.doorbell(_CQ_EQ_DB.get(value, "tail"), bool(_CQ_EQ_DB.get(value, "arm")))
        elif queue_offset != DB_RQ_CLIENT_DATA:
            self.counters["bad_doorbells"] += 1

    def interrupt(self, vector: int) -> None:
        if self._held_interrupts is not None:
            self._held_interrupts[vector] = None
            return
        self.counters["interrupts"] += 1
        self.irq.trigger(vector)

    @contextlib.contextmanager
    def interrupts_held(self):
        """Vectors raised inside the block are not signalled but collected in the list it yields, in order, once
        each, for the caller to raise later (`interrupt`): a request whose answer waits for the modelled latency
        raises the interrupts of its effects (a test EQE) with its answer, not before it."""
        outer, self._held_interrupts = self._held_interrupts, {}
        raised: list[int] = []
        try:
            yield raised
        finally:
            raised.extend(self._held_interrupts)
            self._held_interrupts = outer

    def post_eqe(self, eq: Eq, event_type: int, payload: bytes = b"") -> bool:
        try:
            eq.post(event_type, payload)
            return True
        except DmaFault:
            self.dma_fault("EQ", eq.id)
            return False

    def dma_fault(self, what: str, where: int, n: int = 1) -> None:
        self.counters["dma_faults"] += n
        log.debug("DMA fault: %s %#x (%d)", what, where, n)

    # -- DMA helpers for SGE lists ----------------------------------------------------------------
    def gather(self, sges, limit: int | None = None) -> bytes:
        """Concatenated SGE buffers (at most `limit` bytes)."""
        if limit is None and len(sges) == 1:
            return self.dma.read(sges[0].address, sges[0].size)
        parts = []
        left = limit if limit is not None else sum(s.size for s in sges)
        for s in sges:
            if left <= 0:
                break
            n = min(s.size, left)
            parts.append(self.dma.read(s.address, n))
            left -= n
        return b"".join(parts)

    def scatter(self, sges, data: bytes) -> int:
        """Write `data` across the SGE buffers in order; returns the bytes that fit."""
        mv = memoryview(data)
        pos, total = 0, len(data)
        for s in sges:
            if pos >= total:
                break
            n = min(s.size, total - pos)
            self.dma.write(s.address, mv[pos:pos + n])
            pos += n
        return pos

    # -- data path --------------------------------------------------------------------------------
    def count_frames(self, direction: str, frames: list[bytes]) -> None:
        """Frame and octet counters of a batch, including the QUERY_STATS unicast/multicast/broadcast split."""
        if not frames:
            return
        c = self.counters
        nbytes = sum(map(len, frames))
        bcast = mcast = bcast_bytes = mcast_bytes = 0
        # The first byte of every frame in one C-level pass; its low bit is the group bit. Unicast-only batches
        # (the common case) need no step per frame in Python.
        group = 0 in map(len, frames) or bytes(map(_FIRST_BYTE, frames)).translate(_GROUP_BIT).count(1)
        for f in frames if group else ():
            if f and f[0] & 1:  # group bit: multicast, or broadcast when all ones
                if f[:6] == _BROADCAST:
                    bcast += 1
                    bcast_bytes += len(f)
                else:
                    mcast += 1
                    mcast_bytes += len(f)
        n = len(frames)
        frames_key, bytes_key, octets, ucast_pkts, ucast_octets, bcast_pkts, bcast_octets, mcast_pkts, \
            mcast_octets = _COUNTER_KEYS[direction]
        c[frames_key] += n
        c[bytes_key] += nbytes
        c[octets] += nbytes
        c[ucast_pkts] += n - bcast - mcast
        c[ucast_octets] += nbytes - bcast_bytes - mcast_bytes
        c[bcast_pkts] += bcast
        c[bcast_octets] += bcast_bytes
        c[mcast_pkts] += mcast
        c[mcast_octets] += mcast_bytes

    def count_block(self, direction: str, frames: np.ndarray) -> None:
        """`count_frames` for frames of one length, the rows of `frames`: a batch of unicast frames (the group
        bit of the first byte clear) needs no step per frame."""
        n, length = frames.shape
        if n and frames[:, 0].tobytes().translate(_GROUP_BIT).count(1):
            self.count_frames(direction, [row.tobytes() for row in frames])
            return
        c = self.counters
        frames_key, bytes_key, octets, ucast_pkts, ucast_octets = _COUNTER_KEYS[direction][:5]
        c[frames_key] += n
        c[bytes_key] += n * length
        c[octets] += n * length
        c[ucast_pkts] += n
        c[ucast_octets] += n * length

    def transmit_block(self, vport: Vport, frames: np.ndarray) -> None:
        """`transmit_many` for frames of one length, the rows of `frames` (a view of the TX buffers: valid during
        the call); a backend without `send_block` gets them as views."""
        if not vport.link_up:
            self.counters["tx_dropped_link_down"] += len(frames)
            return
        self.count_block("out", frames)
        send_block = getattr(self.backend, "send_block", None)
        if send_block is not None:
            send_block(vport.index, frames)
        else:
            self.backend.send_many(vport.index, list(map(memoryview, frames)))

    def deliver_block(self, index: int, frames: np.ndarray) -> None:
        """`deliver_many` for frames of one length, the rows of `frames`."""
        if self.removed:
            self.counters["rx_dropped_removed"] += len(frames)
            return
        self.vports[index].receive_block(frames)

    def transmit_many(self, vport: Vport, frames: list[bytes] | list[memoryview]) -> None:
        """A batch of frames a vport sent, in order, to the backend (views of TX buffers: valid during the call)."""
        if not vport.link_up:
            self.counters["tx_dropped_link_down"] += len(frames)
            return
        self.count_frames("out", frames)
        self.backend.send_many(vport.index, frames)

    def deliver(self, index: int, frame: bytes) -> None:
        """One frame for vport `index` (test hook `inject_rx`)."""
        self.deliver_many(index, [frame])

    def deliver_many(self, index: int, frames: list[bytes]) -> None:
        """Frames from the backend for vport `index`, in order."""
        if self.removed:
            self.counters["rx_dropped_removed"] += len(frames)
            return
        self.vports[index].receive_many(frames)

    def deliver_wire(self, frames: list[bytes]) -> None:
        """Frames from a shared wire (udp/tap), in order: steered by destination MAC."""
        if len(self.vports) == 1:
            self.deliver_many(0, frames)
            return
        per_vport: list[list[bytes]] = [[] for _ in self.vports]
        by_mac = {v.mac: v.index for v in self.vports}
        for frame in frames:
            dst = frame[:6]
            if dst and dst[0] & 1:
                for q in per_vport:
                    q.append(frame)
            elif (index := by_mac.get(dst)) is not None:
                per_vport[index].append(frame)
            else:
                self.counters["rx_dropped_no_vport"] += 1
        for index, batch in enumerate(per_vport):
            if batch:
                self.deliver_many(index, batch)

    # -- test hooks -------------------------------------------------------------------------------
    def hwc_event(self, event_type: int, payload: bytes, **details) -> bool:
        """Post an EQE to the HWC EQ (link change, reset request); False if there is no HWC."""
        if self.hwc is None:
            return False
        ok = self.post_eqe(self.hwc.eq, event_type, payload)
        self.command_log.add("event", f"EQE_{event_type}", self.epoch, code=event_type, status=0 if ok else 1,
                             **details)
        return ok

    def set_hwc_stall(self, on: bool) -> None:
        self.hwc_stalled = on
        if not on and self.hwc is not None:
            self.hwc.doorbell()

    def close(self) -> None:
        self.backend.close()

    def inspect(self) -> dict:
        """The whole function, each part by its own `inspect()` (the control channel's `state`)."""
        return {
            "name": self.name,
            "reset_method": self.reset_method,
            "timing": self.timing.to_dict(),
            "epoch": self.epoch,
            "connected": self.connected,
            "removed": self.removed,
            "hwc_stalled": self.hwc_stalled,
            "hwc_established": self.hwc is not None,
            "hwc": self.hwc.inspect() if self.hwc is not None else None,
            "registered": self.registered,
            "driver_info": self.driver_info,
            "eqs": sorted(self.eqs),
            "cqs": sorted(self.cqs),
            "sqs": sorted(self.sqs),
            "rqs": sorted(self.rqs),
            "dma_regions": [r.inspect() for _, r in sorted(self.regions.regions.items())],
            "vports": [v.inspect() for v in self.vports],
            "posted_rx": sum(len(v.posted) for v in self.vports),
            "backend": self.backend.inspect(),
            "faults": [r.inspect() for r in self.faults.rules],
            "hostile": self.hostile.inspect(),
        }


__all__ = ["GdmaDevice", "COUNTERS", "DEFAULT_MAC", "MAX_VPORTS", "RESET_METHODS", "ResetMethod", "vport_mac"]
