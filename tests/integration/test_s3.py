"""A real uvicorn coordinator keeping its blobs in a real S3-compatible server (moto), both on 127.0.0.1;
the miner's own HTTP client downloads from it, resuming an interrupted checkpoint download."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import boto3
import pytest

from node.client import CoordinatorClient, Unavailable
from protocol.model import build_model
from protocol.params import load_checkpoint, param_spec, params_hash
from protocol.signing import generate_key


def test_a_miner_resumes_a_checkpoint_download_served_from_s3(
    live_coordinator: Callable[..., Any], s3_bucket: dict[str, Any], tmp_path: Path
) -> None:
    with live_coordinator(blobs=s3_bucket) as server:
        client = CoordinatorClient(server.url, generate_key())
        version, whole = client.checkpoint()
        partial = tmp_path / "checkpoint-0.partial"
        partial.write_bytes(whole[: len(whole) // 3])
        before = client.bytes_down
        again, resumed = client.checkpoint(version, partial)
        fetched = client.bytes_down - before
        partial.write_bytes(whole + b"junk")  # not a prefix: the range is refused and the file dropped
        with pytest.raises(Unavailable):
            client.checkpoint(version, partial)
        assert not partial.exists()
        info = client.round()
        client.close()

    assert again == version == 0
    assert resumed == whole
    assert fetched == len(whole) - len(whole) // 3
    spec = param_spec(build_model("tiny"))
    params, _ = load_checkpoint(whole, spec)
    assert params_hash(params, spec) == info.param_hash
    sha = hashlib.sha256(whole).hexdigest()
    key = f"runs/test/{sha[:2]}/{sha}"  # the prefix the s3_bucket fixture sets
    s3 = boto3.session.Session().client("s3", endpoint_url=s3_bucket["s3_endpoint_url"])
    assert s3.head_object(Bucket=s3_bucket["s3_bucket"], Key=key)["ContentLength"] == len(whole)
