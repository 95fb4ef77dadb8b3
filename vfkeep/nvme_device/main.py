"""`vfkeep nvme-device`: run one NVMe controller emulator as a vfio-user server process until SIGTERM.

`start_nvme_device()` launches it as a child (tests, the host) and returns once its control channel answers.
"""
from __future__ import annotations

import logging
import os
import re
import subprocess
from pathlib import Path

import click

from vfkeep import log as vlog
from vfkeep.cli import FloatRange
from vfkeep.proc import READY_TIMEOUT_S
from vfkeep.vfio_user.control import start_device_process
from vfkeep.vfio_user.server import VfioUserServer, serve_until_stopped
from vfkeep.sockets import SocketPathError

from .core import RESET_METHODS, TIMINGS, make_timing
from .namespace import BLOCK_SIZES, Disk, make_namespaces
from .server import NvmeVfioDevice

log = logging.getLogger("vfkeep.nvme_device")

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(text: str) -> int:
    """`4096`, `64K`, `64M`, `1G` (binary units) → bytes."""
    m = re.fullmatch(r"\s*(\d+)\s*([KMG]?)(?:i?B)?\s*", str(text), re.IGNORECASE)
    if not m or int(m.group(1)) == 0:
        raise click.BadParameter(f"{text!r} is not a size like 4096, 64K, 64M or 1G")
    return int(m.group(1)) * _UNITS[m.group(2).upper()]


class _Size(click.ParamType):
    name = "size"

    def convert(self, value, param, ctx):
        return value if isinstance(value, int) else parse_size(value)


@click.command("nvme-device")
@click.option("--socket", "socket_path", required=True, type=click.Path(dir_okay=False), help="vfio-user socket")
@click.option("--control", "control_path", type=click.Path(dir_okay=False), default=None,
              help="control socket [default: SOCKET.ctl]")
@click.option("--disk", type=click.Path(dir_okay=False), default=None,
              help="sparse backing file, created if missing; its data outlives the process [default: in memory]")
@click.option("--size", type=_Size(), default="64M", show_default=True, help="bytes per namespace")
@click.option("--namespaces", type=click.IntRange(1, 1024), default=1, show_default=True)
@click.option("--block-size", type=click.Choice([str(b) for b in BLOCK_SIZES]), default="512", show_default=True)
@click.option("--reset-method", type=click.Choice(RESET_METHODS), default="none", show_default=True)
@click.option("--timing", type=click.Choice(sorted(TIMINGS)), default="natural", show_default=True,
              help="preset of the modelled costs below (realistic: enable 100, disable 20, FLR 100, admin 1 ms)")
@click.option("--enable-ms", type=FloatRange(0), default=None, help="CC.EN 0->1 until CSTS.RDY")
@click.option("--disable-ms", type=FloatRange(0), default=None, help="CC.EN 1->0 until CSTS.RDY=0")
@click.option("--flr-ms", type=FloatRange(0), default=None, help="function-level reset")
@click.option("--admin-ms", type=FloatRange(0), default=None, help="latency of each admin command")
@click.option("--msix", type=click.IntRange(1, 2048), default=16, show_default=True, help="MSI-X vectors")
@click.option("--max-io-queues", type=click.IntRange(1, 1024), default=16, show_default=True)
@click.option("--pci-id", default=None, help="device name for logs [default: socket file name]")
@click.option("--run-dir", type=click.Path(file_okay=False), default=None, help="log to DIR/device-<name>.log")
def nvme_device_command(socket_path, control_path, disk, size, namespaces, block_size, reset_method, timing,
                        enable_ms, disable_ms, flr_ms, admin_ms, msix, max_io_queues, pci_id, run_dir) -> None:
    """Serve an NVMe controller emulator over vfio-user."""
    name = pci_id or Path(socket_path).stem
    vlog.setup(f"device-{name}", run_dir)
    timing_params = make_timing(timing, enable_ms=enable_ms, disable_ms=disable_ms, flr_ms=flr_ms,
                                admin_ms=admin_ms)
    try:
        backing = Disk(disk, namespaces * size)
    except OSError as e:
        raise click.ClickException(f"cannot open disk {disk}: {e}") from None
    device = NvmeVfioDevice(reset_method, msix_count=msix, max_io_queues=max_io_queues, timing=timing_params,
                            name=name, namespaces=make_namespaces(backing, namespaces, size, int(block_size)))
    try:
        server = VfioUserServer(socket_path, device, control_path=control_path)
    except SocketPathError as e:
        raise click.ClickException(str(e)) from None
    serve_until_stopped(server, device, log, "NVMe device", name, socket=socket_path, disk=disk or "(memory)",
                        namespaces=namespaces, size=size, block_size=block_size, reset_method=reset_method,
                        timing=timing_params.to_dict(), msix=msix)


def start_nvme_device(socket_path: str | os.PathLike, *args: str, control_path: str | os.PathLike | None = None,
                      timeout: float = READY_TIMEOUT_S, **popen_kwargs) -> subprocess.Popen:
    """Run `vfkeep nvme-device --socket PATH [--control PATH] ARGS...` as a child; return when it answers."""
    return start_device_process("nvme-device", socket_path, args, control_path, timeout, "nvme device", **popen_kwargs)


__all__ = ["nvme_device_command", "start_nvme_device", "parse_size"]
