"""`vfkeep chaos`: one host with guest traffic, N servicings, each on a random path with zero or more random
faults from a catalogue, and the invariants checked after every one (issue 15 item 1).

A servicing's plan (path, faults) is a pure function of (seed, index) — `plan(seed, i, nics, nvme)` — so the JSON
report (every plan, every violation) is enough to replay one (`--replay`). Faults reach the system through
the ordinary test hooks: the servicing request (`test_config`, `tamper`, `next_env` with
`VFKEEP_KILL_POINT` and `kill_point`, see vfkeep/kill_points.py), and the device's control socket (fault rules, HWC stall,
surprise removal, EQE 135, link, a reset behind the driver's back), fired just before the servicing or
when the host's events say the servicing entered its handoff or restore phase.

Invariants (each violation names servicing, faults, invariant and detail):
- `servicing_completes`: the host answers the servicing and stays up;
- `devices_work`: within `DEVICE_BOUND_S` every NIC carries the guest's frames again (its traffic agent
  receives new frames) and the host's worker is up;
- `frames_accounted`: every frame the guest sent during the servicing's traffic session came back or is
  in exactly one drop counter (guest rings, device, relay), none duplicated or unknown;
- `pool_accounting`: the pool's slot table covers it exactly, nothing pending or leaked, and each NIC
  owns exactly its live persistent allocations (HWC buffer, kept vport);
- `processes_fds`: the host's children, the processes of the run dir and the open fds of host and devices
  are back to their baseline;
- `no_traceback`: no log or stderr file of the run dir gained a traceback.
"""
from __future__ import annotations

import json
import os
import platform
import random
import re
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, field

import click

from . import proc, rpc
from .cli import one_line, output_file
from .contract import DATAPATH_KEEPALIVE_ENV, MANA_KEEPALIVE_ENV
from .device.timing import timing_from, timing_options
from .host.detached import DetachedHost
from .host.vmm import KEPT_VPORT_PAGES
from .kill_points import KILL_POINT_ENV, RESTORE_POINTS, SAVE_POINTS
from .vfio_user.control import control_call

#: Servicing paths (as servicing_paths.ORDER) and the request each makes; the host runs with
#: --datapath-keepalive, so a worker keeps its vport unless its request says otherwise.
PATHS = {
    "keepalive": {"mana_keepalive": True, "next_env": {DATAPATH_KEEPALIVE_ENV: "0"}},
    "keepalive+datapath": {"mana_keepalive": True, "next_env": {DATAPATH_KEEPALIVE_ENV: "1"}},
    "reset": {"mana_keepalive": False, "next_env": {}},
    "reset-flr": {"mana_keepalive": True, "next_env": {MANA_KEEPALIVE_ENV: "disabled"}},
}
SAVE_KILL_POINTS = tuple(SAVE_POINTS)
RESTORE_KILL_POINTS = tuple(RESTORE_POINTS)
#: HWC requests some servicing path sends (a `once` rule on one of them fails the next one sent).
HWC_REQUESTS = ("GENERATE_TEST_EQE", "VERIFY_VF_DRIVER_VERSION", "LIST_DEVICES", "REGISTER_DEVICE",
                "DEREGISTER_DEVICE", "QUERY_DEV_CONFIG", "QUERY_VPORT_CONFIG", "CONFIG_VPORT_TX", "CREATE_QUEUE",
                "CREATE_WQ_OBJ", "DESTROY_WQ_OBJ", "CONFIG_VPORT_RX")
#: A fixed list, so that a seed's plans stay what they were as `--tamper` modes are added (the newer NVMe
#: saved-queue modes are covered by tests/test_nvme_host.py). `pool-all-leaked` is left out: it exhausts
#: the pool for the VM's life (valid per servicing spec 8.3), which would turn every later keepalive
#: servicing of the campaign into a fresh one.
CHAOS_TAMPER_MODES = ("truncate", "corrupt", "firmware-missing", "firmware-unknown", "mana-pfn-outside-pool",
                      "dma-pfn-outside-pool", "nvme-pfn-outside-pool")
#: When a device fault fires: just before the servicing, or once the host reports the save (handoff) or
#: the handoff (restore) done.
TRIGGERS = ("before", "handoff", "restore")
#: Faults that decide what the old worker's save does; at most one per servicing.
SAVE_FAULTS = ("save_fail", "save_stuck", "save_crash", "kill_old")

#: Relative weights of the catalogue (a device reset during the handover costs the HWC probe's 10 s timeout).
#: A device reset is only fired during a handover (at run time only the TX watchdog finds one, after about 4 s of
#: hung sends: `VfManager._relay_failed`).
FAULT_WEIGHTS = {"save_fail": 6, "save_stuck": 2, "save_crash": 3, "kill_old": 8, "kill_new": 10, "hwc_fail": 10,
                 "hwc_stall": 5, "surprise_removal": 6, "vf_reset": 8, "link_flap": 6, "device_reset": 2, "tamper": 6}

#: NVMe faults (with --nvme): IO completions delayed for the servicing, or one admin command delayed 300 ms.
NVME_FAULTS = ("nvme_io_delay", "nvme_admin_delay")
NVME_ADMIN_OPCODES = ("IDENTIFY", "SET_FEATURES", "CREATE_IO_CQ", "CREATE_IO_SQ")
DISK_RATE = 200

STUCK_TIMEOUT_S = 2.0
SERVICE_TIMEOUT_S = 30.0
DEVICE_BOUND_S = 30.0
TRAFFIC_RATE = 1000
SETTLE_MS = 500
PROCESS_SETTLE_S = 3.0
#: Device counters of frames the device dropped (as tests/test_traffic_host.py counts them).
DEVICE_DROPS = ("tx_dropped_link_down", "rx_dropped_link_down", "in_discards_no_wqe", "rx_dropped_unmapped",
                "in_errors_rx_vport_disabled", "rx_dropped_no_vport", "rx_dropped_removed", "tx_errors", "rx_errors",
                "tx_backend_errors", "rx_backend_errors")
RELAY_DROPS = ("tx_dropped_bad_frame", "rx_dropped_too_big", "tx_stranded")
#: A worker killed while its relay runs (before its save stopped it, or once its restore started the relay; a
#: stuck save is ended the same way) takes the frames it held with it: the batch it popped, its vport's posted sends and
#: received frames it had not handed on. Nothing is left to count them, so the campaign reports them as
#: `uncounted_in_killed_workers` and only a loss above this bound per NIC (the vport's buffers) is a violation.
KILLED_RELAY_BOUND = 1024


def killed_with_running_relay(p: dict) -> bool:
    """Under data-path keepalive the new worker's relay runs before its deferred HWC probe, so a kill at
    `restore.hwc` takes frames too (and its replacement starts without the saved state the relay moved past)."""
    hwc_after_relay = "restore.hwc" if p["path"] == "keepalive+datapath" else None
    return any(f["kind"] == "save_stuck" or (f["kind"] == "kill_old" and f["point"] == "save.requested")
               or (f["kind"] == "kill_new" and f["point"] in ("restore.started", hwc_after_relay))
               for f in p["faults"])


def plan(seed: int, index: int, nics: int, nvme: int = 0) -> dict:
    """Servicing `index`'s path and faults: a pure function of (seed, index, nics, nvme). The NVMe draws come
    from a stream of their own, so the MANA plan of a seed does not depend on `nvme`."""
    rng = random.Random(f"vfkeep-chaos/{seed}/{index}")
    path = rng.choice(sorted(PATHS))
    count = rng.choices((0, 1, 2, 3), weights=(30, 45, 20, 5))[0]
    kinds: list[str] = []
    while len(kinds) < count:
        kind = rng.choices(list(FAULT_WEIGHTS), weights=list(FAULT_WEIGHTS.values()))[0]
        if kind in kinds or (kind in SAVE_FAULTS and any(k in SAVE_FAULTS for k in kinds)):
            continue
        if {kind, *kinds} >= {"device_reset", "save_fail"}:  # no handover: the reset would hit a running worker
            continue
        kinds.append(kind)
    faults = [_fault(rng, kind, nics) for kind in sorted(kinds)]
    p = {"index": index, "path": path, "faults": faults}
    if nvme:
        disk_rng = random.Random(f"vfkeep-chaos/{seed}/{index}/nvme")
        p["nvme_keepalive"] = PATHS[path]["mana_keepalive"] and disk_rng.random() < 0.8
        if disk_rng.random() < 0.3:
            kind = disk_rng.choice(NVME_FAULTS)
            f = {"kind": kind, "disk": disk_rng.randrange(nvme), "trigger": disk_rng.choice(TRIGGERS)}
            if kind == "nvme_io_delay":
                f["ms"] = disk_rng.choice((5, 20, 50))
            else:
                f["opcode"] = disk_rng.choice(NVME_ADMIN_OPCODES)
            p["faults"] = faults + [f]
    return p


def _fault(rng: random.Random, kind: str, nics: int) -> dict:
    f: dict = {"kind": kind}
    if kind == "kill_old":
        f["point"] = rng.choice(SAVE_KILL_POINTS)
    elif kind == "kill_new":
        f["point"] = rng.choice(RESTORE_KILL_POINTS)
    elif kind == "tamper":
        f["mode"] = rng.choice(CHAOS_TAMPER_MODES)
    elif kind not in SAVE_FAULTS:
        f["nic"] = rng.randrange(nics)
        f["trigger"] = "handoff" if kind == "device_reset" else rng.choice(TRIGGERS)
        if kind == "hwc_fail":
            f["request"] = rng.choice(HWC_REQUESTS)
        if kind in ("hwc_stall", "surprise_removal", "link_flap"):
            f["ms"] = rng.choice((50, 200, 500, 1000))
    return f


def describe(fault: dict) -> str:
    extra = [str(fault[k]) for k in ("point", "mode", "request", "opcode", "nic", "disk", "trigger", "ms")
             if k in fault]
    return fault["kind"] + (f"({','.join(extra)})" if extra else "")


@dataclass
class Baseline:
    children: int
    run_dir_processes: int
    host_fds: int
    device_fds: list[int]


@dataclass
class Campaign:
    """One host and the servicings run on it."""
    run_dir: str
    nics: int
    seed: int
    run_args: tuple[str, ...] = ()
    nvme: int = 0
    host: DetachedHost | None = None
    violations: list[dict] = field(default_factory=list)
    records: list[dict] = field(default_factory=list)
    baseline: Baseline | None = None
    _log_offsets: dict[str, int] = field(default_factory=dict)
    _pending: dict[str, list] = field(default_factory=dict)
    _undo: list = field(default_factory=list)
    #: Held while faults are armed, fired or disarmed: `_disarm` waits for a fault being fired, so none outlives
    #: its servicing into the invariant checks.
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _armed: bool = False  # between a servicing's arming and its `_disarm`: phase events fire faults only then
    _events: rpc.RpcClient | None = None
    _relay_seen: dict[int, dict] = field(default_factory=dict)
    _relay_drops_before: int = 0
    _nvme_pool: dict | None = None  # the NVMe controllers' pool pages after the warm-up (the same every time)

    # -- host ------------------------------------------------------------------------------------
    def boot(self) -> None:
        nvme = ("--nvme", str(self.nvme)) if self.nvme else ()
        self.host = DetachedHost(self.run_dir, "--datapath-keepalive", "--keep-worker-logs", "100000", *nvme,
                                 *self.run_args, nics=self.nics, wait=SERVICE_TIMEOUT_S + 30)
        self._events = rpc.RpcClient(self.host.path, timeout=5.0)
        self._events.call("events")
        threading.Thread(target=self._watch_events, name="chaos-events", daemon=True).start()
        self._scan_logs()  # boot is not a servicing: offsets start here

    def close(self) -> None:
        if self._events is not None:
            self._events.close()
        if self.host is not None:
            try:
                self.host.stop()
            except (rpc.RpcError, OSError):
                self.host.kill()

    def _watch_events(self) -> None:
        """Fire the device faults armed for a servicing phase when the host reports it."""
        while True:
            try:
                event = self._events.pushed(None)
            except (rpc.RpcError, OSError, ValueError):
                return
            if event is None:
                return
            if event.get("event") == "phase_done":
                phase = {"save": "handoff", "handoff": "restore"}.get(event["data"].get("phase"))
                if phase:
                    self._fire(phase)

    def _fire(self, trigger: str) -> None:
        """Fire the faults armed for `trigger`, unless the servicing is over: a phase event read late (after the
        host answered the servicing) fires nothing, and one being fired holds `_disarm` off until it is undone.
        (A surprise removal fired by a late event once outlived its servicing: the guest's last sends waited in
        the SQ of a removed device while the checks counted them lost.)"""
        with self._lock:
            if not self._armed:
                return
            for action in self._pending.pop(trigger, []):
                action()

    def device(self, nic: int, cmd: str, **args):
        return control_call(os.path.join(self.run_dir, f"nic{nic}.sock.ctl"), cmd, timeout=10, **args)

    def nvme_device(self, disk: int, cmd: str, **args):
        return control_call(os.path.join(self.run_dir, f"nvme{disk}.sock.ctl"), cmd, timeout=10, **args)

    # -- one servicing ---------------------------------------------------------------------------
    def run_one(self, p: dict) -> dict:
        """Service by plan `p`, then check the invariants."""
        i = p["index"]
        faults = p["faults"]
        request = {k: (dict(v) if isinstance(v, dict) else v) for k, v in PATHS[p["path"]].items()}
        request["timeout"] = SERVICE_TIMEOUT_S
        if self.nvme:
            request["nvme_keepalive"] = p.get("nvme_keepalive", False)
        for f in faults:
            k = f["kind"]
            if k == "kill_old":  # with the save request, to the old worker
                request["kill_point"] = f["point"]
            elif k == "kill_new":  # in the next worker's environment (a replacement runs without it)
                request["next_env"][KILL_POINT_ENV] = f["point"]
            elif k in ("save_fail", "save_stuck", "save_crash"):
                request["test_config"] = f"SERVICING_{k.upper()}"
                if k == "save_stuck":
                    request["timeout"] = STUCK_TIMEOUT_S
            elif k == "tamper":
                request["tamper"] = f["mode"]
        before = self._counters()
        old_generation = (self.host.status()["worker"] or {}).get("generation")
        self.host.traffic("start", rate=TRAFFIC_RATE, size=128)
        disks_before = self._disk_counters()
        if self.nvme:
            self.host.disk("start", rate=DISK_RATE, qd=4)
        time.sleep(0.05)
        with self._lock:
            self._armed = True
        for f in faults:
            if "trigger" in f:
                self._arm(f)
        self._fire("before")
        t0 = time.monotonic()
        result, error = None, None
        try:
            result = self.host.service(**request)
        except rpc.RpcError as e:
            error = f"{type(e).__name__}: {e}"
        took = time.monotonic() - t0
        self._disarm()
        if result is not None:
            self._saved_relay_drops(old_generation)
        record = {"index": i, "path": p["path"], "faults": [describe(f) for f in faults], "s": round(took, 3),
                  "status": result["status"] if result else "error", "blackout_ms": result and result["blackout_ms"],
                  "paths": [n["restore_path"] for n in result["nics"]] if result else None,
                  **({"disk_paths": [d["restore_path"] for d in result.get("nvme") or []],
                      "io_errors": result.get("io_errors")} if result and self.nvme else {}),
                  "error": (result or {}).get("error") or error}
        found: list[tuple[str, str]] = []
        if error is not None:
            found.append(("servicing_completes", error))
        found += self._check(before, record, killed_with_running_relay(p))
        found += self._check_disks(disks_before)
        fired = self._scan_logs(found)
        record["kill_points_fired"] = fired
        for invariant, detail in found:
            self.violations.append({"servicing": i, "fault": ", ".join(record["faults"]) or "none",
                                    "path": p["path"], "invariant": invariant, "detail": detail})
        record["violations"] = [v for v, _ in found]
        self.records.append(record)
        return record

    def _arm(self, f: dict) -> None:
        if f["kind"] in NVME_FAULTS:
            return self._arm_nvme(f)
        nic, kind, ms = f["nic"], f["kind"], f.get("ms", 0) / 1000

        def later(action):
            t = threading.Timer(ms, self._guarded, (action,))
            self._undo.append((t, action))
            t.start()

        if kind == "hwc_fail":
            def action():
                self._guarded(lambda: self.device(nic, "fail_request", type=f["request"], mode="once"))
        elif kind == "hwc_stall":
            def action():
                self._guarded(lambda: self.device(nic, "hwc_stall", on=True))
                later(lambda: self.device(nic, "hwc_stall", on=False))
        elif kind == "surprise_removal":
            def action():
                self._guarded(lambda: self.device(nic, "surprise_removal", on=True))
                later(lambda: self.device(nic, "surprise_removal", on=False))
        elif kind == "vf_reset":
            def action():
                self._guarded(lambda: self.device(nic, "raise_reset_request"))
        elif kind == "link_flap":
            def action():
                self._guarded(lambda: self.device(nic, "link", vport=0, up=False))
                later(lambda: self.device(nic, "link", vport=0, up=True))
        elif kind == "device_reset":
            def action():
                self._guarded(lambda: self.device(nic, "reset_function"))
        else:
            raise ValueError(kind)
        with self._lock:
            self._pending.setdefault(f["trigger"], []).append(action)

    def _arm_nvme(self, f: dict) -> None:
        disk = f["disk"]
        if f["kind"] == "nvme_io_delay":
            def action():
                self._guarded(lambda: self.nvme_device(disk, "io_delay", ms=f["ms"]))
        else:
            def action():
                self._guarded(lambda: self.nvme_device(disk, "admin_fault", opcode=f["opcode"], action="delay",
                                                       ms=300, mode="once"))
        with self._lock:
            self._pending.setdefault(f["trigger"], []).append(action)

    @staticmethod
    def _guarded(fn) -> None:
        try:
            fn()
        except (rpc.RpcError, OSError):
            pass  # a device fault the device refused (e.g. no HWC to post an event on) simply did not happen

    def _disarm(self) -> None:
        """After the servicing: faults whose phase never came are dropped, timed undos run now, and
        one-shot rules that found no request are cleared."""
        with self._lock:
            self._armed = False
            self._pending.clear()
            undo, self._undo = self._undo, []
        for timer, action in undo:
            timer.cancel()
            timer.join()
            self._guarded(action)  # idempotent (stall off, present again, link up)
        for nic in range(self.nics):
            self._guarded(lambda: self.device(nic, "clear_faults"))
        for disk in range(self.nvme):
            self._guarded(lambda: self.nvme_device(disk, "clear_faults"))

    # -- invariants ------------------------------------------------------------------------------
    def _counters(self) -> dict:
        rings = self.host.inspect("host/rings")
        devices = [self.device(n, "counters")["counters"] for n in range(self.nics)]
        return {"rings": rings, "devices": devices}

    def _saved_relay_drops(self, generation: int | None) -> None:
        """The old worker's last relay counters, from its save outcomes (it exited with them)."""
        outcomes = (self.host.inspect("last_servicing") or {}).get("save_outcomes") or []
        seen = self._relay_seen.setdefault(generation, {})
        for n, outcome in enumerate(outcomes):
            drops = sum((outcome.get("relay") or {}).get(k, 0) for k in RELAY_DROPS)
            seen[n] = max(seen.get(n, 0), drops)

    def _relay_drops(self) -> int:
        """Relay drops over every worker generation seen (each generation's last reading)."""
        try:
            worker = self.host.inspect("worker")
        except rpc.RpcError:
            worker = None
        if isinstance(worker, dict) and "generation" in worker:
            seen = self._relay_seen.setdefault(worker["generation"], {})
            for n, nic in enumerate(worker.get("nics") or []):
                seen[n] = max(seen.get(n, 0), sum((nic.get("relay") or {}).get(k, 0) for k in RELAY_DROPS))
        return sum(sum(v.values()) for v in self._relay_seen.values())

    def _check(self, before: dict, record: dict, killed: bool) -> list[tuple[str, str]]:
        found = []
        relay_before = self._relay_drops_before
        if (problem := self._wait_working()) is not None:
            found.append(("devices_work", problem))
            self.host.traffic("stop")
            return found + self._check_static()
        self.host.traffic("stop")
        stats = self.host.traffic("stats", settle_ms=SETTLE_MS)["nics"]
        after = self._counters()
        relay_now = self._relay_drops()
        lost = sum(s["frames_lost"] for s in stats)
        counted = relay_now - relay_before
        for n in range(self.nics):
            for ring in ("tx", "rx"):
                counted += after["rings"][n][ring]["dropped_full"] - before["rings"][n][ring]["dropped_full"]
            counted += sum(after["devices"][n][k] - before["devices"][n][k] for k in DEVICE_DROPS)
        if killed and counted <= lost <= counted + KILLED_RELAY_BOUND * self.nics:
            record["uncounted_in_killed_worker"] = lost - counted
        elif lost != counted:
            found.append(("frames_accounted", f"guest lost {lost} frames, drop counters account for {counted}"))
        bad = [(s["nic"], s["duplicated"], s["unknown"]) for s in stats if s["duplicated"] or s["unknown"]]
        if bad:
            found.append(("frames_accounted", f"duplicated/unknown frames (nic, dup, unknown): {bad}"))
        self._relay_drops_before = relay_now
        return found + self._check_static()

    def _disk_counters(self) -> dict[int, dict]:
        if not self.nvme:
            return {}
        return {a["disk"]: a.get("counters", {}) for a in self.host.disk("status")["agents"] if a.get("alive")}

    def _check_disks(self, before: dict[int, dict]) -> list[tuple[str, str]]:
        """Every disk completes IO again within the bound; once stopped, every request the guest issued has
        completed, none with an error, a failed verification or twice."""
        if not self.nvme:
            return []
        deadline = time.monotonic() + DEVICE_BOUND_S
        base = self._disk_counters()
        while True:
            now = self._disk_counters()
            if all(now.get(d, {}).get("completed", 0) >= base.get(d, {}).get("completed", 0) + 10
                   for d in range(self.nvme)):
                break
            if time.monotonic() > deadline:
                self.host.disk("stop")
                return [("devices_work", f"not every disk completed IO again within {DEVICE_BOUND_S:g} s: {now}")]
            time.sleep(0.05)
        self.host.disk("stop")
        deadline = time.monotonic() + DEVICE_BOUND_S
        while True:
            now = self._disk_counters()
            if all(c.get("submitted", 0) == c.get("completed", 0) for c in now.values()):
                break
            if time.monotonic() > deadline:
                return [("io_accounted", f"requests still outstanding {DEVICE_BOUND_S:g} s after IO stopped: {now}")]
            time.sleep(0.05)
        bad = {d: {k: c.get(k, 0) - before.get(d, {}).get(k, 0) for k in ("errors", "verify_errors", "duplicates")}
               for d, c in now.items()}
        bad = {d: v for d, v in bad.items() if any(v.values())}
        return [("io_accounted", f"IO errors, failed verifications or duplicates per disk: {bad}")] if bad else []

    def _wait_working(self) -> str | None:
        """None once the worker is up and every NIC's agent received new frames; else what did not happen."""
        deadline = time.monotonic() + DEVICE_BOUND_S
        base = None
        while time.monotonic() < deadline:
            try:
                status = self.host.status()
            except rpc.RpcError as e:
                return f"host does not answer: {e}"
            w = status["worker"]
            if status["servicing"] is None and w is not None and w["alive"]:
                agents = {a["nic"]: a["received"] for a in self.host.traffic("status")["agents"] if a.get("alive")}
                if base is None:
                    base = agents
                elif all(agents.get(n, 0) >= base.get(n, 0) + 20 for n in range(self.nics)):
                    return None
            time.sleep(0.05)
        return f"not every NIC carried frames again within {DEVICE_BOUND_S:g} s (worker {w})"

    def _check_static(self) -> list[tuple[str, str]]:
        return self._check_pool() + self._check_processes()

    def _check_pool(self) -> list[tuple[str, str]]:
        try:
            worker = self.host.inspect("worker")
        except rpc.RpcError as e:
            return [("pool_accounting", f"worker not inspectable: {e}")]
        pool = worker.get("pool") if isinstance(worker, dict) else None
        if not pool:
            return [("pool_accounting", f"no pool in the worker's tree: {str(worker)[:200]}")]
        problems = []
        slots = pool["slot_table"]
        base = slots[0]["base_pfn"] if slots else 0
        covered = base
        for s in slots:
            if s["base_pfn"] != covered:
                problems.append(f"slot at pfn {s['base_pfn']} does not follow pfn {covered} (overlap or hole)")
            covered = s["base_pfn"] + s["pages"]
        if covered - base != pool["total_pages"]:
            problems.append(f"slots cover {covered - base} pages of {pool['total_pages']}")
        if pool["pending_pages"] or pool["leaked_pages"]:
            problems.append(f"pending {pool['pending_pages']} / leaked {pool['leaked_pages']} pages")
        expected = {}
        for nic in worker.get("nics") or []:
            pages = 0
            hwc = (nic.get("device") or {}).get("hwc_buffer") or {}
            if hwc.get("persistent"):
                pages += hwc.get("pages", 0)
            if (nic.get("vport") or {}).get("persistent"):
                pages += KEPT_VPORT_PAGES
            if pages:
                expected[f"nic_{nic['pci_id']}"] = pages
        nics = {k: v for k, v in pool["devices"].items() if k.startswith("nic_")}
        if nics != expected:
            problems.append(f"pool owners {nics} != live persistent allocations {expected}")
        others = {k: v for k, v in pool["devices"].items() if not k.startswith("nic_")}
        if self._nvme_pool is None:
            self._nvme_pool = others
        elif others != self._nvme_pool:
            problems.append(f"NVMe pool owners {others} != {self._nvme_pool} after the warm-up")
        return [("pool_accounting", "; ".join(problems))] if problems else []

    def _check_processes(self) -> list[tuple[str, str]]:
        """Counts back to the baseline, read again for up to PROCESS_SETTLE_S (a process still exiting right
        after a servicing is not a leak; a leaked one stays)."""
        b = self.baseline
        if b is None:  # the warm-up servicing, before the baseline
            return []
        deadline = time.monotonic() + PROCESS_SETTLE_S
        while (problems := self._process_problems(self._measure())) and time.monotonic() < deadline:
            time.sleep(0.1)
        return [("processes_fds", "; ".join(problems))] if problems else []

    def _process_problems(self, now: Baseline) -> list[str]:
        b = self.baseline
        problems = []
        if now.children != b.children:
            problems.append(f"host has {now.children} children, baseline {b.children}")
        if now.run_dir_processes != b.run_dir_processes:
            problems.append(f"{now.run_dir_processes} processes name the run dir, baseline {b.run_dir_processes}")
        if now.host_fds > b.host_fds:
            problems.append(f"host has {now.host_fds} fds open, baseline {b.host_fds}")
        for n, (fds, base) in enumerate(zip(now.device_fds, b.device_fds)):
            if fds > base:
                problems.append(f"device {n} has {fds} fds open, baseline {base}")
        return problems

    def _measure(self) -> Baseline:
        host_pid = self.host.pid
        devices = [d["pid"] for d in self.host.status()["devices"]]
        return Baseline(len(proc.children(host_pid)), len(proc.processes_mentioning(self.run_dir)),
                        _fd_count(host_pid), [_fd_count(p) for p in devices])

    def take_baseline(self) -> None:
        self.host.traffic("stop")
        self.baseline = self._measure()
        self._relay_drops_before = self._relay_drops()

    def _scan_logs(self, found: list | None = None) -> list[str]:
        """New text of every log and stderr file since the last scan: tracebacks are violations; returns the
        kill points that fired."""
        fired = []
        for name in sorted(os.listdir(self.run_dir)):
            if not name.endswith((".log", ".stderr")):
                continue
            path = os.path.join(self.run_dir, name)
            try:
                with open(path, errors="replace") as f:
                    f.seek(self._log_offsets.get(name, 0))
                    text = f.read()
                    self._log_offsets[name] = f.tell()
            except OSError:
                continue
            if found is not None and "Traceback" in text:
                at = text.index("Traceback")
                found.append(("no_traceback", f"{name}: {text[at:at + 600]}"))
            for line in text.splitlines():
                if "kill point reached" in line:
                    fired += [w.partition("=")[2] for w in line.split() if w.startswith("point=")]
        return fired


def _fd_count(pid: int) -> int:
    """Open fds once in-flight control connections have closed (the smallest of a few samples)."""
    samples = []
    for _ in range(4):
        try:
            samples.append(proc.open_fd_count(pid))
        except OSError:
            return -1
        time.sleep(0.03)
    return min(samples)


def percentiles(values: list[float]) -> dict:
    if not values:
        return {}
    s = sorted(values)
    pick = lambda q: s[min(len(s) - 1, int(q * len(s)))]  # noqa: E731
    return {"p50": round(statistics.median(s), 1), "p95": round(pick(0.95), 1), "p99": round(pick(0.99), 1),
            "max": round(s[-1], 1)}


def summarize(campaign: Campaign, seed: int, nics: int, nvme: int, duration_s: float, plans: list[dict]) -> dict:
    faults: dict[str, int] = {}
    paths: dict[str, int] = {}
    statuses: dict[str, int] = {}
    for p, r in zip(plans, campaign.records):
        paths[p["path"]] = paths.get(p["path"], 0) + 1
        statuses[r["status"]] = statuses.get(r["status"], 0) + 1
        for f in p["faults"]:
            faults[f["kind"]] = faults.get(f["kind"], 0) + 1
    blackouts = [r["blackout_ms"] for r in campaign.records if r["blackout_ms"] is not None]
    return {"servicings": len(campaign.records), "seed": seed, "nics": nics, "nvme": nvme,
            "faults": dict(sorted(faults.items())), "violations": campaign.violations,
            "paths": dict(sorted(paths.items())), "statuses": statuses,
            "nvme_keepalive": sum(1 for p in plans[:len(campaign.records)] if p.get("nvme_keepalive")),
            "servicings_without_fault": sum(1 for p in plans[:len(campaign.records)] if not p["faults"]),
            "uncounted_in_killed_workers": sum(r.get("uncounted_in_killed_worker", 0) for r in campaign.records),
            "blackout_ms": percentiles(blackouts), "duration_s": round(duration_s, 1),
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                        "load_average": [round(x, 2) for x in os.getloadavg()]},
            "records": campaign.records}


def print_summary(report: dict, console) -> None:
    from rich.table import Table

    t = Table(title=f"vfkeep chaos: {report['servicings']} servicings, seed {report['seed']}, "
                    f"{report['nics']} NIC(s), {report['duration_s']:g} s")
    t.add_column("what")
    t.add_column("count", justify="right")
    for path, n in report["paths"].items():
        t.add_row(f"path {path}", str(n))
    t.add_row("no fault", str(report["servicings_without_fault"]))
    for kind, n in report["faults"].items():
        t.add_row(f"fault {kind}", str(n))
    for status, n in sorted(report["statuses"].items()):
        t.add_row(f"status {status}", str(n))
    b = report["blackout_ms"]
    if b:
        t.add_row("blackout ms p50/p95/p99/max", f"{b['p50']} / {b['p95']} / {b['p99']} / {b['max']}")
    t.add_row("frames lost in killed workers (uncounted)", str(report["uncounted_in_killed_workers"]))
    t.add_row("violations", str(len(report["violations"])), style="red" if report["violations"] else "green")
    console.print(t)
    for v in report["violations"][:20]:
        console.print(f"[red]servicing {v['servicing']}[/] {v['path']} [{v['fault']}] {v['invariant']}: "
                      f"{v['detail'][:300]}", markup=True, highlight=False)


def _replay_plans(replay: str, seed: int, nics: int, nvme: int) -> tuple[list[dict], int, int, int]:
    """`--replay INDEX` (with --seed) or `--replay REPORT.json` (every servicing with a violation). A value
    that is neither is bad usage (click.BadParameter), found before anything starts."""
    def bad(why: str) -> click.BadParameter:
        return click.BadParameter(why, param_hint="--replay")

    if re.fullmatch(r"\s*-?\d+\s*", replay):
        if int(replay) < 0:
            raise bad(f"servicing index {replay.strip()} is negative")
        return [plan(seed, int(replay), nics, nvme)], seed, nics, nvme
    try:
        with open(replay) as f:
            report = json.load(f)
        seed, nics, nvme = report["seed"], report["nics"], report.get("nvme", 0)
        indexes = sorted({v["servicing"] for v in report["violations"]})
    except FileNotFoundError:
        raise bad(f"{replay!r} is neither a servicing index nor an existing report file") from None
    except OSError as e:
        raise bad(f"cannot read {replay}: {e.strerror}") from None
    except (ValueError, KeyError, TypeError) as e:  # not JSON, or not a chaos report
        raise bad(f"{replay} is not a chaos report (--json of `vfkeep chaos`): {e}") from None
    if not indexes:
        raise click.ClickException(f"{replay} has no violation to replay")
    return [plan(seed, i, nics, nvme) for i in indexes], seed, nics, nvme


def _keep(campaign: Campaign, why: str) -> str:
    """Stop the campaign's host and move its run dir out of the temporary one, for its logs."""
    keep = os.path.join(tempfile.gettempdir(), f"vfk-chaos-{why}-{os.getpid()}")
    campaign.close()
    if os.path.exists(campaign.run_dir):
        os.rename(campaign.run_dir, keep)
    return keep


def run_campaign(servicings: int, seed: int, nics: int, nvme: int, json_path: str | None, replay: str | None,
                 run_args: tuple[str, ...], console=None, progress: bool = True) -> dict:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = console or Console(stderr=True)
    if replay is not None:
        plans, seed, nics, nvme = _replay_plans(replay, seed, nics, nvme)
    else:
        plans = [plan(seed, i, nics, nvme) for i in range(servicings)]
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="vfk-chaos-") as tmp:
        campaign = Campaign(os.path.join(tmp, "run"), nics, seed, run_args, nvme)
        try:
            campaign.boot()
            # Warm-up (not counted): a plain keepalive servicing, then the baseline.
            campaign.run_one({"index": -1, "path": "keepalive+datapath", "faults": [], "nvme_keepalive": bool(nvme)})
            campaign.records.clear()
            campaign.violations.clear()
            campaign.take_baseline()
            with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                          console=console, disable=not progress, transient=False) as bar:
                task = bar.add_task("servicings", total=len(plans))
                for p in plans:
                    campaign.run_one(p)
                    bar.update(task, advance=1, description=f"servicings, {len(campaign.violations)} violation(s)")
        except Exception as e:
            keep = _keep(campaign, "failed")
            raise click.ClickException(f"stopped after {len(campaign.records)} servicings: {one_line(e)} "
                                       f"(see {os.path.join(keep, 'host.log')})") from e
        except KeyboardInterrupt as e:  # Ctrl-C, SIGTERM: what ran so far is reported
            keep = _keep(campaign, "interrupted")
            report = _report(campaign, seed, nics, nvme, t0, plans, keep, json_path, interrupted=True)
            e.note = (f"stopped after {report['servicings']} of {len(plans)} servicings, run dir kept in {keep}"
                      + (f", partial report in {json_path}" if json_path else ""))
            raise
        except BaseException:
            console.print(f"chaos: stopped; run dir kept in {_keep(campaign, 'failed')}")
            raise
        keep = _keep(campaign, "run") if campaign.violations else None
        if keep is None:
            campaign.close()
    return _report(campaign, seed, nics, nvme, t0, plans, keep, json_path)


def _report(campaign: Campaign, seed: int, nics: int, nvme: int, t0: float, plans: list[dict], keep: str | None,
            json_path: str | None, interrupted: bool = False) -> dict:
    """The campaign's report (`summarize` + plans, the kept run dir), written to `json_path` if given."""
    report = summarize(campaign, seed, nics, nvme, time.monotonic() - t0, plans)
    report["plans"] = plans
    report["run_dir_kept"] = keep
    report["interrupted"] = interrupted
    if json_path:
        with open(json_path, "w") as f:
            json.dump(report, f, indent=1)
    return report


@click.command("chaos")
@click.option("--servicings", type=click.IntRange(1), default=100, show_default=True)
@click.option("--seed", type=int, default=1, show_default=True)
@click.option("--nics", type=click.IntRange(1, 8), default=1, show_default=True)
@click.option("--nvme", type=click.IntRange(0, 8), default=0, show_default=True,
              help="NVMe controllers, each with a disk under verified guest IO (NVMe keepalive on most keepalive "
                   "servicings, IO and admin command delays among the faults)")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, callback=output_file,
              help="write the report here")
@click.option("--replay", default=None, metavar="REPORT.json|INDEX",
              help="re-run the servicings with a violation in REPORT.json (its seed and NICs), or servicing INDEX of "
                   "--seed, each after a warm-up servicing on a fresh host")
@timing_options("natural")
def chaos_command(servicings, seed, nics, nvme, json_path, replay, timing, hwc_latency_ms, flr_ms):
    """Servicings under random faults, invariants checked after each; exit 1 on any violation."""
    from rich.console import Console

    timing_from(timing, hwc_latency_ms, flr_ms)  # (a bad combination is a usage error before anything starts)
    proc.signals_interrupt()  # SIGTERM ends the campaign as Ctrl-C does: host stopped, partial report written
    if replay is not None:
        _replay_plans(replay, seed, nics, nvme)  # (likewise a --replay that names nothing to replay)
    run_args = ("--timing", timing)
    for opt, value in (("--hwc-latency-ms", hwc_latency_ms), ("--flr-ms", flr_ms)):
        if value is not None:
            run_args += (opt, str(value))
    console = Console(stderr=True)
    report = run_campaign(servicings, seed, nics, nvme, json_path, replay, run_args, console)
    print_summary(report, Console())
    if report["violations"]:
        first = report["violations"][0]
        raise click.ClickException(f"{len(report['violations'])} violation(s) in {report['servicings']} servicings, "
                                   f"the first in servicing {first['servicing']} ({first['invariant']}) "
                                   f"(see {os.path.join(report['run_dir_kept'], 'host.log')})")
