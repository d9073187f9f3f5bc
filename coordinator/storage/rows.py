"""Database rows made into the store's records (coordinator/storage/records.py): no row leaves the store."""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

from sqlalchemy import RowMapping

R = TypeVar("R")


def from_row(cls: type[R], row: RowMapping, **extra: Any) -> R:
    """The record ``cls`` from a row: the fields the row has, by name (bools from the stored integers), and
    ``extra`` for those it has not or whose value it overrides."""
    fields = dataclasses.fields(cls)  # type: ignore[arg-type]
    keys = set(row.keys())
    values = {f.name: row[f.name] for f in fields if f.name in keys} | extra
    for f in fields:
        if f.type in ("bool", bool) and f.name in values:
            values[f.name] = bool(values[f.name])
    return cls(**values)
