"""Test harness for the coordinator API: a running app, signing miners, real and broken payloads."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import httpx
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi.testclient import TestClient
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from benchmarks.close import honest_delta
from coordinator.api.app import create_app
from coordinator.settings import CoordinatorSettings
from protocol.codec import PAYLOAD_FORMAT_VERSION, PayloadHeader, PayloadStats, SparseLoCoCodec
from protocol.data import assignment
from protocol.model import build_model
from protocol.params import Params, load_checkpoint, param_spec
from protocol.signing import generate_key, public_key_hex, sign_request

SPEC = param_spec(build_model("tiny"))
ERROR_FIELDS = {"code", "message"}


def submit_path(round_: int) -> str:
    return f"/v1/rounds/{round_}/submissions"


def assert_error(response: httpx.Response, status: int, code: str) -> None:
    """The response is ``status`` with the one error body shape and this machine-readable code."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == ERROR_FIELDS, body
    assert body["error"]["code"] == code, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"], body


# -- payloads ---------------------------------------------------------------------------------------------
def make_delta(seed: int, scale: float = 1e-3) -> Params:
    """A pseudo-gradient-like delta over the tiny model: small Gaussian noise, reproducible by seed."""
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=g) * scale for name, shape in SPEC}


def encode(
    delta: Mapping[str, torch.Tensor],
    round_: int,
    base_version: int,
    *,
    codec: SparseLoCoCodec | None = None,
    compute_s: float = 0.0,
) -> tuple[bytes, Params]:
    """A SparseLoCo payload and the dense update a receiver decodes from it."""
    codec = codec or SparseLoCoCodec()
    header = PayloadHeader(
        format_version=PAYLOAD_FORMAT_VERSION,
        codec="sparseloco",
        round=round_,
        base_version=base_version,
        stats=PayloadStats(compute_s=compute_s),
    )
    body, _ = codec.encode(delta, SPEC, header)
    _, sparse = codec.decode(body, SPEC)
    return body, {name: sparse[name].to_dense(shape) for name, shape in SPEC}


def payload(round_: int, base_version: int, seed: int = 0, scale: float = 1e-3) -> bytes:
    return encode(make_delta(seed, scale), round_, base_version)[0]


def reframe(
    body: bytes,
    *,
    header: Mapping[str, Any] | None = None,
    tensors: Mapping[str, torch.Tensor | None] | None = None,
    raw_header: str | None = None,
) -> bytes:
    """The payload rebuilt with header fields replaced and tensors replaced, added or (None) dropped."""
    parts = dict(st_load(body))
    for name, t in (tensors or {}).items():
        if t is None:
            parts.pop(name, None)
        else:
            parts[name] = t
    meta = PayloadHeader.model_validate_json(_metadata(body)["gradpool"]).model_dump(mode="json")
    meta.update(header or {})
    text = raw_header if raw_header is not None else json.dumps(meta)
    return st_save({n: t.contiguous() for n, t in parts.items()}, metadata={"gradpool": text})


def _metadata(body: bytes) -> dict[str, str]:
    n = int.from_bytes(body[:8], "little")
    meta: dict[str, str] = json.loads(body[8 : 8 + n])["__metadata__"]
    return meta


def trained_delta(pool: Pool, pubkey: str, round_: int, version: int) -> dict[str, torch.Tensor]:
    """What an honest miner sends: base - parameters after AdamW steps on its assigned sequences."""
    info = pool.client.get("/v1/info").json()
    r = info["recipe"]
    ids = assignment(
        info["seed"],
        round_,
        pubkey,
        r["inner_steps"] * r["batch_size"],
        info["num_sequences"],
        info["eval_every"],
    )
    tokens = st_load(pool.client.get("/v1/data", params={"ids": ",".join(map(str, ids))}).content)["tokens"]
    return honest_delta(build_model("tiny"), pool.checkpoint(version), tokens, r["lr"], r["batch_size"])


def scaled_table(body: bytes, factor: float) -> bytes:
    """The payload with its value tables multiplied by ``factor``: well formed, and finite for any finite
    factor, so intake takes it."""
    return reframe(body, tensors={"lut": (st_load(body)["lut"].double() * factor).float()})


# -- a miner and the pool ---------------------------------------------------------------------------------
class Miner:
    """One identity that signs its requests like node.client does."""

    def __init__(self, client: TestClient, key: Ed25519PrivateKey | None = None) -> None:
        self.client = client
        self.key = key or generate_key()
        self.pubkey = public_key_hex(self.key)

    def signed(self, path: str, body: bytes = b"", now: float | None = None) -> dict[str, str]:
        return sign_request(self.key, "POST", path, body, now=now)

    def post(self, path: str, body: bytes = b"", *, now: float | None = None) -> httpx.Response:
        response: httpx.Response = self.client.post(path, content=body, headers=self.signed(path, body, now))
        return response

    def register(self) -> httpx.Response:
        return self.post("/v1/miners")

    def upload(self, round_: int, body: bytes, *, now: float | None = None) -> httpx.Response:
        return self.post(submit_path(round_), body, now=now)


class Pool:
    """A running coordinator app and what the tests need to drive and inspect it."""

    def __init__(self, client: TestClient, settings: CoordinatorSettings) -> None:
        self.client = client
        self.settings = settings

    def miner(self, register: bool = True) -> Miner:
        m = Miner(self.client)
        if register:
            r = m.register()
            assert r.status_code == 200, r.text
        return m

    def round(self) -> dict[str, Any]:
        r = self.client.get("/v1/round")
        assert r.status_code == 200, r.text
        info: dict[str, Any] = r.json()
        return info

    def wait_for_round(self, after: int, timeout_s: float = 30.0) -> dict[str, Any]:
        """Long-poll /v1/round until round ``after`` has closed and a later one is open (closing runs in
        the background; with overlapped rounds the next one opens before this one has closed)."""
        end = time.monotonic() + timeout_s
        while True:
            r = self.client.get("/v1/round", params={"after": after, "wait_s": 0.5})
            assert r.status_code == 200, r.text
            info: dict[str, Any] = r.json()
            if info["round"] > after and self.client.get(f"/v1/rounds/{after}").json()["status"] == "closed":
                return self.round()
            assert time.monotonic() < end, f"round {after} did not close within {timeout_s} s: {info}"
            if info["round"] > after:
                time.sleep(0.05)

    def checkpoint(self, version: int) -> Params:
        r = self.client.get("/v1/checkpoint", params={"version": version})
        assert r.status_code == 200, r.text
        params, _ = load_checkpoint(r.content, SPEC)
        return params

    def submissions(self) -> dict[tuple[int, str], tuple[str, str | None]]:
        """(round, miner) -> (status, reason), read straight from the state database."""
        uri = f"file:{self.settings.state_dir / 'state.db'}?mode=ro"
        with contextlib.closing(sqlite3.connect(uri, uri=True)) as db:
            rows = db.execute("SELECT round, miner, status, reason FROM submissions").fetchall()
        return {(r, m): (s, reason) for r, m, s, reason in rows}


OpenPool = Callable[..., contextlib.AbstractContextManager[Pool]]


class ThroughTestClient(httpx.BaseTransport):
    """An httpx transport that answers through a test client, so that the node's own client (httpx) can
    talk to an app under test whatever HTTP library the test client is built on."""

    def __init__(self, client: TestClient) -> None:
        self.client = client

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        r = self.client.request(
            request.method, str(request.url), headers=dict(request.headers), content=request.read()
        )
        return httpx.Response(r.status_code, headers=dict(r.headers), content=r.content, request=request)


def node_client(pool: Pool, key: Ed25519PrivateKey | None = None) -> Any:
    """A node.client.CoordinatorClient talking to the pool's app."""
    from node.client import CoordinatorClient

    return CoordinatorClient(
        "http://testserver", key or generate_key(), transport=ThroughTestClient(pool.client)
    )


@contextlib.contextmanager
def running(
    settings: CoordinatorSettings, raise_server_exceptions: bool = True, **app_args: Any
) -> Iterator[Pool]:
    app = create_app(settings, **app_args)
    with TestClient(app, raise_server_exceptions=raise_server_exceptions) as client:
        yield Pool(client, settings)
