"""Codec size and speed: ``python -m benchmarks.codec --json``.

Measured in one run on (a) a real pseudo-gradient of the ``small`` model after H inner steps and (b) a
124M-parameter tensor set with GPT-2 small's shapes. Speeds are GB/s of fp32 parameters, best of several
repetitions after a warm-up:

- encode: pseudo-gradient to payload bytes, the error-feedback update included;
- decode: payload bytes to one dense tensor of all parameters (allocated once, like memcpy's destination);
- topk: a bare ``abs().topk(k, sorted=False)`` over the same chunks (the selection no encoder can skip);
- memcpy: ``dst.copy_(src)`` into an already allocated tensor (the machine's memory bandwidth).

The ratio and bits per kept value count every byte of the payload, headers included.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from coordinator.data.corpus import build_dataset
from node.trainer import InnerTrainer
from protocol.codec import Layout, PayloadHeader, SparseLoCoCodec
from protocol.codec.feedback import ErrorFeedback
from protocol.data import Dataset, assignment
from protocol.model import build_model
from protocol.params import get_params, param_spec
from protocol.wire import TrainingRecipe

Spec = list[tuple[str, tuple[int, ...]]]


def gpt2_small_spec() -> Spec:
    """GPT-2 small (124M): tied embeddings, biases, 12 layers of width 768."""
    d, v, ctx = 768, 50257, 1024
    spec: Spec = [("wte", (v, d)), ("wpe", (ctx, d))]
    for i in range(12):
        p = f"h.{i}."
        spec += [
            (p + "ln_1.weight", (d,)),
            (p + "ln_1.bias", (d,)),
            (p + "attn.c_attn.weight", (d, 3 * d)),
            (p + "attn.c_attn.bias", (3 * d,)),
            (p + "attn.c_proj.weight", (d, d)),
            (p + "attn.c_proj.bias", (d,)),
            (p + "ln_2.weight", (d,)),
            (p + "ln_2.bias", (d,)),
            (p + "mlp.c_fc.weight", (d, 4 * d)),
            (p + "mlp.c_fc.bias", (4 * d,)),
            (p + "mlp.c_proj.weight", (4 * d, d)),
            (p + "mlp.c_proj.bias", (d,)),
        ]
    return [*spec, ("ln_f.weight", (d,)), ("ln_f.bias", (d,))]


def small_model_pseudo_gradient(inner_steps: int, data_dir: Path) -> tuple[Spec, dict[str, torch.Tensor]]:
    """theta_0 - theta_H after H real AdamW steps of the ``small`` model on the default corpus."""
    model = build_model("small", seed=0)
    recipe = TrainingRecipe(inner_steps=inner_steps, batch_size=8, lr=1e-3, warmup_steps=2)
    meta = build_dataset(data_dir, None, seq_len=model.cfg.block_size, max_tokens=4_000_000)
    data = Dataset(data_dir)
    ids = assignment(0, 0, "benchmark", inner_steps * recipe.batch_size, meta.num_sequences, meta.eval_every)
    before = get_params(model)
    InnerTrainer(model, recipe, torch.device("cpu")).run(data.sequences(ids))
    after = get_params(model)
    return param_spec(model), {n: before[n] - after[n] for n in before}


def best_of(fn: Callable[[], Any], reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def measure(spec: Spec, delta: dict[str, torch.Tensor], k: int, reps: int) -> dict[str, Any]:
    codec = SparseLoCoCodec(k=k)
    numel = sum(math.prod(s) for _, s in spec)
    gb = numel * 4 / 1e9
    header = PayloadHeader(format_version=1, codec="sparseloco", round=0, base_version=0)
    ef = ErrorFeedback(0.95)
    ef.accumulate({n: torch.zeros_like(t) for n, t in delta.items()})

    def encode() -> bytes:
        buffers = ef.accumulate(delta)
        payload, decoded = codec.encode(buffers, spec, header)
        ef.subtract(decoded)
        return payload

    t_encode = best_of(encode, reps)
    fresh = ErrorFeedback(0.95)
    payload, _ = codec.encode(fresh.accumulate(delta), spec, header)
    kept = sum(math.prod(s) if codec.is_dense(s) else Layout(s, codec.tile).rows * k for _, s in spec)

    out = torch.empty(numel)  # decoded into an allocated tensor, like memcpy's destination
    t_decode = best_of(lambda: codec.decode_flat(payload, spec, out), reps)
    _, dense = codec.decode_flat(payload, spec)
    flat_delta = torch.cat([delta[n].reshape(-1) for n, _ in spec])
    err = float((dense - flat_delta).norm() / flat_delta.norm())
    chunks = [Layout(s, codec.tile).to_chunks(delta[n]) for n, s in spec if not codec.is_dense(s)]
    t_topk = best_of(lambda: [c.abs().topk(k, dim=1, sorted=False) for c in chunks], reps)
    src = torch.cat([t.reshape(-1) for t in delta.values()])
    dst = torch.empty_like(src)
    t_copy = best_of(lambda: dst.copy_(src), reps)
    return {
        "params": numel,
        "payload_bytes": len(payload),
        "ratio_vs_fp32": numel * 4 / len(payload),
        "bits_per_kept_value": len(payload) * 8 / kept,
        "encode_gb_per_s": gb / t_encode,
        "decode_gb_per_s": gb / t_decode,
        "topk_gb_per_s": gb / t_topk,
        "memcpy_gb_per_s": gb / t_copy,
        "encode_vs_topk": t_topk / t_encode,
        "decode_vs_memcpy": t_copy / t_decode,
        "relative_error": err,
        "encode_s": t_encode,
        "decode_s": t_decode,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--k", type=int, default=64, help="values kept per 4096-element chunk")
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions (best is kept)")
    ap.add_argument("--inner-steps", type=int, default=10, help="H for the small model's pseudo-gradient")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    ap.add_argument("--skip-124m", action="store_true", help="only the small model (quick check)")
    ap.add_argument("--data-dir", type=Path, default=Path("runs/bench-codec-data"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print("training the small model for its pseudo-gradient ...", file=sys.stderr)
    spec, delta = small_model_pseudo_gradient(args.inner_steps, args.data_dir)
    small = measure(spec, delta, args.k, args.reps)
    result: dict[str, Any] = {"k": args.k, "chunk": 4096, "threads": torch.get_num_threads()}
    if not args.skip_124m:
        print("measuring the 124M tensor set ...", file=sys.stderr)
        big_spec = gpt2_small_spec()
        big = {n: torch.randn(s) * 1e-3 for n, s in big_spec}
        result.update(measure(big_spec, big, args.k, args.reps))
    result["small_model"] = small
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        for name, row in [("124M", result), ("small", small)]:
            if "ratio_vs_fp32" in row:
                print(
                    f"{name:>6}: ratio {row['ratio_vs_fp32']:.1f}x, "
                    f"{row['bits_per_kept_value']:.2f} bits/value, "
                    f"encode {row['encode_gb_per_s']:.2f} GB/s ({row['encode_vs_topk']:.2f}x topk), "
                    f"decode {row['decode_gb_per_s']:.2f} GB/s ({row['decode_vs_memcpy']:.2f}x memcpy)"
                )
    return result


if __name__ == "__main__":
    main()
