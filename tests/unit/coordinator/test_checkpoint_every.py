"""A checkpoint every ``[publish] checkpoint_every`` versions: the versions between have none, a miner far
behind loads the newest one at or before the version it needs and applies the published updates after it,
a restart between checkpoints resumes exactly, and only the states a restart or a rollback can need are
kept."""

from __future__ import annotations

import contextlib
import logging
import sqlite3
from pathlib import Path

import pytest
from pydantic import ValidationError

from coordinator.rounds.rollback import rollback
from protocol.params import params_hash
from protocol.signing import generate_key
from tests.helpers.catcher import Catcher, four_versions, rounds
from tests.helpers.pool import SPEC, Miner, OpenPool, assert_error

EVERY_3 = {"format": "sparseloco", "checkpoint_every": 3}


def kept(state_dir: Path) -> dict[str, set[int]]:
    """The versions whose checkpoint, and whose coordinator state, the store still names."""
    with contextlib.closing(sqlite3.connect(f"file:{state_dir / 'state.db'}?mode=ro", uri=True)) as db:
        rows = db.execute("SELECT version, checkpoint_sha, state_sha FROM versions").fetchall()
    return {
        "checkpoints": {v for v, c, _ in rows if c is not None},
        "states": {v for v, _, s in rows if s is not None},
    }


def test_a_miner_far_behind_loads_the_checkpoint_before_its_version_and_the_updates_after_it(
    open_pool: OpenPool, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with open_pool(publish=EVERY_3, rounds={"min_quorum": 2}, max_catchup_versions=3) as pool:
        assert pool.client.get("/v1/info").json()["checkpoint_every"] == 3
        miners = [pool.miner() for _ in range(2)]
        rounds(pool, miners, 0, 5)
        now = pool.latest()
        assert now["version"] == 5
        served = {}
        for query in ({"version": 3}, {"at_most": 5}, {"at_most": 4}, {"at_most": 2}, {}):
            r = pool.client.get("/v1/checkpoint", params=query)
            assert r.status_code == 200, (query, r.text)
            served[tuple(query.items())] = int(r.headers["X-Gradpool-Version"])
        assert list(served.values()) == [3, 3, 3, 0, 3]
        assert_error(pool.client.get("/v1/checkpoint", params={"version": 4}), 404, "not_found")
        both = pool.client.get("/v1/checkpoint", params={"version": 3, "at_most": 5})
        assert_error(both, 422, "invalid_request")

        with caplog.at_level(logging.INFO, logger="node.follower"):
            for target in (5, 3):  # a fresh miner (nothing to catch up from by updates alone)
                fresh = Catcher(pool, tmp_path / f"fresh-{target}")
                want = pool.client.get(f"/v1/versions/{target}").json()["param_hash"]
                fresh.catch_up(target, want)
                assert (fresh.version, params_hash(fresh.params, SPEC)) == (target, want)
                assert not list((tmp_path / f"fresh-{target}").glob("*.partial"))
        assert "version 5: caught up from the checkpoint of version 3" in caplog.text
        # between checkpoints no state is kept but the current version's: a restart needs that one alone
        assert kept(pool.settings.state_dir) == {"checkpoints": {0, 3}, "states": {3, 5}}


def test_a_restart_between_checkpoints_resumes_exactly(open_pool: OpenPool, tmp_path: Path) -> None:
    """Stopped at version 2 (its checkpoint is version 0's): rebuilt from it and the published updates, with
    the downlink's error feedback of version 2, the run makes the versions it makes without stopping."""
    settings = {"publish": EVERY_3, "rounds": {"min_quorum": 2}}

    def stopped(state_dir: Path) -> None:
        assert kept(state_dir)["checkpoints"] == {0}

    restarted = four_versions(open_pool, tmp_path / "a", True, settings, stopped)
    assert restarted == four_versions(open_pool, tmp_path / "b", False, settings)


def test_after_a_rollback_a_miner_follows_the_new_line_from_its_checkpoint(
    open_pool: OpenPool, tmp_path: Path
) -> None:
    """Rolled back to version 4 (a checkpoint) from 5, the run goes on as 4 -> 6 -> 7: a miner that needs 7
    loads 4's checkpoint and applies 6's and 7's updates, not the set-aside 5's."""
    every_4 = {"publish": {**EVERY_3, "checkpoint_every": 4}, "max_catchup_versions": 4}
    key = generate_key()
    with open_pool(**every_4, rounds={"min_quorum": 1}) as pool:
        miner = Miner(pool.client, key)
        miner.register()
        rounds(pool, [miner], 0, 5)
        assert pool.latest()["version"] == 5
    rollback(pool.settings.state_dir, 4)
    with open_pool(**every_4, rounds={"min_quorum": 1}, state_dir=pool.settings.state_dir) as pool:
        first = pool.round()["round"]
        rounds(pool, [Miner(pool.client, key)], first, first + 2)
        now = pool.latest()
        assert now["version"] == 7
        line = [pool.client.get(f"/v1/versions/{v}").json()["base_version"] for v in (6, 7)]
        assert line == [4, 6]
        fresh = Catcher(pool, tmp_path / "fresh")
        fresh.catch_up(7, now["param_hash"])
        assert (fresh.version, params_hash(fresh.params, SPEC)) == (7, now["param_hash"])


def test_checkpoints_further_apart_than_a_miner_catches_up_are_refused(open_pool: OpenPool) -> None:
    with (
        pytest.raises(ValidationError, match="checkpoint_every"),
        open_pool(publish={"checkpoint_every": 17}, max_catchup_versions=16),
    ):
        pass
