"""The coordinator's domain errors, mapped by one handler to one body shape:
``{"error": {"code": "stale_version", "message": "..."}}``.

    ApiError (400)
    ├── Unauthorized (401)     missing_signature, bad_signature, expired_timestamp, replayed_nonce,
    │                          bad_admin_token
    ├── Forbidden (403)        unknown_miner, not_allowed, held_out, admin_disabled
    ├── NotFound (404)         not_found, upload_missing (a direct upload committed before its bytes),
    │                          not_shared ([validation] assign is off: no tasks, no validator records)
    ├── RequestTimeout (408)   body_timeout: no part of the body arrived for read_timeout_s
    ├── Conflict (409)         round_closed, round_not_open, stale_version, already_submitted,
    │                          nothing_to_aggregate, round_open, direct_uploads_off
    ├── PayloadTooLarge (413)  payload_too_large
    ├── Unprocessable (422)    malformed_payload and the codec's other codes, invalid_request,
    │                          digest_mismatch (a direct upload's bytes are not those committed)
    ├── TooManyRequests (429)  too_many_registrations, with Retry-After
    └── Busy (503)             starting, with Retry-After; no_leader (a standby replica that knows no
                               live leader to pass the request on to: coordinator/api/standby.py)

Requests the framework refuses answer in the same shape: invalid_request (422, a parameter out of range
or of the wrong type), not_found (404), method_not_allowed (405), bad_http_request (400, a request line or
headers the HTTP parser refuses: coordinator/api/server.py), internal_error (500).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)


class Stopping(Exception):
    """The coordinator is shutting down: a round being closed stays open, to be closed after the restart."""


class ApiError(Exception):
    status = 400

    def __init__(self, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.headers = code, message, headers


class Unauthorized(ApiError):
    status = 401


class Forbidden(ApiError):
    status = 403


class NotFound(ApiError):
    status = 404


class RequestTimeout(ApiError):
    status = 408


class Conflict(ApiError):
    status = 409


class PayloadTooLarge(ApiError):
    status = 413


class Unprocessable(ApiError):
    status = 422


class TooManyRequests(ApiError):
    status = 429


class Busy(ApiError):
    status = 503


class ErrorDetail(BaseModel):
    code: str = Field(description="a stable, machine-readable reason, e.g. stale_version")
    message: str = Field(description="what went wrong, for people")


class ErrorBody(BaseModel):
    """Every error the coordinator answers has this body."""

    error: ErrorDetail


MEANINGS = {
    400: "bad request (bad_http_request, or a domain error of no other class)",
    401: "missing or bad signature, expired timestamp, replayed nonce, bad admin token",
    403: "unknown miner, not on the allowlist, held-out data, admin disabled",
    404: "no such round, version, upload or blob",
    408: "body_timeout: the body stopped arriving",
    409: "the round or version does not allow this now (stale_version, round_closed, already_submitted, ...)",
    413: "payload_too_large",
    416: "the Range asked for lies past the end of the file (no body; Content-Range gives the size)",
    422: "invalid_request (a parameter out of range or of the wrong type) or a payload that does not decode",
    429: "too_many_registrations: more new keys than [admission] allows in a minute (Retry-After)",
    500: "internal_error",
    503: "the coordinator is starting (Retry-After)",
}


def responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for a route that can answer these error codes (and 500, like any route)."""
    return {
        c: {"description": MEANINGS[c]} if c == 416 else {"model": ErrorBody, "description": MEANINGS[c]}
        for c in sorted({*codes, 500})
    }


FAILED = "the coordinator failed to answer this request"  # internal_error's message
SIGNED = (400, 401, 403, 408, 413, 422)  # what any signed POST can answer before its own logic runs


def error_body(code: str, message: str) -> dict[str, Any]:
    """The one error body (``ErrorBody``)."""
    return {"error": {"code": code, "message": message}}


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(error_body(code, message), status_code=status, headers=headers)


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        run = getattr(request.app.state, "run", None)
        if run is not None and exc.status < 500:
            run.metrics.refusals.labels(exc.code).inc()
        return error_response(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"msg": "invalid request", "loc": ()}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return error_response(422, "invalid_request", f"{where}: {first.get('msg')}")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> JSONResponse:
        log.error("internal error: %s: %s", type(exc).__name__, exc)
        return error_response(500, "internal_error", FAILED)
