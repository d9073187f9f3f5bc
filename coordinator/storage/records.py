"""What the store returns: typed records, never database rows."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Upload:
    """One upload as intake recorded it."""

    miner: str
    sha256: str
    content_sha256: str
    norm: float
    sketch: torch.Tensor
    stored_sha256: str | None = None  # the form the codec's accumulator reads back

    @classmethod
    def of(cls, row: sqlite3.Row) -> Upload:
        """The upload a ``submissions`` row records."""
        sketch = torch.frombuffer(bytearray(row["sketch"]), dtype=torch.float32)
        stored = row["unpacked_sha256"]
        return cls(row["miner"], row["sha256"], row["content_sha256"], row["norm"], sketch, stored)
