"""Explicit hooks for failure and timing injection: given to the coordinator's parts by the code that
builds them (a test), never read from the environment."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class Hooks:
    """Failure and timing injection for tests: called as closing reads each upload (round, miner), just
    before a round's commit (round), and in intake between checking an upload and committing it (round,
    miner), outside the round lock."""

    on_upload: Callable[[int, str], None] | None = None
    before_commit: Callable[[int], None] | None = None
    before_intake_commit: Callable[[int, str], None] | None = None
