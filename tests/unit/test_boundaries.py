"""The architecture's import rules: node and coordinator never import each other; protocol stays pure; inside
the coordinator no subpackage imports one above it; no package has an import cycle."""

from __future__ import annotations

import ast
import importlib
from collections.abc import Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("protocol", "coordinator", "node", "gradpool")
FORBIDDEN = {
    "node": {"coordinator", "gradpool", "benchmarks", "tests"},
    "coordinator": {"node", "gradpool", "benchmarks", "tests"},
    "protocol": {"node", "coordinator", "gradpool", "fastapi", "uvicorn", "httpx", "starlette", "requests"},
}
# The coordinator's layers, lowest first: a module may import its own layer and those below, never above.
COORDINATOR_LAYERS: tuple[tuple[str, ...], ...] = (
    ("coordinator.settings", "coordinator.errors", "coordinator.hooks"),
    ("coordinator.storage", "coordinator.data"),
    ("coordinator.metrics", "coordinator.publishing"),
    ("coordinator.rounds",),
    ("coordinator.describe", "coordinator.run"),
    ("coordinator.api",),
)


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Every absolute module a file imports, typing-only imports included (``from a import b`` counts as
    ``a.b`` when that is a module of the repository, else as ``a``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                is_module = (ROOT / sub.replace(".", "/")).with_suffix(".py").exists() or (
                    ROOT / sub.replace(".", "/") / "__init__.py"
                ).exists()
                found.add(sub if is_module else node.module)
    return found


def imported_roots(path: Path) -> set[str]:
    return {m.split(".")[0] for m in imported_modules(path)}


def layer_of(module: str, layers: tuple[tuple[str, ...], ...]) -> int | None:
    for i, layer in enumerate(layers):
        if any(module == prefix or module.startswith(prefix + ".") for prefix in layer):
            return i
    return None


def layer_violations(graph: Mapping[str, set[str]], layers: tuple[tuple[str, ...], ...]) -> list[str]:
    bad = []
    for module, imports in sorted(graph.items()):
        own = layer_of(module, layers)
        if own is None:
            continue
        for target in sorted(imports):
            other = layer_of(target, layers)
            if other is not None and other > own:
                bad.append(f"{module} imports {target}, a layer above it")
    return bad


def find_cycle(graph: Mapping[str, set[str]]) -> list[str] | None:
    """One import cycle among the graph's modules, or None (a depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for target in sorted(graph.get(module, ())):
            if target not in graph:
                continue
            if state.get(target) == 1:
                return [*path[path.index(target) :], target]
            if target not in state and (cycle := visit(target)) is not None:
                return cycle
        path.pop()
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)) is not None:
            return cycle
    return None


def import_graph(package: str) -> dict[str, set[str]]:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"no sources found for {package}"
    return {module_name(f): imported_modules(f) for f in files}


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_respect_boundaries(package: str) -> None:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"no sources found for {package}"
    bad = {str(f.relative_to(ROOT)): sorted(imported_roots(f) & FORBIDDEN[package]) for f in files}
    assert not {f: b for f, b in bad.items() if b}, f"{package} imports what it must not"


def test_no_coordinator_layer_imports_one_above_it() -> None:
    graph = import_graph("coordinator")
    unplaced = [m for m in graph if m != "coordinator" and layer_of(m, COORDINATOR_LAYERS) is None]
    assert not unplaced, f"modules in no layer (add them to COORDINATOR_LAYERS): {unplaced}"
    assert layer_violations(graph, COORDINATOR_LAYERS) == []


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_cycle(package: str) -> None:
    assert find_cycle(import_graph(package)) is None


MAX_LINES = 400  # a module reads in one sitting; one that grows past it is split along its jobs


@pytest.mark.parametrize("package", PACKAGES)
def test_no_module_is_over_400_lines(package: str) -> None:
    files = (ROOT / package).rglob("*.py")
    lines = {str(f.relative_to(ROOT)): len(f.read_text().splitlines()) for f in files}
    assert lines and {f: n for f, n in lines.items() if n > MAX_LINES} == {}


def test_the_checker_sees_a_violation(tmp_path: Path) -> None:
    sample = tmp_path / "x.py"
    sample.write_text("import fastapi\nfrom coordinator.run import Run\nfrom . import sibling\n")
    assert imported_roots(sample) == {"fastapi", "coordinator"}
    assert imported_modules(sample) == {"fastapi", "coordinator.run"}


def test_the_layer_rule_sees_an_import_from_above() -> None:
    graph = {
        "coordinator.storage.store": {"coordinator.rounds.checks", "protocol.wire"},
        "coordinator.rounds.checks": {"coordinator.storage.store"},
    }
    assert layer_violations(graph, COORDINATOR_LAYERS) == [
        "coordinator.storage.store imports coordinator.rounds.checks, a layer above it"
    ]


def test_the_cycle_finder_sees_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


@pytest.mark.parametrize("path", sorted((ROOT / "benchmarks").glob("*.py")), ids=lambda p: p.stem)
def test_every_benchmark_module_imports(path: Path) -> None:
    """The benchmarks sit outside the type check: a name they import that the packages no longer have
    is caught here, not by the person who runs the benchmark next."""
    importlib.import_module(module_name(path))
