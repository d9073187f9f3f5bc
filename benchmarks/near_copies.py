"""How alike one operator's near-copies are, against how alike honest miners' uploads are.

A sybil operator (``--adversary sybil``, node/adversary.py) runs one computation and uploads it from
several keys: its first key as it is, the others with noise added, each through its own error feedback and
encoded afresh, so neither bytes nor sketches match. This runs a network of honest miners and one such
operator (or reads a finished run with ``--run``) and measures every pair of uploads in every round four
ways: the cosine of their sketches (what intake records), the exact cosine of the decoded updates, the
overlap of the coordinates their payloads keep (Jaccard), and the cosine of their values on the coordinates
both keep. It prints each measure's range per class of pair
(honest-honest, original-copy, copy-copy, honest-sybil), the margin between the classes, and how many
uploads of either kind a threshold halfway between them would refuse.

    python -m benchmarks.near_copies --json
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from benchmarks.adversarial import operator_outcome
from coordinator.settings import BlobSettings
from coordinator.storage.blob_stores import make_blob_store
from coordinator.storage.store import open_store
from gradpool.simulate import simulate
from protocol.codec import make_codec
from protocol.codec.measure import cosine, flatten
from protocol.model import ModelConfig
from protocol.params import model_spec
from protocol.signing import load_key, public_key_hex

MEASURES = ("sketch_cosine", "cosine", "index_jaccard", "shared_cosine")


def run_network(out: Path, honest: int, sybils: int, rounds: int, config: Path | None) -> None:
    simulate(
        miners=honest,
        rounds=rounds,
        out=out,
        config=config,
        adversaries={"sybil": sybils},
        echo=lambda _: None,
    )


def pairs(run: Path) -> list[dict[str, Any]]:
    """Every pair of uploads of every closed round, with its class and the three measures."""
    names = {public_key_hex(load_key(p)): p.stem for p in (run / "keys").glob("*.pem")}
    claim = run / "sybil" / "first-key"
    worker = names.get(claim.read_text().strip()) if claim.exists() else None
    state = run / "coordinator"
    store = open_store(state)
    blobs = make_blob_store(BlobSettings(), state / "blobs")
    architecture = ModelConfig.model_validate_json(store.get_meta("architecture") or "")
    spec = model_spec(architecture)
    fingerprint = json.loads(store.get_meta("fingerprint") or "{}")
    codec_cfg = fingerprint.get("run", {}).get("codec", {})
    codec = make_codec(codec_cfg.get("name", "sparseloco"), codec_cfg.get("k", 64), codec_cfg.get("tile", 64))
    out = []
    try:
        last = store.last_closed_round() or 0
        for r in range(last + 1):
            uploads = store.round_uploads(r)
            decoded = {}
            for u in uploads:
                coords, values = flatten(codec.decode(blobs.get(u.sha256), spec)[1], spec)
                decoded[u.miner] = (coords, values)
            for a, b in itertools.combinations(uploads, 2):
                (ca, va), (cb, vb) = decoded[a.miner], decoded[b.miner]
                out.append(
                    {
                        "round": r,
                        "a": names.get(a.miner, a.miner[:12]),
                        "b": names.get(b.miner, b.miner[:12]),
                        "pair": _kind(names.get(a.miner, "?"), names.get(b.miner, "?"), worker),
                        "sketch_cosine": cosine(a.sketch, b.sketch),
                        "cosine": _cosine(ca, va, cb, vb),
                        "index_jaccard": _jaccard(ca, cb),
                        "shared_cosine": _shared_cosine(ca, va, cb, vb),
                    }
                )
    finally:
        store.close()
    return out


def _kind(a: str, b: str, worker: str | None) -> str:
    roles = sorted(
        "original" if n == worker else "copy" if n.startswith("sybil") else "honest" for n in (a, b)
    )
    if roles == ["honest", "honest"]:
        return "honest-honest"
    if "honest" in roles:
        return "honest-sybil"
    return "copy-copy" if roles == ["copy", "copy"] else "original-copy"


def _jaccard(a: torch.Tensor, b: torch.Tensor) -> float:
    shared = torch.isin(a, b).sum().item()
    return float(shared / max(1, a.numel() + b.numel() - shared))


def _shared_cosine(ca: torch.Tensor, va: torch.Tensor, cb: torch.Tensor, vb: torch.Tensor) -> float:
    """The cosine of the two updates' values on the coordinates both keep."""
    order_a, order_b = torch.argsort(ca), torch.argsort(cb)
    ca, va, cb, vb = ca[order_a], va[order_a], cb[order_b], vb[order_b]
    in_b = torch.isin(ca, cb)
    in_a = torch.isin(cb, ca)
    return cosine(va[in_b].double(), vb[in_a].double())


def _cosine(ca: torch.Tensor, va: torch.Tensor, cb: torch.Tensor, vb: torch.Tensor) -> float:
    size = int(max(ca.max().item(), cb.max().item())) + 1
    a = torch.zeros(size, dtype=torch.float64).index_add_(0, ca, va.double())
    b = torch.zeros(size, dtype=torch.float64).index_add_(0, cb, vb.double())
    return cosine(a, b)


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    by: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by[row["pair"]].append(row)
    classes = {
        pair: {
            "pairs": len(group),
            **{
                m: {
                    "min": min(x[m] for x in group),
                    "median": statistics.median(x[m] for x in group),
                    "max": max(x[m] for x in group),
                }
                for m in MEASURES
            },
        }
        for pair, group in sorted(by.items())
    }
    separation = {}
    copies = by.get("original-copy", []) + by.get("copy-copy", [])
    honest = by.get("honest-honest", []) + by.get("honest-sybil", [])
    for m in MEASURES:
        if not copies or not honest:
            continue
        low, high = max(x[m] for x in honest), min(x[m] for x in copies)
        threshold = (low + high) / 2
        separation[m] = {
            "honest_max": low,
            "copies_min": high,
            "gap": high - low,
            "threshold": threshold,
            "copy_pairs_caught": sum(x[m] > threshold for x in copies) / len(copies),
            "honest_pairs_flagged": sum(x[m] > threshold for x in honest) / len(honest),
        }
    return {"classes": classes, "separation": separation}


def standings(run: Path) -> dict[str, Any]:
    """What the operator earned against the honest miners, and how often its copies were refused (the run's
    report, as ``benchmarks.adversarial`` reads it)."""
    report = json.loads((run / "report.json").read_text())
    honest = {m["name"]: m["score"] for m in report["miners"] if m["kind"] == "honest"}
    loss = {"initial": report["initial_eval_loss"], "final": report["final_eval_loss"]}
    return {"honest_scores": honest, "operator": operator_outcome(run, report), "loss": loss}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.near_copies", description=__doc__.split("\n")[0])
    ap.add_argument("--run", type=Path, help="a finished simulate run with sybil keys (else one is run)")
    ap.add_argument("--honest", type=int, default=3)
    ap.add_argument("--sybils", type=int, default=3, help="the operator's keys")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--config", type=Path, help="the coordinator's TOML for the network run")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = ap.parse_args(argv)
    run = args.run
    if run is None:
        run = Path(tempfile.mkdtemp(prefix="near-copies-")) / "run"
        run_network(run, args.honest, args.sybils, args.rounds, args.config)
    result = {"run": str(run), **summary(pairs(run)), **standings(run)}
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        for m, s in result["separation"].items():
            print(f"{m:>14}: honest up to {s['honest_max']:.3f}, copies from {s['copies_min']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
