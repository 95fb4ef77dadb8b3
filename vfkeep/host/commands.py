"""Host-side CLI commands (DESIGN §10): run, service, inspect, stop, state decode."""
from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time

import click

from ..cli import FloatRange, WholeSummaries
from .. import log as vlog
from .. import proc, rpc
from ..device.timing import timing_from, timing_options
from ..log import kv
from ..proc import Interrupted, signals_interrupt
from . import control, leftovers, render

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


def _nonempty_run_dir(ctx, param, value):
    """An empty --run-dir would be the current directory, whatever that holds: refused."""
    if value is not None and not str(value).strip():
        raise click.BadParameter("must name a directory, got ''", param_hint="--run-dir")
    return value


run_dir_option = click.option("--run-dir", default=default_run_dir, show_default="$VFKEEP_RUN_DIR or /tmp/vfkeep-UID",
                              type=click.Path(file_okay=False), callback=_nonempty_run_dir,
                              help="directory of the host's sockets, logs, state")


#: Exit status of `vfkeep run` after each signal (128 + signal number, as a shell reports it).
SIGNAL_EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGHUP: 129}
PIDFILE = "host.pid"
LOG_NAME = "host.log"
#: How a host is stopped, as a failure line says (`proc.stopped_line`): the console's Ctrl-Z stops it too.
HOST_STOPPED_BY = "SIGSTOP, or Ctrl-Z in its terminal"
#: `vfkeep run --detach` waits this long for the host it started to answer.
DETACH_READY_S = 60.0
#: ... and, interrupted, this long for it to stop (its boot wait and orderly stop) before it is killed.
DETACH_STOP_S = 30.0


def fail(message: str, code: int = 1) -> None:
    """One line on stderr naming the cause (and the log to read), then exit `code`."""
    click.echo(f"vfkeep: {message}", err=True)
    sys.exit(code)


def no_host(run_dir: str, e: rpc.Unavailable) -> str:
    """Why a command found no host in `run_dir`, and how to start one there; or, when its pidfile names a live host,
    that this one does not answer yet (it was "is a host running? (`vfkeep run ...`)" of a host still booting)."""
    pid = _pidfile_pid(run_dir)
    if pid is not None and _is_host(pid):
        return (f"{e}; host pid {pid} runs there but its control socket is not up: still starting, or the socket was "
                f"removed (host log: {os.path.join(os.path.abspath(run_dir), LOG_NAME)})")
    return f"{e}; is a host running? (`vfkeep run --run-dir {shlex.quote(os.path.abspath(run_dir))} --detach`)"


def stop_hint(run_dir: str) -> str:
    """The command that stops the host in `run_dir`, quoted for a shell (a run dir may hold a space)."""
    return f"`vfkeep stop --run-dir {shlex.quote(run_dir)}`"


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


def lock_run_dir(run_dir: str) -> int:
    """Hold `run_dir` for this process's life (an flock on the directory itself: no file to leave behind, gone
    with the process however it ends). Two `run`s started together both passed `claim_run_dir`'s checks, booted,
    and their devices fought over the same sockets, one host left running without its pidfile."""
    fd = None
    try:
        fd = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if fd is not None:
            os.close(fd)
        if not isinstance(e, BlockingIOError):
            fail(f"run: cannot lock --run-dir {run_dir}: {e.strerror}")
        pid = _pidfile_pid(run_dir)
        who = f"pid {pid}" if pid is not None and _is_host(pid) else "starting"
        fail(f"run: a host is already running in {run_dir} ({who}); stop it with {stop_hint(run_dir)}")
    return fd


def claim_run_dir(run_dir: str, keep: tuple[str, ...] = ()) -> str | None:
    """Refuse a run dir a live host serves; clean up what a dead one (e.g. SIGKILLed: its children died with
    it, PR_SET_PDEATHSIG) left (`remove_dead_hosts_leftovers`), never a path in `keep` (this run's --disk
    files). Returns a note about what was cleaned up, if anything."""
    pid = _pidfile_pid(run_dir)
    if pid is not None and pid != os.getpid() and _is_host(pid):
        fail(f"run: a host is already running in {run_dir} (pid {pid}); stop it with {stop_hint(run_dir)}")
    if os.path.exists(control.socket_path(run_dir)):
        try:
            control.HostClient(run_dir, wait=2.0).status()
        except rpc.Unavailable:
            pass  # stale: removed below
        else:
            fail(f"run: a host is already running in {run_dir}; stop it with {stop_hint(run_dir)}")
    return remove_dead_hosts_leftovers(run_dir, "run", keep)


def remove_dead_hosts_leftovers(run_dir: str, command: str, keep: tuple[str, ...] = ()) -> str | None:
    """What a host that died without its teardown left, and only that (`leftovers`): its pidfile, its
    sockets nobody listens on, its network namespaces, the disk files it created, its children's empty
    stderr files. Returns "removed the ... left in DIR", or None when there was nothing."""
    notes = []
    pid = _pidfile_pid(run_dir)
    if os.path.exists(pidfile_path(run_dir)):
        os.unlink(pidfile_path(run_dir))
        notes.append(f"pidfile of dead host pid {pid}")
    try:
        notes += leftovers.remove_leftovers(run_dir, keep)
    except leftovers.LeftoverError as e:
        fail(f"{command}: {e}")
    return f"removed the {' and '.join(notes)} left in {run_dir}" if notes else None


def _run_argv(config, timing, hwc_latency_ms, flr_ms, worker_env) -> list[str]:
    """`vfkeep run --no-console` with the same configuration (what --detach starts in the background)."""
    argv = ["run", "--no-console", "--run-dir", config.run_dir, "--nics", str(config.nics), "--backend", config.backend,
            "--timing", timing, "--ring-slots", str(config.ring_slots), "--keep-worker-logs", str(config.keep_worker_logs),
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
    if config.nvme:
        argv += ["--nvme", str(config.nvme), "--disk-size", str(config.disk_size)]
        for disk in config.disks:
            argv += ["--disk", disk]
    return proc.vfkeep_argv(*argv)


def _parse_size(text: str) -> int:
    """`4096`, `64K`, `64M`, `1G` (binary units) -> bytes."""
    m = re.fullmatch(r"\s*(\d+)\s*([KMG]?)\s*", str(text), re.IGNORECASE)
    if not m:
        raise click.BadParameter(f"{text!r} is not a size like 4096, 64K, 64M or 1G", param_hint="--disk-size")
    return int(m.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30}[m.group(2).upper()]


def _detach(argv: list[str], run_dir: str) -> None:
    """Start the host in a session of its own (no terminal, survives this shell) and return once it answers;
    if it exits first, its one-line cause is ours."""
    log_path = os.path.join(run_dir, LOG_NAME)
    stderr_path = os.path.join(run_dir, "host.stderr")
    signals_interrupt()
    child = None
    try:
        with open(stderr_path, "ab") as err:  # an interrupt during the start: `spawn` ends the host it started
            child = proc.spawn(argv, stdout=err, stderr=err, session=True)
        try:
            _wait_detached(child, run_dir, stderr_path, log_path)
        except KeyboardInterrupt:  # the host would boot on in its own session: stop it (SIGTERM: in order)
            proc.end(child, DETACH_STOP_S)
            raise
    except KeyboardInterrupt as e:
        pid = f" (pid {child.pid})" if child else ""
        log = f" (log: {log_path})" if child else ""
        e.note = f"the host starting in the background{pid} was stopped, every child ended{log}"
        raise


def _wait_detached(child: subprocess.Popen, run_dir: str, stderr_path: str, log_path: str) -> None:
    deadline = time.monotonic() + DETACH_READY_S
    while time.monotonic() < deadline:
        code = child.poll()
        if code is not None:
            from .devices import last_line
            cause = last_line(stderr_path).removeprefix("vfkeep: ")  # the host's own one-line cause
            fail(cause or f"run: host exited with status {code} during start-up (see {stderr_path})", code or 1)
        try:
            status = control.HostClient(run_dir, wait=2.0).status()
        except rpc.RpcError:
            status = None
        if status is None or status["host_pid"] != child.pid:  # (not another host: ours then fails, saying why)
            time.sleep(0.05)
            continue
        click.echo(f"vfkeep host running: pid {status['host_pid']}, run dir {run_dir}, log {log_path}")
        for w in status.get("warnings") or []:
            click.echo(f"warning: {w}", err=True)
        return
    child.kill()
    fail(f"run: host did not answer within {DETACH_READY_S:g} s; it was ended (see {log_path})")


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
                   "default pool +256 pages per NIC)")
@click.option("--guest", type=click.Choice(["agent", "netns"]), default="agent", show_default=True,
              help="agent: traffic agents on request; netns: per NIC a network namespace with a TAP (the NIC's "
                   "MAC, 198.18.N.2) whose peer 198.18.N.1 sits behind the device's TAP; needs root")
@click.option("--keep-worker-logs", type=click.IntRange(1), default=10, show_default=True, metavar="K",
              help="keep the logs of the last K worker generations in the run dir")
@click.option("--nvme", type=int, default=0, show_default=True,
              help="NVMe controllers (device processes, 0-16), each a guest disk with a block channel")
@click.option("--disk", "disks", multiple=True, type=click.Path(dir_okay=False), metavar="FILE",
              help="backing file of the next NVMe disk (repeat; its data outlives the run) [default: a sparse file "
                   "in the run dir, removed when the host stops]")
@click.option("--disk-size", callback=lambda ctx, param, v: _parse_size(v), default="64M", show_default=True,
              metavar="SIZE",
              help="size of each NVMe disk (4096, 64M, 1G)")
def run_command(run_dir, detach, no_console, nics, backend, pool_pages, timing, hwc_latency_ms, flr_ms, prelaunch,
                ring_slots, worker_cmd, worker_env, datapath_keepalive, guest, keep_worker_logs, nvme, disks,
                disk_size):
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
                            guest=guest, keep_worker_logs=keep_worker_logs, nvme=nvme,
                            disks=[os.path.abspath(d) for d in disks], disk_size=disk_size)
        config.check()
    except (HostError, ValueError, click.BadParameter) as e:
        fail(f"run: {e.format_message() if isinstance(e, click.BadParameter) else e}", 2)
    try:
        os.makedirs(run_dir, exist_ok=True)
    except OSError as e:
        fail(f"run: cannot create --run-dir {run_dir}: {e.strerror}", 2)
    lock = lock_run_dir(run_dir)  # (held until this process exits)
    cleaned = claim_run_dir(run_dir, keep=tuple(config.disks))
    if cleaned:
        click.echo(f"vfkeep: {cleaned}", err=True)
    if detach:
        os.close(lock)  # the host it starts takes it (and says so if another one got it first)
        _detach(_run_argv(config, timing, hwc_latency_ms, flr_ms, worker_env), run_dir)
        return
    sys.exit(_serve(Host(config), run_dir, console=not no_console))


def _serve(host, run_dir: str, console: bool) -> int:
    """Boot, serve the control socket (and the console) until quit, `vfkeep stop` or a signal, then stop in
    order (worker first, then devices). Returns the exit status."""
    from .console import HostConsole
    from .disks import DiskError
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
                "traffic": host.traffic, "disk": host.disk, "exec": host.exec, "stop": on_stop},
                refused=(HostError, TrafficError, DiskError),
                events=host.events)
            server.start()
        except Interrupted as e:
            kv(log, logging.INFO, "interrupted during boot", cause=e.describe())
            click.echo(f"vfkeep: run: interrupted ({e.describe()}) during start-up; every child ended (log: "
                       f"{log_path})", err=True)
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
        if phase == "prelaunch":  # (`Host.stop` ends the starting worker: there is nothing to wait for)
            say("a servicing is in progress (phase prelaunch): abandoned before its save, the next worker ended")
        elif phase is not None:
            say(f"a servicing is in progress (phase {phase}); waiting up to {host_safe_point_s():g} s for it to "
                "reach a safe point")
        host.stop()
        done = host.stop_outcome
        say(f"VM stopped: {done['summary']}, then every device and agent ended" if done["worker"] != "unknown"
            else f"VM stopped: {done['summary']}")
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


def _pidfile_pid(run_dir: str) -> int | None:
    try:
        with open(pidfile_path(run_dir)) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _running(pid: int) -> bool:
    """True while `pid` exists and is not a zombie (the host may be the caller's unreaped child)."""
    return proc.process_state(pid) not in (None, "Z")


@click.command("events")
@run_dir_option
@click.option("--json", "as_json", is_flag=True, help="one JSON object per line, as the control socket sends them")
@click.option("--count", type=click.IntRange(1), default=None, help="exit after this many events")
@click.option("--timeout", type=FloatRange(min=0, min_open=True), default=None,
              help="exit when no event came for this many seconds (exit 0; with --count, before that many events "
              "came: exit 1)")
def events_command(run_dir, as_json, count, timeout):
    """Stream the host's events (servicing started, phase done, completed, NIC state changes, stopping)
    until it stops (exit 0). The control socket's `events` command (docs/control-api.md); a host that does not
    answer it within 5 s, is stopped (SIGSTOP) when asked, or dies without stopping is a failure (exit 1); one
    stopped mid-stream is named on stderr within seconds, and the stream goes on once it is continued."""
    seen = 0
    log_path = os.path.join(os.path.abspath(run_dir), LOG_NAME)
    pid = _pidfile_pid(run_dir)  # (written before the host serves its socket)
    said: list[str] = []  # the line said while the host is stopped

    def watch() -> None:
        """Every second without an event: a stopped host sends nothing until continued. Say so, and when it
        continues, rather than wait in silence (a stream that may wait for hours cannot take it as a failure)."""
        line = proc.stopped_line(f"host pid {pid}", pid, HOST_STOPPED_BY) if pid is not None else None
        if line and not said:
            click.echo(f"vfkeep: events: {line}; waiting for it (host log: {log_path})", err=True)
        elif said and not line:
            click.echo(f"vfkeep: events: host pid {pid} continued", err=True)
        said[:] = [line] if line else []

    def refuse() -> None:
        """While the subscription is awaited: a stopped host is a failure, as for every command (not 5 s of
        silence, then "did not answer")."""
        if pid is not None and (line := proc.stopped_line(f"host pid {pid}", pid, HOST_STOPPED_BY)):
            e = click.ClickException(f"{line} (host log: {log_path})")
            e.kind = "Stopped"  # (its JSON error type, as for the other commands)
            raise e

    try:
        stream = control.HostClient(run_dir, patience=refuse).events(timeout, patience=watch)
    except rpc.Timeout as e:  # it took the connection: a host, hung or too busy to answer (not "no events")
        raise click.ClickException(f"the host did not answer: {e} (host log: {log_path})") from None
    except rpc.Unavailable as e:
        raise click.ClickException(no_host(run_dir, e)) from None
    except rpc.RpcError as e:
        raise click.ClickException(f"{e} (host log: {log_path})") from None
    stopping = False
    try:
        for event in stream:
            if as_json:
                click.echo(json.dumps(event))
            else:
                when = time.strftime("%H:%M:%S", time.localtime(event["ts"])) + f".{int(event['ts'] % 1 * 1000):03d}"
                click.echo(f"{when} {event['event']} " + " ".join(f"{k}={_plain(v)}" for k, v in event["data"].items()))
            stopping = stopping or event["event"] == "host_stopping"
            seen += 1
            if count is not None and seen >= count:
                return
    except rpc.Timeout:  # --timeout: no event came for that long
        if count is not None:  # (fewer than asked: a script waiting for N events must not take this as success)
            raise click.ClickException(f"no event for {timeout:g} s, {seen} of the {count} asked for with --count "
                                       f"(host log: {log_path})") from None
        return
    except rpc.RpcError as e:
        raise click.ClickException(f"{e} (host log: {log_path})") from None
    if not stopping:  # the stream ended without the host saying it stops: it died (SIGKILL, a crash)
        raise click.ClickException(_stream_ended(pid, log_path))


def _stream_ended(pid: int | None, log_path: str) -> str:
    """Why an event stream ended without a host_stopping event."""
    if pid is None:
        return f"the host closed the event stream without stopping (host log: {log_path})"
    deadline = time.monotonic() + 2.0
    while _running(pid) and time.monotonic() < deadline:  # (its socket closes before it is gone)
        time.sleep(0.02)
    if _running(pid):
        return f"host pid {pid} closed the event stream without stopping (host log: {log_path})"
    return f"host pid {pid} died without stopping in order (killed, or it crashed; host log: {log_path})"


def _plain(v) -> str:
    """A value on one line: JSON for structures, as is otherwise."""
    return json.dumps(v) if isinstance(v, (dict, list)) or v is None or isinstance(v, bool) else str(v)


@click.group("state", cls=WholeSummaries)
def state_group():
    """Saved servicing state."""


@state_group.command("decode")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="machine-readable output (errors too)")
def decode_command(file, as_json):
    """Pretty-print a ServicingState blob (the host keeps the last one it handed to a new worker as
    <run-dir>/servicing_state.bin; after `service --tamper` that is the tampered blob, and the old worker's own
    save is <run-dir>/servicing_state.untampered.bin).
    Exit 2 when the file is not a ServicingState (empty, truncated, not protobuf, no init_state)."""
    from .decode import UndecodableState, decode_file  # (protobuf: no other command needs it)
    try:
        data = decode_file(file)
    except UndecodableState as e:
        if as_json:
            click.echo(json.dumps({"ok": False, "error": {"type": "UndecodableState", "message": str(e)}}))
            sys.exit(2)
        fail(f"state decode: {e}", 2)
    if as_json:
        click.echo(json.dumps(data))
    else:
        render.print_tree(data, os.path.basename(file), render.stdout())
