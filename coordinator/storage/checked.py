"""The store's side of commits checked by the replica they reached (coordinator/rounds/direct.py): any
replica writes what it found of a payload, the leader reads it back, and forgets a round's once it closed."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import AbstractContextManager

from pydantic import ValidationError

from coordinator.storage.records import Checked
from coordinator.storage.sql import Tx

log = logging.getLogger(__name__)


class CheckedStore:
    """Mixed into ``SqlStore``, which gives ``unfenced``. Not fenced: a replica that does not lead writes
    what it found, which changes nothing of the run until the leader records the upload."""

    def unfenced(self) -> AbstractContextManager[Tx]:
        raise NotImplementedError

    def add_checked(self, round_: int, miner: str, sha: str, checker: str, found: Checked) -> None:
        """What ``checker`` found of a payload; the first one written stays."""
        with self.unfenced() as db:
            db.execute(
                "INSERT INTO checked (round, miner, sha256, checker, found) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT(round, miner, sha256) DO NOTHING",
                (round_, miner, sha, checker, found.model_dump_json()),
            )

    def checked(self, round_: int, miner: str, sha: str, checker: str) -> Checked | None:
        """What a replica that checks as ``checker`` found of this payload, if one did (and its row reads:
        one written by other code is not used)."""
        return self.checked_among([(round_, miner, sha)], checker).get((round_, miner, sha))

    def checked_among(
        self, uploads: Sequence[tuple[int, str, str]], checker: str
    ) -> dict[tuple[int, str, str], Checked]:
        """``checked`` for several (round, miner, sha256) at once, in one statement: those found."""
        wanted = set(uploads)
        if not wanted:
            return {}
        rounds, miners = sorted({r for r, _, _ in wanted}), sorted({m for _, m, _ in wanted})
        marks = ", ".join("?" * len(rounds)), ", ".join("?" * len(miners))
        with self.unfenced() as db:  # on the table's key (round, miner, sha256)
            rows = db.all(
                "SELECT round, miner, sha256, found FROM checked "
                f"WHERE round IN ({marks[0]}) AND miner IN ({marks[1]}) AND checker = ?",
                (*rounds, *miners, checker),
            )
        found = {}
        for row in rows:
            key = (int(row["round"]), str(row["miner"]), str(row["sha256"]))
            if key in wanted and (seen := _read(row["found"], key)) is not None:
                found[key] = seen
        return found

    def forget_checked(self, through_round: int) -> int:
        """Forget what was found of the payloads of every round up to ``through_round``: how many."""
        with self.unfenced() as db:
            return db.count("DELETE FROM checked WHERE round <= ?", (through_round,))


def _read(found: str, upload: tuple[int, str, str]) -> Checked | None:
    """A row's finding; None for one that does not read (written by other code)."""
    try:
        return Checked.model_validate_json(found)
    except ValidationError:
        log.warning("round %d: unreadable check of miner %s's upload, not used", upload[0], upload[1][:12])
        return None
