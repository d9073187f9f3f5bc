"""The checks that judge a round's uploads when it closes, as a pipeline.

Each check is an object with its refusal ``code`` and its ``phase``: ``cheap`` checks use only what intake
recorded (norm, sketch, digest) and run first; ``evaluated`` checks run after the evaluation (the loss
before and after each update alone, protocol/evaluation.py) on the uploads the cheap ones left. The closer
runs them in pipeline order; the first check to refuse an upload gives the reason. Which uploads were
evaluated is recorded with them, so validators evaluate exactly those. Adding a check is one class here and
one line in ``default_pipeline``.

**Evidence, not head count.** Keys are free, so no reference that judges uploads is a statistic of whoever
showed up. The norm reference that marks outliers is the median of recent rounds' accepted norms, which no
upload of this round sets; an outlier against it is evaluated before the version, and kept when its gain is
among the round's best (at least ``BEST_FRACTION`` of the best gain). The gain bar (``low_gain``) is a
fraction of the median of the round's best gains, never below a quarter of what recent rounds' accepted
uploads gained: uploads that gain nothing add nothing to the best, however many there are. The version clips
every upload to the trusted reference, and at the start of a run, before there is one, to the median norm of
the uploads judging left (``RoundChecks.reclip``), which the evaluation has shown to help. To move a
reference an attacker must send uploads whose measured gain on their own data is among the round's best,
that is, do the work; and new keys are evaluated before anything they send enters a version.
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
from protocol.codec.measure import clip_scale, cosine, overlaps, reference_norm
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
    overlap: float = 0.0  # the median overlap of kept coordinates between recent rounds' accepted uploads


BEST_FRACTION = 0.5  # the round's best uploads: a gain at least this fraction of the best one


def best_gains(gains: dict[str, float]) -> dict[str, float]:
    """The round's best gains: the positive ones at least ``BEST_FRACTION`` of the largest. Uploads that gain
    nothing never join them, however many there are."""
    positive = {m: g for m, g in gains.items() if math.isfinite(g) and g > 0}
    if not positive:
        return {}
    top = max(positive.values())
    return {m: g for m, g in positive.items() if g >= BEST_FRACTION * top}


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

    def trusted_norm(self) -> float | None:
        """The norm reference no upload of this round sets: the median of recent rounds' accepted norms
        (None at the start of a run)."""
        return reference_norm(self.history.norms, [])

    def norm_suspects(self, max_ratio: float) -> set[str]:
        """The uploads left whose norm is above ``max_ratio`` x the trusted reference: evaluated first."""
        ref = self.trusted_norm()
        return set() if ref is None else {u.miner for u in self.remaining() if u.norm > max_ratio * ref}

    def reclip(self, scales: dict[str, float]) -> float | None:
        """The version's reference norm, and every scale in ``scales`` clipped to it: the trusted reference
        (``trusted_norm``), at which the uploads were evaluated; at the start of a run, before there is
        one, the median norm of the uploads judging left (refused ones do not pull it)."""
        norms = {u.miner: u.norm for u in self.uploads}
        ref = self.trusted_norm()
        if ref is None:
            ref = reference_norm([], [u.norm for u in self.remaining()])
        if ref is not None:
            scales.update({m: clip_scale(norms[m], ref) for m in scales})
        return ref


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


def run_cheap_checks(
    pipeline: Sequence[Check], j: RoundChecks, max_norm_ratio: float
) -> tuple[float | None, dict[str, float]]:
    """The cheap phase, then the reference norm and each upload's scale as it is evaluated: clipped to the
    trusted reference (``RoundChecks.trusted_norm``); as it came (1) for a norm outlier, so that its own
    update shows what it does, and for every upload at the start of a run, before there is a reference.
    ``reclip`` sets the version's scales once judging is done."""
    run_checks(pipeline, "cheap", j)
    ref, suspects = j.trusted_norm(), j.norm_suspects(max_norm_ratio)
    return ref, {
        u.miner: 1.0 if ref is None or u.miner in suspects else clip_scale(u.norm, ref) for u in j.remaining()
    }


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


def accepted_overlap(rounds: Iterable[Sequence[Upload]]) -> float:
    """The median overlap of kept coordinates between the uploads of each round shown to help: accepted,
    evaluated and not flagged after (in a round nothing evaluated, without the coordinator's evaluation:
    accepted). 0: none."""
    found = [
        x
        for uploads in rounds
        for x in overlaps([u.kept for u in _shown_to_help(uploads) if u.kept.numel()]).values()
    ]
    return statistics.median(found) if found else 0.0


def _shown_to_help(uploads: Sequence[Upload]) -> list[Upload]:
    accepted = [u for u in uploads if u.status == "accepted" and u.flag is None]
    evaluated = [u for u in accepted if u.evaluated]
    return evaluated if any(u.evaluated for u in uploads) else accepted


CHANCE_OVERLAP = 0.05  # the least overlap independent uploads are taken to have (random ones: about k/chunk)


@dataclass(frozen=True)
class NearCopied:
    """The later of two uploads of the round that keep far more of the same coordinates than independent
    work does: one update re-encoded (noise added, another key's error feedback) still keeps most of the
    coordinates it kept (benchmarks/near_copies.py measures both). What independent work overlaps by is
    learnt from evidence only: the median overlap between the uploads of recent rounds shown to help
    (``accepted_overlap``), raised to the median of the round's pairs where that is higher, and at least
    ``CHANCE_OVERLAP``. A pair overlapping ``ratio`` times that is a near-copy. Until the run has such a
    record (its first rounds) no upload is refused as a near-copy: a round's own pairs are a head count, and
    a crowd of uploads that keep unrelated coordinates (noise) would pull their median to chance and make
    two honest uploads look alike. Copies could only raise the reference. It needs three uploads with kept
    samples (sparse codecs)."""

    ratio: float
    code: ClassVar[str] = Refusal.NEAR_COPY
    phase: ClassVar[Phase] = "cheap"

    def refuse(self, j: RoundChecks) -> Iterable[str]:
        uploads = [u for u in j.remaining() if u.kept.numel()]
        if len(uploads) < 3 or not j.history.overlap:
            return
        found = overlaps([u.kept for u in uploads])
        pairs = {(uploads[i].miner, uploads[j].miner): x for (i, j), x in found.items()}
        bar = self.ratio * max(statistics.median(pairs.values()), j.history.overlap, CHANCE_OVERLAP)
        kept: list[Upload] = []
        for u in uploads:  # in the order they came: the later of a pair is the copy
            if any(pairs[(k.miner, u.miner)] > bar for k in kept):
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
    """Without the coordinator's own evaluation (``[validation] builtin = false``), where no upload can show
    what it does before the version: a norm above ``max_ratio`` x the reference norm, recent rounds'
    accepted norms, with this round's only while there are fewer than three of those."""

    max_ratio: float
    code: ClassVar[str] = Refusal.NORM_OUTLIER
    phase: ClassVar[Phase] = "cheap"

    def refuse(self, j: RoundChecks) -> Iterable[str]:
        remaining = j.remaining()
        norms = (
            j.history.norms if len(j.history.norms) >= 3 else [*j.history.norms, *(u.norm for u in remaining)]
        )
        ref = reference_norm(norms, [])
        if ref is None or len(norms) < 3:
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
    """A gain below ``fraction`` x the reference gain: the median of the round's best gains (``best_gains``),
    but never below ``HISTORY_FLOOR`` x the median of recent rounds' accepted ones. Uploads that gain nothing
    never join the best, so no number of them lowers the bar; a round of only useless uploads is held to the
    floor. The round's own best lead because gains shrink as the loss falls (a bar pooled with rounds whose
    gains were four times larger refused whole rounds of honest uploads); the floor follows history only
    from far below, where no honest upload falls in a few rounds."""

    fraction: float
    code: ClassVar[str] = Refusal.LOW_GAIN
    phase: ClassVar[Phase] = "evaluated"
    HISTORY_FLOOR: ClassVar[float] = 0.25

    def refuse(self, j: RoundChecks) -> Iterable[str]:
        gains = {m: x.gain for m, x in j.losses.items() if m not in j.refused}
        here = list(best_gains(gains).values())
        past = [g for g in j.history.gains if math.isfinite(g) and g > 0]
        if self.fraction <= 0 or not (here or past):
            return []
        reference = max(
            statistics.median(here) if here else 0.0,
            self.HISTORY_FLOOR * statistics.median(past) if past else 0.0,
        )
        return [m for m, g in gains.items() if j.upper_gain(m, g) < self.fraction * reference]


@dataclass(frozen=True)
class UnprovenOutlier:
    """A norm above ``max_ratio`` x the trusted reference (``RoundChecks.trusted_norm``: no upload of this
    round sets it) whose gain, measured as it came (unclipped), is not among the round's best
    (``best_gains``). An outlier whose own update helps as much as the best is no outlier (norms grow and
    shrink as training goes on, for every miner at once); a rescaled update overshoots, and one that was not
    evaluated has shown nothing."""

    max_ratio: float
    code: ClassVar[str] = Refusal.NORM_OUTLIER
    phase: ClassVar[Phase] = "evaluated"

    def refuse(self, j: RoundChecks) -> Iterable[str]:
        suspects = j.norm_suspects(self.max_ratio)
        if not suspects:
            return []
        best = best_gains({m: x.gain for m, x in j.losses.items() if m not in j.refused})
        return [m for m in sorted(suspects) if m not in best]


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
    outliers = UnprovenOutlier if validation.builtin else NormOutlier
    pipeline: list[Check] = [
        NonFinite(),
        EmptyUpdate(),
        Copied(checks.copy_cosine),
        NearCopied(checks.near_copy_ratio),
        Replayed(checks.copy_cosine),
        outliers(checks.max_norm_ratio),
        NonFiniteLoss(),
    ]
    if validation.refuse_harmful:
        pipeline.append(Harmful())
    pipeline.append(LowGain(validation.min_gain_fraction))
    if validation.weight_by_score:
        pipeline.append(LowScore())
    return pipeline
