"""A real uvicorn coordinator keeping its blobs in a real S3-compatible server (moto), both on 127.0.0.1;
the miner's own HTTP client downloads from it, resuming an interrupted checkpoint download."""

from __future__ import annotations

import hashlib
import logging
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from moto.server import ThreadedMotoServer

from node.client import CoordinatorClient, Unavailable
from protocol.model import build_model
from protocol.params import load_checkpoint, param_spec, params_hash
from protocol.signing import generate_key


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_blobs(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, Any]:
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    bucket = f"gradpool-{uuid.uuid4().hex[:16]}"
    boto3.session.Session().client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    return {"backend": "s3", "s3_bucket": bucket, "s3_endpoint_url": s3_endpoint}


def test_a_miner_resumes_a_checkpoint_download_served_from_s3(
    live_coordinator: Callable[..., Any], s3_blobs: dict[str, Any], tmp_path: Path
) -> None:
    with live_coordinator(blobs=s3_blobs) as server:
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
    key = f"gradpool/{hashlib.sha256(whole).hexdigest()[:2]}/{hashlib.sha256(whole).hexdigest()}"
    s3 = boto3.session.Session().client("s3", endpoint_url=s3_blobs["s3_endpoint_url"])
    assert s3.head_object(Bucket=s3_blobs["s3_bucket"], Key=key)["ContentLength"] == len(whole)
