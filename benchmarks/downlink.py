"""What a miner downloads per round, exact or compressed: ``python -m benchmarks.downlink --json``.

``--miners`` (64) miners train the ``tiny`` model on their own assigned sequences for ``--rounds`` (6)
rounds from a common base, with error feedback, through the project's own code (``InnerTrainer``, the
SparseLoCo codec, ``protocol.aggregate``); the base advances by the exact aggregate of all of them, so each
miner's error feedback reaches its steady state. Every round, the uploads of the first M miners, for M in
``--sizes`` (4, 16, 64), are aggregated and published both ways: ``exact`` (a bitmap and the fp32 value
of every touched coordinate) and compressed by ``publishing.publisher.Downlink`` with its own error
feedback across the rounds (``--k``, ``--bits``, ``--ef-beta``, ``--budget``: the [publish] settings;
``--budget`` sets k, reported as ``k``). The last round's sizes are reported:

    {"rows": [{"miners": M, "upload_bytes": mean, "exact_bytes", "published_bytes", "published_vs_upload",
               "exact_vs_upload"}], "k": k, "settings": {...}}

Target: published_vs_upload <= 2.5 at every M.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

from coordinator.data.corpus import build_dataset
from coordinator.publishing.publisher import Downlink
from coordinator.settings import PublishSettings
from node.trainer import InnerTrainer
from protocol.codec import PAYLOAD_FORMAT_VERSION, PayloadHeader, SparseLoCoCodec
from protocol.codec.accumulate import aggregate
from protocol.codec.feedback import ErrorFeedback
from protocol.data import Dataset, assignment
from protocol.model import build_model
from protocol.params import UpdateHeader, apply_update, encode_update, get_params, param_spec, set_params
from protocol.wire import TrainingRecipe

TARGET = 2.5


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--miners", type=int, default=64)
    p.add_argument("--sizes", default="4,16,64")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--inner-steps", type=int, default=10)
    p.add_argument("--k", type=int, default=PublishSettings().k)
    p.add_argument("--bits", type=int, default=PublishSettings().bits)
    p.add_argument("--ef-beta", type=float, default=PublishSettings().ef_beta)
    p.add_argument("--budget", type=float, default=None, help="the [publish] budget (sets k)")
    p.add_argument("--data-dir", default="runs/bench-data/downlink")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    sizes = [int(s) for s in args.sizes.split(",")]
    model = build_model("tiny")
    spec = param_spec(model)
    codec = SparseLoCoCodec()
    try:  # a budget no k fits is an error before any work
        settings = PublishSettings(
            format="sparseloco", k=args.k, bits=args.bits, ef_beta=args.ef_beta, budget=args.budget
        )
        downlinks = {m: Downlink(settings, codec, spec) for m in sizes}
    except ValueError as e:
        p.error(str(e))
    meta = build_dataset(Path(args.data_dir), None, seq_len=128, max_tokens=4_000_000)
    data = Dataset(Path(args.data_dir))
    recipe = TrainingRecipe(inner_steps=args.inner_steps, batch_size=8)
    theta = get_params(model)
    trainers = [InnerTrainer(build_model("tiny"), recipe, torch.device("cpu")) for _ in range(args.miners)]
    feedback = [ErrorFeedback(recipe.ef_beta) for _ in range(args.miners)]
    last: list[dict[str, Any]] = []
    for r in range(args.rounds):
        payloads = []
        for i, (trainer, ef) in enumerate(zip(trainers, feedback, strict=True)):
            set_params(trainer.model, theta)
            ids = assignment(
                0, r, f"{i:064x}", recipe.inner_steps * recipe.batch_size, meta.num_sequences, meta.eval_every
            )
            trainer.run(data.sequences(ids))
            with torch.no_grad():
                local = dict(trainer.model.named_parameters())
                delta = {n: theta[n] - local[n].detach() for n, _ in spec}
            header = PayloadHeader(
                format_version=PAYLOAD_FORMAT_VERSION, codec="sparseloco", round=r, base_version=r
            )
            payload, decoded = codec.encode(ef.accumulate(delta), spec, header)
            ef.subtract(decoded)
            payloads.append(payload)
        decoded_all = [codec.decode(b, spec)[1] for b in payloads]
        last = []
        for m in sizes:
            agg = aggregate(decoded_all[:m], spec)
            header = UpdateHeader(base_version=r, version=r + 1, param_hash="0" * 64)
            exact = len(encode_update(agg, spec, header))
            compressed, applied, residual = downlinks[m].step(agg)
            downlinks[m].residual = residual
            published = len(downlinks[m].frame(compressed, applied, header))
            upload = statistics.fmean(len(b) for b in payloads[:m])
            last.append(
                {
                    "miners": m,
                    "upload_bytes": upload,
                    "exact_bytes": exact,
                    "published_bytes": published,
                    "published_vs_upload": published / upload,
                    "exact_vs_upload": exact / upload,
                }
            )
        apply_update(theta, aggregate(decoded_all, spec))
        log(
            f"round {r}: "
            + ", ".join(
                f"M={x['miners']} {x['published_vs_upload']:.2f}x (exact {x['exact_vs_upload']:.1f}x)"
                for x in last
            )
        )
    result = {
        "rows": last,
        "k": downlinks[sizes[0]].k,
        "settings": settings.model_dump(),
        "rounds": args.rounds,
        "targets": [
            {
                "check": f"M={x['miners']} published_vs_upload <= {TARGET}",
                "met": x["published_vs_upload"] <= TARGET,
            }
            for x in last
        ],
    }
    print(json.dumps(result) if args.json else json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
