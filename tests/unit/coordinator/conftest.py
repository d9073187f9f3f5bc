"""Fixtures for the coordinator API tests; the helpers live in tests/helpers/pool.py."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import pytest

from coordinator.settings import CoordinatorSettings
from tests.helpers.pool import OpenPool, Pool, running


@pytest.fixture
def open_pool(make_settings: Callable[..., CoordinatorSettings]) -> OpenPool:
    """``with open_pool(**overrides) as pool:`` runs a coordinator on this test's state directory."""

    def open_(
        raise_server_exceptions: bool = True, app: dict[str, Any] | None = None, **overrides: Any
    ) -> contextlib.AbstractContextManager[Pool]:
        # Two differences from production, both for what these tests check, not for speed:
        # - the harness's updates are random: judged by their effect on the loss they would all be refused.
        #   These tests are about the cheap checks and the arithmetic; test_scoring.py, test_hardening.py and
        #   test_judged_after.py evaluate real updates (``validation=EVAL``).
        # - they check the aggregate's arithmetic to the bit: the update is published exactly, not compressed
        #   with the coordinator's error feedback (test_downlink.py covers that, the default).
        # ``app``: what create_app takes besides the settings (checks, hooks, a clock).
        overrides.setdefault("validation", {"builtin": False})
        overrides.setdefault("publish", {"format": "exact"})
        return running(make_settings(**overrides), raise_server_exceptions, **(app or {}))

    return open_
