"""The compressed downlink: what a miner downloads per round is about one upload's size, it reaches the
coordinator's version bit for bit, the coordinator's error feedback survives a restart, is left out when it
would make a version worse than its base, and a broken update sends the miner to the checkpoint."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import httpx
import pytest
import torch

from coordinator.publishing.outer import OuterOptimizer
from coordinator.publishing.publisher import Downlink, Publisher, budget_k
from coordinator.settings import AggregationSettings, BlobSettings, PublishSettings
from coordinator.storage.blob_stores import make_blob_store
from coordinator.storage.records import Upload
from protocol.codec import SparseLoCoCodec
from protocol.params import Params, apply_update, decode_update, params_hash
from protocol.payload import framed_bytes
from tests.helpers.catcher import Catcher, four_versions, rounds
from tests.helpers.pool import SPEC, OpenPool, ThroughTestClient, encode, make_delta, payload

SPARSE = {"format": "sparseloco"}  # the default; the other API tests publish exactly


@pytest.mark.parametrize(("selection", "codec"), [("global", "sparseloco_counted"), ("chunk", "sparseloco")])
def test_a_miner_four_versions_behind_catches_up_through_four_compressed_updates(
    open_pool: OpenPool, tmp_path: Path, selection: str, codec: str
) -> None:
    """Either selection: a count per chunk (the default) or the same k in every chunk, in the same bytes."""
    with open_pool(publish={**SPARSE, "selection": selection}, rounds={"min_quorum": 3}) as pool:
        miners = [pool.miner() for _ in range(3)]
        rounds(pool, miners, 0, 1)
        behind = Catcher(pool, tmp_path)
        behind.catch_up(1, pool.latest()["param_hash"])
        rounds(pool, miners, 1, 5)
        upload = len(payload(0, 0))
        for v in range(2, 6):
            r = pool.client.get(f"/v1/versions/{v}/update")
            header, _ = decode_update(r.content, SPEC)
            assert (header.codec, header.base_version, header.version) == (codec, v - 1, v)
            assert len(r.content) <= 2.5 * upload, (len(r.content), upload)  # 3 miners' union, compressed
            assert r.headers["Cache-Control"] == "public, max-age=31536000, immutable"
        now = pool.latest()
        behind.catch_up(5, now["param_hash"])
        assert (behind.version, params_hash(behind.params, SPEC)) == (5, now["param_hash"])


def test_a_budget_publishes_the_largest_k_that_fits_it(open_pool: OpenPool, tmp_path: Path) -> None:
    """``[publish] budget``: k is the largest whose published tensors are at most that many uploads' (k + 4
    would not fit), every round's download is within the budget, and a miner still reaches each version bit
    for bit. A budget no k fits, or a budget for the exact format, is an error at start."""
    budget = 1.5
    with open_pool(publish={**SPARSE, "budget": budget}, rounds={"min_quorum": 2}) as pool:
        k = budget_k(budget, SparseLoCoCodec(), SPEC, 64, 2)
        tensors = {n: SparseLoCoCodec(n).max_payload_bytes(SPEC) - framed_bytes(0) for n in (64, k, k + 4)}
        assert tensors[k] <= budget * tensors[64] < tensors[k + 4]  # an upload: k 64
        miners = [pool.miner() for _ in range(2)]
        rounds(pool, miners, 0, 2)
        upload = len(payload(0, 0))
        for v in (1, 2):
            r = pool.client.get(f"/v1/versions/{v}/update")
            assert decode_update(r.content, SPEC)[0].k == k != PublishSettings().k
            assert len(r.content) <= budget * upload, (len(r.content), upload)
        follower = Catcher(pool, tmp_path)
        follower.catch_up(2, pool.latest()["param_hash"])
        assert follower.version == 2 and params_hash(follower.params, SPEC) == pool.latest()["param_hash"]
    for bad, says in [
        ({"budget": 0.05}, "below the smallest"),
        ({"format": "exact", "budget": 2}, "no budget"),
    ]:
        with pytest.raises(ValueError, match=says), open_pool(publish=bad, state_dir=tmp_path / "bad"):
            pass


def test_the_coordinators_error_feedback_survives_a_restart(open_pool: OpenPool, tmp_path: Path) -> None:
    """The same uploads make the same versions whether or not the coordinator restarts between rounds."""
    settings = {"publish": SPARSE, "rounds": {"min_quorum": 2}}
    restarted = four_versions(open_pool, tmp_path / "a", True, settings)
    assert restarted == four_versions(open_pool, tmp_path / "b", False, settings)


class Corrupting(httpx.BaseTransport):
    """Answers through the test client, with every published update's last bytes changed."""

    def __init__(self, inner: ThroughTestClient) -> None:
        self.inner = inner

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        r = self.inner.handle_request(request)
        if request.url.path.endswith("/update"):
            return httpx.Response(r.status_code, headers=r.headers, content=r.content[:-8] + b"\xff" * 8)
        return r


def test_a_broken_update_sends_the_miner_to_the_checkpoint(
    open_pool: OpenPool, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with open_pool(publish=SPARSE, rounds={"min_quorum": 1}) as pool:
        miner = pool.miner()
        rounds(pool, [miner], 0, 1)
        follower = Catcher(pool, tmp_path, Corrupting(ThroughTestClient(pool.client)))
        follower.catch_up(1, pool.latest()["param_hash"])
        rounds(pool, [miner], 1, 2)
        now = pool.latest()
        with caplog.at_level(logging.WARNING, logger="node.follower"):
            follower.catch_up(2, now["param_hash"])
    assert (follower.version, params_hash(follower.params, SPEC)) == (2, now["param_hash"])
    assert any("downloading checkpoint" in r.getMessage() for r in caplog.records)


def test_a_residual_that_would_raise_the_held_out_loss_is_dropped_not_the_upload(tmp_path: Path) -> None:
    """The downlink's error feedback is the coordinator's own: when carrying it would make the version worse
    than its base, the update is published without it, and the upload still counts."""
    codec = SparseLoCoCodec()
    body, decoded = encode(make_delta(1), 0, 0, codec=codec)
    upload = Upload("m" * 64, hashlib.sha256(body).hexdigest(), "c" * 64, 1.0, torch.zeros(1))
    base = {n: torch.zeros(shape) for n, shape in SPEC}

    def loss(params: Params) -> float:  # least when the model moves by exactly the uploaded update
        return sum(float(((base[n] - p - decoded[n]) ** 2).sum()) for n, p in params.items())

    def publisher(residual_scale: float) -> Publisher:
        downlink = Downlink(PublishSettings(), SparseLoCoCodec(), SPEC)
        g = torch.Generator().manual_seed(7)
        downlink.residual = {n: torch.randn(shape, generator=g) * residual_scale for n, shape in SPEC}
        blobs = make_blob_store(BlobSettings(), tmp_path / "blobs")
        return Publisher(codec, SPEC, blobs, OuterOptimizer(1.0), downlink, AggregationSettings(), loss, 0.05)

    def load(_: Upload) -> tuple[bytes, bytes]:
        return body, codec.examine(body, SPEC).stored

    before = loss(base)
    stale = publisher(residual_scale=0.1)  # far larger than the update: its top-k is the residual's
    carried = stale.build(base, 0, 1, [(upload, 1.0)], load)  # no previous loss: nothing to compare with
    assert carried.eval_loss > 2 * before
    built = stale.build(base, 0, 1, [(upload, 1.0)], load, previous_loss=before)
    assert built.eval_loss < before and stale.guard(built, before) is None
    norm = sum(float((r**2).sum()) for r in built.residual.values())
    assert norm < 0.5 * before  # the next residual is only what this update left out

    above = 10 * carried.eval_loss  # a worse residual build, still below its base's loss, is published
    assert stale.build(base, 0, 1, [(upload, 1.0)], load, previous_loss=above).eval_loss == carried.eval_loss

    small = publisher(residual_scale=1e-7)  # a residual that does not hurt is carried on
    kept = small.build(base, 0, 1, [(upload, 1.0)], load, previous_loss=before)
    assert kept.eval_loss < before
    delta = small.step([(upload, 1.0)], load)[0]
    carry, fresh = small.downlink.step(delta)[2], small.downlink.step(delta, carry=False)[2]
    assert all(torch.equal(r, carry[n]) for n, r in kept.residual.items())
    assert not all(torch.equal(r, fresh[n]) for n, r in kept.residual.items())


def test_a_count_per_chunk_spends_the_same_k_bytes_where_the_update_is() -> None:
    """Its bytes within the same-k format's, the largest values kept wherever they are (a chunk with none
    of them keeps none), and what it publishes plus what it keeps for later adds up to the update; with
    the room of a same-k format that keeps every value, it keeps nearly all."""
    spec = [("big", (128, 128)), ("small", (64, 64)), ("bias", (8,))]
    g = torch.Generator().manual_seed(0)
    delta = {n: torch.randn(s, generator=g) for n, s in spec}
    delta["small"] *= 1e-3  # nearly nothing there: the bytes go to "big"
    codec = SparseLoCoCodec()
    settings = PublishSettings(format="sparseloco", budget=2.0, ef_beta=1.0)
    same_k = Downlink(settings.model_copy(update={"selection": "chunk"}), codec, spec)
    sent, applied, residual = Downlink(settings, codec, spec).step(delta)
    assert 0 < len(sent) <= len(same_k.step(delta)[0])
    assert int((applied["small"] != 0).sum()) == 0 and int((applied["big"] != 0).sum()) > 4 * same_k.k
    assert int((same_k.step(delta)[1]["small"] != 0).sum()) == same_k.k  # the same k, deserved or not
    for n, _ in spec:
        assert torch.allclose(applied[n] + residual[n], delta[n], atol=1e-6)
    roomy = Downlink(PublishSettings(format="sparseloco", k=4096), codec, spec)  # every value
    _, applied, _ = roomy.step(delta)
    assert all(int((applied[n] != 0).sum()) >= 0.99 * delta[n].numel() for n in ("big", "small"))


def test_an_aggregate_that_moves_layers_further_than_any_upload_is_clipped_when_it_would_fail_the_guard(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Two uploads that selected different coordinates: their mean over the contributors that selected each
    coordinate moves every layer about 1.4 times further than either upload does. Where the loss says about
    the plain mean was right, that version would raise it past the guard, and the same aggregate with each
    layer clipped to the longest upload's is published instead; where the loss does not rise, or rises
    within ``max_loss_increase``, it is published as aggregated."""
    codec = SparseLoCoCodec()
    bodies, decoded = {}, []
    for seed in (1, 2):
        body, d = encode(make_delta(seed), 0, 0, codec=codec)
        bodies[hashlib.sha256(body).hexdigest()] = body
        decoded.append(d)
    miners = zip("mn", bodies, strict=True)
    uploads = [(Upload(c * 64, sha, "c" * 64, 1.0, torch.zeros(1)), 1.0) for c, sha in miners]
    base = {n: torch.zeros(shape) for n, shape in SPEC}
    target = {n: 0.8 * (decoded[0][n] + decoded[1][n]) / 2 for n, _ in SPEC}

    def loss(params: Params) -> float:  # least a little short of where the plain mean of the two moves it
        return sum(float(((base[n] - p - target[n]) ** 2).sum()) for n, p in params.items())

    def load(u: Upload) -> tuple[bytes, bytes]:
        return bodies[u.sha256], codec.examine(bodies[u.sha256], SPEC).stored

    blobs = make_blob_store(BlobSettings(), tmp_path / "blobs")
    downlink = Downlink(PublishSettings(format="exact"), codec, SPEC)
    outer = OuterOptimizer(1.0)
    publisher = Publisher(codec, SPEC, blobs, outer, downlink, AggregationSettings(), loss, 0.05)

    def moved(built_params: Params, name: str) -> float:
        return float((base[name] - built_params[name]).norm())

    longest = {n: max(float(d[n].norm()) for d in decoded) for n, _ in SPEC}
    before = loss(base)
    unclipped = publisher.build(base, 0, 1, uploads, load)  # no previous loss: as aggregated
    assert unclipped.eval_loss > before and publisher.guard(unclipped, before) is not None
    assert moved(unclipped.params, "lm_head.weight") > 1.3 * longest["lm_head.weight"]
    with caplog.at_level(logging.INFO, logger="coordinator.publishing.publisher"):
        built = publisher.build(base, 0, 1, uploads, load, previous_loss=before)
    assert built.eval_loss < 0.8 * before and publisher.guard(built, before) is None
    assert "published with each layer clipped to the longest upload's" in caplog.text
    for n, _ in SPEC:
        assert moved(built.params, n) <= longest[n] * (1 + 1e-5)
    header, published = decode_update(built.update, SPEC)
    reached = {n: t.clone() for n, t in base.items()}
    apply_update(reached, published)
    assert params_hash(reached, SPEC) == built.param_hash == header.param_hash  # miners reach it exactly
    kept = publisher.build(base, 0, 1, uploads, load, previous_loss=2 * unclipped.eval_loss)
    assert kept.param_hash == unclipped.param_hash  # no rise: published as aggregated
    within = unclipped.eval_loss / 1.04  # a rise of 4 %, the guard allowing 5
    assert publisher.build(base, 0, 1, uploads, load, previous_loss=within).param_hash == unclipped.param_hash
