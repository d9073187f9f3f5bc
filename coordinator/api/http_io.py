"""Reading requests and marking responses, for coordinator/api/app.py: the protocol header on every response,
bodies read with a size cap and a read timeout, and signed bodies, whose signature and signer are checked
before a body larger than ``SMALL_BODY`` is read.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from coordinator.errors import PayloadTooLarge, RequestTimeout, Unprocessable
from protocol.signing import HEADER_CONTENT, body_digest
from protocol.wire import HEADER_PROTOCOL, PROTOCOL_VERSION

if TYPE_CHECKING:
    from coordinator.run import Run

SMALL_BODY = 64 * 1024  # a body up to this size may be read before its signature is checked
M = TypeVar("M", bound=BaseModel)


class ProtocolHeader:
    """Every HTTP response carries the protocol version (and who answered). A plain ASGI middleware:
    FastAPI's ``http`` middleware runs each request in a task group of its own, which cost the event loop
    a quarter of its time under 256 concurrent uploads (benchmarks/coordinator.py).

    An answer given before the request's body was all read (a signed upload refused on its headers) says
    ``Connection: close``: the rest of the body would have to be read before the connection could carry
    another request, so it closes, instead of waiting idle until the server lets it go."""

    def __init__(self, app: ASGIApp, extra: Sequence[tuple[str, str]] = ()) -> None:
        """``extra``: more headers for every response (the replica's name and the leader's)."""
        self.app = app
        self.extra = [(HEADER_PROTOCOL, str(PROTOCOL_VERSION)), *extra]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        has_body = any(
            name == b"transfer-encoding" or (name == b"content-length" and value != b"0")
            for name, value in scope["headers"]
        )
        body_read = [not has_body]

        async def receive_body() -> Message:
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_read[0] = True
            return message

        async def send_with_header(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in self.extra:
                    headers.append(name, value)
                if not body_read[0] and "connection" not in headers:
                    headers.append("Connection", "close")
            await send(message)

        await self.app(scope, receive_body, send_with_header)


async def read_body(request: Request, cap: int, timeout_s: float) -> bytes:
    """The request body, refused as soon as it passes ``cap`` bytes (before it is all read), and cut off
    when no part of it arrives for ``timeout_s``."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > cap:
        raise PayloadTooLarge("payload_too_large", f"body of {declared} bytes exceeds the {cap}-byte limit")
    parts, n = [], 0
    stream = request.stream().__aiter__()
    while True:
        try:
            chunk = await asyncio.wait_for(stream.__anext__(), timeout=timeout_s)
        except StopAsyncIteration:
            break
        except TimeoutError:
            raise RequestTimeout(
                "body_timeout",
                f"no part of the body arrived for {timeout_s:g} s",
                headers={"Connection": "close"},
            ) from None
        n += len(chunk)
        if n > cap:
            raise PayloadTooLarge("payload_too_large", f"body exceeds the {cap}-byte limit")
        parts.append(chunk)
    return b"".join(parts)


def request_target(request: Request) -> str:
    """The path and query a request was sent to, as its signature covers them."""
    return request.url.path + (f"?{request.url.query}" if request.url.query else "")


async def signed_body(
    run: Run, request: Request, cap: int, miner_only: bool = False
) -> tuple[str, bytes, str]:
    """(signer, body, sha256 of the body) of a signed request. A body over ``SMALL_BODY`` must declare its
    sha256: the signature (and, with ``miner_only``, that the signer is registered) is checked over it
    first, then the body is read and compared."""
    intake, headers, target = run.intake, dict(request.headers), request_target(request)
    window = run.settings.read_timeout_s
    if HEADER_CONTENT.lower() in {k.lower() for k in headers}:

        def authenticate() -> tuple[str, str]:
            signer, digest = intake.authenticate_declared(headers, request.method, target)
            if miner_only:
                intake.require_miner(signer)
            return signer, digest

        signer, digest = await asyncio.to_thread(authenticate)
        body = await read_body(request, cap, window)
        if len(body) <= SMALL_BODY:  # hashing it costs microseconds: less than handing it to a thread
            intake.check_body(body, digest)
        else:
            await asyncio.to_thread(intake.check_body, body, digest)
        return signer, body, digest
    body = await read_body(request, min(cap, SMALL_BODY), window)
    signer = await asyncio.to_thread(intake.authenticate, headers, request.method, target, body)
    return signer, body, body_digest(body)


def parsed(model: type[M], body: bytes, what: str) -> M:
    """A JSON body as ``model``; one that is not is refused as ``invalid_request``, naming where."""
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"])
        raise Unprocessable("invalid_request", f"{what}: {where}: {err['msg']}") from None
