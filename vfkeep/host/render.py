"""Human output for servicing results, inspect trees, traffic stats and decoded servicing state.

On a terminal: rich tables and trees, and a table wider than the terminal falls back to lines. Piped (or
`plain=True`): plain `key: value` lines, never wrapped or cut, one record per line where that reads, so
`grep` and `cut` work on it. `--json` is the machine form; these are for people.

rich is imported only to draw (about a third of a light command's start-up CPU): a command piped, or one that
fails before it prints, never loads it (`stdout()`).
"""
from __future__ import annotations

import json
import os
import sys
from typing import TYPE_CHECKING, Any

from ..device.timing import DeviceTiming

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table
    from rich.tree import Tree

PATH_STYLE = {"keepalive": "green", "fresh": "yellow", "fallback": "red"}
STATUS_STYLE = {"ok": "green", "degraded": "yellow", "failed": "red"}


def console() -> Console:
    """stdout as rich sees it; `plain(c)` tells whether to write lines instead of tables."""
    from rich.console import Console
    return Console(highlight=False, soft_wrap=True)


class PlainOutput:
    """stdout where rich would see no terminal: it takes the plain lines only, so rich is not imported."""

    is_terminal = False

    @property
    def file(self):
        return sys.stdout


def no_terminal(file) -> bool:
    """rich would surely see no terminal on `file` (so need not be imported to ask): it is no tty and neither
    of rich's overrides (TTY_COMPATIBLE, FORCE_COLOR) is set."""
    if file is None or "TTY_COMPATIBLE" in os.environ or "FORCE_COLOR" in os.environ:
        return False
    isatty = getattr(file, "isatty", None)
    try:
        return isatty is not None and not isatty()
    except ValueError:  # closed: rich says "no terminal" too
        return True


def stdout() -> Console | PlainOutput:
    """Where a command's human output goes: `console()`, or a `PlainOutput` where rich would see no terminal."""
    return PlainOutput() if no_terminal(sys.stdout) else console()


def plain(c: Console | PlainOutput) -> bool:
    return not c.is_terminal


def fits(c: Console, renderable) -> bool:
    """The renderable's natural width (unconstrained) fits the console: nothing would be wrapped or cut."""
    from rich.measure import Measurement
    return Measurement.get(c, c.options.update_width(1 << 16), renderable).maximum <= c.width


def value(v: Any) -> str:
    """One value on one line: JSON for null, booleans and structures; numbers and strings as they are."""
    if v is None or isinstance(v, bool) or isinstance(v, (dict, list)):
        return json.dumps(v)
    return str(v)


def _line(c: Console | PlainOutput, text: str) -> None:
    c.file.write(text + "\n")  # as is: no markup, no wrapping, no cutting
    c.file.flush()


# -- servicing result ------------------------------------------------------------------------------------
def _status(result: dict) -> str:
    return result.get("status") or ("ok" if result["ok"] else "failed")


def _summary(result: dict) -> str:
    flags = ", ".join(f for f, on in (("mana", result["mana_keepalive"]), ("nvme", result["nvme_keepalive"])) if on)
    ph = result["phases_ms"]
    failed_save = (result.get("error") or "").startswith("save")
    handoff = "none (no state handed over)" if ph["handoff"] is None else f"{ph['handoff']:.1f} ms"
    restore = "none" if ph["restore"] is None else f"{ph['restore']:.1f} ms"
    replacement = "" if ph.get("replacement") is None else f", replacement worker {ph['replacement']:.1f} ms"
    return (f"keepalive flags: {flags or 'none'}; save {'failed after ' if failed_save else ''}{ph['save']:.1f} ms, "
            f"handoff {handoff}{replacement}, restore {restore}, total {ph['total']:.1f} ms")


def servicing_table(result: dict) -> Table:
    from rich.table import Table
    status = _status(result)
    style = STATUS_STYLE.get(status, "red")
    t = Table(title=f"servicing [{style}]{status}[/{style}]  {_summary(result)}", title_justify="left")
    for col in ("pci_id", "path", "reset", "HWC est.", "HWC req.", "reason"):
        t.add_column(col, no_wrap=col != "reason", overflow="fold")
    for n in result["nics"]:
        style = PATH_STYLE.get(n["restore_path"], "")
        t.add_row(n["pci_id"], f"[{style}]{n['restore_path']}[/{style}]", _yn(n["device_reset"]),
                  _yn(n["hwc_established"]), str(n.get("hwc_requests", "")), _esc(n.get("reason") or n["error"] or ""))
    if result.get("timing"):
        t.caption, t.caption_justify = "device " + DeviceTiming.from_dict(result["timing"]).describe(), "left"
    return t


def _why(n: dict) -> str:
    """`reason=... error=...` of one device, the error only when the reason does not already quote it (a
    fallback's reason is "saved state rejected: <error>")."""
    reason, error = n.get("reason"), n["error"]
    if error and reason and error in reason:
        return f"reason={value(reason)}"
    return f"reason={value(reason)} error={value(error)}"


def servicing_lines(result: dict) -> list[str]:
    out = [f"servicing {_status(result)}: {_summary(result)}"]
    for n in result["nics"]:
        out.append(f"nic {n['pci_id']}: path={n['restore_path']} requested={n.get('requested_path', '-')} "
                   f"device_reset={value(n['device_reset'])} hwc_established={value(n['hwc_established'])} "
                   f"hwc_requests={n.get('hwc_requests', '-')} {_why(n)}")
    out += nvme_lines(result)
    if result.get("timing"):
        out.append("timing: device " + DeviceTiming.from_dict(result["timing"]).describe())
    return out


def nvme_lines(result: dict) -> list[str]:
    """One line per NVMe controller of a servicing result."""
    return [f"nvme {n['pci_id']}: path={n['restore_path']} requested={n.get('requested_path', '-')} "
            f"device_reset={value(n['device_reset'])} controller_enabled={value(n['controller_enabled'])} "
            f"{_why(n)}" for n in result.get("nvme") or []]


def print_servicing(result: dict, c: Console | PlainOutput) -> None:
    if plain(c) or not fits(c, table := servicing_table(result)):
        for line in servicing_lines(result):
            _line(c, line)
    else:
        c.print(table)
        for line in nvme_lines(result):
            _line(c, line)
    if not result["nics"] and not result.get("nvme"):
        _line(c, "no NIC or NVMe controller: nothing was kept alive or restored")
    for u in result["unclaimed_pool_allocations"]:
        _line(c, f"unclaimed pool allocation freed: {u['device']} base_pfn {u['base_pfn']} ({u['pages']} pages, "
                 f"tag {u['tag']!r})")
    if result.get("blackout_ms") is not None:
        _line(c, f"blackout {result['blackout_ms']:.1f} ms, frames lost {result['frames_lost']}")
    if result.get("io_blackout_ms") is not None:
        _line(c, f"disk IO blackout {result['io_blackout_ms']:.1f} ms, IO errors {result['io_errors']}")


# -- traffic -------------------------------------------------------------------------------------------------
STATS_COLUMNS = (("nic", "nic"), ("sent", "sent"), ("received", "received"), ("frames_lost", "lost"),
                 ("lost_tx_ring_full", "tx ring full"), ("duplicated", "dup"), ("reordered", "reordered"),
                 ("rtt_p50", "RTT p50 ms"), ("rtt_p99", "RTT p99 ms"), ("blackout_ms", "blackout ms"))


def _stats_row(r: dict) -> dict:
    rtt = r.get("rtt_ms") or {}
    return {"nic": r["nic"], "sent": r["sent"], "received": r["received"], "frames_lost": r["frames_lost"],
            "lost_tx_ring_full": r["lost_tx_ring_full"], "duplicated": r["duplicated"], "reordered": r["reordered"],
            "rtt_p50": _ms(rtt.get("p50")), "rtt_p99": _ms(rtt.get("p99")), "blackout_ms": _ms(r["blackout_ms"])}


def stats_table(rows: list[dict], title: str) -> Table:
    from rich.table import Table
    t = Table(title=title, title_justify="left")
    for _, header in STATS_COLUMNS:
        t.add_column(header, justify="right", no_wrap=True)
    for r in rows:
        row = _stats_row(r)
        t.add_row(*(str(row[k]) for k, _ in STATS_COLUMNS))
    return t


def print_stats(rows: list[dict], title: str, c: Console | PlainOutput) -> None:
    if plain(c) or not fits(c, table := stats_table(rows, title)):
        for r in rows:
            row = _stats_row(r)
            _line(c, f"{title}: " + " ".join(f"{k}={row[k]}" for k, _ in STATS_COLUMNS))
    else:
        c.print(table)


DISK_COLUMNS = (("disk", "disk"), ("completed", "completed"), ("errors", "errors"), ("verify_errors", "bad blocks"),
                ("duplicates", "dup"), ("outstanding", "in flight"), ("iops", "IOPS"), ("p50", "lat p50 ms"),
                ("p99", "lat p99 ms"), ("io_blackout_ms", "IO blackout ms"))


def _disk_row(r: dict) -> dict:
    lat = r.get("latency_ms") or {}
    return {"disk": r["disk"], "completed": r["completed"], "errors": r["errors"], "verify_errors": r["verify_errors"],
            "duplicates": r["duplicates"], "outstanding": r["outstanding"], "iops": value(r.get("iops")),
            "p50": _ms(lat.get("p50")), "p99": _ms(lat.get("p99")), "io_blackout_ms": _ms(r["io_blackout_ms"])}


def disk_stats_table(rows: list[dict], title: str) -> Table:
    from rich.table import Table
    t = Table(title=title, title_justify="left")
    for _, header in DISK_COLUMNS:
        t.add_column(header, justify="right", no_wrap=True)
    for r in rows:
        row = _disk_row(r)
        t.add_row(*(str(row[k]) for k, _ in DISK_COLUMNS))
    return t


def print_disk_stats(rows: list[dict], title: str, c: Console | PlainOutput) -> None:
    if plain(c) or not fits(c, table := disk_stats_table(rows, title)):
        for r in rows:
            row = _disk_row(r)
            _line(c, f"{title}: " + " ".join(f"{k}={row[k]}" for k, _ in DISK_COLUMNS))
    else:
        c.print(table)


def verify_line(v: dict) -> str:
    """What one disk's read-back (`disk stats --verify`) checked and found."""
    line = (f"verify: disk {v['disk']}: read back {v['chunks']} chunks ({v['blocks']} blocks), "
            f"{v['verify_errors']} bad blocks")
    if v["bad_blocks"]:
        more = v["verify_errors"] - len(v["bad_blocks"])
        line += ": " + ", ".join(v["bad_blocks"]) + (f" (and {more} more)" if more > 0 else "")
    return line


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


# -- trees ---------------------------------------------------------------------------------------------------
def tree(data: Any, label: str = "") -> Tree:
    """A rich tree of nested dicts/lists; scalars inline."""
    from rich.tree import Tree
    root = Tree(label or "·")
    _fill(root, data)
    return root


def tree_lines(data: Any, prefix: str = "") -> list[str]:
    """`path/to/key: value` for every leaf (the paths `inspect PATH` takes)."""
    if isinstance(data, dict) and data:
        items = data.items()
    elif isinstance(data, list) and data:
        items = ((str(i), v) for i, v in enumerate(data))
    else:
        return [f"{prefix or '.'}: {value(data)}"]
    out = []
    for k, v in items:
        path = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(data, list) and _is_row(v):  # a pool slot, an unclaimed allocation: one line
            out.append(f"{path}: {_row(v, value)}")
        else:
            out += tree_lines(v, path)
    return out


def print_tree(data: Any, label: str, c: Console | PlainOutput, path: str = "") -> None:
    """A tree (lines prefixed by `path`, the sub-tree's own path), or one leaf's value alone."""
    if not isinstance(data, (dict, list)):
        _line(c, data if isinstance(data, str) else value(data))
    elif plain(c):
        for line in tree_lines(data, path.strip("/")):
            _line(c, line)
    else:
        c.print(tree(data, label))


def _fill(node: Tree, data: Any) -> None:
    if isinstance(data, dict):
        items = data.items()
    elif isinstance(data, list):
        items = ((str(i), v) for i, v in enumerate(data))
    else:
        node.add(_scalar(data))
        return
    for k, v in items:
        if isinstance(data, list) and _is_row(v):  # a pool slot, an unclaimed allocation: one line
            node.add(f"[bold]{_esc(str(k))}[/bold]: {_row(v, _scalar)}")
        elif isinstance(v, (dict, list)) and v:
            _fill(node.add(f"[bold]{_esc(str(k))}[/bold]"), v)
        else:
            node.add(f"[bold]{_esc(str(k))}[/bold]: {_scalar(v)}")


def _is_row(v: Any) -> bool:
    """A flat record (every value a scalar): one line in a list of them reads as a table row."""
    return isinstance(v, dict) and bool(v) and not any(isinstance(x, (dict, list)) for x in v.values())


def _row(v: dict, fmt) -> str:
    return " ".join(f"{f}={fmt(x)}" for f, x in v.items())


def _scalar(v: Any) -> str:
    if v is None:
        return "[dim]null[/dim]"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (dict, list)):
        return "{}" if isinstance(v, dict) else "[]"
    return _esc(str(v))


def _esc(text: str) -> str:
    return text.replace("[", r"\[")


def _yn(v: bool) -> str:
    return "[red]yes[/red]" if v else "no"
