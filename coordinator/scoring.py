"""Scores: the coordinator's own evaluation of a round's uploads, the verdicts validators post, and the
leaderboard made from both (the rules are in protocol/evaluation.py)."""

from __future__ import annotations

import logging
import statistics
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import astuple

import torch

from coordinator.judge import Upload
from coordinator.settings import ValidationSettings
from coordinator.store import Store
from protocol.codec import Codec, ParamSpec
from protocol.data import Dataset
from protocol.evaluation import (
    LOSS_FIELDS,
    Losses,
    RoundResult,
    evaluate_updates,
    moving_score,
    refused,
    round_results,
)
from protocol.model import GPT
from protocol.wire import LeaderboardEntry, RunInfo, Verdict

log = logging.getLogger(__name__)
COORDINATOR = "coordinator"  # the validator name of the coordinator's own verdicts


def evaluate_uploads(
    model: GPT,
    params: dict[str, torch.Tensor],
    dataset: Dataset,
    info: RunInfo,
    round_: int,
    salt: str,
    accepted: Sequence[tuple[Upload, float]],
    load: Callable[[str], bytes],
    codec: Codec,
    spec: ParamSpec,
) -> dict[str, Losses]:
    """Each accepted upload's losses before and after it is applied alone, scaled as aggregation would;
    the payloads are decoded one at a time."""
    updates = ((u.miner, codec.decode(load(u.sha256), spec)[1], scale) for u, scale in accepted)
    return evaluate_updates(model, params, dataset.sequences, info, round_, salt, updates)


def verdict_rows(
    round_: int, validator: str, losses: dict[str, Losses], now: float
) -> list[tuple[object, ...]]:
    return [(round_, miner, validator, *astuple(x), now) for miner, x in losses.items()]


# Uploads refused at intake, one per round and miner, in rounds (?, ?] where the miner has no upload taken
# (a refusal followed by an accepted retry leaves the upload's verdict to stand).
INTAKE_REFUSALS = (
    "SELECT round, miner, MIN(code) AS code FROM refusals f WHERE round > ? AND round <= ? AND NOT EXISTS "
    "(SELECT 1 FROM submissions s WHERE s.round = f.round AND s.miner = f.miner) GROUP BY round, miner"
)
INSERT_VERDICT = (
    f"INSERT OR REPLACE INTO verdicts (round, miner, validator, {', '.join(LOSS_FIELDS)}, created_at) "
    f"VALUES ({', '.join('?' * (len(LOSS_FIELDS) + 4))})"
)


def record_verdicts(
    store: Store, round_: int, validator: str, verdicts: Sequence[Verdict], now: float
) -> int:
    """A validator's verdicts on a closed round's uploads; those on miners with no upload are ignored."""
    uploaded = {r["miner"] for r in store.all("SELECT miner FROM submissions WHERE round = ?", round_)}
    losses = {v.miner: Losses(*(getattr(v, f) for f in LOSS_FIELDS)) for v in verdicts if v.miner in uploaded}
    with store.transaction() as db:
        db.executemany(INSERT_VERDICT, verdict_rows(round_, validator, losses, now))
    return len(losses)


def leaderboard(
    store: Store,
    settings: ValidationSettings,
    through: int | None = None,
    extra: dict[str, RoundResult] | None = None,
) -> list[LeaderboardEntry]:
    """Every miner that uploaded, best score first, as of the close of round ``through`` (None: the last
    closed round). ``extra`` adds results of a round not yet committed (for weighting by score)."""
    if through is None:
        row = store.one("SELECT MAX(round) AS r FROM rounds WHERE status = 'closed'")
        through = -1 if row is None or row["r"] is None else int(row["r"])
    since = through - settings.score_window
    own: dict[int, dict[str, Losses]] = defaultdict(dict)  # the coordinator's verdicts, by round
    theirs: dict[int, dict[str, list[Losses]]] = defaultdict(lambda: defaultdict(list))  # validators'
    for v in store.all("SELECT * FROM verdicts WHERE round > ? AND round <= ?", since, through):
        x = Losses(*(v[f] for f in LOSS_FIELDS))
        if v["validator"] == COORDINATOR:
            own[v["round"]][v["miner"]] = x
        else:
            theirs[v["round"]][v["miner"]].append(x)
    window = store.all(
        "SELECT round, miner, status FROM submissions WHERE round > ? AND round <= ?", since, through
    )
    accepted: dict[int, set[str]] = defaultdict(set)
    for s in window:
        if s["status"] == "accepted":
            accepted[s["round"]].add(s["miner"])
    evaluated: dict[int, dict[str, RoundResult]] = {}
    for r in set(own) | set(theirs):
        losses = (
            own[r] if settings.builtin and own.get(r) else {m: _median(xs) for m, xs in theirs[r].items()}
        )
        evaluated[r] = round_results(r, losses, accepted[r])
    results: dict[str, dict[int, RoundResult]] = defaultdict(dict)
    counts: dict[str, dict[str, int]] = defaultdict(dict)
    last: dict[str, int] = {}
    for c in store.all(
        "SELECT miner, CASE WHEN status = 'accepted' THEN 'accepted' ELSE COALESCE(reason, 'refused') END "
        "AS k, COUNT(*) AS n, MAX(round) AS last FROM submissions WHERE round <= ? GROUP BY miner, k",
        through,
    ):  # fmt: skip
        counts[c["miner"]][c["k"]] = c["n"]
        last[c["miner"]] = max(last.get(c["miner"], -1), c["last"])
    for c in store.all(
        f"SELECT miner, code, COUNT(*) AS n, MAX(round) AS last FROM ({INTAKE_REFUSALS}) "
        "GROUP BY miner, code", -1, through,
    ):  # fmt: skip
        counts[c["miner"]][c["code"]] = counts[c["miner"]].get(c["code"], 0) + c["n"]
        last[c["miner"]] = max(last.get(c["miner"], -1), c["last"])
    for s in window:
        m, r = s["miner"], s["round"]
        res = evaluated.get(r, {}).get(m)
        if res is not None:
            results[m][r] = res
        elif s["status"] == "rejected":  # refused before it could be evaluated: the least score
            results[m][r] = refused(r)
    for f in store.all(INTAKE_REFUSALS, since, through):
        results[f["miner"]][f["round"]] = refused(f["round"])
    for m, result in (extra or {}).items():
        results[m][result.round] = result
        last[m] = max(last.get(m, -1), result.round)
    entries = []
    for m in set(last):
        score = moving_score(list(results[m].values()), settings.score_alpha)
        tally = counts[m]
        refusals = {k: n for k, n in tally.items() if k != "accepted"}
        entries.append(
            LeaderboardEntry(
                miner=m, score=score.score, gain_avg=score.gain_avg, assigned_avg=score.assigned_avg,
                rounds_contributed=tally.get("accepted", 0), rounds_refused=sum(refusals.values()),
                refusals=refusals, last_round=last[m],
                verdicts=sum(r.gain is not None for r in results[m].values()),
            )
        )  # fmt: skip
    return sorted(entries, key=lambda e: (-e.score, e.miner))


def _median(rows: Sequence[Losses]) -> Losses:
    """The median over validators of each loss."""
    return Losses(*(statistics.median(getattr(x, f) for x in rows) for f in LOSS_FIELDS))
