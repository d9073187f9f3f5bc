"""The closer: one thread that closes rounds. It sleeps until the round changes or its deadline comes, and
when the round is ready it judges the uploads (rounds/judging.py), builds and guards the next version
(coordinator/publishing/publisher.py) and commits everything in one transaction.

Synchronous rounds: the next round opens when the version is committed, for that version. Overlapped rounds
(``[rounds] overlap``): the next round opens as this one starts closing, for the version current then, so
miners train it while this one is judged and published; its uploads are judged against and applied to the
version this round publishes. Closing stays one round at a time, so an upload is applied at most one
version after the one it trained from (``max_staleness = 1``), and every check sees the exact model the
upload will change. The version comes first: the uploads of miners with a good standing are evaluated
once it is committed (``_finish``, rounds/judging.py), before the next round is closed; checkpoints
are pruned only then, so that a restart can evaluate a round left unfinished on the version it changed.

A round always ends. A failure while one upload is read, evaluated or aggregated refuses that upload
(``unreadable_upload``) and the rest go on; a version that fails the guard is built again without the most
suspect uploads (``loss_guard``) until it passes or none is left; any other failure is retried, and after
``max_close_attempts`` the round closes without a version, with the reason recorded.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from coordinator.hooks import Hooks
from coordinator.publishing.aggregation import UploadFailed
from coordinator.publishing.publisher import Built
from coordinator.rounds.checks import Check, Refusal
from coordinator.rounds.judging import Judge, Judged, Later, Stopping
from coordinator.rounds.parts import Model, Parts
from coordinator.rounds.state import RoundState
from coordinator.settings import CheckSettings, FaultSettings, RoundSettings, ValidationSettings
from coordinator.storage.records import Upload
from coordinator.storage.store import Outcome, RoundClose, Store
from protocol.evaluation import round_results

log = logging.getLogger(__name__)
MIN_WEIGHT_SCORE = 0.05  # weight_by_score: the least score an accepted upload is weighted by


@dataclass(frozen=True)
class CloserSettings:
    """The closer's slice of the coordinator's settings."""

    rounds: RoundSettings
    checks: CheckSettings
    validation: ValidationSettings
    faults: FaultSettings
    keep_checkpoints: int


def deadline_for(store: Store, rounds: RoundSettings, round_: int) -> float:
    """Seconds after a round's first upload before it may close without its missing miners: twice the
    median spread of arrivals in the last five rounds, plus a second, within [min_deadline_s,
    deadline_s]. A miner that is merely slow thus still makes it; a dead one costs little time."""
    if not rounds.adaptive_deadline:
        return rounds.deadline_s
    spreads = store.arrival_spreads(round_ - 5, round_)
    if not spreads:
        return rounds.deadline_s
    return min(rounds.deadline_s, max(rounds.min_deadline_s, 2 * statistics.median(spreads) + 1.0))


class Closer:
    def __init__(
        self, parts: Parts, model: Model, settings: CloserSettings, checks: Sequence[Check], hooks: Hooks
    ) -> None:
        self.p, self.model, self.s, self.checks, self.hooks = parts, model, settings, checks, hooks
        self.downloads = parts.downloads
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.judge = Judge(parts, model, settings.checks, settings.validation, checks, hooks, self._stop)
        self._thread: threading.Thread | None = None
        parts.cell.listen(lambda old, new: self._wake.set())

    # -- the thread ---------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="closer", daemon=True)
        self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()

    def wake(self) -> None:
        self._wake.set()

    def _loop(self) -> None:
        rounds = self.s.rounds
        try:
            self._finish_unscored()
        except Stopping:
            return
        while not self._stop.is_set():
            state = self.p.cell.state
            now = self.p.clock()
            if state.behind is None and not state.ready(now, rounds.min_quorum):
                left = state.time_left(now)
                self._wake.wait(timeout=None if left is None else max(left, 0.01))
                self._wake.clear()
                continue
            try:
                self.close_round()
            except Stopping:
                return

    # -- closing ------------------------------------------------------------------------------------------
    def close_round(self) -> None:
        """Close the round that is due (the one behind the open round, or the open one), retrying a
        failure that is no upload's; after the last try, without a version."""
        state = self.p.cell.state.behind or self._begin()
        attempts = self.s.rounds.max_close_attempts
        for attempt in range(1, attempts + 1):
            try:
                later = self._close(state)
            except Stopping:
                self._reopen(state)
                raise
            except Exception as e:
                log.exception("round %d: closing failed (try %d of %d)", state.round, attempt, attempts)
                reason = f"close_failed: {type(e).__name__}: {e}"[:500]
                if attempt < attempts and self._stop.wait(min(5.0, 0.5 * 2**attempt)):
                    self._reopen(state)
                    raise Stopping from None
                continue
            if later is not None:
                self._finish(*later)
            self._prune()
            return
        self._close_without_version(state, reason)

    def _finish(self, later: Later, accepted: set[str]) -> None:
        """Overlapped rounds: the evaluation left for after the version, recorded (the round stays unscored,
        to be evaluated again after a restart, only if the coordinator stops meanwhile)."""
        t0 = time.perf_counter()
        try:
            verdicts, flags = self.judge.finish(later, accepted)
        except Stopping:
            raise
        except Exception:
            log.exception("round %d: evaluating after the version failed; unscored", later.round)
            verdicts, flags = {}, {}
        self.p.store.record_scores(later.round, verdicts, flags, self.p.clock())
        self.p.scores.changed()
        seconds = time.perf_counter() - t0
        self.p.metrics.scoring.observe(seconds)
        log.info(
            "round %d: %d uploads evaluated after the version in %.2f s",
            later.round,
            len(later.uploads),
            seconds,
        )

    def _finish_unscored(self) -> None:
        """After a restart: the rounds whose evaluation after their version did not end, again."""
        for row in self.p.store.unscored_rounds():
            later = self.judge.rescore(int(row["round"]), int(row["applied_to"]))
            if later is None:
                self.p.store.record_scores(int(row["round"]), {}, {}, self.p.clock())
                continue
            accepted = {
                s["miner"] for s in self.p.store.round_submissions(later.round) if s["status"] == "accepted"
            }
            self._finish(later, accepted)

    def _prune(self) -> None:
        for sha in self.p.store.prune_checkpoints(self.s.keep_checkpoints):
            self.p.blobs.delete(sha)

    def _reopen(self, state: RoundState) -> None:
        """Shutting down mid-close: a synchronous round takes uploads again until the restart (a round
        behind stays behind)."""
        if self.p.cell.state.round == state.round:
            self.p.cell.update(status="open")

    def _begin(self) -> RoundState:
        """The open round, now closing. Overlapped rounds: the next round opens for the current version,
        with this one behind it."""
        p, rounds = self.p, self.s.rounds
        if not rounds.overlap:
            return p.cell.update(status="aggregating")
        version, param_hash = p.store.head()
        with p.cell.lock:
            state = dataclasses.replace(p.cell.state, status="aggregating")
            nxt, now = state.round + 1, p.clock()
            p.store.open_round(nxt, version, now)
            p.cell.swap(self._opened(nxt, version, param_hash, behind=state))
        log.info("round %d: closing; round %d open for version %d", state.round, nxt, version)
        return state

    def _opened(self, round_: int, version: int, param_hash: str, behind: RoundState | None) -> RoundState:
        p, rounds = self.p, self.s.rounds
        expected = frozenset(p.store.active_miners(round_ - rounds.drop_after_rounds))
        return RoundState(
            round=round_,
            version=version,
            param_hash=param_hash,
            expected=expected,
            clock_from=p.clock(),
            deadline_s=deadline_for(p.store, rounds, round_),
            behind=behind,
        )

    def _close(self, state: RoundState) -> tuple[Later, set[str]] | None:
        """Judge, build, publish and commit; overlapped rounds: what is left to evaluate once the version is
        out, and the accepted uploads."""
        p, t0 = self.p, time.perf_counter()
        subs = p.store.round_submissions(state.round)
        uploads = [Upload.of(s) for s in subs]
        head = p.store.head()  # what the uploads are judged on and applied to: the model as it is now
        judged = self.judge.judge(state, uploads, subs, defer=self.s.rounds.overlap)
        built, close_reason = self._build(state, head[0], uploads, judged)
        new_version = None if built is None else p.publisher.write(built)
        outcomes = {
            u.miner: Outcome(
                judged.refused.get(u.miner), u.miner in judged.evaluated, judged.scales.get(u.miner)
            )
            for u in uploads
        }
        compute = [s["compute_s"] for s in subs if judged.refused.get(s["miner"]) is None]
        if self.hooks.before_commit is not None:
            self.hooks.before_commit(state.round)
        if (delay := self.s.faults.publish_delay_s) > 0:
            log.warning(
                "round %d: pausing %.1f s before the commit (faults.publish_delay_s)", state.round, delay
            )
            if self._stop.wait(delay):
                raise Stopping
        next_version, next_hash = head if built is None else (built.version, built.param_hash)
        bytes_down = self.downloads.take()  # (model, data)
        close = RoundClose(
            round=state.round,
            next_version=next_version,
            applied_to=head[0],
            open_next=p.cell.state.round == state.round,
            version=new_version,
            outcomes=outcomes,
            verdicts=judged.losses if judged.later is None else {},
            compute_s=statistics.fmean(compute) if compute else 0.0,
            reference_norm=judged.reference_norm,
            close_reason=close_reason,
            bytes_down=bytes_down,
            closed_at=p.clock(),
            scored=judged.later is None,
        )
        try:
            self._commit(state, close, next_hash)
        except BaseException:
            self.downloads.add(bytes_down[0], "model")
            self.downloads.add(bytes_down[1], "data")
            raise
        if built is not None:
            self.model.params = built.params
            p.publisher.commit(built)
        self._after(state, close, time.perf_counter() - t0)
        if judged.later is None:
            return None
        return judged.later, {m for m, o in outcomes.items() if o.reason is None}

    def _commit(self, state: RoundState, close: RoundClose, next_hash: str) -> None:
        """The round's record, and the next state: the next round (synchronous), or the open round with
        nothing behind it (overlapped)."""
        p = self.p
        nxt = self._opened(state.round + 1, close.next_version, next_hash, None) if close.open_next else None
        with p.cell.lock:
            p.store.close_round(close)
            p.cell.swap(
                nxt
                or dataclasses.replace(
                    p.cell.state, behind=None, newest=close.next_version, newest_hash=next_hash
                )
            )

    def _close_without_version(self, state: RoundState, reason: str) -> None:
        subs = self.p.store.round_submissions(state.round)
        outcomes = {s["miner"]: Outcome(Refusal.ROUND_FAILED) for s in subs}
        version, param_hash = self.p.store.head()
        close = RoundClose(
            round=state.round,
            next_version=version,
            applied_to=version,
            open_next=self.p.cell.state.round == state.round,
            version=None,
            outcomes=outcomes,
            verdicts={},
            compute_s=0.0,
            reference_norm=None,
            close_reason=reason,
            bytes_down=self.downloads.take(),
            closed_at=self.p.clock(),
        )
        self._commit(state, close, param_hash)
        self.p.metrics.rounds_failed.labels(reason.split(":")[0]).inc()
        log.error("round %d closed without a version: %s", state.round, reason)
        self._after(state, close, 0.0)
        self._prune()

    def _after(self, state: RoundState, close: RoundClose, seconds: float) -> None:
        p = self.p
        p.scores.changed()
        for s in p.store.round_submissions(state.round):  # the stored forms served their one purpose
            if s["unpacked_sha256"] not in (None, s["sha256"]):
                p.blobs.delete(s["unpacked_sha256"])
        loss = None if close.version is None else close.version.eval_loss
        now = p.cell.state
        p.metrics.round_closed(close, seconds, now.round, len(now.uploaded), close.next_version)
        refused = {m[:12]: str(o.reason) for m, o in close.outcomes.items() if o.reason is not None}
        log.info(
            "round %d closed: version %d, accepted %d, refused %d %s, held-out loss %s, %.2f s",
            state.round,
            close.next_version,
            sum(o.reason is None for o in close.outcomes.values()),
            len(refused),
            refused or "",
            "n/a" if loss is None else f"{loss:.4f}",
            seconds,
        )

    def _load(self, round_: int) -> Callable[[Upload], tuple[bytes, bytes]]:
        def load(u: Upload) -> tuple[bytes, bytes]:
            self.judge.touch(round_, u)
            payload = self.p.blobs.get(u.sha256)
            stored = payload if u.stored_sha256 in (None, u.sha256) else self.p.blobs.get(u.stored_sha256)
            return payload, stored

        return load

    # -- building -----------------------------------------------------------------------------------------
    def _build(
        self, state: RoundState, head: int, uploads: list[Upload], judged: Judged
    ) -> tuple[Built | None, str | None]:
        """The next version after ``head``, or None and why; refuses (in ``judged``) the uploads it had to
        leave out to pass the guard: the most suspect first, then the most suspect half of those left, until
        it passes or none is left."""
        p = self.p
        weights = self._weights(state.round, judged, uploads)
        accepted = [
            (u, judged.scales[u.miner] * weights.get(u.miner, 1.0))
            for u in uploads
            if u.miner not in judged.refused
        ]
        if not accepted:
            return None, None
        previous = p.store.eval_loss(head)
        version = p.store.latest_version() + 1
        tries = 0
        while accepted:
            if self._stop.is_set():
                raise Stopping
            try:
                built = p.publisher.build(
                    self.model.params, head, version, accepted, self._load(state.round), previous
                )
            except UploadFailed as e:
                log.warning("round %d: %s; aggregating without it", state.round, e)
                judged.refused[e.miner] = Refusal.UNREADABLE
                accepted = [(u, s) for u, s in accepted if u.miner != e.miner]
                continue
            reason = p.publisher.guard(built, previous)
            if reason is None:
                return built, None
            self.judge.gate(judged, [u for u, _ in accepted])  # overlapped rounds: gains of the unjudged
            suspects = sorted(accepted, key=lambda us: _suspicion(us[0], judged))
            # the most suspect upload alone first (one bad upload is the usual case), then half of the rest
            tries += 1
            drop = {u.miner for u, _ in suspects[: 1 if tries == 1 else math.ceil(len(suspects) / 2)]}
            log.warning(
                "round %d: %s; building again without %d of %d uploads",
                state.round,
                reason,
                len(drop),
                len(accepted),
            )
            for miner in drop:
                judged.refused[miner] = Refusal.LOSS_GUARD
            accepted = [(u, s) for u, s in accepted if u.miner not in drop]
        return None, f"{Refusal.LOSS_GUARD}: {reason}"

    def _weights(self, round_: int, judged: Judged, uploads: list[Upload]) -> dict[str, float]:
        """weight_by_score: each accepted upload's weight, its miner's score over the mean (mean 1): with
        this round's results in synchronous rounds; as of the round before in overlapped ones, whose results
        come after the version."""
        p = self.p
        if not self.s.validation.weight_by_score or not (judged.losses or judged.later):
            return {}
        kept = {u.miner for u in uploads if u.miner not in judged.refused}
        this_round = {} if judged.later is not None else round_results(round_, judged.losses, kept)
        board = p.scores.with_round(max(-1, round_ - 1), this_round)
        # the conservative score, floored so that a short record weighs a little, never nothing
        positive = {
            m: max(MIN_WEIGHT_SCORE, board[m].score) if m in board else MIN_WEIGHT_SCORE for m in kept
        }
        mean = statistics.fmean(positive.values()) if positive else 1.0
        return {m: s / mean for m, s in positive.items()}


def _suspicion(u: Upload, judged: Judged) -> tuple[float, float]:
    """Most suspect first: the lowest evaluated gain (an unevaluated upload before any), then the largest
    norm."""
    x = judged.losses.get(u.miner)
    gain = x.gain if x is not None and math.isfinite(x.gain) else -math.inf
    return gain, -u.norm if math.isfinite(u.norm) else -math.inf
