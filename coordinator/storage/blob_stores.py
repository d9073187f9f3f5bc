"""The blob store a coordinator's settings choose: files on its disk (the default) or an S3-compatible
bucket."""

from __future__ import annotations

from pathlib import Path

from coordinator.settings import BlobSettings
from coordinator.storage.blobs import BlobStore, FileBlobStore
from coordinator.storage.s3 import S3BlobStore


def make_blob_store(settings: BlobSettings, root: Path) -> BlobStore:
    """The store ``settings`` choose; the file store keeps its blobs under ``root``."""
    if settings.backend == "s3":
        if settings.s3_bucket is None:
            raise ValueError("blobs.s3_bucket is required when blobs.backend is 's3'")
        return S3BlobStore(
            settings.s3_bucket,
            prefix=settings.s3_prefix,
            endpoint_url=settings.s3_endpoint_url,
            region=settings.s3_region,
            timeout_s=settings.s3_timeout_s,
        )
    return FileBlobStore(root)
