"""What some tests need of the machine (a browser, the compose client, PostgreSQL): where it is missing,
the test fails in CI, which installs it (.ci/run), and is skipped elsewhere."""

from __future__ import annotations

import os
from typing import TypeVar

import pytest

T = TypeVar("T")


def required(found: T | None, what: str, install: str) -> T:
    """``found``, or the test fails (CI) or is skipped (elsewhere), saying how to install ``what``."""
    if found is None:
        if os.environ.get("CI"):
            pytest.fail(f"CI must have {what}: .ci/run installs it ({install})")
        pytest.skip(f"{what} is not installed ({install})")
    return found
