"""The coordinator's settings: flags > GRADPOOL_* environment > TOML file > defaults."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from protocol.codec import make_codec
from protocol.device import Precision, device_name
from protocol.model import ModelConfig, get_config
from protocol.wire import CodecConfig, TrainingRecipe

MiB = 1 << 20


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


def renamed(data: Any, old: str, new: str, where: str) -> Any:
    """A key under its old name still works, with a warning: settings files outlive renames."""
    if isinstance(data, dict) and old in data:
        warnings.warn(f"{where}{old} is deprecated; it is now {where}{new}", DeprecationWarning, stacklevel=2)
        data = dict(data)
        value = data.pop(old)
        data.setdefault(new, value)
    return data


class RoundSettings(Section):
    min_quorum: int = Field(default=1, ge=1, description="uploads needed before a round may close")
    deadline_s: float = Field(default=30.0, gt=0, description="close this long after the first upload")
    adaptive_deadline: bool = Field(
        default=True, description="shorten the deadline to what recent rounds' arrivals needed"
    )
    min_deadline_s: float = Field(default=5.0, gt=0, description="the adaptive deadline's lower bound")
    drop_after_rounds: int = Field(default=2, ge=1, description="stop waiting for a miner silent this long")
    max_close_attempts: int = Field(
        default=3,
        ge=1,
        le=100,
        description="tries before a round that fails to close closes without a version",
    )
    overlap: bool = Field(
        default=True,
        description="open the next round as one starts closing: miners train while it is judged and "
        "published, and its uploads are applied one version after the one they trained from",
    )
    max_staleness: Literal[1] = Field(
        default=1,
        description="versions between the one an upload trained from and the one it is applied to, at "
        "most (overlapped rounds; closing one round at a time makes it exactly 1)",
    )


class CheckSettings(Section):
    """The checks at aggregation (besides decoding, non-finite values and empty updates), and the guard on
    every new version."""

    max_norm_ratio: float = Field(
        default=10.0, gt=1, description="refuse norms above this x the reference norm"
    )
    copy_cosine: float = Field(
        default=0.98, gt=0, le=1, description="refuse the later of two updates this parallel"
    )
    near_copy_ratio: float = Field(
        default=2.2,
        gt=1,
        description="refuse the later of two uploads keeping this many times more of the same coordinates "
        "than independent uploads of the round do (near-copies: one update re-encoded)",
    )
    history_rounds: int = Field(
        default=3,
        ge=0,
        le=100,
        description="recent rounds whose accepted norms and gains join the references",
    )
    replay_window_rounds: int = Field(
        default=20, ge=0, le=10_000, description="refuse a copy of an upload of this many recent rounds"
    )
    max_loss_increase: float = Field(
        default=0.05,
        ge=0,
        description="refuse a version whose held-out loss rises by more than this fraction",
    )


class AggregationSettings(Section):
    """How the accepted updates are combined, after each is clipped to the median norm."""

    method: Literal["mean", "trimmed_mean", "median"] = Field(
        default="mean", description="per coordinate, over the contributors that selected it"
    )
    trim_fraction: float = Field(
        default=0.2, ge=0, lt=0.5, description="trimmed_mean: drop this fraction at each end"
    )


class ValidationSettings(Section):
    """Scoring every upload by what it does to the loss (protocol/evaluation.py), and what aggregation
    does with the scores."""

    builtin: bool = Field(default=True, description="evaluate every upload here when its round closes")
    own_sequences: int = Field(default=48, ge=2, le=1024, description="sample of the miner's assignment")
    other_sequences: int = Field(default=48, ge=2, le=1024, description="sample of data it was not given")
    early_rounds: int = Field(default=4, ge=0, le=1000, description="the run's first rounds, sampled more")
    early_factor: int = Field(
        default=2, ge=1, le=16, description="those rounds draw this many times own and other sequences"
    )
    refuse_harmful: bool = Field(
        default=True, description="refuse an update that does not lower the loss on its own data"
    )
    min_gain_fraction: float = Field(
        default=0.35, ge=0, lt=1, description="refuse gains below this x the round's median (3+); 0: off"
    )
    weight_by_score: bool = Field(
        default=False, description="weight each accepted update by its miner's score (mean weight 1)"
    )
    score_window: int = Field(default=20, ge=1, le=1000, description="rounds a miner's score averages over")
    score_alpha: float | None = Field(
        default=None, gt=0, le=1, description="None: the plain mean over the window; else an exponential one"
    )
    validators: list[str] | None = Field(
        default=None, description="public keys (hex) whose verdicts are taken; None: any signed key"
    )
    max_evaluated: int | None = Field(
        default=16,
        ge=1,
        le=100_000,
        description="uploads evaluated per round at most (None: all): a recent refusal first, then a record "
        "shorter than min_record, then a draw with the round's salt; the others go on the cheap checks",
    )
    min_record: int = Field(default=3, ge=0, le=1000, description="evaluated rounds before a miner may skip")
    batch_size: int = Field(
        default=16, ge=1, le=4096, description="sequences per forward pass when evaluating, on the device"
    )
    precision: Precision = Field(
        default="auto",
        description="evaluation's forward passes: auto (bf16 autocast on CUDA, fp32 on CPU), fp32 or bf16; "
        "the canonical parameters, aggregation and the outer step are fp32 on the CPU whatever this says",
    )
    gate_sequences: int = Field(
        default=16,
        ge=2,
        le=1024,
        description="overlapped rounds: own sequences an upload judged before the version is judged on (the "
        "first of its own sample); the whole evaluation follows the version",
    )


class DataSettings(Section):
    corpus: Path | None = Field(
        default=None, description=".txt/.md/.jsonl/.parquet/.bin file or folder; None: stdlib"
    )
    tokenizer: str = Field(default="byte", description="'byte', or the path of a tokenizer.json")
    max_tokens: int | None = Field(default=None, ge=1024)
    eval_every: int = Field(default=50, ge=2, description="every n-th sequence is held out")
    eval_sequences: int = Field(default=64, ge=1, le=100_000)


class PublishSettings(Section):
    """What every miner downloads each round: the published update. ``sparseloco`` compresses the outer
    step with the coordinator's own error feedback, so it is about one upload's size however many miners
    there are; ``exact`` publishes every touched coordinate in fp32 (the dense baseline's format); ``auto``:
    sparseloco when the uploads are, exact otherwise."""

    format: Literal["auto", "sparseloco", "exact"] = Field(
        default="auto", description="the published update's format (was `codec`, still accepted)"
    )
    k: int = Field(default=192, ge=4, le=4096, description="values kept per chunk of tile x tile")
    tile: int = Field(default=64, ge=8, le=256)
    bits: Literal[2, 4, 8] = Field(default=2, description="bits per value")
    ef_beta: float = Field(default=0.95, ge=0, le=1, description="decay of the coordinator's error feedback")
    budget: float | None = Field(
        default=None,
        gt=0,
        le=64,
        description="the published update's size in uploads (their tensors): sets `k` to the largest that "
        "fits, `k` itself then ignored; what every miner downloads, traded for loss knowingly",
    )

    @model_validator(mode="before")
    @classmethod
    def _old_names(cls, data: Any) -> Any:
        return renamed(data, "codec", "format", "[publish] ")


class OuterSettings(Section):
    """Outer optimizer. Unset values follow the codec: SGD lr 1.0 for sparseloco, Nesterov 0.7/0.9 dense."""

    lr: float | None = Field(default=None, gt=0)
    momentum: float | None = Field(default=None, ge=0, lt=1)


class AdmissionSettings(Section):
    """Who may register, and how fast: new keys are free, so fielding many of them costs time."""

    mode: Literal["open", "allowlist"] = Field(
        default="open", description="allowlist: only the keys of `allowlist` and `allowlist_file` register"
    )
    allowlist_file: Path | None = Field(
        default=None, description="public keys (hex), one a line (# comments): read again when it changes"
    )
    per_address_per_minute: int = Field(
        default=60, ge=1, description="new registrations from one client address in any minute"
    )
    per_minute: int = Field(default=600, ge=1, description="new registrations in any minute, from anywhere")


class BlobSettings(Section):
    """Where uploads, published updates and checkpoints are kept. S3 credentials come from the standard AWS
    chain (AWS_* environment, shared config files, instance role), never from these settings."""

    backend: Literal["file", "s3"] = Field(default="file", description="file: under state_dir; s3: a bucket")
    s3_bucket: str | None = Field(default=None, min_length=3, max_length=63, description="must exist")
    s3_prefix: str = Field(default="gradpool", max_length=512, description="key prefix: one per run")
    s3_endpoint_url: str | None = Field(default=None, description="an S3-compatible endpoint; None: AWS")
    s3_region: str | None = Field(default=None, description="None: from the AWS chain")
    s3_timeout_s: float = Field(default=60.0, gt=0, description="connect and read timeout per request")
    redirect_downloads: bool = Field(
        default=False, description="s3: answer downloads with 307 to a presigned URL of the object"
    )
    redirect_expiry_s: float = Field(default=600.0, ge=1, le=604800, description="how long a URL is good")
    direct_uploads: bool = Field(
        default=False,
        description="s3: miners upload payloads straight to the bucket with a presigned form (expiring after "
        "redirect_expiry_s), then commit them; the coordinator reads them from there",
    )

    @field_validator("s3_prefix")
    @classmethod
    def _strip_slashes(cls, prefix: str) -> str:
        return prefix.strip("/")

    @model_validator(mode="after")
    def _bucket_for_s3(self) -> BlobSettings:
        if self.backend == "s3" and self.s3_bucket is None:
            raise ValueError("blobs.s3_bucket is required when blobs.backend is 's3'")
        if self.direct_uploads and self.backend != "s3":
            raise ValueError(
                "blobs.direct_uploads needs blobs.backend = 's3': the miners upload to the bucket"
            )
        return self


class StoreSettings(Section):
    """Where the run's state is kept (rounds, uploads' records, verdicts, versions and their signed history;
    the blobs are in [blobs]): the SQLite file state.db in the state directory, or a PostgreSQL database.
    Its schema moves on with `gradpool coordinator migrate`; a coordinator refuses a schema it does not
    run."""

    url: SecretStr | None = Field(
        default=None,
        description="None: state.db in the state directory; or postgresql://USER:PASSWORD@HOST:PORT/DB",
    )


class ClusterSettings(Section):
    """Several coordinator processes on one PostgreSQL store and one S3 bucket: the one holding the leader
    lease runs the network; the others pass every request on to it (coordinator/api/standby.py), and the
    first to find the lease run out takes over where it stopped."""

    lease_s: float = Field(
        default=10.0, ge=1, le=600, description="how long the leader lease lasts unless renewed (every third)"
    )
    name: str | None = Field(
        default=None, description="this process in the lease and the logs; None: host:pid"
    )
    url: str | None = Field(
        default=None, description="where the other replicas reach this one; None: scheme://host:port as bound"
    )


class IdentitySettings(Section):
    """The coordinator's own Ed25519 key: it signs the version history and its answers (protocol/history.py);
    its public key is in /v1/info, and miners pin it."""

    key: Path | None = Field(
        default=None,
        description="the key (PEM, from gradpool keygen), shared by replicas; None: coordinator.pem in "
        "the state directory, made on the first start",
    )


class CoordinatorSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GRADPOOL_", env_nested_delimiter="__", extra="forbid")

    state_dir: Path = Path("gradpool-state")
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    ssl_certfile: Path | None = Field(
        default=None,
        description="serve HTTPS with this certificate (PEM, its chain after it); with ssl_keyfile",
    )
    ssl_keyfile: Path | None = Field(default=None, description="the certificate's private key (PEM)")
    run_id: str = Field(default="gradpool", min_length=1, max_length=64)
    seed: int = 0
    model: str | ModelConfig = Field(default="tiny", description="a preset name, or a [model] table")
    device: str = Field(
        default="auto",
        description="where evaluation and the held-out loss run: auto (CUDA when present, else CPU), cpu, "
        "cuda or cuda:N; a version's parameters and hash do not depend on it",
    )
    codec: CodecConfig = Field(default_factory=CodecConfig)
    recipe: TrainingRecipe = Field(default_factory=TrainingRecipe)
    outer: OuterSettings = Field(default_factory=OuterSettings)
    publish: PublishSettings = Field(default_factory=PublishSettings)
    rounds: RoundSettings = Field(default_factory=RoundSettings)
    checks: CheckSettings = Field(default_factory=CheckSettings)
    aggregation: AggregationSettings = Field(default_factory=AggregationSettings)
    validation: ValidationSettings = Field(default_factory=ValidationSettings)
    data: DataSettings = Field(default_factory=DataSettings)
    blobs: BlobSettings = Field(default_factory=BlobSettings)
    admission: AdmissionSettings = Field(default_factory=AdmissionSettings)
    identity: IdentitySettings = Field(default_factory=IdentitySettings)
    store: StoreSettings = Field(default_factory=StoreSettings)
    cluster: ClusterSettings = Field(default_factory=ClusterSettings)
    max_payload_bytes: int | None = Field(
        default=None, ge=1024, description="None: the largest valid payload for this model and codec"
    )
    read_timeout_s: float = Field(default=10.0, gt=0, description="cut off a request body that stalls")
    max_catchup_versions: int = Field(default=16, ge=1)
    signature_window_s: float = Field(default=120.0, gt=0)
    keep_checkpoints: int = Field(default=3, ge=1)
    admin_token: SecretStr | None = Field(default=None, description="bearer token for /v1/admin; None: off")
    allowlist: list[str] | None = Field(
        default=None, description="public keys (hex) allowed to register (given, it admits only these)"
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["text", "json"] = Field(default="text", description="json: one object per line")

    @model_validator(mode="before")
    @classmethod
    def _retired(cls, data: Any) -> Any:
        """``[faults]`` (a sleep before each commit, for crash tests) is gone: tests inject failures through
        ``coordinator.hooks.Hooks``. A settings file that still has it loads, with a warning."""
        if isinstance(data, dict) and "faults" in data:
            warnings.warn("[faults] is no longer read; remove it", DeprecationWarning, stacklevel=2)
            data = {k: v for k, v in data.items() if k != "faults"}
        return data

    @field_validator("device")
    @classmethod
    def _device(cls, device: str) -> str:
        return device_name(device)

    @model_validator(mode="after")
    def _admission(self) -> CoordinatorSettings:
        a = self.admission
        if a.mode == "allowlist" and self.allowlist is None and a.allowlist_file is None:
            raise ValueError('[admission] mode = "allowlist" needs allowlist or [admission] allowlist_file')
        return self

    @model_validator(mode="after")
    def _tls(self) -> CoordinatorSettings:
        """HTTPS takes a certificate and its key (read when the server starts)."""
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise ValueError("ssl_certfile and ssl_keyfile go together: give both for HTTPS, or neither")
        return self

    def identity_key(self) -> Path:
        return self.identity.key or self.state_dir / "coordinator.pem"

    def scheme(self) -> str:
        return "https" if self.ssl_certfile is not None else "http"

    def store_url(self) -> str | None:
        return None if self.store.url is None else self.store.url.get_secret_value()

    @field_validator("model", mode="before")
    @classmethod
    def _preset_or_config(cls, model: object) -> object:
        """A preset's name (a ValueError names them all), or a [model] table checked as a ModelConfig."""
        if isinstance(model, str):
            get_config(model)
        elif isinstance(model, dict):
            try:
                return ModelConfig.model_validate(model)
            except ValidationError as e:
                err = e.errors()[0]
                where = ".".join(str(x) for x in err["loc"])
                raise ValueError(f"{where + ': ' if where else ''}{err['msg']}") from None
        return model

    def model_name(self) -> str:
        return self.model if isinstance(self.model, str) else "custom"

    def outer_lr(self) -> float:
        if self.outer.lr is not None:
            return self.outer.lr
        return make_codec(self.codec.name).outer_lr

    def outer_momentum(self) -> float:
        if self.outer.momentum is not None:
            return self.outer.momentum
        return make_codec(self.codec.name).outer_momentum
