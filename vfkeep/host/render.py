"""Human output (rich) for servicing results, inspect trees and decoded servicing state."""
from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table
from rich.tree import Tree

from ..device.timing import DeviceTiming

PATH_STYLE = {"keepalive": "green", "fresh": "yellow", "fallback": "red"}


def servicing_table(result: dict) -> Table:
    status = result.get("status") or ("ok" if result["ok"] else "failed")
    ok = {"ok": "[green]ok[/green]", "degraded": "[yellow]degraded[/yellow]"}.get(status, "[red]FAILED[/red]")
    flags = ", ".join(f for f, on in (("mana", result["mana_keepalive"]), ("nvme", result["nvme_keepalive"])) if on)
    ph = result["phases_ms"]
    title = (f"servicing {ok}  keepalive flags: {flags or 'none'}  "
             f"save {ph['save']:.1f} ms, handoff {ph['handoff']:.1f} ms, restore {ph['restore']:.1f} ms, "
             f"total {ph['total']:.1f} ms")
    t = Table(title=title, title_justify="left")
    for col in ("pci_id", "restore path", "device reset", "HWC established", "HWC requests", "reason"):
        t.add_column(col)
    for n in result["nics"]:
        style = PATH_STYLE.get(n["restore_path"], "")
        t.add_row(n["pci_id"], f"[{style}]{n['restore_path']}[/{style}]", _yn(n["device_reset"]),
                  _yn(n["hwc_established"]), str(n.get("hwc_requests", "")), _esc(n.get("reason") or n["error"] or ""))
    if result.get("timing"):
        t.caption, t.caption_justify = "device " + DeviceTiming.from_dict(result["timing"]).describe(), "left"
    return t


def print_servicing(result: dict, console: Console) -> None:
    console.print(servicing_table(result))
    for u in result["unclaimed_pool_allocations"]:
        console.print(f"[yellow]unclaimed pool allocation freed:[/yellow] {u['device']} base_pfn {u['base_pfn']} "
                      f"({u['pages']} pages, tag {u['tag']!r})")
    if result.get("blackout_ms") is not None:
        console.print(f"blackout {result['blackout_ms']:.1f} ms, frames lost {result['frames_lost']}")
    if result.get("error"):
        console.print(f"[red]error:[/red] {result['error']}")


def _esc(text: str) -> str:
    return text.replace("[", r"\[")


def _yn(v: bool) -> str:
    return "[red]yes[/red]" if v else "no"


def tree(data: Any, label: str = "") -> Tree:
    """A rich tree of nested dicts/lists; scalars inline."""
    root = Tree(label or "·")
    _fill(root, data)
    return root


def _fill(node: Tree, data: Any) -> None:
    if isinstance(data, dict):
        items = data.items()
    elif isinstance(data, list):
        items = ((str(i), v) for i, v in enumerate(data))
    else:
        node.add(_scalar(data))
        return
    for k, v in items:
        if isinstance(data, list) and _is_row(v):  # a slot of the pool, an unclaimed allocation: one line
            node.add(f"[bold]{k}[/bold]: " + " ".join(f"{f}={_scalar(x)}" for f, x in v.items()))
        elif isinstance(v, (dict, list)) and v:
            _fill(node.add(f"[bold]{k}[/bold]"), v)
        else:
            node.add(f"[bold]{k}[/bold]: {_scalar(v)}")


def _is_row(v: Any) -> bool:
    return isinstance(v, dict) and bool(v) and not any(isinstance(x, (dict, list)) for x in v.values())


def _scalar(v: Any) -> str:
    if v is None:
        return "[dim]null[/dim]"
    if isinstance(v, (dict, list)):
        return "{}" if isinstance(v, dict) else "[]"
    return str(v).replace("[", r"\[")
