"""Model architectures and their configs: a GPT-2-style decoder (``gpt``) and a Llama-style one (``llama``).

A model is a small config (``ModelConfig``); the coordinator announces the whole of it in ``/v1/info`` and
every node builds the model from that, so the architecture is part of the protocol: the parameter names,
shapes and order below decide the payload layout and the parameter hash. Named presets give the common
shapes; the vocabulary size comes from the run's tokenizer. Parameter names follow Hugging Face
``transformers`` (``LlamaForCausalLM`` exactly; ``GPT2LMHeadModel`` up to a prefix, transposed linear
weights and zero biases), so that export is a rename (gradpool/export.py).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator

from protocol.device import forward_mode

MAX_PARAMETERS = 100e9  # a config past this is a typo, not a model


class ModelConfig(BaseModel):
    """One model's shape. ``mlp_hidden`` None: 4 x n_embd (gpt); ``n_kv_head`` None: n_head (no grouping);
    ``vocab_size`` None: the run's tokenizer's."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    family: Literal["gpt", "llama"] = "gpt"
    n_layer: int = Field(default=4, ge=1, le=1024)
    n_head: int = Field(default=4, ge=1, le=1024)
    n_kv_head: int | None = Field(default=None, ge=1, le=1024)
    n_embd: int = Field(default=128, ge=8, le=65536)
    mlp_hidden: int | None = Field(default=None, ge=1, le=1 << 20)
    block_size: int = Field(default=128, ge=8, le=1 << 20, description="sequence length")
    rope_theta: float = Field(default=10000.0, gt=0)
    tie_embeddings: bool = False
    norm_eps: float = Field(default=1e-5, gt=0, lt=1)
    vocab_size: int | None = Field(default=None, ge=2, le=1 << 24)

    @model_validator(mode="after")
    def _consistent(self) -> ModelConfig:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_head ({self.n_head}) must divide n_embd ({self.n_embd})")
        if self.n_head % self.kv_heads:
            raise ValueError(f"n_kv_head ({self.kv_heads}) must divide n_head ({self.n_head})")
        if self.family == "gpt" and self.n_kv_head not in (None, self.n_head):
            raise ValueError("the gpt family has no grouped-query attention: leave n_kv_head unset")
        if self.family == "llama" and self.head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head size, not {self.head_dim}")
        if (n := self.num_parameters()) > MAX_PARAMETERS:
            raise ValueError(f"this config has {n:.3g} parameters; at most {MAX_PARAMETERS:.0e}")
        return self

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def hidden(self) -> int:
        return self.mlp_hidden or 4 * self.n_embd

    @property
    def vocab(self) -> int:
        return self.vocab_size or 256

    def num_parameters(self) -> int:
        """The parameter count, from the shapes alone (a tied head counted once)."""
        c, v, h = self.n_embd, self.vocab, self.hidden
        head = 0 if self.tie_embeddings else v * c
        if self.family == "gpt":
            per_layer = 4 * c + 4 * c * c + 2 * c * h  # 2 LayerNorms, attention, MLP
            return v * c + self.block_size * c + self.n_layer * per_layer + 2 * c + head
        kv = self.kv_heads * self.head_dim
        per_layer = 2 * c + 2 * c * c + 2 * c * kv + 3 * c * h  # 2 RMSNorms, q o, k v, gate up down
        return v * c + self.n_layer * per_layer + c + head


# Named shapes. tiny and small keep the parameters (and so the hashes) of the first releases.
PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(n_layer=4, n_head=4, n_embd=128, block_size=128, vocab_size=256),  # 0.87M
    "small": ModelConfig(n_layer=6, n_head=6, n_embd=384, block_size=256, vocab_size=256),  # 10.9M
    "llama-tiny": ModelConfig(
        family="llama",
        n_layer=4,
        n_head=4,
        n_kv_head=2,
        n_embd=128,
        mlp_hidden=384,
        block_size=128,
        vocab_size=256,
    ),  # 0.86M
    "llama-small": ModelConfig(
        family="llama",
        n_layer=8,
        n_head=6,
        n_kv_head=2,
        n_embd=384,
        mlp_hidden=1024,
        block_size=256,
        vocab_size=256,
    ),  # 12.7M
    # GPT-2 small's shape (124M with its 50,257-token vocabulary, head tied to the embedding)
    "gpt2-124m": ModelConfig(
        n_layer=12, n_head=12, n_embd=768, block_size=1024, tie_embeddings=True, vocab_size=50257
    ),
    "llama-150m": ModelConfig(
        family="llama",
        n_layer=18,
        n_head=12,
        n_kv_head=4,
        n_embd=768,
        mlp_hidden=2304,
        block_size=1024,
        tie_embeddings=True,
        vocab_size=32000,
    ),  # 148M
    # Llama-3.2-1B's shape (1.24B with its 128,256-token vocabulary), at a training length of 2048
    "llama-1b": ModelConfig(
        family="llama",
        n_layer=16,
        n_head=32,
        n_kv_head=8,
        n_embd=2048,
        mlp_hidden=8192,
        block_size=2048,
        rope_theta=500000.0,
        tie_embeddings=True,
        vocab_size=128256,
    ),
}


def get_config(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(PRESETS)}") from None


def resolve(model: str | ModelConfig, vocab_size: int | None = None) -> ModelConfig:
    """A preset name or a config, with the run's vocabulary size when given."""
    cfg = get_config(model) if isinstance(model, str) else model
    return cfg if vocab_size is None else cfg.model_copy(update={"vocab_size": vocab_size})


class CausalLM(nn.Module):
    """What every family provides: logits for (B, T) ids, and the next-token loss of a (B, T+1) batch."""

    cfg: ModelConfig

    def loss(self, batch: torch.Tensor) -> torch.Tensor:
        return next_token_loss(self, batch)


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear | nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)


# -- gpt ----------------------------------------------------------------------------------------------------
class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=False)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.c_proj(y)  # type: ignore[no-any-return]


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, cfg.hidden, bias=False)
        self.c_proj = nn.Linear(cfg.hidden, cfg.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x)))  # type: ignore[no-any-return]


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))  # type: ignore[no-any-return]


class GPT(CausalLM):
    """GPT-2's decoder without biases in its linear layers, learned positions, exact GELU."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)])
        self.ln_f = nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab, bias=False)
        if cfg.tie_embeddings:  # one tensor: the parameters, payloads and checkpoints carry it once
            self.lm_head.weight = self.wte.weight
        self.apply(_init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # scaled residual init (GPT-2)
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        _, T = idx.shape
        pos = torch.arange(T, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)  # (B, T, C)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))  # type: ignore[no-any-return]  # (B, T, vocab)


# -- llama --------------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_head, self.n_kv, self.hd = cfg.n_head, cfg.kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_head * self.hd, bias=False)
        self.k_proj = nn.Linear(cfg.n_embd, self.n_kv * self.hd, bias=False)
        self.v_proj = nn.Linear(cfg.n_embd, self.n_kv * self.hd, bias=False)
        self.o_proj = nn.Linear(cfg.n_head * self.hd, cfg.n_embd, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.hd).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin  # rotary, rotate-half convention (as transformers)
        k = k * cos + rotate_half(k) * sin
        if self.n_kv != self.n_head:  # grouped-query attention: each k, v head serves n_head / n_kv heads
            k = k.repeat_interleave(self.n_head // self.n_kv, dim=1)
            v = v.repeat_interleave(self.n_head // self.n_kv, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))  # type: ignore[no-any-return]


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.n_embd, cfg.hidden, bias=False)
        self.up_proj = nn.Linear(cfg.n_embd, cfg.hidden, bias=False)
        self.down_proj = nn.Linear(cfg.hidden, cfg.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # type: ignore[no-any-return]


class LlamaLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.self_attn = LlamaAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.mlp = LlamaMLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))  # type: ignore[no-any-return]


class LlamaBody(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab, cfg.n_embd)
        self.layers = nn.ModuleList([LlamaLayer(cfg) for _ in range(cfg.n_layer)])
        self.norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        steps = torch.arange(0, cfg.head_dim, 2, dtype=torch.int64).float() / cfg.head_dim
        self.register_buffer("inv_freq", 1.0 / (cfg.rope_theta**steps), persistent=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        _, T = idx.shape
        x = self.embed_tokens(idx)  # (B, T, C)
        inv_freq: torch.Tensor = self.inv_freq  # type: ignore[assignment]
        freqs = torch.arange(T, device=idx.device).float()[:, None] * inv_freq.float()[None, :]  # (T, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (T, hd)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.norm(x)  # type: ignore[no-any-return]


class Llama(CausalLM):
    """Llama's decoder: RMSNorm, rotary positions, SwiGLU MLP, grouped-query attention, no biases."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = LlamaBody(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.apply(_init_weights)
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):  # scaled residual init
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.model(idx))  # type: ignore[no-any-return]  # (B, T, vocab)


# -- building and measuring ---------------------------------------------------------------------------------
def next_token_loss(forward: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the logits of ``forward`` (a model, or a wrapper such as DDP) on a (B, T+1) batch."""
    logits = forward(batch[:, :-1])  # (B, T, vocab)
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1))


@torch.inference_mode()
def evaluate_loss(
    model: CausalLM, tokens: torch.Tensor, batch_size: int = 16, autocast: torch.dtype | None = None
) -> float:
    """Mean next-token loss (nats per token) of ``model`` on (N, T+1) held-out sequences, ``batch_size``
    at a time on the model's device (under autocast to ``autocast`` when given)."""
    model.eval()
    device = next(model.parameters()).device
    with forward_mode(device, autocast):
        total = sum(float(model.loss(b.to(device))) * len(b) for b in torch.split(tokens, batch_size))
    return total / len(tokens)


def build_model(model: str | ModelConfig, seed: int = 0) -> CausalLM:
    """The initial model of a run: the same config and seed give the same parameters on every machine."""
    cfg = resolve(model)
    with torch.random.fork_rng(devices=[]):  # the CPU generator only; leaves the caller's state alone
        torch.manual_seed(seed)
        return GPT(cfg) if cfg.family == "gpt" else Llama(cfg)


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
