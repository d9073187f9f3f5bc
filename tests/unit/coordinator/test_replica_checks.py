"""Commits checked by the replica they reach (coordinator/rounds/direct.py): a standby reads and examines
the payload a commit names and writes what it found in the store; the leader records the upload from it
without reading the payload, under the same round rules. What the standby cannot check it passes on as it
came, and the leader refuses it as before. A real leader (uvicorn on 127.0.0.1), the standby's real app in
front of it, a real PostgreSQL and a real S3-compatible server."""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from coordinator.api.batches import (
    BATCH_PATH,
    MAX_COMMITS,
    BatchAnswers,
    CommitAnswer,
    CommitBatch,
    CommitBatcher,
    PassedCommit,
    passed,
)
from coordinator.api.standby import LeaderDirectory, advertise, standby_app
from coordinator.rounds.direct import ReplicaIntake
from coordinator.settings import CoordinatorSettings
from coordinator.storage.records import Checked
from coordinator.storage.store import SqlStore, open_store
from protocol.codec import SparseLoCoCodec
from protocol.model import resolve
from protocol.params import model_spec
from protocol.signing import generate_key, public_key_hex, sign_request
from protocol.wire import (
    HEADER_CHECKED,
    HEADER_PROTOCOL,
    HEADER_REPLICA,
    UploadCommit,
    UploadIntent,
    UploadTicket,
)
from tests.helpers.pool import assert_error, payload
from tests.helpers.served import serving


class Signer:
    """A miner that signs its requests, sent to one URL."""

    def __init__(self, url: str, key: Ed25519PrivateKey | None = None) -> None:
        self.key = key or generate_key()
        self.pubkey = public_key_hex(self.key)
        self.client = httpx.Client(base_url=url, timeout=30)

    def post(self, path: str, body: bytes = b"", claim: bool = False) -> httpx.Response:
        """``claim``: say, as a standby would, that the commit was checked."""
        headers = sign_request(self.key, "POST", path, body) | ({HEADER_CHECKED: "1"} if claim else {})
        return self.client.post(path, content=body, headers=headers)

    def form(self, body: bytes, round_: int = 0) -> httpx.Response:
        intent = UploadIntent(sha256=hashlib.sha256(body).hexdigest(), bytes=len(body))
        return self.post(f"/v1/rounds/{round_}/uploads", intent.model_dump_json().encode())

    def upload(self, body: bytes, posted: bytes | None = None, claim: bool = False) -> httpx.Response:
        """A form for ``body``, ``posted`` (``body`` by default) put into the bucket with it, the commit."""
        sha = hashlib.sha256(body).hexdigest()
        ticket = UploadTicket.model_validate_json(self.form(body).content)
        files = {"file": ("payload", body if posted is None else posted)}
        assert httpx.post(ticket.url, data=ticket.fields, files=files, timeout=30).status_code < 300
        return self.post("/v1/rounds/0/commits", UploadCommit(sha256=sha).model_dump_json().encode(), claim)


def metric(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"no {name} in {url}/metrics")


@pytest.fixture
def cluster(
    make_settings: Callable[..., CoordinatorSettings],
    live_coordinator: Callable[..., Any],
    postgres_url: str,
    s3_bucket: dict[str, Any],
) -> Iterator[tuple[Any, str, SqlStore, ReplicaIntake]]:
    """The leader (a live coordinator), a standby that checks commits in front of it, and the standby's
    own store."""
    overrides: dict[str, Any] = {
        "store": {"url": postgres_url},
        "blobs": {**s3_bucket, "direct_uploads": True},
        "rounds": {"min_quorum": 3, "overlap": False},
    }
    settings = make_settings(**overrides)
    with live_coordinator(**overrides) as leader:
        store = open_store(settings.state_dir, postgres_url)
        advertise(store, store.lease_holder().holder, leader.url)
        intake = ReplicaIntake.of(settings, store)
        try:
            with serving(standby_app(LeaderDirectory(store), "b", intake=intake)) as standby:
                yield leader, standby, store, intake
        finally:
            store.close()


def test_a_commit_reaching_a_standby_is_checked_there_and_only_recorded_by_the_leader(
    cluster: tuple[Any, str, SqlStore, ReplicaIntake],
) -> None:
    leader, standby, store, intake = cluster
    alice, bob, carol = Signer(standby), Signer(standby), Signer(leader.url)
    for m in (alice, bob, carol):
        assert m.post("/v1/miners").status_code == 200
    body = payload(round_=0, base_version=0, seed=1)
    sha = hashlib.sha256(body).hexdigest()
    receipt = alice.upload(body)
    assert receipt.status_code == 200, receipt.text
    assert receipt.json()["payload_sha256"] == sha and receipt.json()["bytes"] == len(body)
    found = store.checked(0, alice.pubkey, sha, intake.checker)
    assert found is not None  # what the standby found, as the leader would have found it
    codec = SparseLoCoCodec()
    seen = codec.examine(body, model_spec(resolve("tiny", 256)))
    assert found == Checked.of(seen, body, sha, None)
    assert metric(leader.url, "gradpool_replica_checked_uploads_total") == 1
    again = alice.post("/v1/rounds/0/commits", UploadCommit(sha256=sha).model_dump_json().encode())
    assert again.status_code == 200 and again.json()["duplicate"] is True

    # what the standby cannot check reaches the leader as it came, and is refused there as before
    other = payload(round_=0, base_version=0, seed=2)
    assert_error(bob.upload(other, posted=other[:-1] + b"x"), 422, "digest_mismatch")
    garbage = b"not a payload" * 100
    refused = bob.upload(garbage)
    assert refused.status_code == 422 and refused.json()["error"]["code"] != "digest_mismatch"
    assert store.checked(0, bob.pubkey, hashlib.sha256(garbage).hexdigest(), intake.checker) is None
    assert metric(leader.url, "gradpool_replica_checked_uploads_total") == 1

    # a check made with another codec, model or size limit is not the leader's: it reads the payload
    store.add_checked(0, bob.pubkey, sha_other := hashlib.sha256(other).hexdigest(), "another check", found)
    assert bob.upload(other).status_code == 200
    # nor is a client's word that its commit was checked, where no standby checked it
    third = payload(round_=0, base_version=0, seed=3)
    third_sha = hashlib.sha256(third).hexdigest()
    assert carol.upload(third, claim=True).status_code == 200
    assert metric(leader.url, "gradpool_replica_checked_uploads_total") == 1
    assert store.checked(0, bob.pubkey, sha_other, intake.checker) is None

    # recorded as the leader records any upload, and judged with the round's others
    kept = store.upload(0, alice.pubkey)
    assert kept is not None and (kept.sha256, kept.size, kept.norm) == (sha, len(body), seen.norm)
    assert torch.equal(kept.sketch, seen.sketch) and kept.stored_sha256 is None
    leader.wait_rounds(1)
    record = httpx.get(f"{leader.url}/v1/rounds/0", timeout=10).json()
    judged = {s["miner"]: s for s in record["submissions"]}
    assert set(judged) == {alice.pubkey, bob.pubkey, carol.pubkey}
    assert all(s["evaluated"] and s["status"] in ("accepted", "rejected") for s in judged.values())
    assert judged[carol.pubkey]["sha256"] == third_sha
    assert httpx.get(f"{leader.url}/v1/rounds/0/payloads/{alice.pubkey}", timeout=10).content == body
    assert store.checked(0, alice.pubkey, sha, intake.checker) is None  # forgotten once the round closed


def test_a_standby_gives_the_forms_of_direct_uploads_itself(
    cluster: tuple[Any, str, SqlStore, ReplicaIntake], tmp_path: Path
) -> None:
    leader, standby, _, intake = cluster
    alice = Signer(standby)
    assert alice.post("/v1/miners").status_code == 200
    body = payload(round_=0, base_version=0, seed=1)
    # a standby that knows no leader (its directory reads another store) still gives forms
    nobody = open_store(tmp_path / "nobody")
    try:
        with serving(standby_app(LeaderDirectory(nobody), "c", intake=intake)) as cut_off:
            alone = Signer(cut_off, alice.key)
            given = alone.form(body)
            assert given.status_code == 200, given.text
            assert given.headers[HEADER_REPLICA] == "c" and given.headers[HEADER_PROTOCOL]
            ticket = UploadTicket.model_validate_json(given.content)
            assert alice.pubkey in ticket.fields["key"] and ticket.max_bytes == intake.max_bytes
            # what it cannot give as the leader would goes on to the leader (here: none to go to)
            assert_error(alone.form(body, round_=5), 503, "no_leader")  # not the open round
            assert_error(Signer(cut_off).form(body), 503, "no_leader")  # not a registered key
            assert_error(alone.form(body[:10] * 10**6), 503, "no_leader")  # larger than a payload may be
            assert_error(alone.post("/v1/miners"), 503, "no_leader")  # anything else
    finally:
        nobody.close()
    # the form works as the leader's would: the payload posted with it, committed through the standby
    files = {"file": ("payload", body)}
    assert httpx.post(ticket.url, data=ticket.fields, files=files, timeout=30).status_code < 300
    sha = hashlib.sha256(body).hexdigest()
    receipt = alice.post("/v1/rounds/0/commits", UploadCommit(sha256=sha).model_dump_json().encode())
    assert receipt.status_code == 200 and receipt.json()["payload_sha256"] == sha
    # the nonce of a form given by a standby is spent, as the leader's would be
    intent = UploadIntent(sha256=sha, bytes=len(body)).model_dump_json().encode()
    signed = sign_request(alice.key, "POST", "/v1/rounds/0/uploads", intent)
    given = httpx.post(f"{standby}/v1/rounds/0/uploads", content=intent, headers=signed, timeout=30)
    assert given.status_code == 200 and given.headers[HEADER_REPLICA] == "b"
    again = httpx.post(f"{leader.url}/v1/rounds/0/uploads", content=intent, headers=signed, timeout=30)
    assert_error(again, 401, "replayed_nonce")


def test_a_body_that_stalls_at_a_standby_is_cut_off(
    cluster: tuple[Any, str, SqlStore, ReplicaIntake],
) -> None:
    _, _, store, intake = cluster
    with serving(standby_app(LeaderDirectory(store), "c", intake=intake, body_timeout_s=0.5)) as url:
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            sock.sendall(b"POST /v1/rounds/0/commits HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
            parts = []  # nothing more is sent; the answer, until the standby closes the connection
            while chunk := sock.recv(65536):
                parts.append(chunk)
        answer = b"".join(parts).decode()
        assert answer.startswith("HTTP/1.1 408") and '"code":"body_timeout"' in answer
        assert "x-gradpool-replica: c" in answer.lower()


def post_batch(url: str, commits: list[PassedCommit]) -> list[CommitAnswer]:
    answer = httpx.post(url + BATCH_PATH, content=CommitBatch(commits=commits).model_dump_json(), timeout=30)
    assert answer.status_code == 200, answer.text
    return BatchAnswers.model_validate_json(answer.content).answers


def signed_commit(signer: Signer, body: bytes, path: str = "/v1/rounds/0/commits") -> PassedCommit:
    """The commit of ``body``'s payload, signed by ``signer``, as a standby passes it on."""
    commit = UploadCommit(sha256=hashlib.sha256(body).hexdigest()).model_dump_json().encode()
    return passed(path, sign_request(signer.key, "POST", path, commit), commit)


def put_payload(signer: Signer, body: bytes) -> None:
    """``body`` into the bucket with a form from ``signer``'s URL."""
    ticket = UploadTicket.model_validate_json(signer.form(body).content)
    assert (
        httpx.post(ticket.url, data=ticket.fields, files={"file": ("p", body)}, timeout=30).status_code < 300
    )


def test_the_leader_takes_a_batch_of_commits_each_as_if_it_had_come_alone(
    cluster: tuple[Any, str, SqlStore, ReplicaIntake],
) -> None:
    leader = cluster[0]
    alice, stranger = Signer(leader.url), Signer(leader.url)
    assert alice.post("/v1/miners").status_code == 200
    body = payload(round_=0, base_version=0, seed=1)
    put_payload(alice, body)
    first = signed_commit(alice, body)
    forged = first.model_copy(update={"body": UploadCommit(sha256="0" * 64).model_dump_json()})
    batch = [
        first,
        first,  # its nonce again
        signed_commit(alice, body),  # the same commit again
        signed_commit(stranger, body),
        forged,
        signed_commit(alice, body, "/v1/rounds/0/uploads"),
        signed_commit(alice, body, "/v1/rounds/5/commits"),
        signed_commit(alice, body, f"/v1/rounds/{2**53}/commits"),
    ]
    answers = post_batch(leader.url, batch)
    assert [a.status for a in answers] == [200, 401, 200, 403, 401, 404, 409, 422]
    receipts = [json.loads(a.body) for a in answers if a.status == 200]
    first_sha = sha_of(body)
    assert [(r["payload_sha256"], r["duplicate"]) for r in receipts] == [
        (first_sha, False),
        (first_sha, True),
    ]
    codes = [json.loads(a.body)["error"]["code"] for a in answers if a.status != 200]
    assert codes == [
        *(
            "replayed_nonce",
            "unknown_miner",
            "bad_signature",
            "not_found",
            "round_not_open",
            "invalid_request",
        )
    ]
    # as if each had come alone: its nonce is spent, its refusal counted
    alone = httpx.post(
        f"{leader.url}/v1/rounds/0/commits", content=first.body, headers=first.headers, timeout=30
    )
    assert_error(alone, 401, "replayed_nonce")
    assert metric(leader.url, 'gradpool_refusals_total{code="unknown_miner"}') == 1
    assert metric(leader.url, "gradpool_passed_commits_total") == len(batch)
    assert store_upload_sha(cluster[2], alice.pubkey) == first_sha
    # a batch that is not one is refused whole
    too_many = CommitBatch.model_construct(commits=[first] * (MAX_COMMITS + 1)).model_dump_json()
    assert_error(httpx.post(leader.url + BATCH_PATH, content=too_many, timeout=30), 422, "invalid_request")
    assert_error(httpx.post(leader.url + BATCH_PATH, content=b"[", timeout=30), 422, "invalid_request")


def sha_of(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def store_upload_sha(store: SqlStore, miner: str) -> str | None:
    kept = store.upload(0, miner)
    return None if kept is None else kept.sha256


def test_commits_checked_while_a_batch_is_on_its_way_go_on_together(
    cluster: tuple[Any, str, SqlStore, ReplicaIntake],
) -> None:
    leader, _, store, intake = cluster
    miners = [Signer(leader.url) for _ in range(6)]
    bodies = [payload(round_=0, base_version=0, seed=i) for i in range(1, 7)]
    commits = []
    for m, body in zip(miners, bodies, strict=True):
        assert m.post("/v1/miners").status_code == 200
        put_payload(m, body)
        commits.append(c := signed_commit(m, body))
        assert intake.check(c.headers, c.path, c.body.encode(), 0)  # as the standby checks it
    sizes = []

    async def send(batch: list[PassedCommit]) -> list[CommitAnswer]:
        sizes.append(len(batch))
        return await asyncio.to_thread(post_batch, leader.url, batch)

    async def all_at_once() -> list[CommitAnswer | None]:
        batcher = CommitBatcher(send)  # one batch on its way at a time
        return await asyncio.gather(*(batcher.pass_on(c) for c in commits))

    answers = asyncio.run(all_at_once())
    assert sizes == [1, 5]  # the first alone, the others, checked meanwhile, in the next
    assert [a.status if a else None for a in answers] == [200] * 6
    assert [json.loads(a.body)["payload_sha256"] for a in answers if a] == [sha_of(b) for b in bodies]
    assert metric(leader.url, "gradpool_passed_commit_batches_total") == 2
    assert metric(leader.url, "gradpool_replica_checked_uploads_total") == 6  # recorded from the checks
    assert [store_upload_sha(store, m.pubkey) for m in miners] == [sha_of(b) for b in bodies]


def test_a_miner_twice_in_one_batch_is_taken_once(cluster: tuple[Any, str, SqlStore, ReplicaIntake]) -> None:
    leader, _, store, intake = cluster
    dave = Signer(leader.url)
    assert dave.post("/v1/miners").status_code == 200
    one, other = payload(round_=0, base_version=0, seed=1), payload(round_=0, base_version=0, seed=2)
    batch = []
    for body in (one, one, other):
        put_payload(dave, body)
        batch.append(c := signed_commit(dave, body))
        assert intake.check(c.headers, c.path, c.body.encode(), 0)
    answers = post_batch(leader.url, batch)
    assert [a.status for a in answers] == [200, 200, 409]
    assert [json.loads(a.body).get("duplicate") for a in answers[:2]] == [False, True]
    assert json.loads(answers[2].body)["error"]["code"] == "already_submitted"
    assert store_upload_sha(store, dave.pubkey) == sha_of(one)
    assert metric(leader.url, "gradpool_replica_checked_uploads_total") == 1
    assert httpx.get(f"{leader.url}/v1/round", timeout=10).json()["submissions"] == 1


def test_a_batch_the_leader_does_not_answer_holds_the_next_back_only_a_moment(
    cluster: tuple[Any, str, SqlStore, ReplicaIntake],
) -> None:
    leader, _, _, _ = cluster
    miners = [Signer(leader.url) for _ in range(4)]
    commits = []
    for i, m in enumerate(miners):
        assert m.post("/v1/miners").status_code == 200
        put_payload(m, body := payload(round_=0, base_version=0, seed=i + 1))
        commits.append(signed_commit(m, body))
    order: list[int] = []

    async def run() -> list[CommitAnswer | None]:
        hung = asyncio.Event()  # a leader that takes the first batch and does not answer it

        async def send(batch: list[PassedCommit]) -> list[CommitAnswer]:
            first = not order
            order.append(len(batch))
            if first:
                await hung.wait()
            answers = await asyncio.to_thread(post_batch, leader.url, batch)
            if not first:
                hung.set()  # the first is answered only after the next one was
            return answers

        batcher = CommitBatcher(send, stall_s=0.2)
        return await asyncio.gather(*(batcher.pass_on(c) for c in commits))

    answers = asyncio.run(run())
    assert order == [1, 3] and [a.status if a else None for a in answers] == [200] * 4
