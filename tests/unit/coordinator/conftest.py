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
        raise_server_exceptions: bool = True, **overrides: Any
    ) -> contextlib.AbstractContextManager[Pool]:
        return running(make_settings(**overrides), raise_server_exceptions)

    return open_
