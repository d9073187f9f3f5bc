"""What a round costs at real sizes, measured and projected: ``python -m benchmarks.scale --json``.

Measured, for each model of ``--models`` on ``--device`` (each in a fresh process, so that its peak memory
is its own), on ``--sequences`` random sequences of the model's full length:

- ``forward_s_per_sequence``: a bare batched forward loop (``--batch`` sequences a pass, the loss of each
  sequence computed, in the dtype evaluation uses: bf16 autocast on CUDA, fp32 on the CPU);
- ``eval_ratio``: that loop's time over the coordinator's evaluation of the same sequences after one
  upload (``protocol.evaluation.UpdateEvaluator``: apply the sparse update, the forward passes, restore the
  touched coordinates; its losses before, shared by a round's uploads, cached as in a round); 1.0 means
  evaluation adds nothing to the forward passes;
- ``aggregate_s``: per upload, reading a stored SparseLoCo payload and adding it into the round's sum
  (``coordinator.publishing.aggregation``; measured on ``--uploads`` distinct payloads), on the CPU as
  the coordinator does it;
- ``publish_s``: once per version: the outer step, the compressed downlink's encode and decode, the new
  parameters and their hash;
- ``checkpoint_s``: writing the version's checkpoint into the blob store, as the coordinator does (its
  safetensors streamed to a file from the tensors, hashed and synced: benchmarks/checkpoint.py compares it
  with building the file in memory);
- ``peak_rss_bytes``: the process's resident high-water mark (on CUDA also ``peak_cuda_bytes``).

Projected, for ``gpt2-124m`` and ``llama-1b`` with 16, 64 and 256 miners and 0, 4 and 16 validators, one
H100 per role (the assumptions are in the output's ``assumptions``): the time until a round's version is
out (``version_out_s``: aggregation of every upload, the version's publication, its held-out loss and its
checkpoint), the time until every sampled upload is scored (``scored_s``: the evaluation of the round's
sample, spread over the validators, two per upload, when there are validators: ``[validation] assign``;
``scored_s_builtin`` without it), and a miner's inner loop
on the same GPU (``miner_inner_s``) with the recipe of the model's example config. Forward and training
times on the GPU follow from FLOP counts at an assumed utilisation; the CPU work (aggregation, publishing,
checkpoints) is taken as measured here, on this machine's cores, which a coordinator's host outnumbers.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.aggregation import (
    in_fresh_process,
    load_uploads,
    peak_rss_bytes,
    set_threads,
    write_payloads,
)
from coordinator.publishing.aggregation import aggregate_uploads
from coordinator.publishing.outer import OuterOptimizer
from coordinator.publishing.publisher import Downlink
from coordinator.settings import PublishSettings
from coordinator.storage.blobs import FileBlobStore
from protocol.codec import SparseLoCoCodec
from protocol.device import autocast_dtype, forward_mode, pick_device
from protocol.evaluation import UpdateEvaluator
from protocol.model import CausalLM, ModelConfig, build_model, num_parameters, resolve
from protocol.pairing import MIN_PAIRED
from protocol.params import apply_update, get_params, param_spec, params_hash, write_checkpoint

MODELS = ("gpt2-124m", "llama-150m", "llama-1b")
EVAL_RATIO_TARGET = 0.9

# One H100 SXM: 989 TFLOP/s of dense bf16 (NVIDIA's datasheet); sustained at these utilisations, which
# nanoGPT-class training loops reach at 124M-1B and inference forward passes at batch 16 exceed.
H100_BF16_FLOPS = 989e12
TRAIN_MFU, EVAL_MFU = 0.40, 0.45
OWN, OTHER = 48, 48  # the evaluation samples at the defaults
MAX_EVALUATED, REDUNDANCY, HELD_OUT = 16, 2, 64
# The recipes of configs/gpt2-124m.toml and configs/llama-1b.toml: (inner steps, sequences per step)
RECIPES = {"gpt2-124m": (100, 64), "llama-150m": (100, 64), "llama-1b": (100, 64)}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def parameter_count(cfg: ModelConfig) -> int:
    """The model's parameters, counted without allocating them."""
    with torch.device("meta"):
        return num_parameters(build_model(cfg))


def forward_flops(cfg: ModelConfig, params: int) -> float:
    """FLOPs of one forward pass over one sequence: 2 per parameter and token, and attention's scores."""
    t = cfg.block_size
    return 2.0 * params * t + 4.0 * cfg.n_layer * t * t * cfg.n_embd


@torch.inference_mode()
def bare_forward(model: CausalLM, tokens: torch.Tensor, batch: int, dtype: torch.dtype | None) -> float:
    """The plain loop: each batch's forward pass and per-sequence loss; its seconds."""
    device = next(model.parameters()).device
    t0 = time.perf_counter()
    for b in tokens.split(batch):
        b = b.to(device)
        with forward_mode(device, dtype):
            logits = model(b[:, :-1])
        F.cross_entropy(logits.float().transpose(1, 2), b[:, 1:], reduction="none").mean(dim=1).cpu()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def measure(
    name: str,
    device_name: str,
    sequences: int,
    batch: int,
    uploads: int,
    threads: int | None,
    vocab_size: int | None = None,
) -> dict[str, Any]:
    """One model's row (``vocab_size``: a tokenizer's instead of the preset's): runs in a fresh process."""
    set_threads(threads)
    device = pick_device(device_name)
    cfg = resolve(name, vocab_size)
    log(f"{name}: building the model ...")
    cpu_model = build_model(cfg)
    params = get_params(cpu_model)  # the canonical copy: fp32 on the CPU
    model = cpu_model.to(device).eval()
    spec = param_spec(model)
    dtype = autocast_dtype(device)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, int(cfg.vocab_size or 256), (sequences, cfg.block_size + 1), generator=gen)
    with tempfile.TemporaryDirectory(prefix="gradpool-scale-") as tmp:
        root = Path(tmp)
        log(f"{name}: encoding {uploads} payloads ...")
        write_payloads(cfg, uploads, root, threads)
        blobs, codec = FileBlobStore(root / "blobs"), SparseLoCoCodec()
        stored = load_uploads(root, uploads)
        update = codec.decode(blobs.get(stored[0].sha256), spec)[1]

        log(f"{name}: forward passes ...")
        bare_forward(model, tokens[:batch], batch, dtype)  # warm-up
        bare = min(bare_forward(model, tokens, batch, dtype) for _ in range(2))
        evaluator = UpdateEvaluator(model, params, lambda ids: tokens[ids], batch, dtype)
        ids = list(range(sequences))
        evaluator.per_sequence(update, 1.0, ids)  # the losses before, as the round's first upload has them
        times = []
        for _ in range(2):
            t0 = time.perf_counter()
            evaluator.per_sequence(update, 1.0, ids)
            if device.type == "cuda":
                torch.cuda.synchronize()  # the restore's kernels too
            times.append(time.perf_counter() - t0)
        evaluated = min(times)

        log(f"{name}: aggregating {uploads} uploads, publishing, writing a checkpoint ...")
        t0 = time.perf_counter()
        aggregate = aggregate_uploads(
            [(u, 1.0) for u in stored], lambda u: (b"", blobs.get(str(u.stored_sha256))), codec, spec
        )
        aggregate_s = (time.perf_counter() - t0) / uploads
        t0 = time.perf_counter()
        delta, _ = OuterOptimizer(lr=1.0).step(aggregate)
        _, applied, _ = Downlink(PublishSettings(), SparseLoCoCodec(), spec).step(delta)
        new = {n: p.clone() for n, p in params.items()}
        apply_update(new, applied)
        param_hash = params_hash(new, spec)
        publish_s = time.perf_counter() - t0
        t0 = time.perf_counter()  # as the coordinator writes it: into the blob store, hashed and synced
        blobs.put_written(partial(write_checkpoint, new, {"param_hash": param_hash}))
        checkpoint_s = time.perf_counter() - t0
    row = {
        "model": name,
        "device": str(device),
        "params": num_parameters(model),
        "vocab_size": cfg.vocab_size,
        "seq_len": cfg.block_size,
        "sequences": sequences,
        "batch": batch,
        "dtype": "bf16" if dtype is torch.bfloat16 else "fp32",
        "forward_s_per_sequence": bare / sequences,
        "eval_ratio": bare / evaluated,
        "aggregate_s": aggregate_s,
        "publish_s": publish_s,
        "checkpoint_s": checkpoint_s,
        "peak_rss_bytes": peak_rss_bytes(),
        "threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        row["peak_cuda_bytes"] = torch.cuda.max_memory_allocated(device)
    return row


def evaluation_passes(uploads: int, own: int, other: int, paired: bool | None = None) -> int:
    """Forward passes of one sequence that evaluating ``uploads`` sampled uploads takes: each one's own sample
    before and after it, its other sample after it (the other samples' losses before are one salted order's
    head, shared by the round), and with ``MIN_PAIRED`` uploads or more the pairing's pass of the round's
    mean update over every sampled sequence (protocol/pairing.py). ``paired``: whether the round pairs, when
    these are a validator's share of a larger sample (the mean holds every sampled upload)."""
    if uploads == 0:
        return 0
    passes = uploads * own + other + uploads * (own + other)
    if uploads >= MIN_PAIRED if paired is None else paired:
        passes += uploads * own + other
    return passes


def close_cost(
    row: dict[str, Any],
    uploads: int,
    own: int,
    other: int,
    held_out: int,
    forward_s: float | None = None,
    accepted: int | None = None,
) -> dict[str, float]:
    """What a synchronous round's close costs on the machine ``row`` measured (``forward_s``: the time of a
    forward pass of one sequence, else the row's evaluation time of one): the evaluation of ``uploads``
    sampled uploads (each decoded, then ``evaluation_passes``), then, when it accepts any (``accepted``, all
    of them unless given), the version: every accepted upload aggregated, the outer step and the downlink
    (``publish_s``), its held-out loss, and two model-sized writes, the checkpoint and the coordinator's
    state (the downlink's residual)."""
    forward = forward_s if forward_s is not None else row["forward_s_per_sequence"] / row["eval_ratio"]
    accepted = uploads if accepted is None else accepted
    passes = evaluation_passes(uploads, own, other)
    evaluation = passes * forward + uploads * row["aggregate_s"]
    version = 0.0
    if accepted:
        writes = row["publish_s"] + 2 * row["checkpoint_s"]
        version = held_out * forward + accepted * row["aggregate_s"] + writes
    return {
        "passes": passes + (held_out if accepted else 0),
        "evaluation_s": evaluation,
        "version_s": version,
        "close_s": evaluation + version,
    }


def cpu_work(
    measured: dict[str, dict[str, Any]], name: str, params: int
) -> tuple[dict[str, Any] | None, str]:
    """The CPU work per upload and per version of ``name``: as measured, or else scaled by parameter count
    from the largest model measured (aggregation, publishing and checkpoints are linear in it)."""
    if name in measured:
        return measured[name], "measured"
    if not measured:
        return None, "not measured"
    base = max(measured.values(), key=lambda row: row["params"])
    f = params / base["params"]
    scaled = {k: base[k] * f for k in ("aggregate_s", "publish_s", "checkpoint_s")}
    return scaled, f"scaled from {base['model']} by parameter count (x{f:.1f})"


def project(measured: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Round timings on one H100 per role, from FLOP counts and the CPU work measured here."""
    rows = []
    for name in ("gpt2-124m", "llama-1b"):
        cfg = resolve(name)
        params = parameter_count(cfg)
        forward_s = forward_flops(cfg, params) / (H100_BF16_FLOPS * EVAL_MFU)
        steps, batch = RECIPES[name]
        inner_s = steps * batch * 3 * forward_flops(cfg, params) / (H100_BF16_FLOPS * TRAIN_MFU)
        cpu, basis = cpu_work(measured, name, params)
        for miners in (16, 64, 256):
            sample = min(MAX_EVALUATED, miners)
            for validators in (0, 4, 16):
                shared = sample if validators == 0 else math.ceil(sample * REDUNDANCY / validators)
                version_out = None
                if cpu is not None:  # the close's version part, its forward passes on the GPU
                    version_out = close_cost(cpu, miners, OWN, OTHER, HELD_OUT, forward_s)["version_s"]
                rows.append(
                    {
                        "model": name,
                        "miners": miners,
                        "validators": validators,
                        "version_out_s": round(version_out, 3) if version_out is not None else None,
                        "scored_s": round(
                            evaluation_passes(shared, OWN, OTHER, sample >= MIN_PAIRED) * forward_s, 3
                        ),
                        "scored_s_builtin": round(evaluation_passes(sample, OWN, OTHER) * forward_s, 3),
                        "miner_inner_s": round(inner_s, 3),
                        "cpu_work": basis,
                    }
                )
    return rows


ASSUMPTIONS = {
    "gpu": "one NVIDIA H100 SXM per role: 989 TFLOP/s dense bf16 (datasheet)",
    "train_mfu": TRAIN_MFU,
    "eval_mfu": EVAL_MFU,
    "forward_flops": "2 x parameters x tokens + 4 x layers x seq_len^2 x width a sequence; training 3x",
    "evaluation": f"the {MAX_EVALUATED} sampled uploads of a round (fewer miners: all), "
    f"{OWN} own and {OTHER} other sequences each: own before and after, other after (the other samples' "
    "losses before shared by the round), the paired pass of the mean update over every sampled sequence; "
    "the version's held-out loss: 64 passes (benchmarks.cost_check checks this model on a real network)",
    "scored_s": f"with validators, [validation] assign: each sampled upload evaluated by {REDUNDANCY} of "
    "them (a validator's share of the forward passes; it decodes the others into the round's mean, no "
    "forward pass); without, the coordinator evaluates the whole sample",
    "scored_s_builtin": "[validation] assign off: every evaluator (the coordinator, each validator) "
    "evaluates every sampled upload: validators add redundancy, not capacity",
    "cpu_work": "aggregation, publishing and two model-sized writes (the checkpoint and the coordinator's "
    "state) as measured on this machine, on the CPU in fp32 (the canonical state); a coordinator host has "
    "more cores",
    "miner_recipe": {m: {"inner_steps": s, "batch_size": b} for m, (s, b) in RECIPES.items()},
}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated presets to measure")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--sequences", type=int, default=None, help="per model (default: 8; llama-1b 2)")
    p.add_argument("--batch", type=int, default=None, help="sequences per forward pass (default: 4; 1b 1)")
    p.add_argument("--uploads", type=int, default=None, help="payloads aggregated (default: 4; 1b 2)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all)")
    p.add_argument(
        "--measured", type=Path, default=None, help="measure nothing: project from this earlier --json output"
    )
    args = p.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in models:
        resolve(m)  # a ValueError naming the presets
    measured = [] if args.measured is None else json.loads(args.measured.read_text())["measured"]
    for m in models if args.measured is None else []:
        big = parameter_count(resolve(m)) > 500e6
        sequences = args.sequences or (2 if big else 8)
        batch = min(sequences, args.batch or (1 if big else 4))
        uploads = args.uploads or (2 if big else 4)
        measured.append(in_fresh_process(measure, m, args.device, sequences, batch, uploads, args.threads))
        log(json.dumps(measured[-1]))
    result = {
        "measured": measured,
        "projected": project({row["model"]: row for row in measured}),
        "assumptions": ASSUMPTIONS,
        "targets": {
            "eval_ratio": EVAL_RATIO_TARGET,
            "met": all(row["eval_ratio"] >= EVAL_RATIO_TARGET for row in measured),
        },
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for row in measured:
            print(
                f"{row['model']:<11} {row['device']:<6} forward {row['forward_s_per_sequence']:.3f} s/seq  "
                f"eval_ratio {row['eval_ratio']:.2f}  aggregate {row['aggregate_s']:.2f} s/upload  "
                f"publish {row['publish_s']:.1f} s  checkpoint {row['checkpoint_s']:.1f} s  "
                f"peak {row['peak_rss_bytes'] / 2**30:.1f} GiB"
            )
        for projected in result["projected"]:
            print(json.dumps(projected))
    return result


if __name__ == "__main__":
    main()
