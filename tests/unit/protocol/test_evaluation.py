"""The evaluation every validator runs: samples, losses before and after one update, and the scores."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest
import torch

from coordinator.data.corpus import build_dataset
from protocol.data import Dataset, assignment
from protocol.evaluation import (
    PRIOR_ROUNDS,
    PRIOR_SD,
    Losses,
    RoundResult,
    UpdateEvaluator,
    Z,
    credit,
    missed,
    other_sample,
    own_sample,
    refused,
    round_results,
    round_salt,
    samples,
    standing,
)
from protocol.model import build_model, evaluate_loss, resolve
from protocol.params import get_params, param_spec, params_hash, set_params
from protocol.payload import SparseTensor
from protocol.wire import CodecConfig, EvaluationConfig, RunInfo, TrainingRecipe

MINER = "ab" * 32


@pytest.fixture(scope="module")
def dataset(corpus_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    root = tmp_path_factory.mktemp("data")
    build_dataset(root, corpus_file, seq_len=128, eval_every=20)
    return Dataset(root)


def test_salt_depends_on_every_payload_and_not_their_order() -> None:
    assert round_salt(["a", "b", "c"]) == round_salt(["c", "a", "b"])
    assert round_salt(["a", "b", "c"]) != round_salt(["a", "b"])


def test_samples_are_drawn_from_the_right_sequences(dataset: Dataset) -> None:
    n, e = dataset.meta.num_sequences, dataset.meta.eval_every
    assigned = assignment(0, 3, MINER, 80, n, e)
    own = own_sample(assigned, "salt", MINER, 32)
    other = other_sample(assigned, "salt", 32, n, e)
    assert len(set(own)) == 32 and set(own) <= set(assigned)
    assert own == own_sample(assigned, "salt", MINER, 32)
    assert own != own_sample(assigned, "another salt", MINER, 32)
    assert len(set(other)) == 32 and not set(other) & set(assigned)
    assert not any(dataset.is_held_out(i) for i in other)
    assert own_sample(assigned, "salt", MINER, 1000) == own_sample(
        assigned, "salt", MINER, len(set(assigned))
    )


def test_the_first_rounds_draw_early_factor_times_the_sequences(dataset: Dataset) -> None:
    """Early in a run an honest margin stands least out of its noise: the first ``early_rounds`` rounds are
    evaluated on ``early_factor`` times the samples, and a validator reading the run's info draws the same."""
    evaluation = EvaluationConfig(own_sequences=20, other_sequences=12, early_rounds=2, early_factor=3)
    info = RunInfo(
        run_id="early",
        seed=0,
        model="tiny",
        architecture=resolve("tiny", 256),
        tokenizer_sha256="0" * 64,
        seq_len=128,
        num_sequences=dataset.meta.num_sequences,
        eval_every=dataset.meta.eval_every,
        codec=CodecConfig(),
        recipe=TrainingRecipe(inner_steps=10, batch_size=8),
        max_payload_bytes=1 << 20,
        max_catchup_versions=8,
        evaluation=evaluation,
    )
    sizes = {r: tuple(map(len, samples(info, r, MINER, "salt"))) for r in range(4)}
    assert sizes == {0: (60, 36), 1: (60, 36), 2: (20, 12), 3: (20, 12)}
    own, other = samples(info, 1, MINER, "salt")
    assert set(own) <= set(assignment(0, 1, MINER, 80, info.num_sequences, info.eval_every))
    assert not set(own) & set(other)
    flat = info.model_copy(update={"evaluation": evaluation.model_copy(update={"early_factor": 1})})
    assert samples(flat, 1, MINER, "salt") == (own[:20], other[:12])  # the usual sample, and more of it
    with pytest.raises(ValueError, match="early_factor"):
        EvaluationConfig(early_factor=0)


def _steps(model: torch.nn.Module, tokens: torch.Tensor, steps: int) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(steps):
        model.loss(tokens[(step * 8) % len(tokens) :][:8]).backward()  # type: ignore[operator]
        opt.step()
        opt.zero_grad()


Trained = tuple[list[int], dict[str, torch.Tensor], dict[str, SparseTensor]]


@pytest.fixture(scope="module")
def trained(dataset: Dataset) -> Trained:
    """A miner's assigned sequences, base parameters (past the first steps from the random start, as in any
    round but the first) and the update (base - trained) after AdamW steps on those sequences."""
    assigned = assignment(0, 0, MINER, 64, dataset.meta.num_sequences, dataset.meta.eval_every)
    model = build_model("tiny", seed=1)
    _steps(model, dataset.sequences(list(range(1000, 1400))), 25)
    base = get_params(model)
    _steps(model, dataset.sequences(assigned), 15)
    after = get_params(model)
    return assigned, base, {n: SparseTensor(None, (base[n] - after[n]).reshape(-1)) for n in base}


def test_bf16_evaluation_measures_what_fp32_does_and_restores_the_base_exactly(
    dataset: Dataset, trained: Trained
) -> None:
    """Forward passes under bf16 autocast (on the CPU here; CUDA's default) give the losses fp32 gives, to
    within bf16's precision, whatever the batch size; the touched coordinates of a sparse update are put
    back bit for bit."""
    n, e = dataset.meta.num_sequences, dataset.meta.eval_every
    assigned, base, dense = trained
    update = {}
    for name, t in dense.items():  # the largest tenth of each tensor's coordinates, as top-k keeps
        k = max(1, t.values.numel() // 10)
        idx = t.values.abs().topk(k).indices.sort().values
        update[name] = SparseTensor(idx, t.values[idx])
    own, other = own_sample(assigned, "s", MINER, 16), other_sample(assigned, "s", 16, n, e)
    model = build_model("tiny")
    exact = UpdateEvaluator(model, base, dataset.sequences).evaluate(update, 1.0, own, other)
    assert exact.gain > 0
    for batch_size in (3,):  # 3 divides neither sample: a short last batch too
        evaluator = UpdateEvaluator(model, base, dataset.sequences, batch_size, torch.bfloat16)
        losses = evaluator.evaluate(update, 1.0, own, other)
        for got, want in zip(losses.astuple()[:4], exact.astuple()[:4], strict=True):
            assert got == pytest.approx(want, rel=2e-2)
        assert all(torch.equal(p, base[name]) for name, p in model.named_parameters())
    held_out = dataset.sequences(other)
    set_params(model, base)
    assert evaluate_loss(model, held_out, 3, torch.bfloat16) == pytest.approx(
        evaluate_loss(model, held_out), rel=2e-2
    )


def test_an_update_is_measured_and_the_model_restored_exactly(dataset: Dataset, trained: Trained) -> None:
    n, e = dataset.meta.num_sequences, dataset.meta.eval_every
    assigned, base, update = trained
    model = build_model("tiny")
    spec = param_spec(model)
    evaluator = UpdateEvaluator(model, base, dataset.sequences)
    own, other = own_sample(assigned, "s", MINER, 32), other_sample(assigned, "s", 32, n, e)

    losses = evaluator.evaluate(update, 1.0, own, other)
    assert params_hash(get_params(model), spec) == params_hash(base, spec)
    reference = build_model("tiny")
    set_params(reference, base)
    assert losses.own_before == pytest.approx(evaluate_loss(reference, dataset.sequences(own)), rel=1e-5)
    set_params(reference, {k: base[k] - update[k].values.view_as(base[k]) for k in base})
    assert losses.own_after == pytest.approx(evaluate_loss(reference, dataset.sequences(own)), rel=1e-5)
    # The margin's standard error, from the per-sequence gains.
    trained = [evaluate_loss(reference, dataset.sequences([i])) for i in own + other]
    set_params(reference, base)
    before = [evaluate_loss(reference, dataset.sequences([i])) for i in own + other]
    gains = torch.tensor(before, dtype=torch.float64) - torch.tensor(trained, dtype=torch.float64)
    own_g, other_g = gains[: len(own)], gains[len(own) :]
    expected_se = math.sqrt(float(own_g.var() / len(own) + other_g.var() / len(other)))
    assert losses.margin_se == pytest.approx(expected_se, rel=1e-3)
    assert losses.margin == pytest.approx(float(own_g.mean() - other_g.mean()), abs=1e-5)
    # Training on its own sequences helps them, and helps them more than unseen ones.
    assert losses.gain > 0.05 and losses.margin > 0.01 and losses.finite(), losses

    g = torch.Generator().manual_seed(0)  # the same noise every run
    noise = {
        k: SparseTensor(
            None, torch.randn(t.values.shape, generator=g) * t.values.norm() / t.values.numel() ** 0.5
        )
        for k, t in update.items()
    }
    # noise of the update's norm helps a small fraction as much at most (to first order, nothing)
    assert evaluator.evaluate(noise, 1.0, own, other).gain < 0.1 * losses.gain
    flipped = {k: SparseTensor(None, -t.values) for k, t in update.items()}
    assert evaluator.evaluate(flipped, 1.0, own, other).gain < -0.05
    assert params_hash(get_params(model), spec) == params_hash(base, spec)


def test_sparse_updates_touch_only_their_coordinates(dataset: Dataset) -> None:
    model = build_model("tiny")
    base = get_params(model)
    spec = param_spec(model)
    name, shape = spec[1]  # position embeddings: every sequence reads coordinates 0, 5 and 7
    update = {name: SparseTensor(torch.tensor([0, 5, 7]), torch.tensor([1.0, -2.0, 3.0]))}
    evaluator = UpdateEvaluator(model, base, dataset.sequences)
    losses = evaluator.evaluate(update, 0.5, [1, 2], [3, 4])
    assert losses.finite() and losses.own_before != losses.own_after
    assert params_hash(get_params(model), spec) == params_hash(base, spec)
    assert math.prod(shape) > 7


def test_round_scores_and_their_moving_average() -> None:
    losses = {
        "honest": Losses(3.0, 2.8, 3.0, 2.85, 0.01),  # gain 0.2, margin 0.05 = 5 standard errors
        "unsure": Losses(3.0, 2.7, 3.0, 2.72, 0.04),  # gain 0.3, margin 0.02 = t 0.5
        "copied": Losses(3.0, 2.7, 3.0, 2.7, 0.02),  # gain 0.3, no margin: another key's work
        "lazy": Losses(3.0, 2.75, 3.0, 2.74, 0.01),  # gain 0.25, margin -0.01 = t -1
        "stale": Losses(3.0, 2.95, 3.0, 2.97, 0.01),  # gain 0.05, margin 0.02 = t 2
        "harmful": Losses(3.0, 3.5, 3.0, 3.4, 0.01),  # gain -0.5, margin -0.1
        "broken": Losses(3.0, math.inf, 3.0, 3.0, 0.01),
    }
    r = round_results(7, losses)
    typical = 0.225  # the median gain of 0.3, 0.3, 0.25, 0.2, 0.05, -0.5 (the infinite one is left out)
    assert losses["unsure"].t == pytest.approx(0.5) and credit(0.5) == pytest.approx(0.25)
    assert r["honest"].score == pytest.approx(0.2 / typical)  # t >= 2: all its gain
    assert r["unsure"].score == pytest.approx(min(1.0, 0.3 / typical) * 0.25)
    assert r["lazy"].score == pytest.approx(0.0)  # t < 0: none of it
    assert r["copied"].score == pytest.approx(0.0)  # a gain without a margin pays nothing
    assert r["stale"].score == pytest.approx(0.05 / typical)
    assert r["harmful"].score == -1.0 and r["broken"].score == -1.0  # a loss is not discounted; not finite
    assert refused(7).score == -1.0 and refused(7).gain is None
    assert all(x.round == 7 for x in r.values())
    # G comes from the accepted uploads when named: a crowd of useless ones cannot lower the bar.
    assert round_results(7, losses, accepted={"unsure"})["honest"].score == pytest.approx(0.2 / 0.3)
    exact = Losses(3.0, 2.8, 3.0, 2.85)  # no standard error: the sign of the margin decides
    assert exact.t == math.inf and Losses(3.0, 2.8, 3.0, 2.75).t == -math.inf and credit(exact.t) == 1.0


def test_a_standing_is_a_shrunk_mean_with_its_standard_error_and_ranks_by_its_lower_bound() -> None:
    history = [RoundResult(i, score=v, gain=0.1, margin=0.01) for i, v in enumerate([0.2, 0.6, 0.4])]
    s = standing(history)
    assert s.mean == pytest.approx(3 * 0.4 / (3 + PRIOR_ROUNDS))  # the plain mean, shrunk by the prior
    var = statistics.pvariance([0.2, 0.6, 0.4])
    assert s.stderr == pytest.approx(
        math.sqrt((3 * var + PRIOR_ROUNDS * PRIOR_SD**2) / (3 + PRIOR_ROUNDS) ** 2)
    )
    assert s.score == pytest.approx(s.mean - Z * s.stderr)
    assert s.gain_avg == pytest.approx(0.1) and s.assigned_avg == pytest.approx(1.0)
    assert standing(list(reversed(history)), alpha=0.5) == standing(history, alpha=0.5)  # by round
    assert standing(history, alpha=0.5).mean != s.mean  # the newest rounds weigh more
    refusals = standing([refused(0), refused(1)])
    assert refusals.score < refusals.mean < 0 and (refusals.gain_avg, refusals.assigned_avg) == (0.0, -1.0)
    # Two lucky rounds do not outrank a long good record; a long record is surer than a short one.
    lucky = standing([RoundResult(i, 1.0, 0.1, 0.01) for i in range(2)])
    steady = standing([RoundResult(i, 0.8 + 0.1 * (i % 2), 0.1, 0.01) for i in range(20)])
    assert steady.score > lucky.score and steady.stderr < lucky.stderr
    # A missed round counts 0 in the score but is no upload: neither the gain nor the indicator moves.
    now_and_then = standing([RoundResult(0, 1.0, 0.1, 0.01), *[missed(r) for r in range(1, 10)]])
    assert now_and_then.score < steady.score and now_and_then.gain_avg == pytest.approx(0.1)
    assert now_and_then.assigned_avg == 1.0


def test_the_outer_learning_rate_is_step_on_the_wire() -> None:
    config = EvaluationConfig.model_validate({"outer_lr": 0.7})
    assert config.outer_lr == 0.7
    assert json.loads(config.model_dump_json())["step"] == 0.7 and "outer_lr" not in config.model_dump()
    assert EvaluationConfig.model_validate_json('{"step": 0.5}').outer_lr == 0.5
