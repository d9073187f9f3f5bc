"""MkDocs hooks: the pages that must not drift from the code are generated when the site is built.

- ``<!-- settings: coordinator -->`` (or ``miner``, ``validator``) becomes the reference of that role's
  settings, read from its pydantic-settings class: every key with its TOML section, environment variable,
  type, bounds, default and description.
- ``<!-- openapi -->`` becomes the HTTP API reference, read from the coordinator's OpenAPI document (built
  by ``create_app(settings).openapi()``, no server started), and ``<!-- errors -->`` the error codes
  documented in ``coordinator/errors.py``.
- ``<!-- modules: PACKAGE -->`` becomes a table of the package's modules, each with the first paragraph of
  its docstring, so the architecture page follows the code as files move.
- ``<!-- include FILE -->`` and ``<!-- include FILE#Heading -->`` put a repository file, or one ``##``
  section of it, into a page (the README's figures, BENCHMARKS.md), so a figure is written down once.

Images those files show are served from where they lie in the repository (``ASSETS``). The settings
reference is made in settings_reference.py, the HTTP API's in api_reference.py, beside this file.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for path in (ROOT, HERE):  # the code the pages describe, and the generators beside this file
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from api_reference import render_errors, render_openapi  # noqa: E402
from settings_reference import cell, render_settings  # noqa: E402

ASSETS = ["benchmarks/convergence.png", "benchmarks/dashboard.png"]


# -- code layout ------------------------------------------------------------------------------------------


def _summary(path: Path) -> str:
    """The first paragraph of a module's docstring, on one line."""
    doc = ast.get_docstring(ast.parse(path.read_text(), filename=str(path))) or ""
    return " ".join(doc.split("\n\n")[0].split())


def render_modules(package: str) -> str:
    """A table of a package's modules and subpackages, each with the first paragraph of its docstring, read
    from the source files (nothing is imported)."""
    out = ["| module | what it holds |", "|---|---|"]
    base = ROOT / package
    for path in sorted(base.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        rel = path.relative_to(ROOT)
        name = f"{rel.parent}/" if path.name == "__init__.py" else str(rel)
        if path.name == "__init__.py" and path.parent == base:
            continue
        out.append(f"| `{name}` | {cell(_summary(path))} |")
    return "\n".join(out) + "\n"


# -- includes ---------------------------------------------------------------------------------------------


def include(spec: str) -> str:
    """A repository file without its first heading, or the body of one ``## Heading`` section of it."""
    name, _, heading = spec.partition("#")
    text = (ROOT / name).read_text()
    if not heading:
        return re.sub(r"\A# .*\n+", "", text)
    m = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, flags=re.M | re.S)
    if m is None:
        raise ValueError(f"{name} has no section '## {heading}'")
    return m.group(1).strip() + "\n"


DIRECTIVE = re.compile(r"<!-- (settings|openapi|errors|modules|include)(?::? ([^>]*?))? -->")


def expand(markdown: str) -> str:
    def one(m: re.Match[str]) -> str:
        kind, arg = m.group(1), (m.group(2) or "").strip()
        if kind == "settings":
            return render_settings(arg)
        if kind == "openapi":
            return render_openapi()
        if kind == "errors":
            return render_errors()
        if kind == "modules":
            return render_modules(arg)
        return include(arg)

    return DIRECTIVE.sub(one, markdown)


# -- MkDocs events ----------------------------------------------------------------------------------------


def on_files(files: Any, config: Any) -> Any:
    from mkdocs.structure.files import File

    for asset in ASSETS:
        if files.get_file_from_path(asset) is None and (ROOT / asset).is_file():
            files.append(File.generated(config, asset, abs_src_path=str(ROOT / asset)))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    return expand(markdown)
