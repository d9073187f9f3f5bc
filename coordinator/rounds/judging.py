"""Judging a round's uploads: the cheap checks, then (``[validation] builtin``) each sampled upload
evaluated alone on the version it will change, then the evaluated checks (rounds/checks.py). Runs in
the closer's thread.

Synchronous rounds evaluate every sampled upload before the version is built. Overlapped rounds keep the
version's path short. The uploads of new miners (a record shorter than ``min_record``) are judged first,
on the first ``gate_sequences`` of their own sample (``gate``: the gain the refusals need, a small part of
an evaluation). Those of miners refused in the last ``RECENT_REFUSAL_ROUNDS`` rounds, or flagged in the
last ``FLAG_ROUNDS``, are on probation: left out of the version, and evaluated after it like the others.
The rest go into the version on the cheap checks and their standing, each clipped to the reference
norm of the uploads that judging left (``Judging.reclip``). Every sampled upload is evaluated in full
once the version is published (``finish``), at that clip, while miners train the next round: that gives its
verdict and score, and flags an upload (accepted or on probation) that the evaluation refuses for sure
(``FLAG_SURE``), which puts or keeps its miner on probation. When most of the evaluated uploads a version
took would be flagged, the round failed rather than its miners (each upload is applied to a newer version
than the one it started from, and in a round where that fails it fails for all), and none of those is
flagged; the scores still count each result. If the version fails the loss guard, the
uploads it holds unjudged are gated too, so that the guard leaves out the least useful ones; a guard
refusal is no evidence against a miner.
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from coordinator.hooks import Hooks
from coordinator.rounds.checks import NEUTRAL, Check, History, Judging, Refusal, judge_cheap, run_phase
from coordinator.rounds.parts import Model, Parts
from coordinator.rounds.state import RoundState
from coordinator.settings import CheckSettings, ValidationSettings
from coordinator.storage.records import Upload
from coordinator.storage.store import COORDINATOR
from protocol.evaluation import Losses, UpdateEvaluator, round_results, round_salt
from protocol.pairing import RoundEvaluation
from protocol.params import Params, load_checkpoint

log = logging.getLogger(__name__)
RECENT_REFUSAL_ROUNDS = 5  # a miner refused this recently is evaluated, and first
FLAG_ROUNDS = 3  # and one flagged this recently (each flag on probation renews it)
FLAG_SURE = 2.0  # a gain flagged after the version lies this many standard errors below the bar


class Stopping(Exception):
    """The coordinator is shutting down: the round stays open, to be closed after the restart."""


@dataclass
class Later:
    """Overlapped rounds: the part of a round's evaluation left for after its version is published."""

    round: int
    evaluation: RoundEvaluation
    uploads: list[Upload]  # to measure then
    scales: dict[str, float]
    history: History
    probation: frozenset[str] = frozenset()  # left out of the version, evaluated all the same


@dataclass
class Judged:
    refused: dict[str, str]
    scales: dict[str, float]
    losses: dict[str, Losses]
    evaluated: set[str]
    reference_norm: float | None
    later: Later | None = None
    first: set[str] = field(default_factory=set)  # the uploads evaluated before the version was built


class Judge:
    def __init__(
        self,
        parts: Parts,
        model: Model,
        checks: CheckSettings,
        validation: ValidationSettings,
        pipeline: Sequence[Check],
        hooks: Hooks,
        stop: threading.Event,
    ) -> None:
        self.p, self.model, self.checks_settings, self.validation = parts, model, checks, validation
        self.pipeline, self.hooks, self.stop = pipeline, hooks, stop

    def judge(
        self, state: RoundState, uploads: list[Upload], subs: Sequence[sqlite3.Row], defer: bool = False
    ) -> Judged:
        """Refusals, clip scales and losses of a round's uploads. ``defer`` (overlapped rounds): leave the
        evaluation of uploads whose miners have a good standing for ``finish``."""
        p, r = self.p, state.round
        j = Judging(r, uploads, self._history(r))
        ref, scales = judge_cheap(self.pipeline, j)
        if not (self.validation.builtin and j.remaining()):
            return Judged(j.refused, scales, {}, set(), ref)
        salt = round_salt(s["sha256"] for s in subs)
        first, later, probation = self._sample(r, j.remaining(), salt, defer)
        evaluation = self._evaluation(r, salt, first + later + probation, self.model.params)
        if defer:
            for u in probation:
                j.refused[u.miner] = Refusal.PROBATION
            j.losses = self._gate(evaluation, r, first, scales, j.refused)
        else:
            self._measure(evaluation, r, first, scales, j.refused)
            j.losses = evaluation.losses()
        # the standing as of the round before, with this round's results when they came before the version
        j.scores = lambda: p.scores.with_round(
            r - 1, {} if defer else round_results(r, j.losses, {u.miner for u in j.remaining()})
        )
        run_phase(self.pipeline, "evaluated", j)
        if defer:  # synchronous rounds measured each verdict at its scale, as validators measure it again
            ref = j.reclip(ref, scales)
        judged = Judged(
            j.refused,
            scales,
            j.losses,
            {u.miner for u in first + later + probation},
            ref,
            first={u.miner for u in first},
        )
        if defer:
            judged.later = Later(
                r,
                evaluation,
                first + later + probation,
                scales,
                j.history,
                frozenset(u.miner for u in probation),
            )
        return judged

    def gate(self, judged: Judged, uploads: Sequence[Upload]) -> None:
        """Overlapped rounds: the gains of uploads that went into the version unjudged, when the version
        failed the loss guard (the guard leaves out the lowest first)."""
        later = judged.later
        todo = [u for u in uploads if u.miner not in judged.losses and u.miner in judged.evaluated]
        if later is None or not todo:
            return
        later.evaluation.evaluator.reset()  # building the version used the model
        judged.losses.update(self._gate(later.evaluation, later.round, todo, judged.scales, judged.refused))

    def finish(self, later: Later, accepted: set[str]) -> tuple[dict[str, Losses], dict[str, str]]:
        """Overlapped rounds, once the version is published: measure every sampled upload, pair them, and
        flag the accepted uploads (and those on probation) that the round's whole evaluation refuses for
        sure (a gain ``FLAG_SURE`` standard errors below the bar: a flag is ``FLAG_ROUNDS`` of probation),
        unless that is most of the version's evaluated uploads. Returns (verdicts, flags)."""
        later.evaluation.evaluator.reset()  # building the version used the model
        refused: dict[str, str] = {}
        self._measure(later.evaluation, later.round, later.uploads, later.scales, refused)
        losses = later.evaluation.losses()
        j = Judging(
            later.round,
            [],
            later.history,
            losses=losses,
            sure=FLAG_SURE,
            gain_se={m: later.evaluation.gain_se(m) for m in losses},
        )
        run_phase([c for c in self.pipeline if c.phase == "evaluated"], "evaluated", j)
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
        coordinator stopped): all of it again, on the version its uploads were applied to. None when that
        version's checkpoint is no longer kept."""
        p = self.p
        kept = p.store.checkpoint(applied_to)
        if kept is None:
            log.warning(
                "round %d: version %d's checkpoint is gone; its evaluation is dropped", round_, applied_to
            )
            return None
        base, _ = load_checkpoint(p.blobs.get(kept[1]), p.spec)
        subs = p.store.round_submissions(round_)
        uploads = [
            Upload(s["miner"], s["sha256"], s["content_sha256"], s["norm"], torch.zeros(0))
            for s in subs
            if s["evaluated"] and s["scale"] is not None
        ]
        salt = round_salt(s["sha256"] for s in subs)
        scales = {s["miner"]: float(s["scale"]) for s in subs if s["scale"] is not None}
        evaluation = self._evaluation(round_, salt, uploads, base)
        return Later(round_, evaluation, uploads, scales, self._history(round_))

    def _history(self, round_: int) -> History:
        p, c = self.p, self.checks_settings
        first = round_ - c.history_rounds
        recent = p.store.recent_uploads(round_ - c.replay_window_rounds, round_)
        sketches = (
            torch.stack(
                [torch.frombuffer(bytearray(r["sketch"]), dtype=torch.float32) for r in recent]
            ).double()
            if recent
            else torch.zeros(0, 1, dtype=torch.float64)
        )
        if len(sketches):
            sketches = sketches / sketches.norm(dim=1, keepdim=True).clamp_min(1e-300)
        return History(
            norms=p.store.accepted_norms(first, round_),
            gains=p.store.accepted_gains(first, round_, COORDINATOR),
            digests=frozenset(r["content_sha256"] for r in recent),
            sketches=sketches,
        )

    def _evaluation(self, round_: int, salt: str, uploads: list[Upload], base: Params) -> RoundEvaluation:
        evaluator = UpdateEvaluator(self.model.module, base, self.p.dataset.sequences)
        return RoundEvaluation(evaluator, self.p.info, round_, salt, [u.miner for u in uploads])

    def _measure(
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
        p, t0 = self.p, time.perf_counter()
        out: dict[str, Losses] = {}
        if not uploads:
            return out
        for u in uploads:
            if self.stop.is_set():
                raise Stopping
            try:
                self.touch(round_, u)
                update = p.codec.decode(p.blobs.get(u.sha256), p.spec)[1]
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
        p.metrics.evaluation.observe(elapsed)
        log.info(
            "round %d: %s %d uploads in %.2f s; gains %s",
            round_,
            "gated" if gain_only else "evaluated",
            len(out),
            elapsed,
            {m[:12]: round(x.gain, 4) for m, x in out.items()},
        )
        return out

    def _gate(
        self,
        evaluation: RoundEvaluation,
        round_: int,
        uploads: Sequence[Upload],
        scales: dict[str, float],
        refused: dict[str, str],
    ) -> dict[str, Losses]:
        return self._measure(evaluation, round_, uploads, scales, refused, gain_only=True)

    def _sample(
        self, round_: int, uploads: list[Upload], salt: str, defer: bool
    ) -> tuple[list[Upload], list[Upload], list[Upload]]:
        """The uploads to evaluate, as (first, later, probation): all, or ``max_evaluated`` of them: those
        whose miner was refused (but by the loss guard) in the last ``RECENT_REFUSAL_ROUNDS`` rounds or
        flagged in the last ``FLAG_ROUNDS`` first, then those with a record shorter than ``min_record``,
        then a draw that nobody can know before the round's payloads are all in (the round's salt).
        Synchronous rounds evaluate them all first. ``defer`` (overlapped rounds): the first tier is on
        probation, the second is judged first, the draw later."""
        v, p = self.validation, self.p
        if not defer and (v.max_evaluated is None or len(uploads) <= v.max_evaluated):
            return uploads, [], []
        since = round_ - RECENT_REFUSAL_ROUNDS - 1
        moot = NEUTRAL | {Refusal.LOSS_GUARD}  # refusals that say nothing of the miner's own upload
        suspect = {
            s["miner"]
            for s in p.store.submissions_between(since, round_ - 1)
            if (s["status"] == "rejected" and s["reason"] not in moot)
            or (s["flag"] and s["round"] >= round_ - FLAG_ROUNDS)
        }
        suspect |= {f["miner"] for f in p.store.intake_refusals(since, round_ - 1)}
        record = {e.miner: e.verdicts for e in p.scores.board(p.store.last_closed_round())}

        def tier(u: Upload) -> int:
            return 0 if u.miner in suspect else 1 if record.get(u.miner, 0) < v.min_record else 2

        def priority(u: Upload) -> tuple[int, bytes]:
            return tier(u), hashlib.sha256(f"{salt}:evaluate:{u.miner}".encode()).digest()

        chosen = sorted(uploads, key=priority)[: v.max_evaluated]
        if len(chosen) < len(uploads):
            log.info("round %d: evaluating %d of %d uploads", round_, len(chosen), len(uploads))
        if not defer:
            return chosen, [], []
        by_tier = [[u for u in chosen if tier(u) == t] for t in (0, 1, 2)]
        return by_tier[1], by_tier[2], by_tier[0]

    def touch(self, round_: int, u: Upload) -> None:
        if self.hooks.on_upload is not None:
            self.hooks.on_upload(round_, u.miner)
