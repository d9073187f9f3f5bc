"""How sure the own-data margin is, round by round: ``python -m benchmarks.margin_power --json``.

A ``lazy`` miner trains honestly on data other than its assignment, so only the margin (its gain on its own
sequences less its gain on sequences it was not given, protocol/evaluation.py) tells it from an honest
one. This benchmark measures how many standard errors that margin stands from 0, per round, for honest
and lazy miners, under the design the scores use and under two others that cost more or nothing:

- ``plain``: the coordinator's margin and its standard error (own and other samples are different
  sequences, so every sequence's own difficulty is in the noise).
- ``loss_adjusted``: the same samples, with each sequence's gain regressed on its loss before the update
  (free: the losses before are measured anyway).
- ``paired``: each per-sequence gain less the mean gain of the round's other uploads on that same sequence,
  then own against other (a difference in differences). It takes every upload's evaluation on every
  miner's own sample: M times the evaluation.
- ``ring``: the uploads in a ring drawn with the round's salt; each is compared with the one before it on
  the same sequences, on the first half of its own sample against the first half of the next miner's
  (a difference in differences with one peer). Each upload is measured on its own sample and on half of
  each of the next two miners' samples: the cost of ``plain``.

It runs a real ``gradpool simulate`` network (``--miners`` honest, ``--lazy`` lazy, ``--rounds``, default
recipe, ``--sample`` own and other sequences per upload), then restarts its coordinator on the finished
state (no miners). ``aggregate_fit_64`` and ``aggregate_fit_48`` are the scores' design on the first 64 or
48 sequences of each sample: what smaller samples give on the same uploads. A validator
(which posts nothing here) fetches each round's base version and uploads over HTTP, and every upload is
evaluated on the union of the round's samples.

Output: per design and kind, the mean ``t`` over the first ``--early`` rounds and over the rest, and the
fraction of rounds in which every honest miner's ``t`` is above every lazy miner's.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import statistics
import sys
import tempfile
import threading
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gradpool.processes import Processes
from gradpool.simulate import simulate
from node.client import CoordinatorClient
from node.settings import ValidatorSettings
from node.validator import Validator
from protocol.evaluation import UpdateEvaluator, round_salt, samples
from protocol.payload import SparseTensor

DESIGNS = (
    "plain",
    "loss_adjusted",
    "paired",
    "ring",
    "aggregate",
    "aggregate_fit",
    "aggregate_fit_64",
    "aggregate_fit_48",
)
# the scores' design on the first own and other sequences of the samples: smaller samples, as
# ``[validation] own_sequences`` and ``other_sequences`` would draw them (48 and 48: the defaults)
SMALLER = {"aggregate_fit_64": (64, 64), "aggregate_fit_48": (48, 48)}


def _t(own: torch.Tensor, other: torch.Tensor) -> float:
    se = math.sqrt(float(own.var() / len(own) + other.var() / len(other)))
    return float(own.mean() - other.mean()) / se if se > 0 else 0.0


def _ring_t(ring: list[str], gains: dict[str, torch.Tensor], half: dict[str, list[int]], m: str) -> float:
    """The ring design's t for ``m``: its gain less the previous upload's, on m's half sample against the
    next miner's half sample (neither of the two trained on that one)."""
    if len(ring) < 3:
        return math.nan
    k = ring.index(m)
    prev, nxt = ring[k - 1], ring[(k + 1) % len(ring)]
    d = gains[m] - gains[prev]
    return _t(d[half[m]], d[half[nxt]])


def _mean_update(
    reader: Validator, client: CoordinatorClient, round_: int, uploads: dict[str, float]
) -> dict[str, SparseTensor]:
    """The mean of the round's evaluated updates, each times its clip scale, dense."""
    total = {n: torch.zeros(math.prod(shape)) for n, shape in reader.spec}
    for m, scale in uploads.items():
        for n, t in reader.codec.decode(client.payload(round_, m), reader.spec)[1].items():
            values = t.values.float() * (scale / len(uploads))
            total[n] += (
                values if t.indices is None else torch.zeros_like(total[n]).index_add_(0, t.indices, values)
            )
    return {n: SparseTensor(None, v) for n, v in total.items()}


def _fitted(
    g: torch.Tensor, ref: torch.Tensor, own: list[int], other: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``g`` less ``ref`` times its least-squares slope on the other sample, on own and other."""
    x, y = ref[other], g[other]
    beta = float(((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum().clamp_min(1e-12))
    r = g - beta * ref
    return r[own], r[other]


def round_ts(reader: Validator, round_: int) -> dict[str, dict[str, float]]:
    """Each evaluated upload's t under every design, by miner."""
    client, info = reader.client, reader.info
    record = client.round_record(round_)
    on = record.evaluated_on()
    reader.catch_up(on, client.version(on).param_hash)
    salt = round_salt(s.sha256 for s in record.submissions)
    uploads = {s.miner: float(s.scale) for s in record.submissions if s.evaluated and s.scale is not None}
    drawn = {m: samples(info, round_, m, salt) for m in uploads}
    ids = sorted({i for own, other in drawn.values() for i in own + other})
    at = {i: k for k, i in enumerate(ids)}
    evaluator = UpdateEvaluator(reader.model, reader.params, client.sequences)
    gains = {}
    for m, scale in uploads.items():
        update = reader.codec.decode(client.payload(round_, m), reader.spec)[1]
        before, after = evaluator.per_sequence(update, scale * info.evaluation.outer_lr, ids)
        gains[m] = before - after  # ``before``: the base's losses, the same for every update
    mean = _mean_update(reader, client, round_, uploads)
    before, after = evaluator.per_sequence(mean, info.evaluation.outer_lr, ids)
    reference = before - after
    ring = sorted(gains, key=lambda m: hashlib.sha256(f"{salt}:ring:{m}".encode()).digest())
    half = {m: [at[i] for i in drawn[m][0][: len(drawn[m][0]) // 2]] for m in gains}
    out = {}
    for m, g in gains.items():
        own = [at[i] for i in drawn[m][0]]
        other = [at[i] for i in drawn[m][1]]
        both = own + other
        x, y = before[both], g[both]
        beta = float(((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum().clamp_min(1e-12))
        adjusted = g - beta * before
        peers = [gains[o] for o in gains if o != m]
        paired = g - torch.stack(peers).mean(0) if peers else g
        out[m] = {
            "plain": _t(g[own], g[other]),
            "loss_adjusted": _t(adjusted[own], adjusted[other]),
            "paired": _t(paired[own], paired[other]),
            "ring": _ring_t(ring, gains, half, m),
            "aggregate": _t((g - reference)[own], (g - reference)[other]),
            "aggregate_fit": _t(*_fitted(g, reference, own, other)),
        } | {d: _t(*_fitted(g, reference, own[:a], other[:b])) for d, (a, b) in SMALLER.items()}
    return out


def summarise(
    per_round: list[dict[str, dict[str, float]]], kinds: dict[str, str], early: int
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for design in DESIGNS:
        by_kind: dict[str, dict[str, list[float]]] = defaultdict(lambda: {"early": [], "late": []})
        separated = []
        for r, ts in enumerate(per_round):
            phase = "early" if r < early else "late"
            for m, t in ts.items():
                if not math.isnan(t[design]):
                    by_kind[kinds[m]][phase].append(t[design])
            honest = [t[design] for m, t in ts.items() if kinds[m] == "honest"]
            lazy = [t[design] for m, t in ts.items() if kinds[m] == "lazy"]
            if honest and lazy:
                separated.append(min(honest) > max(lazy))
        mean_t = {
            k: {p: round(statistics.fmean(v), 3) if v else None for p, v in phases.items()}
            for k, phases in by_kind.items()
        }
        share = round(sum(separated) / len(separated), 3) if separated else None
        out[design] = {"mean_t": mean_t, "rounds_separated": share}
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--miners", type=int, default=4, help="honest miners")
    ap.add_argument("--lazy", type=int, default=2, help="lazy miners")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--early", type=int, default=6, help="rounds counted as early")
    ap.add_argument("--sample", type=int, default=128, help="own and other sequences per upload")
    ap.add_argument("--out", type=Path, default=None, help="keep the run here (default: a temporary folder)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="gradpool-margin-") as tmp:
        out = args.out or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        config = out / "margin_power.toml"
        config.write_text(
            f"[validation]\nown_sequences = {args.sample}\nother_sequences = {args.sample}\n"
            "early_factor = 1\n"
        )  # every round on the same samples
        report = simulate(
            miners=args.miners,
            rounds=args.rounds,
            out=out,
            adversaries={"lazy": args.lazy},
            config=config,
            echo=lambda line: print(line, file=sys.stderr),
        )
        kinds = {m["miner"]: m["kind"] for m in report["miners"]}
        procs = Processes(out / "logs-after")
        try:
            url = procs.start_coordinator(
                ["--config", str(out / "coordinator.toml"), "--port", "0"], out / "after.ready"
            )
            client = CoordinatorClient(url, Ed25519PrivateKey.generate())
            settings = ValidatorSettings(state_dir=out / "scratch", device="cpu")
            reader = Validator(settings, client, client.info(), threading.Event())  # it never posts here
            per_round = [round_ts(reader, r) for r in range(args.rounds)]
            client.close()
        finally:
            procs.stop_all()
    result = {
        "config": {
            "miners": args.miners,
            "lazy": args.lazy,
            "rounds": args.rounds,
            "early": args.early,
            "model": "tiny",
            "sample": args.sample,
        },
        "designs": summarise(per_round, kinds, args.early),
        "rounds": [
            {kinds[m][0] + m[:8]: {d: round(t[d], 2) for d in DESIGNS} for m, t in ts.items()}
            for ts in per_round
        ],
    }
    print(json.dumps(result, indent=1) if args.json else json.dumps(result["designs"], indent=1))
    return result


if __name__ == "__main__":
    main()
