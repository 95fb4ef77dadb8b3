"""The guest network of `vfkeep run --guest netns`: per NIC a guest namespace, its bridge, and a wire namespace.

NIC N gets `vfk-<run-id>-gN` (the guest bridge's TAP `eth0`, the NIC's MAC, 198.18.N.2/24) and
`vfk-<run-id>-wN` (the device's `tap` backend interface `wire0`, 198.18.N.1/24, the peer). A
frame from the guest's kernel goes TAP -> bridge -> guest rings -> worker -> MANA vport -> device
-> wire TAP -> the peer's kernel, and back. The two namespaces share nothing else: no route leaves
them.

The host owns all of it: namespaces are created before the devices (whose TAPs are born in the
wire namespaces), bridges are spawned from the host's actor thread (they die with it), and
teardown ends the bridges first (`end_bridges`) and, once the devices are gone, removes the
namespaces with whatever still runs inside (`remove_namespaces`; e.g. a console `exec`). A namespace a dead run left behind is removed by the next `prepare()` with the
same run directory (the run id is a hash of it).
"""
from __future__ import annotations

import logging
import os
import subprocess
from dataclasses import dataclass

from .. import netns, proc, rpc
from ..guest.agent import AgentClient, AgentError
from ..guest.bridge import spawn_bridge
from ..guest.ring import ChannelLayout, NicChannel
from ..log import kv
from ..memory import GuestMemory

log = logging.getLogger("vfkeep.host.guest_net")

EXEC_TIMEOUT_S = 30.0
MAX_EXEC_OUTPUT = 1 << 20


class GuestNetError(Exception):
    """A guest-network request that cannot be served (no such NIC, not running, command failed to start)."""


@dataclass
class _Bridge:
    nic: int
    child: subprocess.Popen
    control: str


class GuestNetwork:
    def __init__(self, run_dir: str, nics: int):
        self.run_dir = run_dir
        self.nics = nics
        self.rid = netns.run_id(run_dir)
        self.bridges: dict[int, _Bridge] = {}
        self.macs: dict[int, bytes] = {}

    # -- names ---------------------------------------------------------------------------------
    def guest_ns(self, nic: int) -> str:
        return netns.guest_ns(self.rid, nic)

    def wire_ns(self, nic: int) -> str:
        return netns.wire_ns(self.rid, nic)

    def device_backend(self, nic: int) -> str:
        """The device's backend spec: its TAP is created inside the wire namespace."""
        return f"tap:{netns.WIRE_TAP}@{self.wire_ns(nic)}"

    def _nic(self, nic) -> int:
        if not isinstance(nic, int) or isinstance(nic, bool) or not 0 <= nic < self.nics:
            raise GuestNetError(f"nic {nic!r} out of range [0, {self.nics})")
        return nic

    # -- lifecycle -----------------------------------------------------------------------------
    def prepare(self) -> None:
        """Before the devices: check we may (root), remove a dead run's leftovers, create the namespaces."""
        netns.require_net_admin(("ip",))
        if left := netns.cleanup_run(self.rid):
            kv(log, logging.WARNING, "removed namespaces a dead run left behind", netns=",".join(left))
        for nic in range(self.nics):
            for name in (self.guest_ns(nic), self.wire_ns(nic)):
                netns.create(name)

    def wire_up(self, nic: int) -> None:
        """Once the device has created its TAP: the peer address on it."""
        addr = f"{netns.peer_address(nic)}/{netns.PREFIX_LEN}"
        netns.ip("addr", "add", addr, "dev", netns.WIRE_TAP, netns=self.wire_ns(nic))
        kv(log, logging.INFO, "wire up", nic=nic, netns=self.wire_ns(nic), address=addr)

    def start_bridges(self, mem: GuestMemory, layout: ChannelLayout, channels: list[NicChannel],
                      macs: list[bytes]) -> None:
        """One bridge per NIC, its TAP with the NIC's MAC and the guest address (call on the actor thread)."""
        for nic, ch in enumerate(channels):
            control = os.path.join(self.run_dir, f"guest-bridge-{nic}.sock")
            address = f"{netns.guest_address(nic)}/{netns.PREFIX_LEN}"
            try:
                child = spawn_bridge(mem, layout, nic, *ch.bell_fds(), ns=self.guest_ns(nic), mac=macs[nic],
                                     address=address, control_path=control, run_dir=self.run_dir)
            except AgentError as e:
                raise GuestNetError(str(e)) from None
            self.bridges[nic] = _Bridge(nic, child, control)
            self.macs[nic] = macs[nic]
            kv(log, logging.INFO, "guest bridge started", nic=nic, pid=child.pid, netns=self.guest_ns(nic),
               mac=macs[nic].hex(":"), address=address)

    def end_bridges(self) -> None:
        """End the bridges by PID (the guest stops sending; its TAPs disappear with them)."""
        for b in self.bridges.values():
            proc.end(b.child)
            kv(log, logging.INFO, "guest bridge ended", nic=b.nic, pid=b.child.pid, exit_status=b.child.returncode)
        self.bridges.clear()

    def remove_namespaces(self) -> None:
        """Remove every namespace of the run, ending whatever still runs inside (after the devices ended)."""
        for name in netns.list_run(self.rid):
            try:
                netns.delete(name)
            except netns.NetnsError as e:  # best effort: the next run with this run dir removes it
                kv(log, logging.ERROR, "cannot remove namespace", netns=name, error=str(e))

    # -- requests ------------------------------------------------------------------------------
    def owns_rings(self, nic: int) -> bool:
        b = self.bridges.get(nic)
        return b is not None and b.child.poll() is None

    def status(self) -> list[dict]:
        """Per NIC: namespaces, addresses, MAC, bridge pid and its counters (frames, drops, rings)."""
        out = []
        for nic in range(self.nics):
            entry = {"nic": nic, "guest_netns": self.guest_ns(nic), "wire_netns": self.wire_ns(nic),
                     "guest_address": netns.guest_address(nic), "peer_address": netns.peer_address(nic),
                     "mac": self.macs[nic].hex(":") if nic in self.macs else None}
            b = self.bridges.get(nic)
            if b is not None:
                entry.update(bridge_pid=b.child.pid, bridge_alive=b.child.poll() is None)
                if entry["bridge_alive"]:
                    try:
                        with AgentClient(b.control, timeout=5) as c:
                            entry["bridge"] = c.call("status")
                    except rpc.RpcError as e:
                        entry["bridge"] = {"error": str(e)}
            out.append(entry)
        return out

    def exec(self, nic: int, argv: list[str], timeout: float = EXEC_TIMEOUT_S) -> dict:
        """Run `argv` in guest `nic`'s namespace to completion: {returncode, stdout, stderr} (timeout: ended).

        Runs on the caller's thread; the child is ended by PID if it outlives `timeout`."""
        nic = self._nic(nic)
        if not argv or not all(isinstance(a, str) for a in argv):
            raise GuestNetError("exec needs a command: exec N CMD [ARGS...]")
        if not isinstance(timeout, (int, float)) or not 0 < timeout <= 600:
            raise GuestNetError(f"exec timeout {timeout!r} must be in (0, 600] seconds")
        try:
            child = proc.spawn(netns.exec_argv(self.guest_ns(nic), argv), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
        except OSError as e:
            raise GuestNetError(f"exec {argv[0]}: {e}") from None
        timed_out = False
        try:
            out, err = child.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            proc.end(child)
            out, err = child.communicate()
        kv(log, logging.INFO, "exec in guest", nic=nic, argv=" ".join(argv), returncode=child.returncode,
           timed_out=timed_out)
        return {"nic": nic, "argv": argv, "returncode": child.returncode, "timed_out": timed_out,
                "stdout": out[-MAX_EXEC_OUTPUT:].decode(errors="replace"),
                "stderr": err[-MAX_EXEC_OUTPUT:].decode(errors="replace")}
