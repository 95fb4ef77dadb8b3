"""Host-side CLI commands (DESIGN §10): run, service, inspect, stop, state decode."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator

import click
from rich.console import Console

from .. import log as vlog
from .. import proc, rpc
from ..device.timing import timing_from, timing_options
from ..log import kv
from . import control, render
from .decode import UndecodableState, decode_file
from ..contract import SAVE_TEST_CONFIGS
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


#: Exit status of `vfkeep run` after each signal (128 + signal number, as a shell reports it).
SIGNAL_EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGHUP: 129}
PIDFILE = "host.pid"
LOG_NAME = "host.log"
#: `vfkeep run --detach` waits this long for the host it started to answer.
DETACH_READY_S = 60.0


class Interrupted(KeyboardInterrupt):
    """A signal (or `vfkeep stop`, signum None) asks the host to stop; raised on the main thread."""

    def __init__(self, signum: int | None):
        super().__init__(signum)
        self.signum = signum

    def describe(self) -> str:
        return "stop requested" if self.signum is None else signal.Signals(self.signum).name


def fail(message: str, code: int = 1) -> None:
    """One line on stderr naming the cause (and the log to read), then exit `code`."""
    click.echo(f"vfkeep: {message}", err=True)
    sys.exit(code)


def pidfile_path(run_dir: str) -> str:
    return os.path.join(run_dir, PIDFILE)


def _is_host(pid: int) -> bool:
    """`pid` is a live vfkeep process (not a zombie, not a recycled pid running something else)."""
    if not _running(pid):
        return False
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"vfkeep" in f.read()
    except OSError:
        return False


def claim_run_dir(run_dir: str) -> str | None:
    """Refuse a run dir a live host serves; clean up what a dead one left (pidfile, socket). Returns a note
    about what was cleaned up, if anything."""
    notes = []
    path = pidfile_path(run_dir)
    pid = _pidfile_pid(run_dir)
    if pid is not None and pid != os.getpid() and _is_host(pid):
        fail(f"a host is already running in {run_dir} (pid {pid}); stop it with `vfkeep stop --run-dir {run_dir}`")
    if os.path.exists(path):
        os.unlink(path)
        notes.append(f"pidfile of dead host pid {pid}")
    sock = control.socket_path(run_dir)
    if os.path.exists(sock):
        try:
            control.HostClient(run_dir, wait=2.0).status()
        except rpc.Unavailable:
            os.unlink(sock)
            notes.append("its control socket")
        else:
            fail(f"a host is already running in {run_dir}; stop it with `vfkeep stop --run-dir {run_dir}`")
    return f"removed the {' and '.join(notes)} left in {run_dir}" if notes else None


def _run_argv(config, timing, hwc_latency_ms, flr_ms, worker_env) -> list[str]:
    """`vfkeep run --no-console` with the same configuration (what --detach starts in the background)."""
    argv = ["run", "--no-console", "--run-dir", config.run_dir, "--nics", str(config.nics), "--backend", config.backend,
            "--timing", timing, "--ring-slots", str(config.ring_slots),
            "--prelaunch" if config.prelaunch else "--no-prelaunch"]
    for opt, value in (("--hwc-latency-ms", hwc_latency_ms), ("--flr-ms", flr_ms), ("--pool-pages", config.pool_pages),
                       ("--worker-cmd", config.worker_cmd)):
        if value is not None:
            argv += [opt, str(value)]
    for pair in worker_env:
        argv += ["--worker-env", pair]
    if config.datapath_keepalive:
        argv.append("--datapath-keepalive")
    if config.guest != "agent":
        argv += ["--guest", config.guest]
    return proc.vfkeep_argv(*argv)


def _detach(argv: list[str], run_dir: str) -> None:
    """Start the host in a session of its own (no terminal, survives this shell) and return once it answers;
    if it exits first, its one-line cause is ours."""
    log_path = os.path.join(run_dir, LOG_NAME)
    stderr_path = os.path.join(run_dir, "host.stderr")
    with open(stderr_path, "ab") as err:
        child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err, start_new_session=True)
    deadline = time.monotonic() + DETACH_READY_S
    while time.monotonic() < deadline:
        code = child.poll()
        if code is not None:
            from .devices import last_line
            cause = last_line(stderr_path).removeprefix("vfkeep: ")  # the host's own one-line cause
            fail(cause or f"host exited with status {code} during start-up (see {stderr_path})", code or 1)
        try:
            status = control.HostClient(run_dir, wait=2.0).status()
        except rpc.RpcError:
            time.sleep(0.05)
            continue
        click.echo(f"vfkeep host running: pid {status['host_pid']}, run dir {run_dir}, log {log_path}")
        for w in status.get("warnings") or []:
            click.echo(f"warning: {w}", err=True)
        return
    child.kill()
    fail(f"host did not answer within {DETACH_READY_S:g} s; it was ended (see {log_path})")


@click.command("run")
@run_dir_option
@click.option("--detach", is_flag=True, help="run in the background (own session, pidfile in the run dir); "
              "returns once the host answers")
@click.option("--no-console", is_flag=True, help="no console, stay in the foreground until `vfkeep stop` or a signal")
@click.option("--nics", type=int, default=1, show_default=True, help="NICs (device processes), 0-64")
@click.option("--backend", default="loopback", show_default=True, help="loopback | udp:HOST:PORT | tap:NAME")
@click.option("--pool-pages", type=click.IntRange(0), default=None,
              help="private pool pages (default: OPENHCL_ENABLE_VTL2_GPA_POOL / ..._CONFIG, else 512)")
@timing_options("realistic")
@click.option("--prelaunch/--no-prelaunch", default=True, show_default=True,
              help="start the next worker before the save request (start-up outside the blackout)")
@click.option("--ring-slots", type=int, default=4096, show_default=True,
              help="depth of each guest channel ring (power of two): frames buffered during a servicing")
@click.option("--worker-cmd", metavar="CMD", help="worker command (default: this vfkeep's `worker`)")
@click.option("--worker-env", multiple=True, metavar="KEY=VAL", help="extra environment for every worker")
@click.option("--datapath-keepalive", is_flag=True,
              help="workers keep the vport queues and buffers across MANA keepalive (VFKEEP_DATAPATH_KEEPALIVE=1; "
                   "default pool +160 pages per NIC)")
@click.option("--guest", type=click.Choice(["agent", "netns"]), default="agent", show_default=True,
              help="agent: traffic agents on request; netns: per NIC a network namespace with a TAP (the NIC's "
                   "MAC, 198.18.N.2) whose peer 198.18.N.1 sits behind the device's TAP; needs root")
def run_command(run_dir, detach, no_console, nics, backend, pool_pages, timing, hwc_latency_ms, flr_ms, prelaunch,
                ring_slots, worker_cmd, worker_env, datapath_keepalive, guest):
    """Start the VM: guest memory, device processes, rings, worker; console unless --detach/--no-console."""
    from .. import netns
    from .vmm import Host, HostConfig, HostError

    if guest == "netns" and (reason := netns.unavailable_reason()):
        fail(f"run: --guest netns: {reason}", 2)
    run_dir = os.path.abspath(run_dir)
    try:
        config = HostConfig(run_dir=run_dir, nics=nics, backend=backend, pool_pages=pool_pages,
                            timing=timing_from(timing, hwc_latency_ms, flr_ms),
                            prelaunch=prelaunch, ring_slots=ring_slots, worker_cmd=worker_cmd,
                            worker_env=_env_pairs(worker_env, "--worker-env"), datapath_keepalive=datapath_keepalive,
                            guest=guest)
        config.check()
    except (HostError, ValueError, click.BadParameter) as e:
        fail(f"run: {e.format_message() if isinstance(e, click.BadParameter) else e}", 2)
    try:
        os.makedirs(run_dir, exist_ok=True)
    except OSError as e:
        fail(f"run: cannot create --run-dir {run_dir}: {e.strerror}", 2)
    cleaned = claim_run_dir(run_dir)
    if cleaned:
        click.echo(f"vfkeep: {cleaned}", err=True)
    if detach:
        _detach(_run_argv(config, timing, hwc_latency_ms, flr_ms, worker_env), run_dir)
        return
    sys.exit(_serve(Host(config), run_dir, console=not no_console))


def _serve(host, run_dir: str, console: bool) -> int:
    """Boot, serve the control socket (and the console) until quit, `vfkeep stop` or a signal, then stop in
    order (worker first, then devices). Returns the exit status."""
    from .console import HostConsole
    from .traffic import TrafficError
    from .vmm import HostError

    log_path = os.path.join(run_dir, LOG_NAME)
    vlog.setup("host", run_dir)
    say = (lambda m: click.echo(m)) if console else (lambda m: click.echo(m, err=True))
    stop = threading.Event()
    reason: list[Interrupted] = []
    main_thread = threading.main_thread().ident

    def on_signal(signum, frame):
        if stop.is_set():
            return  # already stopping: nothing may interrupt the orderly shutdown
        reason.append(Interrupted(signum))
        stop.set()
        if console or not serving.is_set():
            raise reason[-1]  # out of the boot wait, the console's input() or its command

    def on_stop() -> dict:
        """`vfkeep stop`: answered first, then the main thread stops the VM."""
        phase = host.servicing_phase()
        if not stop.is_set():
            reason.append(Interrupted(None))
            stop.set()
            if console:
                signal.pthread_kill(main_thread, signal.SIGUSR1)  # wake the console out of input()
        return {"stopping": True, "host_pid": os.getpid(), "run_dir": run_dir, "servicing_phase": phase}

    def on_usr1(signum, frame):
        if reason and reason[-1].signum is None:
            raise reason[-1]

    serving = threading.Event()
    for sig in SIGNAL_EXIT:
        signal.signal(sig, on_signal)
    signal.signal(signal.SIGUSR1, on_usr1)
    with open(pidfile_path(run_dir), "w") as f:
        f.write(f"{os.getpid()}\n")
    server = None
    code = 0
    try:
        try:
            host.start()
            server = control.serve(run_dir, {
                "service": host.service, "inspect": host.inspect, "status": host.status, "probe": host.probe,
                "traffic": host.traffic, "exec": host.exec, "stop": on_stop}, refused=(HostError, TrafficError))
            server.start()
        except Interrupted as e:
            kv(log, logging.INFO, "interrupted during boot", cause=e.describe())
            say(f"{e.describe()} during start-up: stopped (log: {log_path})")
            return SIGNAL_EXIT.get(e.signum, 1)
        except Exception as e:  # noqa: BLE001 - any boot failure: one line naming the cause and the log
            kv(log, logging.ERROR, "host failed to start", error=str(e))
            click.echo(f"vfkeep: run: host failed to start: {e} (log: {log_path})", err=True)
            return 1
        serving.set()
        say(f"vfkeep host ready: pid {os.getpid()}, run dir {run_dir}, log {log_path}")
        for w in host.warnings:
            say(f"warning: {w}")
        kv(log, logging.INFO, "host ready", run_dir=run_dir, console=console)
        try:
            if console:
                signal.signal(signal.SIGINT, signal.default_int_handler)  # the console's Ctrl-C
                code = HostConsole(host, stopping=stop).run()
            else:
                while not stop.wait(1.0):
                    pass
                code = 0 if reason[-1].signum is None else SIGNAL_EXIT[reason[-1].signum]
                say(f"{reason[-1].describe()}: stopping the VM")
        except Interrupted as e:
            code = 0 if e.signum is None else SIGNAL_EXIT.get(e.signum, 1)
            say(f"{e.describe()}: stopping the VM")
        stop.set()
        for sig in (*SIGNAL_EXIT, signal.SIGUSR1):
            signal.signal(sig, on_signal)  # (a no-op now that stop is set)
        kv(log, logging.INFO, "host stopping", exit_status=code)
        phase = host.servicing_phase()
        if phase is not None:
            say(f"a servicing is in progress (phase {phase}); waiting up to {host_safe_point_s():g} s for it to "
                "reach a safe point")
        host.stop()
        say("VM stopped: the worker shut its NICs down, then every device and agent ended")
        return code
    finally:
        stop.set()
        host.stop()
        if server is not None:
            server.close()
        try:
            os.unlink(pidfile_path(run_dir))
        except FileNotFoundError:
            pass


def host_safe_point_s() -> float:
    from .vmm import SAFE_POINT_S
    return SAFE_POINT_S


#: `vfkeep service --require-keepalive` when a NIC did not take the keepalive path.
EXIT_NO_KEEPALIVE = 3


def parse_nic_list(text: str) -> list[int]:
    """`--nics I,J,...`: at least one index (range is checked by the host, which knows its NICs)."""
    try:
        nics = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated NIC indexes, got {text!r}", param_hint="--nics") from None
    if not nics:
        raise click.BadParameter("expected at least one NIC index, got none", param_hint="--nics")
    if any(i < 0 for i in nics):
        raise click.BadParameter(f"NIC indexes are >= 0, got {text!r}", param_hint="--nics")
    return nics


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
@click.option("--test-config", type=click.Choice(SAVE_TEST_CONFIGS, case_sensitive=False), metavar="HOOK",
              help="test hook for the current worker's save: " + "|".join(SAVE_TEST_CONFIGS))
@click.option("--next-env", multiple=True, metavar="KEY=VAL", help="environment of the next worker only")
@click.option("--next-worker-cmd", metavar="CMD", help="command of the next worker only")
@click.option("--nics", "nic_list", metavar="I,J,...", help="NICs configured in the next worker (default: same)")
@click.option("--tamper", type=click.Choice(TAMPER_MODES), help="test hook: damage the state handed over")
@click.option("--require-keepalive", is_flag=True,
              help="exit 3 unless every configured NIC took the keepalive path")
def service_command(run_dir, mana_keepalive, nvme_keepalive, timeout, as_json, test_config, next_env,
                    next_worker_cmd, nic_list, tamper, require_keepalive):
    """Service the paravisor of the host in --run-dir and print the servicing result.

    Exit status: 0 ok or degraded, 1 failed, 2 bad usage, 3 keepalive required but not taken by every NIC."""
    nics = None if nic_list is None else parse_nic_list(nic_list)
    with host_client(run_dir) as host:
        result = host.service(mana_keepalive=mana_keepalive, nvme_keepalive=nvme_keepalive, timeout=timeout,
                              test_config=test_config and test_config.upper(),
                              next_env=_env_pairs(next_env, "--next-env"), next_worker_cmd=next_worker_cmd,
                              nics=nics, tamper=tamper)
    if as_json:
        click.echo(json.dumps(result))
    else:
        render.print_servicing(result, Console())
    if result["status"] == "failed":
        sys.exit(1)
    if require_keepalive:
        missed = [f"{n['pci_id']} ({n['restore_path']}: {n['reason']})" for n in result["nics"]
                  if n["restore_path"] != "keepalive"]
        if missed or not result["mana_keepalive"]:
            click.echo("vfkeep: service: keepalive required but not taken: "
                       + ("; ".join(missed) if missed else "--mana-keepalive not given"), err=True)
            sys.exit(EXIT_NO_KEEPALIVE)


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
    """Stop the host in --run-dir (NICs shut down, every child ended) and wait for it to exit.
    Idempotent: with no host running it says so and exits 0."""
    run_dir = os.path.abspath(run_dir)
    try:
        reply = control.HostClient(run_dir, wait=30).stop()
    except rpc.Unavailable as e:
        pid = _pidfile_pid(run_dir)
        if pid is not None and _is_host(pid):  # alive but not answering (e.g. still booting): signal it
            os.kill(pid, signal.SIGTERM)
            reply = {"host_pid": pid, "servicing_phase": None}
        else:
            click.echo(f"no host running in {run_dir}; nothing to stop ({e})")
            return
    except rpc.RpcError as e:
        raise click.ClickException(str(e)) from None
    pid = reply["host_pid"]
    if reply.get("servicing_phase"):
        click.echo(f"host pid {pid}: a servicing is in progress (phase {reply['servicing_phase']}); it stops once "
                   "the servicing reaches a safe point")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _running(pid):
            click.echo(f"stopped host pid {pid} in {run_dir} (NICs shut down, every device and agent ended)")
            return
        time.sleep(0.05)
    raise click.ClickException(f"host pid {pid} still running after {timeout:g} s (see {run_dir}/{LOG_NAME})")


def _pidfile_pid(run_dir: str) -> int | None:
    try:
        with open(pidfile_path(run_dir)) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


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
        fail(f"state decode: {e}", 2)
    if as_json:
        click.echo(json.dumps(data))
    else:
        Console().print(render.tree(data, os.path.basename(file)))
