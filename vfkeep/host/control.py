"""Host control socket (`<run-dir>/host.sock`) and `HostClient`, the one client of a running host.

The socket speaks `vfkeep.rpc` (a thread per connection) and is the host's public API (docs/control-api.md):
a greeting line on connect (API name and version, commands, capabilities), the `Host` operations
(`service`, `inspect`, `status`, `probe`, `traffic`, `disk`, `exec`, `stop`) and `events`, which turns its
connection into a stream of the host's events (host/events.py). The CLI, the tests and the benchmarks all
go through `HostClient` (`host/detached.py` adds starting a host in another process).
"""
from __future__ import annotations

import logging
import os
from typing import Any, Callable

from .. import __version__, rpc
from .events import KINDS, EventBus

log = logging.getLogger("vfkeep.host.control")

SOCKET_NAME = "host.sock"
#: The control API's name and version (docs/control-api.md): the version grows when a command, reply or
#: event changes incompatibly; additions (a field, a command, an event kind) keep it.
API_NAME = "vfkeep.host"
API_VERSION = 1


class HostRunning(Exception):
    """Another host already serves this run directory."""


class HostGone(rpc.Unavailable):
    """The host took the request and closed the connection without an answer: it stopped or died meanwhile."""

    @property
    def type(self) -> str:
        return "Unavailable"


def socket_path(run_dir: str) -> str:
    return os.path.join(run_dir, SOCKET_NAME)


def serve(run_dir: str, handlers: dict[str, Callable[..., Any]],
          refused: tuple[type[Exception], ...], events: EventBus | None = None) -> rpc.ThreadedServer:
    """The control socket of the host in `run_dir` (not yet started); `refused` are the exceptions with which
    the handlers say no; `events`, the bus the `events` command subscribes to. A socket file left by a dead
    host is replaced; a live host is HostRunning."""
    path = socket_path(run_dir)
    if os.path.exists(path):
        try:
            HostClient(run_dir, wait=2.0).status()
        except rpc.Unavailable:
            pass  # stale socket of a dead host
        else:
            raise HostRunning(f"a host is already running in {run_dir}")
    handlers = dict(handlers)
    if events is not None:
        def subscribe() -> rpc.Stream:
            """Every event from now on, one line each, until the host stops or the client hangs up."""
            return rpc.Stream({"subscribed": sorted(KINDS)}, events.subscribe())
        handlers["events"] = subscribe

    def greeting() -> dict[str, Any]:
        return {"greeting": {"api": API_NAME, "api_version": API_VERSION, "vfkeep": __version__,
                             "host_pid": os.getpid(), "run_dir": os.path.abspath(run_dir),
                             "commands": sorted(handlers), "capabilities": ["events"] if events else []}}

    return rpc.ThreadedServer(path, rpc.Dispatcher(log, handlers, refused), name="host-control", greeting=greeting)


class HostClient:
    """Requests to the host in `run_dir`, each on a connection of its own (so any thread may use it).

    `wait`: seconds to wait for an answer (None: as long as it takes, e.g. a servicing); every method takes
    `wait=` to override it. `patience`: called every second while an answer is awaited, it may raise to stop
    waiting (`rpc.RpcClient.call`). Errors are `vfkeep.rpc` errors: `Unavailable` when no host answers,
    `Timeout` when it took the request but did not answer in time, `Refused` when the host said no.
    """

    def __init__(self, run_dir: str, wait: float | None = None, patience: Callable[[], None] | None = None):
        self.run_dir = os.path.abspath(run_dir)
        self.wait = wait
        self.patience = patience

    @property
    def path(self) -> str:
        return socket_path(self.run_dir)

    def call(self, cmd: str, args: dict[str, Any] | None = None, wait: float | None = rpc.DEFAULT_TIMEOUT) -> Any:
        try:
            client = rpc.RpcClient(self.path, self.wait if wait is rpc.DEFAULT_TIMEOUT else wait)
        except rpc.Unavailable as e:
            raise rpc.Unavailable(f"no host answering in {self.run_dir}: {e}") from None
        with client:
            try:
                return client.call(cmd, args, patience=self.patience)
            except rpc.Timeout:
                raise
            except rpc.Unavailable as e:
                raise HostGone(f"the host in {self.run_dir} went away before answering: {e}") from None

    def status(self, wait: float | None = rpc.DEFAULT_TIMEOUT) -> dict:
        return self.call("status", None, wait)

    def service(self, wait: float | None = rpc.DEFAULT_TIMEOUT, **request) -> dict:
        """One servicing (`mana_keepalive`, `nvme_keepalive`, `timeout`, ...): the servicing result's JSON form
        (`contract.ServicingResult.from_json` types it)."""
        return self.call("service", request, wait)

    def inspect(self, path: str | None = None, wait: float | None = rpc.DEFAULT_TIMEOUT) -> Any:
        return self.call("inspect", {"path": path}, wait)

    def probe(self, nic: int = 0, count: int = 8, wait: float | None = rpc.DEFAULT_TIMEOUT) -> dict:
        return self.call("probe", {"nic": nic, "count": count}, wait)

    def traffic(self, action: str, wait: float | None = rpc.DEFAULT_TIMEOUT, **args) -> dict:
        return self.call("traffic", {"action": action, **args}, wait)

    def disk(self, action: str, wait: float | None = rpc.DEFAULT_TIMEOUT, **args) -> dict:
        """Guest disk IO: `start` (rate, qd, read_pct, disk), `stop`, `stats`, `verify`, `status`."""
        return self.call("disk", {"action": action, **args}, wait)

    def exec(self, nic: int, argv: list[str], timeout: float = 30.0, wait: float | None = rpc.DEFAULT_TIMEOUT) -> dict:
        """Run `argv` in guest `nic`'s network namespace (`--guest netns`): `{returncode, stdout, stderr, timed_out}`."""
        return self.call("exec", {"nic": nic, "argv": argv, "timeout": timeout}, wait)

    def events(self, timeout: float | None = None, patience: Callable[[], None] | None = None):
        """Subscribe now (errors, a host that never answers included, are raised here: rpc.Timeout after
        `wait`, 5 s by default; the client's `patience` as for any call), then an iterator of the host's events
        (dicts, see host/events.py) until it stops; `timeout` bounds the wait for each (rpc.Timeout from the
        iterator: quiet, not a failure). `patience` is called every second without an event."""
        try:
            client = rpc.RpcClient(self.path, timeout=5.0 if self.wait is None else self.wait)
        except rpc.Unavailable as e:
            raise rpc.Unavailable(f"no host answering in {self.run_dir}: {e}") from None
        try:
            client.call("events", patience=self.patience)
        except BaseException:
            client.close()
            raise
        return self._pushed(client, timeout, patience)

    @staticmethod
    def _pushed(client: rpc.RpcClient, timeout: float | None, patience: Callable[[], None] | None):
        with client:
            while (event := client.pushed(timeout, patience)) is not None:
                yield event

    def stop(self, wait: float | None = rpc.DEFAULT_TIMEOUT) -> dict:
        """Ask the host to stop (it answers first): `{stopping, host_pid}`."""
        return self.call("stop", None, wait)
