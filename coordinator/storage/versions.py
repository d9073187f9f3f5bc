"""The model's versions in the store, and their signed history (protocol/history.py).

The ``history`` table has one row per record: the record's canonical JSON (the bytes its signature covers)
and the signature. A record is written in the transaction that makes the change it records (a version, a
rollback), so the history and the state never disagree.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

from pydantic import ValidationError
from sqlalchemy import RowMapping

from coordinator.storage.records import StoredVersion
from coordinator.storage.rows import from_row
from coordinator.storage.sql import Tx
from protocol.errors import HistoryError
from protocol.history import SignedRecord, VersionRecord, canonical

LIVE = "rolled_back_at IS NULL"  # versions that were not rolled back
INSERT_RECORD = "INSERT INTO history (seq, version, kind, record, signature) VALUES (?, ?, ?, ?, ?)"


def record_row(signed: SignedRecord) -> tuple[int, int, str, str, str]:
    r = signed.record
    return r.seq, r.version, r.kind, canonical(r.model_dump(mode="json")).decode(), signed.signature


def _signed(row: RowMapping) -> SignedRecord:
    try:
        return SignedRecord(
            record=VersionRecord.model_validate_json(row["record"]), signature=row["signature"]
        )
    except ValidationError as e:
        raise HistoryError(
            f"record {row['seq']} in the store does not parse: {e.errors()[0]['msg']}"
        ) from None


class VersionStore:
    """Mixed into ``SqlStore``, which gives ``_all``, ``_one`` and ``transaction``."""

    def _all(self, sql: str, *args: Any) -> list[RowMapping]:
        raise NotImplementedError

    def _one(self, sql: str, *args: Any) -> RowMapping | None:
        raise NotImplementedError

    def transaction(self) -> AbstractContextManager[Tx]:
        raise NotImplementedError

    def head(self) -> tuple[int, str]:
        """The current version (the newest one not rolled back) and its parameter hash."""
        row = self._one(
            f"SELECT version, param_hash FROM versions WHERE {LIVE} ORDER BY version DESC LIMIT 1"
        )
        assert row is not None, "a started run has a version"
        return int(row["version"]), str(row["param_hash"])

    def version(self, version: int) -> StoredVersion | None:
        row = self._one("SELECT * FROM versions WHERE version = ?", version)
        return None if row is None else from_row(StoredVersion, row)

    def latest_version(self) -> int:
        row = self._one("SELECT MAX(version) AS v FROM versions")
        return int(row["v"]) if row and row["v"] is not None else -1

    def checkpoint(self, version: int | None) -> tuple[int, str] | None:
        """The newest live version with a checkpoint kept, or ``version``'s checkpoint."""
        if version is None:
            row = self._one(
                f"SELECT version, checkpoint_sha FROM versions WHERE checkpoint_sha IS NOT NULL "
                f"AND {LIVE} ORDER BY version DESC LIMIT 1"
            )
        else:
            row = self._one("SELECT version, checkpoint_sha FROM versions WHERE version = ?", version)
        if row is None or row["checkpoint_sha"] is None:
            return None
        return int(row["version"]), str(row["checkpoint_sha"])

    def eval_loss(self, version: int) -> float | None:
        row = self._one("SELECT eval_loss FROM versions WHERE version = ?", version)
        return None if row is None or row["eval_loss"] is None else float(row["eval_loss"])

    def line(self, version: int, steps: int) -> list[StoredVersion] | None:
        """``version``, its base, its base's base and so on, back to the newest with a checkpoint kept (the
        last; between checkpoints, ``[publish] checkpoint_every``), at most ``steps`` bases back; None when
        no checkpoint is kept that near."""
        found: list[StoredVersion] = []
        at: int | None = version
        while at is not None and len(found) <= steps:
            row = self.version(at)
            if row is None:
                return None
            found.append(row)
            if row.checkpoint_sha is not None:
                return found
            at = row.base_version
        return None

    def prune_checkpoints(self, keep: int) -> list[str]:
        """Forget the checkpoints (and the coordinator's state) of all but the newest ``keep`` versions
        with one, but 0; and the state of every version between checkpoints but the current one (resuming
        needs the current version's alone, a rollback a kept checkpoint's). Returns the blobs no longer
        referenced by any version."""
        with self.transaction() as db:
            old = db.all(  # the newest live ones first: all after the first ``keep`` go
                "SELECT version, checkpoint_sha, state_sha FROM versions WHERE checkpoint_sha IS NOT NULL "
                f"AND version > 0 ORDER BY ({LIVE}) DESC, version DESC"
            )[keep:]
            db.executemany(
                "UPDATE versions SET checkpoint_sha = NULL, state_sha = NULL WHERE version = ?",
                [(r["version"],) for r in old],
            )
            head = db.one(f"SELECT MAX(version) AS v FROM versions WHERE {LIVE}")
            between = db.all(
                "SELECT version, state_sha FROM versions WHERE state_sha IS NOT NULL "
                "AND checkpoint_sha IS NULL AND version < ?",
                (-1 if head is None or head["v"] is None else int(head["v"]),),
            )
            db.executemany(
                "UPDATE versions SET state_sha = NULL WHERE version = ?", [(r["version"],) for r in between]
            )
            kept = db.all(
                "SELECT checkpoint_sha, state_sha FROM versions "
                "WHERE checkpoint_sha IS NOT NULL OR state_sha IS NOT NULL"
            )
        still = {sha for r in kept for sha in (r["checkpoint_sha"], r["state_sha"]) if sha is not None}
        gone = [sha for r in old for sha in (r["checkpoint_sha"], r["state_sha"]) if sha is not None]
        gone += [str(r["state_sha"]) for r in between]
        return [sha for sha in dict.fromkeys(gone) if sha not in still]  # equal bytes share a blob

    def live_after(self, version: int) -> list[int]:
        return [
            r["version"]
            for r in self._all(f"SELECT version FROM versions WHERE version > ? AND {LIVE}", version)
        ]

    def add_records(self, records: list[SignedRecord]) -> None:
        with self.transaction() as db:
            db.executemany(INSERT_RECORD, [record_row(r) for r in records])

    def rollback(
        self, to_version: int, now: float, reason: str, record: SignedRecord
    ) -> tuple[list[int], int]:
        """Make ``to_version`` current again: every later live version is marked rolled back (kept for the
        audit), the open rounds close with ``reason`` and their uploads are set aside, a round opens for
        ``to_version``, and ``record`` says so in the history. Returns the versions rolled back and the
        newest round closed."""
        with self.transaction() as db:
            db.execute(INSERT_RECORD, record_row(record))
            later = [
                r["version"]
                for r in db.all(f"SELECT version FROM versions WHERE version > ? AND {LIVE}", (to_version,))
            ]
            db.execute(
                f"UPDATE versions SET rolled_back_at = ? WHERE version > ? AND {LIVE}", (now, to_version)
            )
            rounds = [int(r["round"]) for r in db.all("SELECT round FROM rounds WHERE status = 'open'")]
            for r in rounds:
                db.execute(
                    "UPDATE submissions SET status = 'rejected', reason = ? WHERE round = ?", (reason, r)
                )
                db.execute(
                    "UPDATE rounds SET status = 'closed', closed_at = ?, close_reason = ?, "
                    "result_version = ? WHERE round = ?",
                    (now, reason, to_version, r),
                )
            newest = max(rounds)
            db.execute(
                "INSERT INTO rounds (round, version, status, opened_at) VALUES (?, ?, 'open', ?)",
                (newest + 1, to_version, now),
            )
        return later, newest

    # -- the signed history ------------------------------------------------------------------------------

    def last_record(self) -> SignedRecord | None:
        row = self._one("SELECT * FROM history ORDER BY seq DESC LIMIT 1")
        return None if row is None else _signed(row)

    def records(self, after: int = -1, limit: int = -1) -> list[SignedRecord]:
        """The records after seq ``after``, in order (at most ``limit``; -1: all)."""
        rows = self._all(
            "SELECT * FROM history WHERE seq > ? ORDER BY seq" + (" LIMIT ?" if limit >= 0 else ""),
            after,
            *([limit] if limit >= 0 else []),
        )
        return [_signed(r) for r in rows]

    def version_record(self, version: int) -> SignedRecord | None:
        row = self._one("SELECT * FROM history WHERE version = ? AND kind = 'version'", version)
        return None if row is None else _signed(row)
