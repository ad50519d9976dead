"""The package's layers import one way (README "Architecture").

The graph is read from the source (every ``import``, at any depth, so a
function-level import cannot hide a cycle): each module may import only
modules of a lower layer or of its own package, the graph has no cycle,
and the pure layers import no Twisted.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

import mcproxy

PACKAGE = Path(mcproxy.__file__).resolve().parent

#: Layer of each package or top-level module, lowest first. A module
#: may import what is below it and what is in its own package.
LAYERS = {
    "mcproxy._version": 0,
    "mcproxy.compiled": 0,
    "mcproxy.wire": 1,
    "mcproxy.units": 2,
    "mcproxy.counters": 2,
    "mcproxy.writes": 2,
    "mcproxy.cache": 2,
    "mcproxy.backends": 3,
    "mcproxy.routing": 4,
    "mcproxy.server": 5,
    "mcproxy.ops": 6,
    "mcproxy.logging": 7,
    "mcproxy.app": 8,
    "mcproxy.__main__": 9,
    "mcproxy": 9,
}

#: Pure code: no Twisted, no sockets; tested with bytes in and bytes out.
PURE = ("mcproxy.wire", "mcproxy.units", "mcproxy.counters", "mcproxy.cache")


def _name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str, path: Path, modules) -> set[str]:
    """The mcproxy modules ``name`` imports (``from mcproxy.x import y``
    counts as mcproxy.x.y when that is a module, else mcproxy.x)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                       for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t == "mcproxy" or t.startswith("mcproxy."))
    found.discard(name)
    return found


def _layer(name: str) -> tuple[str, int]:
    while name not in LAYERS:
        name = name.rpartition(".")[0]
    return name, LAYERS[name]


def _graph():
    modules = _modules()
    return modules, {name: _imports(name, path, modules) for name, path in modules.items()}


def test_every_module_has_a_layer():
    for name in _modules():
        _layer(name)


def test_imports_run_downward():
    _, graph = _graph()
    wrong = set()
    for name, targets in graph.items():
        unit, rank = _layer(name)
        for target in targets:
            target_unit, target_rank = _layer(target)
            if target_unit != unit and target_rank >= rank:
                wrong.add((name, target))
    assert not wrong, sorted(wrong)


def test_no_import_cycle():
    _, graph = _graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for target in sorted(graph.get(name, ())):
            if state.get(target) == 1:
                cycles.append(path[path.index(target):] + [target] if target in path
                              else path + [target])
            elif target in graph and not state.get(target):
                visit(target, path + [target])
        state[name] = 2

    for name in sorted(graph):
        if not state.get(name):
            visit(name, [name])
    assert not cycles, cycles


def test_pure_layers_import_no_twisted():
    modules = _modules()
    for name, path in modules.items():
        if not name.startswith(PURE):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom | ast.Import):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                    [alias.name for alias in node.names]
                assert not any(n.split(".")[0] in ("twisted", "socket", "lupa")
                               for n in names), (name, names)


@pytest.mark.e2e
def test_every_module_imports_alone_in_a_fresh_interpreter():
    """Each module imports on its own, first, in a new interpreter: no
    module depends on another having been imported before it."""
    import subprocess

    for name in _modules():
        if name == "mcproxy.__main__":
            continue
        done = subprocess.run([sys.executable, "-c", f"import {name}"],
                              capture_output=True, text=True)
        assert done.returncode == 0, (name, done.stderr[-2000:])
