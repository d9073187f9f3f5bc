"""The leaderboard's reads of the store: verdicts, outcomes and refusals over a window of rounds, the rounds
that published a version, and when each miner first took part."""

from __future__ import annotations

import sqlite3
from typing import Any

INTAKE_REFUSALS = (
    "SELECT round, miner, MIN(code) AS code FROM refusals f WHERE round > ? AND round <= ? AND NOT EXISTS "
    "(SELECT 1 FROM submissions s WHERE s.round = f.round AND s.miner = f.miner) GROUP BY round, miner"
)


class ScoreReads:
    """Mixed into ``Store``, which gives ``_all``."""

    def _all(self, sql: str, *args: Any) -> list[sqlite3.Row]:
        raise NotImplementedError

    def verdicts_between(self, since: int, through: int) -> list[sqlite3.Row]:
        return self._all("SELECT * FROM verdicts WHERE round > ? AND round <= ?", since, through)

    def submissions_between(self, since: int, through: int) -> list[sqlite3.Row]:
        return self._all("SELECT round, miner, status, reason FROM submissions WHERE round > ? "
                         "AND round <= ?", since, through)  # fmt: skip

    def tallies(self, through: int) -> list[sqlite3.Row]:
        """Per miner and outcome ('accepted' or the refusal reason): uploads and the last round."""
        return self._all(
            "SELECT miner, CASE WHEN status = 'accepted' THEN 'accepted' "
            "ELSE COALESCE(reason, 'refused') END AS k, COUNT(*) AS n, MAX(round) AS last FROM submissions "
            "WHERE round <= ? AND status != 'received' GROUP BY miner, k", through,
        )  # fmt: skip

    def intake_refusals(self, since: int, through: int) -> list[sqlite3.Row]:
        return self._all(INTAKE_REFUSALS, since, through)

    def intake_refusal_tallies(self, through: int) -> list[sqlite3.Row]:
        return self._all(f"SELECT miner, code, COUNT(*) AS n, MAX(round) AS last FROM ({INTAKE_REFUSALS}) "
                         "GROUP BY miner, code", -1, through)  # fmt: skip

    def published_rounds(self, since: int, through: int) -> list[int]:
        """The closed rounds in (since, through] that published a version."""
        rows = self._all("SELECT round FROM rounds WHERE status = 'closed' AND accepted > 0 AND round > ? "
                         "AND round <= ? ORDER BY round", since, through)  # fmt: skip
        return [int(r["round"]) for r in rows]

    def first_rounds(self, through: int) -> dict[str, int]:
        """Each miner's first round with an upload or a refused one, up to ``through``."""
        rows = self._all(
            "SELECT miner, MIN(round) AS first FROM (SELECT miner, round FROM submissions UNION ALL "
            "SELECT miner, round FROM refusals) WHERE round <= ? GROUP BY miner", through,
        )  # fmt: skip
        return {str(r["miner"]): int(r["first"]) for r in rows}
