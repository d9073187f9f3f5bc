"""A standby replica passes requests on to the leader the store names, as they came, and says 503
``no_leader`` while no live leader has said where it listens. Real servers on 127.0.0.1: the standby's app
and a stand-in leader that echoes what reached it; the store is a real SQLite file."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from coordinator.api.standby import LeaderDirectory, advertise, standby_app
from coordinator.storage.store import SqlStore, open_store
from tests.helpers.served import serving


async def echo(request: Request) -> Response:
    body = await request.body()
    seen = {
        "method": request.method,
        "path": request.url.path,
        "query": request.url.query,
        "body": body.decode(),
        "headers": dict(request.headers),
    }
    return JSONResponse(seen, status_code=201, headers={"x-gradpool-leader": "a", "x-from": "leader"})


async def moved(_request: Request) -> Response:
    return RedirectResponse("http://bucket.example/object", status_code=307)


LEADER = Starlette(routes=[Route("/moved", moved), Route("/{path:path}", echo, methods=["GET", "POST"])])


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqlStore]:
    s = open_store(tmp_path)
    yield s
    s.close()


def lead(store: SqlStore, holder: str, url: str, lease_s: float = 30.0) -> None:
    assert store.take_lease(holder, time.time(), lease_s, force=True) is not None
    advertise(store, holder, url)


def test_requests_reach_the_leader_as_they_came_and_its_answers_come_back(store: SqlStore) -> None:
    with serving(LEADER) as leader_url:
        lead(store, "a", leader_url)
        with serving(standby_app(LeaderDirectory(store), "b")) as standby_url:
            signed = {"x-gradpool-signature": "sig", "content-type": "application/octet-stream"}
            signed["x-forwarded-for"] = "203.0.113.7"  # a proxy before the standby said so
            r = httpx.post(f"{standby_url}/v1/rounds/3/submissions?x=1", content=b"payload", headers=signed)
            assert r.status_code == 201
            seen = r.json()
            assert (seen["method"], seen["path"], seen["query"], seen["body"]) == (
                "POST",
                "/v1/rounds/3/submissions",
                "x=1",
                "payload",
            )
            assert seen["headers"]["x-gradpool-signature"] == "sig"
            assert seen["headers"]["content-length"] == "7"
            assert seen["headers"]["x-forwarded-for"] == "203.0.113.7, 127.0.0.1"
            assert seen["headers"]["host"] == leader_url.removeprefix("http://")
            assert (r.headers["x-gradpool-replica"], r.headers["x-gradpool-leader"]) == ("b", "a")
            assert r.headers["x-from"] == "leader"
            assert len(r.headers.get_list("date")) == len(r.headers.get_list("server")) == 1

            got = httpx.get(f"{standby_url}/v1/round")  # no body: none is sent on
            assert got.json()["method"] == "GET" and "content-length" not in got.json()["headers"]

            redirect = httpx.get(f"{standby_url}/moved")  # a download's redirect stays one
            assert redirect.status_code == 307
            assert redirect.headers["location"] == "http://bucket.example/object"


def test_no_live_leader_is_a_503_that_sends_nodes_elsewhere(store: SqlStore, tmp_path: Path) -> None:
    with serving(standby_app(LeaderDirectory(store), "b")) as standby_url:
        r = httpx.get(f"{standby_url}/v1/round")  # nobody has led yet
        assert r.status_code == 503 and r.json()["error"]["code"] == "no_leader"
        assert r.headers["retry-after"] == "1" and r.headers["x-gradpool-replica"] == "b"

    with serving(LEADER) as leader_url:  # the lease ran out: its holder is not the leader any more
        lead(store, "a", leader_url, lease_s=-1.0)
        with serving(standby_app(LeaderDirectory(store), "b")) as standby_url:
            assert httpx.get(f"{standby_url}/v1/round").status_code == 503

    lead(store, "a", "http://127.0.0.1:9")  # a live lease, but nothing listens where it said
    with serving(standby_app(LeaderDirectory(store), "b")) as standby_url:
        r = httpx.get(f"{standby_url}/v1/round")
        assert r.status_code == 503 and "the leader (a) did not answer" in r.json()["error"]["message"]

    lead(store, "c", "http://127.0.0.1:9")
    store.set_meta("leader", json.dumps({"holder": "a", "url": "http://127.0.0.1:9"}))  # said by the old one
    assert LeaderDirectory(store).leader() is None
