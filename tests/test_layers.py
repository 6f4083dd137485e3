"""Imports point down the layers of DESIGN.md §3, never up or sideways.

cli on top; agent and relay (one root nursery each) side by side; net and
discovery (the only code touching sockets and threads); the sync engine; the
sans-IO protocol and noise; the store and the shared leaf modules; the model
at the bottom. A module may import its own package and anything lower.
"""

from __future__ import annotations

import ast
from pathlib import Path

import p2psync

ROOT = Path(p2psync.__file__).parent
RANK = {
    "model": 0,
    "store": 1, "noise": 1, "identity": 1, "logsetup": 1,
    "protocol": 2, "config": 2,
    "sync": 3, "group": 3,
    "net": 4, "discovery": 4,
    "agent": 5, "relay": 5,
    "cli": 6, "__main__": 7,
}


def _unit(module: str) -> str:
    """The layer unit of a dotted module name inside p2psync ('p2psync.store.sqlite' -> 'store')."""
    return module.split(".")[1] if "." in module else module


def _imports(path: Path) -> set[str]:
    """The p2psync modules ``path`` imports (relative imports resolved)."""
    rel = path.relative_to(ROOT.parent).with_suffix("")
    package = list(rel.parts[:-1]) if rel.name != "__init__" else list(rel.parts[:-1])
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if name.startswith("p2psync"):
                out.add(name)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("p2psync"))
    return out


def test_every_module_is_in_a_layer():
    units = {_unit(".".join(p.relative_to(ROOT.parent).with_suffix("").parts)) for p in ROOT.rglob("*.py")}
    units.discard("__init__")
    assert units <= set(RANK), f"modules outside any layer: {sorted(units - set(RANK))}"


def test_imports_point_down():
    bad = []
    for path in sorted(ROOT.rglob("*.py")):
        src = _unit(".".join(path.relative_to(ROOT.parent).with_suffix("").parts))
        if src == "__init__":
            continue
        for target in _imports(path):
            dst = _unit(target)
            if dst in ("p2psync", src):
                continue
            if RANK.get(dst, 99) >= RANK[src]:
                bad.append(f"{path.relative_to(ROOT.parent)} ({src}) imports {target} ({dst})")
    assert not bad, "imports pointing up or sideways:\n" + "\n".join(bad)


IO_MODULES = {"time", "trio", "socket", "threading", "os", "apsw", "psycopg", "asyncio", "subprocess", "select",
              "selectors", "zeroconf"}
PURE_UNITS = ("model", "protocol", "noise")


def test_the_core_does_no_io():
    """model/, protocol/ and noise/ import nothing that reads clocks, touches sockets, files or threads."""
    bad = []
    for unit in PURE_UNITS:
        for path in sorted((ROOT / unit).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                    names = [node.module]
                for n in names:
                    if n.split(".")[0] in IO_MODULES:
                        bad.append(f"{path.relative_to(ROOT.parent)} imports {n}")
    assert not bad, "I/O in the sans-IO core:\n" + "\n".join(bad)
