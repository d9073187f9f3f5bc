"""A finished run's rounds built again, offline, with and without the downlink's residual.

    python -m benchmarks.replay RUN_DIR [--json]

``RUN_DIR`` holds ``coordinator.toml`` and the state directory of a stopped coordinator, as ``gradpool
simulate`` and ``benchmarks.adversarial --out`` leave them (for example ``runs/mix-8-2/honest``). The state
is copied first, so the run is never changed. From version 0 every committed version is rebuilt by the
coordinator's own publisher from its round's accepted uploads (kept in the blob store) and checked against
its recorded parameter hash; the replay stops, with an ``error`` and exit status 1, at a version that does
not rebuild (a run with ``weight_by_score``, whose weights are not kept, rebuilds only until they matter).
Each round's uploads, the accepted and those the loss guard left out, are also built five ways from the
same base:

- ``carried``: published with the downlink's error feedback carried from the earlier rounds (what the
  coordinator builds first);
- ``fresh``: published without that residual;
- ``clipped``: each layer of the aggregate clipped to the longest upload's, published without the residual
  (what the coordinator also tries when the first build would fail the loss guard);
- ``exact``: the outer step's delta itself, uncompressed;
- ``alone_mean``: each upload alone, published without the residual (the mean of their losses).

and the held-out loss of each is reported per round:

    {"rounds": [{"round", "uploads", "accepted", "base", "carried", "fresh", "clipped", "exact",
                 "alone_mean", "published"}],
     "replayed": versions rebuilt bit for bit, "versions": versions committed}
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from coordinator.publishing.publisher import Built
from coordinator.run import Run
from coordinator.settings import CoordinatorSettings
from coordinator.storage.blobs import kept_checkpoint
from coordinator.storage.records import StoredVersion, Upload
from gradpool.config import load_settings
from protocol.params import Params, apply_update

WAYS = ((True, False), (False, False), (False, True))  # (carry, clip), as the coordinator builds them


def copied_run(run_dir: Path, work: Path) -> Run:
    """The coordinator's ``Run`` over a copy, under ``work``, of a stopped run's state."""
    shutil.copytree(run_dir / "coordinator", work / "coordinator")
    settings = load_settings(
        CoordinatorSettings, run_dir / "coordinator.toml", {"state_dir": str(work / "coordinator")}
    )
    return Run(settings)


def replay(run_dir: Path, work: Path) -> dict[str, Any]:
    """The rows of a stopped run, rebuilt in a copy of its state under ``work``."""
    run = copied_run(run_dir, work)
    try:
        return _replay(run)
    finally:
        run.close()


def scaled(subs: list[Upload], field: str, value: str) -> list[tuple[Upload, float]]:
    """The uploads of a round whose ``field`` is ``value``, with their clip scales."""
    return [(u, u.scale or 1.0) for u in subs if getattr(u, field) == value]


class Recorded:
    """What a stopped run recorded: its committed versions, its first parameters, and its uploads' payloads
    as aggregation reads them (one round's at a time: ``clear``). The run's publisher is reset to version 0
    to build them again."""

    def __init__(self, run: Run) -> None:
        store = run.store
        versions = [store.version(v) for v in range(store.latest_version() + 1)]
        self.committed = [v for v in versions if v is not None and v.rolled_back_at is None]
        self.params = kept_checkpoint(run.blobs, str(self.committed[0].checkpoint_sha), run.spec)
        run.publisher.reset()
        self.run = run
        self.stored: dict[str, tuple[bytes, bytes]] = {}

    def load(self, u: Upload) -> tuple[bytes, bytes]:
        if u.sha256 not in self.stored:
            payload = self.run.blobs.get(u.sha256)
            self.stored[u.sha256] = payload, self.run.codec.examine(payload, self.run.spec).stored
        return self.stored[u.sha256]

    def clear(self) -> None:
        self.stored.clear()

    def rebuilt(self, run: Run, params: Params, v: StoredVersion) -> Built | None:
        """Version ``v`` built again on ``params`` from its round's accepted uploads: the build (``WAYS``)
        whose parameters the run recorded (None: none)."""
        publisher = run.publisher
        accepted = scaled(run.store.round_uploads(v.round), "status", "accepted")
        aggregate = publisher.aggregate(accepted, self.load)
        steps: dict[bool, tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = {}
        for carry, clip in WAYS:  # each step taken once, and only when a way needs it
            if clip not in steps:
                steps[clip] = publisher.stepped(aggregate, accepted, self.load, clip)
            built = publisher.published(params, v.base_version, v.version, *steps[clip], carry)
            if built.param_hash == v.param_hash:
                return built
        return None


def _replay(run: Run) -> dict[str, Any]:
    loss, publisher, store = run.model.held_out_loss, run.publisher, run.store
    recorded = Recorded(run)
    committed, params, load = recorded.committed, recorded.params, recorded.load

    def builds(
        base: Params,
        v: StoredVersion,
        ups: list[tuple[Upload, float]],
        ways: tuple[tuple[bool, bool], ...] = WAYS,
    ) -> tuple[dict[str, torch.Tensor], list[Built]]:
        """One outer step over ``ups``: its delta, and the version it makes each of the ``ways``."""
        aggregate = publisher.aggregate(ups, load)
        delta, buffers = publisher.stepped(aggregate, ups, load, clip=False)
        numbers = v.base_version, v.version
        out = []
        for carry, clip in ways:
            d, b = publisher.stepped(aggregate, ups, load, clip=True) if clip else (delta, buffers)
            out.append(publisher.published(base, *numbers, d, b, carry))
        return delta, out

    rows: list[dict[str, Any]] = []
    for replayed, (before, v) in enumerate(itertools.pairwise(committed)):
        recorded.clear()
        subs = store.round_uploads(v.round)
        accepted, left_out = scaled(subs, "status", "accepted"), scaled(subs, "reason", "loss_guard")
        delta, candidates = builds(params, v, accepted)
        if left_out:  # the round as the guard first saw it
            delta, (carried, fresh, clipped) = builds(params, v, accepted + left_out)
        else:
            carried, fresh, clipped = candidates
        exact = {n: t.clone() for n, t in params.items()}
        apply_update(exact, delta)
        alone = [builds(params, v, [u], ((False, False),))[1][0].eval_loss for u in accepted + left_out]
        rows.append(
            {
                "round": v.round,
                "uploads": len(accepted) + len(left_out),
                "accepted": len(accepted),
                "base": before.eval_loss,
                "carried": carried.eval_loss,
                "fresh": fresh.eval_loss,
                "clipped": clipped.eval_loss,
                "exact": loss(exact),
                "alone_mean": statistics.fmean(alone),
                "published": v.eval_loss,
            }
        )
        # the coordinator published one of them: the one whose parameters were recorded
        built = next((b for b in candidates if b.param_hash == v.param_hash), None)
        if built is None:
            return {
                "rounds": rows,
                "replayed": replayed,
                "versions": len(committed) - 1,
                "error": f"version {v.version} did not rebuild bit for bit",
            }
        publisher.commit(built)
        params = built.params
    return {"rounds": rows, "replayed": len(committed) - 1, "versions": len(committed) - 1}


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
        return 1 if "error" in result else 0
    print(f"{result['replayed']} of {result['versions']} versions rebuilt bit for bit")
    print("round uploads   base carried  fresh clipped  exact  alone published")
    columns = ("base", "carried", "fresh", "clipped", "exact", "alone_mean", "published")
    for r in result["rounds"]:
        print(f"{r['round']:5d} {r['uploads']:7d} " + " ".join(f"{r[k]:6.4f}" for k in columns))
    if "error" in result:
        print(f"error: {result['error']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
