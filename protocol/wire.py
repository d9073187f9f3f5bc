"""JSON messages between coordinator and nodes (pydantic). The binary payloads live in codec and params."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from protocol.payload import CodecName

PROTOCOL_VERSION = 1
HEADER_PROTOCOL = "X-Gradpool-Protocol"


class Wire(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TrainingRecipe(Wire):
    """How every miner trains: set by the coordinator, so all updates are comparable."""

    inner_steps: int = Field(default=20, ge=1, le=10_000)
    batch_size: int = Field(default=8, ge=1, le=4096, description="sequences per inner step")
    lr: float = Field(default=2e-3, gt=0, le=1.0)
    warmup_steps: int = Field(default=20, ge=0)
    weight_decay: float = Field(default=0.1, ge=0)
    beta1: float = Field(default=0.9, ge=0, lt=1)
    beta2: float = Field(default=0.95, ge=0, lt=1)
    grad_clip: float = Field(default=1.0, gt=0)
    ef_beta: float = Field(default=0.95, ge=0, le=1)


class CodecConfig(Wire):
    name: CodecName = "sparseloco"
    k: int = Field(default=64, ge=4, le=4096)
    tile: int = Field(default=64, ge=8, le=256)


class RunInfo(Wire):
    protocol_version: int = PROTOCOL_VERSION
    run_id: str
    seed: int
    model: str
    seq_len: int
    num_sequences: int
    eval_every: int
    codec: CodecConfig
    recipe: TrainingRecipe
    max_payload_bytes: int
    max_catchup_versions: int


RoundStatus = Literal["open", "aggregating"]


class RoundInfo(Wire):
    round: int
    version: int
    status: RoundStatus
    param_hash: str
    submissions: int
    expected: int
    deadline_s: float | None = Field(
        description="seconds left before the round may close; None: no deadline yet"
    )


class VersionInfo(Wire):
    version: int
    round: int | None
    param_hash: str
    eval_loss: float | None
    update_bytes: int
    checkpoint_bytes: int


class Registration(Wire):
    miner: str
    registered: bool


class SubmissionReceipt(Wire):
    round: int
    miner: str
    payload_sha256: str
    bytes: int
    duplicate: bool = False


class RoundReport(Wire):
    """One row of report.json."""

    round: int
    version: int
    eval_loss: float | None
    accepted: int
    rejected: int
    bytes_up: int
    bytes_down: int
    wall_s: float
    compute_s: float


class Status(Wire):
    run: RunInfo
    round: RoundInfo
    miners: int
    initial_eval_loss: float | None
    rounds: list[RoundReport]


class ErrorDetail(Wire):
    code: str
    message: str


class ErrorBody(Wire):
    error: ErrorDetail
