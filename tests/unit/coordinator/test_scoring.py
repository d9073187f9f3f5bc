"""The coordinator's own evaluation of real trained updates, the leaderboard, payloads for validators, the
verdicts validators post, and the aggregation choices that use them."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
import torch

from coordinator.rounds.judging import MIN_WEIGHT_SCORE
from protocol.codec import SparseLoCoCodec
from protocol.codec.accumulate import FlatAccumulator, robust_mean
from protocol.params import apply_update
from protocol.signing import generate_key, public_key_hex, sign_request
from tests.helpers.pool import (
    EVAL,
    RECIPE,
    SPEC,
    OpenPool,
    Pool,
    assert_error,
    encode,
    fixed_miner,
    leaderboard,
    payload,
    trained_delta,
)
from tests.helpers.published import one_of, versions


def honest_round(pool: Pool, miners: list[Any], round_: int, version: int) -> None:
    for m in miners:
        body = encode(trained_delta(pool, m.pubkey, round_, version), round_, version)[0]
        assert m.upload(round_, body).status_code == 200


@pytest.mark.slow  # three rounds of five miners' real training and evaluation: about 18 s of one core
@pytest.mark.parametrize("overlap", [True, False], ids=["overlapped", "synchronous"])
def test_harmful_updates_are_refused_and_rank_last(open_pool: OpenPool, overlap: bool) -> None:
    """A sign-flipped update is refused as harmful. Synchronous rounds refuse it again in the next round;
    in overlapped rounds its next upload trains while it is judged, and a miner refused in the round
    before is on probation (evaluated all the same, left out, flagged by what its evaluation shows)."""
    torch.manual_seed(0)
    with open_pool(recipe=RECIPE, validation=EVAL, rounds={"min_quorum": 5, "overlap": overlap}) as pool:
        honest = [fixed_miner(pool, i) for i in range(3)]
        flipper, noisy = fixed_miner(pool, 3), fixed_miner(pool, 4)
        honest_round(pool, [*honest, flipper, noisy], 0, 0)  # everyone honest in the first round
        assert pool.latest_after(0)["version"] == 1

        for round_ in (1, 2):
            version = pool.latest()["version"]  # what a miner trains from: the newest version
            honest_round(pool, honest, round_, version)
            flipped = {n: -t for n, t in trained_delta(pool, flipper.pubkey, round_, version).items()}
            own = trained_delta(pool, noisy.pubkey, round_, version)
            noise = {n: torch.randn_like(t) * t.norm() / math.sqrt(t.numel()) for n, t in own.items()}
            assert flipper.upload(round_, encode(flipped, round_, version)[0]).status_code == 200
            assert noisy.upload(round_, encode(noise, round_, version)[0]).status_code == 200
            pool.wait_for_round(round_)
        pool.wait_scored(2)

        subs = pool.submissions()
        for round_ in (1, 2):
            assert all(subs[(round_, m.pubkey)] == ("accepted", None) for m in honest), subs
        assert subs[(1, flipper.pubkey)] == ("rejected", "harmful")
        assert subs[(2, flipper.pubkey)] == ("rejected", "probation" if overlap else "harmful")
        flags = {s["miner"]: s["flag"] for s in pool.record(2)["submissions"]}
        assert flags[flipper.pubkey] == ("harmful" if overlap else None)
        assert "rejected" in {subs[(r, noisy.pubkey)][0] for r in (1, 2)}  # noise can help, by luck, once
        board = leaderboard(pool)
        worst_honest = min(board[m.pubkey]["score"] for m in honest)
        assert all(board[m.pubkey]["gain_avg"] > 0 for m in honest)
        assert board[flipper.pubkey]["score"] < worst_honest and board[noisy.pubkey]["rounds_refused"] >= 1
        assert board[flipper.pubkey]["refusals"] == ({"harmful": 1} if overlap else {"harmful": 2})
        assert board[flipper.pubkey]["flagged"] == ({"harmful": 1} if overlap else {})
        assert board[flipper.pubkey]["rounds_contributed"] == 1
        assert all(board[m.pubkey]["rounds_contributed"] == 3 for m in honest)
        # As of round 0 everyone had contributed once, and nobody had been refused.
        first = leaderboard(pool, round=0)
        assert all(e["rounds_refused"] == 0 and e["rounds_contributed"] == 1 for e in first.values())
        assert_error(pool.client.get("/v1/leaderboard", params={"round": 3}), 404, "not_found")
        status = pool.client.get("/v1/status").json()
        assert status["leaderboard"][-1]["miner"] == flipper.pubkey
        # one evaluation per round; overlapped rounds also gate the uploads of new miners (records shorter
        # than min_record) on a part of their sample before the version
        evaluations = 6 if overlap else 3
        assert f"gradpool_evaluation_seconds_count {evaluations}.0" in pool.client.get("/metrics").text


def test_a_malformed_upload_counts_against_its_miner(open_pool: OpenPool) -> None:
    with open_pool(rounds={"deadline_s": 1.0}) as pool:  # the round does not wait for the malformed one
        good, bad = pool.miner(), pool.miner()
        assert_error(bad.upload(0, b"not a payload"), 422, "malformed_payload")
        assert good.upload(0, payload(0, 0, seed=1)).status_code == 200
        pool.wait_for_round(0)
        board = leaderboard(pool)
        assert board[bad.pubkey]["refusals"] == {"malformed_payload": 1}
        assert board[bad.pubkey]["rounds_refused"] == 1 and board[bad.pubkey]["score_mean"] == -1 / 3
        assert board[bad.pubkey]["score"] < board[good.pubkey]["score"]  # -1 before the prior is added in
        assert board[good.pubkey]["rounds_contributed"] == 1


def test_payloads_are_served_only_after_their_round_closed(open_pool: OpenPool) -> None:
    with open_pool(rounds={"min_quorum": 2}) as pool:
        a, b = pool.miner(), pool.miner()
        body = payload(0, 0, seed=3)
        assert a.upload(0, body).status_code == 200
        assert_error(pool.client.get(f"/v1/rounds/0/payloads/{a.pubkey}"), 409, "round_open")
        assert pool.client.get("/v1/rounds/0").json()["status"] == "open"
        assert b.upload(0, payload(0, 0, seed=4)).status_code == 200
        pool.wait_for_round(0)
        got = pool.client.get(f"/v1/rounds/0/payloads/{a.pubkey}")
        assert got.status_code == 200 and got.content == body
        assert_error(pool.client.get(f"/v1/rounds/0/payloads/{'cd' * 32}"), 404, "not_found")
        record = pool.client.get("/v1/rounds/0").json()
        assert record["status"] == "closed" and record["version"] == 0
        assert {s["miner"] for s in record["submissions"]} == {a.pubkey, b.pubkey}
        assert_error(pool.client.get("/v1/rounds/7"), 404, "not_found")


def _post_verdicts(pool: Pool, key: Any, round_: int, body: bytes) -> Any:
    path = f"/v1/rounds/{round_}/verdicts"
    return pool.client.post(path, content=body, headers=sign_request(key, "POST", path, body))


def test_verdicts_from_validators(open_pool: OpenPool) -> None:
    trusted, stranger = generate_key(), generate_key()
    with open_pool(validation={"builtin": False, "validators": [public_key_hex(trusted)]}) as pool:
        miner = pool.miner()
        assert miner.upload(0, payload(0, 0, seed=5)).status_code == 200
        verdict = {
            "miner": miner.pubkey,
            "own_before": 3.0,
            "own_after": 2.5,
            "other_before": 3.0,
            "other_after": 2.9,
            "margin_se": 0.4,
        }
        body = json.dumps({"verdicts": [verdict]}).encode()
        assert_error(_post_verdicts(pool, trusted, 0, body), 409, "round_open")
        pool.wait_for_round(0)
        assert leaderboard(pool)[miner.pubkey]["verdicts"] == 0  # no evaluation yet: builtin is off
        assert_error(pool.client.post("/v1/rounds/0/verdicts", content=body), 401, "missing_signature")
        assert_error(_post_verdicts(pool, stranger, 0, body), 403, "not_a_validator")
        assert_error(
            _post_verdicts(pool, trusted, 0, b'{"verdicts": [{"miner": "x"}]}'), 422, "invalid_request"
        )
        assert_error(_post_verdicts(pool, trusted, 9, body), 404, "not_found")
        r = _post_verdicts(pool, trusted, 0, body)
        assert r.status_code == 200 and r.json()["recorded"] == 1
        entry = leaderboard(pool)[miner.pubkey]
        assert entry["verdicts"] == 1
        # One evaluated upload: the round's typical gain is its own (0.5), and its margin 0.4 is one standard
        # error above 0, which backs 1/2 of it; one round against the prior's two at 0 (evaluation.py).
        assert entry["score_mean"] == pytest.approx(1 / 2 / 3) and entry["gain_avg"] == pytest.approx(0.5)
        assert entry["score_stderr"] == pytest.approx(math.sqrt(2 * 0.25) / 3)
        assert entry["score"] == pytest.approx(entry["score_mean"] - entry["score_stderr"])


@pytest.mark.parametrize("method", ["median", "trimmed_mean"])
def test_robust_aggregation(open_pool: OpenPool, method: str) -> None:
    aggregation = {"method": method, "trim_fraction": 0.25}
    with open_pool(aggregation=aggregation, rounds={"min_quorum": 4}) as pool:
        miners = [pool.miner() for _ in range(4)]
        bodies = [payload(0, 0, seed=60 + i) for i in range(4)]
        for m, body in zip(miners, bodies, strict=True):
            assert m.upload(0, body).status_code == 200
        after = pool.latest_after(0)
        codec = SparseLoCoCodec()
        decoded = [codec.decode(b, SPEC)[1] for b in bodies]
        norms = [math.sqrt(sum(float(t.values.double().square().sum()) for t in d.values())) for d in decoded]
        median = sorted(norms)[1] / 2 + sorted(norms)[2] / 2
        offsets, total = {}, 0
        for name, shape in SPEC:
            offsets[name], total = total, total + math.prod(shape)
        coords, values = [], []
        for d, n in zip(decoded, norms, strict=True):
            for name, t in d.items():
                idx = torch.arange(t.values.numel()) if t.indices is None else t.indices
                coords.append(idx + offsets[name])
                values.append(t.values * min(1.0, median / n))
        flat = robust_mean(torch.cat(coords), torch.cat(values), total, method, 0.25)  # type: ignore[arg-type]
        delta = {n: flat[offsets[n] : offsets[n] + math.prod(s)].view(s) for n, s in SPEC}
        scales = [min(1.0, median / n) for n in norms]
        one_of(versions(pool.checkpoint(0), delta, decoded, scales), after["param_hash"])


def test_weighting_by_score_keeps_only_positive_scores(open_pool: OpenPool) -> None:
    """With harmful and low-gain refusals off, only the weighting stands between a sign-flipped update and
    the model: it is refused as low_score, and each honest update counts by its miner's score. Synchronous
    rounds, where a round's results come before its version (test_judged_after.py has the overlapped
    rounds' counterpart: a miner with no score yet is judged on its upload alone)."""
    # enough sequences that an honest margin stands clear of its noise: every honest score is positive
    validation = {
        **EVAL,
        "own_sequences": 64,
        "other_sequences": 64,
        "weight_by_score": True,
        "refuse_harmful": False,
        "min_gain_fraction": 0.0,
    }
    with open_pool(recipe=RECIPE, validation=validation, rounds={"min_quorum": 4, "overlap": False}) as pool:
        honest = [fixed_miner(pool, i) for i in range(3)]
        flipper = fixed_miner(pool, 3)
        bodies = [encode(trained_delta(pool, m.pubkey, 0, 0), 0, 0)[0] for m in honest]
        for m, body in zip(honest, bodies, strict=True):
            assert m.upload(0, body).status_code == 200
        flipped = {n: -t for n, t in trained_delta(pool, flipper.pubkey, 0, 0).items()}
        assert flipper.upload(0, encode(flipped, 0, 0)[0]).status_code == 200
        pool.wait_for_round(0)
        subs = pool.submissions()
        assert subs[(0, flipper.pubkey)] == ("rejected", "low_score")
        assert all(subs[(0, m.pubkey)] == ("accepted", None) for m in honest), subs
        # Once the records differ (the margins stand out of their noise after a round or few), so do the
        # weights: the conservative score, floored so that a short record weighs a little (closer.py).
        r = 0
        while True:
            board = leaderboard(pool)
            scores = [max(MIN_WEIGHT_SCORE, board[m.pubkey]["score"]) for m in honest]
            if max(scores) - min(scores) > 1e-3:
                break
            r += 1
            if r == 5:
                raise AssertionError(f"the weights stayed equal for 5 rounds: {scores}")
            bodies = [encode(trained_delta(pool, m.pubkey, r, r), r, r)[0] for m in honest]
            for m, body in zip(honest, bodies, strict=True):
                assert m.upload(r, body).status_code == 200
            flipped = {n: -t for n, t in trained_delta(pool, flipper.pubkey, r, r).items()}
            assert flipper.upload(r, encode(flipped, r, r)[0]).status_code == 200
            pool.wait_for_round(r)
            assert pool.submissions()[(r, flipper.pubkey)] == ("rejected", "low_score")
        record = pool.client.get(f"/v1/rounds/{r}").json()
        clip = {s["miner"]: s["scale"] for s in record["submissions"]}
        mean = sum(scores) / len(scores)
        codec, acc = SparseLoCoCodec(), FlatAccumulator(SPEC, max_contributors=3)
        for m, body, score in zip(honest, bodies, scores, strict=True):
            acc.add(codec.decode(body, SPEC)[1], clip[m.pubkey] * score / mean)
        expected = pool.checkpoint(r)
        apply_update(expected, acc.mean())
        published = pool.checkpoint(r + 1)
        for name, _ in SPEC:
            assert torch.allclose(published[name], expected[name], rtol=0, atol=1e-7), name


@pytest.mark.parametrize("overlap", [True, False], ids=["overlapped", "synchronous"])
def test_at_most_max_evaluated_uploads_are_evaluated_a_recently_refused_miner_always(
    open_pool: OpenPool, overlap: bool
) -> None:
    """Four uploads, ``max_evaluated = 2``: two are evaluated, the miner refused in the round before is one of
    them, and the others are aggregated on the cheap checks, neither scored nor counted as missed. In
    overlapped rounds that miner is on probation: evaluated, and left out of the version."""
    lenient = {**EVAL, "refuse_harmful": False, "min_gain_fraction": 0.0, "max_evaluated": 2, "min_record": 0}
    with open_pool(
        validation=lenient, rounds={"min_quorum": 3, "deadline_s": 2.0, "overlap": overlap}
    ) as pool:
        miners = [pool.miner() for _ in range(4)]
        assert_error(miners[3].upload(0, b"not a payload"), 422, "malformed_payload")
        for i, m in enumerate(miners[:3]):
            assert m.upload(0, payload(0, 0, seed=10 + i)).status_code == 200
        pool.wait_scored(0)
        for i, m in enumerate(miners):
            assert m.upload(1, payload(1, 1, seed=20 + i)).status_code == 200
        pool.wait_scored(1)  # overlapped rounds: the evaluation of a miner with a record follows the version
        record = pool.record(1)
        evaluated = {s["miner"] for s in record["submissions"] if s["evaluated"]}
        assert len(evaluated) == 2 and miners[3].pubkey in evaluated
        verdicts = {s["miner"]: (s["status"], s["reason"]) for s in record["submissions"]}
        assert verdicts.pop(miners[3].pubkey) == (
            ("rejected", "probation") if overlap else ("accepted", None)
        )
        assert set(verdicts.values()) == {("accepted", None)}
        first = pool.record(0)
        assert sum(s["evaluated"] for s in first["submissions"]) == 2  # of three
        board = leaderboard(pool)
        for m in miners:  # a verdict for each evaluated upload, none for the others; nobody missed a round
            times = sum(
                s["evaluated"] and s["miner"] == m.pubkey for r in (first, record) for s in r["submissions"]
            )
            assert board[m.pubkey]["verdicts"] == times and board[m.pubkey]["rounds_missed"] == 0


def test_a_published_round_without_an_upload_counts_as_missed(open_pool: OpenPool) -> None:
    with open_pool(rounds={"min_quorum": 1, "deadline_s": 1.0}) as pool:
        steady, sometimes, late = pool.miner(), pool.miner(), pool.miner()
        for m, seed in ((steady, 1), (sometimes, 2)):
            assert m.upload(0, payload(0, 0, seed=seed)).status_code == 200
        pool.wait_for_round(0)
        assert steady.upload(1, payload(1, 1, seed=3)).status_code == 200
        assert late.upload(1, payload(1, 1, seed=4)).status_code == 200
        pool.wait_for_round(1)
        board = leaderboard(pool)
        assert board[sometimes.pubkey]["rounds_missed"] == 1  # round 1
        assert board[steady.pubkey]["rounds_missed"] == 0 and board[late.pubkey]["rounds_missed"] == 0
