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

    _held: list[logging.LogRecord] | None = None

    def emit(self, record: logging.LogRecord) -> None:  # (under the handler's lock)
        record.__dict__.setdefault("mono", time.monotonic_ns())  # (`kv_at` gives its own)
        if self._held is not None:
            self._held.append(record)
        else:
            super().emit(record)

    def hold_lines(self) -> None:
        with self.lock:
            if self._held is None:
                self._held = []

    def write_held_lines(self) -> None:  # (not `release`: a Handler's release() unlocks it)
        with self.lock:
            held, self._held = self._held, None
            for record in held or ():
                super().emit(record)

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


def kv(logger: logging.Logger, level: int, msg: str, **fields: object) -> None:
    """Log `msg` with structured key=value fields."""
    logger.log(level, msg, extra={"kv": fields})


def kv_at(logger: logging.Logger, level: int, mono_ns: int, msg: str, **fields: object) -> None:
    """`kv`, stamped with `mono_ns` (CLOCK_MONOTONIC ns: when it happened) instead of the time of the call: a line
    about a moment on a critical path, written once the path is done."""
    logger.log(level, msg, extra={"kv": fields, "mono": mono_ns})


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
