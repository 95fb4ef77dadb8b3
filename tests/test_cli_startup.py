"""A light command loads only what it uses: `vfkeep status`, `stop`, `service`, `traffic ...` started by
importing rich, protobuf, the guest agent and the DMA manager (about 0.35 s of CPU, 2-6 s of wall on a loaded
machine, every time), none of which they need to ask the host and print its answer (rich draws on a terminal
only). `vfkeep --help` imported every command for its one-line summaries (~0.9 s of CPU)."""
import io
import os
import json
import subprocess
import sys

import click
import pytest
from rich.console import Console

from vfkeep import cli
from vfkeep.host import render

#: What none of them needs: drawing, saved-state decoding, guest code, the servicing contract, the host itself.
HEAVY = ("rich", "google.protobuf", "numpy", "vfkeep.guest", "vfkeep.memory", "vfkeep.proto", "vfkeep.contract",
         "vfkeep.host.vmm", "vfkeep.host.decode")
LIGHT = (["status"], ["stop"], ["service", "--mana-keepalive"], ["events"], ["inspect"], ["traffic", "start"],
         ["traffic", "stats"], ["disk", "stop"], ["service", "--help"], ["--help"])

# Each command in turn, in one process (as its own `vfkeep` would run it): exit status, output, and the heavy
# modules loaded by then.
CHILD = r"""
import contextlib, io, json, sys
from vfkeep.cli import main
heavy, run_dir, results = tuple(json.loads(sys.argv[1])), sys.argv[2], []
for argv in json.loads(sys.argv[3]):
    out, err, code = io.StringIO(), io.StringIO(), None
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(argv if argv[-1] == "--help" else [*argv, "--run-dir", run_dir], prog_name="vfkeep")
        except SystemExit as e:
            code = e.code
    loaded = sorted(m for m in sys.modules if m in heavy or m.startswith(tuple(h + "." for h in heavy)))
    results.append({"argv": argv, "code": code, "stdout": out.getvalue(), "stderr": err.getvalue(), "heavy": loaded})
print(json.dumps(results))
"""


def test_light_commands_load_nothing_heavy(tmp_path):
    run_dir = str(tmp_path / "no-host")
    r = subprocess.run([sys.executable, "-c", CHILD, json.dumps(HEAVY), run_dir, json.dumps(LIGHT)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    results = {" ".join(x["argv"]): x for x in json.loads(r.stdout)}
    assert list(results) == [" ".join(a) for a in LIGHT]
    for name, x in results.items():
        if name.endswith("--help"):
            assert x["code"] == 0 and x["stdout"].startswith(f"Usage: vfkeep {name.removesuffix('--help')}"), x
        elif name == "stop":
            assert x["code"] == 0 and x["stdout"] == f"no host running in {run_dir}; nothing to stop\n", x
        else:
            assert x["code"] == 1 and x["stdout"] == "", x
            assert x["stderr"].startswith(f"vfkeep: {name.split(' --')[0]}: no host answering in {run_dir}"), x
            assert x["stderr"].count("\n") == 1, x
    assert {name: x["heavy"] for name, x in results.items() if x["heavy"]} == {}


@pytest.mark.parametrize("env", [{}, {"FORCE_COLOR": "1"}, {"FORCE_COLOR": ""}, {"TTY_COMPATIBLE": "1"},
                                 {"TTY_COMPATIBLE": "0"}])
def test_plain_output_only_where_rich_sees_no_terminal(monkeypatch, env):
    """`render.stdout()` skips rich only where rich itself would print plain lines: on no terminal, unless
    rich's own overrides say otherwise."""
    for name in ("FORCE_COLOR", "TTY_COMPATIBLE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    file = io.StringIO()
    monkeypatch.setattr(sys, "stdout", file)
    out = render.stdout()
    assert render.no_terminal(file) == (not env)
    assert isinstance(out, render.PlainOutput) == (not env)
    assert render.plain(out) == (not Console(file=file).is_terminal)


def test_help_summaries_are_the_commands_own():
    """`vfkeep --help` lists `cli.SUMMARIES` instead of importing every command: each is what click shows of the
    command's own help, at every width (its first sentence, and nothing hides or replaces it)."""
    ctx = click.Context(cli.main)
    assert sorted(cli.SUMMARIES) == sorted(cli.COMMANDS)
    for name, summary in cli.SUMMARIES.items():
        cmd = cli.main.get_command(ctx, name)
        assert cmd.short_help is None and not cmd.hidden and not cmd.deprecated, name
        assert cmd.get_short_help_str(1 << 16) == summary, name


@pytest.mark.parametrize("argv", [["--help"], ["traffic", "--help"], ["disk", "--help"], ["state", "--help"]])
def test_help_listings_show_whole_summaries_at_80_columns(argv):
    """`vfkeep --help` (and each group's) cut most summaries at 80 columns with "...": they are wrapped whole."""
    r = subprocess.run([sys.executable, "-m", "vfkeep", *argv], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "COLUMNS": "80"})
    assert r.returncode == 0, r.stderr
    listing = r.stdout.split("Commands:\n", 1)[1]
    assert max(map(len, listing.splitlines())) <= 80 and "..." not in listing, listing
    group = cli.main if argv == ["--help"] else cli.main.get_command(click.Context(cli.main), argv[0])
    ctx = click.Context(group)
    for name in group.list_commands(ctx):
        summary = cli.SUMMARIES[name] if group is cli.main else group.get_command(ctx, name).get_short_help_str(1 << 16)
        assert " ".join(summary.split()) in " ".join(listing.split()), (name, listing)
