"""Judging a round's uploads from what intake recorded (coordinator/rounds/checks.py): copies by content or by
sketch, replays of recent rounds, norms; and aggregation streamed one upload at a time."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from coordinator.publishing.aggregation import aggregate_uploads
from coordinator.rounds.checks import (
    Check,
    Harmful,
    History,
    LowGain,
    Phase,
    RoundChecks,
    accepted_overlap,
    default_pipeline,
    run_cheap_checks,
    run_checks,
)
from coordinator.settings import CheckSettings, ValidationSettings
from coordinator.storage.records import Upload
from node.settings import ValidatorSettings
from node.validator import Validator
from protocol.codec import SparseLoCoCodec, content_digest
from protocol.codec.accumulate import aggregate
from protocol.codec.measure import cosine, overlap, sketch, update_norm
from protocol.evaluation import Losses
from protocol.wire import RunInfo
from tests.helpers.pool import SPEC, OpenPool, encode, make_delta, node_client, trained_delta

CODEC = SparseLoCoCodec()
PIPELINE = default_pipeline(CheckSettings(), ValidationSettings())
# without the coordinator's own evaluation, norms are judged in the cheap phase
UNEVALUATED = default_pipeline(CheckSettings(), ValidationSettings(builtin=False))
RATIO = CheckSettings().max_norm_ratio


def upload(miner: str, body: bytes) -> Upload:
    seen = CODEC.examine(body, SPEC)
    return Upload(miner, miner + "-sha", seen.content_sha256, seen.norm, seen.sketch, kept=seen.kept)


def bodies(*seeds: int, scale: float = 1e-3) -> list[bytes]:
    return [encode(make_delta(s, scale), 0, 0)[0] for s in seeds]


def judge(
    uploads: list[Upload], history: History | None = None, pipeline: list[Check] = UNEVALUATED
) -> tuple[dict[str, str], dict[str, float]]:
    """The cheap checks' refusals, and the version's clip scale of each upload they left."""
    j = RoundChecks(0, uploads, history or History())
    _, scales = run_cheap_checks(pipeline, j, RATIO)
    j.reclip(scales)
    return j.refused, scales


def test_independent_updates_are_far_from_parallel_and_all_accepted() -> None:
    uploads = [upload(f"m{i}", b) for i, b in enumerate(bodies(1, 2, 3, 4))]
    assert max(abs(cosine(a.sketch, b.sketch)) for a in uploads for b in uploads if a is not b) < 0.2
    refused, scales = judge(uploads)
    assert refused == {}
    assert list(scales) == ["m0", "m1", "m2", "m3"]


def test_a_rescaled_copy_is_refused_as_a_copy_even_though_its_bytes_differ() -> None:
    honest = encode(make_delta(5), 0, 0)[0]
    doubled = encode({n: t * 2 for n, t in make_delta(5).items()}, 0, 0)[0]
    a, b, c = upload("a", honest), upload("b", doubled), upload("c", bodies(6)[0])
    assert a.content_sha256 != b.content_sha256 and cosine(a.sketch, b.sketch) > 0.98
    refused, scales = judge([a, b, c])
    assert refused == {"b": "copied_payload"}
    assert list(scales) == ["a", "c"]


def test_an_update_re_encoded_with_noise_from_another_key_is_refused_as_a_near_copy() -> None:
    """One computation uploaded twice: the second with noise (a quarter of its norm) and its own error
    feedback's residual. Neither its bytes nor its sketch give it away; the coordinates it keeps do."""
    work = make_delta(5)
    residual = {n: 0.5 * t for n, t in make_delta(9).items()}  # the second key's error feedback
    noisy = {n: t + 0.25 * t.norm() * torch.randn_like(t) / t.numel() ** 0.5 for n, t in work.items()}
    again = {n: t + residual[n] for n, t in noisy.items()}
    a, b = upload("a", encode(work, 0, 0)[0]), upload("b", encode(again, 0, 0)[0])
    others = [upload(f"m{i}", body) for i, body in enumerate(bodies(1, 2, 3))]
    assert cosine(a.sketch, b.sketch) < 0.98  # no copy by its sketch
    assert overlap(a.kept, b.kept) > 3 * max(overlap(a.kept, o.kept) for o in others)
    shown = History(overlap=accepted_overlap([[dataclasses.replace(u, status="accepted") for u in others]]))
    refused, _ = judge([others[0], a, others[1], b, others[2]], shown)
    assert refused == {"b": "near_copy"}
    refused, _ = judge([b, *others, a], shown)  # the later one is the copy, whichever it is
    assert refused == {"a": "near_copy"}
    assert judge([others[0], a, others[1], b, others[2]])[0] == {}  # no record yet: no near-copy


def test_uploads_that_keep_unrelated_coordinates_cannot_make_honest_ones_look_alike() -> None:
    """Honest updates share structure (a common part) and so overlap more than chance; a crowd of noise
    uploads overlaps nothing and would pull the round's median to chance, but that median is never the
    reference alone: before the run has a record nothing is a near-copy, and after, the overlap of the
    recent uploads shown to help is the floor. The noise's own record (accepted, then flagged by its
    evaluation) does not count. No honest upload is taken for a copy."""
    common = make_delta(40)
    honest = [
        upload(f"h{i}", encode({n: 2 * common[n] + d for n, d in make_delta(41 + i).items()}, 0, 0)[0])
        for i in range(3)
    ]
    noise = [upload(f"n{i}", body) for i, body in enumerate(bodies(50, 51, 52, 53, 54, 55))]
    shown = accepted_overlap([[dataclasses.replace(u, status="accepted") for u in honest]])
    assert shown > 3 * max(overlap(honest[0].kept, n.kept) for n in noise)
    for history in (History(), History(overlap=shown)):
        refused, _ = judge([*noise, *honest], history)
        assert not {m for m, why in refused.items() if why == "near_copy"}
    record = [
        *(dataclasses.replace(u, status="accepted", evaluated=True) for u in honest),
        *(dataclasses.replace(u, status="accepted", evaluated=True, flag="low_gain") for u in noise),
    ]
    assert accepted_overlap([record]) == shown  # flagged after their evaluation: not shown to help


def test_outliers_zero_and_non_finite_norms_are_refused_and_the_rest_clipped_to_the_median() -> None:
    ups = [upload(f"m{i}", b) for i, b in enumerate(bodies(1, 2, 3))]
    big = upload("big", bodies(9, scale=1e-1)[0])
    zero = Upload("zero", "z", "z", 0.0, torch.zeros(1024))
    nan = Upload("nan", "n", "n", float("nan"), torch.zeros(1024))
    refused, scales = judge([*ups, big, zero, nan])
    assert refused == {"big": "norm_outlier", "zero": "empty_update", "nan": "non_finite"}
    assert all(0 < s <= 1 for s in scales.values()) and sum(s == 1 for s in scales.values()) >= 2


def _low_gain(gains: dict[str, float], past: tuple[float, ...]) -> list[str]:
    j = RoundChecks(5, [], History(gains=past))
    j.losses = {m: Losses(3.0, 3.0 - g, 3.0, 3.0 - g) for m, g in gains.items()}
    return sorted(LowGain(0.35).refuse(j))


def test_uploads_refused_after_the_cheap_phase_no_longer_pull_the_reference_norm() -> None:
    # the first round (no history), 4 honest updates and 4 freeriders' (x1e-4): no reference exists yet, so
    # every upload is measured as it came; the median of all 8 would clip every honest update to about
    # half, but once the freeriders are refused the version clips the honest ones as in a round without them
    honest = [upload(f"h{i}", b) for i, b in enumerate(bodies(1, 2, 3, 4))]
    tiny = [upload(f"f{i}", b) for i, b in enumerate(bodies(5, 6, 7, 8, scale=1e-7))]
    j = RoundChecks(0, [*honest, *tiny])
    ref, scales = run_cheap_checks(PIPELINE, j, RATIO)
    assert j.refused == {} and ref is None and set(scales.values()) == {1.0}
    alone = RoundChecks(0, honest)
    _, alone_scales = run_cheap_checks(PIPELINE, alone, RATIO)
    alone_ref = alone.reclip(alone_scales)
    j.refused.update({u.miner: "low_gain" for u in tiny})
    assert j.reclip(scales) == alone_ref
    assert {m: scales[m] for m in alone_scales} == alone_scales
    assert all(scales[u.miner] == 1.0 for u in tiny)  # below the reference: never scaled up


def test_low_gain_follows_this_rounds_gains_and_history_only_bounds_it_from_below() -> None:
    """Gains shrink as the loss falls: a round whose honest gains are a fifth of the last rounds' is taken
    whole, and the one upload far below the round's own median is refused; a round of useless uploads
    cannot lower the bar below a quarter of what recent rounds gained."""
    past = (0.5, 0.45, 0.4, 0.3, 0.32, 0.28)
    assert _low_gain({"a": 0.08, "b": 0.07, "c": 0.09}, past) == []
    assert _low_gain({"a": 0.08, "b": 0.07, "c": 0.09, "lazy": 0.02}, past) == ["lazy"]
    assert _low_gain({"f1": 1e-5, "f2": 2e-5, "f3": 1.5e-5}, past) == ["f1", "f2", "f3"]
    assert _low_gain({"alone": 0.05}, past) == []  # one upload: only the floor bars it (0.35 x 0.25 x 0.36)
    assert _low_gain({"alone": 0.02}, past) == ["alone"]
    assert _low_gain({"a": 0.08, "b": 0.01}, ()) == ["b"]  # the first round: its own median


def _evaluated(
    uploads: list[Upload], gains: dict[str, float], history: History | None = None
) -> tuple[dict[str, str], float | None, dict[str, float]]:
    """A round judged as the coordinator judges it: the cheap phase, an evaluation that measured ``gains``,
    the evaluated checks; the refusals, the version's reference norm and its scales."""
    j = RoundChecks(5, uploads, history or History())
    _, scales = run_cheap_checks(PIPELINE, j, RATIO)
    j.losses = {m: Losses(3.0, 3.0 - g, 3.0, 3.0 - g) for m, g in gains.items() if m not in j.refused}
    run_checks(PIPELINE, "evaluated", j)
    return j.refused, j.reclip(scales), scales


def test_no_number_of_new_keys_sending_almost_nothing_moves_a_reference() -> None:
    """Evidence, not head count: 3 honest updates beside 4, then 40, freeriders' (x1e-4) in the first round
    (no history). Nobody is a norm outlier, every freerider is refused as low_gain, and the version clips
    the honest updates exactly as it would in a round without them."""
    honest = [upload(f"h{i}", b) for i, b in enumerate(bodies(1, 2, 3))]
    gains = {"h0": 0.08, "h1": 0.06, "h2": 0.09}
    alone, alone_ref, alone_scales = _evaluated(honest, gains)
    assert alone == {}
    for crowd in (4, 40):
        riders = [upload(f"f{i}", b) for i, b in enumerate(bodies(*range(10, 10 + crowd), scale=1e-7))]
        refused, ref, scales = _evaluated([*honest, *riders], gains | {u.miner: 1e-6 for u in riders})
        assert refused == {u.miner: "low_gain" for u in riders}
        assert ref == alone_ref and {m: scales[m] for m in alone_scales} == alone_scales


def test_a_norm_outlier_whose_own_update_is_among_the_best_is_kept() -> None:
    """Against recent rounds' accepted norms, which no upload of this round sets: an outlier measured as it
    came is kept when its gain is among the round's best (every miner's norm grew), refused when it
    overshoots (a rescaled update) or was not evaluated."""
    history = History(norms=[0.1] * 8)
    grown = [Upload(f"g{i}", f"g{i}", f"g{i}", 0.2 * RATIO, torch.randn(1024)) for i in range(3)]
    scaled = Upload("x100", "x", "x", 10.0 * RATIO, torch.randn(1024))
    unseen = Upload("unseen", "u", "u", 10.0 * RATIO, torch.randn(1024))
    j = RoundChecks(5, [*grown, scaled, unseen], history)
    assert j.norm_suspects(RATIO) == {"g0", "g1", "g2", "x100", "unseen"}
    _, scales = run_cheap_checks(PIPELINE, j, RATIO)
    assert set(scales.values()) == {1.0}  # suspects are measured as they came
    refused, ref, scales = _evaluated(
        [*grown, scaled, unseen], {"g0": 0.08, "g1": 0.07, "g2": 0.09, "x100": -2.0}, history
    )
    assert refused == {"x100": "norm_outlier", "unseen": "norm_outlier"}
    assert ref is not None and 0.1 <= ref <= 0.2 * RATIO and all(scales[g.miner] <= 1.0 for g in grown)


def test_a_flag_needs_a_gain_surely_below_the_bar_while_a_refusal_takes_the_measured_one() -> None:
    """Before the version (``sure`` 0) the measured gain decides; a flag after it (``sure`` 2) only a gain
    two standard errors below the bar: an honest upload's unlucky sample does not mean probation."""
    gains = {"a": 0.08, "b": 0.07, "c": 0.09, "unlucky": -0.01, "flipped": -0.08, "weak": 0.02, "rider": 1e-6}
    se = {"a": 0.02, "b": 0.02, "c": 0.02, "unlucky": 0.02, "flipped": 0.02, "weak": 0.01, "rider": 1e-7}

    def refused(sure: float) -> list[str]:
        j = RoundChecks(5, [], gain_se=se, sure=sure)
        j.losses = {m: Losses(3.0, 3.0 - g, 3.0, 3.0 - g) for m, g in gains.items()}
        run_checks([Harmful(), LowGain(0.35)], "evaluated", j)
        return sorted(j.refused.items())

    assert refused(0.0) == [
        ("flipped", "harmful"),
        ("rider", "low_gain"),
        ("unlucky", "harmful"),
        ("weak", "low_gain"),
    ]
    assert refused(2.0) == [("flipped", "harmful"), ("rider", "low_gain")]


def test_streamed_aggregation_equals_aggregating_everything_at_once() -> None:
    raw = bodies(1, 2, 3, scale=1e-3) + bodies(4, scale=3e-3)
    ups = [upload(f"m{i}", b) for i, b in enumerate(raw)]
    stored = {u.miner: (b, CODEC.examine(b, SPEC).stored) for u, b in zip(ups, raw, strict=True)}
    _, scales = judge(ups)
    streamed = aggregate_uploads([(u, scales[u.miner]) for u in ups], lambda u: stored[u.miner], CODEC, SPEC)
    at_once = aggregate([CODEC.decode(b, SPEC)[1] for b in raw], SPEC)
    for name, _ in SPEC:
        assert torch.allclose(streamed[name], at_once[name], rtol=1e-6, atol=1e-9)


def test_intake_examines_a_payload_in_one_decode_with_the_same_norm_and_sketch() -> None:
    body = bodies(11)[0]
    seen = CODEC.examine(body, SPEC)
    _, update = CODEC.decode(body, SPEC)
    assert abs(seen.norm - update_norm(update)) < 1e-6 * seen.norm
    assert torch.allclose(seen.sketch, sketch(update, SPEC), rtol=1e-5, atol=1e-9)
    assert seen.content_sha256 == content_digest(body) and seen.stored != body


# -- adding a check ------------------------------------------------------------------------------------------
def test_a_new_check_is_one_class_and_one_line_and_validators_honour_it(
    open_pool: OpenPool, tmp_path: Path
) -> None:
    """Two checks of a test's own, one of each phase, each refusing one miner: the refusals are in the
    audit, and a validator evaluates exactly the uploads the coordinator evaluated."""
    refuse: dict[str, str] = {}

    @dataclass(frozen=True)
    class Dummy:
        code: str
        phase: Phase

        def refuse(self, j: RoundChecks) -> Iterable[str]:
            return [u.miner for u in j.remaining() if refuse.get(u.miner) == self.code]

    settings = ValidationSettings(own_sequences=16, other_sequences=16, min_gain_fraction=0.0)
    pipeline = [
        *default_pipeline(CheckSettings(), settings),
        Dummy("dummy_cheap", "cheap"),
        Dummy("dummy_evaluated", "evaluated"),
    ]
    validation = {"builtin": True, "own_sequences": 16, "other_sequences": 16, "min_gain_fraction": 0.0}
    recipe = {"inner_steps": 2, "batch_size": 8, "warmup_steps": 0, "lr": 3e-3}
    with open_pool(
        app={"checks": pipeline}, validation=validation, recipe=recipe, rounds={"min_quorum": 3}
    ) as pool:
        a, b, c = (pool.miner() for _ in range(3))
        refuse.update({a.pubkey: "dummy_cheap", b.pubkey: "dummy_evaluated"})
        for m in (a, b, c):
            assert m.upload(0, encode(trained_delta(pool, m.pubkey, 0, 0), 0, 0)[0]).status_code == 200
        pool.wait_for_round(0)
        audit = {r["miner"]: (r["status"], r["reason"]) for r in pool.client.get("/v1/rounds/0/audit").json()}
        assert audit == {
            a.pubkey: ("rejected", "dummy_cheap"),
            b.pubkey: ("rejected", "dummy_evaluated"),
            c.pubkey: ("accepted", None),
        }
        client = node_client(pool)
        info = RunInfo.model_validate(pool.client.get("/v1/info").json())
        validator = Validator(
            ValidatorSettings(state_dir=tmp_path / "v", device="cpu"), client, info, threading.Event()
        )
        verdicts = validator.validate_round(0)
    assert set(verdicts) == {b.pubkey, c.pubkey}
