"""`vfkeep layout [--device mana|nvme] [--json]`: every wire struct's size, field offsets and bit positions,
and every constant, of the MANA (GDMA) or the NVMe wire formats.

Lets the emulators, the drivers and reviewers check layouts against spec `gdma.md` / `nvme.md` without reading
Python.
"""
from __future__ import annotations

import json
import sys
from typing import Any

import click

from . import gdma, nvme
from .gdma.base import WireStruct, struct_layout

DEVICES = {"mana": "GDMA", "nvme": "NVMe"}


def _nvme_structs() -> dict[str, type[WireStruct]]:
    return {name: obj for mod in (nvme.regs, nvme.commands, nvme.identify) for name in mod.__all__
            if isinstance(obj := getattr(mod, name), type) and issubclass(obj, WireStruct)}


def _nvme_constants() -> dict[str, int]:
    return {name: int(value) for mod in (nvme.constants, nvme.identify) for name in mod.__all__
            if name.isupper() and isinstance(value := getattr(mod, name), int) and not isinstance(value, bool)}


def layout_data(device: str = "mana") -> dict[str, Any]:
    """`{"structs": {name: struct_layout}, "constants": {name: value}}` of one device's wire formats."""
    structs, constants = ((gdma.WIRE_STRUCTS, gdma.constants.all_constants()) if device == "mana"
                          else (_nvme_structs(), _nvme_constants()))
    return {"structs": {name: struct_layout(cls) for name, cls in structs.items()}, "constants": constants}


def _plain_lines(data: dict[str, Any], title: str) -> list[str]:
    """Piped: one `key: value` line per struct, field and constant, never cut or folded (a grep for a field name
    finds it whole), as the host commands print when piped."""
    lines = [f"{title} wire structs"]
    for name, s in data["structs"].items():
        lines.append(f"{name}: {s['size']} bytes")
        lines += [f"{name}.{field}: offset {f['offset']}, {f['size']} bytes" for field, f in s["fields"].items()]
        for field, b in s["bitfields"].items():
            hi = b["bit"] + b["width"] - 1
            span = f"bit {hi}" if b["width"] == 1 else f"bits {b['bit']}–{hi}"
            lines.append(f"{name}.{field}: {span}, width {b['width']}")
    lines.append(f"{title} constants")
    lines += [f"{name}: {value} ({hex(value)})" for name, value in data["constants"].items()]
    return lines


def _print_tables(data: dict[str, Any], title: str) -> None:
    from .host.render import no_terminal

    if no_terminal(sys.stdout):
        click.echo("\n".join(_plain_lines(data, title)))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    structs = Table(title=f"{title} wire structs", show_lines=False)
    for col in ("struct", "field"):
        structs.add_column(col, overflow="fold")
    for col in ("size", "offset/bits", "bytes/width"):
        structs.add_column(col, justify="right", no_wrap=True, min_width=len(col))
    for name, s in data["structs"].items():
        first = True
        for field, f in s["fields"].items():
            structs.add_row(name if first else "", field, str(s["size"]) if first else "", str(f["offset"]), str(f["size"]))
            first = False
        for field, b in s["bitfields"].items():
            hi = b["bit"] + b["width"] - 1
            span = f"bit {hi}" if b["width"] == 1 else f"bits {b['bit']}–{hi}"
            structs.add_row(name if first else "", field, str(s["size"]) if first else "", span, str(b["width"]))
            first = False
        structs.add_section()
    console.print(structs)

    consts = Table(title=f"{title} constants")
    consts.add_column("name")
    consts.add_column("value", justify="right")
    consts.add_column("hex", justify="right")
    for name, value in data["constants"].items():
        consts.add_row(name, str(value), hex(value))
    console.print(consts)


@click.command("layout")
@click.option("--device", type=click.Choice(list(DEVICES)), default="mana", show_default=True,
              help="Whose wire formats: the MANA adapter's (GDMA) or the NVMe controller's.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def layout_command(device: str, as_json: bool) -> None:
    """Print MANA (GDMA) or NVMe wire layouts (struct sizes, field offsets, bitfields) and named constants.

    Tables on a terminal; piped, one `name: value` line per struct field and constant."""
    data = layout_data(device)
    if as_json:
        click.echo(json.dumps(data, indent=2))
    else:
        _print_tables(data, DEVICES[device])
