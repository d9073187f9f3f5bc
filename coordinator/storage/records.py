"""What the store returns: typed records, never database rows."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

import torch


@dataclass(frozen=True)
class Upload:
    """One upload as intake recorded it, and what closing its round decided."""

    miner: str
    sha256: str
    content_sha256: str
    norm: float
    sketch: torch.Tensor  # (buckets,) float32
    stored_sha256: str | None = None  # the form the codec's accumulator reads back (column unpacked_sha256)
    round: int = 0
    size: int = 0  # bytes
    compute_s: float = 0.0  # what the miner says its inner steps took
    status: Literal["received", "accepted", "rejected"] = "received"
    reason: str | None = None  # a Refusal, when rejected
    evaluated: bool = False
    scale: float | None = None  # its clip scale in the version
    flag: str | None = None  # an accepted upload that its later evaluation refuses


class Refusal(StrEnum):
    """Every reason closing a round gives for refusing an upload (refusals at upload are HTTP errors)."""

    NON_FINITE = "non_finite"  # its norm is not a number
    EMPTY_UPDATE = "empty_update"
    COPIED_PAYLOAD = "copied_payload"  # the same update as an earlier upload of this round, rescaled or not
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


# never counted against a miner (a probation's reason is counted once, where it was given)
NEUTRAL = frozenset({Refusal.ROUND_FAILED, Refusal.ROLLED_BACK, Refusal.PROBATION})
