"""Uploads straight to the object store ([blobs] direct_uploads) against a real S3-compatible server: a
presigned form for the miner's own key, the payload posted with it, and the commit the coordinator takes
through the same intake as an upload sent to it; every commit that does not match what is in the bucket is
refused with its documented error, and nothing is taken from it twice."""

from __future__ import annotations

import hashlib
from typing import Any

import boto3
import httpx
import pytest

from protocol.wire import UploadCommit, UploadIntent, UploadTicket
from tests.helpers.bucket import incoming_keys
from tests.helpers.pool import Miner, OpenPool, assert_error, payload
from tests.helpers.waiting import wait_until


def form(miner: Miner, round_: int, body: bytes, size: int | None = None) -> httpx.Response:
    sha = hashlib.sha256(body).hexdigest()
    intent = UploadIntent(sha256=sha, bytes=len(body) if size is None else size)
    return miner.post(f"/v1/rounds/{round_}/uploads", intent.model_dump_json().encode())


def post_to_bucket(ticket: dict[str, Any], body: bytes) -> httpx.Response:
    t = UploadTicket.model_validate(ticket)
    return httpx.post(t.url, data=t.fields, files={"file": ("payload", body)}, timeout=30)


def commit(miner: Miner, round_: int, sha: str) -> httpx.Response:
    return miner.post(f"/v1/rounds/{round_}/commits", UploadCommit(sha256=sha).model_dump_json().encode())


@pytest.fixture
def direct(s3_bucket: dict[str, Any]) -> dict[str, Any]:
    return {"blobs": {**s3_bucket, "direct_uploads": True}, "rounds": {"min_quorum": 2}}


def test_a_payload_posted_to_the_bucket_and_committed_is_taken_as_the_upload(
    open_pool: OpenPool, direct: dict[str, Any], s3_bucket: dict[str, Any]
) -> None:
    with open_pool(**direct) as pool:
        assert pool.client.get("/v1/info").json()["direct_uploads"] is True
        alice = pool.miner()
        body = payload(round_=0, base_version=0, seed=1)
        sha = hashlib.sha256(body).hexdigest()
        ticket = form(alice, 0, body)
        assert ticket.status_code == 200, ticket.text
        assert alice.pubkey in ticket.json()["fields"]["key"] and ticket.json()["max_bytes"] >= len(body)
        assert post_to_bucket(ticket.json(), body).status_code in (200, 201, 204)
        receipt = commit(alice, 0, sha)
        assert receipt.status_code == 200, receipt.text
        assert (receipt.json()["payload_sha256"], receipt.json()["bytes"]) == (sha, len(body))
        again = commit(alice, 0, sha)  # a commit sent twice: the same receipt, marked a duplicate
        assert again.status_code == 200 and again.json()["duplicate"] is True
        # a payload posted and never committed (a try given up): removed with the round's uploads
        lost = payload(round_=0, base_version=0, seed=3)
        assert post_to_bucket(form(alice, 0, lost).json(), lost).status_code < 300
        assert len(incoming_keys(s3_bucket)) == 2  # taken uploads stay in the bucket until the round closes
        # the upload is the round's as any other: an upload sent the usual way closes the round with it
        bob = pool.miner()
        assert bob.upload(0, payload(round_=0, base_version=0, seed=2)).status_code == 200
        pool.wait_for_round(0)
        record = pool.client.get("/v1/rounds/0").json()
        assert {s["miner"]: s["status"] for s in record["submissions"]} == {
            alice.pubkey: "accepted",
            bob.pubkey: "accepted",
        }
        assert pool.client.get(f"/v1/rounds/0/payloads/{alice.pubkey}").content == body
        wait_until(lambda: not incoming_keys(s3_bucket), 10, "the closed round's direct uploads removed")


def test_commits_that_do_not_match_the_bucket_are_refused(
    open_pool: OpenPool, direct: dict[str, Any], s3_bucket: dict[str, Any]
) -> None:
    with open_pool(**direct) as pool:
        alice = pool.miner()
        body = payload(round_=0, base_version=0, seed=1)
        sha = hashlib.sha256(body).hexdigest()
        assert_error(commit(alice, 0, sha), 404, "upload_missing")  # nothing posted yet
        ticket = form(alice, 0, body).json()
        assert post_to_bucket(ticket, body[:-1] + b"x").status_code < 300  # other bytes under its key
        assert_error(commit(alice, 0, sha), 422, "digest_mismatch")
        assert_error(commit(alice, 0, sha), 404, "upload_missing")  # the wrong bytes were taken, once
        max_bytes = ticket["max_bytes"]
        assert_error(form(alice, 0, body, size=max_bytes + 1), 413, "payload_too_large")
        assert_error(form(alice, 5, body), 409, "round_not_open")
        stranger = pool.miner(register=False)
        assert_error(form(stranger, 0, body), 403, "unknown_miner")
        # the form's size limit is the store's to hold; past a store that ignores it, the commit's holds
        big = b"\0" * (max_bytes + 1)
        big_sha = hashlib.sha256(big).hexdigest()
        key = ticket["fields"]["key"].rsplit("/", 1)[0] + "/" + big_sha
        bucket = boto3.session.Session().client("s3", endpoint_url=s3_bucket["s3_endpoint_url"])
        bucket.put_object(Bucket=s3_bucket["s3_bucket"], Key=key, Body=big)
        assert_error(commit(alice, 0, big_sha), 413, "payload_too_large")
        # and the right bytes, posted again, are taken
        assert post_to_bucket(form(alice, 0, body).json(), body).status_code < 300
        assert commit(alice, 0, sha).status_code == 200


def test_without_direct_uploads_the_form_is_refused(open_pool: OpenPool) -> None:
    with open_pool() as pool:
        alice = pool.miner()
        assert pool.client.get("/v1/info").json()["direct_uploads"] is False
        assert_error(form(alice, 0, b"x"), 409, "direct_uploads_off")
