"""The open round: one small frozen state, swapped whole under one lock.

Thread-safety invariant. Three kinds of threads touch a run: the event loop (HTTP handlers, reads only),
the intake threads (registrations and uploads) and the closer (closing rounds). Everything they share
besides the store is the ``RoundState`` in ``RoundCell.state``:

- a reader takes ``cell.state`` once (one attribute read: atomic) and works from that snapshot, never
  from the cell twice;
- a writer holds ``cell.lock`` while it checks the state, commits to the store and swaps in the next
  state, so that the store and the state agree for every writer, and a check (is this round open, is this
  the version it trains on) holds until its write is committed.

The lock is never held across slow work (decoding, evaluation, blob writes), only across a check, one
SQLite transaction and the swap. Nothing else is shared mutably: each part keeps its own counters behind
its own small lock.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import Callable
from dataclasses import dataclass

from protocol.wire import RoundStatus


@dataclass(frozen=True)
class RoundState:
    round: int
    version: int  # the version the round's uploads train from
    param_hash: str
    status: RoundStatus = "open"
    uploaded: frozenset[str] = frozenset()  # miners with an upload taken this round
    expected: frozenset[str] = frozenset()  # miners the round waits for
    first_upload_at: float | None = None
    clock_from: float = 0.0  # the deadline counts from max(first upload, this): a restart gives time back
    deadline_s: float = 30.0
    force_close: bool = False
    # Overlapped rounds: the previous round, still being closed while this one takes uploads. Its uploads
    # are applied to the version it publishes (one version later than the one they trained from).
    behind: RoundState | None = None
    newest: int | None = None  # the newest version, once the round behind published it; None: ``version``
    newest_hash: str | None = None

    @property
    def last_closed(self) -> int:
        """The newest closed round (-1: none yet)."""
        return (self.round if self.behind is None else self.behind.round) - 1

    @property
    def head(self) -> int:
        """The newest version: uploads may train from it or from ``version`` (at most one before)."""
        return self.version if self.newest is None else self.newest

    def deadline_at(self) -> float | None:
        """When the round may close without its missing miners; None before its first upload."""
        if self.first_upload_at is None:
            return None
        return max(self.first_upload_at, self.clock_from) + self.deadline_s

    def time_left(self, now: float) -> float | None:
        at = self.deadline_at()
        return None if at is None else max(0.0, at - now)

    def ready(self, now: float, min_quorum: int) -> bool:
        """Whether the round should close now: the round before it closed, and forced with an upload, or a
        quorum and either every expected miner in or the deadline passed."""
        if self.status != "open" or not self.uploaded or self.behind is not None:
            return False
        if self.force_close:
            return True
        if len(self.uploaded) < min_quorum:
            return False
        at = self.deadline_at()
        return self.expected <= self.uploaded or (at is not None and now >= at)


class RoundCell:
    """Holds the current ``RoundState``; tells its listeners (the closer, the event loop) of every swap."""

    def __init__(self, state: RoundState) -> None:
        self.lock = threading.Lock()
        self._state = state
        self._listeners: list[Callable[[RoundState, RoundState], None]] = []

    @property
    def state(self) -> RoundState:
        return self._state

    def listen(self, listener: Callable[[RoundState, RoundState], None]) -> None:
        self._listeners.append(listener)

    def swap(self, new: RoundState) -> None:
        """Replace the state; the caller holds ``lock``."""
        old, self._state = self._state, new
        for listener in self._listeners:
            listener(old, new)

    def update(self, **changes: object) -> RoundState:
        """Change some fields of the state under the lock; returns the new state."""
        with self.lock:
            new = dataclasses.replace(self._state, **changes)  # type: ignore[arg-type]
            self.swap(new)
            return new


class RoundWatch:
    """Wakes the event loop's long-polls when a new round opens or a round closes (the closer's thread
    calls ``notify``)."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._event: asyncio.Event | None = None

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop, self._event = loop, asyncio.Event()

    def notify(self, old: RoundState, new: RoundState) -> None:
        changed = new.round != old.round or new.last_closed != old.last_closed
        if changed and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._release)

    def _release(self) -> None:
        if self._event is not None:
            event, self._event = self._event, asyncio.Event()
            event.set()

    async def wait(self, cell: RoundCell, after: int, timeout_s: float, closed: int = -1) -> None:
        """Until a round later than ``after`` is open and round ``closed`` has closed, or ``timeout_s``
        passed."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout_s
        while (cell.state.round <= after or cell.state.last_closed < closed) and self._event is not None:
            left = end - loop.time()
            if left <= 0:
                return
            try:
                await asyncio.wait_for(self._event.wait(), timeout=left)
            except TimeoutError:
                return


class Downloads:
    """Bytes served during the open round, counted in memory (the event loop must not write SQLite per
    download) and committed with the round: ``model`` (published updates, checkpoints, uploads served to
    validators) and ``data`` (training sequences)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._bytes = {"model": 0, "data": 0}

    def add(self, n: int, kind: str = "model") -> None:
        with self._lock:
            self._bytes[kind] += n

    def take(self) -> tuple[int, int]:
        """(model, data) bytes since the last take."""
        with self._lock:
            taken, self._bytes = self._bytes, {"model": 0, "data": 0}
            return taken["model"], taken["data"]
