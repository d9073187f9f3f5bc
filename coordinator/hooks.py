"""Explicit hooks for failure and timing injection, given to the coordinator's parts by the code that builds
them (a test), never read from the environment; and the clock every part reads time from."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class Hooks:
    """Failure and timing injection for tests: called as closing reads each upload (round, miner), just
    before a round's commit (round), just after it (round), just before the scores of a round evaluated
    after its version are written (round), and in intake between checking an upload and committing it
    (round, miner), outside the round lock."""

    on_upload: Callable[[int, str], None] | None = None
    before_commit: Callable[[int], None] | None = None
    after_commit: Callable[[int], None] | None = None
    before_scores: Callable[[int], None] | None = None
    before_intake_commit: Callable[[int, str], None] | None = None


class Clock:
    """Time as the coordinator sees it: ``now()`` for every timestamp and deadline, and ``wait`` for every
    pause of the closer (until a round may close, before a retry). This one is the system's; a test's clock
    moves time itself and ends the waits it overtakes."""

    def __init__(self, now: Callable[[], float] = time.time) -> None:
        self._now = now

    def now(self) -> float:
        return self._now()

    def wait(self, event: threading.Event, timeout_s: float | None) -> bool:
        """Until ``event`` is set (True) or ``timeout_s`` passed (False)."""
        return event.wait(timeout_s)
