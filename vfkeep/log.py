"""Structured logging: key=value lines, one file per process in the run directory."""
from __future__ import annotations

import logging
import os
import pathlib
import re
import time


class KeyValueFormatter(logging.Formatter):
    """`ts=... mono=... level=... proc=... logger=... msg="..." k=v ...` (values from `extra={"kv": {...}}`).

    `mono` is CLOCK_MONOTONIC in nanoseconds when the line was logged (`_Holding` stamps it, so a line held
    through a servicing window keeps its time; else when it is formatted): one clock for every process of the
    machine, the one the guest agents and the host's servicing windows use, so a servicing can be traced across
    the run dir's logs to the microsecond.

    A line costs a servicing's critical path about 10 us of CPU per process (was 25): the date part of `ts` is
    formatted once per second, and values are quoted only when they must be."""

    _second: int | None = None
    _date = ""

    def format(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        if second != self._second:
            self._date, self._second = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)), second
        parts = [
            f"ts={self._date}.{int(record.msecs):03d}Z",
            f"mono={getattr(record, 'mono', None) or time.monotonic_ns()}",
            f"level={record.levelname.lower()}",
            f"pid={record.process}",
            f"logger={record.name}",
            f"msg={_quote(record.getMessage())}",
        ]
        for k, v in getattr(record, "kv", {}).items():
            parts.append(f"{k}={_quote(v)}")
        if record.exc_info:
            parts.append(f"exc={_quote(self.formatException(record.exc_info))}")
        return " ".join(parts)


_NEEDS_QUOTES = re.compile(r'[ "=\n\t]')


def _quote(v: object) -> str:
    s = v if type(v) is str else str(v)
    if s == "" or _NEEDS_QUOTES.search(s):
        return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return s


class _Holding:
    """A handler that can hold its lines (`hold_lines()`) and write them later (`write_held_lines()`, or when it
    is closed, as `logging.shutdown` does at exit): formatting and writing a line costs a process 10-50 us of CPU,
    which in a servicing window is taken from the guest's blackout. Each line is stamped with its `mono` when it is
    logged, so a held line says when it happened, not when it was written."""

    #: Held lines in order: records, or (logger, level, msg, fields, mono, time) that `kv` held (`hold`).
    _held: list[logging.LogRecord | tuple] | None = None

    def emit(self, record: logging.LogRecord) -> None:  # (under the handler's lock)
        record.__dict__.setdefault("mono", time.monotonic_ns())  # (`kv_at` gives its own)
        if self._held is not None:
            self._held.append(record)
        else:
            super().emit(record)

    def hold(self, logger: logging.Logger, level: int, msg: str, fields: dict, mono: int) -> bool:
        """Keep a `kv` line as its parts, made a record only when it is written (`_record`); False if this handler
        is not holding (the caller logs it the usual way)."""
        with self.lock:
            if self._held is None:
                return False
            self._held.append((logger, level, msg, fields, mono, time.time()))
            return True

    def hold_lines(self) -> None:
        with self.lock:
            if self._held is None:
                self._held = []

    def write_held_lines(self) -> None:  # (not `release`: a Handler's release() unlocks it)
        with self.lock:
            held, self._held = self._held, None
            for record in held or ():
                super().emit(record if isinstance(record, logging.LogRecord) else _record(*record))

    def close(self) -> None:
        self.write_held_lines()
        super().close()


class _HoldingFileHandler(_Holding, logging.FileHandler):
    pass


class _HoldingStreamHandler(_Holding, logging.StreamHandler):
    pass


def hold_lines() -> None:
    """Hold this process's log lines until `write_held_lines()` (or its exit): around work on a servicing's critical
    path (the old worker's save, the host's handoff). A line logged meanwhile is written with its own `mono`; a
    process killed (SIGKILL) before it writes them loses them, so a kill point writes them first."""
    for h in logging.getLogger().handlers:
        if isinstance(h, _Holding):
            h.hold_lines()


def write_held_lines() -> None:
    """Write the held lines (in order) and flush every handler."""
    for h in logging.getLogger().handlers:
        if isinstance(h, _Holding):
            h.write_held_lines()
        h.flush()


def _record(logger: logging.Logger, level: int, msg: str, fields: dict, mono: int, created: float) -> logging.LogRecord:
    """The record of a line `_Holding.hold` kept, with the time it was logged."""
    record = logger.makeRecord(logger.name, level, "(unknown file)", 0, msg, (), None, extra={"kv": fields, "mono": mono})
    record.created, record.msecs = created, int((created - int(created)) * 1000) + 0.0
    return record


def _holding_handler(logger: logging.Logger, level: int) -> _Holding | None:
    """The handler that would take `logger`'s line at `level` if it is the only one on its way (the root's one
    `_Holding` handler, no filter, no other handler: as `setup` leaves a process) and it may be holding; else None."""
    handlers = logging.root.handlers
    if len(handlers) != 1 or not isinstance(handlers[0], _Holding) or handlers[0]._held is None \
            or handlers[0].filters or not logger.isEnabledFor(level):
        return None
    node = logger
    while node is not logging.root:
        if node.handlers or node.filters or not node.propagate:
            return None
        node = node.parent
    return handlers[0] if not node.filters else None


def kv(logger: logging.Logger, level: int, msg: str, **fields: object) -> None:
    """Log `msg` with structured key=value fields. While the process holds its lines (`hold_lines`) a line is kept
    as its parts and made a record when it is written: making the record took 10-25 us of CPU a line (more in a
    process that had just woken), half a dozen of them inside a servicing's blackout in the new worker."""
    holder = _holding_handler(logger, level)
    if holder is None or not holder.hold(logger, level, msg, fields, time.monotonic_ns()):
        logger.log(level, msg, extra={"kv": fields})


def kv_at(logger: logging.Logger, level: int, mono_ns: int, msg: str, **fields: object) -> None:
    """`kv`, stamped with `mono_ns` (CLOCK_MONOTONIC ns: when it happened) instead of the time of the call: a line
    about a moment on a critical path, written once the path is done."""
    holder = _holding_handler(logger, level)
    if holder is None or not holder.hold(logger, level, msg, fields, mono_ns):
        logger.log(level, msg, extra={"kv": fields, "mono": mono_ns})


def cache_levels() -> None:
    """Look every existing logger's level up now, for each level (`Logger.isEnabledFor` caches it per logger):
    a worker does it before it serves, so the first line of each of the half-dozen loggers its restore logs on does
    not walk the logger hierarchy inside the guest's blackout (the only first-use cost a restore showed in a fresh
    process). A level or handler change empties every logger's cache again."""
    for logger in [logging.root, *logging.root.manager.loggerDict.values()]:
        if isinstance(logger, logging.Logger):
            for level in (logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR, logging.CRITICAL):
                logger.isEnabledFor(level)


#: `vfkeep --log-level` sets it for every process a command starts (they inherit the environment).
LEVEL_ENV = "VFKEEP_LOG_LEVEL"


def setup(process_name: str, run_dir: str | os.PathLike | None = None, level: int | None = None) -> logging.Logger:
    """Configure the root logger for this process: `<run_dir>/<process_name>.log` (append), or stderr; at
    `level`, else $VFKEEP_LOG_LEVEL (debug, info, warning, error), else info."""
    if level is None:
        level = getattr(logging, os.environ.get(LEVEL_ENV, "info").upper(), logging.INFO)
    # The formatter uses neither the caller's file and line nor the multiprocessing process name: not looked up
    # (the logging module's documented switches; a line in a servicing window costs CPU on its critical path).
    logging._srcfile = None
    logging.logMultiprocessing = False
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    if run_dir is not None:
        path = pathlib.Path(run_dir) / f"{process_name}.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        handler: logging.Handler = _HoldingFileHandler(path)
    else:
        handler = _HoldingStreamHandler()
    handler.setFormatter(KeyValueFormatter())
    root.addHandler(handler)
    root.setLevel(level)
    return logging.getLogger(process_name)
