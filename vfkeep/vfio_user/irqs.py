"""Interrupt plumbing (spec §3.6-3.7, §6 "Interrupts"): eventfds per vector, with the project's
latch so an interrupt raised while no eventfd is assigned (a driver handover) is not lost."""
from __future__ import annotations

import contextlib
import errno
import logging
import os

from vfkeep.log import kv

from .protocol import (IRQ_ERR, IRQ_MSIX, IRQ_REQ, IRQ_SET_ACTION_MASK_ALL, IRQ_SET_ACTION_TRIGGER,
                       IRQ_SET_DATA_BOOL, IRQ_SET_DATA_EVENTFD, IRQ_SET_DATA_MASK, IRQ_SET_DATA_NONE, NUM_PCI_IRQS,
                       CommandError, close_fds)

log = logging.getLogger("vfkeep.vfio_user.irqs")


class IrqTable:
    """Eventfd per (IRQ type, vector) plus the latch; `delivered` counts eventfd signals and
    `latched` the interrupts that found no eventfd (device counters)."""

    def __init__(self, counts: list[int]):
        if len(counts) != NUM_PCI_IRQS:
            raise ValueError(f"need vector counts for {NUM_PCI_IRQS} IRQ types, got {len(counts)}")
        self.counts = counts
        self._fds: dict[tuple[int, int], int] = {}
        self._pending: set[tuple[int, int]] = set()
        self.delivered = 0
        self.latched = 0
        #: `coalescing`: the vectors to signal at the end, in the order they were raised (a dict as an ordered set).
        self._held: dict[tuple[int, int], None] | None = None

    # -- device side ----------------------------------------------------------------------------
    def trigger(self, vector: int, index: int = IRQ_MSIX) -> bool:
        """Raise `vector`: signal its eventfd, or latch it until one is assigned. True if signalled."""
        if not 0 <= index < NUM_PCI_IRQS or not 0 <= vector < self.counts[index]:
            raise ValueError(f"vector {vector} out of range: IRQ type {index} has {self.counts[index]} vectors")
        key = (index, vector)
        fd = self._fds.get(key)
        if fd is None:
            if key not in self._pending:
                self._pending.add(key)
                self.latched += 1
            return False
        if self._held is not None:
            self._held[key] = None
            return True
        self._signal(key, fd)
        return True

    @contextlib.contextmanager
    def coalescing(self):
        """Interrupts raised inside the block are signalled at its end, once per vector (the server handles a
        burst of client messages in one: the client is woken once, after the device has done the whole burst,
        not in the middle of it). A vector whose eventfd was replaced or removed meanwhile is not signalled: its
        old driver is gone (`_close` forgets it, whatever number the next eventfd gets). Latching is unchanged (an
        unassigned vector latches at once)."""
        if self._held is not None:
            yield
            return
        self._held = {}
        try:
            yield
        finally:
            held, self._held = self._held, None
            self._signal_keys(held)

    def signal_held(self) -> None:
        """Signal what the enclosing `coalescing` block has held so far, now (it goes on holding what comes
        after). The server does so before it sends a burst's replies: a client that has its reply then finds the
        interrupts the burst raised signalled already and consumes them before it sleeps, instead of being woken
        by them later, as if by something new (the woken client may preempt the device as soon as the reply
        is sent, before the step's end)."""
        if self._held:
            held, self._held = self._held, {}
            self._signal_keys(held)

    def _signal_keys(self, held: dict[tuple[int, int], None]) -> None:
        for key in held:
            self._signal(key, self._fds[key])

    def assigned(self, vector: int, index: int = IRQ_MSIX) -> bool:
        return (index, vector) in self._fds

    def pending(self, index: int = IRQ_MSIX) -> list[int]:
        return sorted(v for i, v in self._pending if i == index)

    def clear_pending(self) -> None:
        """Latched interrupts are device state: an FLR forgets them."""
        self._pending.clear()

    # -- protocol side --------------------------------------------------------------------------
    def set_irqs(self, flags: int, index: int, start: int, count: int, data: bytes, fds: list[int]) -> None:
        """DEVICE_SET_IRQS with libvfio-user's validation (§3.7). Takes the fds it keeps out of
        `fds`; the caller closes whatever is left."""
        data_type, action = flags & IRQ_SET_DATA_MASK, flags & IRQ_SET_ACTION_MASK_ALL
        if flags & ~(IRQ_SET_DATA_MASK | IRQ_SET_ACTION_MASK_ALL) or bin(data_type).count("1") != 1 \
                or bin(action).count("1") != 1:
            raise CommandError(errno.EINVAL, f"SET_IRQS flags {flags:#x}: need exactly one DATA and one ACTION bit")
        if index >= NUM_PCI_IRQS:
            raise CommandError(errno.EINVAL, f"SET_IRQS index {index}: only {NUM_PCI_IRQS} IRQ types")
        vectors = self.counts[index]
        disable = flags == IRQ_SET_DATA_NONE | IRQ_SET_ACTION_TRIGGER and count == 0
        if start >= vectors or start + count > vectors:
            raise CommandError(errno.EINVAL, f"SET_IRQS start={start} count={count}: type {index} has {vectors} vectors")
        if count == 0 and not (disable and start == 0):
            raise CommandError(errno.EINVAL, "SET_IRQS count 0 is only valid as disable (flags 0x21, start 0)")
        if fds and data_type != IRQ_SET_DATA_EVENTFD:
            raise CommandError(errno.EINVAL, f"SET_IRQS carries {len(fds)} fds but DATA is not EVENTFD")
        if fds and len(fds) != count:
            raise CommandError(errno.EINVAL, f"SET_IRQS carries {len(fds)} fds for count {count}")
        for fd in fds:
            if not _is_eventfd(fd):
                raise CommandError(errno.EINVAL, "SET_IRQS: an attached fd is not an eventfd")
        if (data_type == IRQ_SET_DATA_BOOL) != bool(data) or (data and len(data) != count):
            raise CommandError(errno.EINVAL, f"SET_IRQS has {len(data)} data bytes for count {count} "
                                             f"(DATA_BOOL needs exactly count bytes, others none)")
        if index in (IRQ_ERR, IRQ_REQ) and (action != IRQ_SET_ACTION_TRIGGER or count > 1):
            raise CommandError(errno.EINVAL, f"SET_IRQS on ERR/REQ type {index}: only TRIGGER of one vector")
        if action != IRQ_SET_ACTION_TRIGGER:
            raise CommandError(errno.EINVAL, f"SET_IRQS flags {flags:#x}: MASK/UNMASK not supported (not MASKABLE)")

        if disable:
            for key in [k for k in self._fds if k[0] == index]:
                self._close(key)
        elif data_type == IRQ_SET_DATA_EVENTFD and fds:
            for i in range(count):
                key = (index, start + i)
                self._close(key)
                self._fds[key] = fds[i]
            del fds[:count]
            for i in range(count):
                key = (index, start + i)
                if key in self._pending:
                    self._pending.discard(key)
                    self._signal(key, self._fds[key])
                    kv(log, logging.INFO, "latched interrupt delivered", index=index, vector=start + i)
        elif data_type == IRQ_SET_DATA_EVENTFD:
            for i in range(count):
                self._close((index, start + i))
        else:  # software trigger (loop-back test): signal the assigned vectors now
            for i in range(count):
                key = (index, start + i)
                if (data_type == IRQ_SET_DATA_NONE or data[i] == 1) and key in self._fds:
                    self._signal(key, self._fds[key])

    def drop_all(self) -> None:
        """Client gone: close every eventfd; pending latches stay (they are device state)."""
        for key in list(self._fds):
            self._close(key)

    def _close(self, key: tuple[int, int]) -> None:
        """Close `key`'s eventfd; an interrupt held for it goes with it (to its old driver, gone)."""
        fd = self._fds.pop(key, None)
        if fd is not None:
            close_fds([fd])
            if self._held:
                self._held.pop(key, None)

    def _signal(self, key: tuple[int, int], fd: int) -> None:
        try:
            os.eventfd_write(fd, 1)
        except OSError as e:  # not an eventfd, or its counter is saturated: the client's problem
            kv(log, logging.WARNING, "cannot signal interrupt", index=key[0], vector=key[1], error=e)
            return
        self.delivered += 1


def _is_eventfd(fd: int) -> bool:
    """Signalling writes 8 bytes to the fd: only an eventfd is guaranteed not to block us."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[eventfd]"
    except OSError:
        return False
