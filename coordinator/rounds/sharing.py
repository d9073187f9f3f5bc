"""Evaluation shared among validators (``[validation] assign``): the coordinator draws which validators
evaluate each sampled upload, waits for their verdicts, and settles each upload's verdict from them.

- **The draw.** Once a round's version is out (every round is then judged around its version: the
  coordinator gates the uploads of new miners itself, rounds/judging.py), each sampled upload goes to
  ``redundancy`` of the validators named in ``[validation] validators`` that are not benched: the first in
  the order of sha256(salt, upload, validator), the salt being the round's (rounds/judging.py), which nobody
  knows before the round's payloads are all in. The draw is stored (``tasks``) and served at
  ``GET /v1/rounds/{round}/tasks``; a validator evaluates its share and decodes the rest into the round's mean
  update, so its verdicts are paired exactly as the coordinator's would be (protocol/pairing.py).
- **The deadline.** Verdicts are taken until ``verdict_deadline_s`` after the draw, only from the validators
  an upload was assigned to (any other verdict is ignored); the coordinator settles the round as soon as
  every assigned verdict is in, or at the deadline with what came.
- **Settling an upload.** Its verdicts agree when no loss of one differs from another's by more than
  ``tolerance``: when all its validators answered and agree, their median stands. Verdicts that disagree
  are decided by the coordinator's own evaluation, which stands; each validator whose verdict is beyond
  the tolerance from it is ``outvoted``. An upload that some of its validators left without a verdict is
  evaluated by the coordinator where ``builtin`` (it has the capacity: the redundancy lost, and a liar
  whose partner is down is still caught); without ``builtin``, the verdicts that came stand, and an upload
  with none stays unscored and is sampled first next round (rounds/judging.py).
- **Records.** Every task ends ``agreed``, ``outvoted`` or ``missed`` (``undecided`` when the
  coordinator's own evaluation of a disputed upload failed; ``GET /v1/validators``); a validator outvoted
  or missing in ``BENCH_AFTER`` of the last ``BENCH_ROUNDS`` rounds is not assigned until they age out.

Validators are named by the operator: keys are free, and verdicts from any key could outvote the honest
ones, so ``assign`` refuses to start without the list (coordinator/settings).
"""

from __future__ import annotations

import hashlib
import logging
import statistics
import threading
from collections import defaultdict
from collections.abc import Callable, Sequence

from coordinator.errors import Stopping
from coordinator.hooks import Clock
from coordinator.metrics import Metrics
from coordinator.settings import ValidationSettings
from coordinator.storage.base import Store
from coordinator.storage.records import StoredTask, Upload
from coordinator.storage.scores import COORDINATOR
from protocol.evaluation import LOSS_FIELDS, Losses, round_salt
from protocol.sharing import RoundTasks, Task, ValidatorRecord
from protocol.wire import Verdict

log = logging.getLogger(__name__)
AGREED, OUTVOTED, MISSED = "agreed", "outvoted", "missed"
UNDECIDED = "undecided"  # the verdicts disagreed and the coordinator's evaluation of the upload failed
BENCH_ROUNDS = 10  # a validator is benched for what it did in this many recent rounds
BENCH_AFTER = 2  # rounds among them in which it was outvoted or missed a task
POLL_S = 0.25  # how often the wait reads the store (verdicts may arrive at another replica's intake)
ERRORS = ("margin_se", "paired_se")  # standard errors: agree within SE_RATIO of the larger
COMPARED = tuple(f for f in LOSS_FIELDS if f not in ERRORS)  # losses and margins: within the tolerance
SE_RATIO = 0.1

# the coordinator's own evaluation of some of the round's sampled uploads (the rest decoded into its mean):
# their losses and gains' standard errors
Evaluate = Callable[[set[str]], tuple[dict[str, Losses], dict[str, float]]]


def order(salt: str, miner: str, validator: str) -> bytes:
    """Where ``validator`` stands in the draw for ``miner``'s upload."""
    return hashlib.sha256(f"{salt}:validate:{miner}:{validator}".encode()).digest()


def agree(a: Losses, b: Losses, tolerance: float) -> bool:
    """No loss or margin differs by more than ``tolerance`` nats, no standard error by more than
    ``SE_RATIO`` of the larger (a verdict's errors decide how sure it is: a liar could inflate them)."""
    if any(abs(getattr(a, f) - getattr(b, f)) > tolerance for f in COMPARED):
        return False
    return all(
        abs(getattr(a, f) - getattr(b, f)) <= SE_RATIO * max(getattr(a, f), getattr(b, f)) + 1e-6
        for f in ERRORS
    )


def median(rows: Sequence[Losses]) -> Losses:
    """The median over validators of each loss."""
    return Losses(*(statistics.median(getattr(x, f) for x in rows) for f in LOSS_FIELDS))


class Sharing:
    def __init__(
        self,
        store: Store,
        settings: ValidationSettings,
        clock: Clock,
        stop: threading.Event,
        metrics: Metrics | None = None,
    ) -> None:
        self.store, self.settings, self.clock, self.stop = store, settings, clock, stop
        self.metrics = metrics
        self.validators = sorted({k.lower() for k in settings.validators or []})
        self.arrived = threading.Event()  # set by intake when verdicts come in

    # -- the draw -----------------------------------------------------------------------------------------
    def benched(self, round_: int) -> set[str]:
        bad: dict[str, int] = defaultdict(int)
        for t in self.store.task_tallies(round_ - BENCH_ROUNDS - 1):
            if t.outcome in (OUTVOTED, MISSED):
                bad[t.validator] += t.rounds
        return {v for v, n in bad.items() if n >= BENCH_AFTER}

    def draw(self, round_: int, salt: str, miners: Sequence[str]) -> dict[str, list[str]]:
        """Each sampled upload's validators, ``redundancy`` of those not benched (fewer when fewer are)."""
        benched = self.benched(round_)
        eligible = [v for v in self.validators if v not in benched]
        k = min(self.settings.redundancy, len(eligible))
        if benched:
            log.warning("round %d: validators benched: %s", round_, sorted(v[:12] for v in benched))
        if k < self.settings.redundancy:
            log.warning(
                "round %d: %d eligible validators for a redundancy of %d: %s",
                round_,
                len(eligible),
                self.settings.redundancy,
                "the coordinator checks each upload itself"
                if self.settings.builtin
                else "fewer verdicts per upload (builtin is off)",
            )
        return {m: sorted(eligible, key=lambda v: order(salt, m, v))[:k] for m in miners}

    # -- verdicts -----------------------------------------------------------------------------------------
    def taken(self, round_: int, validator: str, verdicts: Sequence[Verdict]) -> list[Verdict]:
        """The verdicts of ``validator`` on what it was assigned in ``round_``, before the deadline (or the
        close of the wait, if all came sooner); the rest are ignored."""
        now = self.clock.now()
        open_ = {
            t.miner
            for t in self.store.round_tasks(round_)
            if t.validator == validator and not t.outcome and now < t.deadline
        }
        return [v for v in verdicts if v.miner in open_]

    def settle(
        self, round_: int, salt: str, uploads: Sequence[Upload], evaluate: Evaluate
    ) -> tuple[dict[str, Losses], dict[str, float]]:
        """Draw the round's tasks (unless drawn before a restart), wait for the verdicts, settle each upload.
        Returns the verdicts and each one's gain standard error (the margin's, for a validator's verdict:
        no less)."""
        tasks = self.store.round_tasks(round_)
        if not tasks and uploads:
            deadline = self.clock.now() + self.settings.verdict_deadline_s
            self.store.add_tasks(round_, self.draw(round_, salt, [u.miner for u in uploads]), deadline)
            tasks = self.store.round_tasks(round_)
        given = self._wait(round_, tasks)
        assigned: dict[str, list[str]] = {u.miner: [] for u in uploads}
        for t in tasks:
            assigned.setdefault(t.miner, []).append(t.validator)
        out: dict[str, Losses] = {}
        gain_se: dict[str, float] = {}
        outcomes: dict[tuple[str, str], str] = {}
        decide: set[str] = set()
        tolerance = self.settings.tolerance
        for m, validators in assigned.items():
            theirs = {v: given[m, v] for v in validators if (m, v) in given}
            outcomes |= {(m, v): MISSED for v in validators if v not in theirs}
            rows = list(theirs.values())
            # as many verdicts as redundancy asks for (without builtin: whatever came) settle it alone
            whole = len(rows) >= self.settings.redundancy or not self.settings.builtin
            if rows and whole and all(agree(a, b, tolerance) for a in rows for b in rows):
                out[m] = median(rows)
                gain_se[m] = out[m].margin_se
                outcomes |= {(m, v): AGREED for v in theirs}
            elif rows or self.settings.builtin:
                decide.add(m)
        own, own_se = self._own(round_, decide, evaluate)
        for m in decide:
            if m not in own:  # its evaluation failed: refused, or unscored (the log says)
                outcomes |= {(m, v): UNDECIDED for v in assigned[m] if (m, v) in given}
                continue
            out[m], gain_se[m] = own[m], own_se.get(m, 0.0)
            for v in assigned[m]:
                if (m, v) in given:
                    outcomes[m, v] = AGREED if agree(given[m, v], own[m], tolerance) else OUTVOTED
        self.store.settle_tasks(round_, outcomes)
        if self.metrics is not None:
            for (_, v), o in outcomes.items():
                self.metrics.tasks.labels(v[:16], o).inc()
        outvoted = sorted({v[:12] for (_, v), o in outcomes.items() if o == OUTVOTED})
        missed = sorted({v[:12] for (_, v), o in outcomes.items() if o == MISSED})
        log.info(
            "round %d: %d of %d sampled uploads settled by validators, %d by the coordinator%s%s",
            round_,
            len(out) - len(own),
            len(assigned),
            len(own),
            f"; outvoted: {outvoted}" if outvoted else "",
            f"; missed: {missed}" if missed else "",
        )
        return out, gain_se

    @staticmethod
    def _own(round_: int, miners: set[str], evaluate: Evaluate) -> tuple[dict[str, Losses], dict[str, float]]:
        if not miners:
            return {}, {}
        try:
            return evaluate(miners)
        except Exception:  # the round is settled all the same: those uploads go unscored
            log.exception("round %d: the coordinator's evaluation of %d uploads failed", round_, len(miners))
            return {}, {}

    def _wait(self, round_: int, tasks: list[StoredTask]) -> dict[tuple[str, str], Losses]:
        """The assigned verdicts, once all are in or the deadline has passed (after a restart, a round
        settled before is settled again from the same verdicts)."""
        pairs = {(t.miner, t.validator) for t in tasks}
        deadline = max((t.deadline for t in tasks), default=0.0)
        while True:
            given = self._given(round_, pairs)
            now = self.clock.now()
            left = deadline - now
            if len(given) == len(pairs) or left <= 0:
                self.store.close_tasks(round_, now)  # no verdict taken after this
                return self._given(round_, pairs)
            if self.stop.is_set():
                raise Stopping
            self.clock.wait(self.arrived, min(POLL_S, left))
            self.arrived.clear()

    def _given(self, round_: int, pairs: set[tuple[str, str]]) -> dict[tuple[str, str], Losses]:
        return {
            (v.miner, v.validator): v.losses
            for v in self.store.verdicts_between(round_ - 1, round_)
            if (v.miner, v.validator) in pairs
        }

    # -- what the API serves ------------------------------------------------------------------------------
    def tasks(self, round_: int, validator: str | None, version: int | None, scored: bool) -> RoundTasks:
        """A closed round's tasks (``version``: the one its uploads were applied to; ``scored``: its
        evaluation ended)."""
        rows = self.store.round_tasks(round_)
        if not rows:
            return RoundTasks(round=round_, status="settled" if scored else "waiting")
        uploads = {u.miner: u for u in self.store.round_uploads(round_)}
        by_miner: dict[str, list[str]] = defaultdict(list)
        for t in rows:
            by_miner[t.miner].append(t.validator)
        salt = round_salt(u.sha256 for u in uploads.values())
        listed = [
            Task(
                miner=m,
                sha256=uploads[m].sha256,
                scale=float(uploads[m].scale or 0.0),
                validators=sorted(vs, key=lambda v: order(salt, m, v)),
            )
            for m, vs in sorted(by_miner.items())
        ]
        return RoundTasks(
            round=round_,
            status="assigned" if any(t.outcome is None for t in rows) else "settled",
            version=version,
            salt=salt,
            deadline=max(t.deadline for t in rows),
            uploads=listed,
            assigned=[t.miner for t in listed if validator in t.validators],
        )

    def records(self, through: int) -> list[ValidatorRecord]:
        """Every named validator's record, and whether it is benched for round ``through + 1``."""
        counts: dict[str, dict[str, int]] = defaultdict(dict)
        last: dict[str, int] = {}
        for t in self.store.task_tallies(-1):
            counts[t.validator][t.outcome] = t.count
            last[t.validator] = max(last.get(t.validator, -1), t.last)
        benched = self.benched(through + 1)
        return [
            ValidatorRecord(
                validator=v,
                assigned=sum(counts[v].values()),
                agreed=counts[v].get(AGREED, 0),
                outvoted=counts[v].get(OUTVOTED, 0),
                missed=counts[v].get(MISSED, 0),
                last_round=last.get(v),
                benched=v in benched,
            )
            for v in sorted(set(self.validators) | set(counts))
            if v != COORDINATOR
        ]
