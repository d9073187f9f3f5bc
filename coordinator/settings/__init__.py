"""The coordinator's settings: flags > GRADPOOL_* environment > TOML file > defaults. The sections are in
training.py (what a round does) and deployment.py (where the state lives, whom the coordinator admits)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from coordinator.settings.base import Section, renamed
from coordinator.settings.deployment import (
    AdmissionSettings,
    BlobSettings,
    ClusterSettings,
    IdentitySettings,
    StoreSettings,
)
from coordinator.settings.training import (
    AggregationSettings,
    CheckSettings,
    DataSettings,
    OuterSettings,
    PublishSettings,
    RoundSettings,
    ValidationSettings,
)
from protocol.codec import make_codec
from protocol.device import device_name
from protocol.model import ModelConfig, get_config
from protocol.wire import CodecConfig, TrainingRecipe

__all__ = [
    "AdmissionSettings",
    "AggregationSettings",
    "BlobSettings",
    "CheckSettings",
    "ClusterSettings",
    "CoordinatorSettings",
    "DataSettings",
    "IdentitySettings",
    "OuterSettings",
    "PublishSettings",
    "RoundSettings",
    "Section",
    "StoreSettings",
    "ValidationSettings",
    "renamed",
]


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
    def _checkpoints(self) -> CoordinatorSettings:
        """A miner that loads the newest checkpoint must reach the newest version by published updates."""
        every, most = self.publish.checkpoint_every, self.max_catchup_versions
        if every > most:
            raise ValueError(
                f"[publish] checkpoint_every ({every}) is more than max_catchup_versions ({most}): a miner "
                "loading the newest checkpoint could not catch up from it by the published updates"
            )
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
