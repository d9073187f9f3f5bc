"""The HTTP API reference of the documentation (``<!-- openapi -->`` and ``<!-- errors -->`` in a page): every
operation and schema of the coordinator's OpenAPI document, built by ``create_app(settings).openapi()``
with no server started, and the error codes coordinator/errors.py documents. Used by hooks.py."""

from __future__ import annotations

import importlib
import tempfile
from pathlib import Path
from typing import Any

from settings_reference import cell, value_text


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
            default = f"`{value_text(s['default'])}`" if "default" in s else ""
            out.append(
                f"| `{p['name']}` | {p['in']} | {cell(_schema_type(s))} | {_schema_bounds(s)} | "
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
        out.append(f"| {status} | {cell(response.get('description', ''))} | {cell(', '.join(bodies))} |")
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
            out.append(f"| `{field}` | {cell(type_)} | {needed} | {cell(s.get('description', ''))} |")
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
