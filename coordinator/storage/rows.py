"""SQLite rows made into the store's records (coordinator/storage/records.py): no row leaves the store."""

from __future__ import annotations

import dataclasses
import sqlite3
from typing import Any, TypeVar

R = TypeVar("R")


def from_row(cls: type[R], row: sqlite3.Row, **extra: Any) -> R:
    """The record ``cls`` from a row: the fields the row has, by name (bools from SQLite's integers), and
    ``extra`` for those it has not."""
    fields = dataclasses.fields(cls)  # type: ignore[arg-type]
    keys = set(row.keys())
    values = {f.name: row[f.name] for f in fields if f.name in keys}
    for f in fields:
        if f.type in ("bool", bool) and f.name in values:
            values[f.name] = bool(values[f.name])
    return cls(**values, **extra)
