"""The store's side of commits checked by the replica they reached (coordinator/rounds/direct.py): any
replica writes what it found of a payload, the leader reads it back, and forgets a round's once it closed."""

from __future__ import annotations

import logging
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
        with self.unfenced() as db:
            row = db.one(
                "SELECT found FROM checked WHERE round = ? AND miner = ? AND sha256 = ? AND checker = ?",
                (round_, miner, sha, checker),
            )
        if row is None:
            return None
        try:
            return Checked.model_validate_json(row["found"])
        except ValidationError:
            log.warning("round %d: unreadable check of miner %s's upload, not used", round_, miner[:12])
            return None

    def forget_checked(self, through_round: int) -> int:
        """Forget what was found of the payloads of every round up to ``through_round``: how many."""
        with self.unfenced() as db:
            return db.count("DELETE FROM checked WHERE round <= ?", (through_round,))
