"""The leaderboard's side of the store: verdicts written (validators', and the coordinator's own when its
evaluation ends after the round closed) and read, outcomes and refusals over a window of rounds, the rounds
that published a version, and when each miner first took part."""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

from sqlalchemy import RowMapping

from coordinator.storage.records import IntakeRefusal, ScoreInputs, StoredVerdict, SubmissionOutcome, Tally
from coordinator.storage.rows import from_row
from coordinator.storage.sql import Tx
from protocol.evaluation import LOSS_FIELDS, Losses

COORDINATOR = "coordinator"  # the validator name of the coordinator's own verdicts
INSERT_VERDICT = (  # a validator's later verdict on an upload replaces its earlier one
    f"INSERT INTO verdicts (round, miner, validator, {', '.join(LOSS_FIELDS)}, created_at) "
    f"VALUES ({', '.join('?' * (len(LOSS_FIELDS) + 4))}) ON CONFLICT (round, miner, validator) DO UPDATE SET "
    + ", ".join(f"{f} = excluded.{f}" for f in (*LOSS_FIELDS, "created_at"))
)

# Uploads refused at intake, one per round and miner, in rounds (?, ?] where the miner has no upload taken
# (a refusal followed by an accepted retry leaves the upload's verdict to stand).
INTAKE_REFUSALS = (
    "SELECT round, miner, MIN(code) AS code FROM refusals f WHERE round > ? AND round <= ? AND NOT EXISTS "
    "(SELECT 1 FROM submissions s WHERE s.round = f.round AND s.miner = f.miner) GROUP BY round, miner"
)


class ScoreReads:
    """Mixed into ``SqlStore``, which gives ``_all`` and ``transaction``."""

    def _all(self, sql: str, *args: Any) -> list[RowMapping]:
        raise NotImplementedError

    def transaction(self) -> AbstractContextManager[Tx]:
        raise NotImplementedError

    def reading(self) -> AbstractContextManager[None]:
        raise NotImplementedError

    def add_verdicts(self, round_: int, validator: str, verdicts: dict[str, Losses], now: float) -> None:
        with self.transaction() as db:
            db.executemany(INSERT_VERDICT, verdict_rows(round_, validator, verdicts, now))

    def record_scores(
        self, round_: int, verdicts: dict[str, Losses], flags: dict[str, str], now: float
    ) -> None:
        """The coordinator's verdicts on a round whose evaluation ended after it closed, and the flags on
        its accepted uploads, in one transaction with the round marked scored."""
        with self.transaction() as db:
            db.executemany(INSERT_VERDICT, verdict_rows(round_, COORDINATOR, verdicts, now))
            db.executemany(
                "UPDATE submissions SET flag = ? WHERE round = ? AND miner = ?",
                [(code, round_, m) for m, code in flags.items()],
            )
            db.execute("UPDATE rounds SET scored = 1 WHERE round = ?", (round_,))

    def unscored_rounds(self) -> list[tuple[int, int]]:
        """Closed rounds whose evaluation was to go on after their version and did not end, as (round, the
        version their uploads were applied to)."""
        rows = self._all(
            "SELECT round, applied_to FROM rounds WHERE status = 'closed' AND scored = 0 ORDER BY round"
        )
        return [(int(r["round"]), int(r["applied_to"])) for r in rows]

    def score_inputs(self, since: int, through: int) -> ScoreInputs:
        """What the leaderboard as of round ``through`` is made of, the window being rounds (since, through],
        from one consistent read."""
        with self.reading():
            return ScoreInputs(
                verdicts=self.verdicts_between(since, through),
                outcomes=self.submissions_between(since, through),
                intake_refusals=self.intake_refusals(since, through),
                tallies=self._tallies(through),
                flags=self._flag_tallies(through),
                intake_tallies=self._intake_refusal_tallies(through),
                first_rounds=self._first_rounds(through),
                published=self._published_rounds(since, through),
            )

    def verdicts_between(self, since: int, through: int) -> list[StoredVerdict]:
        rows = self._all("SELECT * FROM verdicts WHERE round > ? AND round <= ?", since, through)
        return [
            StoredVerdict(r["round"], r["miner"], r["validator"], Losses(*(r[f] for f in LOSS_FIELDS)))
            for r in rows
        ]

    def submissions_between(self, since: int, through: int) -> list[SubmissionOutcome]:
        rows = self._all(
            "SELECT round, miner, status, reason, flag FROM submissions WHERE round > ? AND round <= ?",
            since,
            through,
        )
        return [from_row(SubmissionOutcome, r) for r in rows]

    def _tallies(self, through: int) -> list[Tally]:
        """Per miner and outcome ('accepted' or the refusal reason): uploads and the last round."""
        rows = self._all(
            "SELECT miner, CASE WHEN status = 'accepted' THEN 'accepted' "
            "ELSE COALESCE(reason, 'refused') END AS kind, COUNT(*) AS count, MAX(round) AS last "
            "FROM submissions WHERE round <= ? AND status != 'received' GROUP BY miner, kind",
            through,
        )
        return [from_row(Tally, r) for r in rows]

    def _flag_tallies(self, through: int) -> list[Tally]:
        """Per miner and flag: accepted uploads that their later evaluation would have refused."""
        rows = self._all(
            "SELECT miner, flag AS kind, COUNT(*) AS count, MAX(round) AS last FROM submissions "
            "WHERE round <= ? AND flag IS NOT NULL GROUP BY miner, flag",
            through,
        )
        return [from_row(Tally, r) for r in rows]

    def intake_refusals(self, since: int, through: int) -> list[IntakeRefusal]:
        return [from_row(IntakeRefusal, r) for r in self._all(INTAKE_REFUSALS, since, through)]

    def _intake_refusal_tallies(self, through: int) -> list[Tally]:
        rows = self._all(
            "SELECT miner, code AS kind, COUNT(*) AS count, MAX(round) AS last "
            f"FROM ({INTAKE_REFUSALS}) AS i GROUP BY miner, code",
            -1,
            through,
        )
        return [from_row(Tally, r) for r in rows]

    def _published_rounds(self, since: int, through: int) -> list[int]:
        """The closed rounds in (since, through] that published a version."""
        rows = self._all(
            "SELECT round FROM rounds WHERE status = 'closed' AND accepted > 0 AND round > ? "
            "AND round <= ? ORDER BY round",
            since,
            through,
        )
        return [int(r["round"]) for r in rows]

    def _first_rounds(self, through: int) -> dict[str, int]:
        """Each miner's first round with an upload or a refused one, up to ``through``."""
        rows = self._all(
            "SELECT miner, MIN(round) AS first FROM (SELECT miner, round FROM submissions UNION ALL "
            "SELECT miner, round FROM refusals) AS taken WHERE round <= ? GROUP BY miner",
            through,
        )
        return {str(r["miner"]): int(r["first"]) for r in rows}


def verdict_rows(
    round_: int, validator: str, losses: dict[str, Losses], now: float
) -> list[tuple[object, ...]]:
    return [(round_, miner, validator, *x.bounded().astuple(), now) for miner, x in losses.items()]
