"""The S3-compatible blob store (AWS, MinIO, Ceph, R2, ...): the interface of coordinator/storage/blobs.py
over a bucket, with presigned downloads and direct uploads."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from starlette.responses import Response, StreamingResponse

from coordinator.storage.blobs import (
    CHUNK_BYTES,
    BlobNotFoundError,
    BlobTooLargeError,
    RangeNotSatisfiableError,
    byte_range,
    checked,
    checked_file,
    download_headers,
    valid_sha,
)
from protocol.params import file_sha256

log = logging.getLogger(__name__)

_S3_MISSING = {"404", "NoSuchKey", "NotFound"}
_S3_PRESENT = {"412", "PreconditionFailed", "ConditionalRequestConflict"}  # a conditional put met one there
# a store without conditional writes, or a botocore too old to send them (IfNoneMatch came in 2024)
_S3_NO_CONDITIONS = {"501", "NotImplemented", "ParamValidationError"}
ASK_FIRST_BYTES = 1 << 20  # from this size a put first asks whether the blob is there (a HEAD)


class S3BlobStore:
    """Objects ``prefix/ab/abcdef...`` in an S3-compatible bucket (AWS, MinIO, Ceph, R2, ...).

    Credentials come from the standard AWS chain (environment, shared config files, instance role); the
    bucket must exist. An object appears whole or not at all, so no temporary name is needed. Every put
    sends the sha256 of its body (x-amz-checksum-sha256), which S3 checks before keeping the object; a
    file put by ``put_written`` goes up in parts above 8 MB, each part with its own sha256 (the whole
    file's names it, hashed here first). A store that ignores the checksums keeps the bytes unchecked,
    and get and as_file check the hash either way."""

    def __init__(
        self,
        bucket: str,
        *,
        prefix: str = "gradpool",
        endpoint_url: str | None = None,
        region: str | None = None,
        timeout_s: float = 60.0,
    ) -> None:
        import boto3  # optional dependency: pip install 'gradpool[s3]'
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        config = Config(
            connect_timeout=timeout_s,
            read_timeout=timeout_s,
            retries={"max_attempts": 3, "mode": "standard"},
            max_pool_connections=64,  # the intake threads (at most 32), the closer and downloads streaming
        )
        session = boto3.session.Session()  # one per store: the default session is not thread-safe
        self.client: Any = session.client("s3", endpoint_url=endpoint_url, region_name=region, config=config)
        self._conditional = True  # puts may say If-None-Match (S3 and the stores like it since 2024)

    def key(self, sha: str) -> str:
        name = f"{sha[:2]}/{valid_sha(sha)}"
        return f"{self.prefix}/{name}" if self.prefix else name

    def put(self, data: bytes, durable: bool = True) -> str:
        """Below ``ASK_FIRST_BYTES`` the bytes go up at once, on the condition that nothing is there yet
        (If-None-Match): a new blob, every upload, costs one request rather than two; larger ones are
        asked about first, so that their bytes are not sent for nothing."""
        sha = hashlib.sha256(data).hexdigest()
        if len(data) < ASK_FIRST_BYTES and self._conditional:
            try:
                self._put_object(sha, data, IfNoneMatch="*")
                return sha
            except Exception as e:
                code = _s3_code(e) or type(e).__name__
                if code in _S3_NO_CONDITIONS:  # a store without conditional writes: ask first from now on
                    self._conditional = False
                elif code not in _S3_PRESENT:
                    raise
        if self._length(sha) != len(data):  # missing, or something else under this name: (re)write it
            self._put_object(sha, data)
        return sha

    def _put_object(self, sha: str, data: bytes, **extra: str) -> None:
        checksum = _checksum(sha)
        self.client.put_object(
            Bucket=self.bucket,
            Key=self.key(sha),
            Body=data,
            ChecksumSHA256=checksum,
            ContentType="application/octet-stream",
            **extra,
        )

    def put_written(self, write: Callable[[Path], None]) -> tuple[str, int]:
        with tempfile.TemporaryDirectory(prefix="gradpool-blob-") as tmp:
            path = Path(tmp) / "blob"
            write(path)
            sha, size = file_sha256(path), path.stat().st_size
            if self._length(sha) != size:  # in parts if large, each part's sha256 checked by the store
                extra = {"ContentType": "application/octet-stream", "ChecksumAlgorithm": "SHA256"}
                self.client.upload_file(str(path), self.bucket, self.key(sha), ExtraArgs=extra)
        return sha, size

    @contextlib.contextmanager
    def as_file(self, sha: str) -> Iterator[Path]:
        with tempfile.TemporaryDirectory(prefix="gradpool-blob-") as tmp:
            path = Path(tmp) / "blob"
            try:
                self.client.download_file(self.bucket, self.key(sha), str(path))
            except Exception as e:
                if _s3_code(e) in _S3_MISSING:
                    raise BlobNotFoundError(sha) from None
                raise
            yield checked_file(sha, path)

    def get(self, sha: str) -> bytes:
        with contextlib.closing(self._get_object(self.key(sha))["Body"]) as body:
            data: bytes = body.read()
        return checked(sha, data)

    def exists(self, sha: str) -> bool:
        return self._length(sha) is not None

    def size(self, sha: str) -> int:
        length = self._length(sha)
        if length is None:
            raise BlobNotFoundError(sha)
        return length

    def delete(self, sha: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self.key(sha))

    def serve(self, sha: str, headers: Mapping[str, str], filename: str) -> Response:
        size = self.size(sha)
        answer = download_headers(sha, filename)
        asked = headers.get("range") if headers.get("if-range") in (None, answer["ETag"]) else None
        try:
            wanted = byte_range(asked, size)
        except RangeNotSatisfiableError:
            return Response(status_code=416, headers={"Content-Range": f"bytes */{size}"})
        start, end = wanted or (0, size)
        extra = {} if wanted is None else {"Range": f"bytes={start}-{end - 1}"}
        body = self._get_object(self.key(sha), **extra)["Body"]
        answer["Content-Length"] = str(end - start)
        if wanted is not None:
            answer["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        return StreamingResponse(
            _chunks(body),
            status_code=200 if wanted is None else 206,
            headers=answer,
            media_type="application/octet-stream",
        )

    def url(self, sha: str, filename: str, expiry_s: float) -> str | None:
        """A presigned GET of the object: the bytes go from the bucket to the client, not through the
        coordinator."""
        params = {
            "Bucket": self.bucket,
            "Key": self.key(sha),
            "ResponseContentDisposition": f'attachment; filename="{filename}"',
        }
        url: str = self.client.generate_presigned_url("get_object", Params=params, ExpiresIn=int(expiry_s))
        return url

    # -- uploads straight from the miners (``[blobs] direct_uploads``) -------------------------------------
    def incoming_key(self, round_: int, miner: str, sha: str) -> str:
        """Where a miner's direct upload lands: its own key, apart from the content-addressed objects (no
        miner can write one of those, a checkpoint say, whose name it knows)."""
        return f"{self._incoming()}{round_}/{miner}/{valid_sha(sha)}"

    def _incoming(self) -> str:
        return f"{self.prefix}/incoming/" if self.prefix else "incoming/"

    def upload_form(self, key: str, max_bytes: int, expiry_s: float) -> tuple[str, dict[str, str]]:
        """A presigned POST form for ``key`` alone and at most ``max_bytes``: (url, fields)."""
        post = self.client.generate_presigned_post(
            Bucket=self.bucket,
            Key=key,
            Conditions=[["content-length-range", 1, max_bytes]],
            ExpiresIn=int(expiry_s),
        )
        return str(post["url"]), {str(k): str(v) for k, v in post["fields"].items()}

    def read_incoming(self, key: str, max_bytes: int) -> tuple[bytes, str]:
        """The object at ``key`` and its ETag, the object left where it is (``forget_incoming`` removes a
        round's once it closed, ``forget_object`` one refused). Raises BlobNotFoundError if there is none,
        BlobTooLargeError beyond ``max_bytes`` (unread)."""
        obj = self._get_object(key)
        size = int(obj["ContentLength"])
        with contextlib.closing(obj["Body"]) as body:  # closed unread when too large
            data: bytes = body.read(max_bytes + 1) if size <= max_bytes else b""
        if size > max_bytes or len(data) > max_bytes:
            raise BlobTooLargeError(f"{size} bytes, more than {max_bytes}")
        return data, str(obj["ETag"])

    def adopt(self, key: str, etag: str, data: bytes, sha: str) -> str:
        """Keep ``data`` (whose sha256, checked by the caller, is ``sha``), read from the object at ``key``
        with ``etag``, as its blob: by a copy within the bucket, so that the bytes do not pass through the
        coordinator again, if the object is still the one read; else (replaced under its key meanwhile) by
        a put of ``data``, so that whatever lands under a blob's name is the bytes that were checked. The
        copy's sha256 (S3 computes it) shows whether it is those bytes, also where a store ignores the
        condition or has none; a store that gives no sha256 is judged by the copy's ETag. Below
        ``ASK_FIRST_BYTES`` the bytes are put all the same: sending them costs less than a copy there. The
        blob's sha256."""
        if len(data) < ASK_FIRST_BYTES:
            return self.put(data)
        try:
            copied = self.client.copy_object(
                Bucket=self.bucket,
                Key=self.key(sha),
                CopySource={"Bucket": self.bucket, "Key": key},
                CopySourceIfMatch=etag,
                ChecksumAlgorithm="SHA256",
                ContentType="application/octet-stream",
                MetadataDirective="REPLACE",
            )["CopyObjectResult"]
        except Exception as e:
            if _s3_code(e) not in _S3_PRESENT | _S3_MISSING | _S3_NO_CONDITIONS:
                raise
            return self.put(data)
        checksum = copied.get("ChecksumSHA256")
        if checksum is not None:
            same = checksum == _checksum(sha)
        else:
            same = str(copied.get("ETag", "")).strip('"') == etag.strip('"')
        if not same:
            self._put_object(sha, data)  # over whatever the copy left there
        return sha

    def forget_object(self, key: str) -> None:
        """Remove the object at ``key`` (a direct upload refused); one that is not there is not an error."""
        self.client.delete_object(Bucket=self.bucket, Key=key)

    def forget_incoming(self, through_round: int) -> int:
        """Remove the direct uploads of every round up to ``through_round``, whether committed or not: a
        listing and one request per 1000 objects, rather than a request per upload on each commit's path.
        How many were removed."""
        prefix, doomed = self._incoming(), []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                round_ = obj["Key"][len(prefix) :].split("/", 1)[0]
                if round_.isdigit() and int(round_) <= through_round:
                    doomed.append(obj["Key"])
        removed = len(doomed)
        for i in range(0, len(doomed), 1000):
            batch = [{"Key": key} for key in doomed[i : i + 1000]]
            answer = self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
            if errors := answer.get("Errors", []):  # left for the next close to try again
                log.warning("%d objects under incoming/ not removed: %s", len(errors), errors[0])
                removed -= len(errors)
        return removed

    def _length(self, sha: str) -> int | None:
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self.key(sha))
        except Exception as e:
            if _s3_code(e) in _S3_MISSING:
                return None
            raise
        return int(head["ContentLength"])

    def _get_object(self, key: str, **extra: str) -> dict[str, Any]:
        try:
            obj: dict[str, Any] = self.client.get_object(Bucket=self.bucket, Key=key, **extra)
        except Exception as e:
            if _s3_code(e) in _S3_MISSING:
                raise BlobNotFoundError(key) from None
            raise
        return obj


def _checksum(sha: str) -> str:
    """A sha256 as S3's checksum headers carry it (base64 of the digest)."""
    return base64.b64encode(bytes.fromhex(sha)).decode()


def _s3_code(error: Exception) -> str:
    """The error code of a botocore ClientError ("" for any other exception)."""
    response = getattr(error, "response", None)
    if not isinstance(response, dict):
        return ""
    return str(response.get("Error", {}).get("Code", ""))


def _chunks(body: Any) -> Iterator[bytes]:
    try:
        yield from body.iter_chunks(CHUNK_BYTES)
    finally:
        body.close()
