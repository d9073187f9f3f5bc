"""Waiting for something that happens in another thread or process: every wait has a deadline and fails
with what it waited for, never hangs and never asserts how long anything took."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(predicate: Callable[[], T], timeout_s: float, what: str, interval_s: float = 0.05) -> T:
    """``predicate()``'s first truthy value, polled every ``interval_s``; AssertionError naming ``what``
    once ``timeout_s`` has passed without one. The deadline only bounds a wait that went wrong: no test
    asserts on how long a wait took."""
    end = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= end:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what} (last: {value!r})")
        time.sleep(interval_s)
