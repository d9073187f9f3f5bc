"""Inner-loop throughput: ``python -m benchmarks.throughput --json``.

For each model, tokens per second of gradpool's ``node.trainer.InnerTrainer`` (the miner's inner loop:
learning-rate schedule, micro-batches, a finite check before each step, gradient clipping, AdamW) against a
bare PyTorch loop on the same model, batches and optimizer settings (forward, backward, clip, AdamW step),
in the same run. Each side runs ``--steps`` steps from the same initial parameters, alternately, and the
best of ``--reps`` runs counts. ``ratio`` = tokens_per_s / bare_tokens_per_s; target >= 0.95 for every
model. On CUDA also ``mfu``: 6 x params x tokens/s over ``--peak-tflops``.

    {"models": [{"model", "params", "batch", "seq_len", "tokens_per_s", "bare_tokens_per_s", "ratio"}],
     "device", "threads", "targets"}
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import torch

from node.trainer import InnerTrainer, make_optimizer
from protocol.model import CausalLM, build_model, next_token_loss, num_parameters, resolve
from protocol.params import get_params, set_params
from protocol.wire import TrainingRecipe

# (model, sequences per step, sequence length): gpt2-124m with a small batch, so that it runs on a CPU
MODELS = [("tiny", 8, 128), ("llama-tiny", 8, 128), ("llama-small", 8, 256), ("gpt2-124m", 1, 256)]
# on a GPU, the real sizes at their full length and a batch that keeps the GPU busy
CUDA_MODELS = [("gpt2-124m", 16, 1024), ("llama-150m", 16, 1024)]
TARGET = 0.95


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def bare_steps(model: CausalLM, tokens: torch.Tensor, recipe: TrainingRecipe, device: torch.device) -> float:
    """The plain loop: forward, backward, clip, AdamW step; its seconds."""
    opt = make_optimizer(model, recipe)
    model.train()
    t0 = time.perf_counter()
    for batch in tokens.split(recipe.batch_size):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):  # as the miner
            loss = next_token_loss(model, batch.to(device))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def measure(
    name: str, batch: int, seq_len: int, steps: int, reps: int, device: torch.device
) -> dict[str, Any]:
    cfg = resolve(name).model_copy(update={"block_size": seq_len})
    model = build_model(cfg).to(device)
    start = get_params(model)
    recipe = TrainingRecipe(inner_steps=steps, batch_size=batch, warmup_steps=0)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab, (steps * batch, seq_len + 1), generator=gen)
    ours, bare = [], []
    for _ in range(reps + 1):  # the first pair warms up
        set_params(model, start)
        t = InnerTrainer(model, recipe, device).run(tokens).compute_s
        ours.append(t)
        set_params(model, start)
        bare.append(bare_steps(model, tokens, recipe, device))
    n_tokens = steps * batch * seq_len
    row = {
        "model": name,
        "params": num_parameters(model),
        "batch": batch,
        "seq_len": seq_len,
        "steps": steps,
        "tokens_per_s": n_tokens / min(ours[1:]),
        "bare_tokens_per_s": n_tokens / min(bare[1:]),
    }
    row["ratio"] = row["tokens_per_s"] / row["bare_tokens_per_s"]
    ours_s, bare_s = row["tokens_per_s"], row["bare_tokens_per_s"]
    log(f"{name}: {ours_s:.0f} tokens/s, bare {bare_s:.0f}, ratio {row['ratio']:.3f}")
    return row


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(m for m, _, _ in MODELS + CUDA_MODELS))
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's peak, for MFU on CUDA")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    wanted = args.models.split(",")
    rows = []
    on_cpu = device.type == "cpu"
    for name, batch, seq_len in MODELS if on_cpu else CUDA_MODELS:
        if name in wanted:
            big = on_cpu and name == "gpt2-124m"  # a few steps: minutes on a CPU
            row = measure(name, batch, seq_len, 3 if big else args.steps, 2 if big else args.reps, device)
            if device.type == "cuda" and args.peak_tflops:
                row["mfu"] = 6 * row["params"] * row["tokens_per_s"] / (args.peak_tflops * 1e12)
            rows.append(row)
    targets = [{"check": f"{r['model']} ratio >= {TARGET}", "met": r["ratio"] >= TARGET} for r in rows]
    result = {"device": str(device), "threads": torch.get_num_threads(), "models": rows, "targets": targets}
    print(json.dumps(result) if args.json else json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
