"""Real Linux traffic for the guest network: a paced TCP stream and a 10 ms ping, with their records.

TCP (a Python sender and receiver, no iperf3): the sender runs in the guest namespace and streams
a known byte pattern to the receiver in the wire namespace at a set rate over one connection. The
receiver checks every byte against the pattern at its stream offset, so a lost, duplicated or
reordered byte shows as `ok: false` with the offset. Both print JSON lines on stdout:
`{"event": "listening"|"connected"|"accepted"}`, a progress line every `REPORT_S`
(`{"t_ns", "bytes", ...}`; the sender adds `retrans`, the kernel's tcpi_total_retrans from TCP_INFO,
and `state`), and a last `{"event": "closed"|"error", ...}`. SIGTERM ends the sender cleanly: it
shuts its side down and waits for the receiver to close, so the receiver's last line has every byte.

    python -m vfkeep.guest.netload recv --listen 198.18.0.1:5201
    python -m vfkeep.guest.netload send --to 198.18.0.1:5201 --rate 2000000

Ping: `Pinger` runs iputils `ping -D` (wall-clock timestamps) every `interval`, parses each reply,
and keeps (seq, send, receive) in CLOCK_MONOTONIC ns, the clock the host marks servicings with.
"""
from __future__ import annotations

import argparse
import bisect
import json
import random
import re
import selectors
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from .. import netns
from ..proc import end, spawn

REPORT_S = 0.05
CHUNK = 16384
#: The stream is this pattern repeated; its length is prime, so misplaced power-of-two chunks never match.
PATTERN_LEN = 65521
_PATTERN = random.Random(0x5EED).randbytes(PATTERN_LEN)
_PATTERN2 = _PATTERN * 2
_TCP_INFO_LEN = 104
_TCPI_TOTAL_RETRANS = 100  # offset of tcpi_total_retrans in struct tcp_info (after 8 u8 and 23 u32 fields)
TCP_STATES = {1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1", 5: "FIN_WAIT2", 6: "TIME_WAIT",
              7: "CLOSE", 8: "CLOSE_WAIT", 9: "LAST_ACK", 10: "LISTEN", 11: "CLOSING"}


def pattern(offset: int, n: int) -> bytes:
    """Bytes [offset, offset + n) of the stream (n <= PATTERN_LEN)."""
    start = offset % PATTERN_LEN
    return _PATTERN2[start:start + n]


def tcp_info(sock: socket.socket) -> tuple[str, int]:
    """(state, total retransmitted segments) of a TCP socket, from the kernel's TCP_INFO."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LEN)
    return TCP_STATES.get(info[0], str(info[0])), struct.unpack_from("<I", info, _TCPI_TOTAL_RETRANS)[0]


def _emit(**fields) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


def _addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def _quit_flag() -> threading.Event:
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def receive(listen: str) -> int:
    """Accept one connection and check the stream until the peer closes; 0 if every byte matched."""
    stop = _quit_flag()
    srv = socket.create_server(_addr(listen))
    srv.settimeout(0.2)
    _emit(event="listening", address=listen)
    conn = None
    while conn is None and not stop.is_set():
        try:
            conn, peer = srv.accept()
        except TimeoutError:
            continue
    srv.close()
    if conn is None:
        _emit(event="closed", bytes=0, ok=True, error=None)
        return 0
    _emit(event="accepted", peer=f"{peer[0]}:{peer[1]}")
    conn.settimeout(0.2)
    total, error, next_report = 0, None, time.monotonic() + REPORT_S
    while not stop.is_set():
        try:
            data = conn.recv(CHUNK)
        except TimeoutError:
            data = None
        except OSError as e:
            error = f"{type(e).__name__}: {e}"
            break
        if data == b"":
            break
        if data:
            for off in range(0, len(data), PATTERN_LEN):
                piece = data[off:off + PATTERN_LEN]
                if piece != pattern(total + off, len(piece)):
                    bad = next(i for i, (a, b) in enumerate(zip(piece, pattern(total + off, len(piece)))) if a != b)
                    error = f"stream byte {total + off + bad} differs from what was sent"
                    break
            if error:
                break
            total += len(data)
        if time.monotonic() >= next_report:
            _emit(t_ns=time.monotonic_ns(), bytes=total)
            next_report = time.monotonic() + REPORT_S
    conn.close()
    _emit(t_ns=time.monotonic_ns(), bytes=total)
    _emit(event="closed" if error is None else "error", bytes=total, ok=error is None, error=error)
    return 0 if error is None else 1


def send(to: str, rate: float) -> int:
    """Stream the pattern at `rate` bytes/s over one connection until SIGTERM; 0 if it ended cleanly."""
    stop = _quit_flag()
    try:
        sock = socket.create_connection(_addr(to), timeout=5)
    except OSError as e:
        _emit(event="error", bytes=0, ok=False, error=f"connect: {type(e).__name__}: {e}")
        return 1
    sock.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_WRITE)
    _emit(event="connected", local="%s:%d" % sock.getsockname())
    sent, error = 0, None
    t0 = time.monotonic()
    next_report = t0 + REPORT_S
    while not stop.is_set() and error is None:
        now = time.monotonic()
        due = int((now - t0) * rate) - sent
        if due > 0 and sel.select(timeout=0.01):
            try:
                sent += sock.send(pattern(sent, min(due, CHUNK)))
            except BlockingIOError:
                pass
            except OSError as e:
                error = f"{type(e).__name__}: {e}"
        elif due <= 0:
            time.sleep(min(0.005, (1 - due) / rate))
        if now >= next_report:
            state, retrans = tcp_info(sock)
            _emit(t_ns=time.monotonic_ns(), bytes=sent, retrans=retrans, state=state)
            next_report = time.monotonic() + REPORT_S
    state, retrans = tcp_info(sock)
    if error is None:  # orderly close: the receiver sees EOF after the last byte, then closes its side
        sock.setblocking(True)
        sock.settimeout(10)
        try:
            sock.shutdown(socket.SHUT_WR)
            while sock.recv(4096):
                pass
        except OSError as e:
            error = f"{type(e).__name__}: {e}"
    sock.close()
    _emit(t_ns=time.monotonic_ns(), bytes=sent, retrans=retrans, state=state)
    _emit(event="closed" if error is None else "error", bytes=sent, retrans=retrans, ok=error is None, error=error)
    return 0 if error is None else 1


# -- processes seen from the orchestrator ----------------------------------------------------------
class JsonLines:
    """A child printing JSON lines; a reader thread keeps them (with the events) for the caller."""

    def __init__(self, argv: Sequence[str], what: str):
        self.what = what
        self.proc = spawn(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.progress: list[dict] = []
        self.events: list[dict] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, name=f"{what}-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            with self._cond:
                (self.events if "event" in rec else self.progress).append(rec)
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_event(self, names: Sequence[str], timeout: float) -> dict:
        """The first event named one of `names`; RuntimeError if the child exits or the time runs out first."""
        def found():
            return next((e for e in self.events if e["event"] in names), None)

        with self._cond:
            ok = self._cond.wait_for(lambda: found() or not self._reader.is_alive(), timeout)
            ev = found()
        if ev is None:
            err = self.proc.stderr.read().decode(errors="replace") if not ok or self.proc.poll() is not None else ""
            raise RuntimeError(f"{self.what} (pid {self.proc.pid}): no {'/'.join(names)} within {timeout}s "
                               f"(exit status {self.proc.poll()}) {err[-500:]}")
        return ev

    def last(self) -> dict | None:
        with self._cond:
            return self.progress[-1] if self.progress else None

    def at(self, t_ns: int) -> dict | None:
        """The last progress line at or before `t_ns`."""
        with self._cond:
            before = [p for p in self.progress if p["t_ns"] <= t_ns]
        return before[-1] if before else None

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM (a clean close), wait for the last line; SIGKILL after `timeout`."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                end(self.proc)
        self._reader.join(5)
        self.proc.stdout.close()
        self.proc.stderr.close()
        return self.proc.returncode


class TcpStream:
    """One TCP connection from guest namespace `guest_ns` to `peer`:`port` in `wire_ns`."""

    def __init__(self, guest_ns: str, wire_ns: str, peer: str, port: int = 5201, rate: float = 2_000_000):
        py = [sys.executable, "-m", "vfkeep.guest.netload"]
        self.receiver = JsonLines(netns.exec_argv(wire_ns, [*py, "recv", "--listen", f"{peer}:{port}"]), "tcp-receiver")
        try:
            self.receiver.wait_event(["listening"], 10)
            self.sender = JsonLines(netns.exec_argv(guest_ns, [*py, "send", "--to", f"{peer}:{port}",
                                                              "--rate", str(rate)]), "tcp-sender")
        except BaseException:
            self.receiver.stop()
            raise
        self.rate = rate

    def wait_connected(self, timeout: float = 10.0) -> None:
        self.sender.wait_event(["connected"], timeout)
        self.receiver.wait_event(["accepted"], timeout)

    def received(self) -> int:
        """Bytes the receiver has checked so far."""
        last = self.receiver.last()
        return last["bytes"] if last else 0

    def state(self) -> str | None:
        """The sender's TCP state at its last report (ESTABLISHED while the connection lives)."""
        last = self.sender.last()
        return last["state"] if last else None

    def close(self) -> dict:
        """End the stream cleanly; {sent, received, ok, sender_error, receiver_error, retrans}."""
        self.sender.stop()
        self.receiver.stop()
        s = next((e for e in self.sender.events if e["event"] in ("closed", "error")), {})
        r = next((e for e in self.receiver.events if e["event"] in ("closed", "error")), {})
        return {"sent": s.get("bytes"), "received": r.get("bytes"), "retrans": s.get("retrans"),
                "ok": bool(s.get("ok")) and bool(r.get("ok")) and s.get("bytes") == r.get("bytes"),
                "sender_error": s.get("error", "no closing line"), "receiver_error": r.get("error", "no closing line")}

    def kill(self) -> None:
        for child in (getattr(self, "sender", None), self.receiver):
            if child is not None:
                end(child.proc)


@dataclass
class Reply:
    seq: int
    send_ns: int
    recv_ns: int

    @property
    def rtt_ms(self) -> float:
        return (self.recv_ns - self.send_ns) / 1e6


#: A request this young when ping is stopped may still be answered: not a loss.
IN_FLIGHT_NS = 500_000_000
_REPLY = re.compile(r"^\[(\d+\.\d+)\] \d+ bytes from [\d.]+: icmp_seq=(\d+) ttl=\d+ time=([\d.]+) ms$")
_SUMMARY = re.compile(r"^(\d+) packets transmitted")


def lost_outside(flights: list[tuple[int, int, int | None]], windows: list[tuple[int, int]],
                 margin_ns: int) -> list[tuple[int, int]]:
    """(seq, send time) of the lost requests (`Pinger.lost_flights`) whose flight, from their send to the next reply
    that came, meets none of `windows` (servicing windows, each widened by `margin_ns`): a loss no servicing explains.
    A flight still open (no later reply) meets every window after its send."""
    return [(seq, sent) for seq, sent, until in flights
            if not any(sent <= w1 + margin_ns and (until is None or until >= w0 - margin_ns) for w0, w1 in windows)]


def parse_reply(line: str, wall_to_mono_ns: int) -> Reply | None:
    """A `ping -D` reply line as monotonic (seq, send, receive); None for any other line (and DUP!)."""
    m = _REPLY.match(line.strip())
    if m is None:
        return None
    recv = int(float(m.group(1)) * 1e9) - wall_to_mono_ns
    return Reply(int(m.group(2)), recv - int(float(m.group(3)) * 1e6), recv)


class Pinger:
    """iputils ping from a guest namespace every `interval` s; replies in CLOCK_MONOTONIC ns."""

    def __init__(self, ns: str, address: str, interval: float = 0.01):
        self.interval = interval
        self.offset_ns = time.time_ns() - time.monotonic_ns()
        self.replies: dict[int, Reply] = {}
        self.transmitted: int | None = None
        self.start_ns = time.monotonic_ns()
        self.stop_ns: int | None = None
        self.proc = spawn(netns.exec_argv(ns, ["ping", "-D", "-n", "-i", str(interval), address]),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, name="ping-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace")
            if (r := parse_reply(line, self.offset_ns)) is not None:
                with self._lock:
                    self.replies.setdefault(r.seq, r)
            elif m := _SUMMARY.match(line):
                self.transmitted = int(m.group(1))

    def wait_replies(self, n: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if len(self.replies) >= n:
                    return True
            if self.proc.poll() is not None:
                return False
            time.sleep(0.01)
        return False

    def stop(self) -> None:
        """SIGINT (ping prints its summary), reap, keep the records."""
        self.stop_ns = self.stop_ns or time.monotonic_ns()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                end(self.proc)
        self._reader.join(5)
        self.proc.stdout.close()

    def sent_times(self) -> dict[int, int]:
        """Send time of every seq sent (1..transmitted): measured for answered ones, interpolated between
        neighbours (or extrapolated at the interval) for the rest."""
        with self._lock:
            replies = dict(self.replies)
        last = self.transmitted or max(replies, default=0)
        known = sorted(replies)
        out: dict[int, int] = {}
        for seq in range(1, last + 1):
            if seq in replies:
                out[seq] = replies[seq].send_ns
                continue
            before = max((k for k in known if k < seq), default=None)
            after = min((k for k in known if k > seq), default=None)
            step = int(self.interval * 1e9)
            if before is not None and after is not None:
                b, a = replies[before].send_ns, replies[after].send_ns
                out[seq] = b + (a - b) * (seq - before) // (after - before)
            elif before is not None:
                out[seq] = replies[before].send_ns + step * (seq - before)
            else:
                out[seq] = self.start_ns + step * (seq - 1)
        return out

    def lost(self) -> list[tuple[int, int]]:
        """(seq, send time) of every request that got no reply (but those still in flight when ping was stopped)."""
        with self._lock:
            answered = set(self.replies)
        until = None if self.stop_ns is None else self.stop_ns - IN_FLIGHT_NS
        return [(s, t) for s, t in sorted(self.sent_times().items())
                if s not in answered and (until is None or t < until)]

    def lost_flights(self) -> list[tuple[int, int, int | None]]:
        """(seq, send time, until) of every request `lost` returns: `until` is when the reply to the next request that
        was answered arrived (None: none was). The path is first in, first out both ways, so a lost request (or its
        reply) was lost somewhere in [send time, until]: when it was sent says little on its own, for under load a
        request waits in the guest's queues, the relay and the device for hundreds of milliseconds before its reply
        can come (or be lost to a servicing that began meanwhile)."""
        with self._lock:
            replies = dict(self.replies)
        answered = sorted(replies)
        out = []
        for seq, sent in self.lost():
            i = bisect.bisect_right(answered, seq)
            out.append((seq, sent, replies[answered[i]].recv_ns if i < len(answered) else None))
        return out

    def window(self, since_ns: int, until_ns: int) -> dict:
        """Requests sent in [since, until): sent, lost, and the longest time without a reply then. Requests
        sent in the last IN_FLIGHT_NS before ping was stopped are not counted (their replies may be on the way)."""
        if self.stop_ns is not None:
            until_ns = min(until_ns, self.stop_ns - IN_FLIGHT_NS)
        with self._lock:
            replies = sorted(self.replies.values(), key=lambda r: r.recv_ns)
        sent = {s: t for s, t in self.sent_times().items() if since_ns <= t < until_ns}
        lost = [s for s in sent if s not in self.replies]
        arrivals = [since_ns] + [r.recv_ns for r in replies if since_ns <= r.recv_ns < until_ns] + [until_ns]
        gap = max(b - a for a, b in zip(arrivals, arrivals[1:]))
        rtts = [r.rtt_ms for r in replies if r.seq in sent]
        return {"sent": len(sent), "lost": len(lost), "lost_seqs": lost[:100], "max_gap_ms": round(gap / 1e6, 3),
                "rtt_max_ms": round(max(rtts), 3) if rtts else None}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vfkeep.guest.netload", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("recv", help="accept one connection and check the stream")
    r.add_argument("--listen", required=True, metavar="ADDR:PORT")
    s = sub.add_parser("send", help="stream the pattern to ADDR:PORT until SIGTERM")
    s.add_argument("--to", required=True, metavar="ADDR:PORT")
    s.add_argument("--rate", type=float, default=2_000_000, help="bytes per second")
    args = p.parse_args(argv)
    return receive(args.listen) if args.cmd == "recv" else send(args.to, args.rate)


if __name__ == "__main__":
    sys.exit(main())
