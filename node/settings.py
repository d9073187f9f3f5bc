"""The miner's settings: flags > GRADPOOL_* environment > TOML file > defaults."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from protocol.device import Precision

AdversaryKind = Literal[
    "noise", "scaled", "signflip", "copycat", "stale", "lazy", "freerider", "nan", "lutscale", "sybil"
]


class MinerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GRADPOOL_", extra="forbid")

    coordinator: str = Field(
        default="http://127.0.0.1:8000",
        description="the coordinator's base URL; several, comma-separated: replicas, tried in turn when one "
        "fails",
    )
    ca_cert: Path | None = Field(
        default=None, description="HTTPS: trust this CA's certificates too (PEM), beside the system's"
    )
    coordinator_key: str | None = Field(
        default=None,
        pattern="^[0-9a-fA-F]{64}$",
        description="the coordinator's public key (hex) to pin; None: pinned on first use in state_dir",
    )
    key: Path = Field(default=Path("miner.pem"), description="Ed25519 private key (PEM)")
    create_key: bool = Field(default=False, description="generate the key file if it does not exist")
    state_dir: Path = Field(default=Path("miner-state"))
    device: Literal["auto", "cpu", "cuda"] | str = "auto"
    micro_batch: int | None = Field(default=None, ge=1)
    threads: int | None = Field(default=None, ge=1, description="torch CPU threads")
    max_rounds: int | None = Field(default=None, ge=1)
    timeout_s: float = Field(default=30.0, gt=0, description="per HTTP call")
    startup_timeout_s: float = Field(default=20.0, ge=0, description="how long to wait for the coordinator")
    max_backoff_s: float = Field(default=30.0, gt=0)
    upload_retry_s: float = Field(default=120.0, ge=0, description="keep retrying a failed upload this long")
    metrics_port: int | None = Field(default=None, ge=0, le=65535, description="serve Prometheus metrics")
    metrics_host: str = Field(default="127.0.0.1", description="address for the metrics endpoint")
    adversary: AdversaryKind | None = Field(
        default=None, description="simulations only: cheat this way (node/adversary.py)"
    )
    adversary_shared: Path | None = Field(
        default=None,
        description="simulations only, sybil: a folder the operator's keys share (its first key leaves each "
        "round's update there for the others)",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["text", "json"] = Field(default="text", description="json: one object per line")


class ValidatorSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GRADPOOL_", extra="forbid")

    coordinator: str = Field(
        default="http://127.0.0.1:8000",
        description="the coordinator's base URL; several, comma-separated: replicas, tried in turn when one "
        "fails",
    )
    ca_cert: Path | None = Field(
        default=None, description="HTTPS: trust this CA's certificates too (PEM), beside the system's"
    )
    coordinator_key: str | None = Field(
        default=None,
        pattern="^[0-9a-fA-F]{64}$",
        description="the coordinator's public key (hex) to pin; None: pinned on first use in state_dir",
    )
    key: Path = Field(default=Path("validator.pem"), description="Ed25519 private key (PEM)")
    create_key: bool = Field(default=False, description="generate the key file if it does not exist")
    state_dir: Path = Field(default=Path("validator-state"), description="downloads and progress")
    device: Literal["auto", "cpu", "cuda"] | str = "auto"
    batch_size: int = Field(default=16, ge=1, le=4096, description="sequences per forward pass")
    precision: Precision = Field(
        default="auto", description="forward passes: auto (bf16 autocast on CUDA, fp32 on CPU), fp32 or bf16"
    )
    threads: int | None = Field(default=None, ge=1, description="torch CPU threads")
    max_rounds: int | None = Field(default=None, ge=1, description="stop after evaluating this many rounds")
    poll_s: float = Field(default=2.0, gt=0, description="how long to wait for the next round to close")
    timeout_s: float = Field(default=30.0, gt=0, description="per HTTP call")
    startup_timeout_s: float = Field(default=20.0, ge=0, description="how long to wait for the coordinator")
    max_backoff_s: float = Field(default=30.0, gt=0)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["text", "json"] = Field(default="text", description="json: one object per line")
