"""Guest disk IO agent: one process per disk driving `DiskIo` on the disk's block channel (issue 13 item 4).

It runs across servicings untouched, so its records show what the guest saw while the worker was
replaced: the IO blackout, every request completed exactly once, every block verified.

Control: a `vfkeep.rpc` socket; command(args) -> result:

    start(rate=0, qd=8, read_pct=50)        -> {rate, qd, read_pct}       (rate 0: as fast as qd allows)
    stop()                                  -> {submitted}
    stats(since_ns=None, until_ns=None)     -> DiskIo.stats(): counters, outstanding, iops, latency_ms
                                               {p50, p99, max}, io_blackout_ms, bad_blocks, ...
    verify(qd=8, timeout=60)                -> {chunks, blocks, verify_errors, bad_blocks, stats}: stop, wait,
                                               read back every chunk written; what this read-back found
    requeue(popped_before)                  -> {requeued}: re-push what a dead worker had popped (DiskIo.requeue)
    status()                                -> {running, counters, rings}
    quit()                                  -> {}, then the agent exits 0 (so does SIGTERM)

Times are CLOCK_MONOTONIC ns, so the host can ask for the stats of its servicing window.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import threading

from .. import rpc
from ..log import kv, setup
from ..memory.guest_memory import GuestMemory, MemoryLayout
from ..proc import READY_TIMEOUT_S, NotReady, spawn_ready
from .block import BlockChannel, BlockLayout
from .disk_io import DiskIo
from .ring import RingError

log = logging.getLogger("vfkeep.guest.disk_agent")


class DiskAgentError(Exception):
    """The agent could not be started."""


def control_server(path: str, io: DiskIo, quitting: threading.Event) -> rpc.ThreadedServer:
    def refused(fn):
        def call(**args):
            try:
                return fn(**args)
            except (ValueError, TimeoutError) as e:
                raise rpc.Refused(str(e)) from None
        return call

    def quit_() -> dict:
        quitting.set()
        return {}

    def verify(qd: int = 8, timeout: float = 60.0) -> dict:
        errors, kept = io.counters["verify_errors"], len(io.bad_blocks)
        chunks = io.verify_all(qd, timeout)
        found, bad = io.counters["verify_errors"] - errors, io.bad_blocks[kept:kept + 20]
        kv(log, logging.ERROR if found else logging.INFO, "verify found bad blocks" if found else "verify done",
           chunks=chunks, blocks=chunks * io.io_blocks, bad_blocks=found, first=bad[0] if bad else None)
        return {"chunks": chunks, "blocks": chunks * io.io_blocks, "verify_errors": found, "bad_blocks": bad,
                "stats": io.stats()}

    commands = {"start": refused(io.start), "stop": io.stop, "stats": refused(io.stats), "verify": refused(verify),
                "status": lambda: {"running": io.running, "counters": dict(io.counters),
                                   "rings": {"requests": io.channel.requests.stats().to_dict(),
                                             "completions": io.channel.completions.stats().to_dict()}},
                "requeue": refused(lambda popped_before: {"requeued": io.requeue(popped_before)}),
                "quit": quit_}
    return rpc.ThreadedServer(path, rpc.Dispatcher(log, commands), name="disk-agent-control")


def spawn_disk_agent(mem: GuestMemory, block_layout: BlockLayout, disk: int, request_fd: int, completion_fd: int,
                     control_path: str, *, lbas: int, block_size: int = 512, run_dir: str | None = None,
                     ready_timeout: float = READY_TIMEOUT_S) -> subprocess.Popen:
    """Start the agent of disk `disk` (it dies with the caller); return once its control socket listens."""
    argv = [sys.executable, "-m", "vfkeep.guest.disk_agent", "--memfd", str(mem.fd), "--layout",
            mem.layout.to_str(), "--block-layout", block_layout.to_str(), "--disk", str(disk), "--request-fd",
            str(request_fd), "--completion-fd", str(completion_fd), "--control", control_path, "--lbas", str(lbas),
            "--block-size", str(block_size)]
    if run_dir is not None:
        argv += ["--run-dir", str(run_dir)]
    try:
        return spawn_ready(argv, pass_fds=(mem.fd, request_fd, completion_fd), timeout=ready_timeout)
    except NotReady as e:
        where = f" (see {run_dir}/disk-agent-{disk}.log)" if run_dir else ""
        if e.returncode is None:
            raise DiskAgentError(f"disk agent for disk {disk} not ready within {ready_timeout}s{where}") from None
        raise DiskAgentError(f"disk agent for disk {disk} exited with status {e.returncode} before "
                             f"listening{where}") from None

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vfkeep.guest.disk_agent", description=__doc__.split("\n")[0])
    p.add_argument("--memfd", type=int, required=True)
    p.add_argument("--layout", required=True, help="MemoryLayout string")
    p.add_argument("--block-layout", required=True, help="BlockLayout string")
    p.add_argument("--disk", type=int, required=True)
    p.add_argument("--request-fd", type=int, required=True)
    p.add_argument("--completion-fd", type=int, required=True)
    p.add_argument("--control", required=True)
    p.add_argument("--lbas", type=int, required=True, help="blocks of the disk the agent uses, from LBA 0")
    p.add_argument("--block-size", type=int, default=512)
    p.add_argument("--run-dir")
    p.add_argument("--ready-fd", type=int)
    args = p.parse_args(argv)

    setup(f"disk-agent-{args.disk}", args.run_dir)
    quitting = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: quitting.set())
    try:
        mem = GuestMemory.attach(args.memfd, MemoryLayout.from_str(args.layout))
        os.close(args.memfd)
        channel = BlockChannel.attach(mem, BlockLayout.from_str(args.block_layout), args.disk, args.request_fd,
                                      args.completion_fd)
        io = DiskIo(channel, mem, lbas=args.lbas, block_size=args.block_size, seed=args.disk)
    except (OSError, ValueError, RingError) as e:
        kv(log, logging.ERROR, "cannot attach to the block channel", disk=args.disk, error=repr(e))
        return 2
    server = control_server(args.control, io, quitting)
    server.start()
    kv(log, logging.INFO, "disk agent ready", disk=args.disk, control=args.control, max_qd=io.max_qd)
    if args.ready_fd is not None:
        os.write(args.ready_fd, b"ready\n")
        os.close(args.ready_fd)
    quitting.wait()
    server.close()
    io.close()
    kv(log, logging.INFO, "disk agent exited", **io.counters)
    channel.close()
    mem.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
