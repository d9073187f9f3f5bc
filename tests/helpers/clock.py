"""A clock the test moves: the coordinator's timestamps and the closer's waits follow it, so a test of
deadlines and time-driven rounds waits for nothing real."""

from __future__ import annotations

import threading

from coordinator.hooks import Clock


class ManualClock(Clock):
    def __init__(self, start: float = 1_000_000.0) -> None:
        super().__init__()
        self.t = start
        self._moved = threading.Condition()

    def now(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        with self._moved:
            self.t += seconds
            self._moved.notify_all()

    def wait(self, event: threading.Event, timeout_s: float | None) -> bool:
        """Until ``event`` is set, or this clock is moved past ``timeout_s`` from now."""
        end = None if timeout_s is None else self.t + timeout_s
        while not event.is_set():
            if end is not None and self.t >= end:
                return False
            with self._moved:
                self._moved.wait(0.01)  # the event is polled: it has no way to wake this condition
        return True
