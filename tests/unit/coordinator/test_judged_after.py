"""Overlapped rounds judge a miner with a good standing after the version its upload went into is published:
the version comes out on the cheap checks, the evaluation follows while miners train, and an accepted
upload it would have refused is flagged, counts in the score, and puts its miner on probation (evaluated,
not applied) for the next rounds. A restart finishes an evaluation the coordinator did not."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

import pytest

from coordinator.hooks import Hooks
from tests.helpers.pool import (
    EVAL,
    RECIPE,
    Miner,
    OpenPool,
    Pool,
    encode,
    fixed_miner,
    leaderboard,
    trained_delta,
)

OVERLAP = {"overlap": True, "min_quorum": 3}
TRUST_AFTER_ONE = {**EVAL, "min_record": 1}  # one evaluated round makes a record


def published(state_dir: Path, version: int) -> bool:
    uri = f"file:{state_dir / 'state.db'}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True)) as db:
        return db.execute("SELECT 1 FROM versions WHERE version = ?", (version,)).fetchone() is not None


def upload_round(pool: Pool, honest: list[Miner], flipper: Miner | None, round_: int) -> int:
    """Honest updates from every miner but ``flipper`` (if any), whose update is the negative of an honest
    one; all trained from the newest version, which they declare."""
    now = pool.round()
    assert now["round"] == round_, now
    version = now["newest"] if now["newest"] is not None else now["version"]
    for m in honest:
        body = encode(trained_delta(pool, m.pubkey, round_, version), round_, version)[0]
        assert m.upload(round_, body).status_code == 200
    if flipper is not None:
        flipped = {n: -t for n, t in trained_delta(pool, flipper.pubkey, round_, version).items()}
        assert flipper.upload(round_, encode(flipped, round_, version)[0]).status_code == 200
    return int(version)


def first_round(pool: Pool) -> tuple[list[Miner], Miner]:
    """Two honest miners and the flipper-to-be, each with an honest upload in round 0, closed."""
    honest, flipper = [fixed_miner(pool, i) for i in range(2)], fixed_miner(pool, 2)
    for m in [*honest, flipper]:
        body = encode(trained_delta(pool, m.pubkey, 0, 0), 0, 0)[0]
        assert m.upload(0, body).status_code == 200
    pool.wait_for_round(0)
    return honest, flipper


def test_a_trusted_upload_is_judged_after_the_version_and_a_harmful_one_is_flagged(
    open_pool: OpenPool,
) -> None:
    measured: list[tuple[int, str, bool]] = []  # (round, miner, whether the round's version was out)
    pool_box: list[Pool] = []

    def on_upload(round_: int, miner: str) -> None:
        if pool_box:
            measured.append((round_, miner, published(pool_box[0].settings.state_dir, round_ + 1)))

    hooks = Hooks(on_upload=on_upload)
    with open_pool(recipe=RECIPE, validation=TRUST_AFTER_ONE, rounds=OVERLAP, app={"hooks": hooks}) as pool:
        pool_box.append(pool)
        honest, flipper = first_round(pool)  # nobody has a record, so every upload is judged first

        upload_round(pool, honest, flipper, 1)  # the flipper has a record now: judged after the version
        r1 = pool.wait_scored(1)
        assert pool.client.get("/v1/rounds/1").json()["scored"]
        assert r1[flipper.pubkey]["status"] == "accepted" and r1[flipper.pubkey]["flag"] == "harmful", r1
        assert all(r1[m.pubkey]["status"] == "accepted" and r1[m.pubkey]["flag"] is None for m in honest)
        assert all(s["evaluated"] for s in r1.values())
        # in round 1 every upload was read to build version 2, then evaluated once version 2 was out
        after = {m for r, m, out in measured if r == 1 and out}
        assert after == {m.pubkey for m in [*honest, flipper]}, measured
        board = leaderboard(pool, round=1)
        assert board[flipper.pubkey]["score"] < min(board[m.pubkey]["score"] for m in honest)
        assert board[flipper.pubkey]["flagged"] == {"harmful": 1}
        assert board[flipper.pubkey]["rounds_refused"] == 0 and board[honest[0].pubkey]["flagged"] == {}

        upload_round(pool, honest, flipper, 2)  # flagged: on probation, left out, evaluated all the same
        r2 = pool.wait_scored(2)
        assert (r2[flipper.pubkey]["status"], r2[flipper.pubkey]["reason"]) == ("rejected", "probation"), r2
        assert r2[flipper.pubkey]["flag"] == "harmful" and r2[flipper.pubkey]["evaluated"]
        assert all(r2[m.pubkey]["status"] == "accepted" for m in honest)
        assert {m for r, m, out in measured if r == 2 and out} == {m.pubkey for m in [*honest, flipper]}
        board = leaderboard(pool, round=2)
        flipped = board[flipper.pubkey]
        assert flipped["flagged"] == {"harmful": 2} and flipped["rounds_refused"] == 0
        assert board[flipper.pubkey]["score"] < min(board[m.pubkey]["score"] for m in honest)


@pytest.mark.slow  # six rounds of real training and evaluation: about 20 s of one core
def test_a_flag_means_three_rounds_of_probation_which_clean_rounds_end(open_pool: OpenPool) -> None:
    """A miner flagged once, honest after it: on probation for the 3 rounds after the flagged one
    (evaluated, left out, not flagged), then back in the versions."""
    with open_pool(recipe=RECIPE, validation=TRUST_AFTER_ONE, rounds=OVERLAP) as pool:
        honest, flipper = first_round(pool)
        upload_round(pool, honest, flipper, 1)
        assert pool.wait_scored(1)[flipper.pubkey]["flag"] == "harmful"
        outcomes = []
        for round_ in range(2, 6):
            upload_round(pool, [*honest, flipper], None, round_)
            mine = pool.wait_scored(round_)[flipper.pubkey]
            outcomes.append((mine["status"], mine["reason"], mine["flag"], bool(mine["evaluated"])))
    on_probation = ("rejected", "probation", None, True)
    assert outcomes == [on_probation] * 3 + [("accepted", None, None, True)], outcomes


def test_an_evaluation_left_unfinished_is_done_after_a_restart(open_pool: OpenPool) -> None:
    with open_pool(recipe=RECIPE, validation=TRUST_AFTER_ONE, rounds=OVERLAP) as pool:
        honest = [fixed_miner(pool, i) for i in range(3)]
        for round_ in (0, 1):
            now = pool.round()
            version = now["newest"] if now["newest"] is not None else now["version"]
            for m in honest:
                body = encode(trained_delta(pool, m.pubkey, round_, version), round_, version)[0]
                assert m.upload(round_, body).status_code == 200
            pool.wait_for_round(round_)
        pool.wait_scored(1)
        db_path = pool.settings.state_dir / "state.db"
    with contextlib.closing(sqlite3.connect(db_path)) as db:
        before = db.execute(
            "SELECT miner, own_before, own_after, other_before, other_after, paired_margin "
            "FROM verdicts WHERE round = 1 ORDER BY miner"
        ).fetchall()
        assert len(before) == 3
        # as a stop between the round's commit and the end of its evaluation leaves it
        db.execute("DELETE FROM verdicts WHERE round = 1")
        db.execute("UPDATE rounds SET scored = 0 WHERE round = 1")
        db.commit()
    with open_pool(recipe=RECIPE, validation=TRUST_AFTER_ONE, rounds=OVERLAP) as pool:
        pool.wait_scored(1)
        board = leaderboard(pool, round=1)
        assert all(board[m.pubkey]["verdicts"] == 2 for m in honest), board
    with contextlib.closing(sqlite3.connect(db_path)) as db:
        again = db.execute(
            "SELECT miner, own_before, own_after, other_before, other_after, paired_margin "
            "FROM verdicts WHERE round = 1 ORDER BY miner"
        ).fetchall()
        assert db.execute("SELECT scored FROM rounds WHERE round = 1").fetchone() == (1,)
    assert len(again) == 3
    for a, b in zip(before, again, strict=True):
        assert a[0] == b[0] and all(abs(x - y) < 1e-5 for x, y in zip(a[1:], b[1:], strict=True)), (a, b)


def test_the_loss_guard_judges_the_uploads_it_holds_unjudged(open_pool: OpenPool) -> None:
    """A version made of trusted uploads fails the guard: the guard then measures their gains and leaves out
    the least useful until it passes, not the largest (the honest update here is the largest)."""
    checks = {"max_loss_increase": 0.0}  # any rise of the held-out loss fails the guard
    with open_pool(recipe=RECIPE, validation=TRUST_AFTER_ONE, rounds=OVERLAP, checks=checks) as pool:
        honest, flippers = fixed_miner(pool, 0), [fixed_miner(pool, i) for i in (1, 2)]
        for m in [honest, *flippers]:
            body = encode(trained_delta(pool, m.pubkey, 0, 0), 0, 0)[0]
            assert m.upload(0, body).status_code == 200
        pool.wait_for_round(0)
        now = pool.round()
        version = now["newest"] if now["newest"] is not None else now["version"]
        bigger = {n: 1.5 * t for n, t in trained_delta(pool, honest.pubkey, 1, version).items()}
        assert honest.upload(1, encode(bigger, 1, version)[0]).status_code == 200
        for m in flippers:
            flipped = {n: -t for n, t in trained_delta(pool, m.pubkey, 1, version).items()}
            assert m.upload(1, encode(flipped, 1, version)[0]).status_code == 200
        r1 = pool.wait_scored(1)
    assert r1[honest.pubkey]["status"] == "accepted", r1
    left_out = [m for m in flippers if r1[m.pubkey]["status"] == "rejected"]
    assert left_out and all(r1[m.pubkey]["reason"] == "loss_guard" for m in left_out), r1


def test_weighting_by_score_refuses_on_the_standing_of_the_rounds_before(open_pool: OpenPool) -> None:
    """weight_by_score in overlapped rounds: a round's own results come after its version, so a miner with no
    score yet is judged on its upload alone (here nothing refuses it), and one whose standing turned negative
    is refused as low_score from the next round on."""
    lenient = {**TRUST_AFTER_ONE, "weight_by_score": True, "refuse_harmful": False, "min_gain_fraction": 0.0}
    with open_pool(recipe=RECIPE, validation=lenient, rounds={**OVERLAP, "min_quorum": 4}) as pool:
        honest, flipper = [fixed_miner(pool, i) for i in range(3)], fixed_miner(pool, 3)
        upload_round(pool, honest, flipper, 0)
        r0 = pool.wait_scored(0)
        assert all(s["status"] == "accepted" for s in r0.values()), r0
        upload_round(pool, honest, flipper, 1)
        r1 = pool.wait_scored(1)
        assert (r1[flipper.pubkey]["status"], r1[flipper.pubkey]["reason"]) == ("rejected", "low_score"), r1
        assert all(r1[m.pubkey]["status"] == "accepted" for m in honest), r1


def test_a_round_that_fails_for_most_of_its_version_flags_none_of_its_miners(open_pool: OpenPool) -> None:
    """One faint upload (a hundredth of an honest update) among good ones is flagged (low gain). When most of
    the evaluated uploads a version took fail after it, the round failed rather than its miners: none of them
    is flagged, and their results count in the scores all the same."""

    def upload(round_: int, faint: list[Miner]) -> dict[str, dict[str, object]]:
        version = upload_round(pool, [], None, round_)
        for m in miners:
            delta = trained_delta(pool, m.pubkey, round_, version)
            if m in faint:
                delta = {n: t / 100 for n, t in delta.items()}
            assert m.upload(round_, encode(delta, round_, version)[0]).status_code == 200
        return pool.wait_scored(round_)

    with open_pool(recipe=RECIPE, validation=TRUST_AFTER_ONE, rounds=OVERLAP) as pool:
        honest, flipper = first_round(pool)
        miners = [*honest, flipper]
        r1 = upload(1, [flipper])
        assert r1[flipper.pubkey]["flag"] == "low_gain", r1
        assert all(r1[m.pubkey]["status"] == "accepted" and r1[m.pubkey]["flag"] is None for m in honest)
        r2 = upload(2, honest)  # the version takes the two honest miners' uploads (the third is on probation)
        assert all(r2[m.pubkey]["status"] == "accepted" and r2[m.pubkey]["flag"] is None for m in honest), r2
        assert (r2[flipper.pubkey]["reason"], r2[flipper.pubkey]["flag"]) == ("probation", None), r2
        board = leaderboard(pool, round=2)
        assert board[honest[0].pubkey]["flagged"] == {} and board[flipper.pubkey]["flagged"] == {
            "low_gain": 1
        }


def test_freeriders_refused_in_the_first_round_do_not_pull_its_clip(open_pool: OpenPool) -> None:
    """The first round has no accepted norms before it: two freeriders (a ten-thousandth of an honest update)
    beside two honest miners would put the median between them and clip each honest update to about half.
    They are refused before the version, and the version's uploads are clipped among those it took."""
    with open_pool(recipe=RECIPE, validation=TRUST_AFTER_ONE, rounds={**OVERLAP, "min_quorum": 4}) as pool:
        honest, freeriders = [fixed_miner(pool, i) for i in range(2)], [fixed_miner(pool, i) for i in (2, 3)]
        for m in [*honest, *freeriders]:
            delta = trained_delta(pool, m.pubkey, 0, 0)
            if m in freeriders:
                delta = {n: t * 1e-4 for n, t in delta.items()}
            assert m.upload(0, encode(delta, 0, 0)[0]).status_code == 200
        r0 = pool.wait_scored(0)
    for m in freeriders:
        assert (r0[m.pubkey]["status"], r0[m.pubkey]["reason"]) == ("rejected", "low_gain"), r0
    scales = sorted(float(str(r0[m.pubkey]["scale"])) for m in honest)
    # the median of the two honest norms: the smaller is not clipped, the larger to their mean
    assert scales[1] == 1.0 and scales[0] > 0.5, r0
