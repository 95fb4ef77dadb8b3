"""`vfkeep traffic --run-dir DIR (start [--rate FPS] [--size BYTES] [--nic N] | stop | stats) [--json]`.

Drives the guest traffic agents of a running host through its control socket (the host owns the
memory and eventfds an agent needs, so it starts them).
"""
from __future__ import annotations

import json

import click
from rich.console import Console
from rich.table import Table

from .commands import host_client, run_dir_option
from .traffic import DEFAULT_RATE, DEFAULT_SIZE

json_option = click.option("--json", "as_json", is_flag=True, help="print the host's reply as JSON")
nic_option = click.option("--nic", type=click.IntRange(0), default=None, help="only this NIC (default: all)")


@click.group("traffic")
@run_dir_option
@click.pass_context
def traffic_group(ctx, run_dir):
    """Guest traffic on a running host: one agent per NIC sends paced frames and measures what comes back."""
    ctx.obj = run_dir


@traffic_group.command("start")
@click.option("--rate", type=click.FloatRange(min=1, max=1_000_000), default=DEFAULT_RATE, show_default=True,
              help="frames per second per NIC")
@click.option("--size", type=click.IntRange(60, 2044), default=DEFAULT_SIZE, show_default=True,
              help="frame size in bytes")
@nic_option
@json_option
@click.pass_obj
def start_command(run_dir, rate, size, nic, as_json):
    """Start (or re-pace) traffic; starts the NIC's agent on first use."""
    with host_client(run_dir, wait=60) as host:
        result = host.traffic("start", rate=rate, size=size, nic=nic)
    if as_json:
        click.echo(json.dumps(result))
        return
    for n in result["nics"]:
        click.echo(f"nic {n['nic']}: {n['rate']:g} frames/s of {n['size']} bytes (agent pid {n['pid']})")


@traffic_group.command("stop")
@nic_option
@json_option
@click.pass_obj
def stop_command(run_dir, nic, as_json):
    """Stop sending (agents keep running, and keep their records, until the host stops)."""
    with host_client(run_dir, wait=60) as host:
        result = host.traffic("stop", nic=nic)
    if as_json:
        click.echo(json.dumps(result))
        return
    for n in result["nics"]:
        click.echo(f"nic {n['nic']}: stopped after {n['sent']} frames")


@traffic_group.command("stats")
@nic_option
@click.option("--settle-ms", type=click.FloatRange(0, 60_000), default=None,
              help="wait up to this long for frames still in flight [default: 10 x the NIC's measured RTT p99, "
                   "100-2000 ms; the wait ends as soon as every frame came back]")
@json_option
@click.pass_obj
def stats_command(run_dir, nic, settle_ms, as_json):
    """Delivery since the last start, per NIC, and what the last servicing cost the guest."""
    with host_client(run_dir, wait=120) as host:
        result = host.traffic("stats", nic=nic, settle_ms=settle_ms)
    if as_json:
        click.echo(json.dumps(result))
        return
    console = Console()
    console.print(stats_table(result["nics"], "traffic since the last start"))
    if result["last_servicing"]:
        console.print(stats_table(result["last_servicing"], "last servicing window"))


def stats_table(rows: list[dict], title: str) -> Table:
    t = Table(title=title, title_justify="left")
    for col in ("nic", "sent", "received", "lost", "tx ring full", "dup", "reordered", "RTT p50 ms", "RTT p99 ms",
                "blackout ms"):
        t.add_column(col, justify="right")
    for r in rows:
        rtt = r["rtt_ms"]
        t.add_row(str(r["nic"]), str(r["sent"]), str(r["received"]), str(r["frames_lost"]),
                  str(r["lost_tx_ring_full"]), str(r["duplicated"]), str(r["reordered"]), _ms(rtt["p50"]),
                  _ms(rtt["p99"]), _ms(r["blackout_ms"]))
    return t


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"
