"""The model registry: both sides build the same model from its name and seed."""

from __future__ import annotations

import math

import pytest
import torch

from protocol.model import GPTConfig, build_model, get_config, num_parameters
from protocol.params import get_params, param_spec, params_hash


def test_build_model_is_deterministic_for_a_seed_and_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a, b, c = build_model("tiny", seed=1), build_model("tiny", seed=1), build_model("tiny", seed=2)
    assert torch.equal(torch.rand(3), before)
    spec = param_spec(a)
    assert params_hash(get_params(a), spec) == params_hash(get_params(b), spec)
    assert params_hash(get_params(a), spec) != params_hash(get_params(c), spec)


def test_model_sizes() -> None:
    tiny = num_parameters(build_model("tiny"))
    assert 0.7e6 <= tiny <= 1.3e6
    assert 10e6 <= num_parameters(build_model("small")) <= 20e6
    with pytest.raises(ValueError, match="unknown model"):
        get_config("huge")


def test_parameter_layout_is_fixed() -> None:
    spec = param_spec(build_model("tiny"))
    cfg = get_config("tiny")
    assert spec[0] == ("wte.weight", (cfg.vocab_size, cfg.n_embd))
    assert spec[1] == ("wpe.weight", (cfg.block_size, cfg.n_embd))
    assert spec[-1] == ("lm_head.weight", (cfg.vocab_size, cfg.n_embd))
    assert len(spec) == 2 + 8 * cfg.n_layer + 2 + 1  # per block: 2 LayerNorms (w, b) and 4 matrices
    assert cfg.to_dict() == {"vocab_size": 256, "block_size": 128, "n_layer": 4, "n_head": 4, "n_embd": 128}


def test_initial_loss_is_about_uniform_over_bytes() -> None:
    model = build_model("tiny", seed=0)
    batch = torch.randint(0, 256, (4, 65), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(batch[:, :-1])
        loss = model.loss(batch)
    assert logits.shape == (4, 64, 256)
    assert abs(float(loss) - math.log(256)) < 0.1


def test_attention_is_causal() -> None:
    model = build_model("tiny", seed=0)
    x = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(1))
    y = x.clone()
    y[0, 10] = (y[0, 10] + 1) % 256
    with torch.no_grad():
        a, b = model(x), model(y)
    assert torch.allclose(a[0, :10], b[0, :10], atol=1e-6)
    assert not torch.allclose(a[0, 10:], b[0, 10:])


def test_config_is_frozen() -> None:
    with pytest.raises(AttributeError):
        GPTConfig().n_layer = 2  # type: ignore[misc]
