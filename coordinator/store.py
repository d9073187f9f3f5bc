"""Durable state in SQLite (WAL): rounds, miners, submissions, versions, nonces. Blobs: see blobs.py."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from coordinator.blobs import FileBlobStore

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS miners (
    pubkey TEXT PRIMARY KEY, registered_at REAL NOT NULL, last_seen_round INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS rounds (
    round INTEGER PRIMARY KEY, version INTEGER NOT NULL, status TEXT NOT NULL, opened_at REAL NOT NULL,
    first_upload_at REAL, closed_at REAL, accepted INTEGER NOT NULL DEFAULT 0,
    rejected INTEGER NOT NULL DEFAULT 0, bytes_up INTEGER NOT NULL DEFAULT 0,
    bytes_down INTEGER NOT NULL DEFAULT 0, compute_s REAL NOT NULL DEFAULT 0, eval_loss REAL);
CREATE TABLE IF NOT EXISTS submissions (
    round INTEGER NOT NULL, miner TEXT NOT NULL, sha256 TEXT NOT NULL, content_sha256 TEXT NOT NULL,
    bytes INTEGER NOT NULL, norm REAL NOT NULL, sketch BLOB NOT NULL, unpacked_sha256 TEXT,
    status TEXT NOT NULL, reason TEXT, compute_s REAL NOT NULL, received_at REAL NOT NULL,
    PRIMARY KEY (round, miner));
CREATE TABLE IF NOT EXISTS verdicts (
    round INTEGER NOT NULL, miner TEXT NOT NULL, validator TEXT NOT NULL, own_before REAL NOT NULL,
    own_after REAL NOT NULL, other_before REAL NOT NULL, other_after REAL NOT NULL, created_at REAL NOT NULL,
    margin_se REAL NOT NULL DEFAULT 0, PRIMARY KEY (round, miner, validator));
CREATE TABLE IF NOT EXISTS refusals (
    round INTEGER NOT NULL, miner TEXT NOT NULL, code TEXT NOT NULL, at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS refusals_by_miner ON refusals (miner, round);
CREATE TABLE IF NOT EXISTS nonces (nonce TEXT PRIMARY KEY, expires_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS versions (
    version INTEGER PRIMARY KEY, round INTEGER, param_hash TEXT NOT NULL, eval_loss REAL,
    update_sha TEXT, update_bytes INTEGER NOT NULL DEFAULT 0, checkpoint_sha TEXT,
    checkpoint_bytes INTEGER NOT NULL DEFAULT 0, created_at REAL NOT NULL);
"""


BlobStore = FileBlobStore  # the default store; coordinator.blobs has the interface and the S3 store


class Store:
    """One SQLite connection shared by the event loop and worker threads, serialised by a lock."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.RLock()
        self._nonce_writes = 0
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        columns = {r["name"] for r in self._db.execute("PRAGMA table_info(verdicts)")}
        if "margin_se" not in columns:  # a state directory from before the column
            self._db.execute("ALTER TABLE verdicts ADD COLUMN margin_se REAL NOT NULL DEFAULT 0")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def all(self, sql: str, *args: Any) -> list[sqlite3.Row]:
        with self._lock:
            return list(self._db.execute(sql, args).fetchall())

    def one(self, sql: str, *args: Any) -> sqlite3.Row | None:
        with self._lock:
            row: sqlite3.Row | None = self._db.execute(sql, args).fetchone()
            return row

    def execute(self, sql: str, *args: Any) -> None:
        with self._lock:
            self._db.execute(sql, args)

    def get_meta(self, key: str) -> str | None:
        row = self.one("SELECT value FROM meta WHERE key = ?", key)
        return None if row is None else str(row["value"])

    def set_meta(self, key: str, value: str) -> None:
        self.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?) "
            "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            key,
            value,
        )

    def remember_nonce(self, nonce: str, expires_at: float, now: float) -> bool:
        """Record a nonce; False if it is already recorded and not yet expired."""
        with self.transaction() as db:
            row = db.execute("SELECT expires_at FROM nonces WHERE nonce = ?", (nonce,)).fetchone()
            if row is not None and row["expires_at"] > now:
                return False
            db.execute(
                "INSERT INTO nonces (nonce, expires_at) VALUES (?, ?) "
                "ON CONFLICT(nonce) DO UPDATE SET expires_at = excluded.expires_at",
                (nonce, expires_at),
            )
            self._nonce_writes += 1
            if self._nonce_writes % 1000 == 0:  # now and then, forget expired ones
                db.execute("DELETE FROM nonces WHERE expires_at <= ?", (now,))
        return True

    def add_bytes_down(self, round_: int, n: int) -> None:
        self.execute("UPDATE rounds SET bytes_down = bytes_down + ? WHERE round = ?", n, round_)


def now() -> float:
    return time.time()
