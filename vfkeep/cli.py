"""`vfkeep` command line (DESIGN §10). Subcommands live next to the code they drive."""
from __future__ import annotations

import importlib
import json
import math
import os
import signal
import sys

import click

from . import __version__

# name -> "module:attribute" of a click command; imported lazily so `vfkeep --help` is fast.
COMMANDS: dict[str, str] = {
    "layout": "vfkeep.layout:layout_command",
    "smoke": "vfkeep.vfio_user.smoke:smoke_command",
    "device": "vfkeep.device.main:device_command",
    "nvme-device": "vfkeep.nvme_device.main:nvme_device_command",
    "run": "vfkeep.host.commands:run_command",
    "service": "vfkeep.host.vocabulary:service_command",
    "inspect": "vfkeep.host.vocabulary:inspect_command",
    "stop": "vfkeep.host.vocabulary:stop_command",
    "events": "vfkeep.host.commands:events_command",
    "status": "vfkeep.host.vocabulary:status_command",
    "probe": "vfkeep.host.vocabulary:probe_command",
    "exec": "vfkeep.host.vocabulary:exec_command",
    "state": "vfkeep.host.commands:state_group",
    "worker": "vfkeep.paravisor.worker:worker_command",
    "traffic": "vfkeep.host.vocabulary:traffic_group",
    "disk": "vfkeep.host.vocabulary:disk_group",
    "demo": "vfkeep.demo:demo_command",
    "chaos": "vfkeep.chaos:chaos_command",
}

#: Each command's summary in `vfkeep --help`: the first sentence of its help, which click would show (the listing
#: imported every command for it, ~0.9 s of CPU; tests/test_cli_startup.py checks they are the commands' own).
SUMMARIES: dict[str, str] = {
    "layout": "Print MANA (GDMA) or NVMe wire layouts (struct sizes, field offsets, bitfields) and named constants.",
    "smoke": "Keepalive handover on the vfio-user test device: state, pool buffer and a latched interrupt survive.",
    "device": "Serve a MANA (GDMA) VF emulator over vfio-user.",
    "nvme-device": "Serve an NVMe controller emulator over vfio-user.",
    "run": "Start the VM: guest memory, device processes, rings, worker; console unless --detach/--no-console.",
    "service": "Service the paravisor: save the worker, start the next one, restore; print the servicing result.",
    "inspect": "Live tree of the host, worker, devices and last servicing; PATH selects a sub-tree (worker/nics/0).",
    "stop": "Stop the host (its worker shuts its NICs down, every child ends) and wait for it to exit; says what "
            "the stop did (which NICs were shut down, or why none was).",
    "events": "Stream the host's events (servicing started, phase done, completed, NIC state changes, stopping) until "
              "it stops (exit 0).",
    "status": "Host, worker and device processes at a glance, and the servicing in progress (answers during one).",
    "probe": "Push COUNT test frames into NIC's guest tx ring and wait for them on its rx ring (loopback backend).",
    "exec": "Run a command in guest NIC's network namespace (`vfkeep run --guest netns`); its output is shown when "
            "it ends.",
    "state": "Saved servicing state.",
    "worker": "Paravisor worker process (started by `vfkeep run`).",
    "traffic": "Guest traffic on a running host: one agent per NIC sends paced frames and measures what comes back.",
    "disk": "Guest disk IO on a running host (`vfkeep run --nvme N`): one agent per NVMe disk issues verifiable reads "
            "and writes and measures IOPS, latency and the IO blackout.",
    "demo": "Guest traffic across reset-flr, reset, keepalive and keepalive+datapath servicings: table, verdict, "
            "plot, JSON.",
    "chaos": "Servicings under random faults, invariants checked after each; exit 1 on any violation.",
}

#: The host's children (worker, devices), which keep the signals' default actions. Every other command ends as
#: Ctrl-C does on SIGINT, SIGTERM and SIGHUP (`proc.signals_interrupt`), taken before its module is imported: its
#: 0.5-1 s of imports lost a SIGINT the command inherited ignored (a script's `vfkeep demo &`), and a command left
#: with the defaults (`events`, `traffic stats`, ...) ignored such a SIGINT to its end, and died of SIGTERM silently.
DEFAULT_SIGNALS = frozenset({"worker", "device", "nvme-device"})


def failure_line(command: str, e: click.ClickException) -> str:
    """Every failure's one line (stderr): `vfkeep: COMMAND: cause`; a usage error adds where the help is."""
    where = command  # whose --help has the option
    if isinstance(e, click.UsageError) and e.ctx is not None:
        names, c = [], e.ctx
        while c.parent is not None:  # the root's name is however vfkeep was started
            names.append(c.info_name)
            c = c.parent
        where = " ".join(reversed(names))
        command = where or command  # (an option of vfkeep itself, --log-level: still the command it was for)
    hint = f" (`{' '.join(filter(None, ('vfkeep', where, '--help')))}`)" if isinstance(e, click.UsageError) else ""
    return f"vfkeep: {command + ': ' if command else ''}{e.format_message()}{hint}"


def one_line(e: BaseException) -> str:
    """An exception's first line, for a failure line (some messages go on with a log excerpt)."""
    return next((ln.strip().rstrip(":") for ln in str(e).splitlines() if ln.strip()), type(e).__name__)


def interrupted_line(command: str, e: KeyboardInterrupt) -> tuple[str, int]:
    """An interrupted command's one line, `vfkeep: COMMAND: interrupted (SIGINT)[; what became of its work]`
    (a command sets `e.note`), and its exit status, 128 + the signal's number as a shell reports it."""
    signum = getattr(e, "signum", None) or signal.SIGINT
    note = getattr(e, "note", None)
    return (f"vfkeep: {command + ': ' if command else ''}interrupted ({signal.Signals(signum).name})"
            f"{'; ' + note if note else ''}", 128 + signum)


class WholeSummaries(click.Group):
    """A group whose `--help` lists each subcommand with its whole summary, wrapped: click cut it at the terminal's
    width with "..." (at 80 columns, most of them)."""

    def summaries(self, ctx) -> list[tuple[str, str]]:
        return [(n, c.get_short_help_str(1 << 16)) for n in self.list_commands(ctx)
                if (c := self.get_command(ctx, n)) is not None and not c.hidden]

    def format_commands(self, ctx, formatter):
        if rows := self.summaries(ctx):
            with formatter.section("Commands"):
                formatter.write_dl(rows)


class LazyGroup(WholeSummaries):
    def list_commands(self, ctx):
        return sorted(set(super().list_commands(ctx)) | set(COMMANDS))

    def summaries(self, ctx) -> list[tuple[str, str]]:
        """The listing of `vfkeep --help`, from `SUMMARIES`: no command is imported for it."""
        return [(n, SUMMARIES[n]) for n in self.list_commands(ctx)]

    def get_command(self, ctx, name):
        if name in COMMANDS:
            mod, attr = COMMANDS[name].split(":")
            try:
                if name in DEFAULT_SIGNALS:
                    return getattr(importlib.import_module(mod), attr)
                from . import proc
                proc.signals_interrupt()
                with proc.interrupts_held():  # (raised inside an import, one came out as a RuntimeError)
                    return getattr(importlib.import_module(mod), attr)
            except (ImportError, AttributeError) as e:  # not built yet
                raise click.ClickException(f"command {name!r} is unavailable: {e}") from e
        return super().get_command(ctx, name)

    def resolve_command(self, ctx, args):
        """Also notes the command's name (`disk stats` for a subcommand), which its failure line names."""
        name, cmd, rest = super().resolve_command(ctx, args)
        if any(not p.is_flag for p in getattr(cmd, "params", ()) if "--json" in getattr(p, "opts", ())):
            ctx.meta["vfkeep.json"] = False  # demo's and chaos's --json PATH is a report, not JSON errors
        sub = next((w for w in rest if isinstance(cmd, click.Group) and w in cmd.commands), None)
        ctx.meta["vfkeep.command"] = f"{name} {sub}" if sub else name
        return name, cmd, rest

    def parse_args(self, ctx, args):
        ctx.meta["vfkeep.json"] = "--json" in args
        # the command named, so that a bad option of vfkeep itself (--log-level) names it too
        ctx.meta["vfkeep.command"] = next((a for a in args if a in COMMANDS or a in self.commands), "")
        try:
            return super().parse_args(ctx, args)
        except click.ClickException as e:
            self._fail(ctx, e)

    def invoke(self, ctx):
        """A failure is one line on stderr (`failure_line`); under --json, a JSON error object on stdout (a
        usage error, a bad option value say, too)."""
        try:
            return super().invoke(ctx)
        except click.ClickException as e:
            self._fail(ctx, e)
        except KeyboardInterrupt as e:  # not click's "Aborted!", exit 1
            line, code = interrupted_line(ctx.meta.get("vfkeep.command", ""), e)
            click.echo(line, err=True)
            sys.exit(code)

    @staticmethod
    def _fail(ctx, e: click.ClickException):
        if ctx.meta.get("vfkeep.json", False):
            kind = getattr(e, "kind", None) or ("Usage" if isinstance(e, click.UsageError) else "Error")
            click.echo(json.dumps({"ok": False, "error": {"type": kind, "message": e.format_message()}}))
        else:
            click.echo(failure_line(ctx.meta.get("vfkeep.command", ""), e), err=True)
        sys.exit(e.exit_code)


class FloatRange(click.FloatRange):
    """click's FloatRange that also refuses nan, which passes every bound check (`service --timeout nan` was the
    host's internal error, `stop --timeout nan` never gave up), and inf where no bound stops it."""

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


def output_file(ctx, param, value):
    """A report path (`--json PATH` of demo and chaos), checked before minutes of work that end in writing
    it: not a directory, in an existing directory we may write to."""
    if value is None:
        return value
    where = os.path.dirname(os.path.abspath(value))
    if os.path.isdir(value):
        raise click.BadParameter(f"{value} is a directory")
    if not os.path.isdir(where):
        raise click.BadParameter(f"cannot write {value}: directory {where} does not exist")
    if os.path.exists(value):
        if not os.access(value, os.W_OK):
            raise click.BadParameter(f"cannot write {value}: permission denied")
    else:
        _try_creating(value, where, directory=False)
    return value


def output_dir(ctx, param, value):
    """A report directory (`demo --out DIR`, created with its parents), checked as `output_file` is: the
    nearest existing one is a directory in which we can create what the report needs."""
    if value is None:
        return value
    base = path = os.path.abspath(value)
    while not os.path.exists(base):
        base = os.path.dirname(base)
    if not os.path.isdir(base):
        raise click.BadParameter(f"cannot create {value}: {base} is not a directory")
    _try_creating(value, base, directory=base != path)
    return value


def _try_creating(value: str, where: str, directory: bool) -> None:
    """Create and remove a scratch file (`directory`: directory) in `where`, as writing `value` will create one
    there. Permission bits are not enough: root may write anywhere by them, but /proc takes no new entries."""
    probe = os.path.join(where, f".vfkeep-probe-{os.getpid()}")
    try:
        if directory:
            os.mkdir(probe)
            os.rmdir(probe)
        else:
            os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            os.unlink(probe)
    except OSError as e:
        raise click.BadParameter(f"cannot write {value}: {where} refuses new entries ({e.strerror})") from None


LOG_LEVELS = ("debug", "info", "warning", "error")


def _log_level(ctx, param, value):
    """Every vfkeep process of this command (host, devices, workers, agents) logs at this level."""
    if value is not None:
        os.environ["VFKEEP_LOG_LEVEL"] = value
    elif os.environ.get("VFKEEP_LOG_LEVEL", "info").lower() not in LOG_LEVELS:  # not silently "info"
        raise click.BadParameter(f"{os.environ['VFKEEP_LOG_LEVEL']!r} is not one of {', '.join(LOG_LEVELS)}",
                                 param_hint="$VFKEEP_LOG_LEVEL")
    return value


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", "-V", prog_name="vfkeep")
@click.option("--log-level", type=click.Choice(LOG_LEVELS, case_sensitive=False), default=None, expose_value=False,
              is_eager=True, callback=_log_level,
              help="level of the run dir's log files, for every process started [default: $VFKEEP_LOG_LEVEL or info]")
def main() -> None:
    """Service a device-driver process while its devices keep running (OpenHCL MANA keepalive model).

    Host commands (service, inspect, status, probe, traffic, disk, exec, stop, events) take --run-dir DIR
    (default $VFKEEP_RUN_DIR or /tmp/vfkeep-UID) and --json; the host's console has the same commands."""


if __name__ == "__main__":
    main()
