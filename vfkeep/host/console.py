"""Interactive host console (OpenVMM's `service-vtl2` and friends): cmd.Cmd + readline history and completion."""
from __future__ import annotations

import argparse
import cmd
import json
import os
import shlex

from rich.console import Console

from . import render
from .traffic_cli import stats_table
from .vmm import Host, HostError

try:
    import readline
except ImportError:  # pragma: no cover - readline exists on Linux builds of CPython
    readline = None


class ConsoleUsage(Exception):
    """A command line the console cannot parse; the message says why."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors by raising instead of exiting the host."""

    def error(self, message: str):
        raise ConsoleUsage(f"{self.prog}: {message}\nusage: {self.format_usage().strip()[7:]}")

    def exit(self, status: int = 0, message: str | None = None):
        raise ConsoleUsage(message or "")


def _service_parser() -> _Parser:
    p = _Parser(prog="service-vtl2", add_help=False,
                description="Save the worker, replace it, restore; keepalive flags are per request.")
    p.add_argument("--mana-keepalive", action="store_true", help="host allows MANA keepalive (flag bit 1)")
    p.add_argument("-n", "--nvme-keepalive", action="store_true", help="host allows NVMe keepalive (flag bit 0)")
    p.add_argument("--timeout", type=float, metavar="SEC", help="save timeout hint (default 60)")
    p.add_argument("--test-config", metavar="HOOK", help="VFKEEP_TEST_CONFIG hook for the current worker's save")
    p.add_argument("--next-env", action="append", default=[], metavar="KEY=VAL", help="env of the next worker")
    p.add_argument("--worker-cmd", metavar="CMD", help="command of the next worker")
    return p


def _traffic_parser() -> _Parser:
    p = _Parser(prog="traffic", add_help=False, description="Guest traffic agents, one per NIC.")
    p.add_argument("action", choices=("start", "stop", "stats"))
    p.add_argument("--rate", type=float, help="frames per second per NIC (start)")
    p.add_argument("--size", type=int, help="frame size in bytes (start)")
    p.add_argument("--nic", type=int, help="one NIC instead of all")
    p.add_argument("--settle-ms", type=float, default=None, help="wait for frames in flight (stats; default: "
                   "bounded by the measured RTT)")
    return p


def parse_env_pairs(pairs: list[str]) -> dict[str, str]:
    env = {}
    for p in pairs:
        key, sep, value = p.partition("=")
        if not sep or not key:
            raise ConsoleUsage(f"bad KEY=VAL {p!r}")
        env[key] = value
    return env


class HostConsole(cmd.Cmd):
    intro = "vfkeep host console. Type help or ? to list commands, quit to stop the VM."
    prompt = "vfkeep> "
    commands = ("service-vtl2", "inspect", "status", "probe", "traffic", "exec", "help", "quit")

    def __init__(self, host: Host, console: Console | None = None, stopping=None):
        super().__init__()
        self.host = host
        self.stopping = stopping  # threading.Event set once the host is stopping (the loop then ends)
        self.out = console or Console()
        self._service_parser = _service_parser()
        self._traffic_parser = _traffic_parser()
        self._history = os.path.join(host.run_dir, "console_history")

    # -- plumbing ---------------------------------------------------------------------------
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

    def parseline(self, line: str):
        """Commands are hyphenated (`service-vtl2`); cmd.Cmd's method names use underscores."""
        name, arg, line = super().parseline(line.replace("service-vtl2", "service_vtl2", 1))
        return name, arg, line

    def completenames(self, text: str, *ignored):
        return [c for c in self.commands if c.startswith(text)]

    def print_topics(self, header, cmds, cmdlen, maxcol):
        shown = [c.replace("_", "-") for c in cmds or [] if c not in ("EOF", "exit")]
        super().print_topics(header, shown, cmdlen, maxcol)

    def emptyline(self) -> bool:
        return False

    def default(self, line: str) -> None:
        name = line.split()[0]
        self.out.print(f"[red]unknown command {name!r}[/red]; commands: {', '.join(self.commands)} (help CMD for more)")

    def onecmd(self, line: str) -> bool:
        try:
            return super().onecmd(line)
        except (ConsoleUsage, HostError) as e:
            self.out.print(f"[red]{e}[/red]")
        except Exception as e:  # noqa: BLE001 - the console keeps running
            self.out.print(f"[red]error:[/red] {e}")
        return False

    # -- commands ---------------------------------------------------------------------------
    def do_service_vtl2(self, arg: str) -> None:
        """service-vtl2 [--mana-keepalive] [-n|--nvme-keepalive] [--timeout SEC] [--test-config HOOK]
        [--next-env KEY=VAL]... [--worker-cmd CMD]
        Service the paravisor: save the worker, start the next one, restore. Keepalive is used only
        where the host flag is given and the worker's configuration enables it."""
        ns = self._service_parser.parse_args(shlex.split(arg))
        result = self.host.service(mana_keepalive=ns.mana_keepalive, nvme_keepalive=ns.nvme_keepalive,
                                   timeout=ns.timeout, test_config=ns.test_config,
                                   next_env=parse_env_pairs(ns.next_env), next_worker_cmd=ns.worker_cmd)
        render.print_servicing(result, self.out)

    def complete_service_vtl2(self, text: str, line: str, begidx: int, endidx: int) -> list[str]:
        flags = [o for a in self._service_parser._actions for o in a.option_strings if o.startswith("--")]
        return [f for f in flags if f.startswith(text) and f not in line.split()]

    def do_inspect(self, arg: str) -> None:
        """inspect [PATH] [--json]
        Live tree: host, worker (pid, version, keepalive modes, per-NIC pdid/db_id/gpa_mkey/queues, pool
        usage), devices, last servicing. PATH selects a sub-tree, e.g. worker/nics/0."""
        args = shlex.split(arg)
        as_json = "--json" in args
        rest = [a for a in args if a != "--json"]
        unknown = [a for a in rest if a.startswith("-")]
        if unknown or len(rest) > 1:
            raise ConsoleUsage(f"inspect: unexpected {' '.join(unknown or rest[1:])!r}\nusage: inspect [PATH] [--json]")
        path = rest[0] if rest else None
        data = self.host.inspect(path)
        if not isinstance(data, (dict, list)):
            self.out.print(data)
        elif as_json:
            self.out.print_json(json.dumps(data))
        else:
            self.out.print(render.tree(data, path or "vfkeep"))

    def complete_inspect(self, text: str, line: str, begidx: int, endidx: int) -> list[str]:
        parent, _, leaf = text.rpartition("/")
        try:
            node = self.host.inspect(parent or None)
        except HostError:
            return []
        if isinstance(node, dict):
            keys = list(node)
        else:
            keys = [str(i) for i in range(len(node))] if isinstance(node, list) else []
        prefix = f"{parent}/" if parent else ""
        return [prefix + k + ("/" if isinstance(node, dict) and isinstance(node[k], (dict, list)) else "")
                for k in keys if k.startswith(leaf)]

    def do_status(self, arg: str) -> None:
        """status
        Host, worker and device processes at a glance."""
        if arg.strip():
            raise ConsoleUsage(f"status takes no arguments, got {arg.strip()!r}")
        self.out.print(render.tree(self.host.status(), "status"))

    def do_probe(self, arg: str) -> None:
        """probe [NIC] [COUNT]
        Push COUNT test frames into NIC's guest tx ring and wait for them on its rx ring."""
        try:
            nums = [int(a) for a in shlex.split(arg)]
        except ValueError:
            raise ConsoleUsage(f"probe: NIC and COUNT must be integers, got {arg!r}") from None
        if len(nums) > 2:
            raise ConsoleUsage("usage: probe [NIC] [COUNT]")
        r = self.host.probe(*nums)
        style = "green" if r["ok"] else "red"
        self.out.print(f"[{style}]nic {r['nic']}: {r['received']}/{r['sent']} frames came back[/{style}]")

    def do_traffic(self, arg: str) -> None:
        """traffic start [--rate FPS] [--size BYTES] [--nic N] | stop [--nic N] | stats [--nic N] [--settle-ms MS]
        Guest traffic on the NICs' channel rings; servicing results then carry blackout_ms and frames_lost."""
        ns = self._traffic_parser.parse_args(shlex.split(arg))
        args: dict = {"nic": ns.nic}
        if ns.action == "start":
            args.update({k: v for k, v in (("rate", ns.rate), ("size", ns.size)) if v is not None})
        elif ns.action == "stats":
            args["settle_ms"] = ns.settle_ms
        result = self.host.traffic(ns.action, **args)
        if ns.action == "stats":
            self.out.print(stats_table(result["nics"], "traffic since the last start"))
            if result["last_servicing"]:
                self.out.print(stats_table(result["last_servicing"], "last servicing window"))
        else:
            for n in result["nics"]:
                self.out.print(f"nic {n['nic']}: " + (f"{n['rate']:g} frames/s of {n['size']} bytes"
                                                       if ns.action == "start" else f"stopped after {n['sent']} frames"))

    def complete_traffic(self, text: str, line: str, begidx: int, endidx: int) -> list[str]:
        words = line.split()[1:]
        if not words or (len(words) == 1 and not line.endswith(" ")):
            return [a for a in ("start", "stop", "stats") if a.startswith(text)]
        flags = [o for a in self._traffic_parser._actions for o in a.option_strings]
        return [f for f in flags if f.startswith(text) and f not in words]

    def do_exec(self, arg: str) -> None:
        """exec N CMD [ARGS...]
        Run a command in guest N's network namespace (`vfkeep run --guest netns`), e.g.
        `exec 0 ping -c 3 198.18.0.1` or `exec 1 ss -ti`; its output is shown when it ends (30 s at most)."""
        words = shlex.split(arg)
        if len(words) < 2 or not words[0].isdigit():
            raise ConsoleUsage("usage: exec N CMD [ARGS...]")
        r = self.host.exec(int(words[0]), words[1:])
        if r["stdout"]:
            self.out.out(r["stdout"], end="", highlight=False)
        if r["stderr"]:
            self.out.out(r["stderr"], end="", style="red", highlight=False)
        if r["timed_out"] or r["returncode"]:
            self.out.print(f"[yellow]exit status {r['returncode']}{' (timed out)' if r['timed_out'] else ''}[/yellow]")

    def do_quit(self, arg: str) -> bool:
        """quit
        Stop the VM: the worker shuts its NICs down, every child process ends."""
        return True

    do_exit = do_quit

    def do_EOF(self, arg: str) -> bool:
        return True
