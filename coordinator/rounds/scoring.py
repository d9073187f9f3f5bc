"""The leaderboard: every miner's score, made from the coordinator's own evaluation and the verdicts that
validators post (the rules are in protocol/evaluation.py), and the miners' records."""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from collections.abc import Sequence

from coordinator.rounds.sharing import median
from coordinator.settings import ValidationSettings
from coordinator.storage.base import Store
from coordinator.storage.records import NEUTRAL, UNMEASURED, ScoreInputs
from coordinator.storage.scores import COORDINATOR
from protocol.evaluation import LOSS_FIELDS, Losses, RoundResult, missed, refused, round_results, standing
from protocol.wire import LeaderboardEntry, Verdict

log = logging.getLogger(__name__)


class Scores:
    """The leaderboard, cached until scores change (a round closes or verdicts arrive): ``changed`` bumps a
    counter under its own lock, from whichever thread."""

    def __init__(self, store: Store, settings: ValidationSettings) -> None:
        self.store, self.settings = store, settings
        self._lock = threading.Lock()
        self._generation = 0
        self._board: tuple[tuple[int, int], list[LeaderboardEntry]] | None = None

    def changed(self) -> None:
        with self._lock:
            self._generation += 1

    def board(self, through: int | None) -> list[LeaderboardEntry]:
        """As of the close of round ``through`` (None: no round closed yet)."""
        if through is None:
            return []
        with self._lock:
            key, cached = (through, self._generation), self._board
        if cached is not None and cached[0] == key:
            return cached[1]
        board = leaderboard(self.store, self.settings, through)
        with self._lock:
            self._board = (key, board)
        return board

    def with_round(self, through: int, extra: dict[str, RoundResult]) -> dict[str, LeaderboardEntry]:
        """Each miner's standing as of round ``through`` plus the results of a round not yet committed (none:
        the cached board)."""
        board = leaderboard(self.store, self.settings, through, extra) if extra else self.board(through)
        return {e.miner: e for e in board}

    def record_verdicts(self, round_: int, validator: str, verdicts: Sequence[Verdict], now: float) -> int:
        """A validator's verdicts on a closed round's uploads; those on miners with no upload are ignored."""
        uploaded = self.store.uploaded_miners(round_)
        losses = {
            v.miner: Losses(*(getattr(v, f) for f in LOSS_FIELDS)) for v in verdicts if v.miner in uploaded
        }
        self.store.add_verdicts(round_, validator, losses, now)
        self.changed()
        return len(losses)


def leaderboard(
    store: Store, settings: ValidationSettings, through: int, extra: dict[str, RoundResult] | None = None
) -> list[LeaderboardEntry]:
    """Every miner that uploaded, best score first, as of the close of round ``through``. ``extra`` adds
    results of a round not yet committed (for weighting by score). Refusals that were not the miner's
    doing (``checks.NEUTRAL``) neither score nor count; a published round with nothing from a miner, after
    its first, is a missed round (``protocol.evaluation.missed``)."""
    inputs = store.score_inputs(through - settings.score_window, through)
    counts, last, flagged = _records(inputs)
    results = _results(inputs, settings)
    for m, result in (extra or {}).items():
        results[m][result.round] = result
        last[m] = max(last.get(m, -1), result.round)
    first, published = inputs.first_rounds, inputs.published
    present = {(s.round, s.miner) for s in inputs.outcomes}  # (a neutral refusal is not a missed round)
    entries = []
    for m in set(last):
        gaps = [
            r
            for r in published
            if r >= first.get(m, through + 1) and r not in results[m] and (r, m) not in present
        ]
        for r in gaps:  # a published round it took no part in, after its first
            results[m][r] = missed(r)
        score = standing(list(results[m].values()), settings.score_alpha)
        tally = counts[m]
        refusals = {k: n for k, n in tally.items() if k != "accepted"}
        entries.append(
            LeaderboardEntry(
                miner=m,
                score=score.score,
                score_mean=score.mean,
                score_stderr=score.stderr,
                rounds_missed=len(gaps),
                gain_avg=score.gain_avg,
                assigned_avg=score.assigned_avg,
                rounds_contributed=tally.get("accepted", 0),
                rounds_refused=sum(refusals.values()),
                refusals=refusals,
                last_round=last[m],
                verdicts=sum(r.gain is not None for r in results[m].values() if not r.missed),
                flagged=flagged.get(m, {}),
            )
        )
    return sorted(entries, key=lambda e: (-e.score, e.miner))


def _evaluated(inputs: ScoreInputs, settings: ValidationSettings) -> dict[int, dict[str, RoundResult]]:
    """Each evaluated round's results, by miner: from the coordinator's own verdicts where it evaluates
    (``builtin`` or ``assign``) and has some, else from the median of the validators' verdicts."""
    own: dict[int, dict[str, Losses]] = defaultdict(dict)  # the coordinator's verdicts, by round
    theirs: dict[int, dict[str, list[Losses]]] = defaultdict(lambda: defaultdict(list))  # validators'
    for v in inputs.verdicts:
        if v.validator == COORDINATOR:
            own[v.round][v.miner] = v.losses
        else:
            theirs[v.round][v.miner].append(v.losses)
    accepted: dict[int, set[str]] = defaultdict(set)
    for s in inputs.outcomes:
        if s.status == "accepted":
            accepted[s.round].add(s.miner)
    evaluated: dict[int, dict[str, RoundResult]] = {}
    for r in set(own) | set(theirs):
        losses = (
            own[r]
            if (settings.builtin or settings.assign) and own.get(r)
            else {m: median(xs) for m, xs in theirs[r].items()}
        )
        evaluated[r] = round_results(r, losses, accepted[r])
    return evaluated


def _results(inputs: ScoreInputs, settings: ValidationSettings) -> dict[str, dict[int, RoundResult]]:
    """Each miner's results in the score window, by round: evaluated, or refused (before evaluation, for a
    reason of the miner's doing, or at intake). A refusal whose verdict did not measure what the miner
    sent (``records.UNMEASURED``: a norm outlier, measured clipped) scores as a refusal."""
    evaluated = _evaluated(inputs, settings)
    results: dict[str, dict[int, RoundResult]] = defaultdict(dict)
    for s in inputs.outcomes:
        rejected = s.status == "rejected"
        res = None if rejected and s.reason in UNMEASURED else evaluated.get(s.round, {}).get(s.miner)
        if res is not None:
            results[s.miner][s.round] = res
        elif rejected and s.reason not in NEUTRAL:
            results[s.miner][s.round] = refused(s.round)
    for f in inputs.intake_refusals:
        results[f.miner][f.round] = refused(f.round)
    return results


def _records(
    inputs: ScoreInputs,
) -> tuple[dict[str, dict[str, int]], dict[str, int], dict[str, dict[str, int]]]:
    """Each miner's record over the whole run: its uploads by outcome (``accepted`` or a refusal of its
    doing, intake's included), its last round, and its flags by kind."""
    counts: dict[str, dict[str, int]] = defaultdict(dict)
    last: dict[str, int] = {}
    for c in inputs.tallies:
        last[c.miner] = max(last.get(c.miner, -1), c.last)
        if c.kind not in NEUTRAL:
            counts[c.miner][c.kind] = c.count
    for c in inputs.intake_tallies:
        counts[c.miner][c.kind] = counts[c.miner].get(c.kind, 0) + c.count
        last[c.miner] = max(last.get(c.miner, -1), c.last)
    flagged: dict[str, dict[str, int]] = defaultdict(dict)
    for c in inputs.flags:
        flagged[c.miner][c.kind] = c.count
    return counts, last, flagged
