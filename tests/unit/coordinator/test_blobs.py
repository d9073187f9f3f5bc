"""The blob stores, file and S3, through the same tests; S3 is a real moto server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import boto3
import pytest
from fastapi import FastAPI, Request, Response
from fastapi.testclient import TestClient
from pydantic import ValidationError

from coordinator.settings import BlobSettings, CoordinatorSettings
from coordinator.storage.blob_stores import make_blob_store
from coordinator.storage.blobs import (
    BlobCorruptError,
    BlobNotFoundError,
    BlobStore,
    FileBlobStore,
    RangeNotSatisfiableError,
    byte_range,
    kept_checkpoint,
)
from coordinator.storage.s3 import ASK_FIRST_BYTES, S3BlobStore
from protocol.codec import SparseLoCoCodec
from protocol.errors import CodecError
from protocol.params import load_checkpoint, params_hash, save_checkpoint, write_checkpoint
from tests.helpers.pool import SPEC, OpenPool, make_delta, payload

DATA = bytes(range(256)) * 40 + b"tail"  # 10 244 bytes, every offset distinguishable


@functools.cache
def s3_client(endpoint: str) -> Any:
    """The tests' own S3 client, to look behind a store's back."""
    return boto3.session.Session().client("s3", endpoint_url=endpoint)


@pytest.fixture(params=["file", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> BlobStore:
    if request.param == "file":
        return make_blob_store(BlobSettings(), tmp_path / "blobs")
    settings = BlobSettings(**request.getfixturevalue("s3_bucket"))
    return make_blob_store(settings, tmp_path / "blobs")


def overwrite(store: BlobStore, sha: str, data: bytes) -> None:
    """Replace what is kept under ``sha`` behind the store's back."""
    if isinstance(store, FileBlobStore):
        store.path(sha).write_bytes(data)
    else:
        assert isinstance(store, S3BlobStore)
        store.client.put_object(Bucket=store.bucket, Key=store.key(sha), Body=data)


def stored_identity(store: BlobStore, sha: str) -> object:
    """Changes whenever the kept blob is written again."""
    if isinstance(store, FileBlobStore):
        st = store.path(sha).stat()
        return st.st_ino, st.st_mtime_ns
    assert isinstance(store, S3BlobStore)
    return store.client.head_object(Bucket=store.bucket, Key=store.key(sha))["VersionId"]


def serving(store: BlobStore) -> TestClient:
    app = FastAPI()

    @app.get("/blobs/{sha}")
    async def blob(sha: str, request: Request) -> Response:
        return await asyncio.to_thread(store.serve, sha, request.headers, "blob.bin")

    return TestClient(app)


# -- the store ------------------------------------------------------------------------------------------
def test_a_blob_is_kept_under_its_sha256_until_deleted(store: BlobStore) -> None:
    sha = hashlib.sha256(DATA).hexdigest()
    assert not store.exists(sha)
    assert store.put(DATA) == sha
    assert store.exists(sha) and store.size(sha) == len(DATA)
    assert store.get(sha) == DATA
    empty = store.put(b"")
    assert empty == hashlib.sha256(b"").hexdigest() and store.get(empty) == b"" and store.size(empty) == 0

    store.delete(sha)
    assert not store.exists(sha)
    with pytest.raises(BlobNotFoundError):
        store.get(sha)
    with pytest.raises(BlobNotFoundError):
        store.size(sha)
    store.delete(sha)  # deleting what is not kept is not an error
    assert store.get(empty) == b""


def test_putting_the_same_bytes_again_writes_nothing(store: BlobStore) -> None:
    if isinstance(store, S3BlobStore):  # every write of the key makes a new object version
        store.client.put_bucket_versioning(Bucket=store.bucket, VersioningConfiguration={"Status": "Enabled"})
    sha = store.put(DATA)
    first = stored_identity(store, sha)
    assert store.put(DATA) == sha
    assert stored_identity(store, sha) == first


@pytest.mark.parametrize("refusal", ["NotImplemented", "ParamValidationError"])
def test_a_store_that_cannot_put_on_a_condition_is_asked_first(
    s3_bucket: dict[str, Any], tmp_path: Path, refusal: str
) -> None:
    """A small blob goes up on the condition that nothing is there (If-None-Match); a store that answers
    501 to the condition, or a botocore too old to send it, turns the store to asking first (a HEAD), once,
    and the blob is kept all the same, written once."""
    from botocore.exceptions import ClientError, ParamValidationError

    store = make_blob_store(BlobSettings(**s3_bucket), tmp_path / "blobs")
    assert isinstance(store, S3BlobStore)
    store.client.put_bucket_versioning(Bucket=store.bucket, VersioningConfiguration={"Status": "Enabled"})
    real, conditional = store.client.put_object, []

    def put_object(**kwargs: Any) -> Any:  # the store's answer to a conditional put, then the real one
        if "IfNoneMatch" in kwargs:
            conditional.append(kwargs["Key"])
            if refusal == "NotImplemented":
                raise ClientError({"Error": {"Code": "NotImplemented"}}, "PutObject")
            raise ParamValidationError(report='Unknown parameter in input: "IfNoneMatch"')
        return real(**kwargs)

    store.client.put_object = put_object
    sha = store.put(DATA)
    assert store.get(sha) == DATA and len(conditional) == 1
    first = stored_identity(store, sha)
    assert store.put(DATA) == sha and store.put(DATA[:-1]) != sha
    assert stored_identity(store, sha) == first and len(conditional) == 1  # asked first from then on


def test_a_blob_written_to_a_file_is_kept_like_one_put(store: BlobStore, tmp_path: Path) -> None:
    """``put_written``: what the writer writes (a checkpoint, tensor by tensor) is kept under its sha256
    like bytes put whole, the temporary file goes, and writing the same bytes again writes nothing."""
    if isinstance(store, S3BlobStore):
        store.client.put_bucket_versioning(Bucket=store.bucket, VersioningConfiguration={"Status": "Enabled"})
    written: list[Path] = []

    def write(path: Path) -> None:
        written.append(path)
        with open(path, "wb") as f:
            for i in range(0, len(DATA), 1000):  # in pieces, as a checkpoint is written
                f.write(DATA[i : i + 1000])

    sha, size = store.put_written(write)
    assert (sha, size) == (hashlib.sha256(DATA).hexdigest(), len(DATA))
    assert store.get(sha) == DATA and store.size(sha) == len(DATA)
    first = stored_identity(store, sha)
    assert store.put_written(write) == (sha, size)
    assert stored_identity(store, sha) == first
    assert written and not any(p.exists() for p in written)
    if isinstance(store, FileBlobStore):
        assert sorted(p.name for p in store.root.rglob("*") if p.is_file()) == [sha]


def test_a_written_blob_above_the_multipart_size_is_kept_whole(store: BlobStore) -> None:
    """9 MB: S3 takes it in parts (8 MB each at most), each with its sha256; it reads back whole."""
    big = os.urandom(9 << 20)
    sha, size = store.put_written(lambda path: path.write_bytes(big))
    assert (sha, size) == (hashlib.sha256(big).hexdigest(), len(big))
    assert store.get(sha) == big
    with store.as_file(sha) as path:
        assert path.stat().st_size == len(big)


def test_temporary_files_of_writes_cut_short_are_cleared(tmp_path: Path) -> None:
    store = FileBlobStore(tmp_path / "blobs")
    sha = store.put(DATA)
    (store.root / "written.123.456.tmp").write_bytes(b"half a checkpoint")  # a process killed mid-write
    (store.path(sha).parent / f"{sha}.123.456.tmp").write_bytes(b"half an upload")
    assert store.clear_temporaries() == 2
    assert sorted(p.name for p in store.root.rglob("*") if p.is_file()) == [sha] and store.get(sha) == DATA


def test_a_writer_that_fails_leaves_nothing_behind(store: BlobStore) -> None:
    written: list[Path] = []

    def fail(path: Path) -> None:
        written.append(path)
        path.write_bytes(DATA[:100])
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        store.put_written(fail)
    assert not written[0].exists() and not store.exists(hashlib.sha256(DATA[:100]).hexdigest())


def test_a_blob_read_as_a_file_is_checked_like_one_read_whole(store: BlobStore) -> None:
    """``as_file`` (how a kept checkpoint is read, tensor by tensor): the blob's bytes in a local file,
    refused like ``get`` refuses them when they do not hash to its name or are not kept."""
    sha = store.put(DATA)
    with store.as_file(sha) as path:
        assert path.read_bytes() == DATA
    overwrite(store, sha, DATA[:-1] + b"X")
    with pytest.raises(BlobCorruptError), store.as_file(sha):
        pass
    store.delete(sha)
    with pytest.raises(BlobNotFoundError), store.as_file(sha):
        pass


def test_a_kept_checkpoint_is_read_from_its_blob(store: BlobStore) -> None:
    params = load_checkpoint(save_checkpoint(make_delta(3), {}), SPEC)[0]
    sha, _ = store.put_written(functools.partial(write_checkpoint, params, {"version": "2"}))
    read = kept_checkpoint(store, sha, SPEC)
    assert params_hash(read, SPEC) == params_hash(params, SPEC)
    wrong = store.put(payload(0, 0))  # a blob that is not a checkpoint
    with pytest.raises(CodecError):
        kept_checkpoint(store, wrong, SPEC)


def test_get_refuses_bytes_that_do_not_match_their_name_and_put_repairs_them(store: BlobStore) -> None:
    sha = store.put(DATA)
    overwrite(store, sha, DATA[:-1] + b"X")  # same length, other bytes
    with pytest.raises(BlobCorruptError):
        store.get(sha)
    overwrite(store, sha, DATA[:100])  # truncated: the next put of the same bytes writes them again
    with pytest.raises(BlobCorruptError):
        store.get(sha)
    assert store.put(DATA) == sha
    assert store.get(sha) == DATA


def test_names_that_are_not_a_sha256_are_refused(store: BlobStore) -> None:
    for bad in ("../../etc/passwd", "AB" * 32, "ab" * 31, ""):
        with pytest.raises(ValueError):
            store.get(bad)


def test_s3_keys_are_prefix_then_two_hex_digits_then_the_sha(s3_bucket: dict[str, Any]) -> None:
    store = make_blob_store(BlobSettings(**s3_bucket), Path("unused"))
    assert isinstance(store, S3BlobStore)
    sha = store.put(DATA)
    listed = s3_client(s3_bucket["s3_endpoint_url"]).list_objects_v2(Bucket=s3_bucket["s3_bucket"])
    assert [o["Key"] for o in listed["Contents"]] == [f"runs/test/{sha[:2]}/{sha}"]


# -- serving over HTTP ----------------------------------------------------------------------------------
def test_a_blob_is_served_whole_with_its_sha256_as_etag(store: BlobStore) -> None:
    sha = store.put(DATA)
    with serving(store) as http:
        r = http.get(f"/blobs/{sha}")
    assert r.status_code == 200
    assert r.content == DATA
    assert r.headers["ETag"] == f'"{sha}"'
    assert r.headers["Content-Length"] == str(len(DATA))
    assert r.headers["Accept-Ranges"] == "bytes"
    assert r.headers["Content-Disposition"] == 'attachment; filename="blob.bin"'
    assert "Content-Range" not in r.headers


@pytest.mark.parametrize(
    ("asked", "start", "end"),
    [
        ("bytes=100-1099", 100, 1100),
        ("bytes=0-0", 0, 1),
        ("bytes=10000-", 10000, len(DATA)),  # resuming a download
        ("bytes=10000-999999", 10000, len(DATA)),  # a last byte past the end is clipped
        ("bytes=-16", len(DATA) - 16, len(DATA)),  # the last 16 bytes
        ("bytes=-999999", 0, len(DATA)),  # a suffix longer than the blob is all of it
    ],
)
def test_a_byte_range_is_served_as_206(store: BlobStore, asked: str, start: int, end: int) -> None:
    sha = store.put(DATA)
    with serving(store) as http:
        r = http.get(f"/blobs/{sha}", headers={"Range": asked})
    assert r.status_code == 206, r.text
    assert r.content == DATA[start:end]
    assert r.headers["Content-Range"] == f"bytes {start}-{end - 1}/{len(DATA)}"
    assert r.headers["Content-Length"] == str(end - start)
    assert r.headers["ETag"] == f'"{sha}"'


@pytest.mark.parametrize("asked", [f"bytes={len(DATA)}-", "bytes=999999-1000000", "bytes=-0"])
def test_an_unsatisfiable_range_is_416(store: BlobStore, asked: str) -> None:
    sha = store.put(DATA)
    with serving(store) as http:
        r = http.get(f"/blobs/{sha}", headers={"Range": asked})
    assert r.status_code == 416
    assert r.headers["Content-Range"] == f"bytes */{len(DATA)}"


def test_a_range_for_another_version_is_answered_whole(store: BlobStore) -> None:
    sha = store.put(DATA)
    with serving(store) as http:
        stale = http.get(f"/blobs/{sha}", headers={"Range": "bytes=5-", "If-Range": '"0123"'})
        fresh = http.get(f"/blobs/{sha}", headers={"Range": "bytes=5-", "If-Range": f'"{sha}"'})
    assert (stale.status_code, stale.content) == (200, DATA)
    assert (fresh.status_code, fresh.content) == (206, DATA[5:])


def test_serving_a_missing_blob_raises_not_found(store: BlobStore) -> None:
    with pytest.raises(BlobNotFoundError):
        store.serve("ab" * 32, {}, "blob.bin")


def test_range_headers_are_parsed_or_ignored() -> None:
    assert byte_range(None, 10) is None
    assert byte_range("bytes=2-5", 10) == (2, 6)
    assert byte_range("Bytes = 2 - ", 10) == (2, 10)
    assert byte_range("bytes=-3", 10) == (7, 10)
    for ignored in ("items=0-1", "bytes=0-1,4-5", "bytes=5-2", "bytes=-", "bytes=a-b", "bytes=1-2-3", "0-1"):
        assert byte_range(ignored, 10) is None, ignored
    for unsatisfiable in ("bytes=10-", "bytes=10-20", "bytes=-0", "bytes=0-"):
        size = 0 if unsatisfiable == "bytes=0-" else 10
        with pytest.raises(RangeNotSatisfiableError):
            byte_range(unsatisfiable, size)


# -- settings -------------------------------------------------------------------------------------------
def test_the_file_store_is_the_default(tmp_path: Path) -> None:
    assert CoordinatorSettings().blobs.backend == "file"
    assert isinstance(make_blob_store(BlobSettings(), tmp_path), FileBlobStore)


def test_the_s3_store_needs_a_bucket(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValidationError, match="s3_bucket is required"):
        BlobSettings(backend="s3")
    monkeypatch.setenv("GRADPOOL_BLOBS__BACKEND", "s3")
    monkeypatch.setenv("GRADPOOL_BLOBS__S3_BUCKET", "my-bucket")
    monkeypatch.setenv("GRADPOOL_BLOBS__S3_PREFIX", "/runs/a/")
    blobs = CoordinatorSettings().blobs
    assert (blobs.backend, blobs.s3_bucket, blobs.s3_prefix) == ("s3", "my-bucket", "runs/a")


# -- a whole coordinator --------------------------------------------------------------------------------
def test_a_coordinator_keeps_and_serves_its_blobs_from_s3(
    open_pool: OpenPool, s3_bucket: dict[str, Any], make_settings: Callable[..., CoordinatorSettings]
) -> None:
    """Checkpoints, published updates and payloads in the bucket, and nothing else: not the unpacked form of
    an upload, which a coordinator keeps beside it only on its own disk (the bucket keeps every version of
    every object, so that one put and deleted after the close would still be listed)."""
    bucket = s3_client(s3_bucket["s3_endpoint_url"])
    bucket.put_bucket_versioning(Bucket=s3_bucket["s3_bucket"], VersioningConfiguration={"Status": "Enabled"})
    with open_pool(blobs=s3_bucket) as pool:
        miner = pool.miner()
        body = payload(round_=0, base_version=0, seed=1)
        assert miner.upload(0, body).status_code == 200
        pool.wait_for_round(0)
        assert pool.latest()["version"] == 1
        v1 = pool.client.get("/v1/versions/1").json()

        checkpoint = pool.client.get("/v1/checkpoint")
        assert checkpoint.status_code == 200 and checkpoint.headers["X-Gradpool-Version"] == "1"
        checkpoint_sha = hashlib.sha256(checkpoint.content).hexdigest()
        assert checkpoint.headers["ETag"] == f'"{checkpoint_sha}"'
        assert len(checkpoint.content) == v1["checkpoint_bytes"]
        params, _ = load_checkpoint(checkpoint.content, SPEC)
        assert params_hash(params, SPEC) == v1["param_hash"]
        tail = pool.client.get("/v1/checkpoint", headers={"Range": "bytes=-100"})
        assert tail.status_code == 206 and tail.content == checkpoint.content[-100:]

        update = pool.client.get("/v1/versions/1/update")
        assert update.status_code == 200
        update_sha = hashlib.sha256(update.content).hexdigest()
        assert update.headers["ETag"] == f'"{update_sha}"' and len(update.content) == v1["update_bytes"]

    listed = bucket.list_object_versions(Bucket=s3_bucket["s3_bucket"])
    keys = {o["Key"].rsplit("/", 1)[-1] for o in listed["Versions"]}
    assert {hashlib.sha256(body).hexdigest(), checkpoint_sha, update_sha} <= keys
    assert hashlib.sha256(SparseLoCoCodec().examine(body, SPEC).stored).hexdigest() not in keys
    state_dir = make_settings().state_dir
    assert not (state_dir / "blobs").exists()

    with open_pool(blobs=s3_bucket) as pool:  # a restart loads the latest checkpoint back from S3
        again = pool.latest()
        assert (again["version"], again["param_hash"]) == (1, v1["param_hash"])


def test_the_direct_uploads_of_closed_rounds_are_removed_in_one_batch(
    s3_bucket: dict[str, Any], tmp_path: Path
) -> None:
    """Rounds are told apart by number, not by the keys' order (round 10 sorts before round 2), and the
    blobs beside the uploads are not touched."""
    store = make_blob_store(BlobSettings(**s3_bucket), tmp_path / "blobs")
    assert isinstance(store, S3BlobStore)
    kept = store.put(DATA)
    sha = hashlib.sha256(b"x").hexdigest()
    for round_ in (1, 2, 10):
        for miner in ("a", "b"):
            store.client.put_object(
                Bucket=store.bucket, Key=store.incoming_key(round_, miner, sha), Body=b"x"
            )

    def there(round_: int) -> bool:
        try:
            return store.read_incoming(store.incoming_key(round_, "b", sha), 10)[0] == b"x"
        except BlobNotFoundError:
            return False

    assert store.forget_incoming(2) == 4
    assert [there(r) for r in (1, 2, 10)] == [False, False, True]
    assert store.forget_incoming(2) == 0 and store.get(kept) == DATA


@pytest.mark.parametrize("store", ["holds_the_condition", "ignores_it", "ignores_it_no_sha256", "lacks_it"])
def test_a_direct_upload_is_kept_as_the_bytes_that_were_read(
    s3_bucket: dict[str, Any], tmp_path: Path, store: str
) -> None:
    """A large direct upload is kept by a copy within the bucket of the object that was read, and nothing
    is put (a small one is put: that costs less than a copy). One replaced under its key after it was
    checked never lands under the name of the bytes that were: a store that holds the copy's condition
    refuses the copy, one that lacks it answers 501, and the checked bytes are put instead; one that
    ignores it (moto) is caught by the copy's sha256, or its ETag where it gives no sha256, and the checked
    bytes are put over what it copied."""
    from botocore.exceptions import ClientError

    blobs = make_blob_store(BlobSettings(**s3_bucket), tmp_path / "blobs")
    assert isinstance(blobs, S3BlobStore)
    real_copy, real_put, copies, puts = blobs.client.copy_object, blobs.client.put_object, [], []

    def copy_object(**kwargs: Any) -> Any:
        copies.append(kwargs["CopySourceIfMatch"])
        if len(copies) > 1 and store in ("holds_the_condition", "lacks_it"):
            code = "PreconditionFailed" if store == "holds_the_condition" else "NotImplemented"
            raise ClientError({"Error": {"Code": code}}, "CopyObject")
        answer = real_copy(**kwargs)
        if store == "ignores_it_no_sha256":
            answer["CopyObjectResult"].pop("ChecksumSHA256", None)
        return answer

    def put_object(**kwargs: Any) -> Any:
        puts.append(kwargs["Key"])
        return real_put(**kwargs)

    blobs.client.copy_object, blobs.client.put_object = copy_object, put_object
    for blob in (DATA, DATA * (ASK_FIRST_BYTES // len(DATA) + 1)):
        sha = hashlib.sha256(blob).hexdigest()
        key = blobs.incoming_key(0, "a", sha)
        real_put(Bucket=blobs.bucket, Key=key, Body=blob)
        data, etag = blobs.read_incoming(key, len(blob))
        assert blobs.adopt(key, etag, data, sha) == sha and blobs.get(sha) == blob
    assert len(copies) == 1 and puts == [blobs.key(hashlib.sha256(DATA).hexdigest())]  # the large one copied
    blobs.delete(sha)
    real_put(Bucket=blobs.bucket, Key=key, Body=b"other bytes")  # replaced meanwhile
    assert blobs.adopt(key, etag, data, sha) == sha and copies == [etag, etag] and puts[-1] == blobs.key(sha)
    assert blobs.get(sha) == data
