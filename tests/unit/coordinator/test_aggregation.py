"""Refusals at aggregation: recorded with their reason, counted in the report, kept out of the model."""

from __future__ import annotations

import torch

from tests.helpers.pool import SPEC, OpenPool, Pool, assert_error, encode, make_delta, payload, reframe
from tests.helpers.published import after_round, hashes


def round_report(pool: Pool, round_: int) -> dict[str, int]:
    rounds = pool.client.get("/v1/status").json()["rounds"]
    row: dict[str, int] = next(r for r in rounds if r["round"] == round_)
    return row


def expected_hash(pool: Pool, base_version: int, bodies: list[bytes]) -> set[str]:
    """The parameter hashes the outer step over exactly these payloads may give (``after_round``)."""
    return hashes(after_round(pool.checkpoint(base_version), bodies))


def test_copied_payload_is_refused(open_pool: OpenPool) -> None:
    with open_pool() as pool:
        author, copier = pool.miner(), pool.miner()
        body = payload(round_=0, base_version=0, seed=1)
        assert author.upload(0, body).status_code == 200
        assert copier.upload(0, body).status_code == 200  # the same bytes pass the cheap checks

        after = pool.latest_after(0)
        assert after["version"] == 1
        assert after["param_hash"] in expected_hash(pool, 0, [body])
        assert pool.submissions() == {
            (0, author.pubkey): ("accepted", None),
            (0, copier.pubkey): ("rejected", "copied_payload"),
        }
        report = round_report(pool, 0)
        assert (report["accepted"], report["rejected"], report["version"]) == (1, 1, 1)


def test_round_of_only_empty_updates_publishes_nothing(open_pool: OpenPool) -> None:
    with open_pool() as pool:
        start = pool.round()
        miner = pool.miner()
        zeros = {name: torch.zeros(shape) for name, shape in SPEC}
        assert miner.upload(0, encode(zeros, round_=0, base_version=0)[0]).status_code == 200

        now, after = pool.wait_for_round(0), pool.latest()
        assert (now["round"], after["version"], after["param_hash"]) == (1, 0, start["param_hash"])
        assert pool.submissions() == {(0, miner.pubkey): ("rejected", "empty_update")}
        assert_error(pool.client.get("/v1/versions/1"), 404, "not_found")
        assert pool.client.get("/v1/checkpoint").headers["X-Gradpool-Version"] == "0"
        report = round_report(pool, 0)
        assert (report["accepted"], report["rejected"], report["version"]) == (0, 1, 0)
        assert report["eval_loss"] is None

        # The next round is still for version 0 and takes a real update.
        assert miner.upload(1, payload(round_=1, base_version=0, seed=5)).status_code == 200
        assert pool.latest_after(1)["version"] == 1


def test_scaled_up_update_is_a_norm_outlier(open_pool: OpenPool) -> None:
    with open_pool() as pool:
        honest = [pool.miner() for _ in range(3)]
        cheat = pool.miner()
        bodies = [payload(round_=0, base_version=0, seed=10 + i) for i in range(3)]
        loud = encode({n: t * 100 for n, t in make_delta(seed=20).items()}, round_=0, base_version=0)[0]
        for miner, body in zip(honest, bodies, strict=True):
            assert miner.upload(0, body).status_code == 200
        assert cheat.upload(0, loud).status_code == 200

        after = pool.latest_after(0)
        assert after["version"] == 1
        assert after["param_hash"] in expected_hash(pool, 0, bodies)
        assert after["param_hash"] not in expected_hash(pool, 0, [*bodies, loud])
        assert pool.submissions() == {
            **{(0, m.pubkey): ("accepted", None) for m in honest},
            (0, cheat.pubkey): ("rejected", "norm_outlier"),
        }
        report = round_report(pool, 0)
        assert (report["accepted"], report["rejected"]) == (3, 1)


def test_every_refusal_in_one_round(open_pool: OpenPool) -> None:
    """Copied, empty and scaled-up updates together: only the honest ones make the next version."""
    with open_pool() as pool:
        honest = [pool.miner() for _ in range(3)]
        copier, idler, cheat = pool.miner(), pool.miner(), pool.miner()
        bodies = [payload(round_=0, base_version=0, seed=30 + i) for i in range(3)]
        zeros = encode({n: torch.zeros(s) for n, s in SPEC}, round_=0, base_version=0)[0]
        loud = encode({n: t * 100 for n, t in make_delta(seed=40).items()}, round_=0, base_version=0)[0]
        for miner, body in [
            *zip(honest, bodies, strict=True),
            (copier, bodies[0]),
            (idler, zeros),
            (cheat, loud),
        ]:
            assert miner.upload(0, body).status_code == 200

        after = pool.latest_after(0)
        assert after["param_hash"] in expected_hash(pool, 0, bodies)
        assert pool.submissions() == {
            **{(0, m.pubkey): ("accepted", None) for m in honest},
            (0, copier.pubkey): ("rejected", "copied_payload"),
            (0, idler.pubkey): ("rejected", "empty_update"),
            (0, cheat.pubkey): ("rejected", "norm_outlier"),
        }
        report = round_report(pool, 0)
        assert (report["accepted"], report["rejected"]) == (3, 3)


def test_copy_with_a_changed_header_is_refused(open_pool: OpenPool) -> None:
    with open_pool() as pool:
        author, copier = pool.miner(), pool.miner()
        body = payload(round_=0, base_version=0, seed=1)
        copy = reframe(body, header={"stats": {"compute_s": 12.5}})
        assert copy != body
        assert author.upload(0, body).status_code == 200
        assert copier.upload(0, copy).status_code == 200

        pool.wait_for_round(0)
        assert pool.submissions()[(0, copier.pubkey)] == ("rejected", "copied_payload")
