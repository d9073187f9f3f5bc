"""Blobs (uploads, published updates, checkpoints) named by the sha256 of their bytes.

Two stores behind one small interface: files on the coordinator's disk (the default) and an S3-compatible
bucket. Both serve a blob over HTTP with its sha256 as ETag and answer a single byte range, so a miner
resumes an interrupted download the same way from either.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Protocol

from starlette.responses import FileResponse, Response

from protocol.params import Params, file_sha256, read_safetensors
from protocol.payload import ParamSpec

CHUNK_BYTES = 1 << 20
_SHA = re.compile(r"[0-9a-f]{64}")
_RANGE = re.compile(r"bytes\s*=\s*(\d{0,19})\s*-\s*(\d{0,19})", re.IGNORECASE)


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

    def put_written(self, write: Callable[[Path], None]) -> tuple[str, int]:
        """Keep what ``write(path)`` writes to a temporary file (a checkpoint, tensor by tensor), never read
        whole into memory; its sha256 (hex) and length."""
        ...

    def get(self, sha: str) -> bytes:
        """The blob's bytes, checked against its name (BlobNotFoundError, BlobCorruptError)."""
        ...

    def as_file(self, sha: str) -> contextlib.AbstractContextManager[Path]:
        """The blob as a local file for the ``with`` block (a checkpoint to read tensor by tensor), checked
        against its name as ``get`` checks it, never read whole into memory."""
        ...

    def exists(self, sha: str) -> bool: ...

    def size(self, sha: str) -> int:
        """The blob's length in bytes (BlobNotFoundError)."""
        ...

    def delete(self, sha: str) -> None:
        """Forget the blob; deleting one that is not kept is not an error."""
        ...

    def forget_incoming(self, through_round: int) -> int:
        """Remove what miners uploaded straight to the store for every round up to ``through_round``
        (``[blobs] direct_uploads``; a store without them has none): how many objects."""
        ...

    def serve(self, sha: str, headers: Mapping[str, str], filename: str) -> Response:
        """The blob as an HTTP download named ``filename``, with ETag ``"<sha>"``: 200, or 206/416 for a
        ``Range`` in the request ``headers`` (BlobNotFoundError). Blocking: call it from a thread."""
        ...

    def url(self, sha: str, filename: str, expiry_s: float) -> str | None:
        """A URL the blob can be downloaded from directly for ``expiry_s`` (a presigned one), or None when
        the store has none (the coordinator serves the bytes itself)."""
        ...


def kept_checkpoint(blobs: BlobStore, sha: str, spec: ParamSpec | None = None) -> Params:
    """A kept checkpoint's tensors (exactly ``spec``'s when given: the coordinator's state, written the same
    way, has names of its own), read from its blob as a file tensor by tensor (never whole in memory);
    CodecError when it is not that."""
    with blobs.as_file(sha) as path:
        return read_safetensors(path, spec)[0]


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


def download_headers(sha: str, filename: str) -> dict[str, str]:
    return {
        "ETag": f'"{sha}"',
        "Accept-Ranges": "bytes",
        "Content-Disposition": f'attachment; filename="{filename}"',
    }


def checked_file(sha: str, path: Path) -> Path:
    """The file, once its bytes hash to ``sha`` (BlobCorruptError otherwise), read a chunk at a time."""
    if file_sha256(path) != sha:
        raise BlobCorruptError(f"blob {sha[:12]} does not hash to its name")
    return path


def checked(sha: str, data: bytes) -> bytes:
    if hashlib.sha256(data).hexdigest() != sha:
        raise BlobCorruptError(f"blob {sha[:12]} does not hash to its name")
    return data


def valid_sha(sha: str) -> str:
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
        return self.root / sha[:2] / valid_sha(sha)

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

    def put_written(self, write: Callable[[Path], None]) -> tuple[str, int]:
        tmp = self.root / f"written.{os.getpid()}.{threading.get_ident()}.tmp"
        try:
            write(tmp)
            sha, size = file_sha256(tmp), tmp.stat().st_size
            path = self.path(sha)
            if not path.exists() or path.stat().st_size != size:
                with open(tmp, "rb+") as f:
                    os.fsync(f.fileno())
                path.parent.mkdir(exist_ok=True)
                os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return sha, size

    def get(self, sha: str) -> bytes:
        try:
            return checked(sha, self.path(sha).read_bytes())
        except FileNotFoundError:
            raise BlobNotFoundError(sha) from None

    @contextlib.contextmanager
    def as_file(self, sha: str) -> Iterator[Path]:
        try:
            yield checked_file(sha, self.path(sha))
        except FileNotFoundError:
            raise BlobNotFoundError(sha) from None

    def clear_temporaries(self) -> int:
        """Remove the temporary files of writes cut short (a process killed mid-write: a checkpoint's may be
        gigabytes); how many. Only the holder of the state directory's lock may call it."""
        stale = [*self.root.glob("written.*.tmp"), *self.root.glob("*/*.tmp")]
        for path in stale:
            path.unlink(missing_ok=True)
        return len(stale)

    def exists(self, sha: str) -> bool:
        return self.path(sha).is_file()

    def size(self, sha: str) -> int:
        return self._stat(sha).st_size

    def delete(self, sha: str) -> None:
        self.path(sha).unlink(missing_ok=True)

    def forget_incoming(self, through_round: int) -> int:
        return 0  # direct uploads go to a bucket only

    def serve(self, sha: str, headers: Mapping[str, str], filename: str) -> Response:
        # FileResponse reads Range and If-Range from the request itself and answers 200, 206 or 416.
        return FileResponse(
            self.path(sha),
            media_type="application/octet-stream",
            headers=download_headers(sha, filename),
            stat_result=self._stat(sha),
        )

    def url(self, sha: str, filename: str, expiry_s: float) -> str | None:
        return None

    def _stat(self, sha: str) -> os.stat_result:
        try:
            return self.path(sha).stat()
        except FileNotFoundError:
            raise BlobNotFoundError(sha) from None
