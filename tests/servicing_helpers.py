"""Real-process harness for the servicing tests: a detached `vfkeep run` host driven over its control socket."""
from __future__ import annotations

import os
import subprocess
import time

from vfkeep import proc
from vfkeep.host import control
from vfkeep.vfio_user.control import control_call

BOOT_TIMEOUT_S = 60.0


class HostRun:
    """`vfkeep run --detach` in its own run dir; `stop()` must leave no child behind."""

    def __init__(self, run_dir, *args: str, env: dict[str, str] | None = None, nics: int = 1):
        self.run_dir = str(run_dir)
        os.makedirs(self.run_dir, exist_ok=True)
        argv = proc.vfkeep_argv("run", "--detach", "--run-dir", self.run_dir, "--timing", "natural",
                                "--nics", str(nics), *args)
        full_env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENHCL_", "VFKEEP_"))}
        full_env.update(env or {})
        self._stderr = open(os.path.join(self.run_dir, "host.stderr"), "ab")
        self.child = proc.spawn(argv, env=full_env, stdout=self._stderr, stderr=self._stderr)
        deadline = time.monotonic() + BOOT_TIMEOUT_S
        while True:
            if self.child.poll() is not None:
                raise RuntimeError(f"host exited with {self.child.returncode} during boot:\n{self.logs()}")
            try:
                self.status = self.call("status", wait=5)
                break
            except control.HostUnavailable:
                if time.monotonic() > deadline:
                    self.kill()
                    raise RuntimeError(f"host not ready within {BOOT_TIMEOUT_S} s:\n{self.logs()}") from None
                time.sleep(0.05)

    @property
    def pid(self) -> int:
        return self.child.pid

    def call(self, op: str, wait: float | None = 120, **args):
        return control.call(self.run_dir, op, wait=wait, **args)

    def service(self, **request) -> dict:
        return self.call("service", **request)

    def inspect(self, path: str | None = None):
        return self.call("inspect", path=path)

    def probe(self, nic: int = 0, count: int = 16) -> dict:
        return self.call("probe", nic=nic, count=count)

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

    def logs(self) -> str:
        out = []
        for name in sorted(os.listdir(self.run_dir)):
            if name.endswith((".log", ".stderr")):
                with open(os.path.join(self.run_dir, name), errors="replace") as f:
                    out.append(f"--- {name}\n{f.read()[-4000:]}")
        return "\n".join(out)

    def children(self) -> list[int]:
        return children_of(self.pid)

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(proc.vfkeep_argv(*args), capture_output=True, text=True, timeout=timeout)

    def stop(self) -> None:
        """`vfkeep stop`, then check the host exited cleanly and ended every child."""
        kids = self.children()
        r = self.cli("stop", "--run-dir", self.run_dir)
        assert r.returncode == 0, r.stderr
        assert self.child.wait(30) == 0, self.logs()
        self._stderr.close()
        alive = [p for p in kids if pid_alive(p)]
        assert not alive, f"children left behind: {alive}"

    def kill(self) -> None:
        proc.end(self.child)
        self._stderr.close()


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
