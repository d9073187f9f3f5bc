"""The architecture's import rules: node and coordinator never import each other; protocol stays pure."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = {
    "node": {"coordinator", "gradpool", "benchmarks", "tests"},
    "coordinator": {"node", "gradpool", "benchmarks", "tests"},
    "protocol": {"node", "coordinator", "gradpool", "fastapi", "uvicorn", "httpx", "starlette", "requests"},
}


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_respect_boundaries(package: str) -> None:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"no sources found for {package}"
    bad = {str(f.relative_to(ROOT)): sorted(imported_roots(f) & FORBIDDEN[package]) for f in files}
    assert not {f: b for f, b in bad.items() if b}, f"{package} imports what it must not"


def test_the_checker_sees_a_violation(tmp_path: Path) -> None:
    sample = tmp_path / "x.py"
    sample.write_text("import fastapi\nfrom coordinator.run import Run\nfrom . import sibling\n")
    assert imported_roots(sample) == {"fastapi", "coordinator"}
