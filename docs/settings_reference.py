"""The settings reference of the documentation (``<!-- settings: ROLE -->`` in a page): every key of a
role's pydantic-settings class with its TOML section, environment variable, type, bounds, default and
description, and the comment the example TOML file gives it. Used by hooks.py."""

from __future__ import annotations

import re
import types
import typing
from pathlib import Path
from typing import Any

import annotated_types
from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

ROOT = Path(__file__).resolve().parent.parent
ENV_PREFIX = "GRADPOOL_"


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


def value_text(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | Path):
        return f'"{value}"'
    if isinstance(value, list):
        return "[" + ", ".join(value_text(v) for v in value) + "]"
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
    return value_text(field.default)


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


def cell(text: str) -> str:
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
                f"| `{r.key}` | {cell(r.type)} | `{cell(r.default)}` | {env} | {cell(r.description)} |"
            )
        out.append("")
    return "\n".join(out)
