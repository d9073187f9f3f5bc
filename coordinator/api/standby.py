"""A replica that does not hold the leader lease still answers: it hands every request, as it came, to the
leader, whose URL the leader writes in the store once it listens (``advertise``), and passes the answer
back. Signed requests stay signed (the leader checks them as if they came straight), downloads that the
leader redirects to the bucket stay redirects, long-polls wait at the leader. With no leader known, or one
that does not answer, the standby says ``503 no_leader`` (with Retry-After), which sends a node on to its
next URL. When the standby takes the lease itself, it stops forwarding and serves the run on the same port.

With uploads straight to the bucket, a standby gives the forms for them itself, and checks their commits
before it passes them on: it reads and examines each payload and writes what it found in the store, so
that the leader only records the upload (coordinator/rounds/direct.py). Reading and examining every
payload is most of an upload's cost to a coordinator; this way it is spread over the replicas the miners
reach. The checked commits go on to the leader together, those checked while an earlier batch was on its
way in one request (coordinator/api/batches.py).

Every answer names the replica that gave it and the leader (``X-Gradpool-Replica``, ``X-Gradpool-Leader``),
which ``gradpool status`` prints.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import ssl
import time
from collections.abc import AsyncIterator, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import httpx
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from coordinator.api.batches import (
    BATCH_PATH,
    BATCH_TIMEOUT_S,
    COMMIT_BYTES,
    BatchAnswers,
    CommitAnswer,
    CommitBatch,
    CommitBatcher,
    PassedCommit,
    Unanswered,
    passed,
)
from coordinator.api.http_io import read_body, request_target
from coordinator.errors import ApiError, error_response
from coordinator.rounds.direct import ReplicaIntake, bucket_threads
from coordinator.storage.base import Store
from protocol.wire import HEADER_CHECKED, HEADER_LEADER, HEADER_PROTOCOL, HEADER_REPLICA, PROTOCOL_VERSION

log = logging.getLogger(__name__)
T = TypeVar("T")
LEADER_META = "leader"  # the meta row the leader writes: {"holder": its lease name, "url": where it listens}
LEADER_TTL_S = 1.0  # how long a standby trusts what it read of the leader
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer", "upgrade"}
    | {"transfer-encoding", "host"}
)
REQUEST_DROPPED = HOP_BY_HOP | {"x-forwarded-for", HEADER_CHECKED.lower()}  # the standby writes its own
ANSWER_DROPPED = HOP_BY_HOP | {"date", "server", HEADER_REPLICA.lower()}  # this server sets its own
POOLS, KEPT_ALIVE = 16, 64  # connection pools to the leader, and the idle connections each keeps
IDLE_S = 2.0  # how long a connection to the leader stays open unused
METHODS = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]
NOT_TAKEN = frozenset({404, 405, 409, 413, 422})  # a batch the leader refused whole (or a leader without
# the route): each commit goes on alone


def advertise(store: Store, holder: str, url: str) -> None:
    """The leader, once listening: where the standbys send what they are asked."""
    store.set_meta(LEADER_META, json.dumps({"holder": holder, "url": url}))


@dataclass(frozen=True)
class Leader:
    name: str
    url: str


class LeaderDirectory:
    """Who leads, as the store says: the lease's holder, if its lease is live and it has said where it
    listens. Read at most once a second."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._seen: tuple[float, Leader | None] = (float("-inf"), None)

    def cached(self) -> tuple[bool, Leader | None]:
        """(still fresh, the leader last read): no database read."""
        at, known = self._seen
        return time.monotonic() - at < LEADER_TTL_S, known

    def leader(self) -> Leader | None:
        fresh, known = self.cached()
        if fresh:
            return known
        try:
            held = self.store.lease_holder()
            said = self.store.get_meta(LEADER_META)
        except Exception as e:  # the database is unreachable for now: no leader known
            log.warning("cannot read who leads: %s: %s", type(e).__name__, e)
            known = None
        else:
            where = json.loads(said) if said else {}
            live = held.expires_at > time.time() and where.get("holder") == held.holder
            known = Leader(held.holder, str(where["url"]).rstrip("/")) if live else None
        self._seen = (time.monotonic(), known)
        return known


def no_leader(replica: str, message: str) -> Response:
    body = {"error": {"code": "no_leader", "message": message}}
    return JSONResponse(body, status_code=503, headers={"Retry-After": "1", HEADER_REPLICA: replica})


def standby_app(
    directory: LeaderDirectory,
    replica: str,
    verify: bool | ssl.SSLContext = True,
    read_timeout_s: float = 120.0,
    intake: ReplicaIntake | None = None,
    body_timeout_s: float = 10.0,
) -> Starlette:
    """The app a standby serves: every path, every method, to the leader. ``read_timeout_s``: longer than
    the longest long-poll (60 s). ``intake``: the forms of uploads straight to the bucket are given here,
    and their commits checked here before they go on (coordinator/rounds/direct.py), so that the leader
    only records them; a body read here that stalls for ``body_timeout_s`` is cut off, as the leader's
    ``read_timeout_s`` does."""
    timeout = httpx.Timeout(connect=3.0, read=read_timeout_s, write=read_timeout_s, pool=read_timeout_s)
    # as many requests in flight to the leader as come in (its own limits answer for it): a pool capped
    # at httpx's 100 would turn a crowd of uploads into 503s here. In POOLS pools taken in turn: a pool's
    # every change of state looks at each of its connections once per idle one (httpcore), which in one
    # pool of 500 connections cost more than the forwarding itself.
    # An idle connection is let go well before the leader's server closes it (coordinator/api/server.py:
    # KEEP_ALIVE_S; an earlier leader's, after 5 s): reused just as the leader closes it, a request would
    # fail with nothing read.
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=KEPT_ALIVE, keepalive_expiry=IDLE_S)
    if verify is True:  # one context for all the pools, not a certificate bundle loaded per pool
        verify = httpx.create_ssl_context()
    clients = [
        httpx.AsyncClient(timeout=timeout, limits=limits, verify=verify, follow_redirects=False)
        for _ in range(POOLS)
    ]
    turn = itertools.count()

    async def leader_now() -> Leader | None:
        fresh, leader = directory.cached()  # a thread (for the database) only once a second
        return leader if fresh else await asyncio.to_thread(directory.leader)

    def own_headers() -> dict[str, str]:
        """What an answer given here carries: the protocol, this replica, the leader it knows of."""
        headers = {HEADER_PROTOCOL: str(PROTOCOL_VERSION), HEADER_REPLICA: replica}
        if (leader := directory.cached()[1]) is not None:
            headers[HEADER_LEADER] = leader.name
        return headers

    async def forward(request: Request, body: bytes | None = None, checked: bool = False) -> Response:
        """``body``: the request's, where it was read already; ``checked``: a commit checked here."""
        leader = await leader_now()
        if leader is None:
            return no_leader(replica, "no replica holds the leader lease now; try again shortly")
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in REQUEST_DROPPED]
        if request.client is not None:  # the client's address, after any proxy's before this one
            earlier = request.headers.get("x-forwarded-for")
            headers.append(
                ("x-forwarded-for", f"{earlier}, {request.client.host}" if earlier else request.client.host)
            )
        if checked:
            headers.append((HEADER_CHECKED, "1"))
        has_body = "content-length" in request.headers or "transfer-encoding" in request.headers
        client = clients[next(turn) % POOLS]
        outgoing = client.build_request(
            request.method,
            leader.url + request.url.path,
            params=request.url.query or None,
            headers=headers,
            # streamed: the leader holds the size limit
            content=body if body is not None else request.stream() if has_body else None,
        )
        try:
            answer = await client.send(outgoing, stream=True)
        except httpx.TransportError as e:
            return no_leader(replica, f"the leader ({leader.name}) did not answer: {type(e).__name__}")
        response = StreamingResponse(
            answer.aiter_raw(), status_code=answer.status_code, background=BackgroundTask(answer.aclose)
        )
        kept = [(k, v) for k, v in answer.headers.raw if k.decode("latin-1").lower() not in ANSWER_DROPPED]
        response.raw_headers = [*kept, (HEADER_REPLICA.lower().encode(), replica.encode())]
        return response

    pool = None if intake is None else ThreadPoolExecutor(bucket_threads(), thread_name_prefix="intake")

    async def taken_here(
        request: Request, work: Callable[[Mapping[str, str], str, bytes, int], T]
    ) -> tuple[bytes | None, T | None]:
        """(the body, what ``work`` made of it) for a request small enough to be a form's or a commit's;
        (None, None) for any other, whose body is not read."""
        size = request.headers.get("content-length", "")
        if pool is None or not size.isdigit() or int(size) > COMMIT_BYTES:  # larger: passed on
            return None, None
        body = await read_body(request, COMMIT_BYTES, body_timeout_s)  # a body that stalls: 408
        round_ = int(request.path_params["round_"])
        try:
            done = await asyncio.get_running_loop().run_in_executor(
                pool, work, request.headers, request_target(request), body, round_
            )
        except Exception as e:  # the bucket or the store out of reach for now: the leader does it itself
            log.warning("cannot take %s here: %s: %s", request.url.path, type(e).__name__, e)
            return body, None
        return body, done

    async def form(request: Request) -> Response:
        """A direct upload's form, given here where this replica can (else by the leader)."""
        assert intake is not None
        body, ticket = await taken_here(request, intake.ticket)
        if ticket is None:
            return await forward(request, body)
        return Response(ticket.model_dump_json(), media_type="application/json", headers=own_headers())

    async def send_batch(commits: list[PassedCommit]) -> list[CommitAnswer] | None:
        """Checked commits to the leader in one request: its answers, or None if it did not take them as
        a batch (a leader of an earlier version, one that is starting)."""
        leader = await leader_now()
        if leader is None:
            raise Unanswered("no replica holds the leader lease now; try again shortly")
        content = CommitBatch(commits=commits).model_dump_json()
        client = clients[next(turn) % POOLS]
        try:
            answer = await client.post(
                leader.url + BATCH_PATH,
                content=content,
                headers={"content-type": "application/json"},
                timeout=httpx.Timeout(BATCH_TIMEOUT_S, connect=3.0),
            )
        except httpx.TransportError as e:
            raise Unanswered(f"the leader ({leader.name}) did not answer: {type(e).__name__}") from None
        if answer.status_code in NOT_TAKEN:  # refused whole, before anything of it was done
            log.info("the leader took no batch of commits (%d): each goes on alone", answer.status_code)
            return None
        try:
            if answer.status_code != 200:
                raise ValueError(f"status {answer.status_code}")
            return BatchAnswers.model_validate_json(answer.content).answers
        except ValueError as e:  # ValidationError too
            raise Unanswered(f"the leader ({leader.name}) answered a batch as no leader would: {e}") from None

    batcher = CommitBatcher(send_batch)

    async def commit(request: Request) -> Response:
        """A direct upload's commit, checked here where this replica can, then passed on (with the other
        commits checked meanwhile)."""
        assert intake is not None
        body, checked = await taken_here(request, intake.check)
        if not checked or body is None:
            return await forward(request, body)
        try:
            commit = passed(request_target(request), dict(request.headers), body)
        except ValidationError:  # more than a batch carries of one commit: it goes on alone
            return await forward(request, body, checked=True)
        try:
            answer = await batcher.pass_on(commit)
        except Unanswered as e:
            return no_leader(replica, str(e))
        if answer is None:
            return await forward(request, body, checked=True)
        return Response(
            answer.body, answer.status, answer.headers | own_headers(), media_type="application/json"
        )

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            for client in clients:
                await stack.enter_async_context(client)
            if pool is not None:
                stack.callback(pool.shutdown, wait=False, cancel_futures=True)
            yield

    routes = [Route("/{path:path}", forward, methods=METHODS)]
    if intake is not None:
        routes[:0] = [
            Route("/v1/rounds/{round_:int}/uploads", form, methods=["POST"]),
            Route("/v1/rounds/{round_:int}/commits", commit, methods=["POST"]),
        ]

    async def refused(_request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        answer = error_response(exc.status, exc.code, exc.message, exc.headers)
        answer.headers[HEADER_REPLICA] = replica
        return answer

    return Starlette(routes=routes, lifespan=lifespan, exception_handlers={ApiError: refused})
