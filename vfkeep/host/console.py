"""Interactive host console: the CLI's host commands (host/vocabulary.py) run against this host, plus `help`
and `quit`; readline history and completion of commands, options and inspect paths.

`service-vtl2` (OpenVMM's name) is `service`; `stop`, `quit`, `exit` and end of input stop the VM.
"""
from __future__ import annotations

import cmd
import difflib
import os
import shlex

import click
from rich.console import Console

from .vmm import Host
from .vocabulary import COMMAND_OBJECTS, HOST_COMMANDS, ConsoleStop, LocalTarget

try:
    import readline
except ImportError:  # pragma: no cover - readline exists on Linux builds of CPython
    readline = None

ALIASES = {"service-vtl2": "service", "exit": "quit"}
CONSOLE_ONLY = ("help", "quit")


class HostConsole(cmd.Cmd):
    intro = "vfkeep host console: the `vfkeep` host commands against this VM. help lists them; quit stops the VM."
    prompt = "vfkeep> "
    commands = (*HOST_COMMANDS, *CONSOLE_ONLY)

    def __init__(self, host: Host, console: Console | None = None, stopping=None):
        super().__init__()
        self.host = host
        self.out = console or Console(highlight=False, soft_wrap=True)
        self.target = LocalTarget(host, self.out)
        self.stopping = stopping  # threading.Event set once the host is stopping (the loop then ends)
        self._history = os.path.join(host.run_dir, "console_history")

    # -- loop -------------------------------------------------------------------------------
    def run(self) -> int:
        """The console until quit (0), EOF (0) or Ctrl-C at an empty prompt or during a command (130). Ctrl-C on
        a half-typed line only cancels the line, as in a shell. History is saved however the loop ends;
        `Interrupted` (SIGTERM, SIGHUP, `vfkeep stop`) propagates to the caller, which stops the VM."""
        from .commands import Interrupted

        self.preloop()
        try:
            self.out.print(self.intro)
            while self.stopping is None or not self.stopping.is_set():
                try:
                    line = input(self.prompt)
                except Interrupted:
                    raise
                except KeyboardInterrupt:
                    typed = readline.get_line_buffer() if readline is not None else ""
                    print("^C")
                    if typed.strip():
                        continue  # the line is cancelled, the VM keeps running
                    self.out.print("interrupt at an empty prompt: stopping the VM")
                    return 130
                except EOFError:
                    print()
                    self.out.print("end of input: stopping the VM")
                    return 0
                try:
                    if self.onecmd(line):
                        self.out.print("quit: stopping the VM")
                        return 0
                except Interrupted:
                    raise
                except KeyboardInterrupt:
                    phase = self.host.servicing_phase()
                    print("^C")
                    self.out.print("interrupted" + (f" during a servicing (phase {phase})" if phase else "")
                                   + ": stopping the VM")
                    return 130
            return 0
        finally:
            self.postloop()

    def preloop(self) -> None:
        if readline is not None:
            readline.set_completer_delims(" \t")
            try:
                readline.read_history_file(self._history)
            except OSError:
                pass

    def postloop(self) -> None:
        if readline is not None:
            readline.set_history_length(1000)
            try:
                readline.write_history_file(self._history)
            except OSError:
                pass

    # -- dispatch ---------------------------------------------------------------------------
    def onecmd(self, line: str) -> bool:
        """Run one line; True to stop the VM. Errors are printed and the console goes on."""
        try:
            words = shlex.split(line)
        except ValueError as e:
            self.out.print(f"[red]{e}[/red]")
            return False
        if not words:
            return False
        name, args = ALIASES.get(words[0], words[0]), words[1:]
        if name == "quit":
            return True
        if name == "help":
            self.help(args)
            return False
        command = COMMAND_OBJECTS.get(name)
        if command is None:
            close = difflib.get_close_matches(name, self.commands + tuple(ALIASES), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            self.out.print(f"[red]unknown command {name!r}[/red]{hint} (help lists the commands)")
            return False
        try:
            command.main(args=args, prog_name=name, standalone_mode=False, obj=self.target)
        except ConsoleStop:
            return True
        except click.UsageError as e:
            usage = e.ctx.get_usage() if e.ctx is not None else ""
            self.out.print(f"[red]{name}: {_esc(e.format_message())}[/red]" + (f"\n{_esc(usage)}" if usage else ""))
        except click.ClickException as e:
            self.out.print(f"[red]{_esc(e.format_message())}[/red]")
        except click.Abort as e:
            if isinstance(e.__cause__, KeyboardInterrupt):  # click turned Ctrl-C (or a stop signal) into Abort
                raise e.__cause__ from None
        except click.exceptions.Exit:
            pass
        except SystemExit as e:  # a command's exit status (e.g. service --require-keepalive)
            if e.code:
                self.out.print(f"[yellow]({name}: exit status {e.code})[/yellow]")
        except Exception as e:  # noqa: BLE001 - the console keeps running
            self.out.print(f"[red]{name}: error: {_esc(str(e))}[/red]")
        return False

    def help(self, args: list[str]) -> None:
        if args:
            name = ALIASES.get(args[0], args[0])
            command = COMMAND_OBJECTS.get(name)
            if command is None:
                self.out.print(f"help: no command {args[0]!r}; commands: {', '.join(self.commands)}")
                return
            with click.Context(command, info_name=name) as ctx:
                self.out.print(_esc(command.get_help(ctx)))
            return
        width = max(len(c) for c in self.commands)
        for name in HOST_COMMANDS:
            self.out.print(f"  {name:<{width}}  {_esc(COMMAND_OBJECTS[name].get_short_help_str(200))}")
        self.out.print(f"  {'help':<{width}}  help CMD: options of CMD")
        self.out.print(f"  {'quit':<{width}}  stop the VM (the worker shuts its NICs down, every process ends)")
        self.out.print("The same commands, with --run-dir, work from a shell: `vfkeep CMD --help`.")

    # -- completion -------------------------------------------------------------------------
    def completenames(self, text: str, *ignored):
        return [c for c in (*self.commands, *ALIASES) if c.startswith(text)]

    def completedefault(self, text: str, line: str, begidx: int, endidx: int) -> list[str]:
        words = line.split()
        command = COMMAND_OBJECTS.get(ALIASES.get(words[0], words[0])) if words else None
        if command is None:
            return []
        rest = words[1:]
        if isinstance(command, click.Group):
            if not rest or (len(rest) == 1 and not line.endswith(" ")):
                return [n for n in command.list_commands(click.Context(command)) if n.startswith(text)]
            command = command.commands.get(rest[0])
            if command is None:
                return []
        if command.name == "inspect" and not text.startswith("-"):
            return self._inspect_paths(text)
        flags = [o for p in command.params for o in (*p.opts, *p.secondary_opts)
                 if o.startswith("--") and o not in ("--run-dir",)]
        return [f for f in flags if f.startswith(text) and f not in words]

    def _inspect_paths(self, text: str) -> list[str]:
        parent, _, leaf = text.rpartition("/")
        try:
            node = self.host.inspect(parent or None)
        except Exception:  # noqa: BLE001 - no completion for a path that does not exist
            return []
        if isinstance(node, dict):
            keys = list(node)
        else:
            keys = [str(i) for i in range(len(node))] if isinstance(node, list) else []
        prefix = f"{parent}/" if parent else ""
        return [prefix + k + ("/" if isinstance(node, dict) and isinstance(node[k], (dict, list)) else "")
                for k in keys if k.startswith(leaf)]


def _esc(text: str) -> str:
    return text.replace("[", r"\[")
