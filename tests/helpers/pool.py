"""The coordinator API driven in-process (a TestClient over the app, its closer thread running): signing
miners, real and broken payloads, and what the tests read back (rounds, versions, submissions, scores)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import sqlite3
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
from tests.helpers.memo import memoised
from tests.helpers.waiting import wait_until

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
    data = pool.client.get("/v1/data", params={"ids": ",".join(map(str, ids))}).content
    lr, batch_size = r["lr"], r["batch_size"]
    base = pool.client.get(f"/v1/versions/{version}").json()["param_hash"]  # its checkpoint's params_hash
    return memoised(
        "delta",
        (base, hashlib.sha256(data).hexdigest(), lr, batch_size),
        lambda: honest_delta(
            build_model("tiny"), pool.checkpoint(version), st_load(data)["tokens"], lr, batch_size
        ),
    )


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

    def wait_for_round(self, after: int, timeout_s: float = 90.0) -> dict[str, Any]:
        """/v1/round once round ``after`` has closed and a later one is open (closing runs in the background;
        with overlapped rounds the next one opens before this one has closed). Long-polls, so that it wakes
        as the round moves. The timeout only ends a wait that went wrong: a close evaluates every upload on
        this machine's CPU, which a loaded machine may take tens of seconds over."""

        def closed() -> bool:
            r = self.client.get("/v1/round", params={"after": after, "wait_s": 0.5})
            assert r.status_code == 200, r.text
            return bool(r.json()["round"] > after and self.record(after)["status"] == "closed")

        wait_until(closed, timeout_s, f"round {after} to close")
        return self.round()

    def latest(self) -> dict[str, Any]:
        """The newest published version's number and hash (``version``, ``param_hash``), whatever the mode:
        with overlapped rounds the open round is for the version before the newest one (/v1/round's
        ``newest``) until the round it trains for opens."""
        info = self.round()
        if info["newest"] is None:
            return {"version": info["version"], "param_hash": info["param_hash"]}
        return {"version": info["newest"], "param_hash": info["newest_hash"]}

    def latest_after(self, round_: int, timeout_s: float = 90.0) -> dict[str, Any]:
        """``latest()`` once round ``round_`` has closed."""
        self.wait_for_round(round_, timeout_s)
        return self.latest()

    def wait_scored(self, round_: int, timeout_s: float = 60.0) -> dict[str, dict[str, Any]]:
        """The round's uploads by miner once its evaluation has ended: with overlapped rounds it may follow
        the round's version (a miner with a record is judged after it)."""

        def scored() -> bool:
            uri = f"file:{self.settings.state_dir / 'state.db'}?mode=ro"
            with contextlib.closing(sqlite3.connect(uri, uri=True)) as db:
                row = db.execute(
                    "SELECT scored FROM rounds WHERE round = ? AND status = 'closed'", (round_,)
                ).fetchone()
            return row is not None and row[0] == 1

        wait_until(scored, timeout_s, f"round {round_} to be evaluated")
        return {s["miner"]: s for s in self.record(round_)["submissions"]}

    def record(self, round_: int) -> dict[str, Any]:
        """/v1/rounds/{round_}: the round's base version, status and uploads with their verdicts."""
        r = self.client.get(f"/v1/rounds/{round_}")
        assert r.status_code == 200, r.text
        out: dict[str, Any] = r.json()
        return out

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


# -- evaluated uploads ------------------------------------------------------------------------------------
# Enough training per update that its effect on its own sequences stands clear of the evaluation's noise,
# and an evaluation of 16 + 16 sequences: far fewer than the defaults (48 + 48), for speed; nor are the
# first rounds' samples doubled (early_factor), which these tests, all in the first rounds, do not need.
RECIPE = {"inner_steps": 4, "batch_size": 4, "warmup_steps": 0, "lr": 3e-3}
EVAL = {"builtin": True, "own_sequences": 16, "other_sequences": 16, "early_factor": 1}


def fixed_miner(pool: Pool, i: int) -> Miner:
    """A registered miner with a fixed key: its assignments, and so the whole test, are reproducible."""
    m = Miner(pool.client, Ed25519PrivateKey.from_private_bytes(bytes([i + 1]) * 32))
    assert m.register().status_code == 200
    return m


def leaderboard(pool: Pool, **params: Any) -> dict[str, dict[str, Any]]:
    r = pool.client.get("/v1/leaderboard", params=params)
    assert r.status_code == 200, r.text
    return {e["miner"]: e for e in r.json()["miners"]}


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
