"""The store's side of an evaluation shared among validators (coordinator/rounds/sharing.py): a round's
tasks written when they are drawn and read back, their outcomes written when the round is settled, and
each validator's record."""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager
from typing import Any

from sqlalchemy import RowMapping

from coordinator.storage.records import StoredTask, TaskTally
from coordinator.storage.rows import from_row
from coordinator.storage.scores import COORDINATOR
from coordinator.storage.sql import Tx


class TaskStore:
    """Mixed into ``SqlStore``, which gives ``_all`` and ``transaction``."""

    def _all(self, sql: str, *args: Any) -> list[RowMapping]:
        raise NotImplementedError

    def transaction(self) -> AbstractContextManager[Tx]:
        raise NotImplementedError

    def add_tasks(self, round_: int, assigned: Mapping[str, list[str]], deadline: float) -> None:
        """Each sampled upload's validators (miner -> validators), open until ``deadline``; a round drawn
        before (a restart) keeps its draw."""
        rows = [(round_, m, v, deadline) for m, vs in assigned.items() for v in vs]
        with self.transaction() as db:
            if db.one("SELECT 1 FROM tasks WHERE round = ?", (round_,)) is None:
                db.executemany(
                    "INSERT INTO tasks (round, miner, validator, deadline) VALUES (?, ?, ?, ?)", rows
                )

    def round_tasks(self, round_: int) -> list[StoredTask]:
        rows = self._all("SELECT * FROM tasks WHERE round = ? ORDER BY miner, validator", round_)
        return [from_row(StoredTask, r) for r in rows]

    def settle_tasks(self, round_: int, outcomes: Mapping[tuple[str, str], str]) -> None:
        """Each task's outcome, by (miner, validator)."""
        with self.transaction() as db:
            db.executemany(
                "UPDATE tasks SET outcome = ? WHERE round = ? AND miner = ? AND validator = ?",
                [(o, round_, m, v) for (m, v), o in outcomes.items()],
            )

    def close_tasks(self, round_: int, now: float) -> None:
        """No more verdicts on the round's tasks: their deadline brought forward to ``now``."""
        with self.transaction() as db:
            db.execute("UPDATE tasks SET deadline = ? WHERE round = ? AND deadline > ?", (now, round_, now))

    def task_tallies(self, since: int) -> list[TaskTally]:
        """Per validator and outcome, the settled tasks of the rounds after ``since``, and in how many
        rounds."""
        rows = self._all(
            "SELECT validator, outcome, COUNT(*) AS count, COUNT(DISTINCT round) AS rounds, "
            "MAX(round) AS last FROM tasks "
            "WHERE round > ? AND outcome IS NOT NULL GROUP BY validator, outcome",
            since,
        )
        return [from_row(TaskTally, r) for r in rows]

    def unscored_uploads(self, round_: int) -> set[str]:
        """The miners whose upload in ``round_`` was sampled and has no verdict of the coordinator's (its
        own or one settled from its validators') once the round was scored."""
        rows = self._all(
            "SELECT miner FROM submissions s WHERE round = ? AND evaluated = 1 AND EXISTS (SELECT 1 FROM "
            "rounds r WHERE r.round = s.round AND r.scored = 1) AND NOT EXISTS (SELECT 1 FROM verdicts v "
            "WHERE v.round = s.round AND v.miner = s.miner AND v.validator = ?)",
            round_,
            COORDINATOR,
        )
        return {str(r["miner"]) for r in rows}
