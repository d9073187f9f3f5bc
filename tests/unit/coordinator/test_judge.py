"""Judging a round's uploads from what intake recorded: copies by content or by sketch, norms."""

from __future__ import annotations

import torch
from pool_harness import SPEC, encode, make_delta

from coordinator.judge import Upload, aggregate_uploads, judge
from protocol.aggregate import aggregate, cosine, sketch, update_norm
from protocol.codec import SparseLoCoCodec, content_digest

CODEC = SparseLoCoCodec()


def upload(miner: str, body: bytes) -> Upload:
    _, update = CODEC.decode(body, SPEC)
    return Upload(miner, miner + "-sha", content_digest(body), update_norm(update), sketch(update, SPEC))


def bodies(*seeds: int, scale: float = 1e-3) -> list[bytes]:
    return [encode(make_delta(s, scale), 0, 0)[0] for s in seeds]


def test_independent_updates_are_far_from_parallel_and_all_accepted() -> None:
    uploads = [upload(f"m{i}", b) for i, b in enumerate(bodies(1, 2, 3, 4))]
    assert max(abs(cosine(a.sketch, b.sketch)) for a in uploads for b in uploads if a is not b) < 0.2
    verdicts, accepted = judge(uploads)
    assert verdicts == {"m0": None, "m1": None, "m2": None, "m3": None}
    assert [u.miner for u, _ in accepted] == ["m0", "m1", "m2", "m3"]


def test_a_rescaled_copy_is_refused_as_a_copy_even_though_its_bytes_differ() -> None:
    honest = encode(make_delta(5), 0, 0)[0]
    doubled = encode({n: t * 2 for n, t in make_delta(5).items()}, 0, 0)[0]
    a, b, c = upload("a", honest), upload("b", doubled), upload("c", bodies(6)[0])
    assert a.content_sha256 != b.content_sha256 and cosine(a.sketch, b.sketch) > 0.98
    verdicts, accepted = judge([a, b, c])
    assert verdicts == {"a": None, "b": "copied_payload", "c": None}
    assert [u.miner for u, _ in accepted] == ["a", "c"]


def test_outliers_zero_and_non_finite_norms_are_refused_and_the_rest_clipped_to_the_median() -> None:
    ups = [upload(f"m{i}", b) for i, b in enumerate(bodies(1, 2, 3))]
    big = upload("big", bodies(9, scale=1e-1)[0])
    zero = Upload("zero", "z", "z", 0.0, torch.zeros(1024))
    nan = Upload("nan", "n", "n", float("nan"), torch.zeros(1024))
    verdicts, accepted = judge([*ups, big, zero, nan])
    assert verdicts["big"] == "norm_outlier" and verdicts["zero"] == "empty_update"
    assert verdicts["nan"] == "non_finite"
    assert all(0 < scale <= 1 for _, scale in accepted) and sum(scale == 1 for _, scale in accepted) >= 2


def test_streamed_aggregation_equals_aggregating_everything_at_once() -> None:
    raw = bodies(1, 2, 3, scale=1e-3) + bodies(4, scale=3e-3)
    ups = [upload(f"m{i}", b) for i, b in enumerate(raw)]
    blobs = {u.sha256: b for u, b in zip(ups, raw, strict=True)}
    _, accepted = judge(ups)
    streamed = aggregate_uploads(accepted, blobs.__getitem__, CODEC, SPEC)
    at_once = aggregate([CODEC.decode(b, SPEC)[1] for b in raw], SPEC)
    for name, _ in SPEC:
        assert torch.allclose(streamed[name], at_once[name], rtol=1e-6, atol=1e-9)


def test_intake_examines_a_payload_in_one_decode_with_the_same_norm_and_sketch() -> None:
    from coordinator.judge import examine

    body = bodies(11)[0]
    seen = examine(body, CODEC, SPEC)
    _, update = CODEC.decode(body, SPEC)
    assert abs(seen.norm - update_norm(update)) < 1e-6 * seen.norm
    assert torch.allclose(seen.sketch, sketch(update, SPEC), rtol=1e-5, atol=1e-9)
    assert seen.content_sha256 == content_digest(body) and seen.unpacked is not None
