"""The SQLite state file: one written before a column existed still opens, and keeps its rows."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from coordinator.storage.records import Health
from coordinator.storage.store import SqliteStore
from protocol.evaluation import Losses

OLD_VERDICTS = """CREATE TABLE verdicts (
    round INTEGER NOT NULL, miner TEXT NOT NULL, validator TEXT NOT NULL, own_before REAL NOT NULL,
    own_after REAL NOT NULL, other_before REAL NOT NULL, other_after REAL NOT NULL, created_at REAL NOT NULL,
    PRIMARY KEY (round, miner, validator))"""


def test_verdicts_from_before_the_margin_error_column_are_kept(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    with sqlite3.connect(path) as db:
        db.execute(OLD_VERDICTS)
        db.execute("INSERT INTO verdicts VALUES (0, 'm', 'coordinator', 3.0, 2.5, 3.0, 2.9, 1.0)")
    db.close()
    store = SqliteStore(path)
    try:
        [old] = store.verdicts_between(-1, 0)
        assert (old.losses.own_after, old.losses.margin_se) == (2.5, 0.0)
        store.add_verdicts(1, "coordinator", {"m": Losses(3.0, 2.4, 3.0, 2.8, 0.05)}, 2.0)
        [new] = store.verdicts_between(0, 1)
        assert new.losses.margin_se == 0.05
    finally:
        store.close()
    SqliteStore(path).close()  # opening it again leaves the migrated table as it is


OLD_SUBMISSIONS = """CREATE TABLE submissions (
    round INTEGER NOT NULL, miner TEXT NOT NULL, sha256 TEXT NOT NULL, content_sha256 TEXT NOT NULL,
    bytes INTEGER NOT NULL, norm REAL NOT NULL, sketch BLOB NOT NULL, unpacked_sha256 TEXT,
    status TEXT NOT NULL, reason TEXT, compute_s REAL NOT NULL, received_at REAL NOT NULL,
    PRIMARY KEY (round, miner))"""


def test_the_stored_form_column_under_its_old_name_is_renamed_with_its_values(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    with sqlite3.connect(path) as db:
        db.execute(OLD_SUBMISSIONS)
        db.execute(
            "INSERT INTO submissions VALUES "
            "(0, 'm', 'aa', 'cc', 10, 1.5, ?, 'bb', 'accepted', NULL, 0.0, 1.0)",
            (bytes(8),),
        )
    db.close()
    store = SqliteStore(path)
    try:
        [upload] = store.round_uploads(0)
        assert (upload.sha256, upload.stored_sha256, upload.norm) == ("aa", "bb", 1.5)
        assert upload.status == "accepted" and not upload.evaluated and upload.flag is None
    finally:
        store.close()
    with sqlite3.connect(path) as db:
        columns = {r[1] for r in db.execute("PRAGMA table_info(submissions)")}
    db.close()
    assert "stored_sha256" in columns and "unpacked_sha256" not in columns


def test_training_health_keeps_what_is_in_range_and_a_round_of_it_cannot_fail() -> None:
    """What miners report is untrusted: out of range is left out, and a round's health is medians and a
    maximum of what is left, which no value can make raise or overflow."""
    hostile = Health.reported(1e308, float("inf"), 5.0, float("nan"))
    assert hostile == Health() and Health.reported(-1.0, 2.0, 0.5, 1e-3) == Health(None, 2.0, 0.5, 1e-3)
    honest = [Health.reported(0.5 + i / 10, 1.0 + i, 0.25, 2e-3) for i in range(3)]
    huge = Health.reported(1e12, 1e12, 1.0, 1e12)
    assert Health.of([*honest, huge, huge]) == Health(0.7, 1e12, 0.25, 2e-3)  # medians: 3 honest of 5
    assert Health.of([]) == Health() and Health.of([hostile]) == Health()
