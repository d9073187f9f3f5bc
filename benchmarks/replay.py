"""A finished run's rounds built again, offline, with and without the downlink's residual.

    python -m benchmarks.replay RUN_DIR [--json]

``RUN_DIR`` holds ``coordinator.toml`` and the coordinator's state directory, as ``gradpool simulate`` and
``benchmarks.adversarial --out`` leave them (for example ``runs/mix-8-2/honest``). The state is copied
first, so the run is never changed. From version 0 every committed version is rebuilt from its round's
accepted uploads (kept in the blob store), checked against its recorded parameter hash, and each round's
uploads, the accepted and those the loss guard left out, are also built four ways from the same base:

- ``carried``: the published update with the downlink's error feedback carried from the earlier rounds
  (what the coordinator builds first);
- ``fresh``: the same update compressed without that residual;
- ``exact``: the aggregate itself, uncompressed;
- ``alone``: each upload alone through the downlink without the residual (the mean over the uploads).

and the held-out loss of each is reported per round:

    {"rounds": [{"round", "uploads", "accepted", "base", "carried", "fresh", "exact", "alone_mean",
                 "published"}], "replayed": versions rebuilt bit for bit, "versions": versions committed}
"""

from __future__ import annotations

import argparse
import json
import shutil
import sqlite3
import statistics
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from coordinator.aggregation import aggregate_uploads
from coordinator.checks import Upload
from coordinator.publish import Downlink
from coordinator.run import Run
from coordinator.settings import CoordinatorSettings
from gradpool.config import load_settings
from protocol.params import Params, apply_update, load_checkpoint, params_hash


def moved(base: Params, delta: Mapping[str, torch.Tensor]) -> Params:
    params = {n: t.clone() for n, t in base.items()}
    apply_update(params, delta)
    return params


def replay(run_dir: Path, work: Path) -> dict[str, Any]:
    shutil.copytree(run_dir / "coordinator", work / "coordinator")
    settings = load_settings(CoordinatorSettings, run_dir / "coordinator.toml",
                             {"state_dir": str(work / "coordinator")})  # fmt: skip
    run = Run(settings)
    p, loss = run.parts, run.model.held_out_loss
    db = sqlite3.connect(work / "coordinator" / "state.db")
    db.row_factory = sqlite3.Row
    committed = db.execute("SELECT * FROM versions WHERE rolled_back_at IS NULL ORDER BY version")
    versions = [dict(r) for r in committed]
    params = load_checkpoint(p.blobs.get(versions[0]["checkpoint_sha"]), p.spec)[0]
    stored: dict[str, tuple[bytes, bytes]] = {}

    def load(u: Upload) -> tuple[bytes, bytes]:
        if u.sha256 not in stored:
            payload = p.blobs.get(u.sha256)
            stored[u.sha256] = payload, p.codec.examine(payload, p.spec).stored
        return stored[u.sha256]

    def uploads(round_: int, *reasons: str) -> list[tuple[Upload, float]]:
        """The round's accepted uploads, and those refused for one of ``reasons``, in arrival order."""
        rows = db.execute("SELECT * FROM submissions WHERE round = ? ORDER BY received_at", (round_,))
        kept = [r for r in rows if r["status"] == "accepted" or r["reason"] in reasons]
        return [(Upload(r["miner"], r["sha256"], r["content_sha256"], r["norm"], torch.zeros(1)),
                 r["scale"] or 1.0) for r in kept]  # fmt: skip

    downlink = Downlink(settings.publish, settings.codec.name, p.spec)
    rows, replayed = [], 0
    for v in versions[1:]:
        round_ = v["round"]
        accepted, tried = uploads(round_), uploads(round_, "loss_guard")
        if tried:
            aggregate = aggregate_uploads(tried, load, p.codec, p.spec)
            singles = [aggregate_uploads([us], load, p.codec, p.spec) for us in tried]
            alone = [loss(moved(params, downlink.step(one, carry=False)[1])) for one in singles]
            rows.append({
                "round": round_, "uploads": len(tried), "accepted": len(accepted), "base": loss(params),
                "carried": loss(moved(params, downlink.step(aggregate)[1])),
                "fresh": loss(moved(params, downlink.step(aggregate, carry=False)[1])),
                "exact": loss(moved(params, aggregate)), "alone_mean": statistics.fmean(alone),
                "published": v["eval_loss"],
            })  # fmt: skip
        aggregate = aggregate_uploads(accepted, load, p.codec, p.spec)
        for carry in (True, False):  # the coordinator publishes one of the two: the one recorded
            _, applied, residual = downlink.step(aggregate, carry)
            candidate = moved(params, applied)
            if params_hash(candidate, p.spec) == v["param_hash"]:
                replayed += 1
                break
        params, downlink.residual = candidate, residual
    run.store.close()
    run.lock.release()
    return {"rounds": rows, "replayed": replayed, "versions": len(versions) - 1}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.replay", description=__doc__.split("\n")[0])
    ap.add_argument("run_dir", type=Path, help="holds coordinator.toml and the coordinator's state directory")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    if not (args.run_dir / "coordinator.toml").is_file() or not (args.run_dir / "coordinator").is_dir():
        ap.error(f"{args.run_dir}: no coordinator.toml and coordinator/ state directory here")
    with tempfile.TemporaryDirectory(prefix="gradpool-replay-") as tmp:
        result = replay(args.run_dir, Path(tmp))
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(f"{result['replayed']} of {result['versions']} versions rebuilt bit for bit")
    print("round uploads   base carried  fresh  exact  alone published")
    for r in result["rounds"]:
        print(f"{r['round']:5d} {r['uploads']:7d} " + " ".join(f"{r[k]:6.4f}" for k in
              ("base", "carried", "fresh", "exact", "alone_mean", "published")))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
