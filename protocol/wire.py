"""JSON messages between coordinator and nodes (pydantic). The binary payloads live in codec and params."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from protocol.codec import CODEC_NAMES
from protocol.history import SignedRecord
from protocol.model import ModelConfig
from protocol.payload import CodecName

PROTOCOL_VERSION = 3  # 2: the recipe's schedule, training health; 3: the coordinator's key and signed history
HEADER_PROTOCOL = "X-Gradpool-Protocol"
HEADER_REPLICA, HEADER_LEADER = "X-Gradpool-Replica", "X-Gradpool-Leader"  # who answered, who leads
HEADER_CHECKED = "X-Gradpool-Checked"  # a standby checked this commit: the leader looks for what it found
MAX_NUMBER = (1 << 53) - 1  # the largest round or version number anywhere (exact in a JSON double)


class Wire(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TrainingRecipe(Wire):
    """How every miner trains: set by the coordinator, so all updates are comparable."""

    inner_steps: int = Field(default=20, ge=1, le=10_000)
    batch_size: int = Field(default=8, ge=1, le=4096, description="sequences per inner step")
    lr: float = Field(default=2e-3, gt=0, le=1.0, description="the inner learning rate at its peak")
    warmup_steps: int = Field(
        default=20,
        ge=0,
        description="linear warm-up over the run's first inner steps (round x inner_steps + i)",
    )
    schedule: Literal["constant", "cosine"] = Field(
        default="constant",
        description="after the warm-up: constant, or cosine decay to lr_floor x lr over planned_rounds",
    )
    planned_rounds: int | None = Field(
        default=None, ge=1, le=MAX_NUMBER, description="the run's length the cosine decays over"
    )
    lr_floor: float = Field(default=0.1, ge=0, le=1, description="cosine: the rate at the end, as a fraction")
    weight_decay: float = Field(default=0.1, ge=0)
    beta1: float = Field(default=0.9, ge=0, lt=1)
    beta2: float = Field(default=0.95, ge=0, lt=1)
    grad_clip: float = Field(default=1.0, gt=0)
    ef_beta: float = Field(default=0.95, ge=0, le=1)

    @model_validator(mode="after")
    def _planned(self) -> TrainingRecipe:
        if self.schedule == "cosine" and self.planned_rounds is None:
            raise ValueError(
                "recipe.schedule 'cosine' needs recipe.planned_rounds (the rounds it decays over)"
            )
        return self

    def lr_at(self, round_: int, step: int) -> float:
        """The inner learning rate at inner step ``step`` of round ``round_``: a pure function of the run's
        global inner step (``round_ x inner_steps + step``), so every miner trains at the same rate in a
        round whenever it joined. Linear warm-up over ``warmup_steps``, then constant or cosine decay from
        ``lr`` to ``lr_floor x lr`` at the end of ``planned_rounds`` (and the floor after it)."""
        g = round_ * self.inner_steps + step
        if g < self.warmup_steps:
            return self.lr * (g + 1) / self.warmup_steps
        if self.schedule == "constant" or self.planned_rounds is None:
            return self.lr
        span = max(1, self.planned_rounds * self.inner_steps - self.warmup_steps)
        progress = min(1.0, (g - self.warmup_steps) / span)
        return self.lr * (self.lr_floor + (1 - self.lr_floor) * 0.5 * (1 + math.cos(math.pi * progress)))


class CodecConfig(Wire):
    name: CodecName = "sparseloco"
    k: int = Field(default=64, ge=4, le=4096)
    tile: int = Field(default=64, ge=8, le=256)

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        if name not in CODEC_NAMES:
            raise ValueError(f"unknown codec {name!r}; choose one of {', '.join(CODEC_NAMES)}")
        return name


class EvaluationConfig(Wire):
    """How uploads are evaluated (protocol/evaluation.py): validators must use the same settings."""

    # the outer learning rate is ``step`` on the wire, as the first releases named it
    model_config = ConfigDict(
        extra="forbid", validate_by_name=True, validate_by_alias=True, serialize_by_alias=True
    )

    own_sequences: int = Field(default=48, ge=2, le=1024)
    other_sequences: int = Field(default=48, ge=2, le=1024)
    outer_lr: float = Field(
        default=1.0, gt=0, alias="step", description="the outer learning rate an update is applied with"
    )
    early_rounds: int = Field(default=4, ge=0, le=MAX_NUMBER, description="the first rounds, sampled more")
    early_factor: int = Field(default=2, ge=1, le=16, description="times the sequences in those rounds")
    assign: bool = Field(
        default=False,
        description="each sampled upload is evaluated by the validators it is assigned to "
        "(GET /v1/rounds/{round}/tasks); a validator evaluates its share only",
    )

    def sequences(self, round_: int) -> tuple[int, int]:
        """The own and other sequences an upload of ``round_`` is evaluated on: ``early_factor`` times as
        many in the run's first ``early_rounds``, where honest margins are smallest."""
        k = self.early_factor if round_ < self.early_rounds else 1
        return k * self.own_sequences, k * self.other_sequences


class RunInfo(Wire):
    protocol_version: int = PROTOCOL_VERSION
    run_id: str
    seed: int
    model: str = Field(description="the preset's name, or 'custom'")
    architecture: ModelConfig = Field(description="the whole model config: every node builds from this")
    tokenizer_sha256: str = Field(description="sha256 of GET /v1/tokenizer")
    seq_len: int
    num_sequences: int
    eval_every: int
    codec: CodecConfig
    recipe: TrainingRecipe
    max_payload_bytes: int
    max_catchup_versions: int
    checkpoint_every: int = Field(
        default=1, ge=1, description="a checkpoint every this many versions: catch up from the nearest one"
    )
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    overlap: bool = Field(
        default=False,
        description="overlapped rounds: a round opens as the one before it starts closing, and its uploads "
        "are applied to the version that one publishes",
    )
    direct_uploads: bool = Field(
        default=False,
        description="miners upload payloads straight to the object store (POST /v1/rounds/{r}/uploads for a "
        "presigned form, then POST /v1/rounds/{r}/commits), not through the coordinator",
    )
    coordinator_key: str | None = Field(
        default=None,
        description="the coordinator's Ed25519 public key (hex): it signs this answer, the rounds, the data "
        "and the version history (GET /v1/history); nodes pin it",
    )
    signature: str | None = Field(default=None, description="the coordinator's signature of the rest")

    def signed_fields(self) -> dict[str, object]:
        return self.model_dump(mode="json", exclude={"signature"})


RoundStatus = Literal["open", "aggregating"]


class RoundInfo(Wire):
    round: int
    version: int = Field(description="the version the round trains from")
    status: RoundStatus
    param_hash: str
    submissions: int
    expected: int
    deadline_s: float | None = Field(
        description="seconds left before the round may close; None: no deadline yet"
    )
    closing: int | None = Field(
        default=None, description="overlapped rounds: the round before, still being closed (None: none)"
    )
    newest: int | None = Field(
        default=None,
        description="overlapped rounds: the newest version, when the round behind published one since "
        "this round opened; uploads may train from it too",
    )
    newest_hash: str | None = Field(default=None, description="the parameter hash of ``newest``")
    signature: str | None = Field(
        default=None,
        description="the coordinator's signature of the run, round, version, param_hash, status, closing, "
        "newest and newest_hash",
    )

    def signed_fields(self, run_id: str) -> dict[str, object]:
        """What ``signature`` covers: what a miner acts on (the counts and the deadline are advisory)."""
        keep = {"round", "version", "param_hash", "status", "closing", "newest", "newest_hash"}
        return {"run_id": run_id, **self.model_dump(mode="json", include=keep)}


class VersionInfo(Wire):
    version: int
    round: int | None
    param_hash: str
    eval_loss: float | None
    update_bytes: int
    checkpoint_bytes: int
    base_version: int | None = Field(default=None, description="the version its update applies to")
    rolled_back: bool = Field(default=False, description="an operator rolled the model back past it")
    record: SignedRecord | None = Field(
        default=None, description="the version's signed record in the history (protocol/history.py)"
    )


class Registration(Wire):
    miner: str
    registered: bool


class SubmissionReceipt(Wire):
    round: int
    miner: str
    payload_sha256: str
    bytes: int
    duplicate: bool = False


class UploadIntent(Wire):
    """A miner's wish to upload a payload straight to the object store (POST /v1/rounds/{r}/uploads)."""

    sha256: str = Field(min_length=64, max_length=64, pattern="^[0-9a-f]+$", description="the payload's")
    bytes: int = Field(ge=1, description="the payload's size")


class UploadTicket(Wire):
    """A presigned form: POST it (multipart, these fields and then the payload as ``file``) to ``url``
    before ``expires_at``; the object store takes only that key and at most ``max_bytes``."""

    url: str
    fields: dict[str, str]
    expires_at: float
    max_bytes: int


class UploadCommit(Wire):
    """The payload is in the object store: take it as this miner's upload (POST /v1/rounds/{r}/commits)."""

    sha256: str = Field(min_length=64, max_length=64, pattern="^[0-9a-f]+$")


class RoundReport(Wire):
    """One row of report.json."""

    round: int
    version: int
    eval_loss: float | None
    accepted: int
    rejected: int
    bytes_up: int
    bytes_down: int
    wall_s: float = Field(
        description="from the round's opening to the next round's: the time miners had for it (synchronous "
        "rounds: training, uploads and the close; overlapped ones: training and uploads, the close going on "
        "under the next round)"
    )
    compute_s: float = Field(description="the mean time its accepted miners spent in their inner steps")
    close_reason: str | None = None
    bytes_down_model: int = Field(default=0, description="published updates, checkpoints, uploads served")
    bytes_down_data: int = Field(default=0, description="training sequences")
    refusals: dict[str, int] = Field(default_factory=dict, description="refusal reason -> uploads refused")
    grad_norm_mean: float | None = Field(
        default=None,
        description="training health, as its accepted miners report it: the mean gradient norm "
        "before clipping over their inner steps",
    )
    grad_norm_max: float | None = Field(default=None, description="the largest gradient norm before clipping")
    clipped_fraction: float | None = Field(default=None, description="the mean fraction of steps clipped")
    lr: float | None = Field(default=None, description="the inner learning rate of their last steps (median)")


class LeaderboardEntry(Wire):
    """A miner's standing: its score with its uncertainty (protocol/evaluation.py) and its record."""

    miner: str
    score: float = Field(description="the conservative score that ranks and weights: mean - stderr")
    score_mean: float = Field(default=0.0, description="average round score, shrunk towards 0 by the prior")
    score_stderr: float = Field(default=0.0, description="the standard error of score_mean")
    rounds_missed: int = Field(default=0, description="published rounds in the window with nothing from it")
    gain_avg: float = Field(description="moving average of the loss gain on its own data (nats/token)")
    assigned_avg: float = Field(description="moving average of the indicator own gain > other gain (+1/-1)")
    rounds_contributed: int
    rounds_refused: int
    refusals: dict[str, int] = Field(description="refusal reason -> rounds")
    last_round: int
    verdicts: int = Field(description="evaluated rounds behind the score (within the last 50 rounds)")
    flagged: dict[str, int] = Field(
        default_factory=dict,
        description="overlapped rounds: accepted uploads that their evaluation, after the version, would "
        "have refused, by reason",
    )


class Leaderboard(Wire):
    round: int | None = Field(description="scores as of the close of this round; None: no round closed")
    miners: list[LeaderboardEntry]


class Status(Wire):
    run: RunInfo
    round: RoundInfo
    miners: int
    initial_eval_loss: float | None
    rounds: list[RoundReport]
    leaderboard: list[LeaderboardEntry] = Field(default_factory=list)
    stalled_rounds: int = Field(
        default=0, description="closed rounds in a row whose versions did not lower the held-out loss"
    )
    stalled_by: list[str] = Field(
        default_factory=list, description="the keys whose accepted uploads made up those rounds' versions"
    )


class SubmissionRecord(Wire):
    miner: str
    sha256: str
    bytes: int
    status: Literal["received", "accepted", "rejected"]
    reason: str | None
    evaluated: bool = Field(default=False, description="it passed the cheap checks and was evaluated")
    scale: float | None = Field(default=None, description="its clip scale, min(1, reference norm / norm)")
    flag: str | None = Field(
        default=None,
        description="overlapped rounds: the refusal an accepted upload would have had from its evaluation, "
        "which ended after the version was published",
    )


class RoundRecord(Wire):
    """A round and its uploads: what a validator needs to evaluate it."""

    round: int
    version: int = Field(description="the version the round's uploads were trained from")
    status: Literal["open", "aggregating", "closed"]
    submissions: list[SubmissionRecord]
    reference_norm: float | None = Field(default=None, description="the norm uploads were clipped to")
    close_reason: str | None = Field(default=None, description="why the round closed without a version")
    applied_to: int | None = Field(
        default=None,
        description="the version its uploads were evaluated on and applied to: the one they trained from, "
        "or (overlapped rounds) the next; None until the round closed",
    )
    scored: bool = Field(
        default=True,
        description="the coordinator's own verdicts are in (overlapped rounds: some come after the close)",
    )
    signature: str | None = Field(
        default=None,
        description="the coordinator's signature of the run, round, version, status, applied_to and each "
        "upload's miner, sha256, evaluated and scale: what a validator evaluates",
    )

    def signed_fields(self, run_id: str) -> dict[str, object]:
        """What ``signature`` covers (the counts, reasons and flags are for people)."""
        uploads = [
            {"miner": s.miner, "sha256": s.sha256, "evaluated": s.evaluated, "scale": s.scale}
            for s in self.submissions
        ]
        fields = self.model_dump(mode="json", include={"round", "version", "status", "applied_to"})
        return {"run_id": run_id, **fields, "submissions": uploads}

    def evaluated_on(self) -> int:
        return self.version if self.applied_to is None else self.applied_to


class Verdict(Wire):
    """A validator's evaluation of one upload: mean losses (nats/token) before and after it is applied, the
    standard error of the own-data margin they give (protocol/evaluation.py), and the margin paired with
    the round's mean update (protocol/pairing.py; 0 and 0 in a round too small to pair)."""

    miner: str = Field(min_length=64, max_length=64, pattern="^[0-9a-f]+$")
    own_before: float = Field(ge=0, le=1e4)
    own_after: float = Field(ge=0, le=1e4)
    other_before: float = Field(ge=0, le=1e4)
    other_after: float = Field(ge=0, le=1e4)
    margin_se: float = Field(ge=0, le=1e4)
    paired_margin: float = Field(default=0.0, ge=-1e4, le=1e4, description="the paired margin")
    paired_se: float = Field(default=0.0, ge=0, le=1e4, description="its standard error; 0: not paired")


class Verdicts(Wire):
    verdicts: list[Verdict] = Field(max_length=10_000)


class VerdictReceipt(Wire):
    round: int
    validator: str
    recorded: int


class ErrorDetail(Wire):
    code: str
    message: str


class ErrorBody(Wire):
    error: ErrorDetail
