"""The host commands, defined once for the CLI and the console.

`service`, `inspect`, `status`, `probe`, `traffic`, `disk`, `exec` and `stop` are click commands. `vfkeep CMD
--run-dir DIR ...` runs them against the host in DIR over its control socket (`RemoteTarget`); the host's
console runs the very same command objects against its own `Host` (`LocalTarget`, passed as the click
context object). So names, options, defaults, help and output are the same by construction; only
`--run-dir` means nothing in the console (it is that host's). Every command takes `--json`, errors included
(`{"ok": false, "error": {"type", "message"}}` on stdout), and `--run-dir` before or after a subcommand.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import shlex
import signal
import sys
import time
from typing import Any

import click

from ..cli import FloatRange, WholeSummaries
from .. import kill_points, rpc
from ..proc import signals_interrupt, stopped_line
from ..save_hooks import SAVE_TEST_CONFIGS
from . import control, render
from .commands import (HOST_STOPPED_BY, LOG_NAME, _env_pairs, _is_host, _nonempty_run_dir, _pidfile_pid, _running,
                       default_run_dir, no_host, parse_nic_list, remove_dead_hosts_leftovers)
from .tamper import TAMPER_MODES
from .traffic import DEFAULT_RATE, DEFAULT_SIZE

#: The commands both the CLI and the console have (the console adds `help` and `quit`).
HOST_COMMANDS = ("service", "inspect", "status", "probe", "traffic", "disk", "exec", "stop")
#: `vfkeep service --require-keepalive` when a NIC or NVMe controller did not take the keepalive path.
EXIT_NO_KEEPALIVE = 3
#: What `traffic stats|stop` and `disk stats|stop` say when no agent runs yet (rather than an empty table).
NO_TRAFFIC = "no traffic agent running; start traffic first (`vfkeep traffic start`)"
#: How long `traffic stats` / `disk stats` wait for the host: its agents answer within 30 s each, plus the settle
#: (at most 60 s); `disk stats --verify` first waits this long for the read-back.
STATS_WAIT_S = 120.0
VERIFY_WAIT_S = 180.0
NO_DISK_IO = "no disk agent running; start disk IO first (`vfkeep disk start`)"


class CommandError(click.ClickException):
    """A command's failure; `kind` is the error type shown under --json (an rpc error type, or Usage)."""

    def __init__(self, message: str, kind: str = "Error", exit_code: int = 1, reason: str | None = None):
        super().__init__(message)
        self.kind = kind
        self.exit_code = exit_code
        self.reason = message if reason is None else reason  # the host's own words (no log named)


# -- targets ---------------------------------------------------------------------------------------------
class RemoteTarget:
    """The host in `run_dir`, over its control socket; errors name the host's log."""

    def __init__(self, run_dir: str):
        self.run_dir = os.path.abspath(run_dir)
        self.log = os.path.join(self.run_dir, LOG_NAME)

    def call(self, method: str, *args, wait: float | None = None, **kwargs) -> Any:
        client = control.HostClient(self.run_dir, wait, patience=self._not_stopped)
        try:
            return getattr(client, method)(*args, **kwargs)
        except rpc.Timeout as e:  # it took the request: a host, busy or hung (not "is a host running?")
            raise CommandError(f"the host did not answer: {e} (host log: {self.log})", e.type) from None
        except control.HostGone as e:  # (not "is a host running?": it was, and its log may say why it went)
            raise CommandError(f"{e} (it stopped or died; host log: {self.log})", e.type) from None
        except rpc.Unavailable as e:
            raise CommandError(no_host(self.run_dir, e), e.type) from None
        except rpc.RpcError as e:  # the host says "METHOD: why"; the failure line names the command already
            why = str(e).removeprefix(method + ': ')
            raise CommandError(f"{why} (host log: {self.log})", e.type, reason=why) from None


    def _not_stopped(self) -> None:
        """While an answer is awaited: a host stopped by SIGSTOP (Ctrl-Z in its console's terminal) answers nothing
        until it is continued, so say so (`status` waited 30 s for it, `service` for ever)."""
        pid = _pidfile_pid(self.run_dir)
        if pid is not None and (line := stopped_line(f"host pid {pid}", pid, HOST_STOPPED_BY)):
            raise CommandError(f"{line} (host log: {self.log})", "Stopped")


class LocalTarget:
    """The console's own host: the same calls, in process; its refusals are the command's errors. `out`: the
    console's output, where the commands print."""

    def __init__(self, host, out=None):
        self.host = host
        self.run_dir = host.run_dir
        self.out = out

    def call(self, method: str, *args, wait: float | None = None, **kwargs) -> Any:
        from .disks import DiskError
        from .traffic import TrafficError
        from .vmm import HostError
        if method == "stop":
            raise ConsoleStop()
        try:
            return getattr(self.host, method)(*args, **kwargs)
        except (HostError, TrafficError, DiskError, ValueError, TypeError) as e:
            raise CommandError(f"{method}: {e}", "Refused", reason=str(e)) from None


class ConsoleStop(Exception):
    """`stop` typed in the console: the console stops the VM (as `quit`)."""


def _console(ctx: click.Context):
    """Where a command prints: the console's output in the console, stdout otherwise."""
    local = ctx.find_object(LocalTarget)
    return local.out if local is not None and local.out is not None else render.stdout()


def _echo(ctx: click.Context, text: str, err: bool = False) -> None:
    local = ctx.find_object(LocalTarget)
    if local is not None and local.out is not None:
        local.out.file.write(text + "\n")
    else:
        click.echo(text, err=err)


def _target(ctx: click.Context, run_dir: str | None):
    local = ctx.find_object(LocalTarget)
    if local is not None:
        return local
    return RemoteTarget(run_dir or ctx.meta.get("vfkeep.run_dir") or default_run_dir())


class UpperChoice(click.Choice):
    """Case-insensitive choice whose error lists the values as the help and README write them (upper case)."""

    def __init__(self, choices):
        super().__init__(choices, case_sensitive=False)

    def get_invalid_choice_message(self, value, ctx) -> str:
        return f"{value!r} is not one of {', '.join(self.choices)}"


# -- shared options ---------------------------------------------------------------------------------------
def target_run_dir_option(help: str = "the host's run directory"):
    """The `--run-dir` of every command run against a host (unset: `_target` picks; empty: refused)."""
    return click.option("--run-dir", type=click.Path(file_okay=False), default=None, callback=_nonempty_run_dir,
                        help=help)


def host_command(name: str, **settings):
    """A host command: `--run-dir` and `--json` added, errors printed as JSON under --json."""
    def decorate(fn):
        @functools.wraps(fn)
        def run(*args, as_json: bool, **kwargs):
            try:
                return fn(*args, as_json=as_json, **kwargs)
            except click.ClickException as e:
                if not as_json:
                    raise
                json_error(e)

        run = click.option("--json", "as_json", is_flag=True, help="machine-readable output (errors too)")(run)
        run = target_run_dir_option("the host's run directory [default: $VFKEEP_RUN_DIR or /tmp/vfkeep-UID; "
                                    "the console's own host there]")(run)
        return click.command(name, **settings)(click.pass_context(run))
    return decorate


def json_error(e: click.ClickException) -> None:
    """A ClickException as the JSON error object on stdout, then its exit status."""
    kind = getattr(e, "kind", None) or ("Usage" if isinstance(e, click.UsageError) else "Error")
    click.echo(json.dumps({"ok": False, "error": {"type": kind, "message": e.format_message()}}))
    sys.exit(e.exit_code)


@contextlib.contextmanager
def _waiting(ctx: click.Context, as_json: bool, text: str):
    """A spinner on stderr while a request that may take seconds runs (an overloaded agent took 5-16 s to
    answer `traffic stats`, with nothing shown). Only on a terminal: nothing with --json, piped or in the console."""
    if as_json or ctx.find_object(LocalTarget) is not None or render.no_terminal(sys.stderr):
        yield
        return
    from rich.console import Console
    err = Console(stderr=True)
    with err.status(text) if err.is_terminal else contextlib.nullcontext():
        yield


def _print_json(ctx: click.Context, data: Any) -> None:
    _echo(ctx, json.dumps(data))


# -- commands ---------------------------------------------------------------------------------------------
@host_command("service")
@click.option("--mana-keepalive", is_flag=True, help="host allows MANA keepalive for this servicing")
@click.option("--nvme-keepalive", "-n", is_flag=True, help="host allows NVMe keepalive for this servicing")
@click.option("--timeout", type=FloatRange(min=0, min_open=True), default=None, metavar="SEC",
              help="the worker must have saved, and the next one restored, within SEC seconds each (the next "
                   "worker's start-up has 60 s whatever SEC; a replacement without state then gets the default) "
                   "[default: 60]")
@click.option("--test-config", type=UpperChoice(SAVE_TEST_CONFIGS), metavar="HOOK",
              help="test hook for the current worker's save: " + "|".join(SAVE_TEST_CONFIGS))
@click.option("--next-env", multiple=True, metavar="KEY=VAL", help="environment of the next worker only")
@click.option("--next-worker-cmd", metavar="CMD", help="command of the next worker only")
@click.option("--nics", "nic_list", metavar="I,J,...", help="NICs configured in the next worker [default: same]")
@click.option("--tamper", type=click.Choice(TAMPER_MODES),
              help="test hook: damage the state handed over (RUN_DIR/servicing_state.bin is then the damaged blob "
                   "the next worker got, servicing_state.untampered.bin the current worker's save)")
@click.option("--kill-point", type=click.Choice(list(kill_points.POINTS)),
              help="test hook: the worker SIGKILLs itself at this point of its save (save.*: the current worker) "
                   "or restore (restore.*: the next worker)")
@click.option("--require-keepalive", is_flag=True,
              help=f"exit {EXIT_NO_KEEPALIVE} unless every configured NIC and NVMe controller took the keepalive path "
                   "(refused, exit 2, on a host with neither: nothing to keep alive)")
def service_command(ctx, run_dir, as_json, mana_keepalive, nvme_keepalive, timeout, test_config, next_env,
                    next_worker_cmd, nic_list, tamper, kill_point, require_keepalive):
    """Service the paravisor: save the worker, start the next one, restore; print the servicing result.

    Exit status: 0 ok or degraded, 1 failed, 2 bad usage, 3 keepalive required but not taken by every NIC and
    NVMe controller (--require-keepalive on a host with neither is bad usage: nothing to keep alive)."""
    nics = None if nic_list is None else parse_nic_list(nic_list)
    target = _target(ctx, run_dir)
    # Bad usage (exit 2) too, but only the host knows its devices: its NIC count, its NVMe controllers.
    status = target.call("status") if nics is not None or tamper or require_keepalive else {}
    if nics is not None and (bad := [i for i in nics if i >= status["nics"]]):
        has = f"{status['nics']} NIC(s), 0 to {status['nics'] - 1}" if status["nics"] else "no NICs"
        raise click.BadParameter(f"NIC {','.join(map(str, bad))} out of range: the host has {has}",
                                 param_hint="--nics")
    if tamper and tamper.startswith("nvme-") and not status["nvme_devices"]:
        raise click.BadParameter(f"{tamper} damages saved NVMe controllers; the host has none (`run --nvme N`)",
                                 param_hint="--tamper")
    if require_keepalive and not status["nics"] and not status["nvme_devices"]:  # (it exited 0: "all" of none)
        raise click.BadParameter("the host has no NIC and no NVMe controller: nothing to keep alive",
                                 param_hint="--require-keepalive")
    if ctx.find_object(LocalTarget) is None:
        signals_interrupt()
    try:
        result = target.call(
            "service", mana_keepalive=mana_keepalive, nvme_keepalive=nvme_keepalive, timeout=timeout,
            test_config=test_config and test_config.upper(), next_env=_env_pairs(next_env, "--next-env"),
            next_worker_cmd=next_worker_cmd, nics=nics, tamper=tamper, kill_point=kill_point)
    except KeyboardInterrupt as e:
        e.note = (f"the servicing carries on in the host (`vfkeep status --run-dir {shlex.quote(target.run_dir)}` shows "
                  "it; its result, once done: `inspect last_servicing`)")
        raise
    if as_json:
        _print_json(ctx, result)
    else:
        render.print_servicing(result, _console(ctx))
        if kill_point in kill_points.AFTER_RESULT:
            _echo(ctx, f"note: --kill-point {kill_point} kills the new worker after this result was returned: the "
                  "host replaces it as a worker that died outside servicing (host log); frames lost meanwhile are "
                  "in no servicing result")
    if result["status"] == "failed":
        if as_json:
            sys.exit(1)
        raise CommandError(f"servicing failed: {result['error']} (host log: {_log(target)})")
    if require_keepalive:  # (a device whose keepalive was not asked for took the fresh path: listed here)
        missed = [f"{n['pci_id']} ({n['restore_path']}: {n['reason']})" for n in [*result["nics"], *result.get("nvme", [])]
                  if n["restore_path"] != "keepalive"]
        if missed:
            _echo(ctx, "vfkeep: service: keepalive required but not taken: " + "; ".join(missed), err=True)
            sys.exit(EXIT_NO_KEEPALIVE)


@host_command("inspect")
@click.argument("path", required=False)
def inspect_command(ctx, run_dir, as_json, path):
    """Live tree of the host, worker, devices and last servicing; PATH selects a sub-tree (worker/nics/0).
    A PATH the tree does not have is bad usage (exit 2), its error listing what there is."""
    try:
        data = _target(ctx, run_dir).call("inspect", path, wait=60)
    except CommandError as e:  # (only the host knows its tree; it refuses a path it lacks: `path 'P': no ...`)
        if path and e.kind == "Refused" and e.reason.startswith(f"path {path!r}: "):
            raise click.BadParameter(e.reason.removeprefix("path "), param_hint="PATH") from None
        raise
    if as_json:
        _print_json(ctx, data)
    else:
        render.print_tree(data, path or "vfkeep", _console(ctx), path or "")


@host_command("status")
def status_command(ctx, run_dir, as_json):
    """Host, worker and device processes at a glance, and the servicing in progress (answers during one)."""
    data = _target(ctx, run_dir).call("status", wait=30)
    if as_json:
        _print_json(ctx, data)
    else:
        render.print_tree(data, "status", _console(ctx))


@host_command("probe")
@click.argument("nic", type=click.IntRange(0), default=0)
@click.argument("count", type=click.IntRange(1), default=8)
def probe_command(ctx, run_dir, as_json, nic, count):
    """Push COUNT test frames into NIC's guest tx ring and wait for them on its rx ring (loopback backend)."""
    target = _target(ctx, run_dir)
    status = target.call("status")  # out of range is bad usage (exit 2); only the host knows its NICs and rings
    if nic >= status["nics"]:
        raise click.BadParameter(f"NIC {nic} out of range: the host has {status['nics']} NIC(s)", param_hint="NIC")
    if count > status["ring_slots"]:
        raise click.BadParameter(f"{count} frames do not fit the {status['ring_slots']}-slot ring",
                                 param_hint="COUNT")
    r = target.call("probe", nic, count, wait=60)
    if as_json:
        _print_json(ctx, r)
        if not r["ok"]:
            sys.exit(1)
        return
    _echo(ctx, f"nic {r['nic']}: {r['received']}/{r['sent']} frames came back")
    if not r["ok"]:
        where = os.path.join(target.run_dir, "")
        raise CommandError(f"nic {r['nic']}: {r['sent'] - r['received']} of {r['sent']} frames did not come back "
                           f"(logs: {where}worker-*.log, {where}device-nic{r['nic']}.log)")


@click.group("traffic", cls=WholeSummaries)
@target_run_dir_option("the host's run directory (also accepted after the subcommand)")
@click.pass_context
def traffic_group(ctx, run_dir):
    """Guest traffic on a running host: one agent per NIC sends paced frames and measures what comes back."""
    if run_dir is not None:
        ctx.meta["vfkeep.run_dir"] = run_dir


nic_option = click.option("--nic", type=click.IntRange(0), default=None, help="only this NIC [default: all]")


@traffic_group.command("start")
@click.option("--rate", type=FloatRange(min=1, max=1_000_000), default=DEFAULT_RATE, show_default=True,
              help="frames per second per NIC")
@click.option("--size", type=click.IntRange(60, 2044), default=DEFAULT_SIZE, show_default=True,
              help="frame size in bytes")
@click.option("--backpressure", is_flag=True,
              help="a blocking guest sender: frames wait in a 1000-frame guest queue while the tx ring is full "
                   "and the sender blocks while that is full too (delayed, not lost) [default: the full ring "
                   "refuses frames, counted lost]")
@nic_option
@click.option("--json", "as_json", is_flag=True, help="machine-readable output (errors too)")
@target_run_dir_option()
@click.pass_context
def traffic_start(ctx, rate, size, backpressure, nic, as_json, run_dir):
    """Start (or re-pace) traffic; starts the NIC's agent on first use."""
    target = _target(ctx, run_dir)
    result = _request(as_json, target, nic, lambda: target.call("traffic", "start", rate=rate, size=size, nic=nic,
                                                                backpressure=backpressure, wait=60))
    if as_json:
        return _print_json(ctx, result)
    for n in result["nics"]:
        again = f"; re-paced: it was running at {n['previous_rate']:g} frames/s" if n.get("previous_rate") else ""
        _echo(ctx, f"nic {n['nic']}: {n['rate']:g} frames/s of {n['size']} bytes (agent pid {n['pid']}){again}")


@traffic_group.command("stop")
@nic_option
@click.option("--json", "as_json", is_flag=True, help="machine-readable output (errors too)")
@target_run_dir_option()
@click.pass_context
def traffic_stop(ctx, nic, as_json, run_dir):
    """Stop sending (agents keep running, and keep their records, until the host stops)."""
    target = _target(ctx, run_dir)
    result = _request(as_json, target, nic, lambda: target.call("traffic", "stop", nic=nic, wait=60))
    if as_json:
        return _print_json(ctx, result)
    if not result["nics"]:
        return _echo(ctx, NO_TRAFFIC)
    for n in result["nics"]:
        _echo(ctx, f"nic {n['nic']}: stopped after {n['sent']} frames")


@traffic_group.command("stats")
@nic_option
@click.option("--settle-ms", type=FloatRange(0, 60_000), default=None,
              help="wait up to this long for frames still in flight [default: 10 x the NIC's measured RTT p99, "
                   "100-2000 ms; the wait ends as soon as every frame came back]")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output (errors too)")
@target_run_dir_option()
@click.pass_context
def traffic_stats(ctx, nic, settle_ms, as_json, run_dir):
    """Delivery since the last start, per NIC, and what the last servicing cost the guest."""
    target = _target(ctx, run_dir)
    with _waiting(ctx, as_json, f"traffic stats: waiting for the agents' counts (at most {STATS_WAIT_S:g} s)"):
        result = _request(as_json, target, nic, lambda: target.call("traffic", "stats", nic=nic, settle_ms=settle_ms,
                                                                    wait=STATS_WAIT_S))
    if as_json:
        return _print_json(ctx, result)
    if not result["nics"]:
        return _echo(ctx, NO_TRAFFIC)
    c = _console(ctx)
    render.print_stats(result["nics"], "traffic since the last start", c)
    if result["last_servicing"]:
        render.print_stats(result["last_servicing"], "last servicing window", c)


@click.group("disk", cls=WholeSummaries)
@target_run_dir_option("the host's run directory (also accepted after the subcommand)")
@click.pass_context
def disk_group(ctx, run_dir):
    """Guest disk IO on a running host (`vfkeep run --nvme N`): one agent per NVMe disk issues verifiable reads
    and writes and measures IOPS, latency and the IO blackout."""
    if run_dir is not None:
        ctx.meta["vfkeep.run_dir"] = run_dir


disk_option = click.option("--disk", type=click.IntRange(0), default=None, help="only this disk [default: all]")


@disk_group.command("start")
@click.option("--rate", type=FloatRange(min=0, max=1_000_000), default=0, show_default=True,
              help="requests per second per disk (0: as fast as the queue depth allows)")
@click.option("--qd", type=click.IntRange(1, 64), default=8, show_default=True, help="requests in flight per disk")
@click.option("--read-pct", type=click.IntRange(0, 100), default=50, show_default=True,
              help="share of reads (of chunks already written)")
@disk_option
@click.option("--json", "as_json", is_flag=True, help="machine-readable output (errors too)")
@target_run_dir_option()
@click.pass_context
def disk_start(ctx, rate, qd, read_pct, disk, as_json, run_dir):
    """Start (or re-pace) disk IO; starts the disk's agent on first use."""
    target = _target(ctx, run_dir)
    result = _request(as_json, target, disk, lambda: target.call("disk", "start", rate=rate, qd=qd,
                                                                 read_pct=read_pct, disk=disk, wait=60), "disk")
    if as_json:
        return _print_json(ctx, result)
    for d in result["disks"]:
        pace = f"{d['rate']:g} requests/s" if d["rate"] else "as fast as it goes"
        _echo(ctx, f"disk {d['disk']}: {pace} at queue depth {d['qd']}, {d['read_pct']}% reads (agent pid {d['pid']})")


@disk_group.command("stop")
@disk_option
@click.option("--json", "as_json", is_flag=True, help="machine-readable output (errors too)")
@target_run_dir_option()
@click.pass_context
def disk_stop(ctx, disk, as_json, run_dir):
    """Stop submitting (requests in flight still complete; agents keep their records until the host stops)."""
    target = _target(ctx, run_dir)
    result = _request(as_json, target, disk, lambda: target.call("disk", "stop", disk=disk, wait=60), "disk")
    if as_json:
        return _print_json(ctx, result)
    if not result["disks"]:
        return _echo(ctx, NO_DISK_IO)
    for d in result["disks"]:
        _echo(ctx, f"disk {d['disk']}: stopped after {d['submitted']} requests")


@disk_group.command("stats")
@disk_option
@click.option("--verify", is_flag=True, help="stop IO first and read back every block written (each must hold its "
              "LBA and last generation)")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output (errors too)")
@target_run_dir_option()
@click.pass_context
def disk_stats(ctx, disk, verify, as_json, run_dir):
    """IO per disk since its agent started, and what the last servicing cost the guest's disks."""
    target = _target(ctx, run_dir)

    def get():
        checked = target.call("disk", "verify", disk=disk, wait=VERIFY_WAIT_S)["disks"] if verify else None
        stats = target.call("disk", "stats", disk=disk, wait=STATS_WAIT_S)
        if checked is not None:  # what the read-back found (its stats are in `disks`)
            stats["verify"] = [{k: v for k, v in d.items() if k != "stats"} for d in checked]
        return stats

    what = "read-back and counts" if verify else "counts"
    with _waiting(ctx, as_json, f"disk stats: waiting for the agents' {what} (at most "
                  f"{STATS_WAIT_S + (VERIFY_WAIT_S if verify else 0):g} s)"):
        result = _request(as_json, target, disk, get, "disk")
    failed = [d for d in result["disks"] if d["errors"] or d["verify_errors"] or d["duplicates"]]
    if as_json:
        _print_json(ctx, result)
        if failed:
            sys.exit(1)
        return
    if not result["disks"]:
        return _echo(ctx, NO_DISK_IO)
    c = _console(ctx)
    render.print_disk_stats(result["disks"], "disk IO since the agent started", c)
    if result["last_servicing"]:
        render.print_disk_stats(result["last_servicing"], "last servicing window", c)
    for v in result.get("verify") or []:
        _echo(ctx, render.verify_line(v))
    if failed:
        raise CommandError("; ".join(_disk_failure(target, d) for d in failed))


def _disk_failure(target, d: dict) -> str:
    agent_log = os.path.join(target.run_dir, f"disk-agent-{d['disk']}.log")
    return (f"disk {d['disk']}: {d['verify_errors']} bad blocks, {d['errors']} IO errors, {d['duplicates']} "
            f"duplicate completions (see {agent_log})")


def _log(target) -> str:
    return os.path.join(target.run_dir, LOG_NAME)


def _request(as_json: bool, target, index: int | None, fn, what: str = "NIC"):
    """fn() (a traffic or disk request for `index`, or every one: None), its errors JSON under --json. A NIC or
    disk the host does not have is bad usage (exit 2), as for probe and `service --nics`; only the host knows
    how many it has, so it is asked only once it refused the request (no round trip when it succeeds; a host
    without disks refuses disk commands itself, saying how to get some)."""
    try:
        try:
            return fn()
        except CommandError as e:
            if index is None or e.kind != "Refused":
                raise
            status = target.call("status")
            count = status["nics"] if what == "NIC" else len(status["nvme_devices"])
            if index >= count and (count or what == "NIC"):
                raise click.BadParameter(f"{what} {index} out of range: the host has {count} {what}(s)",
                                         param_hint=f"--{what.lower()}") from None
            raise
    except click.ClickException as e:
        if not as_json:
            raise
        json_error(e)


@host_command("exec", context_settings={"ignore_unknown_options": True})
@click.option("--timeout", type=FloatRange(min=0, min_open=True), default=30.0, show_default=True,
              metavar="SEC", help="the command is ended after SEC seconds")
@click.argument("nic", type=click.IntRange(0))
@click.argument("argv", nargs=-1, required=True, type=click.UNPROCESSED)
def exec_command(ctx, run_dir, as_json, timeout, nic, argv):
    """Run a command in guest NIC's network namespace (`vfkeep run --guest netns`); its output is shown when
    it ends. For example `exec 0 ping -c 3 198.18.0.1`."""
    r = _target(ctx, run_dir).call("exec", nic, list(argv), timeout, wait=timeout + 10)
    if as_json:
        _print_json(ctx, r)
    else:
        out = _console(ctx)
        out.file.write(r["stdout"])
        out.file.flush()
        if r["stderr"]:
            _echo(ctx, r["stderr"].rstrip("\n"), err=True)
        if r["timed_out"]:
            raise CommandError(f"{' '.join(argv)!r} was ended after {timeout:g} s", "Timeout")
    code = r["returncode"]
    if r["timed_out"] or code:
        sys.exit(code if code is not None and code > 0 else 1)


@host_command("stop")
@click.option("--timeout", type=FloatRange(min=0, min_open=True), default=60.0, show_default=True,
              metavar="SEC", help="wait SEC seconds for the host to exit")
def stop_command(ctx, run_dir, as_json, timeout):
    """Stop the host (its worker shuts its NICs down, every child ends) and wait for it to exit; says what the
    stop did (which NICs were shut down, or why none was). With no host running it says so and exits 0. In the
    console: stop this VM, as `quit`."""
    target = _target(ctx, run_dir)
    run_dir = target.run_dir
    outcome = _StopOutcome(run_dir, target)
    try:
        reply = target.call("stop", wait=30)
    except CommandError as e:
        if e.kind not in ("Unavailable", "Timeout", "Stopped"):
            raise  # (the reader thread, a daemon, goes with this process)
        pid = _pidfile_pid(run_dir)
        if pid is None or not _is_host(pid):
            # a SIGKILLed host's leftovers: what the next `run` would remove
            removed = remove_dead_hosts_leftovers(run_dir, "stop") if os.path.isdir(run_dir) else None
            note = f"no host running; {removed}" if removed else "no host running; nothing to stop"
            out = {"stopped": None, "run_dir": run_dir, "note": note, "removed": removed}
            _echo(ctx, json.dumps(out) if as_json else
                  f"no host running in {run_dir}; {removed or 'nothing to stop'}")
            return
        if e.kind == "Stopped":
            os.kill(pid, signal.SIGCONT)  # (first: proc.end says why; then it takes the SIGTERM, the same orderly stop)
            outcome.subscribe()  # (it answers again: what its stop does is still worth hearing)
        os.kill(pid, signal.SIGTERM)  # alive but not answering (e.g. still booting, or stopped by SIGSTOP)
        reply = {"host_pid": pid, "servicing_phase": None}
    pid = reply["host_pid"]
    deadline = time.monotonic() + timeout
    try:  # (the host was asked to stop: an interrupt even while the next line is written says so)
        if reply.get("servicing_phase") and not as_json:
            _echo(ctx, f"host pid {pid}: a servicing is in progress (phase {reply['servicing_phase']}); it stops "
                       "once the servicing reaches a safe point")
        while _running(pid):
            if time.monotonic() > deadline:
                raise CommandError(f"host pid {pid} still running after {timeout:g} s (see {run_dir}/{LOG_NAME})")
            time.sleep(0.05)
    except KeyboardInterrupt as e:
        e.note = f"host pid {pid} was asked to stop and goes on stopping (log: {run_dir}/{LOG_NAME})"
        raise
    done = outcome.close()
    if as_json:
        _print_json(ctx, {"stopped": pid, "run_dir": run_dir, "servicing_phase": reply.get("servicing_phase"),
                          "outcome": done})
    elif done is None:  # (an old host, one still booting, or one that died meanwhile: it said nothing)
        _echo(ctx, f"stopped host pid {pid} in {run_dir}; it did not report what its stop did (host log: "
                   f"{run_dir}/{LOG_NAME})")
    else:
        _echo(ctx, f"stopped host pid {pid} in {run_dir}: {done['summary']}"
                   + ("; every device and agent ended" if done["worker"] != "unknown" else ""))


class _StopOutcome:
    """What a stopping host says its stop did: its host_stopped event (`Host.stop_outcome`), read from an event
    subscription taken before the stop is asked for (`vfkeep stop` printed "NICs shut down" whatever happened:
    with no NIC, a worker that had died, or one whose saved state the stop abandoned)."""

    def __init__(self, run_dir: str, target):
        self.run_dir = run_dir
        self.target = target
        self.outcome: dict | None = None
        self._reader: Any = None
        self._client: Any = None
        if isinstance(target, RemoteTarget):
            self.subscribe()

    def subscribe(self) -> None:
        import threading
        try:
            stream = control.HostClient(self.run_dir, wait=5.0, patience=self.target._not_stopped).events()
        except (rpc.RpcError, CommandError):  # no host, one not answering or stopped: the stop says why
            return
        self._stream = stream
        self._reader = threading.Thread(target=self._read, name="stop-outcome", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        try:
            for event in self._stream:
                if event["event"] == "host_stopped":
                    self.outcome = event["data"]
        except (rpc.RpcError, OSError, ValueError):
            pass  # (the stream broke: the host died; nothing was said)

    def close(self) -> dict | None:
        """The outcome, once the stream ended (called once the host exited: its end closed the stream)."""
        if self._reader is not None:
            self._reader.join(10.0)
        return self.outcome


COMMAND_OBJECTS: dict[str, click.Command] = {
    "service": service_command, "inspect": inspect_command, "status": status_command, "probe": probe_command,
    "traffic": traffic_group, "disk": disk_group, "exec": exec_command, "stop": stop_command}
