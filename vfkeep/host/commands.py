"""Host-side CLI commands (DESIGN §10): run, service, inspect, stop, state decode."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator

import click
from rich.console import Console

from .. import log as vlog
from .. import rpc
from ..device.timing import timing_from, timing_options
from ..log import kv
from . import control, render
from .decode import UndecodableState, decode_file
from .tamper import TAMPER_MODES

log = logging.getLogger("vfkeep.host")


def default_run_dir() -> str:
    return os.environ.get("VFKEEP_RUN_DIR") or os.path.join(tempfile.gettempdir(), f"vfkeep-{os.getuid()}")


def _env_pairs(pairs: tuple[str, ...], option: str) -> dict[str, str]:
    env = {}
    for p in pairs:
        key, sep, value = p.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=VAL, got {p!r}", param_hint=option)
        env[key] = value
    return env


run_dir_option = click.option("--run-dir", default=default_run_dir, show_default="$VFKEEP_RUN_DIR or /tmp/vfkeep-UID",
                              type=click.Path(file_okay=False), help="directory of the host's sockets, logs, state")


@click.command("run")
@run_dir_option
@click.option("--detach", is_flag=True, help="no console; serve until `vfkeep stop`")
@click.option("--nics", type=click.IntRange(0, 64), default=1, show_default=True)
@click.option("--backend", default="loopback", show_default=True, help="loopback | udp:HOST:PORT | tap:NAME")
@click.option("--pool-pages", type=click.IntRange(0), default=None,
              help="private pool pages (default: OPENHCL_ENABLE_VTL2_GPA_POOL / ..._CONFIG, else 512)")
@timing_options("realistic")
@click.option("--prelaunch/--no-prelaunch", default=True, show_default=True,
              help="start the next worker before the save request (start-up outside the blackout)")
@click.option("--ring-slots", type=click.IntRange(1, 1 << 20), default=4096, show_default=True,
              help="depth of each guest channel ring (power of two): frames buffered during a servicing")
@click.option("--worker-cmd", metavar="CMD", help="worker command (default: this vfkeep's `worker`)")
@click.option("--worker-env", multiple=True, metavar="KEY=VAL", help="extra environment for every worker")
@click.option("--datapath-keepalive", is_flag=True,
              help="workers keep the vport queues and buffers across MANA keepalive (VFKEEP_DATAPATH_KEEPALIVE=1; "
                   "default pool +160 pages per NIC)")
@click.option("--guest", type=click.Choice(["agent", "netns"]), default="agent", show_default=True,
              help="agent: traffic agents on request; netns: per NIC a network namespace with a TAP (the NIC's "
                   "MAC, 198.18.N.2) whose peer 198.18.N.1 sits behind the device's TAP; needs root")
def run_command(run_dir, detach, nics, backend, pool_pages, timing, hwc_latency_ms, flr_ms, prelaunch, ring_slots,
                worker_cmd, worker_env, datapath_keepalive, guest):
    """Start the VM: guest memory, device processes, rings, worker; console unless --detach."""
    from .. import netns
    from .console import HostConsole
    from .traffic import TrafficError
    from .vmm import Host, HostConfig, HostError

    if guest == "netns" and (reason := netns.unavailable_reason()):
        raise click.ClickException(reason)
    run_dir = os.path.abspath(run_dir)
    os.makedirs(run_dir, exist_ok=True)
    vlog.setup("host", run_dir)
    config = HostConfig(run_dir=run_dir, nics=nics, backend=backend, pool_pages=pool_pages,
                        timing=timing_from(timing, hwc_latency_ms, flr_ms),
                        prelaunch=prelaunch, ring_slots=ring_slots, worker_cmd=worker_cmd,
                        worker_env=_env_pairs(worker_env, "--worker-env"), datapath_keepalive=datapath_keepalive,
                        guest=guest)
    stop = threading.Event()

    def on_stop() -> dict:
        stop.set()
        if not detach:  # wake the console out of input()
            os.kill(os.getpid(), signal.SIGINT)
        return {"stopping": True, "host_pid": os.getpid()}

    def on_signal(signum, frame):
        stop.set()
        if not detach:
            raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    if detach:
        signal.signal(signal.SIGINT, on_signal)
    host = Host(config)
    server = None
    try:
        server = control.serve(run_dir, {
            "service": host.service, "inspect": host.inspect, "status": host.status, "probe": host.probe,
            "traffic": host.traffic, "exec": host.exec, "stop": on_stop}, refused=(HostError, TrafficError))
        try:
            host.start()
        except Exception as e:  # noqa: BLE001 - e.g. WorkerFailed, HostError; start() has ended every child
            raise click.ClickException(f"boot failed: {e} (logs in {run_dir})") from None
        server.start()
        click.echo(f"vfkeep host ready: pid {os.getpid()}, run dir {run_dir}", err=detach)
        kv(log, logging.INFO, "host ready", run_dir=run_dir, detach=detach)
        if detach:
            while not stop.is_set():
                stop.wait(1.0)
        else:
            HostConsole(host).cmdloop()
    except KeyboardInterrupt:  # Ctrl-C, SIGTERM or `vfkeep stop`: stop the VM
        kv(log, logging.INFO, "host interrupted, stopping")
    except control.HostRunning as e:
        raise click.ClickException(str(e)) from None
    finally:
        host.stop()
        if server is not None:
            server.close()


@contextlib.contextmanager
def host_client(run_dir: str, wait: float | None = None) -> Iterator[control.HostClient]:
    """The host in `run_dir` for one CLI command; its errors are the command's error message."""
    try:
        yield control.HostClient(run_dir, wait)
    except rpc.RpcError as e:
        raise click.ClickException(str(e)) from None


@click.command("service")
@run_dir_option
@click.option("--mana-keepalive", is_flag=True, help="host allows MANA keepalive for this servicing")
@click.option("--nvme-keepalive", "-n", is_flag=True, help="host allows NVMe keepalive for this servicing")
@click.option("--timeout", type=float, default=None, help="save timeout hint in seconds (default 60)")
@click.option("--json", "as_json", is_flag=True, help="print the servicing result as JSON")
@click.option("--test-config", metavar="HOOK", help="VFKEEP_TEST_CONFIG for the current worker's save "
              "(SERVICING_SAVE_FAIL|SERVICING_SAVE_STUCK|SERVICING_SAVE_CRASH)")
@click.option("--next-env", multiple=True, metavar="KEY=VAL", help="environment of the next worker only")
@click.option("--next-worker-cmd", metavar="CMD", help="command of the next worker only")
@click.option("--nics", "nic_list", metavar="I,J,...", help="NICs configured in the next worker (default: same)")
@click.option("--tamper", type=click.Choice(TAMPER_MODES), help="test hook: damage the state handed over")
def service_command(run_dir, mana_keepalive, nvme_keepalive, timeout, as_json, test_config, next_env,
                    next_worker_cmd, nic_list, tamper):
    """Service the paravisor of the host in --run-dir and print the servicing result."""
    nics = None
    if nic_list is not None:
        try:
            nics = [int(x) for x in nic_list.split(",") if x.strip()]
        except ValueError:
            raise click.BadParameter(f"expected comma-separated NIC indexes, got {nic_list!r}",
                                     param_hint="--nics") from None
    with host_client(run_dir) as host:
        result = host.service(mana_keepalive=mana_keepalive, nvme_keepalive=nvme_keepalive, timeout=timeout,
                              test_config=test_config, next_env=_env_pairs(next_env, "--next-env"),
                              next_worker_cmd=next_worker_cmd, nics=nics, tamper=tamper)
    if as_json:
        click.echo(json.dumps(result))
    else:
        render.print_servicing(result, Console())
    sys.exit(0 if result["ok"] else 1)


@click.command("inspect")
@run_dir_option
@click.argument("path", required=False)
@click.option("--json", "as_json", is_flag=True)
def inspect_command(run_dir, path, as_json):
    """Live tree of the host, worker, devices and last servicing (PATH selects a sub-tree)."""
    with host_client(run_dir, wait=60) as host:
        data = host.inspect(path)
    if as_json:
        click.echo(json.dumps(data))
    elif isinstance(data, (dict, list)):
        Console().print(render.tree(data, path or "vfkeep"))
    else:
        click.echo(data)


@click.command("exec", context_settings={"ignore_unknown_options": True})
@run_dir_option
@click.option("--timeout", type=float, default=30.0, show_default=True, help="seconds before the command is ended")
@click.argument("nic", type=int)
@click.argument("argv", nargs=-1, required=True, type=click.UNPROCESSED)
def exec_command(run_dir, timeout, nic, argv):
    """Run a command in guest NIC's network namespace (`vfkeep run --guest netns`), e.g. `exec 0 ping -c 3 198.18.0.1`."""
    with host_client(run_dir, wait=timeout + 10) as host:
        r = host.exec(nic, list(argv), timeout)
    sys.stdout.write(r["stdout"])
    sys.stderr.write(r["stderr"])
    if r["timed_out"]:
        click.echo(f"ended after {timeout} s", err=True)
    sys.exit(r["returncode"] if r["returncode"] is not None and r["returncode"] >= 0 else 1)


@click.command("stop")
@run_dir_option
@click.option("--timeout", type=float, default=60.0, show_default=True, help="seconds to wait for the host to exit")
def stop_command(run_dir, timeout):
    """Stop the host in --run-dir (NICs shut down, every child ended) and wait for it to exit."""
    with host_client(run_dir, wait=30) as host:
        pid = host.stop()["host_pid"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _running(pid):
            return
        time.sleep(0.05)
    raise click.ClickException(f"host pid {pid} still running after {timeout} s")


def _running(pid: int) -> bool:
    """True while `pid` exists and is not a zombie (the host may be the caller's unreaped child)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


@click.group("state")
def state_group():
    """Saved servicing state."""


@state_group.command("decode")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--json", "as_json", is_flag=True)
def decode_command(file, as_json):
    """Pretty-print a ServicingState blob (the host keeps the last one as <run-dir>/servicing_state.bin)."""
    try:
        data = decode_file(file)
    except UndecodableState as e:
        raise click.ClickException(str(e)) from None
    if as_json:
        click.echo(json.dumps(data))
    else:
        Console().print(render.tree(data, os.path.basename(file)))
