"""The miner's HTTP client: typed errors from the coordinator's codes, and resumable checkpoints (served
from files or from an S3-compatible store)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest

from node.client import CoordinatorClient
from node.errors import (
    AlreadySubmitted,
    NotAuthorized,
    ProtocolMismatch,
    Rejected,
    RoundClosed,
    StaleVersion,
    Unavailable,
)
from protocol.model import build_model
from protocol.params import load_checkpoint, param_spec, params_hash
from protocol.signing import HEADER_SIGNATURE, generate_key, verify_request
from protocol.wire import HEADER_PROTOCOL


def client_answering(
    status: int, body: Any = None, headers: dict[str, str] | None = None
) -> CoordinatorClient:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, json=body, headers=headers)

    return CoordinatorClient(
        "http://coordinator.test", generate_key(), transport=httpx.MockTransport(handler)
    )


@pytest.mark.parametrize(
    ("status", "code", "exc"),
    [
        (409, "round_closed", RoundClosed),
        (409, "round_not_open", RoundClosed),
        (409, "stale_version", StaleVersion),
        (409, "already_submitted", AlreadySubmitted),
        (401, "bad_signature", NotAuthorized),
        (403, "unknown_miner", NotAuthorized),
        (422, "wrong_k", Rejected),
        (413, "payload_too_large", Rejected),
    ],
)
def test_refusals_come_back_as_typed_exceptions(status: int, code: str, exc: type[Exception]) -> None:
    client = client_answering(status, {"error": {"code": code, "message": "no"}})
    with pytest.raises(exc) as err:
        client.submit(0, b"payload")
    assert err.value.code == code and err.value.status == status  # type: ignore[attr-defined]


def test_server_errors_and_unreachable_hosts_are_unavailable() -> None:
    with pytest.raises(Unavailable):
        client_answering(503, {"error": {"code": "busy", "message": "later"}}).round()

    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    client = CoordinatorClient(
        "http://coordinator.test", generate_key(), transport=httpx.MockTransport(refuse)
    )
    with pytest.raises(Unavailable):
        client.round()


def test_a_server_that_is_not_a_coordinator_is_a_protocol_mismatch() -> None:
    with pytest.raises(ProtocolMismatch):
        client_answering(404, None).info()
    with pytest.raises(ProtocolMismatch, match="protocol 99"):
        client_answering(200, {}, headers={HEADER_PROTOCOL: "99"}).info()


def test_uploads_are_signed_over_the_exact_path_and_body() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"round": 4, "miner": "m", "payload_sha256": "x", "bytes": 3})

    key = generate_key()
    client = CoordinatorClient("http://coordinator.test/", key, transport=httpx.MockTransport(handler))
    client.submit(4, b"abc")
    request = seen[0]
    assert HEADER_SIGNATURE in request.headers
    miner, _ = verify_request(dict(request.headers), "POST", "/v1/rounds/4/submissions", b"abc")
    assert miner == client.key.public_key().public_bytes_raw().hex()


@pytest.mark.parametrize("backend", ["file", "s3"])
def test_an_interrupted_checkpoint_download_resumes_where_it_stopped(
    live_coordinator: Callable[..., Any], tmp_path: Path, request: pytest.FixtureRequest, backend: str
) -> None:
    blobs: dict[str, Any] = request.getfixturevalue("s3_bucket") if backend == "s3" else {}
    with live_coordinator(blobs=blobs) as server:
        client = CoordinatorClient(server.url, generate_key())
        version, whole = client.checkpoint()
        partial = tmp_path / "checkpoint-0.partial"
        partial.write_bytes(whole[: len(whole) // 3])
        before = client.bytes_down
        again, resumed = client.checkpoint(version, partial)
        fetched = client.bytes_down - before
        # a partial file that is not a prefix (longer than the file) makes the server refuse the range
        partial.write_bytes(whole + b"junk")
        with pytest.raises(Unavailable):
            client.checkpoint(version, partial)
        assert not partial.exists()
        _, fresh = client.checkpoint(version, partial)
        info = client.round()
    assert again == version == 0
    assert resumed == whole == fresh
    assert fetched == len(whole) - len(whole) // 3
    assert not partial.exists()
    spec = param_spec(build_model("tiny"))
    assert params_hash(load_checkpoint(whole, spec)[0], spec) == info.param_hash
    if backend == "s3":  # served from the bucket, under the run's prefix
        sha = hashlib.sha256(whole).hexdigest()
        s3 = boto3.session.Session().client("s3", endpoint_url=blobs["s3_endpoint_url"])
        head = s3.head_object(Bucket=blobs["s3_bucket"], Key=f"runs/test/{sha[:2]}/{sha}")
        assert head["ContentLength"] == len(whole)


def test_a_redirected_download_that_is_refused_asks_the_coordinator_again() -> None:
    """A presigned URL that expired (the store answers 403) is not the end: the client asks the coordinator
    for a new one and follows it."""
    asked: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        asked.append(f"{request.url.host}{request.url.path}?{request.url.query.decode()}")
        if request.url.host == "coordinator.test":
            n = sum(a.startswith("coordinator.test") for a in asked)
            return httpx.Response(
                307, headers={"Location": f"http://bucket.test/blob?signature={n}", "X-Gradpool-Version": "4"}
            )
        if request.url.query == b"signature=1":
            return httpx.Response(403, text="<Error><Code>AccessDenied</Code>Request has expired</Error>")
        return httpx.Response(200, content=b"the update")

    client = CoordinatorClient(
        "http://coordinator.test", generate_key(), transport=httpx.MockTransport(handler)
    )
    assert client.update(4) == b"the update"
    assert asked == [
        "coordinator.test/v1/versions/4/update?",
        "bucket.test/blob?signature=1",
        "coordinator.test/v1/versions/4/update?",
        "bucket.test/blob?signature=2",
    ]
    asked.clear()
    assert client.checkpoint() == (4, b"the update")  # the version from the coordinator's redirect


def test_downloads_redirect_to_the_object_store_and_keep_their_hashes(
    live_coordinator: Callable[..., Any], s3_bucket: dict[str, Any], tmp_path: Path
) -> None:
    blobs = {**s3_bucket, "redirect_downloads": True, "redirect_expiry_s": 60}
    with live_coordinator(blobs=blobs) as server:
        raw = httpx.get(f"{server.url}/v1/checkpoint", params={"version": 0})
        assert raw.status_code == 307 and raw.headers["location"].startswith(s3_bucket["s3_endpoint_url"])
        assert raw.headers["X-Gradpool-Version"] == "0" and raw.headers["Cache-Control"] == "no-store"
        client = CoordinatorClient(server.url, generate_key())
        version, data = client.checkpoint(0, tmp_path / "c.partial")
        assert raw.headers["ETag"] == f'"{hashlib.sha256(data).hexdigest()}"'
        info = httpx.get(f"{server.url}/v1/versions/0").json()
        spec = param_spec(build_model("tiny"))
        assert version == 0 and params_hash(load_checkpoint(data, spec)[0], spec) == info["param_hash"]
        metrics = httpx.get(f"{server.url}/metrics").text
    assert "gradpool_download_redirects_total 2.0" in metrics


def test_a_request_goes_to_the_next_replica_when_one_fails_and_stays_there() -> None:
    """Several coordinator URLs (replicas of one network): unreachable or a 5xx, the request goes to the
    next; a refusal (4xx) is the coordinator's answer, not a failure, and is not sent elsewhere."""
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.host)
        if request.url.host == "a.test":
            raise httpx.ConnectError("connection refused", request=request)
        if request.url.host == "b.test":
            return httpx.Response(503, json={"error": {"code": "internal_error", "message": "down"}})
        return httpx.Response(409, json={"error": {"code": "round_closed", "message": "closed"}})

    client = CoordinatorClient(
        "http://a.test, http://b.test,http://c.test/", generate_key(), transport=httpx.MockTransport(handler)
    )
    with pytest.raises(RoundClosed):
        client.submit(0, b"payload")
    assert seen == ["a.test", "b.test", "c.test"]
    with pytest.raises(RoundClosed):
        client.submit(0, b"payload")
    assert seen[3:] == ["c.test"] and client.urls[client.replica] == "http://c.test"
    with pytest.raises(ValueError, match="no coordinator URL"):
        CoordinatorClient(" , ", generate_key())
