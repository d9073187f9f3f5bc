"""What every section of the coordinator's settings shares: unknown keys refused, old names kept working."""

from __future__ import annotations

import warnings
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


def renamed(data: Any, old: str, new: str, where: str) -> Any:
    """A key under its old name still works, with a warning: settings files outlive renames."""
    if isinstance(data, dict) and old in data:
        warnings.warn(f"{where}{old} is deprecated; it is now {where}{new}", DeprecationWarning, stacklevel=2)
        data = dict(data)
        value = data.pop(old)
        data.setdefault(new, value)
    return data
