"""Control-channel commands of the MANA emulator (test hooks), registered on the server's control socket.

Each command is `fn(dev, **args) -> dict` and is reachable as
`control_call(path, name, **args)` (the `vfkeep.rpc` envelope; the table gives each result):

| command | args | reply |
|---|---|---|
| `state` | — | summary: `hwc_established`, `hwc` ids, `registered`, `eqs`/`cqs`/`sqs`/`rqs`, `dma_regions`, `vports` (queues, `running`, `posted_rx`, `link_up`, …), `posted_rx`, `backend` (udp: `local_port`), `reset_method`, `timing` (`{preset, hwc_latency_ms, flr_ms}`), `epoch`, `removed`, `hwc_stalled`, `faults` |
| `counters` | — | `{counters: {...}, timing}` (timing: the declared parameters): `reset_count`, `modelled_flr_ms_total`, `modelled_hwc_ms_total`, frame/byte/drop/fault counters and the QUERY_STATS counters |
| `command_log` | `since` (seq, default 0) | `{entries: [...], last_seq}`; entries have `seq, t, epoch, kind, code, name, status, injected` + details |
| `fail_request` | `type` (code or name), `mode` once/always/from_epoch, `epoch` | `{rule}` |
| `clear_faults` | — | `{cleared}` |
| `hwc_stall` | `on` (default true) | `{hwc_stalled}` |
| `surprise_removal` | `on` (default true) | `{removed}` |
| `raise_reset_request` | `revoke_vtl0_vf` (default false) | `{posted}` (EQE 135 on the HWC EQ) |
| `reset_function` | — | `{reset_count}` (an FLR behind the driver's back: the function loses its HWC and queues) |
| `link` | `vport`, `up` | `{posted}` (EQE 133 link connect/disconnect on the HWC EQ) |
| `inject_rx` | `vport`, `frame_hex` | `{delivered}` (the frame as if from the backend) |
| `reset_counters` | — | `{}` |
| `hostile` | `mode` (one of `hostile.MODES`), `on` (default true) | `{hostile}`: the active modes (`device/hostile.py`) |

The transport adds `ping`, `epoch`, `get_reset_method` / `set_reset_method`. Bad
arguments raise `ValueError`, which the control server returns as a `Refused` reply.
"""
from __future__ import annotations

from vfkeep.gdma.constants import (
    GDMA_EQE_HWC_RECONFIG_DATA,
    GDMA_EQE_HWC_RESET_REQUEST,
    HWC_DATA_TYPE_HW_VPORT_LINK_CONNECT,
    HWC_DATA_TYPE_HW_VPORT_LINK_DISCONNECT,
)
from vfkeep.gdma.queues import EqeDataReconfig, EqeVfReset


def state(dev) -> dict:
    return dev.inspect()


def counters(dev) -> dict:
    return {"counters": dict(dev.counters), "timing": dev.timing.to_dict()}


def reset_counters(dev) -> dict:
    for name in dev.counters:
        dev.counters[name] = 0
    return {}


def command_log(dev, since: int = 0) -> dict:
    return {"entries": dev.command_log.since(int(since)), "last_seq": dev.command_log.seq}


def fail_request(dev, type, mode: str = "once", epoch: int = 0) -> dict:
    return {"rule": dev.faults.add(type, mode, epoch).inspect()}


def clear_faults(dev) -> dict:
    n = len(dev.faults.rules)
    dev.faults.clear()
    return {"cleared": n}


def hwc_stall(dev, on: bool = True) -> dict:
    dev.set_hwc_stall(bool(on))
    return {"hwc_stalled": dev.hwc_stalled}


def surprise_removal(dev, on: bool = True) -> dict:
    dev.removed = bool(on)
    dev.command_log.add("event", "SURPRISE_REMOVAL", dev.epoch, on=dev.removed)
    return {"removed": dev.removed}


def raise_reset_request(dev, revoke_vtl0_vf: bool = False) -> dict:
    payload = EqeVfReset(revoke_vtl0_vf=int(bool(revoke_vtl0_vf))).to_bytes()
    return {"posted": dev.hwc_event(GDMA_EQE_HWC_RESET_REQUEST, payload, revoke_vtl0_vf=bool(revoke_vtl0_vf))}


def hostile(dev, mode: str, on: bool = True) -> dict:
    dev.hostile.set(mode, bool(on))
    dev.command_log.add("event", "HOSTILE", dev.epoch, mode=mode, on=bool(on))
    return {"hostile": dev.hostile.inspect()}


def reset_function(dev) -> dict:
    dev.flr("control")
    return {"reset_count": dev.counters["reset_count"]}


def _vport(dev, vport):
    if not isinstance(vport, int) or not 0 <= vport < len(dev.vports):
        raise ValueError(f"vport {vport!r} is not in 0..{len(dev.vports) - 1}")
    return dev.vports[vport]


def link(dev, vport: int, up: bool) -> dict:
    port = _vport(dev, vport)
    port.link_up = bool(up)
    data_type = HWC_DATA_TYPE_HW_VPORT_LINK_CONNECT if up else HWC_DATA_TYPE_HW_VPORT_LINK_DISCONNECT
    reconfig = EqeDataReconfig(data_type=data_type)
    reconfig.data[:] = list(port.index.to_bytes(3, "little"))
    return {"posted": dev.hwc_event(GDMA_EQE_HWC_RECONFIG_DATA, reconfig.to_bytes(), vport=port.index,
                                    up=bool(up))}


def inject_rx(dev, vport: int, frame_hex: str) -> dict:
    port = _vport(dev, vport)
    try:
        frame = bytes.fromhex(frame_hex)
    except (TypeError, ValueError) as e:
        raise ValueError(f"frame_hex is not hex: {e}") from None
    before = dev.counters["frames_rx"]
    dev.deliver(port.index, frame)
    return {"delivered": dev.counters["frames_rx"] > before}


COMMANDS = {fn.__name__: fn for fn in (state, counters, reset_counters, command_log, fail_request, clear_faults,
                                       hwc_stall, surprise_removal, raise_reset_request, reset_function, link,
                                       inject_rx, hostile)}

__all__ = ["COMMANDS"]
