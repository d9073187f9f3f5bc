"""The store's schema: built and upgraded by the Alembic migrations in ``migrations/``, on SQLite and
PostgreSQL alike.

A store opens only on the schema this code knows (the newest revision): an empty database is built to it,
anything else older or newer is refused with what to do (``gradpool coordinator migrate``). A SQLite state
directory from before the migrations (no revision recorded) is brought to the first revision by the column
upgrades it was given on open then, and stamped with it.
"""

from __future__ import annotations

import sqlite3
from importlib.resources import files

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, inspect

from coordinator.storage.records import HEALTH_FIELDS

BASELINE = "0001"  # the schema as it was when migrations came in


class SchemaError(ValueError):
    """The database's schema is not the one this code runs on."""


def _config(connection: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(files("coordinator.storage") / "migrations"))
    config.attributes["connection"] = connection
    return config


def head() -> str:
    revision = ScriptDirectory.from_config(_config()).get_current_head()
    assert revision is not None
    return revision


def revision(engine: Engine) -> str | None:
    """The revision the database is at; ``""`` for an empty database, None for a SQLite state directory
    from before migrations."""
    with engine.connect() as c:
        tables = set(inspect(c).get_table_names())
        if not tables:
            return ""
        if "alembic_version" not in tables:
            return None
        return MigrationContext.configure(c).get_current_revision() or ""


def prepare(engine: Engine, where: str) -> None:
    """Build an empty database to the newest schema; refuse any other schema but the newest."""
    at, newest = revision(engine), head()
    if at == "":
        with engine.begin() as c:
            command.upgrade(_config(c), "head")
        return
    if at == newest:
        return
    known = {s.revision for s in ScriptDirectory.from_config(_config()).walk_revisions()}
    if at is not None and at not in known:
        raise SchemaError(
            f"the store at {where} has schema {at}, newer than this gradpool knows ({newest}): run the "
            "gradpool version that wrote it"
        )
    raise SchemaError(
        f"the store at {where} has schema {at or 'from before migrations'}, this gradpool runs on {newest}: "
        f"upgrade it with `gradpool coordinator migrate` (back it up first), then start again"
    )


def migrate(engine: Engine) -> tuple[str | None, str]:
    """Upgrade the database to the newest schema; returns the revision it was at and the one it is at."""
    at, newest = revision(engine), head()
    if at is None:  # a SQLite state directory from before migrations
        _legacy_upgrade(engine)
        with engine.begin() as c:
            command.stamp(_config(c), BASELINE)
    if at != newest:
        with engine.begin() as c:
            command.upgrade(_config(c), "head")
    return at, newest


# -- SQLite state directories from before the migrations ---------------------------------------------------
# The columns added after the first release, which such a state directory may lack, and those renamed.
LEGACY_COLUMNS = (
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
    ("rounds", "scored", "INTEGER NOT NULL DEFAULT 1"),
    ("submissions", "flag", "TEXT"),
    ("submissions", "kept", "BLOB"),
    *((table, column, "REAL") for table in ("submissions", "rounds") for column in HEALTH_FIELDS),
)
LEGACY_RENAMED = (("submissions", "unpacked_sha256", "stored_sha256"),)
# The schema as those state directories were first made (the columns since are added above).
LEGACY_SCHEMA = """
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


def _legacy_upgrade(engine: Engine) -> None:
    with engine.connect() as c:
        db = c.connection.driver_connection
        assert isinstance(db, sqlite3.Connection), "only SQLite stores predate the migrations"
        db.executescript(LEGACY_SCHEMA)
        for table, old, new in LEGACY_RENAMED:
            if old in _columns(db, table) and new not in _columns(db, table):
                db.execute(f"ALTER TABLE {table} RENAME COLUMN {old} TO {new}")
        for table, column, ddl in LEGACY_COLUMNS:
            if column not in _columns(db, table):
                db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {ddl}")
        db.commit()


def _columns(db: sqlite3.Connection, table: str) -> set[str]:
    return {r[1] for r in db.execute(f"PRAGMA table_info({table})")}
