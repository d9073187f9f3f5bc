"""What the coordinator's parts need of a store: another backend is one class with these methods. The SQL
store (``storage/store.py``, on SQLite or PostgreSQL) is the one there is; every method returns records
(``storage/records.py``), never database rows."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

from coordinator.storage.lease import LeaseHolder
from coordinator.storage.records import (
    Checked,
    IntakeRefusal,
    NewSubmission,
    RoundClose,
    ScoreInputs,
    StoredRound,
    StoredTask,
    StoredVerdict,
    StoredVersion,
    SubmissionOutcome,
    TaskTally,
    Upload,
    UploadPrint,
)
from protocol.evaluation import Losses
from protocol.history import SignedRecord


class RoundClosedAlready(RuntimeError):
    """A round's close was committed twice: the first commit landed although its answer was lost (the
    database restarting as it answered). The state in memory no longer follows the store; the closer
    stops, and a restart resumes from the store."""


class Store(Protocol):
    def accepted_gains(self, first_round: int, before_round: int, validator: str) -> list[float]:
        """The gains ``validator`` measured for the accepted uploads of those rounds."""
        ...

    def accepted_norms(self, first_round: int, before_round: int) -> list[float]: ...

    def active_miners(self, since_round: int) -> list[str]: ...

    def add_bytes_down(self, round_: int, model: int, data: int) -> None: ...

    def add_records(self, records: list[SignedRecord]) -> None:
        """Records of versions made before the history was kept (a state directory from before)."""
        ...

    def add_checked(self, round_: int, miner: str, sha: str, checker: str, found: Checked) -> None:
        """What a replica that checks as ``checker`` found of a payload; the first one stays."""
        ...

    def add_submission(self, s: NewSubmission) -> None:
        """The upload, the round's bytes and first arrival, and the miner's last round, at once."""
        ...

    def add_submissions(self, subs: Sequence[NewSubmission]) -> None:
        """``add_submission`` for several uploads, in one transaction."""
        ...

    def add_tasks(self, round_: int, assigned: Mapping[str, list[str]], deadline: float) -> None:
        """A round's draw: each sampled upload's validators (miner -> validators), open until ``deadline``;
        a round drawn before keeps its draw."""
        ...

    def add_verdicts(self, round_: int, validator: str, verdicts: dict[str, Losses], now: float) -> None: ...

    def arrival_spreads(self, first_round: int, before_round: int) -> list[float]:
        """Per round with 2+ uploads in [first_round, before_round): last arrival - first arrival."""
        ...

    def audit(self, round_: int) -> list[dict[str, object]]: ...

    def checkpoint(self, version: int | None) -> tuple[int, str] | None:
        """The newest live version with a checkpoint kept, or ``version``'s checkpoint."""
        ...

    def checked(self, round_: int, miner: str, sha: str, checker: str) -> Checked | None: ...

    def checked_among(
        self, uploads: Sequence[tuple[int, str, str]], checker: str
    ) -> dict[tuple[int, str, str], Checked]:
        """``checked`` for several (round, miner, sha256) at once: those found."""
        ...

    def close(self) -> None: ...

    def close_round(self, c: RoundClose) -> None:
        """The new version (if any), the verdicts, every upload's outcome, the round's record and the next
        round (synchronous rounds), in one transaction: a crash before it leaves the round open, after it the
        round closed. A round closed already raises ``RoundClosedAlready`` and changes nothing."""
        ...

    def close_tasks(self, round_: int, now: float) -> None:
        """No more verdicts on the round's tasks: their deadline brought forward to ``now``."""
        ...

    def count_miners(self) -> int: ...

    def eval_loss(self, version: int) -> float | None: ...

    def forget_checked(self, through_round: int) -> int: ...

    def get_meta(self, key: str) -> str | None: ...

    def lease_holder(self) -> LeaseHolder:
        """Who holds the leader lease, with its token and until when."""
        ...

    def head(self) -> tuple[int, str]:
        """The current version (the newest one not rolled back) and its parameter hash."""
        ...

    def intake_refusals(self, since: int, through: int) -> list[IntakeRefusal]: ...

    def is_miner(self, pubkey: str) -> bool: ...

    def miners_among(self, pubkeys: Sequence[str]) -> set[str]:
        """Those of ``pubkeys`` that are registered."""
        ...

    def last_closed_round(self) -> int | None: ...

    def last_record(self) -> SignedRecord | None:
        """The signed history's newest record."""
        ...

    def latest_round(self) -> StoredRound | None: ...

    def latest_version(self) -> int: ...

    def open_round(self, round_: int, version: int, now: float) -> None:
        """Overlapped rounds: the next round opens as the one before it starts closing."""
        ...

    def prune_checkpoints(self, keep: int) -> list[str]:
        """Forget the checkpoints (and the coordinator's state) of all but the newest ``keep`` versions with
        one, but 0, and the state of every version between checkpoints but the current one; returns the
        blobs no longer referenced."""
        ...

    def line(self, version: int, steps: int) -> list[StoredVersion] | None:
        """``version`` and its bases back to the newest with a checkpoint kept, at most ``steps`` back; or
        None."""
        ...

    def recent_reports(self, limit: int) -> list[StoredRound]: ...

    def recent_uploads(self, first_round: int, before_round: int) -> list[UploadPrint]:
        """Every upload of those rounds (accepted or refused): what a replay would copy."""
        ...

    def record_refusal(self, round_: int, miner: str, code: str, at: float) -> None: ...

    def record_scores(
        self, round_: int, verdicts: dict[str, Losses], flags: dict[str, str], now: float
    ) -> None:
        """The coordinator's verdicts on a round whose evaluation ended after it closed, and the flags on its
        accepted uploads, in one transaction with the round marked scored."""
        ...

    def refusal_counts(self, first: int, last: int) -> dict[int, dict[str, int]]:
        """Per round in [first, last]: refusal reason -> uploads refused."""
        ...

    def register(self, pubkey: str, round_: int, now: float) -> bool:
        """Record the miner as seen in ``round_``; True if it is new."""
        ...

    def remember_nonce(self, nonce: str, expires_at: float, now: float) -> bool:
        """Record a nonce; False if it is already recorded and not yet expired."""
        ...

    def remember_nonces(self, nonces: Sequence[str], expires_at: float, now: float) -> set[str]:
        """Record several nonces at once: those recorded now (a nonce given twice recorded once)."""
        ...

    def reports(self, after: int = -1, limit: int = -1) -> list[StoredRound]:
        """Closed rounds after ``after`` in order (at most ``limit``; -1: all), each with the version the
        model was at when it closed (``result_version``; before it was recorded, the next round's base) and
        when the next round opened (``next_opened_at``)."""
        ...

    def records(self, after: int = -1, limit: int = -1) -> list[SignedRecord]:
        """The signed history's records after seq ``after``, in order (at most ``limit``; -1: all)."""
        ...

    def rollback(
        self, to_version: int, now: float, reason: str, record: SignedRecord
    ) -> tuple[list[int], int]:
        """Make ``to_version`` current again: every later live version is marked rolled back (kept for the
        audit), the open rounds close with ``reason`` and their uploads are set aside, a round opens for
        ``to_version``, and ``record`` says so in the history. Returns the versions rolled back and the
        newest round closed."""
        ...

    def live_after(self, version: int) -> list[int]:
        """The versions after ``version`` that were not rolled back."""
        ...

    def round(self, round_: int) -> StoredRound | None: ...

    def round_tasks(self, round_: int) -> list[StoredTask]: ...

    def round_uploads(self, round_: int) -> list[Upload]:
        """A round's uploads in the order they arrived."""
        ...

    def settle_tasks(self, round_: int, outcomes: Mapping[tuple[str, str], str]) -> None:
        """Each task's outcome, by (miner, validator)."""
        ...

    def set_meta(self, key: str, value: str) -> None: ...

    def score_inputs(self, since: int, through: int) -> ScoreInputs:
        """What the leaderboard as of round ``through`` is made of, the window being rounds (since, through],
        from one consistent read."""
        ...

    def start(
        self,
        param_hash: str,
        eval_loss: float,
        checkpoint_sha: str,
        checkpoint_bytes: int,
        now: float,
        record: SignedRecord,
    ) -> None:
        """Version 0, its record and round 0 of a new run."""
        ...

    def submissions_between(self, since: int, through: int) -> list[SubmissionOutcome]: ...

    def task_tallies(self, since: int) -> list[TaskTally]:
        """Per validator and outcome, the settled tasks of the rounds after ``since``."""
        ...

    def unclosed_rounds(self) -> list[StoredRound]:
        """The open round, after the one still being closed when rounds overlap."""
        ...

    def unscored_rounds(self) -> list[tuple[int, int]]:
        """Closed rounds whose evaluation was to go on after their version and did not end, as (round, the
        version their uploads were applied to)."""
        ...

    def unscored_uploads(self, round_: int) -> set[str]:
        """The miners whose upload in ``round_`` was sampled and has no verdict of the coordinator's once
        the round was scored."""
        ...

    def upload(self, round_: int, miner: str) -> Upload | None: ...

    def uploaded_miners(self, round_: int) -> set[str]: ...

    def verdicts_between(self, since: int, through: int) -> list[StoredVerdict]: ...

    def version_record(self, version: int) -> SignedRecord | None: ...

    def version(self, version: int) -> StoredVersion | None: ...
