"""What nodes download: the tokenizer, published updates, checkpoints, training data and the signed history.

Blobs are content-addressed and immutable, so they may come straight from the object store (a redirect to
a presigned URL) and any cache may keep them; nodes check each against the sha256 in its signed record
(protocol/history.py). Data answers carry the coordinator's signature of the ids asked for and the body.
"""

from __future__ import annotations

import asyncio
from typing import Annotated

import torch
from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import RedirectResponse
from safetensors.torch import save as st_save

from coordinator.api.deps import QueriesDep, RunDep, VersionNumber
from coordinator.errors import ApiError, Forbidden, NotFound, Unprocessable, responses
from coordinator.run import Run
from coordinator.storage.blobs import BlobNotFoundError
from protocol.history import HEADER_ANSWER_SIGNATURE, HistoryPage
from protocol.wire import MAX_NUMBER

MAX_IDS_PER_REQUEST = 4096
MAX_RECORDS_PER_REQUEST = 1000
router = APIRouter()


@router.get("/v1/tokenizer", responses=responses())
async def tokenizer(run: RunDep) -> Response:
    """The run's tokenizer as a Hugging Face tokenizer.json (its sha256 is in /v1/info)."""
    sha = run.tokenizer.sha256
    headers = {"ETag": f'"{sha}"', "Cache-Control": "public, max-age=31536000, immutable"}
    return Response(run.tokenizer.json, media_type="application/json", headers=headers)


@router.get("/v1/versions/{version}/update", responses=responses(404, 416, 422))
async def version_update(version: VersionNumber, request: Request, run: RunDep) -> Response:
    sha = await asyncio.to_thread(run.queries.update_sha, version)
    if sha is None:
        raise NotFound("not_found", f"no published update makes version {version}")
    return await blob(run, request, sha, f"update-{version}.safetensors")


@router.get("/v1/checkpoint", responses=responses(404, 416, 422))
async def checkpoint(
    request: Request,
    run: RunDep,
    version: Annotated[
        int | None, Query(ge=0, le=MAX_NUMBER, description="that version's checkpoint")
    ] = None,
    at_most: Annotated[
        int | None,
        Query(
            ge=0,
            le=MAX_NUMBER,
            description="the newest checkpoint kept on this version's line at or before it (a checkpoint "
            "comes every `checkpoint_every` versions of /v1/info); X-Gradpool-Version names the one sent",
        ),
    ] = None,
) -> Response:
    """The newest checkpoint kept (or ``version``'s, or the newest at or before ``at_most``), as a
    download: ETag, HTTP Range, and X-Gradpool-Version naming its version."""
    if version is not None and at_most is not None:
        raise Unprocessable("invalid_request", "give version or at_most, not both")
    if at_most is not None:
        found = await asyncio.to_thread(run.lineage.checkpoint_at_most, at_most)
    else:
        found = await asyncio.to_thread(run.queries.checkpoint_sha, version)
    if found is None:
        which = f"at or before version {at_most}" if at_most is not None else f"for version {version}"
        raise NotFound("not_found", f"no checkpoint kept {which}")
    v, sha = found
    name = f"checkpoint-{v}.safetensors"
    response = await blob(run, request, sha, name, immutable=version is not None)
    response.headers["X-Gradpool-Version"] = str(v)
    return response


IMMUTABLE = "public, max-age=31536000, immutable"  # content-addressed: a cache may keep it for ever


async def blob(run: Run, request: Request, sha: str, filename: str, immutable: bool = True) -> Response:
    """A kept blob as a download: ETag "<sha>", HTTP Range answered (206, 416), or a 307 to a presigned
    URL of the object store (``[blobs] redirect_downloads``), so the bytes never pass through this process.
    ``immutable``: the URL always means these bytes, so caches may keep the answer. The bytes count
    towards the round's downloads (the whole file's from the file store, those sent from S3, the object's
    size when redirected)."""
    blobs, settings = run.blobs, run.settings.blobs
    try:
        if settings.redirect_downloads:
            url = await asyncio.to_thread(blobs.url, sha, filename, settings.redirect_expiry_s)
            if url is not None:
                size = await asyncio.to_thread(blobs.size, sha)
                run.count_download(size)
                run.metrics.redirects.inc()
                headers = {"ETag": f'"{sha}"', "Cache-Control": "no-store"}  # the URL expires
                return RedirectResponse(url, status_code=307, headers=headers)
        response = await asyncio.to_thread(blobs.serve, sha, request.headers, filename)
    except BlobNotFoundError:
        raise NotFound("not_found", "that file is no longer kept") from None
    response.headers["Cache-Control"] = IMMUTABLE if immutable else "no-cache"
    run.count_download(int(response.headers.get("content-length", "0")))
    return response


@router.get("/v1/data", responses=responses(400, 403, 422))
async def sequences(run: RunDep, ids: Annotated[str, Query(max_length=MAX_IDS_PER_REQUEST * 12)]) -> Response:
    """The training sequences with these comma-separated ids, as safetensors {"tokens": (n, seq_len + 1)}."""
    try:
        wanted = [int(x) for x in ids.split(",")] if ids else []
    except ValueError:
        raise ApiError("invalid_request", "ids must be comma-separated integers") from None
    if not 1 <= len(wanted) <= MAX_IDS_PER_REQUEST:
        raise ApiError("invalid_request", f"ask for 1 to {MAX_IDS_PER_REQUEST} sequences")
    n = run.data_meta.num_sequences
    if any(not 0 <= i < n for i in wanted):
        raise ApiError("invalid_request", f"sequence ids must be in 0..{n - 1}")
    dataset = run.dataset
    if any(dataset.is_held_out(i) for i in wanted):
        raise Forbidden("held_out", "held-out sequences are never served")
    dtype = torch.uint8 if run.vocab <= 256 else torch.int32
    body = await asyncio.to_thread(lambda: st_save({"tokens": dataset.sequences(wanted).to(dtype)}))
    run.count_download(len(body), "data")
    headers = {HEADER_ANSWER_SIGNATURE: run.history.data_signature(wanted, body)}
    return Response(body, media_type="application/octet-stream", headers=headers)


@router.get("/v1/history", responses=responses(422))
async def history(
    queries: QueriesDep,
    after: Annotated[int, Query(ge=-1, le=MAX_NUMBER)] = -1,
    limit: Annotated[int, Query(ge=1, le=MAX_RECORDS_PER_REQUEST)] = MAX_RECORDS_PER_REQUEST,
) -> HistoryPage:
    """The signed history's records after seq ``after`` (at most ``limit``), in order, and the newest
    record's seq: the chain every node verifies against the coordinator's key (protocol/history.py)."""
    return await asyncio.to_thread(queries.history_page, after, limit)
