"""The settings of what a round does: its timing, checks, aggregation, evaluation, data and the published
update."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import (
    Field,
    model_validator,
)

from coordinator.settings.base import Section, renamed
from protocol.device import Precision


class RoundSettings(Section):
    min_quorum: int = Field(default=1, ge=1, description="uploads needed before a round may close")
    deadline_s: float = Field(default=30.0, gt=0, description="close this long after the first upload")
    adaptive_deadline: bool = Field(
        default=True, description="shorten the deadline to what recent rounds' arrivals needed"
    )
    min_deadline_s: float = Field(default=5.0, gt=0, description="the adaptive deadline's lower bound")
    drop_after_rounds: int = Field(default=2, ge=1, description="stop waiting for a miner silent this long")
    max_close_attempts: int = Field(
        default=3,
        ge=1,
        le=100,
        description="tries before a round that fails to close closes without a version",
    )
    overlap: bool = Field(
        default=True,
        description="open the next round as one starts closing: miners train while it is judged and "
        "published, and its uploads are applied one version after the one they trained from",
    )
    max_staleness: Literal[1] = Field(
        default=1,
        description="versions between the one an upload trained from and the one it is applied to, at "
        "most (overlapped rounds; closing one round at a time makes it exactly 1)",
    )


class CheckSettings(Section):
    """The checks at aggregation (besides decoding, non-finite values and empty updates), and the guard on
    every new version."""

    max_norm_ratio: float = Field(
        default=10.0, gt=1, description="refuse norms above this x the reference norm"
    )
    copy_cosine: float = Field(
        default=0.98, gt=0, le=1, description="refuse the later of two updates this parallel"
    )
    near_copy_ratio: float = Field(
        default=2.2,
        gt=1,
        description="refuse the later of two uploads keeping this many times more of the same coordinates "
        "than independent uploads of the round do (near-copies: one update re-encoded)",
    )
    history_rounds: int = Field(
        default=3,
        ge=0,
        le=100,
        description="recent rounds whose accepted norms and gains join the references",
    )
    replay_window_rounds: int = Field(
        default=20, ge=0, le=10_000, description="refuse a copy of an upload of this many recent rounds"
    )
    max_loss_increase: float = Field(
        default=0.05,
        ge=0,
        description="refuse a version whose held-out loss rises by more than this fraction",
    )


class AggregationSettings(Section):
    """How the accepted updates are combined, after each is clipped to the median norm."""

    method: Literal["mean", "trimmed_mean", "median"] = Field(
        default="mean", description="per coordinate, over the contributors that selected it"
    )
    trim_fraction: float = Field(
        default=0.2, ge=0, lt=0.5, description="trimmed_mean: drop this fraction at each end"
    )


class ValidationSettings(Section):
    """Scoring every upload by what it does to the loss (protocol/evaluation.py), and what aggregation
    does with the scores."""

    builtin: bool = Field(
        default=True,
        description="evaluate every sampled upload here when its round closes (with `assign`: those the "
        "validators leave unscored by the deadline)",
    )
    own_sequences: int = Field(default=48, ge=2, le=1024, description="sample of the miner's assignment")
    other_sequences: int = Field(default=48, ge=2, le=1024, description="sample of data it was not given")
    early_rounds: int = Field(default=4, ge=0, le=1000, description="the run's first rounds, sampled more")
    early_factor: int = Field(
        default=2, ge=1, le=16, description="those rounds draw this many times own and other sequences"
    )
    refuse_harmful: bool = Field(
        default=True, description="refuse an update that does not lower the loss on its own data"
    )
    min_gain_fraction: float = Field(
        default=0.35, ge=0, lt=1, description="refuse gains below this x the round's median (3+); 0: off"
    )
    weight_by_score: bool = Field(
        default=False, description="weight each accepted update by its miner's score (mean weight 1)"
    )
    score_window: int = Field(default=20, ge=1, le=1000, description="rounds a miner's score averages over")
    score_alpha: float | None = Field(
        default=None, gt=0, le=1, description="None: the plain mean over the window; else an exponential one"
    )
    validators: list[str] | None = Field(
        default=None, description="public keys (hex) whose verdicts are taken; None: any signed key"
    )
    max_evaluated: int | None = Field(
        default=16,
        ge=1,
        le=100_000,
        description="uploads evaluated per round at most (None: all): a recent refusal first, then a record "
        "shorter than min_record, then a draw with the round's salt; the others go on the cheap checks",
    )
    min_record: int = Field(default=3, ge=0, le=1000, description="evaluated rounds before a miner may skip")
    batch_size: int = Field(
        default=16, ge=1, le=4096, description="sequences per forward pass when evaluating, on the device"
    )
    precision: Precision = Field(
        default="auto",
        description="evaluation's forward passes: auto (bf16 autocast on CUDA, fp32 on CPU), fp32 or bf16; "
        "the canonical parameters, aggregation and the outer step are fp32 on the CPU whatever this says",
    )
    gate_sequences: int = Field(
        default=16,
        ge=2,
        le=1024,
        description="overlapped rounds: own sequences an upload judged before the version is judged on (the "
        "first of its own sample); the whole evaluation follows the version",
    )
    assign: bool = Field(
        default=False,
        description="share the evaluation among the validators named in `validators`: each sampled "
        "upload evaluated by `redundancy` of them, drawn with the round's salt, after its version "
        "(coordinator/rounds/sharing.py)",
    )
    redundancy: int = Field(default=2, ge=1, le=16, description="assign: validators per sampled upload")
    verdict_deadline_s: float = Field(
        default=120.0,
        gt=0,
        le=86_400,
        description="assign: seconds the validators have, from the assignment, before the coordinator "
        "settles the round with what came (and evaluates the rest itself where `builtin`)",
    )
    tolerance: float = Field(
        default=0.01,
        gt=0,
        le=10,
        description="assign: nats by which two verdicts on one upload may differ in any loss and still "
        "agree; beyond, the coordinator's own evaluation decides and the validators it outvotes are recorded",
    )

    @model_validator(mode="after")
    def _assign_needs_validators(self) -> ValidationSettings:
        if self.assign and not self.validators:
            raise ValueError(
                "[validation] assign needs `validators`, the public keys of the validators it may assign "
                "uploads to: keys are free, so an open list would let new keys decide the verdicts"
            )
        return self


class DataSettings(Section):
    corpus: Path | None = Field(
        default=None, description=".txt/.md/.jsonl/.parquet/.bin file or folder; None: stdlib"
    )
    tokenizer: str = Field(default="byte", description="'byte', or the path of a tokenizer.json")
    max_tokens: int | None = Field(default=None, ge=1024)
    eval_every: int = Field(default=50, ge=2, description="every n-th sequence is held out")
    eval_sequences: int = Field(default=64, ge=1, le=100_000)


class PublishSettings(Section):
    """What every miner downloads each round: the published update. ``sparseloco`` compresses the outer
    step with the coordinator's own error feedback, so it is about one upload's size however many miners
    there are; ``exact`` publishes every touched coordinate in fp32 (the dense baseline's format); ``auto``:
    sparseloco when the uploads are, exact otherwise."""

    format: Literal["auto", "sparseloco", "exact"] = Field(
        default="auto", description="the published update's format (was `codec`, still accepted)"
    )
    k: int = Field(default=192, ge=4, le=4096, description="values kept per chunk of tile x tile")
    tile: int = Field(default=64, ge=8, le=256)
    bits: Literal[2, 4, 8] = Field(default=2, description="bits per value")
    ef_beta: float = Field(default=0.95, ge=0, le=1, description="decay of the coordinator's error feedback")
    checkpoint_every: int = Field(
        default=1,
        ge=1,
        le=10_000,
        description="a full checkpoint every this many versions (version 0 always); the published updates "
        "carry a miner from the nearest one, so at most max_catchup_versions",
    )
    budget: float | None = Field(
        default=None,
        gt=0,
        le=64,
        description="the published update's size in uploads (their tensors): sets `k` to the largest that "
        "fits, `k` itself then ignored; what every miner downloads, traded for loss knowingly",
    )

    selection: Literal["global", "chunk"] = Field(
        default="global",
        description="which values the sparseloco format keeps: `global`, one threshold for the whole model "
        "with a count per chunk, in the bytes that `chunk` takes (the same k, from `k` or `budget`, in each)",
    )

    @model_validator(mode="before")
    @classmethod
    def _old_names(cls, data: Any) -> Any:
        return renamed(data, "codec", "format", "[publish] ")


class OuterSettings(Section):
    """Outer optimizer. Unset values follow the codec: SGD lr 1.0 for sparseloco, Nesterov 0.7/0.9 dense."""

    lr: float | None = Field(default=None, gt=0)
    momentum: float | None = Field(default=None, ge=0, lt=1)
