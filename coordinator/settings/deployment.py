"""The settings of where a coordinator keeps its state and whom it takes in: admission, blobs, the store,
the cluster of replicas and the coordinator's own key."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import (
    Field,
    SecretStr,
    field_validator,
    model_validator,
)

from coordinator.settings.base import Section


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
