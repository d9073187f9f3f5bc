"""A run that stops learning says so. A round *progresses* when it publishes a version whose held-out loss
is below every earlier version's; ``STALL_ROUNDS`` closed rounds in a row without progress (versions that
do not lower the loss, or no version at all) are a stall: the closer logs it with the keys whose uploads
made up those versions, the ``gradpool_stalled_rounds`` gauge counts it, and ``/v1/status`` (hence the
dashboard) shows it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from coordinator.storage.base import Store
from coordinator.storage.records import StoredRound

STALL_ROUNDS = 3  # closed rounds in a row without progress before the run is said to stall


@dataclass(frozen=True)
class Stall:
    rounds: int = 0  # closed rounds since the last one that progressed
    since_round: int | None = None  # the first of them
    keys: list[str] = field(default_factory=list)  # miners whose uploads made up their versions

    @property
    def stalled(self) -> bool:
        return self.rounds >= STALL_ROUNDS


def rounds_without_progress(initial_loss: float | None, reports: Sequence[StoredRound]) -> list[int]:
    """The closed rounds (in order) after the last one that lowered the best held-out loss so far."""
    best = initial_loss if initial_loss is not None else float("inf")
    since: list[int] = []
    for r in reports:
        loss = r.eval_loss if r.accepted > 0 else None
        if loss is not None and loss < best:
            best, since = loss, []
        else:
            since.append(r.round)
    return since


def stall_of(store: Store, window: int = 100) -> Stall:
    """The stall as the store has it, over the last ``window`` closed rounds at most."""
    reports = store.recent_reports(window)
    initial = store.eval_loss(0) if reports and reports[0].round == 0 else None
    since = rounds_without_progress(initial, reports)
    if not since:
        return Stall()
    outcomes = store.submissions_between(since[0] - 1, since[-1])
    keys = sorted({o.miner for o in outcomes if o.status == "accepted"})
    return Stall(len(since), since[0], keys)
