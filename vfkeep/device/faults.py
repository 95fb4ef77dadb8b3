"""Test hooks of the emulator: the command log and request fault injection.

Command log: one entry per SMC message, HWC request, FLR and injected event,
with `seq`, `t` (time.monotonic of the device process), connection `epoch`,
`kind` ("smc" | "hwc" | "flr" | "event"), `code`, `name`, `status` and
`injected` (True when a fault rule forced the failure). Servicing tests use
it to prove which path ran (e.g. no ESTABLISH_HWC / REGISTER_DEVICE / FLR in
the keepalive window, servicing spec §12.1).

Fault rules name a request type by HWC code (int or "0x20001"), by spec name
(`GDMA_REGISTER_DEVICE`, `MANA_QUERY_DEV_CONFIG`, `SMC_MSG_TYPE_ESTABLISH_HWC`)
or by that name without its prefix (`REGISTER_DEVICE`, `QUERY_DEV_CONFIG`,
`ESTABLISH_HWC`). SMC codes overlap GDMA codes, so SMC messages are named,
never numbered. Modes: `once` (next matching request fails), `always`,
`from_epoch` (fails in connection epoch ≥ `epoch`, e.g. "after servicing").
"""
from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass

from vfkeep.gdma.constants import GdmaRequestType, ManaCommandCode, SmcMsgType, request_name
from vfkeep.log import kv

log = logging.getLogger("vfkeep.device.commands")

LOG_LIMIT = 20000

# key = ("smc", msg_type) or ("hwc", request code)
Key = tuple[str, int]


def _names() -> dict[str, Key]:
    names: dict[str, Key] = {}
    for m in SmcMsgType:
        names[m.name] = ("smc", m.value)
        names[m.name.removeprefix("SMC_MSG_TYPE_")] = ("smc", m.value)
    for enum_cls, prefixes in ((GdmaRequestType, ("GDMA_",)), (ManaCommandCode, ("MANA_VTL2_", "MANA_"))):
        for m in enum_cls:
            names[m.name] = ("hwc", m.value)
            for p in prefixes:
                if m.name.startswith(p):
                    names[m.name.removeprefix(p)] = ("hwc", m.value)
                    break
    return names


_BY_NAME = _names()


def resolve_type(value: int | str) -> Key:
    """A fault-rule type (HWC code, spec name or short name) → key; ValueError names what is accepted."""
    if isinstance(value, int) and not isinstance(value, bool):
        return ("hwc", value)
    if isinstance(value, str):
        key = _BY_NAME.get(value.strip().upper())
        if key:
            return key
        try:
            return ("hwc", int(value, 0))
        except ValueError:
            pass
    raise ValueError(f"unknown request type {value!r}: use an HWC code or a name such as "
                     "GDMA_REGISTER_DEVICE, QUERY_DEV_CONFIG, ESTABLISH_HWC")


@dataclass
class FaultRule:
    key: Key
    mode: str
    epoch: int = 0

    def inspect(self) -> dict:
        kind, code = self.key
        return {"type": request_name(code, smc=kind == "smc"), "kind": kind, "code": code, "mode": self.mode,
                "epoch": self.epoch}


class FaultInjector:
    """Rules that force a status-1 answer for chosen request types."""

    MODES = ("once", "always", "from_epoch")

    def __init__(self) -> None:
        self.rules: list[FaultRule] = []

    def add(self, type: int | str, mode: str = "once", epoch: int = 0) -> FaultRule:
        if mode not in self.MODES:
            raise ValueError(f"fault mode {mode!r} is not one of {self.MODES}")
        if mode == "from_epoch" and (not isinstance(epoch, int) or epoch < 1):
            raise ValueError(f"from_epoch needs an epoch ≥ 1, got {epoch!r}")
        rule = FaultRule(resolve_type(type), mode, epoch)
        self.rules.append(rule)
        return rule

    def clear(self) -> None:
        self.rules.clear()

    def should_fail(self, key: Key, epoch: int) -> bool:
        for rule in self.rules:
            if rule.key != key:
                continue
            if rule.mode == "once":
                self.rules.remove(rule)
                return True
            if rule.mode == "always" or epoch >= rule.epoch:
                return True
        return False


class CommandLog:
    """Bounded list of what the device was asked to do, with connection epochs (also written to the log: HWC
    requests and SMC messages that succeeded at DEBUG, as one line per request is a cost on every servicing's
    critical path; the `command_log` control command has them all)."""

    def __init__(self) -> None:
        self.entries: collections.deque[dict] = collections.deque(maxlen=LOG_LIMIT)
        self.seq = 0

    def add(self, kind: str, name: str, epoch: int, *, code: int | None = None, status: int | None = None,
            injected: bool = False, **details) -> dict:
        self.seq += 1
        entry = {"seq": self.seq, "t": time.monotonic(), "epoch": epoch, "kind": kind, "code": code, "name": name,
                 "status": status, "injected": injected, **details}
        self.entries.append(entry)
        ok = status in (None, 0)
        # A successful HWC request or SMC message (the reset paths' ESTABLISH_HWC and DESTROY_HWC are in their
        # window, the driver waiting on the mailbox), a connect and a disconnect (the vfio-user server's "client
        # connected" and "client disconnected" lines say them, the latter with the reset method) are DEBUG: in a
        # servicing's window each line costs the device 50-100 us of CPU, even held.
        quiet = kind in ("hwc", "smc") or name in ("CONNECT", "DISCONNECT")
        level = logging.WARNING if not ok else logging.DEBUG if quiet else logging.INFO
        if log.isEnabledFor(level):  # a successful HWC request's line is usually not written: skip building it
            kv(log, level, f"{kind} {name}", **{k: v for k, v in entry.items() if k not in ("kind", "name", "t")})
        return entry

    def since(self, seq: int = 0) -> list[dict]:
        return [e for e in self.entries if e["seq"] > seq]


__all__ = ["FaultInjector", "FaultRule", "CommandLog", "resolve_type", "Key"]
