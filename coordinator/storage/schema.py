"""The SQLite schema of a run's state, and the columns added since the first release (a state directory
from before gets them when it is opened)."""

from __future__ import annotations

import sqlite3

from coordinator.storage.records import HEALTH_FIELDS

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS miners (
    pubkey TEXT PRIMARY KEY, registered_at REAL NOT NULL, last_seen_round INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS rounds (
    round INTEGER PRIMARY KEY, version INTEGER NOT NULL, status TEXT NOT NULL, opened_at REAL NOT NULL,
    first_upload_at REAL, closed_at REAL, accepted INTEGER NOT NULL DEFAULT 0,
    rejected INTEGER NOT NULL DEFAULT 0, bytes_up INTEGER NOT NULL DEFAULT 0,
    bytes_down INTEGER NOT NULL DEFAULT 0, compute_s REAL NOT NULL DEFAULT 0, eval_loss REAL,
    close_reason TEXT, reference_norm REAL, bytes_down_model INTEGER NOT NULL DEFAULT 0,
    bytes_down_data INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS submissions (
    round INTEGER NOT NULL, miner TEXT NOT NULL, sha256 TEXT NOT NULL, content_sha256 TEXT NOT NULL,
    bytes INTEGER NOT NULL, norm REAL NOT NULL, sketch BLOB NOT NULL, stored_sha256 TEXT,
    status TEXT NOT NULL, reason TEXT, compute_s REAL NOT NULL, received_at REAL NOT NULL,
    evaluated INTEGER NOT NULL DEFAULT 0, scale REAL, PRIMARY KEY (round, miner));
CREATE TABLE IF NOT EXISTS verdicts (
    round INTEGER NOT NULL, miner TEXT NOT NULL, validator TEXT NOT NULL, own_before REAL NOT NULL,
    own_after REAL NOT NULL, other_before REAL NOT NULL, other_after REAL NOT NULL, created_at REAL NOT NULL,
    margin_se REAL NOT NULL DEFAULT 0, paired_margin REAL NOT NULL DEFAULT 0,
    paired_se REAL NOT NULL DEFAULT 0, PRIMARY KEY (round, miner, validator));
CREATE TABLE IF NOT EXISTS refusals (
    round INTEGER NOT NULL, miner TEXT NOT NULL, code TEXT NOT NULL, at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS refusals_by_miner ON refusals (miner, round);
CREATE TABLE IF NOT EXISTS nonces (nonce TEXT PRIMARY KEY, expires_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS versions (
    version INTEGER PRIMARY KEY, round INTEGER, param_hash TEXT NOT NULL, eval_loss REAL,
    update_sha TEXT, update_bytes INTEGER NOT NULL DEFAULT 0, checkpoint_sha TEXT,
    checkpoint_bytes INTEGER NOT NULL DEFAULT 0, created_at REAL NOT NULL, base_version INTEGER,
    state_sha TEXT, rolled_back_at REAL);
CREATE TABLE IF NOT EXISTS history (
    seq INTEGER PRIMARY KEY, version INTEGER NOT NULL, kind TEXT NOT NULL, record TEXT NOT NULL,
    signature TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS history_by_version ON history (version, kind);
"""
# Columns added after the first release: a state directory from before gets them on open.
MIGRATIONS = (
    ("verdicts", "margin_se", "REAL NOT NULL DEFAULT 0"),
    ("rounds", "close_reason", "TEXT"),
    ("rounds", "reference_norm", "REAL"),
    ("rounds", "bytes_down_model", "INTEGER NOT NULL DEFAULT 0"),
    ("rounds", "bytes_down_data", "INTEGER NOT NULL DEFAULT 0"),
    ("submissions", "evaluated", "INTEGER NOT NULL DEFAULT 0"),
    ("submissions", "scale", "REAL"),
    ("versions", "base_version", "INTEGER"),
    ("versions", "state_sha", "TEXT"),
    ("versions", "rolled_back_at", "REAL"),
    ("rounds", "result_version", "INTEGER"),
    ("rounds", "applied_to", "INTEGER"),
    ("verdicts", "paired_margin", "REAL NOT NULL DEFAULT 0"),
    ("verdicts", "paired_se", "REAL NOT NULL DEFAULT 0"),
    ("rounds", "scored", "INTEGER NOT NULL DEFAULT 1"),  # 0: its evaluation continues after its version
    ("submissions", "flag", "TEXT"),  # an accepted upload that its later evaluation would have refused
    ("submissions", "kept", "BLOB"),  # the sample of the coordinates it keeps (near-copies)
    # training health as miners report it (records.Health), per upload and per round
    *((table, column, "REAL") for table in ("submissions", "rounds") for column in HEALTH_FIELDS),
)
# Columns renamed since: (table, old name, new name).
RENAMED = (("submissions", "unpacked_sha256", "stored_sha256"),)


def create_or_upgrade(db: sqlite3.Connection) -> None:
    db.executescript(SCHEMA)
    for table, old, new in RENAMED:
        if old in _columns(db, table) and new not in _columns(db, table):
            db.execute(f"ALTER TABLE {table} RENAME COLUMN {old} TO {new}")
    for table, column, ddl in MIGRATIONS:
        if column not in _columns(db, table):
            db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {ddl}")


def _columns(db: sqlite3.Connection, table: str) -> set[str]:
    return {r[1] for r in db.execute(f"PRAGMA table_info({table})")}
