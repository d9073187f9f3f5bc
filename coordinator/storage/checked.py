"""The store's side of commits checked by the replica they reached (coordinator/rounds/checked.py): any
replica writes what it found of a payload, the leader reads it back, and forgets a round's once it closed."""

from __future__ import annotations

from contextlib import AbstractContextManager

from coordinator.storage.sql import Tx


class CheckedStore:
    """Mixed into ``SqlStore``, which gives ``unfenced``. Not fenced: a replica that does not lead writes
    what it found, which changes nothing of the run until the leader records the upload."""

    def unfenced(self) -> AbstractContextManager[Tx]:
        raise NotImplementedError

    def add_checked(self, round_: int, miner: str, sha: str, checker: str, found: str) -> None:
        """What ``checker`` found of a payload (JSON); the first one written stays."""
        with self.unfenced() as db:
            db.execute(
                "INSERT INTO checked (round, miner, sha256, checker, found) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT(round, miner, sha256) DO NOTHING",
                (round_, miner, sha, checker, found),
            )

    def checked(self, round_: int, miner: str, sha: str, checker: str) -> str | None:
        """What a replica that checks as ``checker`` found of this payload, if one did."""
        with self.unfenced() as db:
            row = db.one(
                "SELECT found FROM checked WHERE round = ? AND miner = ? AND sha256 = ? AND checker = ?",
                (round_, miner, sha, checker),
            )
        return None if row is None else str(row["found"])

    def forget_checked(self, through_round: int) -> int:
        """Forget what was found of the payloads of every round up to ``through_round``: how many."""
        with self.unfenced() as db:
            return db.count("DELETE FROM checked WHERE round <= ?", (through_round,))
