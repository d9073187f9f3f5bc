"""The checks that judge a round's uploads when it closes, as a pipeline.

Each check is an object with its refusal ``code`` and its ``phase``: ``cheap`` checks use only what intake
recorded (norm, sketch, digest) and run first; ``evaluated`` checks run after the evaluation (the loss
before and after each update alone, protocol/evaluation.py) on the uploads the cheap ones left. The closer
runs them in pipeline order; the first check to refuse an upload gives the reason. Which uploads were
evaluated is recorded with them, so validators evaluate exactly those. Adding a check is one class here and
one line in ``default_pipeline``.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Literal, Protocol

import torch

from coordinator.settings import CheckSettings, ValidationSettings
from coordinator.storage.records import Refusal, Upload
from protocol.codec.measure import clip_scale, cosine, reference_norm
from protocol.evaluation import Losses
from protocol.wire import LeaderboardEntry

Phase = Literal["cheap", "evaluated"]


@dataclass(frozen=True)
class History:
    """What recent rounds leave for judging this one: accepted norms and gains, and every upload's digest
    and sketch (a replay copies one of those)."""

    norms: Sequence[float] = ()
    gains: Sequence[float] = ()
    digests: frozenset[str] = frozenset()
    sketches: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 1))  # (uploads, buckets), unit rows


@dataclass
class RoundChecks:
    """A round being judged: its uploads in arrival order and what the pipeline found so far."""

    round: int
    uploads: list[Upload]
    history: History = field(default_factory=History)
    refused: dict[str, str] = field(default_factory=dict)  # miner -> reason
    losses: dict[str, Losses] = field(default_factory=dict)  # the evaluation of the uploads it reached
    scores: Callable[[], dict[str, LeaderboardEntry]] | None = None  # standings with this round's results
    # a verdict after the version (a flag): the gain checks refuse only a gain ``sure`` standard errors
    # below their bar, so that an honest upload's sampling noise does not put its miner on probation
    gain_se: dict[str, float] = field(default_factory=dict)
    sure: float = 0.0

    def upper_gain(self, miner: str, gain: float) -> float:
        """The gain a verdict weighs against a bar: the measured one, plus ``sure`` standard errors."""
        return gain + self.sure * self.gain_se.get(miner, 0.0)

    def remaining(self) -> list[Upload]:
        return [u for u in self.uploads if u.miner not in self.refused]

    def reclip(self, ref: float | None, scales: dict[str, float]) -> float | None:
        """The reference norm again over the uploads that judging left, once it refused some after the
        cheap phase, and every scale in ``scales`` to it. Uploads refused there do not pull the reference:
        in a round without history (the first), the tiny norms of as many freeriders as honest miners would
        otherwise halve every honest update of the version."""
        norms = {u.miner: u.norm for u in self.uploads}
        again = reference_norm(self.history.norms, [u.norm for u in self.remaining()])
        if again is None or again == ref:
            return ref
        scales.update({m: clip_scale(norms[m], again) for m in scales})
        return again


class Check(Protocol):
    code: ClassVar[str]
    phase: ClassVar[Phase]

    def refuse(self, j: RoundChecks) -> Iterable[str]:
        """The miners (among ``j.remaining()``) this check refuses."""
        ...


def run_checks(pipeline: Sequence[Check], phase: Phase, j: RoundChecks) -> None:
    for check in pipeline:
        if check.phase == phase:
            for miner in list(check.refuse(j)):
                j.refused.setdefault(miner, check.code)


def run_cheap_checks(pipeline: Sequence[Check], j: RoundChecks) -> tuple[float | None, dict[str, float]]:
    """The cheap phase, then the reference norm of the uploads it left and each one's clip scale."""
    run_checks(pipeline, "cheap", j)
    remaining = j.remaining()
    ref = reference_norm(j.history.norms, [u.norm for u in remaining])
    return ref, ({} if ref is None else {u.miner: clip_scale(u.norm, ref) for u in remaining})


# -- cheap checks ------------------------------------------------------------------------------------------
class NonFinite:
    code: ClassVar[str] = Refusal.NON_FINITE
    phase: ClassVar[Phase] = "cheap"

    def refuse(self, j: RoundChecks) -> Iterable[str]:
        return [u.miner for u in j.remaining() if not math.isfinite(u.norm)]


class EmptyUpdate:
    code: ClassVar[str] = Refusal.EMPTY_UPDATE
    phase: ClassVar[Phase] = "cheap"

    def refuse(self, j: RoundChecks) -> Iterable[str]:
        return [u.miner for u in j.remaining() if u.norm == 0.0]


@dataclass(frozen=True)
class Copied:
    """The later of two uploads of the round with the same tensors, or sketches nearly parallel."""

    copy_cosine: float
    code: ClassVar[str] = Refusal.COPIED_PAYLOAD
    phase: ClassVar[Phase] = "cheap"

    def refuse(self, j: RoundChecks) -> Iterable[str]:
        kept: list[Upload] = []
        for u in j.remaining():
            if any(
                u.content_sha256 == k.content_sha256 or cosine(u.sketch, k.sketch) > self.copy_cosine
                for k in kept
            ):
                yield u.miner
            else:
                kept.append(u)


@dataclass(frozen=True)
class Replayed:
    """An upload with the tensors, or nearly the sketch, of any upload of the recent rounds."""

    copy_cosine: float
    code: ClassVar[str] = Refusal.REPLAYED_UPDATE
    phase: ClassVar[Phase] = "cheap"

    def refuse(self, j: RoundChecks) -> Iterable[str]:
        h = j.history
        for u in j.remaining():
            if u.content_sha256 in h.digests or self._parallel(h.sketches, u.sketch):
                yield u.miner

    def _parallel(self, sketches: torch.Tensor, sketch: torch.Tensor) -> bool:
        n = float(sketch.double().norm())
        return (
            bool(len(sketches))
            and n > 0
            and float((sketches @ (sketch.double() / n)).max()) > self.copy_cosine
        )


@dataclass(frozen=True)
class NormOutlier:
    """A norm above ``max_ratio`` x the reference norm (this round's and recent rounds' accepted norms)."""

    max_ratio: float
    code: ClassVar[str] = Refusal.NORM_OUTLIER
    phase: ClassVar[Phase] = "cheap"

    def refuse(self, j: RoundChecks) -> Iterable[str]:
        remaining = j.remaining()
        ref = reference_norm(j.history.norms, [u.norm for u in remaining])
        if ref is None or len(j.history.norms) + len(remaining) < 3:
            return []
        return [u.miner for u in remaining if u.norm > self.max_ratio * ref]


# -- evaluated checks --------------------------------------------------------------------------------------
class NonFiniteLoss:
    code: ClassVar[str] = Refusal.NON_FINITE_LOSS
    phase: ClassVar[Phase] = "evaluated"

    def refuse(self, j: RoundChecks) -> Iterable[str]:
        return [m for m, x in j.losses.items() if m not in j.refused and not x.finite()]


class Harmful:
    code: ClassVar[str] = Refusal.HARMFUL
    phase: ClassVar[Phase] = "evaluated"

    def refuse(self, j: RoundChecks) -> Iterable[str]:
        return [m for m, x in j.losses.items() if m not in j.refused and j.upper_gain(m, x.gain) <= 0]


@dataclass(frozen=True)
class LowGain:
    """A gain below ``fraction`` x the reference gain: the median of this round's positive gains, but never
    below ``HISTORY_FLOOR`` x the median of recent rounds' accepted ones, so that a round of useless uploads
    cannot lower it. The round's own median leads because gains shrink as the loss falls (a bar pooled with
    rounds whose gains were four times larger refused whole rounds of honest uploads); the floor follows
    history only from far below, where no honest upload falls in a few rounds."""

    fraction: float
    code: ClassVar[str] = Refusal.LOW_GAIN
    phase: ClassVar[Phase] = "evaluated"
    HISTORY_FLOOR: ClassVar[float] = 0.25

    def refuse(self, j: RoundChecks) -> Iterable[str]:
        gains = {m: x.gain for m, x in j.losses.items() if m not in j.refused}
        here = [g for g in gains.values() if math.isfinite(g) and g > 0]
        past = [g for g in j.history.gains if math.isfinite(g) and g > 0]
        if self.fraction <= 0 or not (here or past):
            return []
        reference = max(
            statistics.median(here) if here else 0.0,
            self.HISTORY_FLOOR * statistics.median(past) if past else 0.0,
        )
        return [m for m, g in gains.items() if j.upper_gain(m, g) < self.fraction * reference]


class LowScore:
    """weight_by_score: a miner whose average score, with this round's result (overlapped rounds: as of the
    round before, this round's results coming after the version), is below 0 (its conservative score may
    be below 0 for a short record, which only lowers its weight). A miner with no score yet is judged on
    its upload alone."""

    code: ClassVar[str] = Refusal.LOW_SCORE
    phase: ClassVar[Phase] = "evaluated"

    def refuse(self, j: RoundChecks) -> Iterable[str]:
        if j.scores is None:
            return []
        scores = j.scores()
        return [u.miner for u in j.remaining() if (e := scores.get(u.miner)) is not None and e.score_mean < 0]


def default_pipeline(checks: CheckSettings, validation: ValidationSettings) -> list[Check]:
    pipeline: list[Check] = [
        NonFinite(),
        EmptyUpdate(),
        Copied(checks.copy_cosine),
        Replayed(checks.copy_cosine),
        NormOutlier(checks.max_norm_ratio),
        NonFiniteLoss(),
    ]
    if validation.refuse_harmful:
        pipeline.append(Harmful())
    pipeline.append(LowGain(validation.min_gain_fraction))
    if validation.weight_by_score:
        pipeline.append(LowScore())
    return pipeline
