"""Blobs (uploads, published updates, checkpoints) named by the sha256 of their bytes.

Two stores behind one small interface: files on the coordinator's disk (the default) and an S3-compatible
bucket. Both serve a blob over HTTP with its sha256 as ETag and answer a single byte range, so a miner
resumes an interrupted download the same way from either.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import re
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

from starlette.responses import FileResponse, Response, StreamingResponse

from coordinator.settings import BlobSettings

CHUNK_BYTES = 1 << 20
_SHA = re.compile(r"[0-9a-f]{64}")
_RANGE = re.compile(r"bytes\s*=\s*(\d{0,19})\s*-\s*(\d{0,19})", re.IGNORECASE)
_S3_MISSING = {"404", "NoSuchKey", "NotFound"}


class BlobNotFoundError(FileNotFoundError):
    """No blob with that sha256 is kept."""


class BlobCorruptError(ValueError):
    """A kept blob's bytes do not hash to its name."""


class BlobTooLargeError(ValueError):
    """An object in the bucket is larger than it may be (a store that did not hold a form's size limit)."""


class RangeNotSatisfiableError(ValueError):
    def __init__(self, size: int) -> None:
        super().__init__(f"no requested byte is within the blob's {size} bytes")
        self.size = size


class BlobStore(Protocol):
    def put(self, data: bytes, durable: bool = True) -> str:
        """Keep ``data`` and return its sha256 (hex). Putting bytes already kept writes nothing. With
        ``durable=False`` a file store skips fsync: the file survives a crash of the process (it is renamed
        into place whole), not necessarily one of the machine."""
        ...

    def get(self, sha: str) -> bytes:
        """The blob's bytes, checked against its name (BlobNotFoundError, BlobCorruptError)."""
        ...

    def exists(self, sha: str) -> bool: ...

    def size(self, sha: str) -> int:
        """The blob's length in bytes (BlobNotFoundError)."""
        ...

    def delete(self, sha: str) -> None:
        """Forget the blob; deleting one that is not kept is not an error."""
        ...

    def serve(self, sha: str, headers: Mapping[str, str], filename: str) -> Response:
        """The blob as an HTTP download named ``filename``, with ETag ``"<sha>"``: 200, or 206/416 for a
        ``Range`` in the request ``headers`` (BlobNotFoundError). Blocking: call it from a thread."""
        ...

    def url(self, sha: str, filename: str, expiry_s: float) -> str | None:
        """A URL the blob can be downloaded from directly for ``expiry_s`` (a presigned one), or None when
        the store has none (the coordinator serves the bytes itself)."""
        ...


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


# -- HTTP ranges ----------------------------------------------------------------------------------------
def byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The bytes [start, end) that a ``Range`` header asks of a blob of ``size`` bytes, or None for the
    whole blob: no header, or one this server ignores (another unit, several ranges, bad syntax).
    ``bytes=a-b``, ``bytes=a-`` and ``bytes=-n`` are understood; RangeNotSatisfiableError when no
    requested byte exists."""
    match = _RANGE.fullmatch(header.strip()) if header is not None else None
    if match is None or match.group(1) == match.group(2) == "":
        return None
    first, last = match.group(1), match.group(2)
    if first:
        start = int(first)
        if last and int(last) < start:
            return None
        end = min(int(last) + 1, size) if last else size
    else:
        start, end = max(size - int(last), 0), size
        if int(last) == 0:
            raise RangeNotSatisfiableError(size)
    if start >= size:
        raise RangeNotSatisfiableError(size)
    return start, end


def _download_headers(sha: str, filename: str) -> dict[str, str]:
    return {
        "ETag": f'"{sha}"',
        "Accept-Ranges": "bytes",
        "Content-Disposition": f'attachment; filename="{filename}"',
    }


def _checked(sha: str, data: bytes) -> bytes:
    if hashlib.sha256(data).hexdigest() != sha:
        raise BlobCorruptError(f"blob {sha[:12]} does not hash to its name")
    return data


def _valid(sha: str) -> str:
    if _SHA.fullmatch(sha) is None:
        raise ValueError(f"not a sha256 in lowercase hex: {sha[:80]!r}")
    return sha


# -- the file store -------------------------------------------------------------------------------------
class FileBlobStore:
    """Files ``root/ab/abcdef...``, each written to a temporary name, flushed to disk and renamed."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def path(self, sha: str) -> Path:
        return self.root / sha[:2] / _valid(sha)

    def put(self, data: bytes, durable: bool = True) -> str:
        sha = hashlib.sha256(data).hexdigest()
        path = self.path(sha)
        if not path.exists() or path.stat().st_size != len(data):
            path.parent.mkdir(exist_ok=True)
            tmp = path.with_name(f"{sha}.{os.getpid()}.{threading.get_ident()}.tmp")
            with open(tmp, "wb") as f:
                f.write(data)
                if durable:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, path)
        return sha

    def get(self, sha: str) -> bytes:
        try:
            return _checked(sha, self.path(sha).read_bytes())
        except FileNotFoundError:
            raise BlobNotFoundError(sha) from None

    def exists(self, sha: str) -> bool:
        return self.path(sha).is_file()

    def size(self, sha: str) -> int:
        return self._stat(sha).st_size

    def delete(self, sha: str) -> None:
        self.path(sha).unlink(missing_ok=True)

    def serve(self, sha: str, headers: Mapping[str, str], filename: str) -> Response:
        # FileResponse reads Range and If-Range from the request itself and answers 200, 206 or 416.
        return FileResponse(
            self.path(sha),
            media_type="application/octet-stream",
            headers=_download_headers(sha, filename),
            stat_result=self._stat(sha),
        )

    def url(self, sha: str, filename: str, expiry_s: float) -> str | None:
        return None

    def _stat(self, sha: str) -> os.stat_result:
        try:
            return self.path(sha).stat()
        except FileNotFoundError:
            raise BlobNotFoundError(sha) from None


# -- the S3 store ---------------------------------------------------------------------------------------
class S3BlobStore:
    """Objects ``prefix/ab/abcdef...`` in an S3-compatible bucket (AWS, MinIO, Ceph, R2, ...).

    Credentials come from the standard AWS chain (environment, shared config files, instance role); the
    bucket must exist. An object appears whole or not at all, so no temporary name is needed. Every put
    sends the sha256 of its body (x-amz-checksum-sha256), which S3 checks before keeping the object; a
    store that ignores the header keeps it unchecked, and get checks the hash either way."""

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
            connect_timeout=timeout_s, read_timeout=timeout_s, retries={"max_attempts": 3, "mode": "standard"}
        )
        session = boto3.session.Session()  # one per store: the default session is not thread-safe
        self.client: Any = session.client("s3", endpoint_url=endpoint_url, region_name=region, config=config)

    def key(self, sha: str) -> str:
        name = f"{sha[:2]}/{_valid(sha)}"
        return f"{self.prefix}/{name}" if self.prefix else name

    def put(self, data: bytes, durable: bool = True) -> str:
        sha = hashlib.sha256(data).hexdigest()
        if self._length(sha) != len(data):  # missing, or something else under this name: (re)write it
            checksum = base64.b64encode(bytes.fromhex(sha)).decode()
            self.client.put_object(
                Bucket=self.bucket,
                Key=self.key(sha),
                Body=data,
                ChecksumSHA256=checksum,
                ContentType="application/octet-stream",
            )
        return sha

    def get(self, sha: str) -> bytes:
        with contextlib.closing(self._get_object(sha)["Body"]) as body:
            data: bytes = body.read()
        return _checked(sha, data)

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
        answer = _download_headers(sha, filename)
        asked = headers.get("range") if headers.get("if-range") in (None, answer["ETag"]) else None
        try:
            wanted = byte_range(asked, size)
        except RangeNotSatisfiableError:
            return Response(status_code=416, headers={"Content-Range": f"bytes */{size}"})
        start, end = wanted or (0, size)
        extra = {} if wanted is None else {"Range": f"bytes={start}-{end - 1}"}
        body = self._get_object(sha, **extra)["Body"]
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
        name = f"incoming/{round_}/{miner}/{_valid(sha)}"
        return f"{self.prefix}/{name}" if self.prefix else name

    def upload_form(self, key: str, max_bytes: int, expiry_s: float) -> tuple[str, dict[str, str]]:
        """A presigned POST form for ``key`` alone and at most ``max_bytes``: (url, fields)."""
        post = self.client.generate_presigned_post(
            Bucket=self.bucket,
            Key=key,
            Conditions=[["content-length-range", 1, max_bytes]],
            ExpiresIn=int(expiry_s),
        )
        return str(post["url"]), {str(k): str(v) for k, v in post["fields"].items()}

    def take(self, key: str, max_bytes: int) -> bytes:
        """The object at ``key``, removed from there once read (it is taken once, whatever it holds). Raises
        BlobNotFoundError if there is none, BlobTooLargeError beyond ``max_bytes`` (removed unread)."""
        try:
            size = int(self.client.head_object(Bucket=self.bucket, Key=key)["ContentLength"])
            if size <= max_bytes:
                with contextlib.closing(self.client.get_object(Bucket=self.bucket, Key=key)["Body"]) as body:
                    data: bytes = body.read(max_bytes + 1)
        except Exception as e:
            if _s3_code(e) in _S3_MISSING:
                raise BlobNotFoundError(key) from None
            raise
        self.client.delete_object(Bucket=self.bucket, Key=key)
        if size > max_bytes or len(data) > max_bytes:
            raise BlobTooLargeError(f"{size} bytes, more than {max_bytes}")
        return data

    def _length(self, sha: str) -> int | None:
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self.key(sha))
        except Exception as e:
            if _s3_code(e) in _S3_MISSING:
                return None
            raise
        return int(head["ContentLength"])

    def _get_object(self, sha: str, **extra: str) -> dict[str, Any]:
        try:
            obj: dict[str, Any] = self.client.get_object(Bucket=self.bucket, Key=self.key(sha), **extra)
        except Exception as e:
            if _s3_code(e) in _S3_MISSING:
                raise BlobNotFoundError(sha) from None
            raise
        return obj


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
