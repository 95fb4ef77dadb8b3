"""`vfkeep` command line (DESIGN §10). Subcommands live next to the code they drive."""
from __future__ import annotations

import importlib
import importlib.util

import click

from . import __version__

# name -> "module:attribute" of a click command; imported lazily so `vfkeep --help` is fast.
COMMANDS: dict[str, str] = {
    "layout": "vfkeep.gdma.layout:layout_command",
    "smoke": "vfkeep.vfio_user.smoke:smoke_command",
    "device": "vfkeep.device.main:device_command",
    "nvme-device": "vfkeep.nvme_device.main:nvme_device_command",
    "run": "vfkeep.host.commands:run_command",
    "service": "vfkeep.host.commands:service_command",
    "inspect": "vfkeep.host.commands:inspect_command",
    "stop": "vfkeep.host.commands:stop_command",
    "exec": "vfkeep.host.commands:exec_command",
    "state": "vfkeep.host.commands:state_group",
    "worker": "vfkeep.paravisor.worker:worker_command",
    "traffic": "vfkeep.host.traffic_cli:traffic_group",
    "demo": "vfkeep.demo:demo_command",
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


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="vfkeep")
def main() -> None:
    """Service a device-driver process while its devices keep running (OpenHCL MANA keepalive model)."""


if __name__ == "__main__":
    main()
