"""The documentation: the site builds with ``mkdocs build --strict`` (a broken link fails it), the README
stays short and keeps its two commands, and the generated pages hold every setting and every HTTP route
the code has."""

from __future__ import annotations

import html
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from coordinator.api.app import create_app
from coordinator.settings import CoordinatorSettings
from node.settings import MinerSettings, ValidatorSettings

ROOT = Path(__file__).resolve().parents[2]


def load_docs_module(name: str) -> ModuleType:
    """One of the documentation's generators (docs/NAME.py), as the site's build loads it."""
    spec = importlib.util.spec_from_file_location(f"gradpool_docs_{name}", ROOT / "docs" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def mkdocs_build(config: Path, site: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    command = [
        sys.executable,
        "-m",
        "mkdocs",
        "build",
        "--strict",
        "-f",
        str(config),
        "--site-dir",
        str(site),
    ]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    site = tmp_path_factory.mktemp("site")
    built = mkdocs_build(ROOT / "mkdocs.yml", site)
    assert built.returncode == 0, built.stdout + built.stderr
    return site


def page_text(site: Path, page: str) -> str:
    """A built page's article as text: tags dropped, entities decoded."""
    raw = (site / page / "index.html").read_text()
    article = raw[raw.index("<article") : raw.index("</article>")]
    return html.unescape(re.sub(r"<[^>]+>", "", article))


def setting_keys(model: type[BaseModel], section: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every (section..., key) of a settings class, nested tables included; a key that takes a name or a
    table (``model``) is a key itself and a table."""
    keys: list[tuple[str, ...]] = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        options = getattr(annotation, "__args__", (annotation,))
        tables = [a for a in options if isinstance(a, type) and issubclass(a, BaseModel)]
        if annotation not in tables:
            keys.append((*section, name))
        for table in tables:
            keys += setting_keys(table, (*section, name))
    return keys


def test_the_site_builds_strict(site: Path) -> None:
    for page in ["getting-started", "operating", "mining", "validating", "security", "configuration", "api"]:
        assert (site / page / "index.html").is_file(), page
    assert (site / "benchmarks" / "convergence.png").is_file()  # an image BENCHMARKS.md shows


def test_a_broken_link_fails_the_build(tmp_path: Path) -> None:
    """The site's own settings (strict, link validation) turn a link to a missing page into a failed build."""
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "index.md").write_text("# Home\n\nSee [the missing page](missing.md).\n")
    config = tmp_path / "mkdocs.yml"
    config.write_text(f"INHERIT: {ROOT / 'mkdocs.yml'}\ndocs_dir: {docs}\nhooks: []\nnav:\n  - index.md\n")
    built = mkdocs_build(config, tmp_path / "site")
    assert built.returncode != 0
    assert "missing.md" in built.stdout + built.stderr


def test_the_readme_is_short_and_keeps_the_two_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 160
    quickstart = readme.split("## Quickstart", 1)[1].split("## ", 1)[0]
    block = re.search(r"```sh\n(.*?)```", quickstart, flags=re.S)
    assert block is not None
    commands = [line.split("#")[0].strip() for line in block.group(1).splitlines()]
    assert commands == ["make demo", "make test"]
    assert "make test-quick" in readme


@pytest.mark.parametrize(
    ("role", "cls"),
    [("coordinator", CoordinatorSettings), ("miner", MinerSettings), ("validator", ValidatorSettings)],
)
def test_every_setting_is_in_the_configuration_page(site: Path, role: str, cls: type[BaseSettings]) -> None:
    text = page_text(site, "configuration")
    roles = re.split(r"\n(Coordinator|Miner|Validator)¶", text)
    part = roles[roles.index(role.capitalize()) + 1]
    delimiter = cls.model_config.get("env_nested_delimiter") or "_"
    keys = setting_keys(cls)
    assert len(keys) > 10
    for key in keys:
        tables = re.split(r"\n\[([\w.]+)\]¶", part)
        section = tables[0] if len(key) == 1 else tables[tables.index(".".join(key[:-1])) + 1]
        assert re.search(rf"^{key[-1]}$", section, flags=re.M), f"{role}: {'.'.join(key)}"
        if len(key) == 1 or cls.model_config.get("env_nested_delimiter"):
            assert "GRADPOOL_" + delimiter.join(key).upper() in section, f"{role}: {'.'.join(key)}"


def test_the_settings_reference_shows_type_bounds_default_and_description(tmp_path: Path) -> None:
    class Inner(BaseModel):
        """A table."""

        depth: int = Field(default=3, ge=1, le=9, description="how deep")
        mode: str = "fast"

    class Toy(BaseSettings):
        model_config = SettingsConfigDict(env_prefix="GRADPOOL_", env_nested_delimiter="__")
        name: str | None = None
        inner: Inner = Field(default_factory=Inner)

    toml = tmp_path / "toy.toml"
    toml.write_text("# the toy's name\n# name = 'x'\n\n[inner]\ndepth = 3\nmode = 'fast'  # or slow\n")
    rendered = load_docs_module("settings_reference").render_settings_class(Toy, toml)
    rows = {line.split("|")[1].strip(): line for line in rendered.splitlines() if line.startswith("| `")}
    assert rows["`name`"] == "| `name` | str or unset | `unset` | `GRADPOOL_NAME` | the toy's name |"
    assert rows["`depth`"] == "| `depth` | int (>= 1, <= 9) | `3` | `GRADPOOL_INNER__DEPTH` | how deep |"
    assert rows["`mode`"].endswith("| `GRADPOOL_INNER__MODE` | or slow |")
    assert "### `[inner]`\n\nA table." in rendered


def test_every_route_is_in_the_api_page(site: Path, tmp_path: Path) -> None:
    text = page_text(site, "api")
    spec: dict[str, Any] = create_app(CoordinatorSettings(state_dir=tmp_path)).openapi()
    operations = [(method.upper(), path) for path, item in spec["paths"].items() for method in item]
    assert len(operations) > 15
    for method, path in operations:
        assert f"\n{method} {path}¶" in text, f"{method} {path}"
    for name in spec["components"]["schemas"]:
        assert f"\n{name}¶" in text, name
    assert '{"error": {"code": "stale_version", "message": "..."}}' in text


def test_the_included_figures_are_those_of_their_files(site: Path) -> None:
    """The overview page carries the README's picture of a round and its figures; the benchmarks page every
    section of BENCHMARKS.md."""
    readme = (ROOT / "README.md").read_text()
    overview = page_text(site, ".")
    for line in [
        "evaluate each alone on the miner's own data and on other data",
        "on a 124M-parameter model (10.01 bits per",
    ]:
        assert line in readme and line in overview
    benchmarks = page_text(site, "benchmarks")
    for heading in re.findall(r"^## (.+)$", (ROOT / "BENCHMARKS.md").read_text(), flags=re.M):
        assert f"\n{heading.replace('`', '')}¶" in benchmarks, heading
