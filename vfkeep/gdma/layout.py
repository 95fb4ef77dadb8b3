"""`vfkeep layout [--json]`: every wire struct's size, field offsets and bit positions, and every constant.

Lets the emulator, the driver and reviewers check layouts against spec `gdma.md` without reading Python.
"""
from __future__ import annotations

import json
from typing import Any

import click

from . import WIRE_STRUCTS, struct_layout
from .constants import all_constants


def layout_data() -> dict[str, Any]:
    """`{"structs": {name: struct_layout}, "constants": {name: value}}`."""
    return {
        "structs": {name: struct_layout(cls) for name, cls in WIRE_STRUCTS.items()},
        "constants": all_constants(),
    }


def _print_tables(data: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    structs = Table(title="GDMA wire structs", show_lines=False)
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

    consts = Table(title="GDMA constants")
    consts.add_column("name")
    consts.add_column("value", justify="right")
    consts.add_column("hex", justify="right")
    for name, value in data["constants"].items():
        consts.add_row(name, str(value), hex(value))
    console.print(consts)


@click.command("layout")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def layout_command(as_json: bool) -> None:
    """Print GDMA/MANA wire layouts (struct sizes, field offsets, bitfields) and named constants."""
    data = layout_data()
    if as_json:
        click.echo(json.dumps(data, indent=2))
    else:
        _print_tables(data)
