"""The inner loop's learning rate, a pure function of the round and the inner step that every miner
computes alike, and the training health each round reports."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from pydantic import ValidationError

from node.trainer import InnerTrainer
from protocol.model import build_model
from protocol.wire import TrainingRecipe


def test_the_learning_rate_follows_the_run_not_the_miner() -> None:
    constant = TrainingRecipe(inner_steps=10, warmup_steps=15, lr=1e-3)
    # the warm-up spans the run's first 15 inner steps: round 0 and half of round 1, for every miner alike
    assert constant.lr_at(0, 0) == pytest.approx(1e-3 / 15)
    assert constant.lr_at(1, 4) == pytest.approx(1e-3)
    assert constant.lr_at(1, 5) == constant.lr_at(40, 3) == 1e-3
    cosine = constant.model_copy(update={"schedule": "cosine", "planned_rounds": 20, "lr_floor": 0.1})
    rates = [cosine.lr_at(r, i) for r in range(22) for i in range(10)]
    assert rates[:15] == [constant.lr_at(0, i) for i in range(15)]
    assert rates[15] == pytest.approx(1e-3)
    after = rates[15:200]
    assert all(a >= b for a, b in itertools.pairwise(after))  # decays, never rises
    assert rates[199] == pytest.approx(1e-4, rel=1e-3) and rates[-1] == pytest.approx(1e-4)  # the floor
    progress = (10 * 10 + 2 - 15) / (20 * 10 - 15)  # of the decay, at inner step 2 of round 10
    assert cosine.lr_at(10, 2) == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * progress)))
    with pytest.raises(ValidationError, match="planned_rounds"):
        TrainingRecipe(schedule="cosine")


def test_a_round_trains_at_its_rates_whenever_the_miner_joined_and_reports_its_health() -> None:
    recipe = TrainingRecipe(inner_steps=3, batch_size=2, warmup_steps=6, lr=1e-3)
    torch.manual_seed(0)
    tokens = torch.randint(0, 256, (6, 129))
    late = InnerTrainer(build_model("tiny"), recipe, torch.device("cpu"))
    seen: list[float] = []
    result = late.run(tokens, on_step=lambda m: seen.append(m["lr"]), round_=1)  # joins in round 1
    assert seen == [recipe.lr_at(1, i) for i in range(3)] == pytest.approx([4e-3 / 6, 5e-3 / 6, 1e-3])
    assert result.lr == seen[-1]
    assert 0 < result.grad_norm_mean <= result.grad_norm_max
    assert 0 <= result.clipped_fraction <= 1
    tight = recipe.model_copy(update={"grad_clip": 1e-6})
    assert (
        InnerTrainer(build_model("tiny"), tight, torch.device("cpu")).run(tokens).clipped_fraction == 1.0
    )  # every step's gradient above the clip
