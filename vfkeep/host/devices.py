"""Device processes (MANA, NVMe) as the host sees them: spawn, control channel, what the device itself saw."""
from __future__ import annotations

import logging
import os
import subprocess
import threading
import time

from .. import proc, rpc
from ..device.mac import DEFAULT_MAC, MAX_VPORTS, vport_mac
from ..device.timing import DeviceTiming
from ..log import kv
from ..sockets import is_stale_socket
from ..vfio_user.control import control_call

log = logging.getLogger("vfkeep.host.device")

#: Command-log name of the SMC message (spec gdma.md §5.2).
ESTABLISH_HWC = "SMC_MSG_TYPE_ESTABLISH_HWC"


def pci_id_for(index: int) -> str:
    """VTL2 PCI address of NIC `index`; Azure gives every VF its own PCI domain."""
    return f"{0xd186 + index:04x}:00:00.0"


def nic_mac(index: int) -> bytes:
    """MAC of NIC `index` (its vport 0): 00:15:5d:12:12:12 + 16 × index as a 48-bit number, so NIC 0 has the
    device's default, NIC 1 00:15:5d:12:12:22, NIC 2 …:32, and a NIC's vports (vport v adds v, at most
    `MAX_VPORTS`) never take another NIC's. A function of the index alone: the same across servicings (the
    device keeps it) and host restarts, so two NICs can share a wire and the saved MAC → adapter index map
    holds each MAC once."""
    return vport_mac(DEFAULT_MAC, MAX_VPORTS * index)


class DeviceFailed(Exception):
    """A device process that exited or never answered during start-up."""


def last_line(path: str) -> str:
    """The last non-empty line of a (small) log file, or ''."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 4096))
            lines = [ln.strip() for ln in f.read().decode(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1] if lines else ""


def remove_if_empty(path: str | None) -> None:
    """A child's stderr file that stayed empty says nothing: not kept."""
    try:
        if path and os.path.getsize(path) == 0:
            os.unlink(path)
    except OSError:
        pass


class DeviceProcess:
    kind = "nic"  # names the device in messages and its files: nic0, nvme0

    def __init__(self, index: int, child: subprocess.Popen, socket: str, stderr_path: str):
        self.index = index
        self.stderr_path = stderr_path
        self.pci_id = pci_id_for(index)
        self.child = child
        self.socket = socket
        self.control = socket + ".ctl"

    @classmethod
    def spawn(cls, index: int, run_dir: str, backend: str, timing: DeviceTiming) -> "DeviceProcess":
        """Start the emulator with reset_method=none: its state survives a driver disconnect."""
        sock = os.path.join(run_dir, f"nic{index}.sock")
        argv = proc.vfkeep_argv("device", "--socket", sock, "--control", sock + ".ctl", "--reset-method", "none",
                                *timing.to_args(), "--backend", backend, "--mac", nic_mac(index).hex(":"),
                                "--run-dir", run_dir)
        stderr_path = os.path.join(run_dir, f"device-nic{index}.stderr")
        with open(stderr_path, "ab") as err:
            child = proc.spawn(argv, stdout=err, stderr=err)
        kv(log, logging.INFO, "device spawned", index=index, pid=child.pid, socket=sock, backend=backend,
           mac=nic_mac(index).hex(":"),
           timing=timing.to_dict())
        return cls(index, child, sock, stderr_path)

    def wait_ready(self, timeout: float, cancel: threading.Event) -> None:
        """Until the device answers `ping`; DeviceFailed as soon as it exits (with the last line it printed,
        which names the cause), when it stays silent for `timeout` seconds, or within a ping's 0.2 s once
        `cancel` is set (a stop during boot must not wait for a device still importing: seconds under load)."""
        deadline = time.monotonic() + timeout
        while True:
            if cancel.is_set():
                raise DeviceFailed(f"device {self.kind}{self.index}: start-up abandoned, the host is stopping")
            if self.child.poll() is not None:
                raise DeviceFailed(f"device {self.kind}{self.index} exited with status {self.child.returncode} during "
                                   f"start-up: {last_line(self.stderr_path) or 'no message'} (see {self.stderr_path})")
            try:
                self.call("ping", timeout=0.2)
                return
            except rpc.RpcError:
                if time.monotonic() > deadline:
                    raise DeviceFailed(f"device {self.kind}{self.index} did not answer on {self.control} within {timeout:g} s "
                                       f"(see {self.stderr_path})") from None

    def call(self, cmd: str, timeout: float = 5.0, **args) -> dict:
        return control_call(self.control, cmd, timeout=timeout, **args)

    def snapshot(self) -> dict:
        """The device's own counters and command-log position, to diff across a servicing."""
        return {"counters": self.call("counters")["counters"],
                "log_seq": self.call("command_log", since=1 << 62)["last_seq"]}

    def since(self, before: dict) -> dict:
        """What the device saw since `before`: FLRs, HWC requests and the new command-log entries."""
        counters = self.call("counters")["counters"]
        entries = self.call("command_log", since=before["log_seq"])["entries"]
        grew = {k: counters[k] - before["counters"][k] for k in ("reset_count", "hwc_requests", "smc_messages")}
        return {"device_reset": grew["reset_count"] > 0, "device_resets": grew["reset_count"],
                "hwc_requests": grew["hwc_requests"], "smc_messages": grew["smc_messages"],
                "hwc_established": any(e.get("name") == ESTABLISH_HWC for e in entries),
                "commands": [e.get("name") for e in entries]}

    def alive(self) -> bool:
        return self.child.poll() is None

    def death(self) -> str | None:
        """None while it runs; else which device died, how, and the log that says why (host log, status
        warnings, a refused servicing)."""
        code = self.child.poll()
        if code is None:
            return None
        how = proc.exit_description(code)
        log_path = os.path.join(os.path.dirname(self.socket), f"device-{self.kind}{self.index}.log")
        return f"device {self.kind}{self.index} ({self.pci_id}, pid {self.child.pid}) died, {how} (see {log_path})"

    def end(self) -> int | None:
        """End by PID; remove the sockets a device that died could not remove itself (nothing else: a file
        that kept it from starting is somebody's)."""
        code = proc.end(self.child)
        remove_if_empty(self.stderr_path)
        for path in (self.socket, self.control):
            if is_stale_socket(path):
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
        return code


def nvme_pci_id_for(index: int) -> str:
    """VTL2 PCI address of NVMe controller `index` (a PCI domain of its own, apart from the NICs')."""
    return f"{0xa100 + index:04x}:00:00.0"


#: Admin commands a keepalive restore must not issue (spec nvme.md §13.3), as the controller logs them.
NVME_KEEPALIVE_TRIPWIRES = ("CREATE_IO_CQ", "CREATE_IO_SQ", "IDENTIFY", "ASYNC_EVENT_REQUEST")


class NvmeDeviceProcess(DeviceProcess):
    """An NVMe controller emulator (`vfkeep nvme-device`) on a sparse disk file, `reset_method=none`."""
    kind = "nvme"

    def __init__(self, index: int, child: subprocess.Popen, socket: str, stderr_path: str, disk: str):
        super().__init__(index, child, socket, stderr_path)
        self.pci_id = nvme_pci_id_for(index)
        self.disk = disk

    @classmethod
    def spawn(cls, index: int, run_dir: str, disk: str, size: int, timing: DeviceTiming) -> "NvmeDeviceProcess":
        """Natural host timing gives a natural controller; any other the realistic one (modelled enable and
        disable) with the host's FLR time."""
        sock = os.path.join(run_dir, f"nvme{index}.sock")
        preset = "natural" if timing.preset == "natural" else "realistic"
        argv = proc.vfkeep_argv("nvme-device", "--socket", sock, "--control", sock + ".ctl", "--disk", disk,
                                "--size", str(size), "--reset-method", "none", "--timing", preset,
                                "--flr-ms", f"{timing.flr_ms:g}", "--run-dir", run_dir)
        stderr_path = os.path.join(run_dir, f"device-nvme{index}.stderr")
        with open(stderr_path, "ab") as err:
            child = proc.spawn(argv, stdout=err, stderr=err)
        kv(log, logging.INFO, "nvme device spawned", index=index, pci_id=nvme_pci_id_for(index), pid=child.pid,
           socket=sock, disk=disk, size=size, timing=preset)
        return cls(index, child, sock, stderr_path, disk)

    def since(self, before: dict) -> dict:
        """What the controller saw since `before`: resets (CC.EN 1→0, FLR), enables and admin commands."""
        entries = self.call("command_log", since=before["log_seq"])["entries"]
        names = [e.get("name") for e in entries]
        return {"device_reset": "CC_DISABLE" in names or "FLR" in names,
                "controller_enabled": "CC_ENABLE" in names,
                "admin_commands": [e["name"] for e in entries if e.get("kind") == "admin"]}
