"""Model configs and architectures: both sides build the same model from its config and seed; the presets
have the shapes they copy; tiny and small keep the parameters of the first releases."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from protocol.model import PRESETS, ModelConfig, build_model, get_config, num_parameters
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
    assert (cfg.vocab_size, cfg.block_size, cfg.n_layer, cfg.n_head, cfg.n_embd) == (256, 128, 4, 4, 128)


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
    with pytest.raises(ValidationError):
        ModelConfig().n_layer = 2  # type: ignore[misc]


# The first releases' initial parameters (seed 0): a new architecture must not change them.
FIRST_HASHES = {
    "tiny": ("047f9251750786e31c7256bd791cb0ae317032bf62a813d9074213814c6beeab", 870_656),
    "small": ("baa167ffddba0620dc788298f2235a254e691984c6f69b58080b13d1d0cd0198", 10_921_728),
}


@pytest.mark.parametrize("name", sorted(FIRST_HASHES))
def test_tiny_and_small_keep_their_parameters_and_hashes(name: str) -> None:
    model = build_model(name, seed=0)
    assert (params_hash(get_params(model), param_spec(model)), num_parameters(model)) == FIRST_HASHES[name]


# What each preset copies: (parameters, vocabulary) of the published model, where there is one.
PUBLISHED = {
    # GPT-2 small: 124,439,808 with the biases of its linear layers, which gpt has none of (6,912 a layer)
    "gpt2-124m": (124_439_808 - 12 * (3 * 768 + 768 + 4 * 768 + 768), 50257),
    "llama-1b": (1_235_814_400, 128256),  # Llama-3.2-1B
}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_and_counts_its_parameters(name: str) -> None:
    cfg = PRESETS[name]
    with torch.device("meta"):
        model = build_model(cfg)
    n = num_parameters(model)
    assert n == cfg.num_parameters()
    names = [p for p, _ in model.named_parameters()]
    assert len(names) == len(set(names)) and ("lm_head.weight" in names) != cfg.tie_embeddings
    if name in PUBLISHED:
        expected, vocab = PUBLISHED[name]
        assert cfg.vocab_size == vocab and n == expected, (n, expected)
    bounds = {
        "tiny": (0.7e6, 1.3e6),
        "small": (10e6, 20e6),
        "llama-tiny": (0.7e6, 1.3e6),
        "llama-small": (10e6, 30e6),
        "llama-150m": (130e6, 170e6),
    }
    if name in bounds:
        assert bounds[name][0] <= n <= bounds[name][1]


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"n_head": 3}, "must divide n_embd"),
        ({"n_layer": 0}, "greater than or equal to 1"),
        ({"family": "llama", "n_head": 4, "n_kv_head": 3}, "must divide n_head"),
        ({"family": "gpt", "n_kv_head": 2}, "no grouped-query attention"),
        ({"n_layer": 1000, "n_embd": 65536, "n_head": 64}, "parameters; at most"),
    ],
)
def test_a_bad_config_is_refused_with_one_reason(bad: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        ModelConfig(**bad)  # type: ignore[arg-type]


def test_a_tied_head_is_one_tensor_that_trains_as_both() -> None:
    cfg = ModelConfig(
        family="llama",
        n_layer=1,
        n_head=2,
        n_embd=16,
        mlp_hidden=32,
        block_size=8,
        tie_embeddings=True,
        vocab_size=50,
    )
    model = build_model(cfg)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # type: ignore[union-attr]
    assert "lm_head.weight" not in dict(model.named_parameters())
