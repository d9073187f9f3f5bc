"""No hostile upload poisons the model or stops the network: finite-but-huge value tables, hostile majorities
in a round, replays across rounds, and versions that would raise the held-out loss."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from safetensors.torch import load as st_load

from protocol.codec import SparseLoCoCodec
from protocol.codec.accumulate import aggregate
from protocol.codec.measure import cosine
from protocol.params import apply_update, params_hash
from tests.helpers.pool import (
    EVAL,
    RECIPE,
    SPEC,
    Miner,
    OpenPool,
    Pool,
    encode,
    fixed_miner,
    make_delta,
    payload,
    reframe,
    scaled_table,
    trained_delta,
)

FP32_MAX = float(torch.finfo(torch.float32).max)


def honest(pool: Pool, m: Miner, round_: int, version: int) -> bytes:
    return encode(trained_delta(pool, m.pubkey, round_, version), round_, version)[0]


def near_limit(body: bytes) -> bytes:
    """The payload with its value tables scaled so that the largest entry is half the float32 maximum."""
    return scaled_table(body, FP32_MAX / 2 / float(st_load(body)["lut"].abs().max()))


def record(pool: Pool, round_: int) -> dict[str, Any]:
    r = pool.client.get(f"/v1/rounds/{round_}")
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


def reasons(pool: Pool, round_: int) -> dict[str, str | None]:
    return {s["miner"]: s["reason"] for s in record(pool, round_)["submissions"]}


def versions(pool: Pool) -> list[dict[str, Any]]:
    out, v = [], 0
    while (r := pool.client.get(f"/v1/versions/{v}")).status_code == 200:
        out.append(r.json())
        v += 1
    return out


def only(pool: Pool, base_version: int, bodies: list[bytes], round_: int) -> str:
    """The parameter hash of the base version plus exactly these payloads, clipped to the round's reference
    norm."""
    codec = SparseLoCoCodec()
    params = pool.checkpoint(base_version)
    ref = record(pool, round_)["reference_norm"]
    apply_update(params, aggregate([codec.decode(b, SPEC)[1] for b in bodies], SPEC, reference=ref))
    return params_hash(params, SPEC)


def assert_every_version_finite(pool: Pool) -> None:
    for v in versions(pool):
        assert v["eval_loss"] is not None and math.isfinite(v["eval_loss"]), v
        assert all(bool(torch.isfinite(t).all()) for t in pool.checkpoint(v["version"]).values()), v


def test_colluding_value_tables_x1e30_beside_an_honest_upload_are_refused(open_pool: OpenPool) -> None:
    """Three uploads whose value tables are x1e30 (finite, well formed) outnumber one honest upload in the
    first round, so they are the round's median norm: their evaluation's loss is not finite, and the
    version is made of the honest upload alone."""
    with open_pool(recipe=RECIPE, validation=EVAL, rounds={"min_quorum": 4}, admin_token="t") as pool:
        good, *bad = (fixed_miner(pool, i) for i in range(4))
        body = honest(pool, good, 0, 0)
        assert good.upload(0, body).status_code == 200
        for m in bad:
            assert m.upload(0, scaled_table(honest(pool, m, 0, 0), 1e30)).status_code == 200
        after = pool.latest_after(0)
        assert reasons(pool, 0) == {good.pubkey: None, **{m.pubkey: "non_finite_loss" for m in bad}}
        assert after["version"] == 1 and after["param_hash"] == only(pool, 0, [body], 0)
        assert_every_version_finite(pool)
        # The network goes on: the honest miner's next update is taken and published.
        assert good.upload(1, honest(pool, good, 1, 1)).status_code == 200
        assert (
            pool.client.post("/v1/admin/close-round", headers={"Authorization": "Bearer t"}).status_code
            == 200
        )
        assert pool.latest_after(1, timeout_s=60)["version"] == 2
        assert_every_version_finite(pool)


def test_a_lone_x1e30_upload_beside_one_honest_upload_does_not_stop_the_round(open_pool: OpenPool) -> None:
    """Two uploads: too few for a norm outlier. The x1e30 one makes the evaluation's loss NaN, which is a
    refusal, not an exception that leaves the round open for ever."""
    with open_pool(recipe=RECIPE, validation=EVAL, rounds={"min_quorum": 2}) as pool:
        good, bad = fixed_miner(pool, 0), fixed_miner(pool, 1)
        body = honest(pool, good, 0, 0)
        assert good.upload(0, body).status_code == 200
        assert bad.upload(0, scaled_table(honest(pool, bad, 0, 0), 1e30)).status_code == 200
        after = pool.latest_after(0, timeout_s=60)
        assert reasons(pool, 0) == {good.pubkey: None, bad.pubkey: "non_finite_loss"}
        assert after["param_hash"] == only(pool, 0, [body], 0)
        board = {e["miner"]: e for e in pool.client.get("/v1/leaderboard").json()["miners"]}
        assert board[bad.pubkey]["refusals"] == {"non_finite_loss": 1}
        assert board[bad.pubkey]["score_mean"] == -1 / 3  # -1, shrunk by the prior
        assert board[bad.pubkey]["score"] < board[good.pubkey]["score"]


def test_a_hostile_minority_of_the_recent_uploads_cannot_move_the_reference_norm(open_pool: OpenPool) -> None:
    """After an honest round, a round of one honest upload and two x1e30 ones: the reference norm is the
    median of this round's and the last round's accepted norms, so the two are norm outliers."""
    validation = {"builtin": False}
    with open_pool(validation=validation, rounds={"min_quorum": 3}) as pool:
        miners = [fixed_miner(pool, i) for i in range(3)]
        first = [payload(0, 0, seed=10 + i) for i in range(3)]
        for m, body in zip(miners, first, strict=True):
            assert m.upload(0, body).status_code == 200
        assert pool.latest_after(0)["version"] == 1
        good = payload(1, 1, seed=20)
        assert miners[0].upload(1, good).status_code == 200
        for i, m in enumerate(miners[1:]):
            assert m.upload(1, scaled_table(payload(1, 1, seed=30 + i), 1e30)).status_code == 200
        after = pool.latest_after(1)
        assert list(reasons(pool, 1).values()) == [None, "norm_outlier", "norm_outlier"]
        assert after["param_hash"] == only(pool, 1, [good], 1)


def test_a_round_of_hostile_uploads_only_publishes_nothing(open_pool: OpenPool) -> None:
    with open_pool(recipe=RECIPE, validation=EVAL, rounds={"min_quorum": 6}) as pool:
        miners = [fixed_miner(pool, i) for i in range(6)]
        for m in miners:
            assert m.upload(0, honest(pool, m, 0, 0)).status_code == 200
        start = pool.latest_after(0)
        deltas = [trained_delta(pool, m.pubkey, 1, 1) for m in miners]
        hostile = [
            encode({n: -t for n, t in deltas[0].items()}, 1, 1)[0],  # sign-flipped
            encode({n: 100 * t for n, t in deltas[1].items()}, 1, 1)[0],  # x100
            scaled_table(encode(deltas[2], 1, 1)[0], 1e30),  # value table x1e30
            near_limit(encode(deltas[3], 1, 1)[0]),  # value table near the float32 limit
            encode({n: torch.zeros(s) for n, s in SPEC}, 1, 1)[0],  # all zero
        ]
        hostile.append(reframe(hostile[0], header={"stats": {"compute_s": 3.0}}))  # a copy
        for m, body in zip(miners, hostile, strict=True):
            assert m.upload(1, body).status_code == 200
        after = pool.latest_after(1)
        assert (after["version"], after["param_hash"]) == (start["version"], start["param_hash"])
        assert list(reasons(pool, 1).values()) == [
            "harmful",
            "norm_outlier",
            "norm_outlier",
            "norm_outlier",
            "empty_update",
            "copied_payload",
        ]
        assert_every_version_finite(pool)


def test_a_x1e30_copy_has_the_sketch_of_its_original_and_is_refused(open_pool: OpenPool) -> None:
    codec = SparseLoCoCodec()
    body = payload(0, 0, seed=5)
    huge = scaled_table(body, 1e30)
    a, b = codec.examine(body, SPEC), codec.examine(huge, SPEC)
    assert math.isfinite(b.norm) and bool(torch.isfinite(b.sketch).all())
    assert cosine(a.sketch, b.sketch) > 0.999
    with open_pool(validation={"builtin": False}, rounds={"min_quorum": 2}) as pool:
        author, copier = pool.miner(), pool.miner()
        assert author.upload(0, body).status_code == 200
        assert copier.upload(0, huge).status_code == 200
        pool.wait_for_round(0)
        assert reasons(pool, 0) == {author.pubkey: None, copier.pubkey: "copied_payload"}


@pytest.mark.parametrize("rescale", [1.0, 2.0], ids=["same", "x2"])
def test_an_update_of_an_earlier_round_replayed_by_another_key_is_refused(
    open_pool: OpenPool, rescale: float
) -> None:
    with open_pool(validation={"builtin": False}, rounds={"deadline_s": 1.0}) as pool:  # the author is silent
        author = pool.miner()
        delta = make_delta(7)
        assert author.upload(0, encode(delta, 0, 0)[0]).status_code == 200
        start = pool.latest_after(0)
        stranger = pool.miner()  # a new key, the only uploader of round 1
        replay = encode({n: t * rescale for n, t in delta.items()}, 1, 1)[0]
        assert stranger.upload(1, replay).status_code == 200
        after = pool.latest_after(1)
        assert reasons(pool, 1) == {stranger.pubkey: "replayed_update"}
        assert (after["version"], after["param_hash"]) == (start["version"], start["param_hash"])


def test_a_version_that_would_raise_the_held_out_loss_is_not_published(open_pool: OpenPool) -> None:
    """Without the evaluation (validators only) nothing but the guard stands between a wild update and the
    model: the round closes without a version, with the reason recorded."""
    checks = {"max_loss_increase": 0.05}
    with open_pool(validation={"builtin": False}, checks=checks) as pool:
        start = pool.round()
        wild = pool.miner()
        assert wild.upload(0, payload(0, 0, seed=3, scale=0.5)).status_code == 200
        after = pool.latest_after(0)
        assert (after["version"], after["param_hash"]) == (0, start["param_hash"])
        assert reasons(pool, 0) == {wild.pubkey: "loss_guard"}
        rec = record(pool, 0)
        assert rec["close_reason"].startswith("loss_guard: the held-out loss would rise")
        report = pool.client.get("/v1/status").json()["rounds"][0]
        assert report["close_reason"] == rec["close_reason"] and report["eval_loss"] is None


def test_the_guard_builds_again_without_the_suspect_uploads(open_pool: OpenPool) -> None:
    """Without the evaluation, two x1e30 uploads beside an honest one are the median of a first round: the
    version they make is not finite, so it is built again without the largest norms."""
    with open_pool(validation={"builtin": False}, rounds={"min_quorum": 3}) as pool:
        good, *bad = (pool.miner() for _ in range(3))
        body = payload(0, 0, seed=1)
        assert good.upload(0, body).status_code == 200
        for i, m in enumerate(bad):
            assert m.upload(0, scaled_table(payload(0, 0, seed=2 + i), 1e30)).status_code == 200
        after = pool.latest_after(0)
        assert reasons(pool, 0) == {good.pubkey: None, **{m.pubkey: "loss_guard" for m in bad}}
        assert after["version"] == 1
        assert_every_version_finite(pool)
