"""Convergence at equal tokens: DDP, DiLoCo and SparseLoCo train the same model on the same data.

Every method starts from the same initial model (same name and seed), sees the same sequences in the same
order and, except ``single``, the same number of tokens. Everything runs through gradpool's own code: the
inner loop (``node.trainer.InnerTrainer``), the codecs (encode to payload bytes, decode those bytes as the
coordinator does), error feedback, aggregation, the outer optimizer and ``apply_update``. Workers run in
this process one after another; the network is simulated by handing payload bytes over.

Methods (M workers, H inner steps per round, R rounds, B sequences per inner step per worker):

- ``ddp``: one model, one AdamW step on the M workers' combined batch (M*B sequences) at every step,
  R*H steps. Step h of round r takes the h-th batch of every worker's round-r assignment.
- ``diloco``: dense fp32 payloads, mean aggregate, Nesterov outer step (lr 0.7, momentum 0.9).
- ``sparseloco``: the SparseLoCo codec (k=64 of 4096, 2-bit values), error feedback beta 0.95, outer SGD
  lr 1.0. ``sparseloco_k128`` keeps k=128; ``sparseloco_no_ef`` sends the raw pseudo-gradient each round
  (beta 0: e = delta, no residual carried).
- ``sparseloco_overlap``: overlapped rounds as miners run them (node/overlap.py): round r trains from the
  version before the newest, starting from it minus the worker's own last contribution, and merges the
  newest after a fifth of the inner steps (where miners of ``make demo`` get it); its aggregate is applied
  to the newest. ``_merge30``, ``_half`` and ``_late`` merge after 30 %, 50 % and 90 %; ``_eager``,
  ``_merge`` and ``_delayed`` are the parts alone (``_delayed``: nothing but the stale base).
- ``single``: worker 0 alone, R*H steps of B sequences: 1/M of the tokens.
- ``sparseloco_cosine``: ``sparseloco`` with the inner rate decaying along a cosine to a tenth of its peak
  over the R rounds (``[recipe] schedule = "cosine"``), after the same warm-up.

``--seeds N`` runs every method at seeds ``--seed`` to ``--seed + N - 1`` (each its own initial model and
assignments): ``final_eval_loss`` is then the mean over the seeds, beside ``final_eval_loss_sd`` (their
standard deviation) and ``final_eval_loss_per_seed``; the curve and the rest are the first seed's.

``bytes_per_round`` is what one worker uploads per round: the real payload length for the pool methods;
for ``ddp`` the dense equivalent, one fp32 gradient per inner step (H * 4 * parameters, never actually
sent here); 0 for ``single``. Each method says which in ``bytes_basis``.

    python -m benchmarks.convergence --json > runs/convergence.json
    python -m benchmarks.convergence --rounds 3 --workers 2 --inner-steps 2 --methods ddp,sparseloco
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import statistics
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from benchmarks.convergence_methods import METHODS, Tally, finite, run_pool, run_single_model
from coordinator.data.corpus import build_dataset
from gradpool.processes import fresh_context
from node.distributed import local_device
from node.trainer import NonFiniteLoss
from protocol.data import Dataset, assignment, eval_ids, stdlib_dir
from protocol.model import CausalLM, build_model, evaluate_loss, num_parameters
from protocol.params import param_spec, set_params
from protocol.wire import TrainingRecipe

log = logging.getLogger(__name__)


def cores() -> int:
    """CPU cores this process may use."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


@dataclass(frozen=True)
class Config:
    workers: int = 4
    inner_steps: int = 10
    rounds: int = 60
    batch_size: int = 8
    lr: float = 1e-3
    warmup_steps: int = 20  # the run's first inner steps (each optimizer's: every worker's, ddp's, single's)
    model: str = "tiny"
    methods: tuple[str, ...] = tuple(
        m
        for m in METHODS
        if not m.startswith(("sparseloco_down_", "sparseloco_overlap", "sparseloco_cosine"))
    )
    eval_sequences: int = 128
    seed: int = 0
    seeds: int = 1  # runs per method, at seed, seed + 1, ...
    corpus: Path | None = None  # None: the Python standard library sources
    max_tokens: int = 8_000_000
    eval_every: int = 50
    data_dir: Path = Path("runs/bench-data")
    out: Path = Path("benchmarks/convergence.png")
    threads: int = field(default_factory=cores)
    jobs: int = field(default_factory=cores)  # methods trained at once, each in a process of its own
    device: str = "auto"

    def recipe(self) -> TrainingRecipe:
        return TrainingRecipe(
            inner_steps=self.inner_steps,
            batch_size=self.batch_size,
            lr=self.lr,
            warmup_steps=self.warmup_steps,
            weight_decay=0.1,
            beta1=0.9,
            beta2=0.95,
            grad_clip=1.0,
            ef_beta=0.95,
        )


class Bench:
    """What every method shares: the dataset, the assignments, the held-out batch and the eval model."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.device = local_device(cfg.device)
        self.recipe = cfg.recipe()
        self.eval_model = build_model(cfg.model, seed=cfg.seed).to(self.device)
        self.spec = param_spec(self.eval_model)
        self.num_params = num_parameters(self.eval_model)
        self.seq_len = self.eval_model.cfg.block_size
        root = data_root(cfg, self.seq_len)
        self.meta = build_dataset(root, cfg.corpus, self.seq_len, cfg.max_tokens, cfg.eval_every)
        self.dataset = Dataset(root)
        self.eval_batch = self.dataset.sequences(eval_ids(self.meta, cfg.eval_sequences)).to(self.device)

    def tokens(self, round_: int, worker: int) -> torch.Tensor:
        """Worker ``worker``'s round-``round_`` sequences, (H*B, T+1), in assignment order."""
        c = self.cfg
        ids = assignment(
            c.seed,
            round_,
            f"worker-{worker}",
            c.inner_steps * c.batch_size,
            self.meta.num_sequences,
            self.meta.eval_every,
        )
        return self.dataset.sequences(ids)

    def ddp_tokens(self, round_: int) -> torch.Tensor:
        """All workers' round sequences, (H*M*B, T+1): step h's batch is every worker's h-th batch."""
        c = self.cfg
        parts = [self.tokens(round_, w).view(c.inner_steps, c.batch_size, -1) for w in range(c.workers)]
        return torch.stack(parts, dim=1).reshape(c.inner_steps * c.workers * c.batch_size, -1)

    def evaluate(self, model: CausalLM) -> float:
        """Mean next-token loss on the held-out set, as the coordinator evaluates."""
        return evaluate_loss(model, self.eval_batch)

    def evaluate_params(self, params: dict[str, torch.Tensor]) -> float:
        set_params(self.eval_model, params)
        return self.evaluate(self.eval_model)


def data_root(cfg: Config, seq_len: int) -> Path:
    """A cache folder per (corpus, cap, seq_len, eval_every): ``build_dataset`` reuses whatever it finds."""
    if cfg.corpus is None:
        source = f"stdlib:{stdlib_dir()}"
    else:
        st = cfg.corpus.stat()
        source = f"{cfg.corpus.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    key = f"{source}|{cfg.max_tokens}|{seq_len}|{cfg.eval_every}"
    return cfg.data_dir / hashlib.sha256(key.encode()).hexdigest()[:16]


def run_method(bench: Bench, name: str) -> dict[str, Any]:
    """Train one method from the shared seed; a non-finite loss ends it and is reported, not raised."""
    c, method = bench.cfg, METHODS[name]
    torch.manual_seed(c.seed)
    tally, error = Tally(name), None
    t0 = time.perf_counter()
    try:
        (run_pool if method.kind == "pool" else run_single_model)(bench, method, tally)
    except NonFiniteLoss as e:
        error = str(e)
        log.error("%s: %s; stopped", name, e)
    wall_s = time.perf_counter() - t0
    dense = 4 * bench.num_params
    if method.kind == "pool":
        per_round = round(sum(tally.payload_bytes) / max(1, len(tally.payload_bytes)))
        basis = f"payload: the {method.codec} bytes one worker uploads per round"
    elif method.kind == "ddp":
        per_round = c.inner_steps * dense
        basis = "dense equivalent: one fp32 gradient per inner step (H * 4 * parameters), not sent here"
    else:
        per_round, basis = 0, "none: one machine communicates nothing"
    losses = [p["eval_loss"] for p in tally.curve]
    return {
        "kind": method.kind,
        "workers": 1 if method.kind == "single" else c.workers,
        "codec": method.codec if method.kind == "pool" else None,
        "k": method.k if method.kind == "pool" and method.codec == "sparseloco" else None,
        "ef_beta": method.ef_beta if method.kind == "pool" else None,
        "outer_lr": method.outer_lr if method.kind == "pool" else None,
        "outer_momentum": method.outer_momentum if method.kind == "pool" else None,
        "initial_eval_loss": losses[0] if losses else None,
        "final_eval_loss": losses[-1] if losses and error is None else None,
        "final_train_loss": finite(tally.train_loss),
        "tokens": tally.curve[-1]["tokens"] if tally.curve else 0,
        "bytes_per_round": per_round,
        "bytes_basis": basis,
        "download_bytes_per_round": round(statistics.fmean(tally.down_bytes)) if tally.down_bytes else None,
        "downlink": None if method.downlink is None else method.downlink.model_dump(),
        "compression_vs_fp32": round(dense / per_round, 2) if per_round and method.kind == "pool" else None,
        "curve": tally.curve,
        "wall_s": round(wall_s, 3),
        "train_s": round(tally.train_s, 3),
        "comm_s": round(tally.comm_s, 3),
        "eval_s": round(tally.eval_s, 3),
        "inner_steps": tally.inner_steps,
        "s_per_inner_step": round(tally.train_s / tally.inner_steps, 5) if tally.inner_steps else None,
        "error": error,
    }


def run(cfg: Config) -> dict[str, Any]:
    bench = Bench(cfg)
    tokens_per_round = cfg.workers * cfg.inner_steps * cfg.batch_size * bench.seq_len
    config: dict[str, Any] = {
        **{k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
        "methods": list(cfg.methods),
        "corpus": str(cfg.corpus) if cfg.corpus else bench.meta.source,
        "seq_len": bench.seq_len,
        "num_params": bench.num_params,
        "dense_fp32_bytes": 4 * bench.num_params,
        "recipe": bench.recipe.model_dump(),
        "tokens_per_round": tokens_per_round,
        "total_tokens": cfg.rounds * tokens_per_round,
        "dataset": {
            "num_sequences": bench.meta.num_sequences,
            "num_tokens": bench.meta.num_tokens,
            "sha256": bench.meta.sha256,
        },
        "device": str(bench.device),
        "torch": torch.__version__,
    }
    log.info(
        "model %s (%d parameters), %d workers x %d inner steps x %d sequences of %d tokens, %d rounds",
        cfg.model,
        bench.num_params,
        cfg.workers,
        cfg.inner_steps,
        cfg.batch_size,
        bench.seq_len,
        cfg.rounds,
    )
    runs = [(replace(cfg, seed=cfg.seed + i), name) for i in range(cfg.seeds) for name in cfg.methods]
    if cfg.jobs <= 1 or len(runs) == 1:
        benches = {cfg.seed: bench}  # one per seed, built when its first method runs
        done = []
        for run_cfg, name in runs:
            if run_cfg.seed not in benches:
                benches[run_cfg.seed] = Bench(run_cfg)
            done.append(run_method(benches[run_cfg.seed], name))
    else:  # methods and seeds are independent and deterministic: the same results, sooner
        per_job = max(1, cfg.threads // cfg.jobs)
        with ProcessPoolExecutor(max_workers=cfg.jobs, mp_context=fresh_context()) as pool:
            futures = [pool.submit(_run_in_process, run_cfg, name, per_job) for run_cfg, name in runs]
            done = [f.result() for f in futures]
    by_method: dict[str, list[dict[str, Any]]] = {}
    for (_, name), result in zip(runs, done, strict=True):
        by_method.setdefault(name, []).append(result)
    return {"config": config, "methods": {name: over_seeds(rs) for name, rs in by_method.items()}}


def over_seeds(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One method's record over its seeds (the first seed's, with the final loss's mean, spread and values
    over all of them; a diverged seed makes the mean None)."""
    first = dict(results[0])
    if len(results) == 1:
        return first
    finals = [r["final_eval_loss"] for r in results]
    known = [f for f in finals if f is not None]
    first["final_eval_loss"] = statistics.fmean(known) if len(known) == len(finals) else None
    first["final_eval_loss_sd"] = statistics.stdev(known) if len(known) > 1 else None
    first["final_eval_loss_per_seed"] = finals
    return first


def _run_in_process(cfg: Config, name: str, threads: int) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(threads)
    return run_method(Bench(cfg), name)


# -- output -----------------------------------------------------------------------------------------------
def plot(result: dict[str, Any], path: Path) -> None:
    """Held-out loss against rounds and against tokens seen, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = result["config"]
    fig, (by_round, by_tokens) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, m in result["methods"].items():
        pts = [p for p in m["curve"] if p["eval_loss"] is not None]
        losses = [p["eval_loss"] for p in pts]
        by_round.plot([p["round"] for p in pts], losses, label=name)
        by_tokens.plot([p["tokens"] / 1e6 for p in pts], losses, label=name)
    by_round.set_xlabel("round")
    by_tokens.set_xlabel("training tokens seen (millions)")
    for ax in (by_round, by_tokens):
        ax.set_ylabel("held-out loss")
        ax.grid(alpha=0.3)
    by_round.legend()
    fig.suptitle(
        f"{c['model']}: M={c['workers']} workers, H={c['inner_steps']} inner steps, "
        f"{c['batch_size']}x{c['seq_len']} tokens per step per worker, lr {c['lr']:g}"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def table(result: dict[str, Any]) -> str:
    rows = [
        f"{'method':<18} {'final loss':>10} {'bytes/round':>12} {'x fp32':>8} {'tokens':>11} {'wall s':>8}"
    ]
    for name, m in result["methods"].items():
        loss = "diverged" if m["final_eval_loss"] is None else f"{m['final_eval_loss']:.4f}"
        ratio = "" if m["compression_vs_fp32"] is None else f"{m['compression_vs_fp32']:.1f}"
        rows.append(
            f"{name:<18} {loss:>10} {m['bytes_per_round']:>12,} {ratio:>8} {m['tokens']:>11,} "
            f"{m['wall_s']:>8.1f}"
        )
    return "\n".join(rows)


def parse_args(argv: Sequence[str] | None) -> tuple[Config, bool]:
    d = Config()
    p = argparse.ArgumentParser(prog="python -m benchmarks.convergence", description=__doc__.split("\n")[0])
    p.add_argument("--workers", type=int, default=d.workers, help="M")
    p.add_argument("--inner-steps", type=int, default=d.inner_steps, help="H")
    p.add_argument("--rounds", type=int, default=d.rounds, help="R")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="sequences per inner step per worker")
    p.add_argument("--lr", type=float, default=d.lr, help="inner AdamW learning rate (every method)")
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps, help="linear warm-up, inner steps")
    p.add_argument("--model", default=d.model, help="a name from protocol.model.MODELS; sets seq_len")
    p.add_argument("--methods", default=",".join(d.methods), help=f"comma list of {', '.join(METHODS)}")
    p.add_argument("--eval-sequences", type=int, default=d.eval_sequences, help="held-out set size")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--seeds", type=int, default=d.seeds, help="runs per method, at --seed, --seed + 1, ...")
    p.add_argument("--corpus", type=Path, default=None, help=".txt/.md/.jsonl file or folder (stdlib)")
    p.add_argument("--max-tokens", type=int, default=d.max_tokens, help="cap on the tokenised corpus")
    p.add_argument("--data-dir", type=Path, default=d.data_dir, help="dataset cache")
    p.add_argument("--out", type=Path, default=d.out, help="PNG of the loss curves")
    p.add_argument("--threads", type=int, default=d.threads, help="torch threads (default: all cores)")
    p.add_argument("--jobs", type=int, default=d.jobs, help="methods trained at once, in separate processes")
    p.add_argument("--device", default=d.device, help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--json", action="store_true", help="print the full result as JSON instead of a table")
    a = p.parse_args(argv)
    methods = tuple(m.strip() for m in a.methods.split(",") if m.strip())
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        p.error(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    for flag in (
        "workers",
        "inner_steps",
        "rounds",
        "batch_size",
        "eval_sequences",
        "threads",
        "jobs",
        "seeds",
    ):
        if getattr(a, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1")
    cfg = Config(
        workers=a.workers,
        inner_steps=a.inner_steps,
        rounds=a.rounds,
        batch_size=a.batch_size,
        lr=a.lr,
        warmup_steps=a.warmup_steps,
        model=a.model,
        methods=methods,
        eval_sequences=a.eval_sequences,
        seed=a.seed,
        seeds=a.seeds,
        corpus=a.corpus,
        max_tokens=a.max_tokens,
        data_dir=a.data_dir,
        out=a.out,
        threads=a.threads,
        jobs=a.jobs,
        device=a.device,
    )
    return cfg, a.json


def main(argv: Sequence[str] | None = None) -> int:
    cfg, as_json = parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(cfg.threads)
    result = run(cfg)
    plot(result, cfg.out)
    log.info("wrote %s", cfg.out)
    sys.stdout.write((json.dumps(result, indent=1) if as_json else table(result)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
