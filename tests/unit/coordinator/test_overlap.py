"""Overlapped rounds: the next round opens as one starts closing; its uploads train from the version
before and are applied to the one being made (max_staleness 1), exactly; a real miner merges a version
published mid-round into its training."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from coordinator.errors import Stopping
from coordinator.hooks import Hooks
from node.miner import Miner
from node.settings import MinerSettings
from protocol.params import params_hash
from tests.helpers.clock import ManualClock
from tests.helpers.pool import SPEC, OpenPool, Pool, assert_error, node_client, payload
from tests.helpers.published import after_round, one_of
from tests.helpers.waiting import wait_until

OVERLAP = {"overlap": True}


def checkpoint_hash(pool: Pool, version: int) -> str:
    return params_hash(pool.checkpoint(version), SPEC)


def test_the_next_round_trains_while_one_closes_and_is_applied_to_the_version_it_makes(
    open_pool: OpenPool,
) -> None:
    closing, release = threading.Event(), threading.Event()
    clock = ManualClock(start=time.time())  # it stamps the rounds; signatures are checked by it too

    def hold(round_: int) -> None:
        if round_ == 0:
            closing.set()
            assert release.wait(30)

    with open_pool(rounds=OVERLAP, app={"hooks": Hooks(before_commit=hold), "clock": clock}) as pool:
        alice = pool.miner()
        first = payload(round_=0, base_version=0, seed=1)
        clock.advance(3.0)
        assert alice.upload(0, first).status_code == 200
        assert closing.wait(30)
        # round 0 is being closed; round 1 is open for version 0, the newest there is
        now = pool.round()
        assert (now["round"], now["version"], now["status"]) == (1, 0, "open")
        assert pool.record(0)["status"] == "aggregating"
        assert_error(alice.upload(0, payload(round_=0, base_version=0, seed=2)), 409, "round_closed")
        assert_error(alice.post("/v1/rounds/0/verdicts", b'{"verdicts": []}'), 409, "round_open")
        second = payload(round_=1, base_version=0, seed=3)
        clock.advance(4.0)
        assert alice.upload(1, second).status_code == 200
        assert pool.round()["submissions"] == 1
        # a long-poll for round 0 to close answers at the end of its wait while round 0 is held...
        held = pool.client.get("/v1/round", params={"closed": 0, "wait_s": 0.5}).json()
        assert (held["round"], held["closing"], held["newest"]) == (1, 0, None), held
        # ...and is woken by the close: it would otherwise answer after its 60 s, well past the join's 30 s
        woken: dict[str, Any] = {}

        def long_poll() -> None:
            woken.update(pool.client.get("/v1/round", params={"closed": 0, "wait_s": 60}).json())

        poll = threading.Thread(target=long_poll)
        poll.start()
        release.set()
        poll.join(timeout=30)
        assert not poll.is_alive(), "the long-poll was not woken by the close of round 0"
        # round 0 closed and made version 1 (round 1 may have begun closing since, with round 2 open for 1)
        assert woken["closing"] != 0 and 1 in (woken["newest"], woken["version"]), woken

        after = pool.wait_for_round(1)
        r0, r1 = pool.record(0), pool.record(1)
        assert (r0["version"], r0["applied_to"], r1["version"], r1["applied_to"]) == (0, 0, 0, 1)
        v1 = one_of(after_round(pool.checkpoint(0), [first], r0["reference_norm"]), checkpoint_hash(pool, 1))
        # trained on version 0, applied to version 1
        one_of(after_round(v1, [second], r1["reference_norm"]), checkpoint_hash(pool, 2))
        # round 2 opened as round 1 started closing, for version 1
        assert (after["round"], after["version"]) == (2, 1)
        assert pool.client.get("/v1/versions/2").json()["base_version"] == 1
        reports = {r["round"]: r for r in pool.client.get("/v1/reports").json()}
        assert (reports[0]["version"], reports[1]["version"]) == (1, 2)
        # a round's wall time runs from its opening to the next one's, by the coordinator's clock: round 1
        # opened as round 0 began closing (3 s in), round 2 as round 1 did (4 s later, once round 0 closed)
        assert (reports[0]["wall_s"], reports[1]["wall_s"]) == (3.0, 4.0), reports


def test_an_upload_more_stale_than_max_staleness_is_refused(open_pool: OpenPool) -> None:
    with open_pool(rounds=OVERLAP) as pool:
        alice = pool.miner()
        for r in range(3):  # rounds 0 and 1 train from version 0, round 2 from 1, round 3 from 2
            base = pool.round()["version"]
            assert alice.upload(r, payload(round_=r, base_version=base, seed=r)).status_code == 200
            pool.wait_for_round(r)
        now = pool.round()
        assert (now["round"], now["version"], now["newest"]) == (3, 2, 3)
        # version 1 is two versions before the one round 3 is applied to (3); 4 does not exist
        assert_error(alice.upload(3, payload(round_=3, base_version=1, seed=9)), 409, "stale_version")
        assert_error(alice.upload(3, payload(round_=3, base_version=4, seed=9)), 409, "stale_version")
        assert alice.upload(3, payload(round_=3, base_version=2, seed=9)).status_code == 200


@pytest.mark.parametrize("then", [OVERLAP, {"overlap": False}], ids=["overlapped", "synchronous"])
def test_a_restart_mid_close_closes_the_round_behind_then_the_open_one(
    open_pool: OpenPool, then: dict[str, Any]
) -> None:
    # The commit of round 0 waits; the coordinator then stops before it, leaving round 0 behind an open
    # round 1.
    held, release = threading.Event(), threading.Event()

    def stop_before_the_commit(round_: int) -> None:
        held.set()
        release.wait(timeout=60)
        raise Stopping

    with open_pool(rounds=OVERLAP, app={"hooks": Hooks(before_commit=stop_before_the_commit)}) as pool:
        try:
            alice = pool.miner()
            first = payload(round_=0, base_version=0, seed=1)
            assert alice.upload(0, first).status_code == 200
            assert held.wait(timeout=60), "round 0 never reached its commit"
            assert pool.round()["round"] == 1
            second = payload(round_=1, base_version=0, seed=2)
            assert alice.upload(1, second).status_code == 200
            assert pool.record(0)["status"] == "aggregating"
            assert pool.client.get("/v1/versions/1").status_code == 404
        finally:
            release.set()  # the coordinator stops with round 0 uncommitted

    with open_pool(rounds=then) as pool:
        after = pool.wait_for_round(1)
        r0, r1 = (pool.client.get(f"/v1/rounds/{r}").json() for r in (0, 1))
        assert [s["status"] for s in r0["submissions"] + r1["submissions"]] == ["accepted", "accepted"]
        v1 = one_of(after_round(pool.checkpoint(0), [first], r0["reference_norm"]), checkpoint_hash(pool, 1))
        one_of(after_round(v1, [second], r1["reference_norm"]), checkpoint_hash(pool, 2))
        assert r1["applied_to"] == 1
        # synchronous from here: the next round is for the newest version; overlapped: for the one before
        assert (after["round"], after["version"]) == (2, 1 if then["overlap"] else 2)


def test_a_version_published_mid_round_may_be_trained_from(open_pool: OpenPool) -> None:
    """Round 1 opens for version 0; once round 0 publishes version 1, round 1 takes uploads trained from
    either, and applies them all to version 1."""
    with open_pool(rounds={**OVERLAP, "min_quorum": 2}) as pool:
        alice, bob = pool.miner(), pool.miner()
        first = [payload(round_=0, base_version=0, seed=s) for s in (1, 2)]
        for m, body in zip((alice, bob), first, strict=True):
            assert m.upload(0, body).status_code == 200
        late = payload(round_=1, base_version=0, seed=3)
        assert alice.upload(1, late).status_code == 200

        def published() -> dict[str, Any] | None:
            now = pool.round()
            if now["newest"] is None:
                assert now["closing"] == 0, now  # round 0 is still closing, behind round 1
                return None
            return now

        now = wait_until(published, 30, "round 0 to publish version 1 while round 1 is open")
        assert (now["round"], now["version"], now["newest"], now["closing"]) == (1, 0, 1, None)
        assert now["newest_hash"] == pool.client.get("/v1/versions/1").json()["param_hash"]
        fresh = payload(round_=1, base_version=1, seed=4)
        assert bob.upload(1, fresh).status_code == 200
        pool.wait_for_round(1)
        r0, r1 = (pool.client.get(f"/v1/rounds/{r}").json() for r in (0, 1))
        v1 = one_of(after_round(pool.checkpoint(0), first, r0["reference_norm"]), checkpoint_hash(pool, 1))
        one_of(after_round(v1, [late, fresh], r1["reference_norm"]), checkpoint_hash(pool, 2))


def test_a_version_published_mid_round_is_merged_into_the_training(
    open_pool: OpenPool, tmp_path: Path
) -> None:
    release = threading.Event()

    def hold(round_: int) -> None:
        if round_ == 0:
            assert release.wait(60)

    with open_pool(rounds={"overlap": True}, app={"hooks": Hooks(before_commit=hold)}) as pool:
        client = node_client(pool)
        info = client.info()
        miner = Miner(MinerSettings(state_dir=tmp_path / "miner", device="cpu"), client, info)
        client.register()
        assert miner.mine_round(client.round())
        second = client.round()
        assert (second.round, second.version, second.closing, second.newest) == (1, 0, 0, None)

        steps = [0]
        train_step = miner.trainer.train_step

        def step(batch: Any) -> dict[str, float]:
            out = train_step(batch)
            steps[0] += 1
            if steps[0] == 1:  # version 1 is published after the first inner step of round 1
                release.set()
                assert miner.watch is not None and miner.watch.wait(60)
            return out

        miner.trainer.train_step = step  # type: ignore[method-assign]
        assert miner.mine_round(second)
        v1 = pool.client.get("/v1/versions/1").json()
        assert (miner.version, params_hash(miner.params, SPEC)) == (1, v1["param_hash"])
        assert miner.metrics.merged._value.get() == 1
        pool.wait_for_round(1)
        r1 = pool.client.get("/v1/rounds/1").json()
        assert [s["status"] for s in r1["submissions"]] == ["accepted"]
        assert r1["applied_to"] == 1
