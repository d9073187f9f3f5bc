"""Judging a round's uploads: the cheap checks, then (``[validation] builtin``) each sampled upload
evaluated alone on the version it will change, then the evaluated checks (coordinator/checks.py). Runs in
the closer's thread."""

from __future__ import annotations

import hashlib
import logging
import sqlite3
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from coordinator.checks import NEUTRAL, Check, History, Judging, Refusal, Upload, judge_cheap, run_phase
from coordinator.hooks import Hooks
from coordinator.parts import Model, Parts
from coordinator.settings import CheckSettings, ValidationSettings
from coordinator.state import RoundState
from coordinator.store import COORDINATOR
from protocol.evaluation import Losses, UpdateEvaluator, round_results, round_salt
from protocol.pairing import RoundEvaluation

log = logging.getLogger(__name__)
RECENT_REFUSAL_ROUNDS = 5  # max_evaluated: a miner refused this recently is always evaluated


class Stopping(Exception):
    """The coordinator is shutting down: the round stays open, to be closed after the restart."""


@dataclass
class Judged:
    refused: dict[str, str]
    scales: dict[str, float]
    losses: dict[str, Losses]
    evaluated: set[str]
    reference_norm: float | None


class Judge:
    def __init__(self, parts: Parts, model: Model, checks: CheckSettings, validation: ValidationSettings,
                 pipeline: Sequence[Check], hooks: Hooks, stop: threading.Event) -> None:  # fmt: skip
        self.p, self.model, self.checks_settings, self.validation = parts, model, checks, validation
        self.pipeline, self.hooks, self.stop = pipeline, hooks, stop

    def judge(self, state: RoundState, uploads: list[Upload], subs: Sequence[sqlite3.Row]) -> Judged:
        p, r = self.p, state.round
        j = Judging(r, uploads, self._history(r))
        ref, scales = judge_cheap(self.pipeline, j)
        evaluated: set[str] = set()
        if self.validation.builtin and j.remaining():
            j.losses = self._measure(state, j, scales, [s["sha256"] for s in subs])
            evaluated = set(j.losses)
            board_through = r - 1
            j.scores = lambda: p.scores.with_round(board_through, round_results(
                r, j.losses, {u.miner for u in j.remaining()}))  # fmt: skip
            run_phase(self.pipeline, "evaluated", j)
        return Judged(j.refused, scales, j.losses, evaluated, ref)

    def _history(self, round_: int) -> History:
        p, c = self.p, self.checks_settings
        first = round_ - c.history_rounds
        recent = p.store.recent_uploads(round_ - c.replay_window_rounds, round_)
        sketches = torch.stack([torch.frombuffer(bytearray(r["sketch"]), dtype=torch.float32) for r in recent]
                               ).double() if recent else torch.zeros(0, 1, dtype=torch.float64)  # fmt: skip
        if len(sketches):
            sketches = sketches / sketches.norm(dim=1, keepdim=True).clamp_min(1e-300)
        return History(
            norms=p.store.accepted_norms(first, round_),
            gains=p.store.accepted_gains(first, round_, COORDINATOR),
            digests=frozenset(r["content_sha256"] for r in recent),
            sketches=sketches,
        )

    def _measure(self, state: RoundState, j: Judging, scales: dict[str, float],
                 payload_shas: list[str]) -> dict[str, Losses]:  # fmt: skip
        """Each remaining upload's losses before and after it is applied alone, scaled as aggregation
        scales it; an upload whose evaluation fails is refused."""
        p, t0 = self.p, time.perf_counter()
        salt = round_salt(payload_shas)
        evaluator = UpdateEvaluator(self.model.module, self.model.params, p.dataset.sequences)
        chosen = self._sample(state.round, j.remaining(), salt)
        evaluation = RoundEvaluation(evaluator, p.info, state.round, salt, [u.miner for u in chosen])
        for u in chosen:
            if self.stop.is_set():
                raise Stopping
            try:
                self.touch(state.round, u)
                update = p.codec.decode(p.blobs.get(u.sha256), p.spec)[1]
                evaluation.measure(u.miner, update, scales[u.miner])
            except Exception as e:
                log.warning(
                    "round %d: evaluating miner %s's upload failed (%s)", state.round, u.miner[:12], e
                )
                j.refused.setdefault(u.miner, Refusal.UNREADABLE)
        out = evaluation.losses()
        elapsed = time.perf_counter() - t0
        p.metrics.evaluation.observe(elapsed)
        log.info("round %d: evaluated %d uploads in %.2f s; gains %s", state.round, len(out), elapsed,
                 {m[:12]: round(x.gain, 4) for m, x in out.items()})  # fmt: skip
        return out

    def _sample(self, round_: int, uploads: list[Upload], salt: str) -> list[Upload]:
        """The uploads to evaluate: all, or ``max_evaluated`` of them: those whose miner was refused in the
        last ``RECENT_REFUSAL_ROUNDS`` rounds first, then those with a record shorter than ``min_record``,
        then a draw that nobody can know before the round's payloads are all in (the round's salt)."""
        v, p = self.validation, self.p
        if v.max_evaluated is None or len(uploads) <= v.max_evaluated:
            return uploads
        since = round_ - RECENT_REFUSAL_ROUNDS - 1
        refused = {s["miner"] for s in p.store.submissions_between(since, round_ - 1)
                   if s["status"] == "rejected" and s["reason"] not in NEUTRAL}  # fmt: skip
        refused |= {f["miner"] for f in p.store.intake_refusals(since, round_ - 1)}
        record = {e.miner: e.verdicts for e in p.scores.board(p.store.last_closed_round())}

        def priority(u: Upload) -> tuple[int, bytes]:
            tier = 0 if u.miner in refused else 1 if record.get(u.miner, 0) < v.min_record else 2
            return tier, hashlib.sha256(f"{salt}:evaluate:{u.miner}".encode()).digest()

        chosen = sorted(uploads, key=priority)[: v.max_evaluated]
        log.info("round %d: evaluating %d of %d uploads", round_, len(chosen), len(uploads))
        return chosen

    def touch(self, round_: int, u: Upload) -> None:
        if self.hooks.on_upload is not None:
            self.hooks.on_upload(round_, u.miner)
