"""Fixtures for the coordinator API tests; the helpers live in pool_harness."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import pytest
from pool_harness import OpenPool, Pool, running

from coordinator.settings import CoordinatorSettings


@pytest.fixture
def open_pool(make_settings: Callable[..., CoordinatorSettings]) -> OpenPool:
    """``with open_pool(**overrides) as pool:`` runs a coordinator on this test's state directory."""

    def open_(
        raise_server_exceptions: bool = True, app: dict[str, Any] | None = None, **overrides: Any
    ) -> contextlib.AbstractContextManager[Pool]:
        # The harness's updates are random: judged by their effect on the loss they would all be refused.
        # These tests are about the cheap checks and the arithmetic; test_scoring.py evaluates real ones.
        # ``app``: what create_app takes besides the settings (checks, hooks, a clock).
        overrides.setdefault("validation", {"builtin": False})
        return running(make_settings(**overrides), raise_server_exceptions, **(app or {}))

    return open_
