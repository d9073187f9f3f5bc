"""No cheap majority: four keys sending almost nothing (``freerider``: an honest update x1e-4) beside three
honest miners, from round 0, at the production defaults (overlapped rounds). The freeriders are the
majority of every round's uploads; they set no reference, so no honest upload is refused as an outlier,
every version holds the honest updates, and the model learns."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import tomli_w

from coordinator.storage.store import open_store
from gradpool.simulate import simulate
from protocol.signing import load_key, public_key_hex

pytestmark = pytest.mark.slow  # a real network of seven miner processes

HONEST, FREERIDERS, ROUNDS = 3, 4, 3


@pytest.mark.timeout(480)
def test_four_freeriders_beside_three_honest_miners_lock_nobody_out(
    tmp_path: Path, corpus_file: Path
) -> None:
    config = tmp_path / "coordinator.toml"
    config.write_text(
        tomli_w.dumps(
            {
                "data": {"corpus": str(corpus_file), "eval_every": 20, "eval_sequences": 16},
                "recipe": {"inner_steps": 6, "batch_size": 8, "warmup_steps": 2},
                "rounds": {"deadline_s": 10.0, "min_deadline_s": 3.0},
                "validation": {"own_sequences": 32, "other_sequences": 32, "early_factor": 1},
            }
        )
    )
    out = tmp_path / "run"
    report = simulate(
        miners=HONEST,
        rounds=ROUNDS,
        out=out,
        config=config,
        adversaries={"freerider": FREERIDERS},
        timeout_s=420,
        echo=lambda _: None,
    )
    key = {p.stem: public_key_hex(load_key(p)) for p in (out / "keys").glob("*.pem")}
    honest = {key[f"miner-{i}"] for i in range(HONEST)}
    riders = {key[f"freerider-{i}"] for i in range(FREERIDERS)}
    store = open_store(out / "coordinator")
    try:
        uploads = {r: store.round_uploads(r) for r in range(ROUNDS)}
    finally:
        store.close()
    assert all(u.reason != "norm_outlier" for us in uploads.values() for u in us if u.miner in honest)
    for r in range(1, ROUNDS):
        accepted = {u.miner for u in uploads[r] if u.status == "accepted"}
        assert honest <= accepted, (r, [(u.miner[:8], u.status, u.reason) for u in uploads[r]])
        assert not accepted & riders, r
    losses = [report["initial_eval_loss"]] + [row["eval_loss"] for row in report["rounds"][:ROUNDS]]
    # from round 1 on, every version lowers the held-out loss
    assert all(later < earlier for earlier, later in itertools.pairwise(losses[1:])), losses
    assert report["final_eval_loss"] < report["initial_eval_loss"] - 1.0
