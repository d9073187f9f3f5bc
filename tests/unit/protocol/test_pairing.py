"""Each evaluated upload's margin paired with the round's mean update on the same sequences
(protocol/pairing.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from coordinator.data.corpus import build_dataset
from protocol.data import Dataset, assignment
from protocol.evaluation import Losses, UpdateEvaluator, samples
from protocol.model import build_model, resolve
from protocol.pairing import MIN_PAIRED, RoundEvaluation
from protocol.params import get_params, param_spec, params_hash, set_params
from protocol.payload import SparseTensor
from protocol.wire import CodecConfig, EvaluationConfig, RunInfo, TrainingRecipe

# slow: the module's round (five updates trained from a trained base) and its evaluations take about 40 s of
# one core
pytestmark = pytest.mark.slow

HONEST = ["a1" * 32, "b2" * 32, "c3" * 32, "d4" * 32]
LAZY = "e5" * 32
ROUND, SALT = 2, "salt"


@pytest.fixture(scope="module")
def dataset(corpus_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    root = tmp_path_factory.mktemp("data")
    build_dataset(root, corpus_file, seq_len=128, eval_every=20)
    return Dataset(root)


@pytest.fixture(scope="module")
def info(dataset: Dataset) -> RunInfo:
    arch = resolve("tiny", 256)
    return RunInfo(
        run_id="ring",
        seed=0,
        model="tiny",
        architecture=arch,
        tokenizer_sha256="0" * 64,
        seq_len=128,
        num_sequences=dataset.meta.num_sequences,
        eval_every=dataset.meta.eval_every,
        codec=CodecConfig(),
        recipe=TrainingRecipe(inner_steps=8, batch_size=8),
        max_payload_bytes=1 << 20,
        max_catchup_versions=8,
        evaluation=EvaluationConfig(own_sequences=48, other_sequences=48, early_rounds=0),  # in every round
    )


def _sized(info: RunInfo, own: int, other: int) -> RunInfo:
    """The run's settings with samples of ``own`` and ``other`` sequences."""
    sizes = {"own_sequences": own, "other_sequences": other}
    return info.model_copy(update={"evaluation": info.evaluation.model_copy(update=sizes)})


def _assigned(info: RunInfo, miner: str) -> list[int]:
    r = info.recipe
    return assignment(
        info.seed, ROUND, miner, r.inner_steps * r.batch_size, info.num_sequences, info.eval_every
    )


def _steps(model: torch.nn.Module, tokens: torch.Tensor, steps: int) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(steps):
        model.loss(tokens[(step * 8) % len(tokens) :][:8]).backward()  # type: ignore[operator]
        opt.step()
        opt.zero_grad()


@pytest.fixture(scope="module")
def round_(
    info: RunInfo, dataset: Dataset
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, SparseTensor]]]:
    """A base past the first steps, and each miner's update after steps on its data: the honest ones on
    their assignments, the lazy one on sequences nobody was given."""
    model = build_model("tiny", seed=1)
    _steps(model, dataset.sequences(list(range(1001, 1401))), 20)
    base = get_params(model)
    taken = {i for m in [*HONEST, LAZY] for i in _assigned(info, m)}
    free = [
        i for i in range(1401, dataset.meta.num_sequences) if i not in taken and not dataset.is_held_out(i)
    ]
    elsewhere = free[:64]
    updates = {}
    for m in [*HONEST, LAZY]:
        model = build_model("tiny")
        set_params(model, base)
        _steps(model, dataset.sequences(elsewhere if m == LAZY else _assigned(info, m)), 16)
        trained = get_params(model)
        updates[m] = {n: SparseTensor(None, (base[n] - trained[n]).reshape(-1)) for n in base}
    return base, updates


Measured = tuple[RoundEvaluation, dict[str, Losses], torch.nn.Module]


@pytest.fixture(scope="module")
def measured(
    info: RunInfo,
    dataset: Dataset,
    round_: tuple[dict[str, torch.Tensor], dict[str, dict[str, SparseTensor]]],
) -> Measured:
    """The round's five uploads measured at scale 1 by one evaluation (the tests only read it): the
    evaluation, each upload's plain figures as ``measure`` returned them, and the evaluator's model."""
    base, updates = round_
    model = build_model("tiny")
    evaluation = RoundEvaluation(
        UpdateEvaluator(model, base, dataset.sequences), info, ROUND, SALT, list(updates)
    )
    plain = {m: evaluation.measure(m, u, 1.0) for m, u in updates.items()}
    return evaluation, plain, model


def test_the_paired_margin_tells_honest_from_lazy_and_restores_the_model(
    round_: tuple[dict[str, torch.Tensor], dict[str, dict[str, SparseTensor]]], measured: Measured
) -> None:
    base, _ = round_
    evaluation, plain, model = measured
    spec = param_spec(model)
    assert all(x.paired_se == 0 for x in plain.values())  # not paired until every upload is measured
    losses = evaluation.losses()
    assert params_hash(get_params(model), spec) == params_hash(base, spec)
    assert all(x.paired_se > 0 and x.finite() for x in losses.values()), losses
    assert all(x.bounded() == x for x in losses.values())  # what a verdict carries
    for m, x in losses.items():  # the plain figures stand beside the paired ones
        assert (x.gain, x.margin, x.margin_se) == (plain[m].gain, plain[m].margin, plain[m].margin_se)
        assert x.specific == x.paired_margin and x.t == pytest.approx(x.paired_margin / x.paired_se)
    honest_t = [losses[m].t for m in HONEST]
    assert min(honest_t) > 2.0 and min(honest_t) > losses[LAZY].t, (honest_t, losses[LAZY].t)
    # pairing takes each sequence's difficulty out of the noise: the honest t is larger than the plain one
    assert sum(honest_t) > sum(plain[m].t for m in HONEST)


def test_the_paired_margin_is_the_residual_against_the_mean_update(
    info: RunInfo,
    dataset: Dataset,
    round_: tuple[dict[str, torch.Tensor], dict[str, dict[str, SparseTensor]]],
) -> None:
    """Recomputed by hand: the mean of the measured updates times their scales, measured on the samples,
    the slope on the other sample, and the own mean less the other mean of the residual (on samples of 24
    and 16 sequences: the arithmetic is the same at any size)."""
    base, updates = round_
    info = _sized(info, 24, 16)
    scales = dict(zip(updates, (1.0, 0.5, 0.8, 1.0, 0.7), strict=True))
    evaluation = RoundEvaluation(
        UpdateEvaluator(build_model("tiny"), base, dataset.sequences), info, ROUND, SALT, list(updates)
    )
    for m, u in updates.items():
        evaluation.measure(m, u, scales[m])
    losses = evaluation.losses()
    mean = {
        n: SparseTensor(None, sum(updates[m][n].values * scales[m] for m in updates) / len(updates))
        for n in base
    }
    fresh = UpdateEvaluator(build_model("tiny"), base, dataset.sequences)
    drawn = {m: samples(info, ROUND, m, SALT) for m in updates}
    every = sorted({i for own, other in drawn.values() for i in own + other})
    b2, a2 = fresh.per_sequence(mean, info.evaluation.outer_lr, every)  # the mean's gain, on each
    mean_gain = dict(zip(every, (b2 - a2).tolist(), strict=True))
    for m in updates:
        own, other = drawn[m]
        before, after = fresh.per_sequence(updates[m], scales[m] * info.evaluation.outer_lr, own + other)
        g = before - after
        ref = torch.tensor([mean_gain[i] for i in own + other], dtype=g.dtype)
        x, y = ref[len(own) :], g[len(own) :]
        beta = float(((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum())
        r = g - beta * ref
        expected = float(r[: len(own)].mean() - r[len(own) :].mean())
        se = (float(r[: len(own)].var()) / len(own) + float(r[len(own) :].var()) / len(other)) ** 0.5
        assert losses[m].paired_margin == pytest.approx(expected, rel=1e-3, abs=1e-6)
        assert losses[m].paired_se == pytest.approx(se, rel=1e-3)


def test_small_rounds_keep_the_plain_margin(
    info: RunInfo,
    dataset: Dataset,
    round_: tuple[dict[str, torch.Tensor], dict[str, dict[str, SparseTensor]]],
) -> None:
    base, updates = round_
    evaluation = RoundEvaluation(
        UpdateEvaluator(build_model("tiny"), base, dataset.sequences), info, ROUND, SALT, list(updates)
    )
    for m in list(updates)[: MIN_PAIRED - 1]:  # the others could not be read
        evaluation.measure(m, updates[m], 1.0)
    losses = evaluation.losses()
    assert len(losses) == MIN_PAIRED - 1
    assert all(
        x.paired_se == 0 and x.specific == x.margin and x.t == x.margin / x.margin_se for x in losses.values()
    )


def test_the_head_of_each_sample_gives_what_a_smaller_sample_would(
    info: RunInfo,
    dataset: Dataset,
    round_: tuple[dict[str, torch.Tensor], dict[str, dict[str, SparseTensor]]],
    measured: Measured,
) -> None:
    """``losses((own, other))`` pairs on the first sequences of each sample only: the same verdicts as a
    round evaluated with those sample sizes (what benchmarks/resample.py compares sizes with)."""
    base, updates = round_
    small = _sized(info, 24, 16)
    evaluation = RoundEvaluation(
        UpdateEvaluator(build_model("tiny"), base, dataset.sequences), small, ROUND, SALT, list(updates)
    )
    for m, u in updates.items():
        evaluation.measure(m, u, 1.0)
    verdicts = [measured[0], evaluation]
    whole, head, fresh = verdicts[0].losses(), verdicts[0].losses((24, 16)), verdicts[1].losses()
    assert whole != head
    for m in updates:
        assert head[m].astuple() == pytest.approx(fresh[m].astuple(), rel=1e-4, abs=1e-6), m
    assert verdicts[0].losses() == whole  # the mean update is measured once, and heads leave it whole


def test_shares_of_a_round_give_the_whole_rounds_verdicts(
    info: RunInfo,
    dataset: Dataset,
    round_: tuple[dict[str, torch.Tensor], dict[str, dict[str, SparseTensor]]],
    measured: Measured,
) -> None:
    """Two evaluators, each measuring its share of the round's uploads and including the others in the mean
    (no forward pass for those): each share's verdicts are the whole evaluation's, paired margins and all
    (on samples of 24 and 16 sequences, which the whole evaluation's heads give)."""
    base, updates = round_
    expected = measured[0].losses((24, 16))
    miners = list(updates)
    for share in (miners[:2], miners[2:]):
        evaluator = UpdateEvaluator(build_model("tiny"), base, dataset.sequences)
        part = RoundEvaluation(evaluator, _sized(info, 24, 16), ROUND, SALT, miners)
        for m, u in updates.items():
            if m in share:
                part.measure(m, u, 1.0)
            else:
                part.include(u, 1.0)
        got = part.losses()
        assert set(got) == set(share)
        for m in share:
            assert got[m].paired_se > 0
            assert got[m].astuple() == pytest.approx(expected[m].astuple(), rel=1e-4, abs=1e-6), m
