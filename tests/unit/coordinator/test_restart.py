"""Stopping and starting the coordinator on the same state directory."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import statistics
import subprocess
from pathlib import Path
from typing import Any

import pytest

from coordinator.storage.schema import head
from protocol.codec import SparseLoCoCodec
from protocol.codec.measure import update_norm
from protocol.errors import DataError
from protocol.params import params_hash
from tests.helpers.cli import gradpool
from tests.helpers.pool import SPEC, Miner, OpenPool, payload
from tests.helpers.published import after_round, one_of


@pytest.mark.parametrize("overlap", [True, False], ids=["overlapped", "synchronous"])
def test_restart_resumes_the_same_round_version_and_model(open_pool: OpenPool, overlap: bool) -> None:
    rounds = {"overlap": overlap}
    with open_pool(rounds=rounds) as pool:
        alice, bob = pool.miner(), pool.miner()
        first = [payload(round_=0, base_version=0, seed=i) for i in range(2)]
        for miner, body in zip([alice, bob], first, strict=True):
            assert miner.upload(0, body).status_code == 200
        pool.wait_for_round(0)
        pending = payload(round_=1, base_version=1, seed=7)
        assert alice.upload(1, pending).status_code == 200  # bob is still expected: round 1 stays open
        before = pool.round()
        status = pool.client.get("/v1/status").json()
        v1 = pool.client.get("/v1/versions/1").json()
        submissions = pool.submissions()
    # synchronous: round 1 is for version 1; overlapped: for version 0, and version 1 as the newest
    assert (before["round"], before["version"], before["newest"], before["submissions"]) == (
        (1, 0, 1, 1) if overlap else (1, 1, None, 1)
    )

    with open_pool(rounds=rounds) as pool:
        now = pool.round()
        for field in ("round", "version", "newest", "status", "param_hash", "submissions", "expected"):
            assert now[field] == before[field], field
        restarted = pool.client.get("/v1/status").json()
        for field in ("rounds", "miners", "initial_eval_loss"):
            assert restarted[field] == status[field], field
        assert pool.client.get("/v1/versions/1").json() == v1
        assert params_hash(pool.checkpoint(1), SPEC) == v1["param_hash"]
        assert pool.submissions() == submissions

        # The round carries on: alice's upload is remembered, bob's closes it.
        alice, bob = Miner(pool.client, alice.key), Miner(pool.client, bob.key)
        again = alice.upload(1, pending)
        assert again.status_code == 200 and again.json()["duplicate"] is True
        last = payload(round_=1, base_version=1, seed=8)
        assert bob.upload(1, last).status_code == 200
        after = pool.wait_for_round(1)
        codec = SparseLoCoCodec()
        # Round 1's uploads are clipped to the trusted norm: the median norm of round 0's accepted uploads
        # (no upload of round 1 sets it).
        reference = statistics.median(update_norm(codec.decode(b, SPEC)[1]) for b in first)
        trusted = pool.client.get("/v1/rounds/1").json()["reference_norm"]
        assert trusted == pytest.approx(reference)
        latest = pool.latest()
        assert (after["round"], latest["version"]) == (2, 2)
        one_of(after_round(pool.checkpoint(1), [pending, last], trusted), latest["param_hash"])


def test_restart_may_change_operational_limits(open_pool: OpenPool) -> None:
    with open_pool() as pool:
        before = pool.round()
    with open_pool(max_payload_bytes=4096, rounds={"min_quorum": 2, "deadline_s": 5.0}) as pool:
        assert pool.round() == before
        assert pool.client.get("/v1/info").json()["max_payload_bytes"] == 4096


@pytest.mark.parametrize(
    "other",
    [{"seed": 1}, {"codec": {"k": 32}}, {"recipe": {"lr": 1e-3}}, {"run_id": "another-run"}],
    ids=["seed", "codec-k", "recipe", "run-id"],
)
def test_restart_with_other_run_settings_is_refused(open_pool: OpenPool, other: dict[str, Any]) -> None:
    with open_pool() as pool:
        before = pool.round()
    refused = pytest.raises(ValueError, match=r"state directory .* belongs to a run with other settings")
    with refused, open_pool(**other):
        pass
    with open_pool() as pool:  # the refused start left the state as it was
        assert pool.round() == before


def test_restart_with_another_corpus_path_is_refused_by_the_settings_fingerprint(
    open_pool: OpenPool, corpus_file: Path, tmp_path: Path
) -> None:
    other = tmp_path / "other.txt"
    other.write_text(corpus_file.read_text(encoding="utf-8").upper(), encoding="utf-8")
    with open_pool():
        pass
    with pytest.raises(ValueError, match="state directory"), open_pool(data={"corpus": other}):
        pass


def test_restart_with_the_corpus_changed_in_place_is_refused_by_the_dataset_check(
    open_pool: OpenPool, tmp_path: Path, corpus_file: Path
) -> None:
    own = tmp_path / "own-corpus.txt"
    own.write_text(corpus_file.read_text(encoding="utf-8"), encoding="utf-8")
    with open_pool(data={"corpus": own}) as pool:
        before = pool.round()
    own.write_text(own.read_text(encoding="utf-8").upper(), encoding="utf-8")  # same path and settings
    with (
        pytest.raises(DataError, match="changed since the run's data was built"),
        open_pool(data={"corpus": own}),
    ):
        pass
    own.write_text(corpus_file.read_text(encoding="utf-8"), encoding="utf-8")
    os.utime(own, ns=(0, 0))  # even the same text again: rewritten is changed
    with pytest.raises(DataError, match="changed since"), open_pool(data={"corpus": own}):
        pass
    assert before["round"] == 0


def test_request_replayed_after_a_restart_is_refused(open_pool: OpenPool) -> None:
    with open_pool() as pool:
        miner = pool.miner(register=False)
        headers = miner.signed("/v1/miners")
        assert pool.client.post("/v1/miners", headers=headers).status_code == 200
    with open_pool() as pool:
        replay = pool.client.post("/v1/miners", headers=headers)
        assert replay.status_code == 401
        assert replay.json()["error"]["code"] == "replayed_nonce"


def test_recipe_keys_added_since_leave_an_older_runs_fingerprint_alone(open_pool: OpenPool) -> None:
    """The learning-rate schedule's keys, at their defaults, are not in the fingerprint: a state directory
    from before they existed resumes. Set, they are, like any other key of the recipe."""
    with open_pool() as pool:
        path = pool.settings.state_dir / "state.db"
    with contextlib.closing(sqlite3.connect(path)) as db:
        (stored,) = db.execute("SELECT value FROM meta WHERE key = 'fingerprint'").fetchone()
    assert not {"schedule", "planned_rounds", "lr_floor"} & set(json.loads(stored)["run"]["recipe"])
    with (
        pytest.raises(ValueError, match="state directory"),
        open_pool(recipe={"schedule": "cosine", "planned_rounds": 50}),
    ):
        pass


def test_a_state_directory_from_before_migrations_is_refused_then_migrated_and_resumes(
    open_pool: OpenPool,
) -> None:
    """A state directory written by the code before schema migrations (the same tables, no revision
    recorded): ``coordinator serve`` refuses it and says what to run, ``coordinator migrate`` upgrades it,
    and the run resumes where it was, its version hashes intact."""
    rounds = {"overlap": False}
    with open_pool(rounds=rounds) as pool:
        alice, bob = pool.miner(), pool.miner()
        for i, miner in enumerate([alice, bob]):
            assert miner.upload(0, payload(round_=0, base_version=0, seed=i)).status_code == 200
        pool.wait_for_round(0)
        before = pool.round()
        versions = [pool.client.get(f"/v1/versions/{v}").json() for v in range(2)]
        state = pool.settings.state_dir
    with contextlib.closing(sqlite3.connect(state / "state.db")) as db:
        db.execute("DROP TABLE alembic_version")  # what the code before migrations left: no revision,
        for table in ("lease", "tasks", "checked"):  # and none of the tables added since (0002 to 0004)
            db.execute(f"DROP TABLE {table}")
        db.commit()

    def coordinator(*args: str) -> subprocess.CompletedProcess[str]:
        return gradpool("coordinator", *args, "--state-dir", str(state))

    refused = coordinator("serve", "--port", "0")
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert "upgrade it with `gradpool coordinator migrate`" in refused.stderr.strip().splitlines()[-1]
    migrated = coordinator("migrate")
    assert migrated.returncode == 0, migrated.stderr
    assert f"schema from before migrations -> {head()}" in migrated.stdout
    assert "nothing to do" in coordinator("migrate").stdout

    with open_pool(rounds=rounds) as pool:
        now = pool.round()
        assert (now["round"], now["version"], now["param_hash"]) == (1, 1, before["param_hash"])
        assert [pool.client.get(f"/v1/versions/{v}").json() for v in range(2)] == versions
        assert params_hash(pool.checkpoint(1), SPEC) == versions[1]["param_hash"]
