"""No test module imports another: what tests share lives in fixtures (conftest.py) or in tests/helpers/.
A test that imports another test module runs that module's import-time code, ties the two together, and
under pytest's import modes may get a second copy of it."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
HELPERS = TESTS / "helpers"


def modules_under(root: Path) -> dict[str, Path]:
    """Every module under ``root`` but the helpers, by the name a bare import of it would use (pytest puts
    each test folder on sys.path, so ``import test_scoring`` or ``import pool_harness`` finds them)."""
    return {p.stem: p for p in root.rglob("*.py") if HELPERS not in p.parents and p.stem != "__init__"}


def imported_test_modules(source: str, names: set[str]) -> list[str]:
    """What this source imports from other test modules: a bare import of one of ``names`` (a module under
    tests/ other than the helpers), ``tests.<anything but helpers>``, or a relative import."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level > 0:
                found.append("." * node.level + (node.module or ""))
                continue
            modules = [node.module or ""]
        else:
            continue
        for module in modules:
            parts = module.split(".")
            if parts[0] in names or (parts[0] == "tests" and parts[1:2] != ["helpers"]):
                found.append(module)
    return found


def test_no_test_module_imports_another() -> None:
    names = set(modules_under(TESTS))
    checked, offenders = 0, []
    for path in sorted(TESTS.rglob("*.py")):
        where = path.relative_to(TESTS).as_posix()
        checked += 1
        offenders += [f"{where} imports {m}" for m in imported_test_modules(path.read_text(), names)]
    assert checked > 50, f"only {checked} test modules found under {TESTS}"
    assert not offenders, "test modules import test modules (move what they share to tests/helpers/):\n" + (
        "\n".join(offenders)
    )


def test_the_check_catches_each_kind_of_import_of_a_test_module() -> None:
    names = {"conftest", "test_scoring", "pool_harness"}
    sample = """
import torch
from coordinator.settings import CoordinatorSettings
from tests.helpers.pool import OpenPool
import tests.helpers.waiting
from test_scoring import fixed_miner
import pool_harness
from tests.unit.coordinator import test_api
import tests.conftest
from . import sibling
from ..integration.test_network import mine


def later() -> None:
    from conftest import LiveServer
"""
    assert imported_test_modules(sample, names) == [
        "test_scoring",
        "pool_harness",
        "tests.unit.coordinator",
        "tests.conftest",
        ".",
        "..integration.test_network",
        "conftest",
    ]


def test_the_modules_a_bare_import_could_reach_are_the_test_modules_not_the_helpers() -> None:
    names = modules_under(TESTS)
    assert {"conftest", "test_test_layout", "test_api", "test_network"} <= set(names)
    assert "waiting" not in names and "pool" not in names  # tests/helpers/ may be imported
    assert "coordinator" not in names  # a folder, not a module: `import coordinator` is the package
