"""The contenders of the convergence benchmark (benchmarks/convergence.py) and how each trains: one model
(``ddp``, ``single``) or a pool of workers with a codec and an outer step, through gradpool's own code."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Literal

import torch

from coordinator.publishing.outer import OuterOptimizer
from coordinator.publishing.publisher import Downlink
from coordinator.settings import PublishSettings
from node.overlap import GUESS_SCALE
from node.trainer import InnerTrainer
from protocol.codec import PAYLOAD_FORMAT_VERSION, CodecName, PayloadHeader, PayloadStats, make_codec
from protocol.codec.accumulate import aggregate
from protocol.codec.feedback import ErrorFeedback
from protocol.model import CausalLM, build_model
from protocol.params import apply_update, get_params, set_params

if TYPE_CHECKING:
    from benchmarks.convergence import Bench

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Method:
    """One contender. ``pool``: M workers, a codec and an outer step; ``ddp`` and ``single``: one model."""

    kind: Literal["pool", "ddp", "single"]
    codec: CodecName = "sparseloco"
    k: int = 64
    ef_beta: float = 0.95
    outer_lr: float = 1.0
    outer_momentum: float = 0.0
    downlink: PublishSettings | None = None  # None: the exact downlink; else the compressed one
    # Overlapped rounds: round r trains from the version before the newest (the newest is still being
    # made), and its aggregate is applied to the newest. "delayed": nothing more. "eager": each worker
    # starts from that base minus its own last contribution (outer lr x what it uploaded), its guess of
    # the version being made. "merge": the version being made arrives after ``merge_at`` of the inner
    # steps and the model being trained moves to where it would stand had it started from it; the
    # pseudo-gradient is then taken from that version. "merge_eager": both, as node/overlap.py does.
    overlap: Literal["off", "delayed", "eager", "merge", "merge_eager"] = "off"
    merge_at: float = 0.5
    carry: float = 1.0  # at the merge, the part of what training had moved the model by that it keeps
    schedule: Literal["constant", "cosine"] = "constant"  # the inner rate after the warm-up (TrainingRecipe)
    # the eager start's guess of the version being made: "own" (outer lr x this worker's last decoded
    # upload, as node/overlap.py does), "published" (the last update published), "mixed" (the worker's
    # own share of the mean, 1/M of its upload, plus the last update published for the other M-1)
    guess: Literal["own", "published", "mixed"] = "own"
    guess_scale: float = GUESS_SCALE  # the guessed update times this (node/overlap.py)


def overlap_down(
    guess: Literal["own", "published", "mixed"] = "own",
    guess_scale: float = GUESS_SCALE,
    ef_beta: float = 0.95,
    tile: int = 64,
    carry: float = 1.0,
    selection: Literal["global", "chunk"] = "global",
) -> Method:
    """Overlapped rounds as miners run them (the version merged after a fifth of the inner steps) with the
    compressed downlink at ``[publish] budget = 2.5`` (and the given error feedback, tile and selection)."""
    downlink = PublishSettings(
        format="sparseloco", budget=2.5, ef_beta=ef_beta, tile=tile, selection=selection
    )
    return Method(
        "pool",
        overlap="merge_eager",
        merge_at=0.2,
        downlink=downlink,
        guess=guess,
        guess_scale=guess_scale,
        carry=carry,
    )


METHODS: dict[str, Method] = {
    "ddp": Method("ddp"),
    # fp32 decodes bit for bit, so the error-feedback residual stays exactly zero whatever beta is.
    "diloco": Method("pool", codec="dense_fp32", outer_lr=0.7, outer_momentum=0.9),
    "sparseloco": Method("pool"),
    "sparseloco_k128": Method("pool", k=128),
    # the inner rate decaying along a cosine to a tenth of its peak over the run's rounds
    "sparseloco_cosine": Method("pool", schedule="cosine"),
    "sparseloco_no_ef": Method("pool", ef_beta=0.0),
    # the compressed downlink at the [publish] defaults (coordinator's error feedback: k=192, 2 bits, 0.95),
    # and at the defaults before them (k=128)
    "sparseloco_down": Method("pool", downlink=PublishSettings(format="sparseloco")),
    "sparseloco_down_k128": Method("pool", downlink=PublishSettings(format="sparseloco", k=128)),
    # the other points measured for the defaults (BENCHMARKS.md), each with the coordinator's EF at 1.0
    "sparseloco_down_ef1": Method("pool", downlink=PublishSettings(format="sparseloco", k=128, ef_beta=1.0)),
    "sparseloco_down_k64": Method("pool", downlink=PublishSettings(format="sparseloco", k=64, ef_beta=1.0)),
    "sparseloco_down_4bit": Method(
        "pool", downlink=PublishSettings(format="sparseloco", k=128, bits=4, ef_beta=1.0)
    ),
    "sparseloco_down_k192": Method("pool", downlink=PublishSettings(format="sparseloco", k=192, ef_beta=1.0)),
    "sparseloco_down_k256": Method("pool", downlink=PublishSettings(format="sparseloco", k=256, ef_beta=1.0)),
    # the published update sized by a [publish] budget, in uploads (k the largest that fits: 104, 148, 192
    # and 240 for the tiny model), at the default error feedback: the README's table of budget against loss
    **{
        f"sparseloco_down_b{b:g}": Method("pool", downlink=PublishSettings(format="sparseloco", budget=b))
        for b in (1.5, 2.0, 2.5, 3.0)
    },
    # overlapped rounds (node/overlap.py): the miner's way, the version being made arriving after a fifth
    # of the inner steps (where `make demo`'s miners merge it: after 3 or 4 of 20); then later, and each
    # part alone
    "sparseloco_overlap": Method("pool", overlap="merge_eager", merge_at=0.2),
    "sparseloco_overlap_down": Method(
        "pool", overlap="merge_eager", merge_at=0.2, downlink=PublishSettings(format="sparseloco")
    ),
    "sparseloco_overlap_down_b2.5": overlap_down(),
    # the same with the coordinator's error feedback decaying faster
    **{f"sparseloco_overlap_down_b2.5_ef{ef:g}": overlap_down(ef_beta=ef) for ef in (0.9, 0.8)},
    # and with the published update cut into larger chunks (tile 128 or 256 rather than 64, k from the same
    # budget): the same bytes, more room to put the coordinates where the aggregate's energy is
    **{f"sparseloco_overlap_down_b2.5_tile{t}": overlap_down(tile=t) for t in (128, 256)},
    **{
        f"sparseloco_down_b2.5_tile{t}": Method(
            "pool", downlink=PublishSettings(format="sparseloco", budget=2.5, tile=t)
        )
        for t in (128, 256)
    },
    # and with other guesses of the version being made at the eager start, or the miner's own scaled
    **{f"sparseloco_overlap_down_b2.5_guess_{g}": overlap_down(guess=g) for g in ("published", "mixed")},
    **{
        f"sparseloco_overlap_down_b2.5_guess_x{x:g}": overlap_down(guess_scale=x)
        for x in (0.5, 1.25, 1.5, 1.75, 2, 2.5)
    },
    # the miner's own upload x 1.5 as the guess, with the steps trained before the merge kept in part
    **{
        f"sparseloco_overlap_down_b2.5_guess_x1.5_carry{c:g}": overlap_down(guess_scale=1.5, carry=c)
        for c in (0.5, 0.75)
    },
    # the published update with the same k in every chunk rather than a count per chunk in its bytes, and
    # overlapped rounds with the miner's guess at its own upload (x1): the defaults before both
    "sparseloco_down_chunk": Method("pool", downlink=PublishSettings(format="sparseloco", selection="chunk")),
    "sparseloco_overlap_down_chunk": overlap_down(selection="chunk", guess_scale=1.0),
    "sparseloco_overlap_down_chunk_guess_x1.5": overlap_down(selection="chunk"),
    "sparseloco_overlap_down_guess_x1": overlap_down(guess_scale=1.0),
    # the guess when the version comes late (after half of the inner steps) or not at all (a slow close)
    **{
        f"sparseloco_overlap_down_{when}_guess_x{g:g}": replace(overlap_down(guess_scale=g), **late)
        for when, late in (("half", {"merge_at": 0.5}), ("never", {"overlap": "eager"}))
        for g in (1.0, 1.5)
    },
    "sparseloco_overlap_merge30": Method("pool", overlap="merge_eager", merge_at=0.3),
    "sparseloco_overlap_half": Method("pool", overlap="merge_eager", merge_at=0.5),
    "sparseloco_overlap_late": Method("pool", overlap="merge_eager", merge_at=0.9),
    "sparseloco_overlap_eager": Method("pool", overlap="eager"),
    "sparseloco_overlap_merge": Method("pool", overlap="merge"),
    "sparseloco_overlap_delayed": Method("pool", overlap="delayed"),
    "sparseloco_overlap_lr08": Method("pool", overlap="merge_eager", merge_at=0.5, outer_lr=0.8),
    "sparseloco_overlap_carry05": Method("pool", overlap="merge_eager", merge_at=0.5, carry=0.5),
    "single": Method("single"),
}


@dataclass
class Worker:
    model: CausalLM
    trainer: InnerTrainer
    ef: ErrorFeedback


@dataclass
class Tally:
    """What a method measured so far."""

    method: str
    curve: list[dict[str, float | int | None]] = field(default_factory=list)
    payload_bytes: list[int] = field(default_factory=list)
    down_bytes: list[int] = field(default_factory=list)
    train_s: float = 0.0
    comm_s: float = 0.0
    eval_s: float = 0.0
    inner_steps: int = 0
    train_loss: float = math.nan

    def record(self, bench: Bench, round_: int, tokens: int, loss: float) -> None:
        self.curve.append({"round": round_, "tokens": tokens, "eval_loss": finite(loss)})
        log.info(
            "%s round %d/%d: tokens %d, held-out loss %.4f",
            self.method,
            round_,
            bench.cfg.rounds,
            tokens,
            loss,
        )


def finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


# -- the methods ------------------------------------------------------------------------------------------
def run_single_model(bench: Bench, method: Method, tally: Tally) -> None:
    """ddp and single: one model, one optimizer, R*H steps; evaluated after every H steps."""
    c = bench.cfg
    width = c.workers if method.kind == "ddp" else 1
    recipe = bench.recipe.model_copy(update={"batch_size": c.batch_size * width})
    model = build_model(c.model, seed=c.seed).to(bench.device)
    trainer = InnerTrainer(model, recipe, bench.device)
    tally.record(bench, 0, 0, bench.evaluate(model))
    for r in range(c.rounds):
        tokens = bench.ddp_tokens(r) if method.kind == "ddp" else bench.tokens(r, 0)
        result = trainer.run(tokens)
        tally.train_s += result.compute_s
        tally.inner_steps += result.steps
        tally.train_loss = result.loss_after
        t0 = time.perf_counter()
        loss = bench.evaluate(model)
        tally.eval_s += time.perf_counter() - t0
        tally.record(bench, r + 1, (r + 1) * len(tokens) * bench.seq_len, loss)


def run_pool(bench: Bench, method: Method, tally: Tally) -> None:
    """M workers train from theta_v, upload encoded payloads; the coordinator decodes, aggregates, steps."""
    c = bench.cfg
    codec = make_codec(method.codec, method.k)
    outer = OuterOptimizer(method.outer_lr, method.outer_momentum)
    downlink = None if method.downlink is None else Downlink(method.downlink, codec, bench.spec)
    schedule = {"schedule": method.schedule, "planned_rounds": c.rounds}  # a constant rate ignores the length
    recipe = bench.recipe.model_copy(update={"ef_beta": method.ef_beta, **schedule})
    theta = get_params(build_model(c.model, seed=c.seed).to(bench.device))  # the coordinator's theta_v
    workers = []
    for _ in range(c.workers):
        model = build_model(c.model, seed=c.seed).to(bench.device)
        workers.append(
            Worker(model, InnerTrainer(model, recipe, bench.device), ErrorFeedback(recipe.ef_beta))
        )
    tally.record(bench, 0, 0, bench.evaluate_params(theta))
    tokens_seen = 0
    base = {n: t.clone() for n, t in theta.items()}  # what round r trains from
    pending: list[dict[str, torch.Tensor]] = []  # overlap "eager": each worker's last decoded upload
    published: dict[str, torch.Tensor] | None = None  # the update that made ``base`` (overlapped rounds)
    applied: dict[str, torch.Tensor] | None = None  # the update last applied to theta
    for r in range(c.rounds):
        payloads, losses, decodes = [], [], []
        for w, worker in enumerate(workers):  # node/miner.py mine_round, without the network
            tokens = bench.tokens(r, w)
            tokens_seen += len(tokens) * bench.seq_len
            start = base
            if method.overlap in ("eager", "merge_eager") and pending:
                start = {n: t.clone() for n, t in base.items()}
                apply_update(start, guess(method, pending[w], published, c.workers))
            set_params(worker.model, start)
            on_step = None
            if method.overlap in ("merge", "merge_eager") and r > 0:
                on_step = merger(worker.model, start, theta, method.merge_at, c.inner_steps, method.carry)
                start = theta
            result = worker.trainer.run(tokens, on_step=on_step, round_=r)
            tally.train_s += result.compute_s
            tally.inner_steps += result.steps
            losses.append(result.loss_after)
            t0 = time.perf_counter()
            with torch.no_grad():
                local = dict(worker.model.named_parameters())
                delta = {n: start[n] - local[n].detach().float() for n, _ in bench.spec}
            header = PayloadHeader(
                format_version=PAYLOAD_FORMAT_VERSION,
                codec=codec.name,
                round=r,
                base_version=r,
                stats=PayloadStats(
                    compute_s=result.compute_s, loss_before=result.loss_before, loss_after=result.loss_after
                ),
            )
            payload, decoded = codec.encode(worker.ef.accumulate(delta), bench.spec, header)
            worker.ef.subtract(decoded)
            eager = method.overlap in ("eager", "merge_eager")
            decodes.append({n: decoded[n].to_dense(shape) for n, shape in bench.spec} if eager else {})
            payloads.append(payload)
            tally.payload_bytes.append(len(payload))
            tally.comm_s += time.perf_counter() - t0
        tally.train_loss = sum(losses) / len(losses)
        t0 = time.perf_counter()
        updates = [codec.decode(p, bench.spec)[1] for p in payloads]  # what the coordinator sees
        delta, outer.buffers = outer.step(aggregate(updates, bench.spec, bench.device))
        if downlink is not None:  # what miners download and apply: the compressed update
            compressed, delta, downlink.residual = downlink.step(delta)
            tally.down_bytes.append(len(compressed))
        newest = {n: t.clone() for n, t in theta.items()}
        apply_update(theta, delta)
        if method.guess != "own":  # only the other guesses read what was published
            published, applied = applied, {n: d.detach().clone() for n, d in delta.items()}
        base, pending = (newest, decodes) if method.overlap != "off" else (theta, [])
        t1 = time.perf_counter()
        loss = bench.evaluate_params(theta)
        tally.comm_s += t1 - t0
        tally.eval_s += time.perf_counter() - t1
        tally.record(bench, r + 1, tokens_seen, loss)


def guess(
    method: Method,
    own: dict[str, torch.Tensor],
    published: dict[str, torch.Tensor] | None,
    workers: int,
) -> dict[str, torch.Tensor]:
    """The update a worker guesses the version being made will apply (``Method.guess``)."""
    scale = method.guess_scale
    if method.guess == "own" or published is None:
        return {n: scale * method.outer_lr * d for n, d in own.items()}
    if method.guess == "published":
        return {n: scale * d for n, d in published.items()}
    share = method.outer_lr / workers
    return {n: scale * (share * d + (workers - 1) / workers * published[n]) for n, d in own.items()}


def merger(
    model: CausalLM,
    base: dict[str, torch.Tensor],
    newest: dict[str, torch.Tensor],
    at: float,
    steps: int,
    carry: float = 1.0,
) -> Callable[[dict[str, float]], None]:
    """An inner-step callback that, after ``at`` of the steps (the version being made arrives), puts the
    model at ``newest`` moved by ``carry`` x what training had moved it by from ``base`` (1: the model
    moves as its start point would have)."""
    done, after = [0], max(1, min(steps, math.ceil(at * steps)))

    def on_step(_: dict[str, float]) -> None:
        done[0] += 1
        if done[0] == after:
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if carry == 1:
                        p.add_(newest[n] - base[n])
                    else:
                        p.copy_(newest[n] + carry * (p - base[n]))

    return on_step
