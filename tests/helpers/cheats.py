"""A short real network of honest miners and cheaters (tests/integration/test_adversaries.py and
test_quiet_cheats.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import tomli_w
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gradpool.simulate import simulate
from protocol.signing import save_key


def _config(tmp_path: Path, corpus: Path, quick: bool) -> Path:
    """``quick``: less training and evaluation per round, for cheats that show without a clear margin;
    otherwise the production default's samples (48 own and 48 other sequences, twice that in the first 4
    rounds)."""
    settings = {
        "data": {"corpus": str(corpus), "eval_every": 20, "eval_sequences": 16},
        "recipe": {"inner_steps": 6 if quick else 10, "batch_size": 8, "warmup_steps": 2},
        "rounds": {"deadline_s": 10.0, "min_deadline_s": 2.0 if quick else 3.0},
        "validation": {
            "own_sequences": 32 if quick else 48,
            "other_sequences": 32 if quick else 48,
            "early_factor": 1 if quick else 2,  # quick: the first rounds' samples not doubled either
        },
    }
    path = tmp_path / "coordinator.toml"
    path.write_text(tomli_w.dumps(settings))
    return path


def cheat_network(
    tmp_path: Path,
    corpus: Path,
    kinds: tuple[str, ...],
    honest_miners: int,
    rounds: int,
    overlap: bool = True,
    quick: bool = True,
) -> dict[str, Any]:
    """A real ``gradpool simulate`` network (a coordinator process and one process per miner on 127.0.0.1)
    of ``honest_miners`` and one cheater of each kind; its report. Overlapped rounds unless ``overlap`` is
    False, as in production."""
    names = [f"miner-{j}" for j in range(honest_miners)] + [f"{k}-0" for k in kinds]
    for i, name in enumerate(names):  # fixed keys: the same assignments, and so the same training and
        # evaluation, in every run
        key = Ed25519PrivateKey.from_private_bytes(bytes([i + 1]) * 32)
        save_key(key, tmp_path / "run" / "keys" / f"{name}.pem")
    return simulate(
        miners=honest_miners,
        rounds=rounds,
        out=tmp_path / "run",
        config=_config(tmp_path, corpus, quick),
        adversaries=dict.fromkeys(kinds, 1),
        timeout_s=360,
        echo=lambda _: None,
        overlap=overlap,
    )


def honest_and_cheats(
    report: dict[str, Any], kinds: tuple[str, ...], honest_miners: int, rounds: int
) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]], float]:
    """What every cheat network must show: each honest miner took part, each cheater was refused or ranked
    below the worst honest one, and the model learned. The honest miners, the cheaters by kind, and the
    worst honest score."""
    miners: dict[str, dict[str, Any]] = {m["name"]: m for m in report["miners"]}
    honest = [m for m in miners.values() if m["kind"] == "honest"]
    assert len(honest) == honest_miners, honest
    assert all(m["rounds_contributed"] >= rounds - 1 for m in honest), honest
    worst_honest = min(m["score"] for m in honest)
    cheats = {kind: miners[f"{kind}-0"] for kind in kinds}
    for kind, cheat in cheats.items():
        assert cheat["kind"] == kind and cheat["score"] is not None, cheat
        assert cheat["rounds_refused"] > 0 or cheat["score"] < worst_honest, (kind, cheat, worst_honest)
    assert report["final_eval_loss"] < report["initial_eval_loss"] - 1.0
    return honest, cheats, worst_honest
