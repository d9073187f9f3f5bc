"""A round always ends, a restart gives the open round its time back, and an operator can roll the model
back: failures injected through the closer's hooks, time through an injected clock."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from coordinator.hooks import Hooks
from coordinator.rounds.rollback import rollback
from gradpool.cli import app
from node.follower import Follower
from protocol.history import Chain, HistoryPage, SignedRecord
from protocol.params import apply_update, decode_update, params_hash
from protocol.signing import generate_key, public_key_hex
from protocol.wire import RunInfo
from tests.helpers.clock import ManualClock
from tests.helpers.pool import EVAL, SPEC, Miner, OpenPool, Pool, node_client, payload


def failing(miners: set[str]) -> Hooks:
    def on_upload(round_: int, miner: str) -> None:
        if miner in miners:
            raise RuntimeError("injected: this upload's file is unreadable")

    return Hooks(on_upload=on_upload)


def test_an_upload_whose_processing_fails_is_refused_and_the_others_are_published(
    open_pool: OpenPool,
) -> None:
    bad_key = generate_key()
    with open_pool(app={"hooks": failing({public_key_hex(bad_key)})}, rounds={"min_quorum": 2}) as pool:
        good, bad = pool.miner(), Miner(pool.client, bad_key)
        assert bad.register().status_code == 200
        assert good.upload(0, payload(0, 0, seed=1)).status_code == 200
        assert bad.upload(0, payload(0, 0, seed=2)).status_code == 200
        assert pool.latest_after(0)["version"] == 1
        assert pool.submissions() == {
            (0, good.pubkey): ("accepted", None),
            (0, bad.pubkey): ("rejected", "unreadable_upload"),
        }


def test_a_round_that_cannot_be_closed_closes_without_a_version(open_pool: OpenPool) -> None:
    def before_commit(round_: int) -> None:
        raise RuntimeError("injected: the disk is full")

    hooks = Hooks(before_commit=before_commit)
    with open_pool(app={"hooks": hooks}, rounds={"max_close_attempts": 2}) as pool:
        start = pool.round()
        miner = pool.miner()
        assert miner.upload(0, payload(0, 0, seed=1)).status_code == 200
        after = pool.wait_for_round(0)
        assert (after["round"], after["version"], after["param_hash"]) == (1, 0, start["param_hash"])
        record = pool.client.get("/v1/rounds/0").json()
        assert record["close_reason"] == "close_failed: RuntimeError: injected: the disk is full"
        audit = pool.client.get("/v1/rounds/0/audit").json()
        assert [(r["status"], r["reason"]) for r in audit] == [("rejected", "round_failed")]
        metrics = pool.client.get("/metrics").text
        assert 'gradpool_rounds_failed_total{reason="close_failed"} 1.0' in metrics
        board = pool.client.get("/v1/leaderboard").json()["miners"]
        assert [(e["refusals"], e["rounds_refused"]) for e in board] == [({}, 0)]  # not the miner's doing


def test_a_closer_that_cannot_write_a_rounds_scores_tries_again_and_goes_on(open_pool: OpenPool) -> None:
    failed: list[int] = []

    def before_scores(round_: int) -> None:  # the database restarts as the first scores are written
        if not failed:
            failed.append(round_)
            raise OSError("injected: the database is restarting")

    hooks = Hooks(before_scores=before_scores)
    with open_pool(app={"hooks": hooks}, rounds={"min_quorum": 2}, validation=EVAL) as pool:
        miners = [pool.miner(), pool.miner()]
        for seed, miner in enumerate(miners):
            assert miner.upload(0, payload(0, 0, seed=seed)).status_code == 200
        scored = pool.wait_scored(0)  # evaluated after its version: written on the second try
        assert failed == [0] and all(scored[m.pubkey]["evaluated"] for m in miners), scored
        now = pool.round()
        for seed, miner in enumerate(miners):
            body = payload(now["round"], now["version"], seed=2 + seed)
            assert miner.upload(now["round"], body).status_code == 200
        pool.wait_for_round(now["round"])  # the closer went on: the next round closed too
        assert pool.record(now["round"])["status"] == "closed"
        assert pool.client.get("/readyz").status_code == 200


def test_a_failure_just_after_a_rounds_commit_never_closes_it_again(open_pool: OpenPool) -> None:
    """The store unreachable for a moment just after a round's commit (PostgreSQL restarting): the round
    stays as committed. Closing it again would have found its uploads' stored forms deleted and refused
    them all as unreadable."""
    failed: list[int] = []

    def after_commit(round_: int) -> None:
        if not failed:
            failed.append(round_)
            raise OSError("injected: the database is restarting")

    with open_pool(app={"hooks": Hooks(after_commit=after_commit)}, rounds={"min_quorum": 2}) as pool:
        miners = [pool.miner(), pool.miner()]
        for seed, miner in enumerate(miners):
            assert miner.upload(0, payload(0, 0, seed=seed)).status_code == 200
        assert pool.latest_after(0)["version"] == 1
        now = pool.round()
        for seed, miner in enumerate(miners):
            assert miner.upload(now["round"], payload(now["round"], 1, seed=2 + seed)).status_code == 200
        assert pool.latest_after(now["round"])["version"] == 2  # the closer went on
        assert failed == [0]
        assert pool.submissions() == {
            (r, m.pubkey): ("accepted", None) for r in (0, now["round"]) for m in miners
        }
        assert pool.client.get("/v1/versions/3").status_code == 404  # each version published once


def test_a_second_commit_of_a_closed_round_stops_the_closer_and_changes_nothing(open_pool: OpenPool) -> None:
    """A first commit that landed although its answer was lost (the database restarting as it answered),
    then the round's close tried again: the store refuses it, and the closer stops, so that the process
    stops and a restart resumes from the store."""

    hooks = Hooks()
    with open_pool(app={"hooks": hooks}, rounds={"min_quorum": 1, "max_close_attempts": 3}) as pool:
        run = pool.client.app.state.run  # type: ignore[attr-defined]

        def before_commit(round_: int) -> None:  # what the lost first commit wrote
            with run.store.transaction() as db:
                db.execute(
                    "UPDATE rounds SET status = 'closed', close_reason = 'first' WHERE round = ?", [round_]
                )

        hooks.before_commit = before_commit
        miner = pool.miner()
        assert miner.upload(0, payload(0, 0, seed=1)).status_code == 200
        deadline = time.monotonic() + 30
        while not run.closer.ended and time.monotonic() < deadline:
            time.sleep(0.05)
        assert run.closer.ended
        assert pool.client.get("/v1/versions/1").status_code == 404
    hooks.before_commit = None
    with open_pool(rounds={"min_quorum": 1}) as pool:  # the restart resumes from the store
        record = pool.record(0)
        assert (record["status"], record["close_reason"]) == ("closed", "first")
        assert pool.round()["round"] == 1


def test_a_restart_gives_the_open_round_its_deadline_back(open_pool: OpenPool) -> None:
    clock = ManualClock(start=time.time())  # stands still until moved: a busy machine's seconds do not count
    rounds = {"min_quorum": 1, "deadline_s": 20.0, "adaptive_deadline": False}
    with open_pool(app={"clock": clock}, rounds=rounds) as pool:
        a, _ = pool.miner(), pool.miner()  # the second one is expected, and silent
        assert a.upload(0, payload(0, 0, seed=1)).status_code == 200
        assert pool.round()["deadline_s"] == pytest.approx(20.0)
        clock.advance(15.0)
        assert pool.round()["deadline_s"] == pytest.approx(5.0)
    clock.advance(100.0)  # the coordinator was down for 100 s
    with open_pool(app={"clock": clock}, rounds=rounds) as pool:
        now = pool.round()
        assert (now["round"], now["submissions"]) == (0, 1)
        assert now["deadline_s"] == pytest.approx(20.0)


class Catcher(Follower):
    """A node's follower over the test client: where a miner stands, and how it catches up."""

    def __init__(self, pool: Pool, tmp: Path) -> None:
        self.client = node_client(pool)
        self.info = RunInfo.model_validate(pool.client.get("/v1/info").json())
        self.spec, self.device, self.partial_dir = SPEC, torch.device("cpu"), tmp
        self.params, self.version, self.verified = {}, -1, False


def test_an_operator_rolls_back_and_miners_resynchronise(open_pool: OpenPool, tmp_path: Path) -> None:
    with open_pool() as pool:
        miner = pool.miner()
        for r in range(3):
            assert miner.upload(r, payload(r, r, seed=r)).status_code == 200
            pool.wait_for_round(r)
        v1 = pool.client.get("/v1/versions/1").json()
        with pytest.raises(ValueError, match="another coordinator is using"):
            rollback(pool.settings.state_dir, 1)
        ahead = Catcher(pool, tmp_path)
        ahead.catch_up(3, pool.latest()["param_hash"])  # a miner at version 3
    state = str(pool.settings.state_dir)
    cli = CliRunner()
    done = cli.invoke(app, ["coordinator", "rollback", "--state-dir", state, "--to-version", "7"])
    assert done.exit_code == 1 and done.stderr.strip() == "error: version 7 does not exist"
    done = cli.invoke(app, ["coordinator", "rollback", "--state-dir", state, "--to-version", "1"])
    assert done.exit_code == 0, done.output
    assert "version 1 is current again; versions set aside: 2, 3" in done.stdout

    with open_pool() as pool:
        now = pool.round()
        assert (now["round"], now["version"], now["param_hash"]) == (4, 1, v1["param_hash"])
        assert pool.client.get("/v1/versions/3").json()["rolled_back"] is True
        assert pool.client.get("/v1/checkpoint").headers["X-Gradpool-Version"] == "1"
        assert pool.client.get("/v1/rounds/3").json()["close_reason"] == "rolled_back"
        ahead.client = Catcher(pool, tmp_path).client
        ahead.catch_up(1, now["param_hash"])  # the round's version went back: by checkpoint
        assert (ahead.version, params_hash(ahead.params, SPEC)) == (1, v1["param_hash"])

        miner = Miner(pool.client, miner.key)
        assert miner.upload(4, payload(4, 1, seed=9)).status_code == 200
        after = pool.latest_after(4)
        assert after["version"] == 4  # numbered after every earlier version, rolled back or not
        header, delta = decode_update(pool.client.get("/v1/versions/4/update").content, SPEC)
        assert (header.base_version, header.version) == (1, 4)
        params = pool.checkpoint(1)
        apply_update(params, delta)
        assert params_hash(params, SPEC) == after["param_hash"]
        ahead.catch_up(4, after["param_hash"])  # one published update, from version 1 to 4
        assert (ahead.version, params_hash(ahead.params, SPEC)) == (4, after["param_hash"])
        signed = verified_history(pool)
        assert [s.record.kind for s in signed] == ["version"] * 4 + ["rollback", "version"]
        assert signed[4].record.rolled_back == [2, 3] and signed[5].record.base_version == 1

    # a state directory from before the history was kept: its history is signed when it is opened
    with sqlite3.connect(pool.settings.state_dir / "state.db") as db:
        db.execute("DELETE FROM history")
    with open_pool() as pool:
        again = verified_history(pool)
        # the same records but for when they were signed (and so their links), and checkpoints pruned since
        same = {"at", "previous", "checkpoint_sha256"}
        assert [s.record.model_dump(exclude=same) for s in again] == [
            s.record.model_dump(exclude=same) for s in signed
        ]


def verified_history(pool: Pool) -> list[SignedRecord]:
    """The coordinator's signed history, verified against the key in /v1/info."""
    page = HistoryPage.model_validate(pool.client.get("/v1/history").json())
    chain = Chain(pool.client.get("/v1/info").json()["coordinator_key"])
    chain.extend(page.records)
    assert chain.seq == page.last == len(page.records) - 1
    return page.records
