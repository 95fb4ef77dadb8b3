"""`vfkeep` command line (DESIGN §10). Subcommands live next to the code they drive."""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
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


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        present = {n for n, target in COMMANDS.items() if importlib.util.find_spec(target.split(":")[0])}
        return sorted(set(super().list_commands(ctx)) | present)

    def get_command(self, ctx, name):
        if name in COMMANDS:
            mod, attr = COMMANDS[name].split(":")
            try:
                return getattr(importlib.import_module(mod), attr)
            except (ImportError, AttributeError) as e:  # not built yet
                raise click.ClickException(f"command {name!r} is unavailable: {e}") from e
        return super().get_command(ctx, name)

    def parse_args(self, ctx, args):
        ctx.meta["vfkeep.json"] = "--json" in args
        return super().parse_args(ctx, args)

    def invoke(self, ctx):
        """Under --json, a usage error (a bad option value, say) is a JSON error object on stdout too."""
        as_json = ctx.meta.get("vfkeep.json", False)
        try:
            return super().invoke(ctx)
        except click.ClickException as e:
            if not as_json:
                raise
            kind = getattr(e, "kind", None) or ("Usage" if isinstance(e, click.UsageError) else "Error")
            click.echo(json.dumps({"ok": False, "error": {"type": kind, "message": e.format_message()}}))
            sys.exit(e.exit_code)


LOG_LEVELS = ("debug", "info", "warning", "error")


def _log_level(ctx, param, value):
    """Every vfkeep process of this command (host, devices, workers, agents) logs at this level."""
    if value is not None:
        os.environ["VFKEEP_LOG_LEVEL"] = value
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
