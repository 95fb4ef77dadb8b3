"""Guest TAP bridge: the guest of `vfkeep run --guest netns`, one process per NIC.

It lives in the NIC's guest namespace and owns a TAP interface there with the NIC's MAC and the
guest address, so real Linux tools (ping, a TCP socket, `ip`, `ss`) are the guest. It moves
frames between that TAP and the NIC's guest channel rings (DESIGN §7) and runs across servicings
untouched: what the kernel sends while no worker relays waits in the tx ring.

- TAP -> tx ring (guest -> worker): read every frame the kernel has queued (up to `BATCH`), one
  `push_many` (one doorbell) per batch. A frame the full ring refuses is counted twice, as for the
  traffic agent: the ring's `dropped_full` and the bridge's `tx_ring_full`.
- rx ring (worker -> guest) -> TAP: woken by the rx doorbell eventfd, `pop_many(BATCH)`, one write
  per frame; a write the kernel refuses counts in `tap_write_errors`.

Control: a `vfkeep.rpc` socket, as the traffic agent's (`AgentClient` talks to it): `status` ->
counters and ring stats, `quit` -> exit 0 (so does SIGTERM/SIGINT).

    python -m vfkeep.guest.bridge --memfd N --layout L --channel C --nic I --tx-fd A --rx-fd B
        --netns NAME --mac MAC --address A.B.C.D/LEN --control PATH [--tap NAME] [--run-dir DIR] [--ready-fd W]
"""
from __future__ import annotations

import argparse
import logging
import os
import select
import signal
import subprocess
import sys
import threading

from .. import netns, rpc
from ..log import kv, setup
from ..memory.guest_memory import GuestMemory, MemoryLayout
from ..proc import READY_TIMEOUT_S, NotReady, spawn_ready
from .agent import AgentError
from .ring import ChannelLayout, NicChannel, RingError

log = logging.getLogger("vfkeep.guest.bridge")

BATCH = 64
MAX_FRAME = 65536


class Bridge:
    """The frame pump: one thread, poll on the TAP, the rx doorbell and a stop eventfd."""

    def __init__(self, channel: NicChannel, tap_fd: int):
        self.channel = channel
        self.tap_fd = tap_fd
        self.counters = {"tap_rx_frames": 0, "tap_rx_bytes": 0, "tap_tx_frames": 0, "tap_tx_bytes": 0,
                         "tx_ring_full": 0, "tx_too_big": 0, "tap_write_errors": 0, "wakeups": 0}
        self.error: str | None = None
        self._stop_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="bridge", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        os.eventfd_write(self._stop_fd, 1)
        self._thread.join()
        os.close(self._stop_fd)

    def _run(self) -> None:
        rx_bell = self.channel.rx.doorbell
        poller = select.poll()
        for fd in (self.tap_fd, rx_bell.fd, self._stop_fd):
            poller.register(fd, select.POLLIN)
        try:
            while not self._stopping:
                rx_bell.clear()  # before popping: a ring that races with the pop leaves the eventfd set
                moved = self._to_guest() + self._from_guest()
                if moved:
                    continue
                poller.poll()
                self.counters["wakeups"] += 1
        except (OSError, RingError) as e:  # a dead pump shows in status, not only in the log
            self.error = repr(e)
            kv(log, logging.ERROR, "bridge stopped moving frames", error=repr(e))

    def _from_guest(self) -> int:
        """One batch the guest's kernel sent on the TAP -> tx ring."""
        frames = []
        max_frame = self.channel.tx.max_frame
        c = self.counters
        while len(frames) < BATCH:
            try:
                frame = os.read(self.tap_fd, MAX_FRAME)
            except BlockingIOError:
                break
            if len(frame) > max_frame:
                c["tx_too_big"] += 1
                continue
            frames.append(frame)
        if not frames:
            return 0
        taken = self.channel.tx.push_many(frames)
        c["tap_rx_frames"] += len(frames)
        c["tap_rx_bytes"] += sum(len(f) for f in frames)
        c["tx_ring_full"] += len(frames) - taken
        return len(frames)

    def _to_guest(self) -> int:
        """One batch from the rx ring -> the guest's kernel."""
        frames = self.channel.rx.pop_many(BATCH)
        c = self.counters
        for frame in frames:
            try:
                os.write(self.tap_fd, frame)
                c["tap_tx_frames"] += 1
                c["tap_tx_bytes"] += len(frame)
            except OSError:
                c["tap_write_errors"] += 1
        return len(frames)

    def status(self) -> dict:
        return {"running": self._thread.is_alive(), **self.counters, "error": self.error,
                "rings": {"tx": self.channel.tx.stats().to_dict(), "rx": self.channel.rx.stats().to_dict()}}


# -- control -------------------------------------------------------------------------------------
def control_server(path: str, bridge: Bridge, quitting: threading.Event) -> rpc.ThreadedServer:
    """The bridge's `vfkeep.rpc` socket: `status` (counters, rings), `quit` (sets `quitting`)."""

    def quit_() -> dict:
        quitting.set()
        return {}

    return rpc.ThreadedServer(path, rpc.Dispatcher(log, {"status": bridge.status, "quit": quit_}),
                              name="bridge-control")


# -- process -------------------------------------------------------------------------------------
def spawn_bridge(mem: GuestMemory, channel_layout: ChannelLayout, nic: int, tx_fd: int, rx_fd: int, *,
                 ns: str, mac: bytes, address: str, control_path: str, run_dir: str | None = None,
                 ready_timeout: float = READY_TIMEOUT_S) -> subprocess.Popen:
    """Start the bridge of NIC `nic` in namespace `ns` (it dies with the caller); returns once its TAP is up
    and its control socket listens, else AgentError (with its exit status)."""
    argv = [sys.executable, "-m", "vfkeep.guest.bridge", "--memfd", str(mem.fd), "--layout", mem.layout.to_str(),
            "--channel", channel_layout.to_str(), "--nic", str(nic), "--tx-fd", str(tx_fd), "--rx-fd", str(rx_fd),
            "--netns", ns, "--mac", mac.hex(":"), "--address", address, "--control", control_path]
    if run_dir is not None:
        argv += ["--run-dir", run_dir]
    try:
        return spawn_ready(argv, pass_fds=(mem.fd, tx_fd, rx_fd), timeout=ready_timeout)
    except NotReady as e:
        where = f" (see {run_dir}/guest-bridge-{nic}.log)" if run_dir else ""
        if e.returncode is None:
            raise AgentError(f"guest bridge for nic {nic} not ready within {ready_timeout}s{where}") from None
        raise AgentError(f"guest bridge for nic {nic} exited with status {e.returncode} before its TAP was "
                         f"up{where}") from None

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vfkeep.guest.bridge", description=__doc__.split("\n")[0])
    p.add_argument("--memfd", type=int, required=True)
    p.add_argument("--layout", required=True, help="MemoryLayout string")
    p.add_argument("--channel", required=True, help="ChannelLayout string")
    p.add_argument("--nic", type=int, required=True)
    p.add_argument("--tx-fd", type=int, required=True, help="guest->worker doorbell eventfd")
    p.add_argument("--rx-fd", type=int, required=True, help="worker->guest doorbell eventfd")
    p.add_argument("--netns", required=True, help="guest network namespace to live in")
    p.add_argument("--tap", default=netns.GUEST_TAP, help="TAP interface name inside the namespace")
    p.add_argument("--mac", required=True, help="the NIC's MAC")
    p.add_argument("--address", required=True, help="guest IPv4 address with prefix length")
    p.add_argument("--control", required=True, help="UNIX socket path to serve")
    p.add_argument("--run-dir", help="log to <run-dir>/guest-bridge-<nic>.log (default: stderr)")
    p.add_argument("--ready-fd", type=int, help="write 'ready' here once the TAP is up and the socket listens")
    args = p.parse_args(argv)

    setup(f"guest-bridge-{args.nic}", args.run_dir)
    quit_event = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: quit_event.set())
    try:
        mac = bytes.fromhex(args.mac.replace(":", ""))
        netns.enter(args.netns)  # before any thread: everything this process creates is the guest's
        tap_fd = netns.open_tap(args.tap, mac, args.address)
        mem = GuestMemory.attach(args.memfd, MemoryLayout.from_str(args.layout))
        os.close(args.memfd)
        channel = NicChannel.attach(mem, ChannelLayout.from_str(args.channel), args.nic, args.tx_fd, args.rx_fd)
    except (OSError, ValueError, RingError, netns.NetnsError) as e:
        kv(log, logging.ERROR, "guest bridge cannot start", nic=args.nic, netns=args.netns, error=repr(e))
        return 2
    bridge = Bridge(channel, tap_fd)
    bridge.start()
    server = control_server(args.control, bridge, quit_event)
    server.start(poll_interval=0.05)
    kv(log, logging.INFO, "guest bridge ready", nic=args.nic, netns=args.netns, tap=args.tap, mac=args.mac,
       address=args.address, pid=os.getpid())
    if args.ready_fd is not None:
        os.write(args.ready_fd, b"ready\n")
        os.close(args.ready_fd)

    quit_event.wait()
    server.close()
    bridge.stop()
    os.close(tap_fd)  # the TAP interface disappears with its last fd
    channel.close()
    mem.close()
    kv(log, logging.INFO, "guest bridge exited", nic=args.nic, **bridge.counters)
    return 0


if __name__ == "__main__":
    sys.exit(main())
