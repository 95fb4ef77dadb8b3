"""Control-channel commands of the NVMe emulator (test hooks), registered on the server's control channel.

Each command is `fn(ctrl, **args) -> dict`:

| command | args | reply |
|---|---|---|
| `state` | — | registers, queues (head/tail/size/inflight), outstanding AER CIDs, namespaces, timing, epoch, faults |
| `counters` | — | `{counters, timing}`: resets, enables/disables, modelled time, admin/IO counts and errors, ... |
| `reset_counters` | — | `{}` |
| `command_log` | `since` (seq) | `{entries, last_seq}` (see `faults.py`) |
| `admin_fault` | `opcode`, `action` fail/delay/drop, `mode` once/always/from_epoch, `epoch`, `cdw10`, `status`, `ms` | `{rule}` |
| `io_delay` | `ms` (0 = off) | `{io_delay_ms}`: every IO completion that many ms after its fetch |
| `io_stall` | `on` | `{io_stalled}`: fetched IO is not completed until the stall ends |
| `surprise_removal` | `on` | `{removed}`: BAR0 reads all ones, writes dropped, no completions |
| `namespace_change` | `nsid` | `{nsid}`: changed-namespace notice (AEN) as in spec §17 `ChangeNotification` |
| `clear_faults` | — | `{cleared}`: admin rules, IO delay and stall |
"""
from __future__ import annotations


def state(ctrl) -> dict:
    return ctrl.inspect()


def counters(ctrl) -> dict:
    return {"counters": dict(ctrl.counters), "timing": ctrl.timing.to_dict()}


def reset_counters(ctrl) -> dict:
    for name in ctrl.counters:
        ctrl.counters[name] = 0
    return {}


def command_log(ctrl, since: int = 0) -> dict:
    return {"entries": ctrl.command_log.since(int(since)), "last_seq": ctrl.command_log.seq}


def admin_fault(ctrl, opcode, action: str, mode: str = "once", epoch: int = 0, cdw10: int | None = None,
                status: int = 0x006, ms: float = 0) -> dict:
    return {"rule": ctrl.faults.add(opcode, action, mode, epoch, cdw10, status, ms).inspect()}


def io_delay(ctrl, ms: float) -> dict:
    if not isinstance(ms, (int, float)) or ms < 0:
        raise ValueError(f"ms must be a number >= 0, got {ms!r}")
    ctrl.io_delay_ms = float(ms)
    ctrl.command_log.add("event", "IO_DELAY", ctrl.epoch, ms=ctrl.io_delay_ms)
    return {"io_delay_ms": ctrl.io_delay_ms}


def io_stall(ctrl, on: bool = True) -> dict:
    ctrl.command_log.add("event", "IO_STALL", ctrl.epoch, on=bool(on))
    ctrl.set_io_stall(bool(on))
    return {"io_stalled": ctrl.io_stalled}


def surprise_removal(ctrl, on: bool = True) -> dict:
    ctrl.removed = bool(on)
    ctrl.command_log.add("event", "SURPRISE_REMOVAL", ctrl.epoch, on=ctrl.removed)
    return {"removed": ctrl.removed}


def namespace_change(ctrl, nsid: int) -> dict:
    if not isinstance(nsid, int) or not 1 <= nsid <= 0xFFFFFFFE:
        raise ValueError(f"nsid must be a namespace id, got {nsid!r}")
    ctrl.command_log.add("event", "NAMESPACE_CHANGE", ctrl.epoch, nsid=nsid)
    ctrl.namespace_changed(nsid)
    return {"nsid": nsid}


def clear_faults(ctrl) -> dict:
    n = ctrl.faults.clear() + bool(ctrl.io_delay_ms) + bool(ctrl.io_stalled)
    ctrl.io_delay_ms = 0.0
    ctrl.set_io_stall(False)
    return {"cleared": n}


COMMANDS = {fn.__name__: fn for fn in (state, counters, reset_counters, command_log, admin_fault, io_delay, io_stall,
                                       surprise_removal, namespace_change, clear_faults)}
