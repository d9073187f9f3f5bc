"""What sharing the evaluation among validators saves the coordinator: ``python -m benchmarks.validators
--json``.

Two runs of one network (``gradpool simulate``: a coordinator and three miners as processes on this
machine, the same keys in both): the coordinator evaluating every sampled upload itself (``builtin``), and
the coordinator sharing the evaluation with two validators (``[validation] assign``, redundancy 2: each
upload evaluated by both, the coordinator settling their verdicts and evaluating only what they leave).
The miners are one honest, one ``lazy`` (trains on random sequences instead of its own) and one ``noise``
(a random update of an honest norm), so that the leaderboard has an order to keep: that is what
evaluation is for. The validators get ``--deadline-s`` (600 s) for their verdicts: on this machine's two
cores they share the CPU with three miners and the coordinator, and the first rounds' samples are doubled.

- ``coordinator_cpu_s_per_round``: the coordinator process's CPU time (user + system, from /proc) from the
  close of the first round to the scoring of the last, over the rounds between: its work per round once
  running (the start, which builds the dataset and the model, left out);
- ``coordinator_cpu_ratio``: built-in over shared;
- ``same_order``: the final leaderboards rank the miners (by name) the same in both runs; both boards are
  in ``leaderboards``;
- ``validator_records``: each validator's record in the shared run (``GET /v1/validators``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from gradpool.simulate import simulate

MINERS = {"lazy": 1, "noise": 1}  # beside one honest miner


def one_run(out: Path, validators: int, args: argparse.Namespace, keys: Path | None) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    if keys is not None:  # the same miners in both runs
        shutil.copytree(keys, out / "keys")
    config = out / "bench.toml"
    config.write_text(f"[validation]\nverdict_deadline_s = {args.deadline_s}\n")
    report = simulate(
        config=config,
        miners=1,
        adversaries=MINERS,
        rounds=args.rounds,
        out=out,
        model=args.model,
        validators=validators,
        max_tokens=args.max_tokens,
        echo=lambda line: print(line, file=sys.stderr),
    )
    rows = report["rounds"]
    spent = report["coordinator_cpu_s"] - rows[0]["coordinator_cpu_s"]
    board = sorted(report["miners"], key=lambda m: -(m["score"] if m["score"] is not None else -1e9))
    return {
        "validators": validators,
        "coordinator_cpu_s": report["coordinator_cpu_s"],
        "coordinator_cpu_s_per_round": spent / max(1, len(rows) - 1),
        "round_wall_s": sum(r["wall_s"] for r in rows[1:]) / max(1, len(rows) - 1),
        "final_eval_loss": report["final_eval_loss"],
        "leaderboard": [{"name": m["name"], "score": m["score"]} for m in board],
        "validator_records": report.get("validators", []),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.validators", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="small", help="the preset both runs train")
    ap.add_argument("--rounds", type=int, default=6, help="rounds per run")
    ap.add_argument("--max-tokens", type=int, default=2_000_000, help="corpus tokens")
    ap.add_argument(
        "--deadline-s",
        type=float,
        default=600.0,
        help="[validation] verdict_deadline_s: validators on this machine's 2 shared cores are slow",
    )
    ap.add_argument("--out", type=Path, default=None, help="keep the runs here (default: a temporary folder)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="gradpool-validators-") as tmp:
        root = args.out or Path(tmp)
        builtin = one_run(root / "builtin", 0, args, None)
        shared = one_run(root / "shared", 2, args, root / "builtin" / "keys")
    ratio = builtin["coordinator_cpu_s_per_round"] / max(shared["coordinator_cpu_s_per_round"], 1e-9)
    order = [[m["name"] for m in run["leaderboard"]] for run in (builtin, shared)]
    result = {
        "model": args.model,
        "rounds": args.rounds,
        "miners": {"honest": 1, **MINERS},
        "verdict_deadline_s": args.deadline_s,
        "coordinator_cpu_ratio": round(ratio, 2),
        "same_order": order[0] == order[1],
        "coordinator_cpu_s_per_round": {
            "builtin": round(builtin["coordinator_cpu_s_per_round"], 2),
            "shared": round(shared["coordinator_cpu_s_per_round"], 2),
        },
        "round_wall_s": {
            "builtin": round(builtin["round_wall_s"], 2),
            "shared": round(shared["round_wall_s"], 2),
        },
        "final_eval_loss": {"builtin": builtin["final_eval_loss"], "shared": shared["final_eval_loss"]},
        "leaderboards": {"builtin": builtin["leaderboard"], "shared": shared["leaderboard"]},
        "validator_records": shared["validator_records"],
    }
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        cpu = result["coordinator_cpu_s_per_round"]
        print(
            f"coordinator CPU per round: {cpu['builtin']} s built-in, {cpu['shared']} s shared "
            f"({result['coordinator_cpu_ratio']}x); same order: {result['same_order']}"
        )
    return result


if __name__ == "__main__":
    main()
