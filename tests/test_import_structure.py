"""Who may import whom (issue 9): no import cycles between vfkeep's packages (any import that can run counts,
in functions too), the emulator core independent of the transport, the driver independent of the DMA manager,
the transport and the paravisor (it gets its DMA clients through its device backing). Read from the source
with `ast`; module cycles inside host/ and memory/ are `test_module_cycles.py`'s."""
import ast
import importlib
import pathlib
import subprocess
import sys

from test_module_cycles import ROOT, _module_name, cycles


def _type_checking_only(node: ast.If) -> bool:
    return isinstance(node.test, (ast.Name, ast.Attribute)) and "TYPE_CHECKING" in ast.unparse(node.test)


def imports(path: pathlib.Path) -> list[tuple[str, list[str]]]:
    """(module, names) of every import the file runs (`from m import a, b` gives names; `import m` none),
    relative imports resolved; imports under `if TYPE_CHECKING:` are left out (they never run)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []

    def visit(node):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _type_checking_only(child):
                for other in child.orelse:
                    visit(other)
                continue
            if isinstance(child, ast.Import):
                found.extend((a.name, []) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")
                    base = base[:len(base) - child.level + 1]
                    mod = ".".join(base + ([child.module] if child.module else []))
                else:
                    mod = child.module
                found.append((mod, [a.name for a in child.names]))
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    return found


def vfkeep_modules() -> dict[str, pathlib.Path]:
    return {_module_name(p): p for p in ROOT.rglob("*.py") if not p.name.endswith("_pb2.py")}


def imported_modules(path: pathlib.Path, known: dict[str, pathlib.Path]) -> set[str]:
    """vfkeep modules a file imports (a `from package import submodule` counts as the submodule)."""
    out = set()
    for mod, names in imports(path):
        if not mod.startswith("vfkeep"):
            continue
        subs = [f"{mod}.{n}" for n in names if f"{mod}.{n}" in known]
        out.update(subs or [mod])
    return out


def package_of(module: str) -> str:
    """`vfkeep.driver.mana` -> `vfkeep.driver`; top-level modules (`vfkeep.log`) are their own node."""
    return ".".join(module.split(".")[:2])


def _is_top_level(node: str) -> bool:
    return not (ROOT / node.split(".")[1]).is_dir()


def test_no_import_cycles_between_packages():
    known = vfkeep_modules()
    graph: dict[str, set[str]] = {package_of(name): set() for name in known}
    for name, path in known.items():
        src = package_of(name)
        for dst in imported_modules(path, known):
            dst = package_of(dst)
            # Between two top-level modules (`vfkeep.demo` -> `vfkeep.demo_net`) is a module-level edge
            # inside the root package, not a package-level one.
            if dst not in (src, "vfkeep") and not (_is_top_level(src) and _is_top_level(dst)):
                graph[src].add(dst)
    assert len(graph) > 8 and sum(map(len, graph.values())) > 10, "the graph reader found hardly any imports"
    assert cycles(graph) == []


def test_emulator_core_loads_nothing_of_the_transport():
    code = ("import sys, vfkeep.device.core; "
            "print([m for m in sys.modules if m.startswith('vfkeep.vfio_user')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def defining_module(module: str, name: str) -> str:
    """Where `from module import name` really comes from (a package re-exports its modules' names)."""
    obj = getattr(importlib.import_module(module), name, None)
    if obj is None:  # a submodule not imported by its package
        return f"{module}.{name}"
    return getattr(obj, "__module__", None) or getattr(obj, "__name__", module)


def test_driver_imports_neither_the_dma_manager_nor_the_paravisor():
    known = vfkeep_modules()
    bad = []
    for name, path in known.items():
        if not name.startswith("vfkeep.driver"):
            continue
        for mod, names in imports(path):
            sources = {mod} | {defining_module(mod, n) for n in names if mod.startswith("vfkeep.")
                               and f"{mod}.{n}" not in known}
            for src in sources:
                if src == "vfkeep.memory.dma_manager" or src.startswith(("vfkeep.paravisor", "vfkeep.vfio_user")):
                    bad.append(f"{name} imports {src} ({', '.join(names) or mod})")
    assert bad == []
