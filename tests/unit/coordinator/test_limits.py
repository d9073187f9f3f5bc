"""Bounded input: numbers in paths and queries, request lines, payload headers, bodies that stop arriving.
Each gets the documented error body, never a 500 or a plain-text answer, and changes nothing. And the one
limit the other way: an idle connection is its client's to close."""

from __future__ import annotations

import http.client
import json
import socket
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import safetensors.torch as st
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from protocol.codec import SparseLoCoCodec
from protocol.errors import CodecError
from protocol.payload import MAX_HEADER_BYTES, unframe
from protocol.signing import sign_request
from tests.helpers.pool import SPEC, OpenPool, assert_error, payload, submit_path

HUGE = [2**63, -(2**64)]
GETS = [
    "/v1/rounds/{n}",
    "/v1/rounds/{n}/audit",
    "/v1/rounds/{n}/payloads/" + "ab" * 32,
    "/v1/versions/{n}",
    "/v1/versions/{n}/update",
    "/v1/checkpoint?version={n}",
    "/v1/leaderboard?round={n}",
    "/v1/round?after={n}",
    "/v1/reports?after={n}",
]


@pytest.mark.parametrize("n", HUGE, ids=["2**63", "-2**64"])
def test_numbers_past_64_bits_are_refused_with_the_error_body(open_pool: OpenPool, n: int) -> None:
    with open_pool() as pool:
        m = pool.miner()
        before = pool.round()
        for path in GETS:
            assert_error(pool.client.get(path.format(n=n)), 422, "invalid_request")
        assert_error(m.post(f"/v1/rounds/{n}/verdicts", b'{"verdicts": []}'), 422, "invalid_request")
        assert_error(m.upload(n, payload(0, 0)), 422, "invalid_request")
        assert pool.round() == before


def test_a_payload_padded_with_header_metadata_is_refused_before_it_is_stored(open_pool: OpenPool) -> None:
    good = payload(0, 0)
    cap = SparseLoCoCodec().max_payload_bytes(SPEC)
    assert len(good) < cap < len(good) + MAX_HEADER_BYTES + 64
    with open_pool(validation={"builtin": False}, rounds={"min_quorum": 100}) as pool:
        miner = pool.miner()
        for pad in (50 * 2**20, MAX_HEADER_BYTES):
            padded = _pad_metadata(good, pad)
            assert len(padded) > cap
            assert_error(miner.upload(0, padded), 413, "payload_too_large")
        assert pool.submissions() == {}
        assert miner.upload(0, good).status_code == 200  # the honest one still fits


def test_a_header_over_its_cap_does_not_parse() -> None:
    padded = _pad_metadata(payload(0, 0), MAX_HEADER_BYTES)
    with pytest.raises(CodecError) as refused:
        unframe(padded, {"idx": torch.uint8})
    assert refused.value.code == "bad_header"


def _pad_metadata(body: bytes, extra: int) -> bytes:
    """The payload with an extra safetensors metadata entry of ``extra`` bytes."""
    n = int.from_bytes(body[:8], "little")
    meta = json.loads(body[8 : 8 + n])["__metadata__"]
    return st.save(st.load(body), metadata={**meta, "padding": "x" * extra})


# -- the server's own limits (a real uvicorn server: the HTTP parser is part of what is tested) -------------
def _raw(url: str, data: bytes, timeout_s: float = 30.0) -> tuple[int, dict[str, Any], bytes]:
    """Send raw bytes; the status, headers and body of the answer, read until the server closes."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout_s) as s:
        s.sendall(data)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


def test_a_request_line_over_the_limit_gets_the_error_body(live_coordinator: Callable[..., Any]) -> None:
    with live_coordinator() as server:
        status, headers, body = _raw(server.url, b"GET /v1/info?x=" + b"a" * 100_000 + b" HTTP/1.1\r\n\r\n")
        assert status == 400 and headers["content-type"] == "application/json"
        assert json.loads(body)["error"]["code"] == "bad_http_request"
        status, _, body = _raw(server.url, b"NOT HTTP AT ALL\r\n\r\n")
        assert status == 400 and json.loads(body)["error"]["code"] == "bad_http_request"


def test_an_idle_connection_is_left_for_its_client_to_close(live_coordinator: Callable[..., Any]) -> None:
    """A client lets an idle connection go after its own expiry (httpx's: 5 s); the server keeps it longer,
    so that a request is never sent on a connection the server is closing just then."""
    with live_coordinator() as server:
        host, port = server.url.removeprefix("http://").split(":")
        connection = http.client.HTTPConnection(host, int(port), timeout=10)
        try:
            connection.request("GET", "/v1/info")
            assert connection.getresponse().read()
            opened = connection.sock
            time.sleep(6)  # past httpx's expiry (and uvicorn's own default)
            connection.request("GET", "/v1/info")  # on the same connection: closed, it would fail
            answer = connection.getresponse()
            assert answer.status == 200 and answer.read() and connection.sock is opened
        finally:
            connection.close()


def test_a_body_that_stops_arriving_is_cut_off(live_coordinator: Callable[..., Any]) -> None:
    key = Ed25519PrivateKey.generate()
    with live_coordinator(read_timeout_s=1.0) as server:
        body = payload(0, 0)
        signed = sign_request(key, "POST", submit_path(0), body)
        head = f"POST {submit_path(0)} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in signed.items()) + "\r\n"
        # Only the signed headers and a part of the body: the signer is unknown, so that is refused
        # before the body is read at all.
        status, headers, answer = _raw(server.url, head.encode() + body[:1000], timeout_s=20)
        assert status == 403 and json.loads(answer)["error"]["code"] == "unknown_miner"
        assert headers["connection"] == "close"  # the rest of the body unread: the connection closes
        registration = sign_request(key, "POST", "/v1/miners", b"")
        assert httpx.post(f"{server.url}/v1/miners", headers=registration).status_code == 200
        signed = sign_request(key, "POST", submit_path(0), body)
        head = f"POST {submit_path(0)} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in signed.items()) + "\r\n"
        status, headers, answer = _raw(server.url, head.encode() + body[:1000], timeout_s=20)
        assert status == 408 and json.loads(answer)["error"]["code"] == "body_timeout"
        assert headers["connection"] == "close"
        info = httpx.get(f"{server.url}/v1/round").json()
        assert info["submissions"] == 0
