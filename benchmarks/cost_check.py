"""The cost model against a real network: ``python -m benchmarks.cost_check --json``.

benchmarks.scale projects round timings from a model of what a round's close does (``close_cost``: the
evaluation's forward passes, aggregation, the outer step and the downlink, the held-out loss, two
model-sized writes) and from times measured on one machine. This runs a short real network of the same
model on this machine (``gradpool simulate``: a coordinator and ``--miners`` miners as processes, in
synchronous rounds, so that each close has the cores to itself while the miners wait for the next round),
reads every round's close time from the coordinator's log, and sets them beside the model's prediction
for the same settings (each round's uploads, those accepted, and the versions it built), from
benchmarks.scale's measurement of the same model on this CPU: the preset with the network's vocabulary
(the byte tokenizer's 256, not GPT-2's 50257: a head 200 times smaller), measured first in a fresh
process, or read from ``--measured FILE`` (an earlier ``benchmarks.scale --json`` output with that
vocabulary). Small settings keep it short: one sequence a step, a few inner steps, a few evaluation and
held-out sequences, the first rounds' samples not doubled. A miner's own sample is at most its
assignment (inner steps x one sequence).

Output: ``{"model", "settings", "scale", "closes": [{"round", "seconds", "uploads", "accepted", "builds",
"predicted_s", "error"}], "measured_close_s", "predicted", "predicted_close_s", "error", "within",
"met"}``; ``error`` is the predicted time of all the closes over the measured, less 1 (``met``: within
``--within``, 0.30 by default), each close's its own. A round whose version was built more than once
(without the downlink's residual, or clipped: the publisher's log line gives each build's held-out loss)
is predicted with a held-out pass for each.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

import tomli_w

from benchmarks.aggregation import in_fresh_process
from benchmarks.close import write_corpus
from benchmarks.scale import close_cost, measure
from gradpool.simulate import simulate

BYTE_VOCAB = 256  # the default tokenizer's vocabulary, the network's
CLOSED = re.compile(r"round (\d+) closed: version \d+, accepted (\d+), refused (\d+).* ([\d.]+) s$")
BUILT = re.compile(r"version (\d+): the held-out loss would be (.*) \(was ")  # a version built more than once
EACH = re.compile(r"(?:^|, )(?:[\d.]+|nan|inf) ")  # one build's held-out loss in that line


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def closes(coordinator_log: str) -> list[dict[str, Any]]:
    """Each closed round's close time, uploads (those accepted and refused: in these networks every one is
    evaluated), uploads accepted and versions built (none when nothing was accepted), from the
    coordinator's log."""
    lines = coordinator_log.splitlines()
    builds = {int(m[1]): len(EACH.findall(m[2])) for line in lines if (m := BUILT.search(line))}
    out = []
    for line in lines:
        if m := CLOSED.search(line):
            r, accepted, refused = int(m[1]), int(m[2]), int(m[3])  # round r makes version r + 1
            row = {"round": r, "seconds": float(m[4]), "uploads": accepted + refused, "accepted": accepted}
            out.append({**row, "builds": builds.get(r + 1, 1) if accepted else 0})
    return out


def run_network(model: str, work: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    config = {
        "data": {"corpus": str(write_corpus(work / "corpus.txt")), "eval_sequences": args.held_out},
        "recipe": {"inner_steps": args.inner_steps, "batch_size": 1, "warmup_steps": 1, "lr": args.lr},
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
    p.add_argument("--lr", type=float, default=6e-4, help="the inner rate (configs/gpt2-124m.toml's peak)")
    p.add_argument("--own", type=int, default=4, help="own sequences evaluated per upload")
    p.add_argument("--other", type=int, default=4, help="other sequences evaluated per upload")
    p.add_argument("--held-out", type=int, default=4, help="held-out sequences per version")
    p.add_argument("--within", type=float, default=0.30, help="the largest relative error that passes")
    p.add_argument("--timeout-s", type=float, default=3600.0)
    args = p.parse_args(argv)
    vocab = BYTE_VOCAB
    if args.measured is not None:
        rows = json.loads(args.measured.read_text())["measured"]
        row = next(
            (r for r in rows if (r["model"], r["device"], r.get("vocab_size")) == (args.model, "cpu", vocab)),
            None,
        )
        if row is None:
            p.error(f"{args.measured} has no CPU measurement of {args.model} with a vocabulary of {vocab}")
    else:
        log(f"{args.model}: measuring it on this CPU, vocabulary {vocab} (benchmarks.scale) ...")
        row = in_fresh_process(measure, args.model, "cpu", 8, 4, max(2, args.miners), None, vocab)
    own = min(args.own, args.inner_steps)  # drawn from the miner's assignment: one sequence a step
    with tempfile.TemporaryDirectory(prefix="gradpool-cost-") as tmp:
        measured = run_network(args.model, Path(tmp), args)
    if not measured:
        raise SystemExit("no round closed: see the coordinator's log")
    for c in measured:
        held_out = c["builds"] * args.held_out  # each build: its held-out loss again
        cost = close_cost(row, c["uploads"], own, args.other, held_out, accepted=c["accepted"])
        c["predicted_s"] = round(cost["close_s"], 3)
        c["error"] = round(cost["close_s"] / c["seconds"] - 1, 4)
    total = sum(c["seconds"] for c in measured)
    predicted = sum(c["predicted_s"] for c in measured)
    error = predicted / total - 1
    result = {
        "model": args.model,
        "settings": {
            k: getattr(args, k) for k in ("miners", "rounds", "inner_steps", "lr", "own", "other", "held_out")
        },
        "scale": row,
        "closes": measured,
        "measured_close_s": round(total, 3),
        "own_sequences_evaluated": own,
        "predicted": close_cost(row, args.miners, own, args.other, args.held_out),
        "predicted_close_s": round(predicted, 3),
        "error": round(error, 4),
        "within": args.within,
        "met": abs(error) <= args.within,
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(
            f"{args.model}: {len(measured)} closes measured {total:.1f} s in all, predicted "
            f"{predicted:.1f} s: {100 * error:+.1f} % ({'within' if result['met'] else 'beyond'} "
            f"{100 * args.within:.0f} %)"
        )
    return result


if __name__ == "__main__":
    main()
