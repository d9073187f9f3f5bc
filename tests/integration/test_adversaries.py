"""Every kind of cheating miner, in a short real network (``gradpool simulate``: a coordinator process and
one process per miner on 127.0.0.1), is refused or scored below every honest miner."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import tomli_w
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gradpool.simulate import simulate
from protocol.signing import save_key


def _config(tmp_path: Path, corpus: Path, quick: bool) -> Path:
    """``quick``: less training and evaluation per round, for cheats that show without a clear margin."""
    settings = {
        "data": {"corpus": str(corpus), "eval_every": 20, "eval_sequences": 16},
        "recipe": {"inner_steps": 6 if quick else 10, "batch_size": 8, "warmup_steps": 2},
        "rounds": {"deadline_s": 10.0, "min_deadline_s": 2.0 if quick else 3.0},
        "validation": {"own_sequences": 32 if quick else 64, "other_sequences": 32 if quick else 64},
    }
    path = tmp_path / "coordinator.toml"
    path.write_text(tomli_w.dumps(settings))
    return path


@pytest.mark.timeout(420)
@pytest.mark.parametrize(
    ("kinds", "honest_miners", "rounds", "overlap"),
    # The loud cheats are refused from the start; the quiet ones need a few rounds to show. A lazy miner
    # (real training on the wrong data) gains as much as an honest one: only its margin gives it away, and
    # early margins are within their sampling noise, so it needs the most rounds. Its network is small to
    # keep them quick.
    [
        (("noise", "scaled", "signflip", "nan", "lutscale"), 3, 4, False),
        (("copycat", "stale", "freerider"), 3, 5, False),
        (("lazy",), 2, 10, False),
        # overlapped rounds: uploads are judged against, and applied to, the version made while they trained
        (("noise", "scaled", "signflip", "nan", "lutscale"), 3, 4, True),
    ],
    ids=["loud", "quiet", "lazy", "loud-overlapped"],
)
def test_every_cheat_is_refused_or_ranked_below_the_honest(
    tmp_path: Path, corpus_file: Path, kinds: tuple[str, ...], honest_miners: int, rounds: int, overlap: bool
) -> None:
    for i, name in enumerate([f"miner-{j}" for j in range(honest_miners)] + [f"{k}-0" for k in kinds]):
        # fixed keys: the same assignments, and so the same training and evaluation, in every run
        save_key(
            Ed25519PrivateKey.from_private_bytes(bytes([i + 1]) * 32),
            tmp_path / "run" / "keys" / f"{name}.pem",
        )
    report = simulate(
        miners=honest_miners, rounds=rounds, out=tmp_path / "run",
        config=_config(tmp_path, corpus_file, quick="lazy" not in kinds),
        adversaries=dict.fromkeys(kinds, 1), timeout_s=360, echo=lambda _: None, overlap=overlap,
    )  # fmt: skip
    miners: dict[str, dict[str, Any]] = {m["name"]: m for m in report["miners"]}
    honest = [m for m in miners.values() if m["kind"] == "honest"]
    assert len(honest) == honest_miners, honest
    assert all(m["rounds_contributed"] >= rounds - 1 for m in honest), honest
    worst_honest = min(m["score"] for m in honest)
    for kind in kinds:
        cheat = miners[f"{kind}-0"]
        assert cheat["kind"] == kind and cheat["score"] is not None, cheat
        assert cheat["rounds_refused"] > 0 or cheat["score"] < worst_honest, (kind, cheat, worst_honest)
    refused = {kind: miners[f"{kind}-0"]["refusals"] for kind in kinds}
    if "nan" in kinds:
        assert set(refused["nan"]) == {"non_finite"} and refused["nan"]["non_finite"] >= rounds // 2
    if "scaled" in kinds:  # its error feedback makes every other upload a rescaled replay of an earlier one
        loud = refused["scaled"]
        assert loud.get("norm_outlier", 0) + loud.get("replayed_update", 0) >= rounds - 1
    if "signflip" in kinds:
        assert refused["signflip"].get("harmful", 0) >= rounds - 3
    if "lutscale" in kinds:  # value tables x1e30: always far above the reference norm
        assert refused["lutscale"].get("norm_outlier", 0) >= rounds - 1
    if "freerider" in kinds:
        assert refused["freerider"].get("low_gain", 0) >= rounds - 1
    if "lazy" in kinds:  # below every honest miner from round 4 on, not only at the end: the own-data
        # margin paired with the round's mean update stands out of its noise from the first rounds
        # (benchmarks/margin_power.py measures it)
        for row in report["scores"][4:]:
            assert row["scores"]["lazy-0"] < min(row["scores"][m["name"]] for m in honest), row
    for kind in {"noise", "lazy"} & set(kinds):  # not refused in every round, yet ranked below
        assert miners[f"{kind}-0"]["score"] < worst_honest, (kind, miners[f"{kind}-0"], worst_honest)
    assert report["final_eval_loss"] < report["initial_eval_loss"] - 1.0
