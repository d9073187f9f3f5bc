"""The coordinator's HTTP API: ``create_app(settings) -> FastAPI``."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
from collections.abc import AsyncIterator
from typing import Annotated

import torch
from fastapi import APIRouter, Depends, FastAPI, Query, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import ValidationError
from safetensors.torch import save as st_save

from coordinator.blobs import BlobNotFoundError
from coordinator.errors import (
    ApiError,
    Busy,
    Forbidden,
    NotFound,
    PayloadTooLarge,
    Unauthorized,
    Unprocessable,
    install_handlers,
)
from coordinator.run import Run
from coordinator.settings import CoordinatorSettings
from protocol.errors import SignatureError
from protocol.signing import verify_request
from protocol.wire import (
    HEADER_PROTOCOL,
    PROTOCOL_VERSION,
    Leaderboard,
    Registration,
    RoundInfo,
    RoundRecord,
    RunInfo,
    Status,
    SubmissionReceipt,
    VerdictReceipt,
    Verdicts,
    VersionInfo,
)

log = logging.getLogger(__name__)
MAX_IDS_PER_REQUEST = 4096


def get_run(request: Request) -> Run:
    run: Run = request.app.state.run
    return run


RunDep = Annotated[Run, Depends(get_run)]


async def read_body(request: Request, cap: int) -> bytes:
    """The request body, refused as soon as it passes ``cap`` bytes (before it is all read)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > cap:
        raise PayloadTooLarge("payload_too_large", f"body of {declared} bytes exceeds the {cap}-byte limit")
    parts, n = [], 0
    async for chunk in request.stream():
        n += len(chunk)
        if n > cap:
            raise PayloadTooLarge("payload_too_large", f"body exceeds the {cap}-byte limit")
        parts.append(chunk)
    return b"".join(parts)


def authenticate(run: Run, request: Request, body: bytes) -> str:
    """The signer's public key; refuses unsigned, forged, expired and replayed requests."""
    path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    try:
        miner, nonce = verify_request(
            dict(request.headers), request.method, path, body, window_s=run.settings.signature_window_s
        )
    except SignatureError as e:
        raise Unauthorized(e.code, e.message) from None
    if not run.check_nonce(nonce):
        raise Unauthorized("replayed_nonce", "this nonce was used before")
    return miner


router = APIRouter()


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request) -> dict[str, str]:
    """Ready once the run is loaded and its round keeper is running."""
    run: Run | None = getattr(request.app.state, "run", None)
    if run is None or not run.keeping:
        raise Busy("starting", "the coordinator is still starting", headers={"Retry-After": "1"})
    return {"status": "ready"}


@router.get("/metrics")
async def metrics(run: RunDep) -> Response:
    return Response(run.metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/rounds/{round_}/audit")
async def audit(round_: int, run: RunDep) -> list[dict[str, object]]:
    """The round's audit manifest: each upload's miner, payload hash, size, verdict and reason."""
    if round_ < 0 or round_ > run.current.round:
        raise NotFound("not_found", f"round {round_} does not exist")
    return run.audit(round_)


def require_admin(request: Request, run: RunDep) -> None:
    token = run.settings.admin_token
    if token is None:
        raise Forbidden("admin_disabled", "set admin_token in the coordinator's settings to use /v1/admin")
    given = request.headers.get("authorization", "")
    if not hmac.compare_digest(given.encode(), f"Bearer {token.get_secret_value()}".encode()):
        raise Unauthorized("bad_admin_token", "missing or wrong admin token")


@router.post("/v1/admin/close-round", dependencies=[Depends(require_admin)])
async def close_round(run: RunDep) -> dict[str, int]:
    """Close the open round now, with the uploads it has."""
    return {"round": run.request_close()}


@router.get("/v1/info")
async def info(run: RunDep) -> RunInfo:
    return run.info


@router.get("/v1/status")
async def status(run: RunDep) -> Status:
    return Status(
        run=run.info,
        round=run.round_info(),
        miners=run.count_miners(),
        initial_eval_loss=run.initial_eval_loss(),
        rounds=run.reports(),
        leaderboard=await asyncio.to_thread(run.leaderboard),
    )


@router.get("/v1/leaderboard")
async def leaderboard(run: RunDep, round: Annotated[int | None, Query(ge=0)] = None) -> Leaderboard:
    """Every miner's score and record, best first; with ``round``, as of the close of that round."""
    last = run.last_closed_round()
    if round is not None and (last is None or round > last):
        raise NotFound("not_found", f"round {round} has not closed")
    through = last if round is None else round
    return Leaderboard(round=through, miners=await asyncio.to_thread(run.leaderboard, through))


@router.get("/v1/rounds/{round_}")
async def round_record(round_: int, run: RunDep) -> RoundRecord:
    """A round's base version and its uploads with their verdicts: what a validator evaluates."""
    record = run.round_record(round_)
    if record is None:
        raise NotFound("not_found", f"round {round_} does not exist")
    return record


@router.get("/v1/rounds/{round_}/payloads/{miner}")
async def payload(round_: int, miner: str, request: Request, run: RunDep) -> Response:
    """A miner's upload in a round that no longer takes uploads."""
    sha = run.payload_sha(round_, miner.lower())
    if sha is None:
        raise NotFound("not_found", f"no upload from {miner[:16]} in round {round_}")
    return await _blob(run, request, sha, f"payload-{round_}-{miner[:16]}.safetensors")


@router.post("/v1/rounds/{round_}/verdicts")
async def verdicts(round_: int, request: Request, run: RunDep) -> VerdictReceipt:
    """A validator's signed evaluation of a closed round's uploads."""
    body = await read_body(request, 4 * 1024 * 1024)
    validator = authenticate(run, request, body)
    try:
        given = Verdicts.model_validate_json(body)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"])
        raise Unprocessable("invalid_request", f"verdicts: {where}: {err['msg']}") from None
    n = await asyncio.to_thread(run.record_verdicts, validator, round_, given.verdicts)
    return VerdictReceipt(round=round_, validator=validator, recorded=n)


@router.get("/v1/round")
async def current_round(
    run: RunDep, after: Annotated[int, Query(ge=-1)] = -1, wait_s: Annotated[float, Query(ge=0, le=60)] = 0.0
) -> RoundInfo:
    """The open round; with ``after`` and ``wait_s``, waits up to wait_s for a round later than ``after``."""
    if wait_s > 0:
        await run.wait_for_round(after, wait_s)
    return run.round_info()


@router.post("/v1/miners")
async def register(request: Request, run: RunDep) -> Registration:
    body = await read_body(request, 4096)
    miner = authenticate(run, request, body)
    new = run.register(miner)
    return Registration(miner=miner, registered=new)


@router.post("/v1/rounds/{round_}/submissions")
async def submit(round_: int, request: Request, run: RunDep) -> SubmissionReceipt:
    body = await read_body(request, run.settings.max_payload_bytes)
    miner = authenticate(run, request, body)
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(run.intake_pool, run.submit, miner, round_, body)


@router.get("/v1/versions/{version}")
async def version_info(version: int, run: RunDep) -> VersionInfo:
    info = run.version_info(version)
    if info is None:
        raise NotFound("not_found", f"version {version} does not exist")
    return info


@router.get("/v1/versions/{version}/update")
async def version_update(version: int, request: Request, run: RunDep) -> Response:
    sha = run.update_sha(version)
    if sha is None:
        raise NotFound("not_found", f"no published update makes version {version}")
    return await _blob(run, request, sha, f"update-{version}.safetensors")


@router.get("/v1/checkpoint")
async def checkpoint(request: Request, run: RunDep, version: int | None = None) -> Response:
    found = run.checkpoint_sha(version)
    if found is None:
        raise NotFound("not_found", f"no checkpoint kept for version {version}")
    v, sha = found
    response = await _blob(run, request, sha, f"checkpoint-{v}.safetensors")
    response.headers["X-Gradpool-Version"] = str(v)
    return response


async def _blob(run: Run, request: Request, sha: str, filename: str) -> Response:
    """A kept blob as a download: ETag "<sha>", HTTP Range answered (206, 416). The answer's Content-Length
    (the whole file's from the file store, the bytes sent from S3) counts towards the round's downloads."""
    try:
        response = await asyncio.to_thread(run.blobs.serve, sha, request.headers, filename)
    except BlobNotFoundError:
        raise NotFound("not_found", "that file is no longer kept") from None
    run.count_download(int(response.headers.get("content-length", "0")))
    return response


@router.get("/v1/data")
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
    if any(run.dataset.is_held_out(i) for i in wanted):
        raise Forbidden("held_out", "held-out sequences are never served")
    tokens = run.dataset.sequences(wanted)
    body = st_save({"tokens": tokens.to(_token_dtype(run))})
    run.count_download(len(body))
    return Response(body, media_type="application/octet-stream")


def _token_dtype(run: Run) -> torch.dtype:
    return torch.uint8 if run.model.cfg.vocab_size <= 256 else torch.int32


def create_app(settings: CoordinatorSettings, run: Run | None = None) -> FastAPI:
    """The coordinator app; builds its Run at startup unless one (already built) is given."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        nonlocal run
        if run is None:
            run = await asyncio.to_thread(Run, settings)
        app.state.run = run
        keeper = asyncio.create_task(run.keep_rounds())
        try:
            yield
        finally:
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeper
            run.close()

    app = FastAPI(title="gradpool coordinator", version=str(PROTOCOL_VERSION), lifespan=lifespan)
    install_handlers(app)

    @app.middleware("http")
    async def protocol_header(request: Request, call_next):  # type: ignore[no-untyped-def]
        response = await call_next(request)
        response.headers[HEADER_PROTOCOL] = str(PROTOCOL_VERSION)
        return response

    app.include_router(router)
    return app
