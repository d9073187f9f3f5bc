"""What the store returns: typed records, never database rows."""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from enum import StrEnum
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict

from protocol.evaluation import Losses
from protocol.history import SignedRecord
from protocol.payload import Examined, PayloadHeader


@dataclass(frozen=True)
class Health:
    """Training health as a miner reports it with an upload (untrusted: shown and exported, never used to
    judge): its gradient's norm before clipping, mean and max over the inner steps, the fraction of steps
    clipped, and the learning rate of its last step. A round's is that of its accepted uploads (``of``)."""

    grad_norm_mean: float | None = None
    grad_norm_max: float | None = None
    clipped_fraction: float | None = None
    lr: float | None = None

    @classmethod
    def reported(cls, *values: float | None) -> Health:
        """From what a miner sent: a value out of its range (a norm or rate beyond MAX_HEALTH, a fraction
        beyond 1, anything negative or not a number) is left out."""
        limits = (MAX_HEALTH, MAX_HEALTH, 1.0, MAX_HEALTH)
        return cls(
            *(v if v is not None and 0 <= v <= top else None for v, top in zip(values, limits, strict=True))
        )

    @classmethod
    def of(cls, reports: Iterable[Health]) -> Health:
        """A round's: the median of the mean norms, the largest norm, the median clipped fraction and the
        median learning rate (medians: a few miners cannot move them, whatever they report)."""
        reports = list(reports)

        def known(name: str) -> list[float]:
            return [v for h in reports if (v := getattr(h, name)) is not None]

        means, maxes, clipped, lrs = (known(f) for f in HEALTH_FIELDS)
        return cls(
            statistics.median(means) if means else None,
            max(maxes) if maxes else None,
            statistics.median(clipped) if clipped else None,
            statistics.median(lrs) if lrs else None,
        )


MAX_HEALTH = 1e12  # a reported norm or rate beyond this is no measurement
HEALTH_FIELDS = tuple(f.name for f in fields(Health))  # as the store and the wire name them


@dataclass(frozen=True)
class Upload:
    """One upload as intake recorded it, and what closing its round decided."""

    miner: str
    sha256: str
    content_sha256: str
    norm: float
    sketch: torch.Tensor  # (buckets,) float32
    stored_sha256: str | None = None  # the form the codec's accumulator reads back
    round: int = 0
    size: int = 0  # bytes
    compute_s: float = 0.0  # what the miner says its inner steps took
    status: Literal["received", "accepted", "rejected"] = "received"
    reason: str | None = None  # a Refusal, when rejected
    evaluated: bool = False
    scale: float | None = None  # its clip scale in the version
    flag: str | None = None  # an accepted upload that its later evaluation refuses
    health: Health = Health()
    kept: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))  # kept_sample


class Refusal(StrEnum):
    """Every reason closing a round gives for refusing an upload (refusals at upload are HTTP errors)."""

    NON_FINITE = "non_finite"  # its norm is not a number
    EMPTY_UPDATE = "empty_update"
    COPIED_PAYLOAD = "copied_payload"  # the same update as an earlier upload of this round, rescaled or not
    NEAR_COPY = (
        "near_copy"  # an earlier upload's update re-encoded: it keeps far more of the same coordinates
    )
    REPLAYED_UPDATE = "replayed_update"  # the same update as an upload of a recent round
    NORM_OUTLIER = "norm_outlier"
    NON_FINITE_LOSS = "non_finite_loss"  # applying it made a loss NaN or infinite
    HARMFUL = "harmful"  # it does not lower the loss on its own data
    LOW_GAIN = "low_gain"  # it lowers it by too little
    LOW_SCORE = "low_score"  # weight_by_score: its miner's mean score is below 0
    LOSS_GUARD = "loss_guard"  # left out so that the new version would not raise the held-out loss
    UNREADABLE = "unreadable_upload"  # processing it failed
    ROUND_FAILED = "round_failed"  # the round could not be closed with a version (not the miner's doing)
    ROLLED_BACK = "rolled_back"  # the operator rolled the model back while the round was open
    PROBATION = "probation"  # overlapped rounds: refused or flagged lately, so evaluated but not applied
    UNEVALUATED = "unevaluated"  # a new key or a norm outlier beyond the round's evaluation sample


# never counted against a miner (a probation's reason is counted once, where it was given)
NEUTRAL = frozenset({Refusal.ROUND_FAILED, Refusal.ROLLED_BACK, Refusal.PROBATION, Refusal.UNEVALUATED})
# refused on what the upload sent, while its verdict measured it clipped to the reference norm: the verdict
# does not score it (a rescaled copy of good work would show the gain of good work)
UNMEASURED = frozenset({Refusal.NORM_OUTLIER})


@dataclass(frozen=True)
class NewSubmission:
    round: int
    miner: str
    sha256: str
    content_sha256: str
    size: int
    norm: float
    sketch: bytes
    stored_sha256: str | None  # None: not kept, the payload is unpacked again when read (UploadReader)
    compute_s: float
    received_at: float
    health: Health = Health()
    kept: bytes = b""  # the kept coordinates' sample (protocol/codec/measure.py kept_sample), int64


class Checked(BaseModel):
    """What intake records of a payload: its header, size, digest of its tensors, norm, sketch and kept
    sample, and the blob of its unpacked form if one was kept (None: unpacked again when read). A replica
    that checked a direct upload's commit keeps it in the store for the leader (rounds/direct.py)."""

    model_config = ConfigDict(frozen=True, ser_json_bytes="base64", val_json_bytes="base64")

    header: PayloadHeader
    size: int
    content_sha256: str
    norm: float
    sketch: bytes
    kept: bytes
    stored_sha256: str | None

    @classmethod
    def of(cls, seen: Examined, body: bytes, sha: str, unpacked_sha: str | None) -> Checked:
        """``sha``: the payload's; ``unpacked_sha``: its unpacked form's blob, where one was put."""
        return cls(
            header=seen.header,
            size=len(body),
            content_sha256=seen.content_sha256,
            norm=seen.norm,
            sketch=seen.sketch.numpy().tobytes(),
            kept=seen.kept.numpy().tobytes(),
            stored_sha256=sha if seen.stored is body else unpacked_sha,
        )


@dataclass(frozen=True)
class NewVersion:
    version: int
    base_version: int
    param_hash: str
    eval_loss: float
    update_sha: str
    update_bytes: int
    checkpoint_sha: str | None  # None between checkpoints (``[publish] checkpoint_every``)
    checkpoint_bytes: int
    state_sha: str | None


@dataclass(frozen=True)
class Outcome:
    """What closing a round decided about one upload."""

    reason: str | None  # None: accepted
    evaluated: bool = False
    scale: float | None = None


@dataclass(frozen=True)
class RoundClose:
    """Everything closing a round commits, in one transaction."""

    round: int
    next_version: int  # the model's version once the round closed: the new version, or the old one
    applied_to: int  # the version the round's uploads were evaluated on and applied to
    open_next: bool  # synchronous rounds: the next round opens now, for next_version
    version: NewVersion | None
    outcomes: dict[str, Outcome]
    verdicts: dict[str, Losses]  # empty while the round's evaluation continues after it (``scored``)
    compute_s: float
    reference_norm: float | None
    close_reason: str | None
    bytes_down: tuple[int, int]  # (model, data)
    closed_at: float
    scored: bool = True  # False: overlapped rounds, whose evaluation goes on once the version is out
    health: Health = Health()  # of the accepted uploads
    record: SignedRecord | None = None  # the new version's signed record (protocol/history.py)


@dataclass(frozen=True)
class StoredRound:
    """A round as the store keeps it (a closed round's report, or an open one)."""

    round: int
    version: int  # the version its uploads train from
    status: Literal["open", "closed"]
    opened_at: float
    first_upload_at: float | None = None
    closed_at: float | None = None
    accepted: int = 0
    rejected: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    compute_s: float = 0.0
    eval_loss: float | None = None
    close_reason: str | None = None
    reference_norm: float | None = None
    bytes_down_model: int = 0
    bytes_down_data: int = 0
    result_version: int | None = None  # the model's version once it closed
    applied_to: int | None = None  # the version its uploads were judged on and applied to
    scored: bool = True  # False while its evaluation goes on after its version
    grad_norm_mean: float | None = None  # its accepted uploads' training health (Health.of)
    grad_norm_max: float | None = None
    clipped_fraction: float | None = None
    lr: float | None = None
    next_opened_at: float | None = None  # reports: when the next round opened


@dataclass(frozen=True)
class StoredVersion:
    version: int
    round: int | None  # None: version 0
    param_hash: str
    eval_loss: float | None
    update_sha: str | None
    update_bytes: int
    checkpoint_sha: str | None  # None once pruned
    checkpoint_bytes: int
    created_at: float
    base_version: int | None = None
    state_sha: str | None = None  # the outer optimizer's and the downlink's state
    rolled_back_at: float | None = None

    @property
    def rolled_back(self) -> bool:
        return self.rolled_back_at is not None


@dataclass(frozen=True)
class SubmissionOutcome:
    """What closing a round decided of one upload, without the upload's bytes or sketch."""

    round: int
    miner: str
    status: Literal["received", "accepted", "rejected"]
    reason: str | None
    flag: str | None


@dataclass(frozen=True)
class StoredVerdict:
    round: int
    miner: str
    validator: str
    losses: Losses


@dataclass(frozen=True)
class StoredTask:
    """A sampled upload assigned to a validator; ``outcome`` None until the round is settled
    (coordinator/rounds/sharing.py names the outcomes)."""

    round: int
    miner: str
    validator: str
    deadline: float
    outcome: str | None


@dataclass(frozen=True)
class TaskTally:
    validator: str
    outcome: str
    count: int  # tasks
    rounds: int  # the rounds they were in
    last: int


@dataclass(frozen=True)
class Tally:
    """How many of a miner's uploads had one outcome (``accepted``, a refusal's code, or a flag), and the
    last round of them."""

    miner: str
    kind: str
    count: int
    last: int = -1


@dataclass(frozen=True)
class IntakeRefusal:
    """An upload refused at intake in a round where the miner has no upload taken."""

    round: int
    miner: str
    code: str


@dataclass(frozen=True)
class UploadPrint:
    """What a copy of an upload would share with it: its tensors' digest and its sketch."""

    round: int
    miner: str
    content_sha256: str
    sketch: torch.Tensor  # (buckets,) float32


def kept_of(stored: bytes | None) -> torch.Tensor:
    """A kept sample as the store keeps it (int64 bytes; none for uploads from before it was kept)."""
    if not stored:
        return torch.zeros(0, dtype=torch.int64)
    return torch.frombuffer(bytearray(stored), dtype=torch.int64)


def sketch_of(stored: bytes) -> torch.Tensor:
    """A sketch as the store keeps it (float32 bytes)."""
    return torch.frombuffer(bytearray(stored), dtype=torch.float32)


@dataclass(frozen=True)
class ScoreInputs:
    """Everything the leaderboard is made of, as of the close of one round, read in one transaction."""

    verdicts: list[StoredVerdict]  # in the score window
    outcomes: list[SubmissionOutcome]  # in the score window
    intake_refusals: list[IntakeRefusal]  # in the score window
    tallies: list[Tally]  # every upload up to the round: per miner and outcome ('accepted' or a refusal)
    flags: list[Tally]  # per miner and flag
    intake_tallies: list[Tally]  # uploads refused at intake, per miner and code
    first_rounds: dict[str, int]  # each miner's first round with an upload or a refused one
    published: list[int]  # the rounds in the score window that published a version
