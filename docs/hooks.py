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

Images those files show are served from where they lie in the repository (``ASSETS``).
"""

from __future__ import annotations

import ast
import importlib
import re
import sys
import tempfile
import types
import typing
from pathlib import Path
from typing import Any

import annotated_types
from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

ASSETS = ["benchmarks/convergence.png", "benchmarks/dashboard.png"]
ENV_PREFIX = "GRADPOOL_"


# -- settings ---------------------------------------------------------------------------------------------


def settings_classes() -> dict[str, tuple[type[BaseModel], Path]]:
    """Each role's settings class and its example TOML file."""
    from coordinator.settings import CoordinatorSettings
    from node.settings import MinerSettings, ValidatorSettings

    return {
        "coordinator": (CoordinatorSettings, ROOT / "configs" / "coordinator.toml"),
        "miner": (MinerSettings, ROOT / "configs" / "miner.toml"),
        "validator": (ValidatorSettings, ROOT / "configs" / "validator.toml"),
    }


class Row(typing.NamedTuple):
    section: tuple[str, ...]
    key: str
    env: str
    type: str
    default: str
    description: str


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def _type_name(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return " or ".join(f'"{a}"' if isinstance(a, str) else str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        named = [_type_name(a) for a in args if a is not type(None)]
        return " or ".join(named) + (" or unset" if type(None) in args else "")
    if origin is list:
        return f"list of {_type_name(args[0])}" if args else "list"
    if annotation is SecretStr:
        return "secret string"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "table"
    if isinstance(annotation, type) and issubclass(annotation, Path):
        return "path"
    return getattr(annotation, "__name__", str(annotation))


def _value(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | Path):
        return f'"{value}"'
    if isinstance(value, list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    return repr(value)


def _bounds(field: FieldInfo) -> str:
    signs = {
        annotated_types.Ge: ("ge", ">="),
        annotated_types.Gt: ("gt", ">"),
        annotated_types.Le: ("le", "<="),
        annotated_types.Lt: ("lt", "<"),
    }
    parts = []
    for meta in field.metadata:
        for kind, (attr, sign) in signs.items():
            if isinstance(meta, kind):
                parts.append(f"{sign} {getattr(meta, attr):,}".replace(",", "_"))
        if isinstance(meta, annotated_types.MinLen):
            parts.append(f"length >= {meta.min_length}")
        if isinstance(meta, annotated_types.MaxLen):
            parts.append(f"length <= {meta.max_length}")
    return ", ".join(parts)


def _default(field: FieldInfo) -> str:
    if field.default_factory is not None:
        return "(table)"
    if field.default is PydanticUndefined:
        return "required"
    return _value(field.default)


def toml_comments(path: Path) -> dict[tuple[tuple[str, ...], str], str]:
    """What an example TOML file says of each key, by (section, key): the comment at the end of its line, or
    else the comment lines just above it. A commented-out key (``# key = value``) counts as a key, in the
    commented-out table (``# [model]``) above it if there is one."""
    comments: dict[tuple[tuple[str, ...], str], str] = {}
    section: tuple[str, ...] = ()
    shadow: tuple[str, ...] | None = None  # a commented-out table's name, for the commented-out keys below it
    block: list[str] = []
    for line in path.read_text().splitlines():
        commented = line.startswith("#")
        if m := re.match(r"^(#\s*)?\[([\w.]+)\]\s*$", line):
            name = tuple(m.group(2).split("."))
            shadow, section = (name, section) if commented else (None, name)
            block = []
        elif m := re.match(r"^#?\s*(\w+)\s*=\s*([^#]*)(?:#\s*(.*))?$", line):
            where = shadow if commented and shadow is not None else section
            inline = (m.group(3) or "").strip()
            if (where, m.group(1)) not in comments and (inline or block):
                comments[(where, m.group(1))] = inline or " ".join(block)
            block = []
            if not commented:
                shadow = None
        elif commented:
            block.append(line.lstrip("#").strip())
        else:
            shadow, block = None, []
    return comments


def settings_rows(
    cls: type[BaseModel],
    delimiter: str | None,
    comments: dict[tuple[tuple[str, ...], str], str] | None = None,
) -> list[Row]:
    """Every key of a settings class, nested tables walked depth first; a key that takes a preset's name or
    a table (``model``) is listed itself and then with the table's keys."""
    comments = comments or {}
    rows: list[Row] = []

    def walk(model: type[BaseModel], section: tuple[str, ...]) -> None:
        nested: list[tuple[str, type[BaseModel]]] = []
        for name, field in model.model_fields.items():
            subs = _models_in(field.annotation)
            if field.annotation in subs:
                nested.append((name, subs[0]))
                continue
            path = (*section, name)
            env = ENV_PREFIX + (delimiter or "_").join(path).upper() if delimiter or not section else ""
            type_ = _type_name(field.annotation)
            if bounds := _bounds(field):
                type_ += f" ({bounds})"
            description = field.description or comments.get((section, name), "")
            rows.append(Row(section, name, env, type_, _default(field), description))
            nested += [(name, sub) for sub in subs]
        for name, sub in nested:
            walk(sub, (*section, name))

    walk(cls, ())
    return rows


def _cell(text: str) -> str:
    """Text for a table cell: one line, a pipe escaped unless it is in a code span (where it needs none)."""
    parts = re.split(r"(`+[^`]*?`+)", text.replace("\n", " "))
    return "".join(p if p.startswith("`") else p.replace("|", "\\|") for p in parts)


def _doc(cls: type[BaseModel]) -> str:
    doc = cls.__dict__.get("__doc__") or ""
    return " ".join(doc.split())


def render_settings(role: str) -> str:
    """The reference of one role's settings (``coordinator``, ``miner`` or ``validator``)."""
    cls, toml = settings_classes()[role]
    return render_settings_class(cls, toml)


def render_settings_class(cls: type[BaseModel], toml: Path | None = None) -> str:
    """One table per TOML section of a settings class, top-level keys first; descriptions fall back on what
    the example file ``toml`` says of a key."""
    delimiter = cls.model_config.get("env_nested_delimiter")
    assert delimiter is None or isinstance(delimiter, str)
    comments = toml_comments(toml) if toml is not None and toml.is_file() else None
    sections: dict[tuple[str, ...], list[Row]] = {}
    for row in settings_rows(cls, delimiter, comments):
        sections.setdefault(row.section, []).append(row)
    out: list[str] = []
    for section, members in sections.items():
        sub: Any = cls
        for part in section:
            sub = _models_in(sub.model_fields[part].annotation)[0]
        out += [f"### `[{'.'.join(section)}]`" if section else "### Top-level keys", ""]
        if section and (doc := _doc(sub)):
            out += [doc, ""]
        out += ["| key | type | default | environment | description |", "|---|---|---|---|---|"]
        for r in members:
            env = f"`{r.env}`" if r.env else ""
            out.append(
                f"| `{r.key}` | {_cell(r.type)} | `{_cell(r.default)}` | {env} | {_cell(r.description)} |"
            )
        out.append("")
    return "\n".join(out)


# -- HTTP API ---------------------------------------------------------------------------------------------


def create_app_function() -> Any:
    for module in ("coordinator.api.app", "coordinator.app"):
        try:
            return importlib.import_module(module).create_app
        except ModuleNotFoundError as e:
            if e.name is None or not module.startswith(e.name):
                raise
    raise ImportError("no coordinator app factory found (coordinator.api.app or coordinator.app)")


def openapi_schema() -> dict[str, Any]:
    """The coordinator's OpenAPI document, built without a server (the lifespan never runs)."""
    from coordinator.settings import CoordinatorSettings

    with tempfile.TemporaryDirectory() as state_dir:
        spec: dict[str, Any] = create_app_function()(CoordinatorSettings(state_dir=Path(state_dir))).openapi()
    return spec


def _ref_name(schema: dict[str, Any]) -> str | None:
    ref = schema.get("$ref")
    return ref.rsplit("/", 1)[-1] if ref else None


def _schema_type(schema: dict[str, Any]) -> str:
    if name := _ref_name(schema):
        return f"[{name}](#schema-{name.lower()})"
    if "anyOf" in schema:
        return " or ".join(_schema_type(s) for s in schema["anyOf"])
    if "enum" in schema:
        return " or ".join(f"`{v}`" for v in schema["enum"])
    if schema.get("type") == "array":
        return "array of " + _schema_type(schema.get("items", {}))
    if schema.get("type") == "object" and "additionalProperties" in schema:
        inner = schema["additionalProperties"]
        return "object of " + (_schema_type(inner) if isinstance(inner, dict) else "any")
    return str(schema.get("type", "any"))


def _schema_bounds(schema: dict[str, Any]) -> str:
    signs = {
        "minimum": ">=",
        "exclusiveMinimum": ">",
        "maximum": "<=",
        "exclusiveMaximum": "<",
        "minLength": "length >=",
        "maxLength": "length <=",
    }
    return ", ".join(f"{sign} {schema[k]}" for k, sign in signs.items() if k in schema)


def _signed_statuses() -> set[int]:
    from coordinator.errors import SIGNED

    return set(SIGNED)


def render_operation(path: str, method: str, op: dict[str, Any]) -> str:
    out = [f"### `{method.upper()} {path}`", ""]
    if description := " ".join(op.get("description", "").split()):
        out += [description, ""]
    if params := op.get("parameters"):
        out += ["| parameter | in | type | bounds | default | required |", "|---|---|---|---|---|---|"]
        for p in params:
            s = p.get("schema", {})
            default = f"`{_value(s['default'])}`" if "default" in s else ""
            out.append(
                f"| `{p['name']}` | {p['in']} | {_cell(_schema_type(s))} | {_schema_bounds(s)} | "
                f"{default} | {'yes' if p.get('required') else 'no'} |"
            )
        out.append("")
    codes = {int(c) for c in op.get("responses", {}) if c.isdigit()}
    if body := op.get("requestBody"):
        for media, content in body.get("content", {}).items():
            out += [f"Request body ({media}): {_schema_type(content.get('schema', {}))}.", ""]
    elif method == "post" and _signed_statuses() <= codes:
        out += [
            "Request body: signed (see [Signed requests](#signed-requests)); the route reads it itself.",
            "",
        ]
    out += ["| status | meaning | body |", "|---|---|---|"]
    for status, response in op.get("responses", {}).items():
        content = response.get("content", {})
        bodies = [f"{_schema_type(c['schema'])} ({media})" for media, c in content.items() if c.get("schema")]
        out.append(f"| {status} | {_cell(response.get('description', ''))} | {_cell(', '.join(bodies))} |")
    out.append("")
    return "\n".join(out)


def render_schema(name: str, schema: dict[str, Any]) -> str:
    out = [f"### {name} {{#schema-{name.lower()}}}", ""]
    if description := schema.get("description"):
        out += [" ".join(description.split()), ""]
    properties = schema.get("properties", {})
    if properties:
        required = set(schema.get("required", []))
        out += ["| field | type | required | description |", "|---|---|---|---|"]
        for field, s in properties.items():
            type_ = _schema_type(s)
            if bounds := _schema_bounds(s):
                type_ += f" ({bounds})"
            needed = "yes" if field in required else "no"
            out.append(f"| `{field}` | {_cell(type_)} | {needed} | {_cell(s.get('description', ''))} |")
        out.append("")
    elif "enum" in schema:
        out += ["One of " + ", ".join(f"`{v}`" for v in schema["enum"]) + ".", ""]
    return "\n".join(out)


def render_openapi(spec: dict[str, Any] | None = None) -> str:
    """Every operation of the OpenAPI document, then every schema it names."""
    spec = spec or openapi_schema()
    out = ["## Operations", ""]
    for path, item in spec["paths"].items():
        for method, op in item.items():
            out.append(render_operation(path, method, op))
    out += ["## Schemas", ""]
    for name, schema in sorted(spec.get("components", {}).get("schemas", {}).items()):
        out.append(render_schema(name, schema))
    return "\n".join(out)


def render_errors() -> str:
    """The error classes and codes, as coordinator/errors.py documents them."""
    import coordinator.errors

    doc = (coordinator.errors.__doc__ or "").strip()
    first, _, rest = doc.partition("\n\n")
    tree, _, after = rest.partition("\n\n")
    return "\n".join(
        [" ".join(first.split()), "", "```text", tree.strip("\n"), "```", "", " ".join(after.split())]
    )


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
        out.append(f"| `{name}` | {_cell(_summary(path))} |")
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
