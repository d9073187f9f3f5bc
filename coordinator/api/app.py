"""The coordinator's HTTP API: ``create_app(settings) -> FastAPI``.

Handlers never block the event loop: the open round is read from the round state (no SQL); everything that
touches the store, hashes a large body or decodes a payload runs in a worker thread. Signed requests are
read by coordinator/api/http_io.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Annotated

import torch
from fastapi import APIRouter, Depends, FastAPI, Path, Query, Request, Response
from fastapi.responses import RedirectResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import ValidationError
from safetensors.torch import save as st_save

from coordinator.api import dashboard
from coordinator.api.http_io import ProtocolHeader, signed_body
from coordinator.errors import (
    SIGNED,
    ApiError,
    Busy,
    Forbidden,
    NotFound,
    Unauthorized,
    Unprocessable,
    install_handlers,
    responses,
)
from coordinator.hooks import Clock, Hooks
from coordinator.rounds.checks import Check
from coordinator.rounds.intake import Intake
from coordinator.rounds.modes import RoundMode
from coordinator.rounds.queries import Queries
from coordinator.rounds.scoring import Scores
from coordinator.rounds.state import RoundWatch
from coordinator.run import Run
from coordinator.settings import CoordinatorSettings
from coordinator.storage.blobs import BlobNotFoundError
from protocol.wire import (
    MAX_NUMBER,
    PROTOCOL_VERSION,
    Leaderboard,
    Registration,
    RoundInfo,
    RoundRecord,
    RoundReport,
    RunInfo,
    Status,
    SubmissionReceipt,
    VerdictReceipt,
    Verdicts,
    VersionInfo,
)

log = logging.getLogger(__name__)
MAX_IDS_PER_REQUEST = 4096
RoundNumber = Annotated[int, Path(ge=0, le=MAX_NUMBER)]
VersionNumber = Annotated[int, Path(ge=0, le=MAX_NUMBER)]


async def get_run(request: Request) -> Run:
    """Async, so that FastAPI runs it on the event loop instead of handing it to a worker thread."""
    run: Run = request.app.state.run
    return run


RunDep = Annotated[Run, Depends(get_run)]


async def get_queries(run: RunDep) -> Queries:
    return run.queries


async def get_intake(run: RunDep) -> Intake:
    return run.intake


async def get_scores(run: RunDep) -> Scores:
    return run.scores


async def get_info(run: RunDep) -> RunInfo:
    return run.info


QueriesDep = Annotated[Queries, Depends(get_queries)]
IntakeDep = Annotated[Intake, Depends(get_intake)]
ScoresDep = Annotated[Scores, Depends(get_scores)]
InfoDep = Annotated[RunInfo, Depends(get_info)]


router = APIRouter()


@router.get("/healthz", responses=responses())
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", responses=responses(503))
async def readyz(request: Request) -> dict[str, str]:
    """Ready once the run is loaded and its closer is running."""
    run: Run | None = getattr(request.app.state, "run", None)
    if run is None or not run.closer.running:
        raise Busy("starting", "the coordinator is still starting", headers={"Retry-After": "1"})
    return {"status": "ready"}


@router.get("/metrics", responses=responses())
async def metrics(run: RunDep) -> Response:
    return Response(run.metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/rounds/{round_}/audit", responses=responses(404, 422))
async def audit(round_: RoundNumber, queries: QueriesDep) -> list[dict[str, object]]:
    """The round's audit manifest: each upload's miner, payload hash, size, verdict and reason."""
    return await asyncio.to_thread(queries.audit, round_)


def require_admin(request: Request, run: RunDep) -> None:
    token = run.settings.admin_token
    if token is None:
        raise Forbidden("admin_disabled", "set admin_token in the coordinator's settings to use /v1/admin")
    given = request.headers.get("authorization", "")
    if not hmac.compare_digest(given.encode(), f"Bearer {token.get_secret_value()}".encode()):
        raise Unauthorized("bad_admin_token", "missing or wrong admin token")


@router.post(
    "/v1/admin/close-round", dependencies=[Depends(require_admin)], responses=responses(401, 403, 409)
)
async def close_round(run: RunDep) -> dict[str, int]:
    """Close the open round now, with the uploads it has."""
    return {"round": await asyncio.to_thread(run.request_close)}


@router.get("/v1/info", responses=responses())
async def info(info: InfoDep) -> RunInfo:
    return info


@router.get("/v1/tokenizer", responses=responses())
async def tokenizer(run: RunDep) -> Response:
    """The run's tokenizer as a Hugging Face tokenizer.json (its sha256 is in /v1/info)."""
    sha = run.tokenizer.sha256
    headers = {"ETag": f'"{sha}"', "Cache-Control": "public, max-age=31536000, immutable"}
    return Response(run.tokenizer.json, media_type="application/json", headers=headers)


@router.get("/v1/status", responses=responses())
async def status(info: InfoDep, q: QueriesDep, scores: ScoresDep) -> Status:
    """The run, the open round, the most recent rounds (``/v1/reports`` pages through all of them) and the
    leaderboard."""

    def read() -> Status:
        stall = q.stall()
        return Status(
            run=info,
            round=q.round_info(),
            miners=q.count_miners(),
            initial_eval_loss=q.initial_eval_loss(),
            rounds=q.reports(),
            leaderboard=scores.board(q.last_closed_round()),
            stalled_rounds=stall.rounds,
            stalled_by=stall.keys,
        )

    return await asyncio.to_thread(read)


@router.get("/v1/reports", responses=responses(422))
async def reports(
    queries: QueriesDep,
    after: Annotated[int, Query(ge=-1, le=MAX_NUMBER)] = -1,
    limit: Annotated[int, Query(ge=1, le=1000)] = 1000,
) -> list[RoundReport]:
    """The closed rounds after round ``after``, oldest first, at most ``limit``."""
    return await asyncio.to_thread(queries.reports, after, limit)


@router.get("/v1/leaderboard", responses=responses(404, 422))
async def leaderboard(
    queries: QueriesDep, scores: ScoresDep, round: Annotated[int | None, Query(ge=0, le=MAX_NUMBER)] = None
) -> Leaderboard:
    """Every miner's score and record, best first; with ``round``, as of the close of that round."""
    last = queries.last_closed_round()
    if round is not None and (last is None or round > last):
        raise NotFound("not_found", f"round {round} has not closed")
    through = last if round is None else round
    return Leaderboard(round=through, miners=await asyncio.to_thread(scores.board, through))


@router.get("/v1/rounds/{round_}", responses=responses(404, 422))
async def round_record(round_: RoundNumber, queries: QueriesDep) -> RoundRecord:
    """A round's base version and its uploads with their verdicts: what a validator evaluates."""
    record = await asyncio.to_thread(queries.round_record, round_)
    if record is None:
        raise NotFound("not_found", f"round {round_} does not exist")
    return record


@router.get("/v1/rounds/{round_}/payloads/{miner}", responses=responses(404, 416, 409, 422))
async def payload(
    round_: RoundNumber, miner: Annotated[str, Path(max_length=64)], request: Request, run: RunDep
) -> Response:
    """A miner's upload in a round that no longer takes uploads."""
    sha = await asyncio.to_thread(run.queries.payload_sha, round_, miner.lower())
    if sha is None:
        raise NotFound("not_found", f"no upload from {miner[:16]} in round {round_}")
    return await _blob(run, request, sha, f"payload-{round_}-{miner[:16]}.safetensors")


@router.post("/v1/rounds/{round_}/verdicts", responses=responses(*SIGNED, 404, 409))
async def verdicts(round_: RoundNumber, request: Request, run: RunDep, intake: IntakeDep) -> VerdictReceipt:
    """A validator's signed evaluation of a closed round's uploads."""
    validator, body, _ = await signed_body(run, request, 4 * 1024 * 1024)
    try:
        given = Verdicts.model_validate_json(body)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"])
        raise Unprocessable("invalid_request", f"verdicts: {where}: {err['msg']}") from None
    n = await asyncio.to_thread(intake.record_verdicts, validator, round_, given.verdicts)
    return VerdictReceipt(round=round_, validator=validator, recorded=n)


@router.get("/v1/round", responses=responses(422))
async def current_round(
    request: Request,
    queries: QueriesDep,
    after: Annotated[int, Query(ge=-1, le=MAX_NUMBER)] = -1,
    wait_s: Annotated[float, Query(ge=0, le=60)] = 0.0,
    closed: Annotated[int, Query(ge=-1, le=MAX_NUMBER)] = -1,
) -> RoundInfo:
    """The open round. With ``wait_s``, waits up to wait_s for a round later than ``after`` and for round
    ``closed`` to have closed (overlapped rounds: the round behind the open one, and its version)."""
    if wait_s > 0:
        watch: RoundWatch = request.app.state.watch
        await watch.wait(queries.cell, after, wait_s, closed)
    return queries.round_info()


@router.post("/v1/miners", responses=responses(*SIGNED, 429))
async def register(request: Request, run: RunDep, intake: IntakeDep) -> Registration:
    """Register the signer as a miner: refused (403) by an allowlist that does not hold it, and (429, with
    Retry-After) beyond ``[admission]``'s limits on new keys a minute, per client address and overall."""
    miner, _, _ = await signed_body(run, request, 4096)
    address = request.client.host if request.client is not None else ""
    new = await asyncio.to_thread(intake.register, miner, address)
    return Registration(miner=miner, registered=new)


@router.post("/v1/rounds/{round_}/submissions", responses=responses(*SIGNED, 404, 409, 503))
async def submit(round_: RoundNumber, request: Request, run: RunDep) -> SubmissionReceipt:
    miner, body, sha = await signed_body(run, request, run.max_payload_bytes, miner_only=True)
    loop = asyncio.get_running_loop()
    receipt: SubmissionReceipt = await loop.run_in_executor(
        run.intake_pool, run.intake.submit, miner, round_, body, sha
    )
    return receipt


@router.get("/v1/versions/{version}", responses=responses(404, 422))
async def version_info(version: VersionNumber, queries: QueriesDep) -> VersionInfo:
    info = await asyncio.to_thread(queries.version_info, version)
    if info is None:
        raise NotFound("not_found", f"version {version} does not exist")
    return info


@router.get("/v1/versions/{version}/update", responses=responses(404, 416, 422))
async def version_update(version: VersionNumber, request: Request, run: RunDep) -> Response:
    sha = await asyncio.to_thread(run.queries.update_sha, version)
    if sha is None:
        raise NotFound("not_found", f"no published update makes version {version}")
    return await _blob(run, request, sha, f"update-{version}.safetensors")


@router.get("/v1/checkpoint", responses=responses(404, 416, 422))
async def checkpoint(
    request: Request, run: RunDep, version: Annotated[int | None, Query(ge=0, le=MAX_NUMBER)] = None
) -> Response:
    found = await asyncio.to_thread(run.queries.checkpoint_sha, version)
    if found is None:
        raise NotFound("not_found", f"no checkpoint kept for version {version}")
    v, sha = found
    name = f"checkpoint-{v}.safetensors"
    response = await _blob(run, request, sha, name, immutable=version is not None)
    response.headers["X-Gradpool-Version"] = str(v)
    return response


IMMUTABLE = "public, max-age=31536000, immutable"  # content-addressed: a cache may keep it for ever


async def _blob(run: Run, request: Request, sha: str, filename: str, immutable: bool = True) -> Response:
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
    return Response(body, media_type="application/octet-stream")


def create_app(
    settings: CoordinatorSettings,
    run: Run | None = None,
    checks: Sequence[Check] | None = None,
    hooks: Hooks | None = None,
    clock: Clock | Callable[[], float] = time.time,
    mode: RoundMode | None = None,
) -> FastAPI:
    """The coordinator app; builds its Run at startup (with the check pipeline, test hooks, clock and round
    mode if given) unless one, already built, is given."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        nonlocal run
        if run is None:
            run = await asyncio.to_thread(Run, settings, checks, hooks, clock, mode)
        watch = RoundWatch()
        watch.attach(asyncio.get_running_loop())
        run.cell.listen(watch.notify)
        app.state.run, app.state.watch = run, watch
        run.start()
        try:
            yield
        finally:
            await asyncio.to_thread(run.close)

    app = FastAPI(title="gradpool coordinator", version=str(PROTOCOL_VERSION), lifespan=lifespan)
    install_handlers(app)

    app.add_middleware(ProtocolHeader)
    app.include_router(router)
    app.include_router(dashboard.router)
    return app
