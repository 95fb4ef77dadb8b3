"""`make mutation`: do the tests bite? Small deliberate breaks of named critical behaviours, one at a time,
each on a fresh copy of the tree, running only the tests meant to catch it (issue 15 item 4).

    python tests/mutation.py [--seed S] [--random N] [--only NAME ...] [--list]

`MUTANTS` is the catalogue: a name, the file, one exact snippet and its replacement (a snippet that no longer
occurs exactly once is an error: the catalogue follows the code), and the tests. Every named mutant must be
killed (its tests fail); the run exits 1 otherwise. `--random N` adds N seeded mutants drawn from the same
files (a comparison flipped, a counter increment dropped), reported but not required to die: a survivor
there is a hint, not a failure. First the untouched copy runs every listed test once (they must pass, or a
kill would mean nothing).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
COPY = ("vfkeep", "tests", "pyproject.toml")


@dataclasses.dataclass(frozen=True)
class Mutant:
    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]
    regenerate_proto: bool = False


def proto_swap(name: str, path: str, a: str, b: str) -> Mutant:
    """Two adjacent field lines of a .proto trade their numbers (the generated modules are regenerated)."""
    na, nb = (re.search(r"= (\d+);", x).group(1) for x in (a, b))
    new = f"{a.replace(f'= {na};', f'= {nb};')}\n{b.replace(f'= {nb};', f'= {na};')}"
    return Mutant(name, path, f"{a}\n{b}", new, ("tests/test_saved_state_wire.py",), regenerate_proto=True)


RELAY = ("tests/test_relay_drops.py",)
CANARY = ("tests/test_dma_canaries.py",)
HOSTILE = ("tests/test_hostile_device.py",)
MUTANTS = [
    # the relay's drop counters
    Mutant("relay: rx_dropped_ring_full not counted", "vfkeep/paravisor/net_relay.py",
           "self.stats.rx_dropped_ring_full += len(views) - pushed", "pass", RELAY),
    Mutant("relay: rx_dropped_too_big not counted", "vfkeep/paravisor/net_relay.py",
           "self.stats.rx_dropped_too_big += len(views) - len(fit)", "pass", RELAY),
    Mutant("relay: tx_dropped_bad_frame not counted", "vfkeep/paravisor/net_relay.py",
           "self.stats.tx_dropped_bad_frame += 1", "pass", RELAY),
    Mutant("relay: tx_stranded not counted", "vfkeep/paravisor/net_relay.py",
           "self.stats.tx_stranded += self.datapath.tx_outstanding", "pass", RELAY),
    # field numbers of saved-state messages
    proto_swap("proto: WqSavedState head/tail swapped", "vfkeep/proto/mana_driver.proto",
               "  uint32 head = 4;", "  uint32 tail = 5;"),
    proto_swap("proto: SlotSavedState base_pfn/size_pages swapped", "vfkeep/proto/pagepool.proto",
               "  uint64 base_pfn = 1;    // without bias", "  uint64 size_pages = 2;"),
    proto_swap("proto: InnerSlotState allocated/leaked swapped", "vfkeep/proto/pagepool.proto",
               "    SlotOwner allocated = 2;", "    SlotOwner leaked = 3;"),
    proto_swap("proto: CqEqSavedState next/size swapped", "vfkeep/proto/mana_driver.proto",
               "  uint32 next = 4;", "  uint32 size = 5;"),
    proto_swap("proto: nvme SubmissionQueueSavedState head/tail swapped", "vfkeep/proto/nvme_driver.proto",
               "  uint32 head = 2;", "  uint32 tail = 3;"),
    # the device writing outside a posted RX buffer
    Mutant("device: RX frame written 16 bytes past its buffer (one-SGE path)", "vfkeep/device/vport.py",
           "if size >= length and win.base <= address", "if size + 16 >= length and win.base <= address", CANARY),
    Mutant("device: RX batch written 16 bytes past its buffers (batched path)", "vfkeep/device/vport.py",
           "if not all(map(operator.ge, sizes, lengths)) or max(lengths) > MAX_FRAME:",
           "if not all(s + 16 >= n for s, n in zip(sizes, lengths)) or max(lengths) > MAX_FRAME:", CANARY),
    Mutant("device: RX scatter writes 16 bytes past an SGE", "vfkeep/device/vport.py",
           "        n = min(size, len(frame))\n", "        n = min(size + 16, len(frame))\n", CANARY),
    # FLR state
    Mutant("device: FLR keeps the vport's filter direction", "vfkeep/device/core.py",
           "        self._power_on()\n        self.counters[\"reset_count\"] += 1",
           "        kept = [v.direction_to_vtl0 for v in self.vports]\n        self._power_on()\n"
           "        for v, d in zip(self.vports, kept):\n            v.direction_to_vtl0 = d\n"
           "        self.counters[\"reset_count\"] += 1",
           ("tests/test_device_core.py::test_flr_returns_every_vport_to_power_on",)),
    # driver checks against a misbehaving device
    Mutant("driver: SMC window size not checked", "vfkeep/driver/gdma_driver.py",
           "if regs.vf_gdma_sriov_shared_sz != SMC_WINDOW_SIZE:", "if False:", HOSTILE),
    Mutant("driver: gdma protocol version not checked", "vfkeep/driver/gdma_driver.py",
           "if resp.gdma_protocol_ver != DRV_GDMA_PROTOCOL_VER:", "if False:", HOSTILE),
    Mutant("driver: short HWC responses accepted", "vfkeep/driver/gdma_driver.py",
           "if resp.response.msg_size < body_size:", "if False:", HOSTILE),
    Mutant("driver: REGISTER_DEVICE doorbell page not checked", "vfkeep/driver/gdma_driver.py",
           "if resp.db_id >= self.layout.db_page_count:", "if False:", HOSTILE),
    Mutant("driver: stray event during bring-up ignored", "vfkeep/driver/gdma_driver.py",
           'raise BringUpError(f"unexpected event type {kind} during HWC bring-up")', "pass", HOSTILE),
    Mutant("driver: RX completion longer than its buffer handed up", "vfkeep/driver/datapath.py",
           "and max(lengths) <= bs:  # the common batch", "and True:  # the common batch",
           HOSTILE),
    # queue memory on non-consecutive pages
    Mutant("driver: HWC response page addressed as buffer base + offset", "vfkeep/driver/gdma_driver.py",
           "self._resp_addr = dma_address(hwc_mem, DRV_HWC_RESPONSE_PAGE * PAGE_SIZE, PAGE_SIZE)",
           "self._resp_addr = hwc_mem.gpa + DRV_HWC_RESPONSE_PAGE * PAGE_SIZE",
           ("tests/test_noncontiguous_queues.py",)),
    Mutant("driver: packet buffers addressed as block base + offset", "vfkeep/driver/backing.py",
           "return (pfns[first] * PAGE_SIZE + offsets % PAGE_SIZE).astype(np.uint64)",
           "return (pfns[0] * PAGE_SIZE + offsets).astype(np.uint64)",
           ("tests/test_noncontiguous_queues.py",)),
    Mutant("device: scattered ring pages taken as contiguous", "vfkeep/device/queues.py",
           "self.base = pages[0] + offset if contiguous else None", "self.base = pages[0] + offset",
           ("tests/test_noncontiguous_queues.py",)),
    # saved-state validation
    Mutant("restore: saved HWC buffer length not checked", "vfkeep/driver/save_restore.py",
           "if state.mem.len != HWC_BUFFER_LEN:", "if False:", ("tests/test_driver_saved_state.py",)),
    Mutant("restore: overlapping saved pool slots accepted", "vfkeep/memory/page_pool.py",
           "        if base_pfn < next_pfn:\n", "        if False:\n", ("tests/test_memory_dma_manager.py",)),
    Mutant("restore: kept vport's MSI-X vector not checked", "vfkeep/driver/save_restore.py",
           "if not state.vector < num_msix:", "if False:", ("tests/test_vport_saved_state.py",)),
    Mutant("restore: kept vport index allowed one past 24 bits", "vfkeep/driver/save_restore.py",
           "if state.vport_index >= VPORT_INDEX_LIMIT:", "if state.vport_index > VPORT_INDEX_LIMIT:",
           ("tests/test_vport_saved_state.py",)),
    Mutant("restore: saved HWC buffer outside the pool accepted", "vfkeep/driver/save_restore.py",
           "if not pool.contains_pfn(state.mem.base_pfn, DRV_HWC_NUM_PAGES):", "if False:",
           ("tests/test_driver_saved_state.py",)),
]
#: Files of the named behaviours and the tests for each: where `--random` mutants are drawn.
RANDOM_SCOPE = {
    "vfkeep/paravisor/net_relay.py": RELAY,
    "vfkeep/device/vport.py": CANARY + ("tests/test_device_core.py",),
    "vfkeep/driver/gdma_driver.py": HOSTILE + ("tests/test_driver_inprocess.py",),
    "vfkeep/driver/save_restore.py": ("tests/test_driver_saved_state.py", "tests/test_vport_saved_state.py"),
}
_FLIPS = {" < ": " <= ", " <= ": " < ", " > ": " >= ", " >= ": " > ", " == ": " != ", " != ": " == "}


def random_mutants(seed: int, n: int) -> list[Mutant]:
    """`n` seeded mutants: in a scope file, a line's comparison flipped or a `+=` counter line made `pass`."""
    rng = random.Random(seed)
    out: list[Mutant] = []
    candidates = []
    for path, tests in sorted(RANDOM_SCOPE.items()):
        text = (ROOT / path).read_text()
        lines = text.splitlines(keepends=True)
        for i, line in enumerate(lines):
            body = line.strip()
            if not body or body.startswith(("#", '"', "'")) or text.count(line) != 1:
                continue  # comments, docstrings, and lines that are not unique snippets
            for a, b in _FLIPS.items():
                if a in line and (body.startswith(("if ", "while ", "elif ", "return ")) or " if " in line):
                    candidates.append(Mutant(f"random: {path}:{i + 1} '{a.strip()}' -> '{b.strip()}'", path, line,
                                             line.replace(a, b, 1), tests))
                    break
            if re.match(r"\s*self\.(stats|counters)\.?\w*(\[.*\])? \+= ", line) or re.match(r"\s*counters\[.*\] \+= ",
                                                                                         line):
                indent = line[:len(line) - len(line.lstrip())]
                candidates.append(Mutant(f"random: {path}:{i + 1} counter dropped", path, line, f"{indent}pass\n",
                                         tests))
    rng.shuffle(candidates)
    for m in candidates[:n]:
        out.append(m)
    return out


def copy_tree(dest: pathlib.Path) -> None:
    for name in COPY:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache"))
        else:
            shutil.copy2(src, dest / name)


def run_tests(tree: pathlib.Path, tests: tuple[str, ...], timeout: float) -> tuple[int, str]:
    """pytest on `tests` inside `tree` (its `vfkeep` first on the path); (returncode, last lines)."""
    env = dict(os.environ, PYTHONPATH=str(tree), PYTHONDONTWRITEBYTECODE="1")
    env.pop("VFKEEP_SUITE_TMPDIR", None)  # run from the suite: the child session checks a temp dir of its own
    try:
        p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
                           cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return -1, "timed out"
    return p.returncode, "\n".join((p.stdout + p.stderr).strip().splitlines()[-3:])


def apply(tree: pathlib.Path, m: Mutant) -> None:
    path = tree / m.path
    text = path.read_text()
    if text.count(m.old) != 1:
        raise ValueError(f"{m.name}: snippet occurs {text.count(m.old)} times in {m.path} (catalogue is stale)")
    path.write_text(text.replace(m.old, m.new))
    if m.regenerate_proto:
        subprocess.run([sys.executable, "-m", "vfkeep.proto.generate"], cwd=tree, check=True,
                       env=dict(os.environ, PYTHONPATH=str(tree)), capture_output=True)


def check_catalogue(mutants: list[Mutant]) -> list[str]:
    """Problems with the catalogue against the current tree (a snippet not found exactly once)."""
    problems = []
    for m in mutants:
        n = (ROOT / m.path).read_text().count(m.old)
        if n != 1:
            problems.append(f"{m.name}: snippet occurs {n} times in {m.path}")
    return problems


def run(mutants: list[Mutant], timeout: float = 300.0, log=print) -> dict:
    """Baseline, then each mutant on its own copy. Returns {"baseline_ok", "results": [(mutant, outcome, tail)]}
    with outcome killed / survived / error."""
    results = []
    with tempfile.TemporaryDirectory(prefix="vfkeep-mutation-") as tmp:
        base = pathlib.Path(tmp) / "base"
        base.mkdir()
        copy_tree(base)
        tests = tuple(sorted({t for m in mutants for t in m.tests}))
        rc, tail = run_tests(base, tests, timeout)
        if rc != 0:
            log(f"baseline: the untouched tree fails its tests (rc {rc}):\n{tail}")
            return {"baseline_ok": False, "results": []}
        log(f"baseline: {len(tests)} test files pass on the untouched tree")
        for i, m in enumerate(mutants):
            tree = pathlib.Path(tmp) / f"m{i}"
            shutil.copytree(base, tree)
            start = time.monotonic()
            try:
                apply(tree, m)
                rc, tail = run_tests(tree, m.tests, timeout)
                outcome = "killed" if rc == 1 else "survived" if rc == 0 else "error"
            except (ValueError, subprocess.CalledProcessError) as e:
                outcome, tail = "error", str(e)
            shutil.rmtree(tree, ignore_errors=True)
            results.append((m, outcome, tail))
            log(f"{outcome:8} {time.monotonic() - start:5.1f}s  {m.name}")
    return {"baseline_ok": True, "results": results}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--random", type=int, default=6, help="seeded extra mutants (informational)")
    ap.add_argument("--only", nargs="*", help="named mutants whose name contains one of these words")
    ap.add_argument("--list", action="store_true")
    args = ap.parse_args(argv)
    named = [m for m in MUTANTS if not args.only or any(w in m.name for w in args.only)]
    extra = random_mutants(args.seed, args.random)
    if args.list:
        for m in named + extra:
            print(f"{m.name}  [{m.path}]  -> {' '.join(m.tests)}")
        return 0
    problems = check_catalogue(named + extra)
    if problems:
        print("stale catalogue:\n" + "\n".join(problems))
        return 1
    start = time.monotonic()
    report = run(named + extra)
    if not report["baseline_ok"]:
        return 1
    results = report["results"]
    named_set = set(named)
    print(f"\n{'mutant':78} outcome")
    for m, outcome, tail in results:
        print(f"{m.name[:78]:78} {outcome}")
    nk = sum(1 for m, o, _ in results if m in named_set and o == "killed")
    rk = sum(1 for m, o, _ in results if m not in named_set and o == "killed")
    print(f"\nnamed: {nk}/{len(named)} killed; random (seed {args.seed}): {rk}/{len(extra)} killed; "
          f"{time.monotonic() - start:.0f}s")
    bad = [(m, o, t) for m, o, t in results if m in named_set and o != "killed"]
    for m, o, t in bad:
        print(f"NOT KILLED: {m.name} ({o})\n{t}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
