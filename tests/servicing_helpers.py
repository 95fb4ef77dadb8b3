"""Real-process harness for the servicing tests: a `vfkeep run --no-console` host (`DetachedHost`) plus test checks."""
from __future__ import annotations

import os
import subprocess

from vfkeep import proc
from vfkeep.host.detached import DetachedHost
from vfkeep.vfio_user.control import control_call


class HostRun(DetachedHost):
    """`vfkeep run --no-console --timing natural` in its own run dir; `stop()` must leave no child behind."""

    def __init__(self, run_dir, *args: str, env: dict[str, str] | None = None, nics: int = 1):
        super().__init__(str(run_dir), "--timing", "natural", *args, nics=nics, env=env, wait=120)

    def device_control(self, nic: int, cmd: str, **args) -> dict:
        return control_call(os.path.join(self.run_dir, f"nic{nic}.sock.ctl"), cmd, **args)

    def log_seq(self, nic: int = 0) -> int:
        return self.device_control(nic, "command_log", since=1 << 62)["last_seq"]

    def commands_since(self, seq: int, nic: int = 0) -> list[dict]:
        """Command-log entries of NIC `nic`'s device after `seq` (vport data-path setup left out)."""
        return [e for e in self.device_control(nic, "command_log", since=seq)["entries"]
                if "DMA_REGION" not in e["name"] and "WQ_OBJ" not in e["name"]]

    def reset_count(self, nic: int = 0) -> int:
        return self.device_control(nic, "counters")["counters"]["reset_count"]

    def serviced(self, devices: int = 1, **request) -> tuple[dict, list[list[dict]]]:
        """Service and return (result, command-log entries of this servicing for each of the first
        `devices` device processes)."""
        seqs = [self.log_seq(i) for i in range(devices)]
        result = self.service(**request)
        return result, [self.commands_since(seqs[i], i) for i in range(devices)]

    def worker_log(self, generation: int) -> str:
        with open(os.path.join(self.run_dir, f"worker-{generation}.log")) as f:
            return f.read()

    def children(self) -> list[int]:
        return children_of(self.pid)

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(proc.vfkeep_argv(*args), capture_output=True, text=True, timeout=timeout)

    def stop(self) -> None:
        """`vfkeep stop`, then check the host exited cleanly and ended every child."""
        kids = self.children()
        r = self.cli("stop", "--run-dir", self.run_dir)
        assert r.returncode == 0, r.stderr
        assert self.reap(30) == 0, self.logs()
        alive = [p for p in kids if pid_alive(p)]
        assert not alive, f"children left behind: {alive}"


#: Indexes into stat_fields().
PPID, SESSION = 1, 3


def stat_fields(pid: int | str) -> list[str] | None:
    """/proc/<pid>/stat after the command name (state, ppid, pgrp, session, ...); None once the process is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()
    except OSError:
        return None


def live_processes(field: int, value: int) -> list[int]:
    """PIDs of the live (not zombie) processes whose stat_fields()[field] is `value`."""
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            fields = stat_fields(name)
            if fields and int(fields[field]) == value and fields[0] != "Z":
                out.append(int(name))
    return out


def children_of(pid: int) -> list[int]:
    return sorted(live_processes(PPID, pid))


def pid_alive(pid: int) -> bool:
    fields = stat_fields(pid)
    return fields is not None and fields[0] != "Z"
