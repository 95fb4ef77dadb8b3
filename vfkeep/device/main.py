"""`vfkeep device`: run one MANA emulator as a vfio-user server process until SIGTERM.

`start_device()` launches it as a child (tests, the host) and returns once
its control channel answers.
"""
from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path

import click

from vfkeep import log as vlog
from vfkeep.proc import READY_TIMEOUT_S
from vfkeep.vfio_user.control import start_device_process
from vfkeep.vfio_user.server import VfioUserServer, serve_until_stopped
from vfkeep.sockets import SocketPathError

from .backends import BackendError, parse_backend
from .core import RESET_METHODS
from .mac import DEFAULT_MAC, MAX_VPORTS
from .server import ManaVfioDevice
from .timing import timing_from, timing_options

log = logging.getLogger("vfkeep.device")


def parse_mac(text: str) -> bytes:
    digits = text.replace(":", "").replace("-", "")
    try:
        mac = bytes.fromhex(digits)
    except ValueError:
        mac = b""
    if len(mac) != 6:
        raise click.BadParameter(f"{text!r} is not a MAC address like 00:15:5d:12:12:12")
    return mac


@click.command("device")
@click.option("--socket", "socket_path", required=True, type=click.Path(dir_okay=False), help="vfio-user socket")
@click.option("--control", "control_path", type=click.Path(dir_okay=False), default=None,
              help="control socket [default: SOCKET.ctl]")
@click.option("--reset-method", type=click.Choice(RESET_METHODS), default="none", show_default=True)
@timing_options("natural")
@click.option("--backend", default="loopback", show_default=True, help="loopback | udp:HOST:PORT | tap:NAME[@NETNS]")
@click.option("--udp-listen", type=click.IntRange(0, 65535), default=0, show_default=True,
              help="local UDP port of the udp backend (0 = ephemeral, see `state`)")
@click.option("--vports", type=click.IntRange(1, MAX_VPORTS), default=1, show_default=True)
@click.option("--mac", default=DEFAULT_MAC.hex(":"), show_default=True, help="MAC of vport 0 (vport i: +i); `vfkeep run` gives NIC n 00:15:5d:12:12:12 + 16n")
@click.option("--pci-id", default=None, help="device name for logs [default: socket file name]")
@click.option("--run-dir", type=click.Path(file_okay=False), default=None, help="log to DIR/device-<name>.log")
def device_command(socket_path, control_path, reset_method, timing, hwc_latency_ms, flr_ms, backend, udp_listen,
                   vports, mac, pci_id, run_dir) -> None:
    """Serve a MANA (GDMA) VF emulator over vfio-user."""
    timing = timing_from(timing, hwc_latency_ms, flr_ms)
    name = pci_id or Path(socket_path).stem
    vlog.setup(f"device-{name}", run_dir)
    try:
        packet_backend = parse_backend(backend, udp_listen)
    except BackendError as e:
        raise click.BadParameter(str(e), param_hint="--backend") from None
    device = ManaVfioDevice(reset_method, vports=vports, mac=parse_mac(mac), backend=packet_backend,
                            timing=timing, name=name)
    try:
        server = VfioUserServer(socket_path, device, control_path=control_path)
    except (BackendError, SocketPathError) as e:
        raise click.ClickException(str(e)) from None
    serve_until_stopped(server, device, log, "MANA device", name, socket=socket_path, reset_method=reset_method,
                        timing=timing.to_dict(), backend=packet_backend.inspect(), vports=vports)


def start_device(socket_path: str | os.PathLike, *args: str, control_path: str | os.PathLike | None = None,
                 timeout: float = READY_TIMEOUT_S, **popen_kwargs) -> subprocess.Popen:
    """Run `vfkeep device --socket PATH [--control PATH] ARGS...` as a child; return when it answers."""
    return start_device_process("device", socket_path, args, control_path, timeout, "device", **popen_kwargs)


__all__ = ["device_command", "start_device", "parse_mac"]
