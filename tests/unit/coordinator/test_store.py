"""The store on both backends, SQLite and PostgreSQL: a run's life through it, and its schema (built by the
migrations, the same on both; a state file from before the migrations upgraded with its rows kept)."""

from __future__ import annotations

import dataclasses
import sqlite3
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import inspect
from sqlalchemy.exc import OperationalError

from benchmarks.postgres import Postgres
from coordinator.publishing.history import History
from coordinator.rounds.scoring import leaderboard
from coordinator.settings import ValidationSettings
from coordinator.storage.base import RoundClosedAlready
from coordinator.storage.records import Checked, Health, NewSubmission, NewVersion, Outcome, RoundClose
from coordinator.storage.schema import SchemaError, head, migrate
from coordinator.storage.scores import COORDINATOR
from coordinator.storage.sql import make_engine
from coordinator.storage.store import SqlStore, StoreUnavailable, open_store
from protocol.codec import SparseLoCoCodec
from protocol.evaluation import Losses
from protocol.model import resolve
from protocol.params import model_spec
from protocol.signing import generate_key
from tests.helpers.pool import payload


def submission(round_: int, miner: str, at: float, norm: float = 1.5) -> NewSubmission:
    return NewSubmission(
        round=round_,
        miner=miner,
        sha256=f"{round_}{miner}".ljust(64, "a"),
        content_sha256=f"{round_}{miner}".ljust(64, "c"),
        size=3_000_000_000,  # past 32 bits: the byte counts are 64-bit on both backends
        norm=norm,
        sketch=bytes(range(16)),
        stored_sha256="b" * 64,
        compute_s=2.5,
        received_at=at,
        health=Health(0.5, 1.25, 0.1, 3e-4),
        kept=bytes(8),
    )


def new_version(v: int) -> NewVersion:
    return NewVersion(v, v - 1, f"{v:064x}", 3.25 - v / 8, "d" * 64, 1234, f"e{v:063x}", 5_000_000_000, None)


def close(
    round_: int, version: NewVersion | None, outcomes: dict[str, Outcome], at: float, **kw
) -> RoundClose:  # type: ignore[no-untyped-def]
    return RoundClose(
        round=round_,
        next_version=version.version if version else round_,
        applied_to=round_,
        open_next=True,
        version=version,
        outcomes=outcomes,
        verdicts={m: Losses(3.0, 2.5, 3.0, 2.9, 0.01, 0.4, 0.02) for m, o in outcomes.items() if o.evaluated},
        compute_s=5.0,
        reference_norm=1.5,
        close_reason=None,
        bytes_down=(700, 300),
        closed_at=at,
        health=Health(0.5, 1.25, 0.1, 3e-4),
        **kw,
    )


def test_a_run_lives_through_the_store_alike_on_both_backends(store_url: str) -> None:
    store = SqlStore(store_url)
    try:
        history = History(generate_key(), "run", store)
        store.start("0" * 64, 3.5, "f" * 64, 100, 10.0, history.first("0" * 64, "f" * 64, 10.0))
        assert store.register("m1", 0, 10.0) and store.register("m2", 0, 10.0)
        assert not store.register("m1", 0, 11.0) and store.count_miners() == 2 and store.is_miner("m2")
        assert store.remember_nonce("n", 100.0, 10.0) and not store.remember_nonce("n", 100.0, 20.0)
        store.set_meta("k", "v1")
        store.set_meta("k", "v2")
        assert store.get_meta("k") == "v2" and store.get_meta("none") is None

        store.add_submission(submission(0, "m1", 11.0))
        store.add_submission(submission(0, "m2", 12.5, norm=9.0))
        store.record_refusal(0, "m3", "stale_version", 12.0)
        [u1, _] = store.round_uploads(0)
        assert (u1.miner, u1.size, u1.health, u1.sketch.shape) == (
            "m1",
            3_000_000_000,
            Health(0.5, 1.25, 0.1, 3e-4),
            (4,),
        )
        assert store.uploaded_miners(0) == {"m1", "m2"} and store.arrival_spreads(0, 1) == [1.5]

        v1 = new_version(1)
        outcomes = {"m1": Outcome(None, True, 1.0), "m2": Outcome("norm_outlier", True, None)}
        store.close_round(close(0, v1, outcomes, 13.0, record=history.version(v1, 0, 13.0)))
        assert store.head() == (1, v1.param_hash) and store.latest_version() == 1
        assert store.checkpoint(None) == (1, f"e{1:063x}") and store.eval_loss(1) == v1.eval_loss
        [report] = store.reports()
        assert (report.round, report.accepted, report.rejected, report.result_version) == (0, 1, 1, 1)
        assert (
            report.bytes_down == 1000 and report.bytes_up == 6_000_000_000 and report.next_opened_at == 13.0
        )
        assert store.refusal_counts(0, 0) == {0: {"norm_outlier": 1}}
        # the same round closed again (a first commit whose answer was lost): refused, nothing changed
        again = close(0, None, {"m1": Outcome("unreadable_upload"), "m2": Outcome("unreadable_upload")}, 13.5)
        with pytest.raises(RoundClosedAlready):
            store.close_round(dataclasses.replace(again, open_next=False))
        assert store.upload(0, "m1").reason is None and store.reports()[0].accepted == 1  # type: ignore[union-attr]
        assert store.accepted_norms(0, 1) == [1.5] and store.accepted_gains(0, 1, COORDINATOR) == [0.5]
        inputs = store.score_inputs(-1, 0)
        assert {(t.miner, t.kind, t.count) for t in inputs.tallies} == {
            ("m1", "accepted", 1),
            ("m2", "norm_outlier", 1),
        }
        assert [(r.miner, r.code) for r in store.intake_refusals(-1, 0)] == [("m3", "stale_version")]
        assert inputs.first_rounds == {"m1": 0, "m2": 0, "m3": 0} and inputs.published == [0]
        assert {v.miner for v in inputs.verdicts} == {"m1", "m2"}

        # a validator's verdict replaces its earlier one on the same upload
        store.add_verdicts(0, "val", {"m1": Losses(3.0, 2.0, 3.0, 2.8)}, 14.0)
        store.add_verdicts(0, "val", {"m1": Losses(3.0, 2.2, 3.0, 2.8)}, 15.0)
        [mine] = [v for v in store.verdicts_between(-1, 0) if v.validator == "val"]
        assert mine.losses.own_after == 2.2

        # a round whose evaluation goes on after its version, scored later
        store.add_submission(submission(1, "m1", 14.0))
        v2 = new_version(2)
        store.close_round(
            close(
                1,
                v2,
                {"m1": Outcome(None, True, 1.0)},
                16.0,
                scored=False,
                record=history.version(v2, 1, 16.0),
            )
        )
        assert store.unscored_rounds() == [(1, 1)]
        store.record_scores(1, {"m1": Losses(3.0, 2.9, 3.0, 2.95)}, {"m1": "low_gain"}, 17.0)
        assert store.unscored_rounds() == [] and store.upload(1, "m1").flag == "low_gain"  # type: ignore[union-attr]

        # checkpoints pruned but the newest, then version 2 rolled back to 1
        assert store.prune_checkpoints(1) == [f"e{1:063x}"] and store.checkpoint(1) is None
        store.prune_checkpoints(5)
        assert [r.record.version for r in store.records()] == [0, 1, 2] and len(store.records(0, 1)) == 1
    finally:
        store.close()


def test_lookups_for_a_batch_answer_as_one_at_a_time_alike_on_both_backends(store_url: str) -> None:
    store = SqlStore(store_url)
    try:
        history = History(generate_key(), "run", store)
        store.start("0" * 64, 3.5, "f" * 64, 100, 10.0, history.first("0" * 64, "f" * 64, 10.0))
        # nonces: those recorded now; one given twice is recorded once, a live one is not, an expired one is
        assert store.remember_nonces(["a", "b", "a"], 100.0, 10.0) == {"a", "b"}
        assert store.remember_nonces(["a", "c"], 100.0, 20.0) == {"c"} and not store.remember_nonce("c", 9, 9)
        assert (
            store.remember_nonces(["a", "d"], 300.0, 150.0) == {"a", "d"}
            and store.remember_nonces([], 1, 1) == set()
        )
        # registered keys among some
        assert store.register("m1", 0, 10.0) and store.miners_among(["m1", "x", "m1"]) == {"m1"}
        assert store.miners_among([]) == set()
        # what replicas found, for the one check asked for
        body = payload(round_=0, base_version=0, seed=1)
        found = Checked.of(
            SparseLoCoCodec().examine(body, model_spec(resolve("tiny", 256))), body, "s1", None
        )
        store.add_checked(0, "m1", "s1", "chk", found)
        store.add_checked(0, "m2", "s2", "another", found)
        asked = [(0, "m1", "s1"), (0, "m2", "s2"), (1, "m1", "s1"), (0, "m1", "s9")]
        assert store.checked_among(asked, "chk") == {(0, "m1", "s1"): found}
        assert store.checked_among(asked, "chk")[(0, "m1", "s1")] == store.checked(0, "m1", "s1", "chk")
        assert store.checked_among([], "chk") == {}
    finally:
        store.close()


def test_a_rollback_sets_later_versions_aside_and_reopens_the_round(store_url: str) -> None:
    store = SqlStore(store_url)
    try:
        history = History(generate_key(), "run", store)
        store.start("0" * 64, 3.5, "f" * 64, 100, 10.0, history.first("0" * 64, "f" * 64, 10.0))
        v1 = new_version(1)
        store.close_round(close(0, v1, {}, 11.0, record=history.version(v1, 0, 11.0)))
        store.add_submission(submission(1, "m1", 12.0))
        later, newest = store.rollback(0, 13.0, "rolled_back", history.rollback(0, "0" * 64, [1], 13.0))
        assert (later, newest) == ([1], 1) and store.head() == (0, "0" * 64)
        assert store.upload(1, "m1").reason == "rolled_back"  # type: ignore[union-attr]
        assert [r.round for r in store.unclosed_rounds()] == [2] and store.live_after(0) == []
        assert store.last_record().record.kind == "rollback"  # type: ignore[union-attr]
    finally:
        store.close()


def test_an_upload_refused_as_a_norm_outlier_earns_a_refusal_whatever_its_verdict(tmp_path: Path) -> None:
    """Its verdict measured the update clipped to the reference norm, so a rescaled copy of good work
    shows the gain of good work: the leaderboard scores the refusal, not the verdict."""
    store = SqlStore(f"sqlite:///{tmp_path / 'state.db'}")
    try:
        history = History(generate_key(), "run", store)
        store.start("0" * 64, 3.5, "f" * 64, 100, 10.0, history.first("0" * 64, "f" * 64, 10.0))
        store.add_submission(submission(0, "honest", 11.0))
        store.add_submission(submission(0, "rescaled", 11.5, norm=1e30))
        outcomes = {"honest": Outcome(None, True, 1.0), "rescaled": Outcome("norm_outlier", True, None)}
        v1 = new_version(1)
        store.close_round(close(0, v1, outcomes, 12.0, record=history.version(v1, 0, 12.0)))
        assert {v.miner for v in store.score_inputs(-1, 0).verdicts} == {"honest", "rescaled"}  # alike
        board = {e.miner: e for e in leaderboard(store, ValidationSettings(), 0)}
        assert board["rescaled"].score_mean < 0 < board["honest"].score_mean
        assert board["rescaled"].score < board["honest"].score
        assert board["rescaled"].refusals == {"norm_outlier": 1} and board["rescaled"].verdicts == 0
    finally:
        store.close()


def test_a_store_outlives_a_restart_of_its_postgresql(postgres_server: Postgres, postgres_url: str) -> None:
    store = SqlStore(postgres_url)
    try:
        store.set_meta("k", "1")
        postgres_server.stop()
        try:
            with pytest.raises(OperationalError):  # while it is down: an error, and nothing written
                store.set_meta("k", "2")
        finally:
            postgres_server.start()
        assert store.get_meta("k") == "1"  # the pooled connections the restart broke are replaced
        store.set_meta("k", "3")
        assert store.get_meta("k") == "3"
    finally:
        store.close()


def _columns(url: str) -> dict[str, set[str]]:
    engine = make_engine(url)
    try:
        with engine.connect() as c:
            found = inspect(c)
            return {t: {col["name"] for col in found.get_columns(t)} for t in found.get_table_names()}
    finally:
        engine.dispose()


def test_both_backends_are_built_to_one_schema(postgres_url: str, tmp_path: Path) -> None:
    sqlite = f"sqlite:///{tmp_path / 'state.db'}"
    SqlStore(sqlite).close()
    SqlStore(postgres_url).close()
    assert _columns(sqlite) == _columns(postgres_url)
    assert "alembic_version" in _columns(sqlite)


OLD_VERDICTS = """CREATE TABLE verdicts (
    round INTEGER NOT NULL, miner TEXT NOT NULL, validator TEXT NOT NULL, own_before REAL NOT NULL,
    own_after REAL NOT NULL, other_before REAL NOT NULL, other_after REAL NOT NULL, created_at REAL NOT NULL,
    PRIMARY KEY (round, miner, validator))"""
OLD_SUBMISSIONS = """CREATE TABLE submissions (
    round INTEGER NOT NULL, miner TEXT NOT NULL, sha256 TEXT NOT NULL, content_sha256 TEXT NOT NULL,
    bytes INTEGER NOT NULL, norm REAL NOT NULL, sketch BLOB NOT NULL, unpacked_sha256 TEXT,
    status TEXT NOT NULL, reason TEXT, compute_s REAL NOT NULL, received_at REAL NOT NULL,
    PRIMARY KEY (round, miner))"""


def test_a_state_file_from_before_migrations_is_refused_then_migrated_with_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    with sqlite3.connect(path) as db:
        db.execute(OLD_VERDICTS)
        db.execute(OLD_SUBMISSIONS)
        db.execute("INSERT INTO verdicts VALUES (0, 'm', 'coordinator', 3.0, 2.5, 3.0, 2.9, 1.0)")
        db.execute(
            "INSERT INTO submissions VALUES "
            "(0, 'm', 'aa', 'cc', 10, 1.5, ?, 'bb', 'accepted', NULL, 0.0, 1.0)",
            (bytes(8),),
        )
    db.close()
    url = f"sqlite:///{path}"
    with pytest.raises(SchemaError, match="gradpool coordinator migrate"):
        SqlStore(url)
    engine = make_engine(url)
    assert migrate(engine) == (None, head()) and migrate(engine) == (head(), head())
    engine.dispose()
    fresh = f"sqlite:///{tmp_path / 'fresh.db'}"
    SqlStore(fresh).close()
    assert _columns(url) == _columns(fresh)  # the old file now has every column a new one has
    store = SqlStore(url)
    try:
        [old] = store.verdicts_between(-1, 0)
        assert (old.losses.own_after, old.losses.margin_se) == (2.5, 0.0)
        [upload] = store.round_uploads(0)
        assert (upload.sha256, upload.stored_sha256, upload.norm) == ("aa", "bb", 1.5)
        assert upload.status == "accepted" and not upload.evaluated and upload.flag is None
    finally:
        store.close()


def test_a_store_that_cannot_be_reached_is_one_clear_error(postgres_server: Postgres) -> None:
    with pytest.raises(
        StoreUnavailable, match=r"cannot open the store at postgresql://gradpool@127\.0\.0\.1"
    ):
        SqlStore(f"postgresql://gradpool@127.0.0.1:{postgres_server.port}/no_such_database")
    with pytest.raises(ValueError, match="gradpool stores in sqlite:/// or postgresql://"):
        SqlStore("mysql://somewhere/db")


def test_a_schema_newer_than_the_code_is_refused(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'state.db'}"
    SqlStore(url).close()
    with sqlite3.connect(tmp_path / "state.db") as db:
        db.execute("UPDATE alembic_version SET version_num = '9999'")
    db.close()
    with pytest.raises(SchemaError, match="newer than this gradpool knows"):
        SqlStore(url)


def test_training_health_keeps_what_is_in_range_and_a_round_of_it_cannot_fail() -> None:
    """What miners report is untrusted: out of range is left out, and a round's health is medians and a
    maximum of what is left, which no value can make raise or overflow."""
    hostile = Health.reported(1e308, float("inf"), 5.0, float("nan"))
    assert hostile == Health() and Health.reported(-1.0, 2.0, 0.5, 1e-3) == Health(None, 2.0, 0.5, 1e-3)
    honest = [Health.reported(0.5 + i / 10, 1.0 + i, 0.25, 2e-3) for i in range(3)]
    huge = Health.reported(1e12, 1e12, 1.0, 1e12)
    assert Health.of([*honest, huge, huge]) == Health(0.7, 1e12, 0.25, 2e-3)  # medians: 3 honest of 5
    assert Health.of([]) == Health() and Health.of([hostile]) == Health()


def test_a_shared_evaluation_keeps_its_draw_and_records_alike_on_both_backends(store_url: str) -> None:
    store = SqlStore(store_url)
    try:
        history = History(generate_key(), "run", store)
        store.start("0" * 64, 3.5, "f" * 64, 100, 10.0, history.first("0" * 64, "f" * 64, 10.0))
        for m in ("m1", "m2"):
            store.add_submission(submission(0, m, 11.0))
        v1 = new_version(1)
        sampled = {m: Outcome(None, True, 1.0) for m in ("m1", "m2")}
        closed = close(0, v1, sampled, 13.0, record=history.version(v1, 0, 13.0))
        store.close_round(dataclasses.replace(closed, verdicts={"m1": closed.verdicts["m1"]}))
        assert store.unscored_uploads(0) == {"m2"}  # sampled, no verdict: sampled first next round

        store.add_tasks(4, {"m1": ["va", "vb"], "m2": ["vb"]}, 50.0)
        store.add_tasks(4, {"m1": ["vc"]}, 99.0)  # drawn before (a restart): the first draw stands
        tasks = store.round_tasks(4)
        assert [(t.miner, t.validator, t.deadline, t.outcome) for t in tasks] == [
            ("m1", "va", 50.0, None),
            ("m1", "vb", 50.0, None),
            ("m2", "vb", 50.0, None),
        ]
        store.add_verdicts(4, COORDINATOR, {"m1": Losses(3.0, 2.5, 3.0, 2.9)}, 51.0)
        store.settle_tasks(4, {("m1", "va"): "agreed", ("m1", "vb"): "outvoted", ("m2", "vb"): "missed"})
        tallies = {(t.validator, t.outcome): (t.count, t.rounds, t.last) for t in store.task_tallies(-1)}
        assert tallies == {
            ("va", "agreed"): (1, 1, 4),
            ("vb", "outvoted"): (1, 1, 4),
            ("vb", "missed"): (1, 1, 4),
        }
        assert store.task_tallies(4) == []  # only the rounds after
        store.add_tasks(5, {"m1": ["va"]}, 60.0)
        store.close_tasks(5, 55.0)  # every verdict in before the deadline: no more taken
        assert [t.deadline for t in store.round_tasks(5)] == [55.0]
    finally:
        store.close()


def test_a_replica_starting_while_postgresql_restarts_waits_for_it(
    postgres_server: Postgres, tmp_path: Path
) -> None:
    url = postgres_server.database()
    postgres_server.stop()
    back = threading.Timer(2.0, postgres_server.start)
    try:
        with pytest.raises(StoreUnavailable):  # no patience: the error at once
            open_store(tmp_path, url)
        back.start()
        t0 = time.monotonic()
        store = open_store(tmp_path, url, patience_s=60)  # as a replica starts (STARTING_PATIENCE_S)
        try:
            assert time.monotonic() - t0 >= 1.5 and store.count_miners() == 0
        finally:
            store.close()
    finally:
        if back.is_alive() or back.finished.is_set():
            back.join()
        else:  # the server is left running for the worker's other tests
            postgres_server.start()
