"""The cost model against a real network: ``python -m benchmarks.cost_check --json``.

benchmarks.scale projects round timings from a model of what a round's close does (``close_cost``: the
evaluation's forward passes, aggregation, the outer step and the downlink, the held-out loss, two
model-sized writes) and from times measured on one machine. This runs a short real network of the same
model on this machine (``gradpool simulate``: a coordinator and ``--miners`` miners as processes, in
synchronous rounds, so that each close has the cores to itself while the miners wait for the next round),
reads every round's close time from the coordinator's log, and sets their median beside the model's
prediction for the same settings, from benchmarks.scale's measurement of the model on this CPU
(``--measured FILE``: an earlier ``benchmarks.scale --json`` output; else measured first, in a fresh
process). Small settings keep it short: one sequence a step, a few inner steps, a few evaluation and
held-out sequences, the first rounds' samples not doubled.

Output: ``{"model", "settings", "scale", "closes": [{"round", "seconds", "uploads", "builds"}],
"measured_close_s", "predicted", "error", "within", "met"}``; ``error`` is predicted over measured, less 1
(``met``: within ``--within``, 0.30 by default). A round whose version was built twice (the downlink's
residual left out when carrying it raised the held-out loss) is predicted with its second held-out pass.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import tomli_w

from benchmarks.aggregation import in_fresh_process
from benchmarks.close import write_corpus
from benchmarks.scale import close_cost, measure
from gradpool.simulate import simulate

CLOSED = re.compile(r"round (\d+) closed: version \d+, accepted (\d+), .* ([\d.]+) s$")
TWICE = re.compile(r"version (\d+): with the downlink's residual the held-out loss would be")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def closes(coordinator_log: str) -> list[dict[str, Any]]:
    """Each closed round's close time, uploads accepted and versions built, from the coordinator's log."""
    twice = {int(m[1]) for line in coordinator_log.splitlines() if (m := TWICE.search(line))}
    out = []
    for line in coordinator_log.splitlines():
        if m := CLOSED.search(line):
            r = int(m[1])  # synchronous rounds: round r makes version r + 1
            out.append(
                {"round": r, "seconds": float(m[3]), "uploads": int(m[2]), "builds": 1 + (r + 1 in twice)}
            )
    return out


def run_network(model: str, work: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    config = {
        "data": {"corpus": str(write_corpus(work / "corpus.txt")), "eval_sequences": args.held_out},
        "recipe": {"inner_steps": args.inner_steps, "batch_size": 1, "warmup_steps": 1},
        "rounds": {"deadline_s": 3600.0, "min_deadline_s": 3600.0},
        "validation": {"own_sequences": args.own, "other_sequences": args.other, "early_factor": 1},
    }
    (work / "coordinator.toml").write_text(tomli_w.dumps(config))
    log(f"{model}: a network of {args.miners} miners, {args.rounds} synchronous rounds ...")
    simulate(
        miners=args.miners,
        rounds=args.rounds,
        out=work / "run",
        model=model,
        config=work / "coordinator.toml",
        overlap=False,
        timeout_s=args.timeout_s,
        echo=log,
    )
    return closes((work / "run" / "logs" / "coordinator.log").read_text(errors="replace"))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--model", default="gpt2-124m", help="a preset (protocol/model.py)")
    p.add_argument(
        "--measured", type=Path, default=None, help="benchmarks.scale --json output with the model"
    )
    p.add_argument("--miners", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--inner-steps", type=int, default=2)
    p.add_argument("--own", type=int, default=4, help="own sequences evaluated per upload")
    p.add_argument("--other", type=int, default=4, help="other sequences evaluated per upload")
    p.add_argument("--held-out", type=int, default=4, help="held-out sequences per version")
    p.add_argument("--within", type=float, default=0.30, help="the largest relative error that passes")
    p.add_argument("--timeout-s", type=float, default=3600.0)
    args = p.parse_args(argv)
    if args.measured is not None:
        rows = json.loads(args.measured.read_text())["measured"]
        row = next((r for r in rows if r["model"] == args.model and r["device"] == "cpu"), None)
        if row is None:
            p.error(f"{args.measured} has no CPU measurement of {args.model}")
    else:
        log(f"{args.model}: measuring it on this CPU (benchmarks.scale) ...")
        row = in_fresh_process(measure, args.model, "cpu", 8, 4, max(2, args.miners), None)
    with tempfile.TemporaryDirectory(prefix="gradpool-cost-") as tmp:
        measured = run_network(args.model, Path(tmp), args)
    if not measured:
        raise SystemExit("no round closed: see the coordinator's log")
    for c in measured:
        extra = (c["builds"] - 1) * args.held_out  # a second build: its held-out loss again
        cost = close_cost(row, c["uploads"], args.own, args.other, args.held_out + extra)
        c["predicted_s"] = round(cost["close_s"], 3)
    median = statistics.median(c["seconds"] for c in measured)
    predicted = statistics.median(c["predicted_s"] for c in measured)
    error = predicted / median - 1
    result = {
        "model": args.model,
        "settings": {
            k: getattr(args, k) for k in ("miners", "rounds", "inner_steps", "own", "other", "held_out")
        },
        "scale": {
            k: row[k]
            for k in ("forward_s_per_sequence", "eval_ratio", "aggregate_s", "publish_s", "checkpoint_s")
        },
        "closes": measured,
        "measured_close_s": round(median, 3),
        "predicted": close_cost(row, args.miners, args.own, args.other, args.held_out),
        "predicted_close_s": round(predicted, 3),
        "error": round(error, 4),
        "within": args.within,
        "met": abs(error) <= args.within,
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(
            f"{args.model}: close measured {median:.1f} s (median of {len(measured)}), predicted "
            f"{predicted:.1f} s: {100 * error:+.1f} % ({'within' if result['met'] else 'beyond'} "
            f"{100 * args.within:.0f} %)"
        )
    return result


if __name__ == "__main__":
    main()
