"""A run's model out of the coordinator: ``gradpool export`` (a folder Hugging Face ``transformers`` loads
offline) and ``gradpool generate`` (a sample, from gradpool's own model).

The coordinator's state directory holds everything needed: the model config and the tokenizer (written at
start), and the checkpoints. ``llama`` exports as ``LlamaForCausalLM`` under the same parameter names;
``gpt`` as ``GPT2LMHeadModel``, its linear weights transposed (Conv1D), zero biases, exact GELU. The export
streams tensor by tensor into ``model.safetensors``, so its memory is about one tensor, not the model.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open

from coordinator.data.tokenizer import RunTokenizer, tokenizer_config
from coordinator.settings import BlobSettings
from coordinator.storage.blob_stores import make_blob_store
from coordinator.storage.blobs import BlobStore, FileBlobStore, kept_checkpoint
from coordinator.storage.store import open_store
from protocol.model import CausalLM, ModelConfig, build_model
from protocol.params import param_spec, params_hash


class ExportError(Exception):
    """Something a person must fix; the CLI prints it on one line."""


class Run:
    """What a coordinator's state directory says about a version of its model."""

    def __init__(self, state_dir: Path, version: int | None, blobs: BlobSettings | None = None) -> None:
        if not (state_dir / "state.db").is_file():
            raise ExportError(f"{state_dir} holds no coordinator state (no state.db)")
        try:
            store = open_store(state_dir)
        except ValueError as e:  # a schema this code does not run on
            raise ExportError(str(e)) from None
        try:
            raw = store.get_meta("architecture")
            found = store.checkpoint(version)
            row = None if found is None else store.version(found[0])
        finally:
            store.close()
        if raw is None:
            raise ExportError(f"{state_dir} records no model config; start its coordinator once first")
        if found is None or row is None:
            which = "any version" if version is None else f"version {version}"
            raise ExportError(f"no checkpoint is kept for {which} in {state_dir}")
        self.state_dir, self.config = state_dir, ModelConfig.model_validate_json(raw)
        self.version, self.sha, self.param_hash = found[0], found[1], str(row.param_hash)
        self.blobs: BlobStore = (
            make_blob_store(blobs, state_dir / "blobs") if blobs else FileBlobStore(state_dir / "blobs")
        )
        tok = state_dir / "tokenizer.json"
        self.tokenizer = RunTokenizer(str(tok) if tok.is_file() else "byte")

    @contextmanager
    def checkpoint_file(self) -> Iterator[Path]:
        """The checkpoint as a file to read tensor by tensor (the blob itself for the file store, a
        download for S3), checked against its sha256 first."""
        with self.blobs.as_file(self.sha) as path:
            yield path

    def model(self) -> CausalLM:
        """gradpool's own model at this version, its parameters checked against the version's hash."""
        model = build_model(self.config)
        spec = param_spec(model)
        params = kept_checkpoint(self.blobs, self.sha, spec)
        if params_hash(params, spec) != self.param_hash:
            raise ExportError(f"the checkpoint of version {self.version} does not match its hash")
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(params[name])
        return model.eval()


# -- the transformers layout --------------------------------------------------------------------------------
CONV1D = ("c_attn.weight", "c_proj.weight", "c_fc.weight")  # GPT-2 keeps these as (in, out), with a bias


Layout = list[tuple[str, str | None, bool, list[int]]]


def hf_tensors(cfg: ModelConfig, shapes: dict[str, list[int]]) -> Layout:
    """(transformers name, gradpool name or None for a zero bias, transposed, shape) of every exported
    tensor."""
    if cfg.family == "llama":
        return [(n, n, False, s) for n, s in shapes.items()]
    out: Layout = []
    for n, s in shapes.items():
        if n == "lm_head.weight":
            out.append((n, n, False, s))
        elif n.startswith("blocks.") and n.endswith(CONV1D):
            hf = "transformer.h." + n.removeprefix("blocks.")
            out.append((hf, n, True, s[::-1]))  # Linear (out, in) -> Conv1D (in, out)
            out.append((hf.removesuffix("weight") + "bias", None, False, [s[0]]))
        else:
            out.append(("transformer." + n.replace("blocks.", "h.", 1), n, False, s))
    return out


def hf_config(cfg: ModelConfig, tok: RunTokenizer) -> dict[str, object]:
    eos = tok.end_of_text
    common = {
        "vocab_size": cfg.vocab,
        "tie_word_embeddings": cfg.tie_embeddings,
        "torch_dtype": "float32",
        "bos_token_id": eos,
        "eos_token_id": eos,
    }
    if cfg.family == "llama":
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": cfg.n_embd,
            "intermediate_size": cfg.hidden,
            "num_hidden_layers": cfg.n_layer,
            "num_attention_heads": cfg.n_head,
            "num_key_value_heads": cfg.kv_heads,
            "head_dim": cfg.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": cfg.block_size,
            "rms_norm_eps": cfg.norm_eps,
            "rope_theta": cfg.rope_theta,
            "attention_bias": False,
            "mlp_bias": False,
            "attention_dropout": 0.0,
            **common,
        }
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "n_positions": cfg.block_size,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": cfg.hidden,
        "activation_function": "gelu",
        "layer_norm_epsilon": cfg.norm_eps,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        **common,
    }


def export(run: Run, out: Path) -> list[Path]:
    """Write the transformers folder; the files written."""
    out.mkdir(parents=True, exist_ok=True)
    cfg = run.config
    with run.checkpoint_file() as path, safe_open(str(path), framework="pt") as ckpt:
        shapes = {n: list(ckpt.get_slice(n).get_shape()) for n in ckpt.keys()}  # noqa: SIM118
        _stream_safetensors(out / "model.safetensors", hf_tensors(cfg, shapes), ckpt.get_tensor)
    tok = run.tokenizer
    files = {
        "config.json": hf_config(cfg, tok),
        "generation_config.json": {"bos_token_id": tok.end_of_text, "eos_token_id": tok.end_of_text},
        "tokenizer_config.json": tokenizer_config(tok, cfg.block_size),
    }
    for name, content in files.items():
        _write_atomic(out / name, json.dumps(content, indent=1).encode())
    _write_atomic(out / "tokenizer.json", tok.json)
    return [out / n for n in ("model.safetensors", *files, "tokenizer.json")]


def _stream_safetensors(path: Path, layout: Layout, read: Callable[[str], torch.Tensor]) -> None:
    """A safetensors file of fp32 tensors, written one tensor at a time (header first, from the shapes)."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for hf, _, _, shape in layout:
        size = 4 * _numel(shape)
        header[hf] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for hf, ours, transposed, shape in layout:
            t = torch.zeros(shape) if ours is None else read(ours).float()
            t = (t.t() if transposed else t).contiguous()
            if list(t.shape) != shape:
                raise ExportError(f"{hf}: shape {list(t.shape)}, expected {shape}")
            f.write(t.numpy().tobytes())
            del t
    os.replace(tmp, path)


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# -- generate -----------------------------------------------------------------------------------------------
@torch.no_grad()
def generate(
    model: CausalLM, tok: RunTokenizer, prompt: str, max_new_tokens: int, temperature: float, seed: int = 0
) -> str:
    """The prompt's continuation: sampled at ``temperature`` (0: the most likely token each time)."""
    ids = tok.encode(prompt) or [tok.end_of_text or 0]
    x = torch.tensor([ids], dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    for _ in range(max_new_tokens):
        logits = model(x[:, -model.cfg.block_size :])[0, -1].float()  # (vocab,)
        if temperature <= 0:
            nxt = int(logits.argmax())
        else:
            nxt = int(torch.multinomial(torch.softmax(logits / temperature, dim=-1), 1, generator=g))
        if nxt == tok.end_of_text:
            break
        x = torch.cat([x, torch.tensor([[nxt]])], dim=1)
    return tok.decode(x[0, len(ids) :].tolist())
