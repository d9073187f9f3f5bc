"""The closer: one thread that closes rounds, told here top to bottom.

It sleeps until the round changes or its mode says it is due (rounds/modes.py). Closing a round is then:

1. **begin**: the mode marks the round closing (overlapped rounds also open the next one);
2. **judge**: the mode's judgement of the uploads (rounds/judging.py);
3. **build under the guard**: the publisher aggregates what judging accepted, applies the outer step and
   leaves out what the loss guard or a failed read refuses (publishing/publisher.py);
4. **commit**: the version, every upload's outcome and the next round state in one transaction;
5. **judge after** (overlapped rounds): the uploads evaluated once the version is out, their verdicts and
   flags recorded before the next round is closed; checkpoints are pruned only then, so that a restart can
   evaluate a round left unfinished on the version it changed.

A round always ends, and ends once. A failure while one upload is read, evaluated or aggregated refuses
that upload (``unreadable_upload``) and the rest go on; any other failure before the commit is retried, and
after ``max_close_attempts`` the round closes without a version, with the reason recorded. Nothing after
the commit closes the round again: what fails there is logged, and the store refuses a second commit of a
closed round (``RoundClosedAlready``: a first commit landed although its answer was lost), which stops the
closer, so that a restart resumes from the store.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import statistics
import threading
import time

from coordinator.errors import Stopping
from coordinator.hooks import Clock, Hooks
from coordinator.metrics import Metrics
from coordinator.publishing.history import History
from coordinator.publishing.model import Model
from coordinator.publishing.publisher import Guarded, Publisher
from coordinator.rounds.judgement import Judgement, Later
from coordinator.rounds.judging import Judge
from coordinator.rounds.modes import RoundMode
from coordinator.rounds.opening import RoundOpener
from coordinator.rounds.reading import UploadReader
from coordinator.rounds.scoring import Scores
from coordinator.rounds.stall import stall_of
from coordinator.rounds.state import Downloads, RoundCell, RoundState
from coordinator.settings import RoundSettings
from coordinator.storage.base import RoundClosedAlready, Store
from coordinator.storage.blobs import BlobStore
from coordinator.storage.records import Health, Outcome, Refusal, RoundClose, Upload
from protocol.evaluation import round_salt

log = logging.getLogger(__name__)
RETRY_CAP_S = 30.0  # the longest pause between the closer's tries after failures in a row


class Closer:
    def __init__(
        self,
        cell: RoundCell,
        store: Store,
        blobs: BlobStore,
        mode: RoundMode,
        opener: RoundOpener,
        judge: Judge,
        publisher: Publisher,
        history: History,
        model: Model,
        reader: UploadReader,
        scores: Scores,
        metrics: Metrics,
        downloads: Downloads,
        rounds: RoundSettings,
        keep_checkpoints: int,
        hooks: Hooks,
        clock: Clock,
        stop: threading.Event,
    ) -> None:
        self.cell, self.store, self.blobs, self.mode, self.opener = cell, store, blobs, mode, opener
        self.judge, self.publisher, self.history = judge, publisher, history
        self.model, self.reader = model, reader
        self.scores, self.metrics, self.downloads = scores, metrics, downloads
        self.rounds, self.keep_checkpoints, self.hooks, self.clock = rounds, keep_checkpoints, hooks, clock
        self._stop = stop
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        cell.listen(lambda old, new: self._wake.set())

    # -- the thread ---------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="closer", daemon=True)
        self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def ended(self) -> bool:
        """The thread ended without being asked to (a bug: the process should stop and say so)."""
        return self._thread is not None and not self._thread.is_alive() and not self._stop.is_set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()

    def _loop(self) -> None:
        """Close each round when it is due. A failure outside a close's own retries (the store unreachable
        while a round's scores are written, say) does not end the thread: it is logged and, after a pause
        that grows with each failure in a row, the rounds left unscored are evaluated again and closing
        goes on."""
        unscored, failures = True, 0
        while not self._stop.is_set():
            try:
                if unscored:
                    self._judge_unscored()
                    unscored = False
                self._step()
                failures = 0
            except Stopping:
                return
            except RoundClosedAlready:
                log.critical("the closer stops: the store and this process disagree", exc_info=True)
                return
            except Exception:
                failures += 1
                pause = min(RETRY_CAP_S, 0.5 * 2**failures)
                log.exception("the closer failed (%d in a row); again in %.1f s", failures, pause)
                unscored = True
                if self.clock.wait(self._stop, pause):
                    return

    def _step(self) -> None:
        """Close the round that is due, or wait until one is (or something changes)."""
        state, now = self.cell.state, self.clock.now()
        if state.behind is None and not self.mode.due(state, now, self.rounds.min_quorum):
            left = self.mode.wake_in(state, now)
            self.clock.wait(self._wake, None if left is None else max(left, 0.01))
            self._wake.clear()
            return
        self.close_round()

    # -- closing ------------------------------------------------------------------------------------------
    def close_round(self) -> None:
        """Close the round that is due (the one behind the open round, or the open one), retrying a
        failure that is no upload's; after the last try, without a version."""
        state = self.cell.state.behind or self.mode.begin(self.opener)
        attempts = self.rounds.max_close_attempts
        for attempt in range(1, attempts + 1):
            try:
                close, seconds, later, accepted = self._close(state)
            except Stopping:
                self._reopen(state)
                raise
            except RoundClosedAlready:
                raise
            except Exception as e:
                log.exception("round %d: closing failed (try %d of %d)", state.round, attempt, attempts)
                reason = f"close_failed: {type(e).__name__}: {e}"[:500]
                if attempt < attempts and self.clock.wait(self._stop, min(5.0, 0.5 * 2**attempt)):
                    self._reopen(state)
                    raise Stopping from None
                continue
            self._closed(state, close, seconds)
            if later is not None:
                self._judge_after(later, accepted)
            self._prune()
            return
        self._close_without_version(state, reason)

    def _close(self, state: RoundState) -> tuple[RoundClose, float, Later | None, set[str]]:
        """Judge, build under the guard, commit; returns the close committed, its seconds, what is left to
        judge after the version (overlapped rounds) and the accepted uploads."""
        t0 = time.perf_counter()
        uploads = self.store.round_uploads(state.round)
        head, head_hash = self.store.head()  # what the uploads are judged on and applied to: the model now
        salt = round_salt(u.sha256 for u in uploads)
        judgement = self.mode.judge(self.judge, state.round, uploads, salt)
        guarded = self._build(state, head, uploads, judgement)
        refused = judgement.refused | guarded.left_out
        new_version = None if guarded.built is None else self.publisher.write(guarded.built)
        outcomes = {
            u.miner: Outcome(
                refused.get(u.miner), u.miner in judgement.evaluated, judgement.scales.get(u.miner)
            )
            for u in uploads
        }
        kept = [u for u in uploads if u.miner not in refused]
        if self.hooks.before_commit is not None:
            self.hooks.before_commit(state.round)
        built = guarded.built
        next_version, next_hash = (head, head_hash) if built is None else (built.version, built.param_hash)
        bytes_down = self.downloads.take()  # (model, data)
        closed_at = self.clock.now()
        close = RoundClose(
            round=state.round,
            next_version=next_version,
            applied_to=head,
            open_next=self.cell.state.round == state.round,
            version=new_version,
            outcomes=outcomes,
            verdicts=judgement.losses if judgement.later is None else {},
            compute_s=statistics.fmean(u.compute_s for u in kept) if kept else 0.0,
            reference_norm=judgement.reference_norm,
            close_reason=guarded.reason,
            bytes_down=bytes_down,
            closed_at=closed_at,
            scored=judgement.later is None,
            health=Health.of(u.health for u in kept),
            record=None if new_version is None else self.history.version(new_version, state.round, closed_at),
        )
        try:
            self._commit(state, close, next_hash)
        except BaseException:
            self.downloads.add(bytes_down[0], "model")
            self.downloads.add(bytes_down[1], "data")
            raise
        if built is not None:
            self.model.params = built.params
            self.publisher.commit(built)
        accepted = {m for m, o in outcomes.items() if o.reason is None}
        return close, time.perf_counter() - t0, judgement.later, accepted

    def _build(self, state: RoundState, head: int, uploads: list[Upload], judgement: Judgement) -> Guarded:
        """The next version after ``head`` from what judging accepted, under the loss guard."""
        return self.publisher.build_guarded(
            self.model.params,
            head,
            self.store.latest_version() + 1,
            judgement.accepted(uploads),
            functools.partial(self.reader.both, state.round),
            functools.partial(self.judge.most_suspect_first, judgement),
            self.store.eval_loss(head),
            self._stop,
        )

    def _commit(self, state: RoundState, close: RoundClose, next_hash: str) -> None:
        """The round's record, and the next state: the next round (when the closing round was the open one),
        or the open round with nothing behind it (when it was behind)."""
        nxt = None
        if close.open_next:
            nxt = self.opener.opened(state.round + 1, close.next_version, next_hash, None)
        with self.cell.lock:
            self.store.close_round(close)
            self.cell.swap(
                nxt
                or dataclasses.replace(
                    self.cell.state, behind=None, newest=close.next_version, newest_hash=next_hash
                )
            )

    def _judge_after(self, later: Later, accepted: set[str]) -> None:
        """Overlapped rounds: the evaluation left for after the version, recorded (the round stays unscored,
        to be evaluated again after a restart, only if the coordinator stops meanwhile)."""
        t0 = time.perf_counter()
        try:
            verdicts, flags = self.judge.after_version(later, accepted)
        except Stopping:
            raise
        except Exception:
            log.exception("round %d: evaluating after the version failed; unscored", later.round)
            verdicts, flags = {}, {}
        if self.hooks.before_scores is not None:
            self.hooks.before_scores(later.round)
        self.store.record_scores(later.round, verdicts, flags, self.clock.now())
        self.scores.changed()
        seconds = time.perf_counter() - t0
        self.metrics.scoring.observe(seconds)
        log.info(
            "round %d: %d uploads evaluated after the version in %.2f s",
            later.round,
            len(later.uploads),
            seconds,
        )

    def _judge_unscored(self) -> None:
        """After a restart: the rounds whose evaluation after their version did not end, again."""
        for round_, applied_to in self.store.unscored_rounds():
            later = self.judge.rescore(round_, applied_to)
            if later is None:
                self.store.record_scores(round_, {}, {}, self.clock.now())
                continue
            accepted = {u.miner for u in self.store.round_uploads(round_) if u.status == "accepted"}
            self._judge_after(later, accepted)

    # -- the round's end ---------------------------------------------------------------------------------
    def _close_without_version(self, state: RoundState, reason: str) -> None:
        uploads = self.store.round_uploads(state.round)
        version, param_hash = self.store.head()
        close = RoundClose(
            round=state.round,
            next_version=version,
            applied_to=version,
            open_next=self.cell.state.round == state.round,
            version=None,
            outcomes={u.miner: Outcome(Refusal.ROUND_FAILED) for u in uploads},
            verdicts={},
            compute_s=0.0,
            reference_norm=None,
            close_reason=reason,
            bytes_down=self.downloads.take(),
            closed_at=self.clock.now(),
        )
        self._commit(state, close, param_hash)
        self.metrics.rounds_failed.labels(reason.split(":")[0]).inc()
        log.error("round %d closed without a version: %s", state.round, reason)
        self._closed(state, close, 0.0)
        self._prune()

    def _closed(self, state: RoundState, close: RoundClose, seconds: float) -> None:
        """What follows a commit: whatever fails here (the store unreachable for a moment, say), the round
        stays closed as committed."""
        try:
            if self.hooks.after_commit is not None:
                self.hooks.after_commit(state.round)
            self._after(state, close, seconds)
        except Exception:
            log.exception("round %d: closed, but what follows its commit failed", state.round)

    def _after(self, state: RoundState, close: RoundClose, seconds: float) -> None:
        self.scores.changed()
        for u in self.store.round_uploads(state.round):  # the stored forms served their one purpose
            if u.stored_sha256 not in (None, u.sha256):
                self.blobs.delete(u.stored_sha256)
        loss = None if close.version is None else close.version.eval_loss
        now = self.cell.state
        self.metrics.round_closed(close, seconds, now.round, len(now.uploaded), close.next_version)
        stall = stall_of(self.store)
        self.metrics.stalled_rounds.set(stall.rounds)
        if stall.stalled:
            log.warning(
                "round %d: the held-out loss has not fallen in %d rounds (since round %d); their versions "
                "were made of the uploads of %s",
                state.round,
                stall.rounds,
                stall.since_round,
                [k[:12] for k in stall.keys] or "nobody",
            )
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
        if forgotten := self.blobs.forget_incoming(state.round):  # its direct uploads served their purpose
            log.info("round %d: %d direct uploads removed from the bucket", state.round, forgotten)
        self.store.forget_checked(state.round)  # and what replicas found of them

    def _prune(self) -> None:
        for sha in self.store.prune_checkpoints(self.keep_checkpoints):
            self.blobs.delete(sha)

    def _reopen(self, state: RoundState) -> None:
        """Shutting down mid-close: a synchronous round takes uploads again until the restart (a round
        behind stays behind)."""
        if self.cell.state.round == state.round:
            self.cell.update(status="open")
