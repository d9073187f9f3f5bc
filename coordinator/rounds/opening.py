"""Opening rounds: a round's state when it opens (its deadline, the miners it waits for), and the open
round marked as closing, with or without the next round opened beside it."""

from __future__ import annotations

import dataclasses
import logging
import statistics
from collections.abc import Callable

from coordinator.rounds.state import RoundCell, RoundState
from coordinator.settings import RoundSettings
from coordinator.storage.base import Store

log = logging.getLogger(__name__)


def deadline_for(store: Store, rounds: RoundSettings, round_: int) -> float:
    """Seconds after a round's first upload before it may close without its missing miners: twice the
    median spread of arrivals in the last five rounds, plus a second, within [min_deadline_s,
    deadline_s]. A miner that is merely slow thus still makes it; a dead one costs little time."""
    if not rounds.adaptive_deadline:
        return rounds.deadline_s
    spreads = store.arrival_spreads(round_ - 5, round_)
    if not spreads:
        return rounds.deadline_s
    return min(rounds.deadline_s, max(rounds.min_deadline_s, 2 * statistics.median(spreads) + 1.0))


class RoundOpener:
    def __init__(
        self, cell: RoundCell, store: Store, rounds: RoundSettings, clock: Callable[[], float]
    ) -> None:
        self.cell, self.store, self.rounds, self.clock = cell, store, rounds, clock

    def opened(self, round_: int, version: int, param_hash: str, behind: RoundState | None) -> RoundState:
        """A new round's state, for ``version``: it waits for the miners active lately."""
        expected = frozenset(self.store.active_miners(round_ - self.rounds.drop_after_rounds))
        return RoundState(
            round=round_,
            version=version,
            param_hash=param_hash,
            expected=expected,
            clock_from=self.clock(),
            deadline_s=deadline_for(self.store, self.rounds, round_),
            behind=behind,
        )

    def closing(self) -> RoundState:
        """The open round, now closing; it takes no more uploads."""
        return self.cell.update(status="aggregating")

    def closing_with_next(self) -> RoundState:
        """The open round, now closing, behind the next round, opened for the current version."""
        version, param_hash = self.store.head()
        with self.cell.lock:
            state = dataclasses.replace(self.cell.state, status="aggregating")
            nxt = state.round + 1
            self.store.open_round(nxt, version, self.clock())
            self.cell.swap(self.opened(nxt, version, param_hash, behind=state))
        log.info("round %d: closing; round %d open for version %d", state.round, nxt, version)
        return state
