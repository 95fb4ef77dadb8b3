"""Block relay: one disk's guest block channel to its NVMe namespace (issue 13 item 4).

One thread per disk pops guest requests and submits them to the NVMe driver with the guest's own pages
as the PRP targets (guest RAM is DMA-mapped, so no copy); each completion is pushed to the completion
ring from the driver's interrupt thread (pushes are serialised by a lock, so the ring keeps one producer
at a time). A request that is malformed or names memory outside its disk's data area is refused with a
negative status and never reaches the controller.

Servicing (spec nvme.md §12 item 6): `stop()` stops popping; after the driver's `save()` (which stops
its completions), `inflight()` is what the guest is still waiting for — saved as a "storvsp/<pci_id>"
unit. The next worker's relay `start(replay=...)`s: it waits until the restored NVMe commands drained
(so no replayed request reaches the controller before the pre-save one it repeats has finished), then
re-issues each saved request and goes on with the ring. Every request is completed to the guest exactly
once: completions of pre-save commands went nowhere (their requester was the old process), a replayed
write rewrites the same data from the same guest pages, and a request the guest re-issued after the
handover (the host has it re-issue what it still waits for, in case no saved state carried it) is
dropped when the relay replays it itself.
"""
from __future__ import annotations

import logging
import os
import select
import threading

from ..guest.block import (BAD_BUFFER, BAD_REQUEST, COMPLETION, DRIVER_FAILED, OP_FLUSH, OP_READ, OP_WRITE,
                           BlockChannel, Request)
from ..log import kv
from ..nvme import NVM_FLUSH, NVM_READ, NVM_WRITE
from ..nvme_driver.errors import DriverStopped, NvmeError
from ..proto import storvsp_pb2

log = logging.getLogger("vfkeep.worker.block")

_NVM_OPS = {OP_READ: NVM_READ, OP_WRITE: NVM_WRITE, OP_FLUSH: NVM_FLUSH}
BATCH = 64
DRAIN_TIMEOUT_S = 120.0


def unit_name(pci_id: str) -> str:
    return f"storvsp/{pci_id}"


class BlockRelay:
    def __init__(self, channel: BlockChannel, driver, nsid: int = 1, pci_id: str = ""):
        self.channel = channel
        self.driver = driver
        self.pci_id = pci_id
        self.ns = driver.namespace(nsid)
        self._lock = threading.Lock()
        self._inflight: dict[int, Request] = {}
        self._stop = threading.Event()
        self._wakeup = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._thread: threading.Thread | None = None
        self.counters = {"requests": 0, "completed": 0, "errors": 0, "refused": 0, "replayed": 0,
                         "reissued_replayed": 0}

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self, replay: list[Request] = ()) -> None:
        self._thread = threading.Thread(target=self._run, args=(list(replay),), name=f"block-{self.pci_id}",
                                        daemon=True)
        self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread is not None

    def stop(self) -> None:
        """No more requests are popped; what is in flight stays in flight (for `inflight()` after the save)."""
        self._stop.set()
        os.eventfd_write(self._wakeup, 1)
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def close(self) -> None:
        """After `stop()`: release the wake-up eventfd (the channel belongs to the caller)."""
        if self._wakeup >= 0:
            os.close(self._wakeup)
            self._wakeup = -1

    def inflight(self) -> list[Request]:
        with self._lock:
            return list(self._inflight.values())

    def save(self) -> storvsp_pb2.SavedBlockRequests:
        """The requests still in flight (call after the driver's save: none completes any more)."""
        return storvsp_pb2.SavedBlockRequests(requests=[r.pack() for r in self.inflight()])

    @staticmethod
    def saved_requests(state: storvsp_pb2.SavedBlockRequests | bytes) -> list[Request]:
        """Saved requests from untrusted bytes; a record of the wrong size is skipped (logged)."""
        if isinstance(state, (bytes, bytearray)):
            state = storvsp_pb2.SavedBlockRequests.FromString(bytes(state))
        out = []
        for raw in state.requests:
            if len(raw) != len(Request(0, 0, 0, 0, 0).pack()):
                kv(log, logging.WARNING, "skipping a saved block request of the wrong size", size=len(raw))
                continue
            out.append(Request.unpack(raw))
        return out

    # -- the relay thread ---------------------------------------------------------------------------
    def _run(self, replay: list[Request]) -> None:
        replayed = {req.tag for req in replay}
        if replay:
            if not self.driver.wait_drained(DRAIN_TIMEOUT_S):
                kv(log, logging.ERROR, "restored commands did not drain; replaying anyway", pci_id=self.pci_id)
            for req in replay:
                self.counters["replayed"] += 1
                self._submit(req)
            kv(log, logging.INFO, "replayed in-flight guest requests", pci_id=self.pci_id, count=len(replay))
        ring = self.channel.requests
        poller = select.poll()
        poller.register(ring.doorbell.fileno(), select.POLLIN)
        poller.register(self._wakeup, select.POLLIN)
        while not self._stop.is_set():
            for raw in ring.pop_many(BATCH):
                req = Request.unpack(raw)
                if req.tag in replayed:  # the guest re-issued a request this relay replays: completed once
                    replayed.discard(req.tag)
                    self.counters["reissued_replayed"] += 1
                    continue
                self._submit(req)
            if not len(ring):
                poller.poll(500)  # the doorbell is consumed after the poll: a ring in between is not lost
                ring.doorbell.clear()

    def _submit(self, req: Request) -> None:
        self.counters["requests"] += 1
        op = _NVM_OPS.get(req.op)
        nbytes = req.nblocks * self.ns.block_size
        if op is None or (op != NVM_FLUSH and not 1 <= req.nblocks <= self.ns.max_blocks) \
                or req.lba + req.nblocks > self.ns.blocks:
            self._refuse(req, BAD_REQUEST)
            return
        if op != NVM_FLUSH and not self.channel.contains(req.gpa, nbytes):
            self._refuse(req, BAD_BUFFER)
            return
        with self._lock:
            self._inflight[req.tag] = req
        try:
            if op == NVM_FLUSH:
                self.driver.submit_io(op, self.ns.nsid, 0, 1, 0, 0, self._done(req.tag), timeout=30)
            else:
                self.driver.submit_io(op, self.ns.nsid, req.lba, req.nblocks, req.gpa, nbytes, self._done(req.tag),
                                      timeout=30)
        except DriverStopped:
            return  # saved or shut down under us: the request stays in flight (saved, or failed at shutdown)
        except (NvmeError, TimeoutError, BufferError) as e:
            kv(log, logging.WARNING, "block request could not be submitted", pci_id=self.pci_id, error=e)
            self._done(req.tag)(DRIVER_FAILED, 0)

    def _refuse(self, req: Request, status: int) -> None:
        self.counters["refused"] += 1
        with self._lock:
            self._push(req.tag, status)

    def _done(self, tag: int):
        def complete(status: int, dw0: int) -> None:
            with self._lock:
                if self._inflight.pop(tag, None) is None:
                    return
                self.counters["completed"] += 1
                if status:
                    self.counters["errors"] += 1
                self._push(tag, DRIVER_FAILED if status < 0 else status)
        return complete

    def _push(self, tag: int, status: int) -> None:
        if not self.channel.completions.push(COMPLETION.pack(tag, status)):
            kv(log, logging.ERROR, "guest completion ring full: completion dropped", pci_id=self.pci_id, tag=tag)

    def inspect(self) -> dict:
        with self._lock:
            inflight = len(self._inflight)
        return {**self.counters, "inflight": inflight, "rings": {"requests": self.channel.requests.stats().to_dict(),
                                                                "completions": self.channel.completions.stats().to_dict()}}
