"""Judging a round's uploads: the cheap checks, then (``[validation] builtin``) each sampled upload
evaluated alone on the version it will change, then the evaluated checks (rounds/checks.py). Runs in the
closer's thread. The round mode (rounds/modes.py) says which of the two judgements a round gets:

- ``before_version`` (synchronous rounds): every sampled upload is evaluated in full before the version is
  built; its verdict, the checks and the weights all come from that evaluation.
- ``around_version`` (overlapped rounds) keeps the version's path short. The uploads of new miners (a record
  shorter than ``min_record``) are judged first, on the first ``gate_sequences`` of their own sample
  (``gate``: the gain the refusals need, a small part of an evaluation). Those of miners refused in the last
  ``RECENT_REFUSAL_ROUNDS`` rounds, or flagged in the last ``FLAG_ROUNDS``, are on probation: left out of
  the version, and evaluated after it like the others. The rest go into the version on the cheap checks and
  their standing, each clipped to the version's reference norm (``RoundChecks.reclip``). Every sampled
  upload is evaluated in full once the version is published (``after_version``), at that clip, while miners
  train the next round: that gives its verdict and score, and flags an upload (accepted or on probation)
  that the evaluation refuses for sure (``FLAG_SURE``), which puts or keeps its miner on probation. When
  most of the evaluated uploads a version took would be flagged, the round failed rather than its miners
  (each upload is applied to a newer version than the one it started from, and in a round where that fails
  it fails for all), and none of those is flagged; the scores still count each result.

With ``[validation] assign`` every round is judged around its version, and the evaluation after it is
the validators' (rounds/sharing.py): the coordinator evaluates only what they leave or disagree on.

If a version fails the loss guard, the publisher leaves out the most suspect uploads first
(``most_suspect_first``: the lowest gain, the uploads held unjudged gated for it); a guard refusal is no
evidence against a miner.
"""

from __future__ import annotations

import hashlib
import logging
import math
import statistics
import threading
import time
from collections.abc import Callable, Sequence

import torch

from coordinator.errors import Stopping
from coordinator.metrics import Metrics
from coordinator.rounds.checks import (
    Check,
    History,
    RoundChecks,
    accepted_overlap,
    run_cheap_checks,
    run_checks,
)
from coordinator.rounds.judgement import Judgement, Later
from coordinator.rounds.reading import Evaluations, UploadReader
from coordinator.rounds.scoring import Scores
from coordinator.rounds.sharing import Sharing
from coordinator.settings import CheckSettings, ValidationSettings
from coordinator.storage.base import Store
from coordinator.storage.blobs import BlobStore
from coordinator.storage.lineage import Lineage, LineageError
from coordinator.storage.records import NEUTRAL, Refusal, Upload
from coordinator.storage.scores import COORDINATOR
from protocol.codec import Codec, ParamSpec
from protocol.evaluation import Losses, round_results, round_salt
from protocol.pairing import RoundEvaluation

log = logging.getLogger(__name__)
RECENT_REFUSAL_ROUNDS = 5  # a miner refused this recently is evaluated, and first
FLAG_ROUNDS = 3  # and one flagged this recently (each flag on probation renews it)
FLAG_SURE = 2.0  # a gain flagged after the version lies this many standard errors below the bar
MIN_WEIGHT_SCORE = 0.05  # weight_by_score: the least score an accepted upload is weighted by


_Tier = Callable[[Upload], int]


class Judge:
    def __init__(
        self,
        store: Store,
        blobs: BlobStore,
        reader: UploadReader,
        codec: Codec,
        spec: ParamSpec,
        evaluations: Evaluations,
        scores: Scores,
        metrics: Metrics,
        checks: CheckSettings,
        validation: ValidationSettings,
        pipeline: Sequence[Check],
        stop: threading.Event,
        lineage: Lineage,
        sharing: Sharing | None = None,
    ) -> None:
        self.store, self.blobs, self.reader, self.codec, self.spec = store, blobs, reader, codec, spec
        self.evaluations, self.scores, self.metrics = evaluations, scores, metrics
        self.checks, self.validation, self.pipeline, self.stop = checks, validation, pipeline, stop
        self.lineage, self.sharing = lineage, sharing

    # -- the two judgements -------------------------------------------------------------------------------
    def before_version(self, round_: int, uploads: list[Upload], salt: str) -> Judgement:
        """Synchronous rounds: every sampled upload evaluated in full at the scale the version will apply,
        then the evaluated checks and the weights with this round's results."""
        j = RoundChecks(round_, uploads, self.history(round_))
        _, scales = run_cheap_checks(self.pipeline, j, self.checks.max_norm_ratio)
        if not (self.validation.builtin and j.remaining()):
            return Judgement(j.refused, scales, {}, set(), j.reclip(scales))
        sample = self.sample(round_, j, salt)
        evaluation = self.evaluations.of(round_, salt, sample)
        self.measure(evaluation, round_, sample, scales, j.refused)
        j.losses = evaluation.losses()
        j.scores = lambda: self.scores.with_round(  # with this round's results, as the checks leave it
            round_ - 1, round_results(round_, j.losses, {u.miner for u in j.remaining()})
        )
        run_checks(self.pipeline, "evaluated", j)
        # the version applies each upload at the scale its verdict was measured at (as validators measure
        # it again): clipped to the trusted norm; an outlier kept for its gain, and every upload at the start
        # of a run, before there is a trusted norm, as it came
        ref = j.trusted_norm()
        judgement = Judgement(j.refused, scales, j.losses, {u.miner for u in sample}, ref)
        judgement.weights = self.weights(round_, judgement, uploads, this_round=True)
        return judgement

    def around_version(self, round_: int, uploads: list[Upload], salt: str) -> Judgement:
        """Overlapped rounds: new miners and norm outliers gated, suspect miners on probation, the rest in
        on their standing; every sampled upload evaluated in full after the version (``Judgement.later``)."""
        j = RoundChecks(round_, uploads, self.history(round_))
        _, scales = run_cheap_checks(self.pipeline, j, self.checks.max_norm_ratio)
        if not ((self.validation.builtin or self.sharing) and j.remaining()):
            return Judgement(j.refused, scales, {}, set(), j.reclip(scales))
        probation, first, later = self.tiers(round_, j, salt)
        sample = first + later + probation
        evaluation = self.evaluations.of(round_, salt, sample)
        for u in probation:
            j.refused[u.miner] = Refusal.PROBATION
        j.losses = self.measure(evaluation, round_, first, scales, j.refused, gain_only=True)
        j.scores = lambda: self.scores.with_round(round_ - 1, {})  # the standing as of the round before
        run_checks(self.pipeline, "evaluated", j)
        ref = j.reclip(scales)  # verdicts come after, measured at the scale the version applies
        judgement = Judgement(j.refused, scales, j.losses, {u.miner for u in sample}, ref)
        judgement.later = Later(
            round_, evaluation, sample, scales, j.history, frozenset(u.miner for u in probation), salt
        )
        judgement.weights = self.weights(round_, judgement, uploads, this_round=False)
        return judgement

    def after_version(self, later: Later, accepted: set[str]) -> tuple[dict[str, Losses], dict[str, str]]:
        """Overlapped rounds, once the version is published: measure every sampled upload, pair them, and
        flag the accepted uploads (and those on probation) that the round's whole evaluation refuses for
        sure (a gain ``FLAG_SURE`` standard errors below the bar: a flag is ``FLAG_ROUNDS`` of probation),
        unless that is most of the version's evaluated uploads. With ``assign``, the validators evaluate
        them (rounds/sharing.py). Returns (verdicts, flags)."""
        later.evaluation.evaluator.reset()  # building the version used the model
        refused: dict[str, str] = {}
        if self.sharing is None:
            losses, gain_se = self._evaluate(later, {u.miner for u in later.uploads}, refused)
        else:
            losses, gain_se = self.sharing.settle(
                later.round,
                later.salt,
                later.uploads,
                lambda miners: self._evaluate(later, miners, refused),
            )
        j = RoundChecks(later.round, [], later.history, losses=losses, sure=FLAG_SURE, gain_se=gain_se)
        run_checks([c for c in self.pipeline if c.phase == "evaluated"], "evaluated", j)
        flags = {m: code for m, code in (refused | j.refused).items() if m in accepted | later.probation}
        judged = accepted & set(losses)  # the version's uploads that were evaluated
        failed = judged & set(flags)
        if 2 * len(failed) > len(judged):  # most of them: the round failed, not its miners
            log.warning(
                "round %d: %d of the version's %d evaluated uploads fail after it; none is flagged",
                later.round,
                len(failed),
                len(judged),
            )
            flags = {m: code for m, code in flags.items() if m not in accepted}
        if flags:
            log.warning(
                "round %d: accepted uploads flagged once evaluated: %s",
                later.round,
                {m[:12]: code for m, code in flags.items()},
            )
        return losses, flags

    def rescore(self, round_: int, applied_to: int) -> Later | None:
        """A closed round whose evaluation was left for after its version and never finished (the
        coordinator stopped): all of it again, on the version its uploads were applied to (from its
        checkpoint, or the one before it and the published updates since). None when that version can no
        longer be rebuilt (no checkpoint kept on its line)."""
        try:
            base = self.lineage.params_at(applied_to)
        except LineageError as e:
            log.warning("round %d: %s; its evaluation is dropped", round_, e)
            return None
        recorded = self.store.round_uploads(round_)
        uploads = [u for u in recorded if u.evaluated and u.scale is not None]
        salt = round_salt(u.sha256 for u in recorded)
        scales = {u.miner: u.scale for u in recorded if u.scale is not None}
        evaluation = self.evaluations.of(round_, salt, uploads, base)
        return Later(round_, evaluation, uploads, scales, self.history(round_), salt=salt)

    def _evaluate(
        self, later: Later, miners: set[str], refused: dict[str, str]
    ) -> tuple[dict[str, Losses], dict[str, float]]:
        """``miners``' uploads of the sample measured here, the rest decoded into the round's mean update
        (another evaluator's share), paired: their losses and gains' standard errors."""
        measured = [u for u in later.uploads if u.miner in miners]
        self.measure(later.evaluation, later.round, measured, later.scales, refused)
        for u in later.uploads:
            if u.miner not in miners:
                try:
                    update = self.codec.decode(self.reader.payload(later.round, u), self.spec)[1]
                except Exception as e:  # left out of the mean; its own verdict settles it
                    log.warning("round %d: reading %s's upload failed (%s)", later.round, u.miner[:12], e)
                    continue
                later.evaluation.include(update, later.scales[u.miner])
        losses = later.evaluation.losses()
        return losses, {m: later.evaluation.gain_se(m) for m in losses}

    # -- when the version fails the guard -----------------------------------------------------------------
    def most_suspect_first(self, judgement: Judgement, uploads: Sequence[Upload]) -> list[Upload]:
        """The lowest evaluated gain first (an unevaluated upload before any), then the largest norm.
        Overlapped rounds gate the uploads that went into the version unjudged, so that their gains count
        (the results go into ``judgement.losses``)."""
        later = judgement.later
        todo = [u for u in uploads if u.miner not in judgement.losses and u.miner in judgement.evaluated]
        if later is not None and todo:
            later.evaluation.evaluator.reset()  # building the version used the model
            gains = self.measure(
                later.evaluation, later.round, todo, judgement.scales, judgement.refused, gain_only=True
            )
            judgement.losses.update(gains)

        def suspicion(u: Upload) -> tuple[float, float]:
            x = judgement.losses.get(u.miner)
            gain = x.gain if x is not None and math.isfinite(x.gain) else -math.inf
            return gain, -u.norm if math.isfinite(u.norm) else -math.inf

        return sorted(uploads, key=suspicion)

    # -- helpers ------------------------------------------------------------------------------------------
    def history(self, round_: int) -> History:
        c, store = self.checks, self.store
        first = round_ - c.history_rounds
        recent = store.recent_uploads(round_ - c.replay_window_rounds, round_)
        sketches = (
            torch.stack([r.sketch for r in recent]).double()
            if recent
            else torch.zeros(0, 1, dtype=torch.float64)
        )
        if len(sketches):
            sketches = sketches / sketches.norm(dim=1, keepdim=True).clamp_min(1e-300)
        return History(
            norms=store.accepted_norms(first, round_),
            gains=store.accepted_gains(first, round_, COORDINATOR),
            digests=frozenset(r.content_sha256 for r in recent),
            sketches=sketches,
            overlap=accepted_overlap([store.round_uploads(r) for r in range(max(0, first), round_)]),
        )

    def measure(
        self,
        evaluation: RoundEvaluation,
        round_: int,
        uploads: Sequence[Upload],
        scales: dict[str, float],
        refused: dict[str, str],
        gain_only: bool = False,
    ) -> dict[str, Losses]:
        """Each upload's losses before and after it is applied alone, scaled as aggregation scales it (the
        plain margin; ``gain_only``: on its own sample only); an upload whose evaluation fails is refused."""
        t0 = time.perf_counter()
        out: dict[str, Losses] = {}
        if not uploads:
            return out
        for u in uploads:
            if self.stop.is_set():
                raise Stopping
            try:
                update = self.codec.decode(self.reader.payload(round_, u), self.spec)[1]
                scale = scales[u.miner]
                out[u.miner] = (
                    evaluation.gain(u.miner, update, scale, self.validation.gate_sequences)
                    if gain_only
                    else evaluation.measure(u.miner, update, scale)
                )
            except Exception as e:
                log.warning("round %d: evaluating miner %s's upload failed (%s)", round_, u.miner[:12], e)
                refused.setdefault(u.miner, Refusal.UNREADABLE)
        elapsed = time.perf_counter() - t0
        self.metrics.evaluation.observe(elapsed)
        log.info(
            "round %d: %s %d uploads in %.2f s; gains %s",
            round_,
            "gated" if gain_only else "evaluated",
            len(out),
            elapsed,
            {m[:12]: round(x.gain, 4) for m, x in out.items()},
        )
        return out

    def sample(self, round_: int, j: RoundChecks, salt: str) -> list[Upload]:
        """The uploads to evaluate: all, or ``max_evaluated`` of them in ``_chosen``'s order."""
        v, uploads = self.validation, j.remaining()
        if v.max_evaluated is None or len(uploads) <= v.max_evaluated:
            return uploads
        return self._chosen(round_, j, salt)[0]

    def tiers(
        self, round_: int, j: RoundChecks, salt: str
    ) -> tuple[list[Upload], list[Upload], list[Upload]]:
        """The sample as (probation, judged first, judged after the version): the suspect miners, the new
        miners and norm outliers, the rest."""
        chosen, tier = self._chosen(round_, j, salt)
        by_tier = [[u for u in chosen if tier(u) == t] for t in (0, 1, 2)]
        return by_tier[0], by_tier[1], by_tier[2]

    def _chosen(self, round_: int, j: RoundChecks, salt: str) -> tuple[list[Upload], _Tier]:
        """The sample, ``max_evaluated`` of the uploads left (all when that is None): those whose miner was
        refused (but by the loss guard) in the last ``RECENT_REFUSAL_ROUNDS`` rounds or flagged in the last
        ``FLAG_ROUNDS`` first, then those with a record shorter than ``min_record`` and the norm outliers
        (``RoundChecks.norm_suspects``), then a draw that nobody can know before the round's payloads are
        all in (the round's salt). Uploads of the first two tiers beyond the sample are refused
        (``unevaluated``): nothing unproven enters a version, however many new keys there are."""
        v, store, uploads = self.validation, self.store, j.remaining()
        since = round_ - RECENT_REFUSAL_ROUNDS - 1
        moot = NEUTRAL | {Refusal.LOSS_GUARD}  # refusals that say nothing of the miner's own upload
        suspect = {
            s.miner
            for s in store.submissions_between(since, round_ - 1)
            if (s.status == "rejected" and s.reason not in moot)
            or (s.flag and s.round >= round_ - FLAG_ROUNDS)
        }
        suspect |= {f.miner for f in store.intake_refusals(since, round_ - 1)}
        again = set() if self.sharing is None else store.unscored_uploads(round_ - 1)  # sampled, no verdict
        record = {e.miner: e.verdicts for e in self.scores.board(store.last_closed_round())}
        outliers = j.norm_suspects(self.checks.max_norm_ratio)

        def tier(u: Upload) -> int:
            if u.miner in outliers:  # judged on what its own update does, before anything else
                return 1
            if u.miner in suspect:
                return 0
            return 1 if record.get(u.miner, 0) < v.min_record or u.miner in again else 2

        def priority(u: Upload) -> tuple[int, bytes]:
            return tier(u), hashlib.sha256(f"{salt}:evaluate:{u.miner}".encode()).digest()

        chosen = sorted(uploads, key=priority)[: v.max_evaluated]
        if len(chosen) < len(uploads):
            log.info("round %d: evaluating %d of %d uploads", round_, len(chosen), len(uploads))
            taken = {u.miner for u in chosen}
            for u in uploads:
                if u.miner not in taken and tier(u) < 2:
                    j.refused[u.miner] = Refusal.UNEVALUATED
        return chosen, tier

    def weights(
        self, round_: int, judgement: Judgement, uploads: list[Upload], this_round: bool
    ) -> dict[str, float]:
        """weight_by_score: each accepted upload's weight, its miner's score over the mean (mean 1): with
        this round's results (``this_round``: synchronous rounds), or as of the round before (overlapped
        ones, whose results come after the version)."""
        if not self.validation.weight_by_score or not (judgement.losses or judgement.later):
            return {}
        kept = {u.miner for u in uploads if u.miner not in judgement.refused}
        results = round_results(round_, judgement.losses, kept) if this_round else {}
        board = self.scores.with_round(max(-1, round_ - 1), results)
        # the conservative score, floored so that a short record weighs a little, never nothing
        positive = {
            m: max(MIN_WEIGHT_SCORE, board[m].score) if m in board else MIN_WEIGHT_SCORE for m in kept
        }
        mean = statistics.fmean(positive.values()) if positive else 1.0
        return {m: s / mean for m, s in positive.items()}
