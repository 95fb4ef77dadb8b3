"""Test hooks of the NVMe emulator: the command log and admin-command fault rules (spec nvme.md §17-18).

Command log: one entry per admin command (at fetch; its `status` is filled
in when it completes, `None` while outstanding — an AER stays outstanding
until an event), controller enable/disable/ready, FLR, connect/disconnect
and injected events. Each entry has `seq`, `t` (device monotonic s), the
connection `epoch`, `kind` (`admin` | `register` | `flr` | `event`), `name`
and details (`opcode`, `cid`, `cdw10`, `nsid`, `injected`). Servicing tests
use it to prove a path: no CREATE_IO_CQ/SQ, IDENTIFY or new
ASYNC_EVENT_REQUEST in a keepalive window; a CC.EN 0→1 (`CC_ENABLE`) when
keepalive is off. IO commands are counted, not logged.

Admin fault rules (the reference fault controller's admin submission faults,
reduced to what the tests use): match an opcode (number or name such as
`CREATE_IO_CQ`) and optionally CDW10 (e.g. IDENTIFY with CNS 0), then
`fail` (complete with `status`, default Internal Error), `delay` (complete
after `ms`, blocking the admin queue like the reference's admin worker) or
`drop` (never complete). Modes: `once`, `always`, `from_epoch` (connection
epoch ≥ `epoch`, i.e. "after servicing").
"""
from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass

from vfkeep.log import kv
from vfkeep.nvme import SC_INTERNAL_ERROR, AdminOpcode, admin_name

log = logging.getLogger("vfkeep.nvme_device.commands")

LOG_LIMIT = 20000
ACTIONS = ("fail", "delay", "drop")
MODES = ("once", "always", "from_epoch")


def resolve_opcode(value: int | str) -> int:
    """An admin opcode from its number or name (`CREATE_IO_CQ`, `0x05`); ValueError names the accepted ones."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 0xFF:
        return value
    if isinstance(value, str):
        name = value.strip().upper()
        if name in AdminOpcode.__members__:
            return AdminOpcode[name].value
        try:
            return resolve_opcode(int(name, 0))
        except ValueError:
            pass
    raise ValueError(f"unknown admin opcode {value!r}: use 0..255 or one of {', '.join(AdminOpcode.__members__)}")


@dataclass
class AdminFault:
    opcode: int
    action: str
    mode: str = "once"
    epoch: int = 0
    cdw10: int | None = None
    status: int = SC_INTERNAL_ERROR
    ms: float = 0.0

    def matches(self, opcode: int, cdw10: int, epoch: int) -> bool:
        return (opcode == self.opcode and (self.cdw10 is None or cdw10 == self.cdw10)
                and (self.mode != "from_epoch" or epoch >= self.epoch))

    def inspect(self) -> dict:
        return {"opcode": self.opcode, "name": admin_name(self.opcode), "action": self.action, "mode": self.mode,
                "epoch": self.epoch, "cdw10": self.cdw10, "status": self.status, "ms": self.ms}


class AdminFaults:
    def __init__(self) -> None:
        self.rules: list[AdminFault] = []

    def add(self, opcode: int | str, action: str, mode: str = "once", epoch: int = 0, cdw10: int | None = None,
            status: int = SC_INTERNAL_ERROR, ms: float = 0.0) -> AdminFault:
        if action not in ACTIONS:
            raise ValueError(f"fault action {action!r} is not one of {ACTIONS}")
        if mode not in MODES:
            raise ValueError(f"fault mode {mode!r} is not one of {MODES}")
        if mode == "from_epoch" and (not isinstance(epoch, int) or epoch < 1):
            raise ValueError(f"from_epoch needs an epoch >= 1, got {epoch!r}")
        if not isinstance(status, int) or not 0 < status <= 0x7FF:
            raise ValueError(f"status must be an 11-bit non-zero (SCT << 8) | SC, got {status!r}")
        if action == "delay" and (not isinstance(ms, (int, float)) or ms <= 0):
            raise ValueError(f"a delay needs ms > 0, got {ms!r}")
        rule = AdminFault(resolve_opcode(opcode), action, mode, epoch, cdw10, status, float(ms))
        self.rules.append(rule)
        return rule

    def match(self, opcode: int, cdw10: int, epoch: int) -> AdminFault | None:
        """The first matching rule (a `once` rule is used up)."""
        for rule in self.rules:
            if rule.matches(opcode, cdw10, epoch):
                if rule.mode == "once":
                    self.rules.remove(rule)
                return rule
        return None

    def clear(self) -> int:
        n = len(self.rules)
        self.rules.clear()
        return n


class CommandLog:
    """Bounded list of what the controller was asked to do, with connection epochs (also logged)."""

    def __init__(self) -> None:
        self.entries: collections.deque[dict] = collections.deque(maxlen=LOG_LIMIT)
        self.seq = 0

    def add(self, kind: str, name: str, epoch: int, **details) -> dict:
        self.seq += 1
        entry = {"seq": self.seq, "t": time.monotonic(), "epoch": epoch, "kind": kind, "name": name, **details}
        self.entries.append(entry)
        kv(log, logging.INFO, f"{kind} {name}", **{k: v for k, v in entry.items() if k not in ("kind", "name", "t")})
        return entry

    def since(self, seq: int = 0) -> list[dict]:
        return [dict(e) for e in self.entries if e["seq"] > seq]
