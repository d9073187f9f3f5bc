"""A finished run's first rounds evaluated again on larger or smaller samples, offline: the leaderboard's
order as it would have been with that many own and other sequences in the run's first rounds.

    python -m benchmarks.resample RUN_DIR [--sizes 48,96,128] [--early 2,4,6] [--json]

``RUN_DIR`` is one network of ``benchmarks.adversarial --out`` (``coordinator.toml``, the coordinator's
state directory and ``report.json``). The state is copied first, so the run is never changed. Its versions
are rebuilt as ``benchmarks.replay`` rebuilds them, and every upload evaluated in the first ``max(--early)``
rounds is measured again, on the version it was evaluated on, on ``max(--sizes)`` own and other sequences
(drawn with the round's salt, as the coordinator draws them). A smaller size is the head of those samples,
which is exactly what that size draws (``RoundEvaluation.losses``).

For each size and each number of early rounds, the coordinator's verdicts on those rounds are replaced by
the ones measured at that size, and the leaderboard is made again as of each round (coordinator/rounds/).
Per row: ``honest_outrank_fraction`` as ``benchmarks.adversarial`` counts it, the rounds ``lost`` and the
smallest ``gap`` (the worst honest score less the best cheater's) over the counted rounds. ``recorded`` is
the same from the run's own verdicts. ``measured`` is what each size measured of each miner's upload in
each measured round (its ``gain`` and own-data ``t``). Training is the run's: what a different evaluation
would have changed in the versions (through the refusals that use the gain) is not replayed.

    {"run", "kind", "rounds_measured", "recorded": {...}, "rows": [{"sequences", "early_rounds",
     "honest_outrank_fraction", "lost", "gap"}], "measured": {round: {size: {miner: {"gain", "t"}}}}}
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.adversarial import SKIP_ROUNDS, gaps, in_order
from benchmarks.replay import Recorded, copied_run
from coordinator.rounds.scoring import leaderboard
from coordinator.run import Run
from coordinator.storage.store import COORDINATOR
from protocol.evaluation import Losses, UpdateEvaluator, round_salt
from protocol.pairing import RoundEvaluation


def measure(run: Run, rounds: int, sizes: list[int]) -> dict[int, dict[int, dict[str, Losses]]]:
    """{round: {size: {miner: losses}}} for the uploads evaluated in the first ``rounds`` rounds."""
    p, recorded = run, Recorded(run)
    largest = max(sizes)
    evaluation = p.info.evaluation.model_copy(
        update={"own_sequences": largest, "other_sequences": largest, "early_factor": 1}
    )
    info = p.info.model_copy(update={"evaluation": evaluation})
    params, out = recorded.params, {}
    for v in recorded.committed[1:]:
        r = v.round
        if r >= rounds:
            break
        recorded.clear()
        subs = run.store.round_uploads(r)
        judged = [u for u in subs if u.evaluated and u.scale is not None]
        salt = round_salt(u.sha256 for u in subs)
        evaluator = UpdateEvaluator(run.model.module, params, p.dataset.sequences)
        round_ = RoundEvaluation(evaluator, info, r, salt, [u.miner for u in judged])
        for u in judged:  # the payloads read once, for this and for the rebuild below
            payload = recorded.load(u)[0]
            round_.measure(u.miner, p.codec.decode(payload, p.spec)[1], u.scale or 1.0)
        out[r] = {n: round_.losses((n, n)) for n in sizes}
        built = recorded.rebuilt(run, params, v)
        if built is None:
            raise SystemExit(f"version {v.version} did not rebuild bit for bit")
        run.publisher.commit(built)
        params = built.params
    return out


def names_of(report: dict[str, Any]) -> dict[str, str]:
    """The run's miners' names by key."""
    return {m["miner"]: m["name"] for m in report["miners"]}


def order(run: Run, report: dict[str, Any]) -> dict[str, Any]:
    """The leaderboard's order, round by round, from the verdicts now in the store."""
    names = names_of(report)
    boards = [
        {
            "round": row["round"],
            "scores": {
                names[e.miner]: e.score
                for e in leaderboard(run.store, run.settings.validation, row["round"])
                if e.miner in names
            },
        }
        for row in report["scores"]
    ]
    counted = gaps({"miners": report["miners"], "scores": boards}, SKIP_ROUNDS)
    return {
        "honest_outrank_fraction": in_order(counted),
        "lost": [r for r, g in counted.items() if g <= 0],
        "gap": round(min(counted.values()), 4),
    }


def resample(run_dir: Path, work: Path, sizes: list[int], early: list[int]) -> dict[str, Any]:
    report = json.loads((run_dir / "report.json").read_text())
    run = copied_run(run_dir, work)
    try:
        measured = measure(run, max(early), sizes)
        store = run.store
        kept = {
            r: {v.miner: v.losses for v in store.verdicts_between(r - 1, r) if v.validator == COORDINATOR}
            for r in measured
        }
        recorded, rows = order(run, report), []
        for n, e in itertools.product(sizes, early):
            for r in measured:
                store.add_verdicts(r, COORDINATOR, measured[r][n] if r < e else kept[r], 0.0)
            rows.append({"sequences": n, "early_rounds": e, **order(run, report)})
        return {
            "run": str(run_dir),
            "kind": run_dir.name,
            "rounds_measured": len(measured),
            "recorded": recorded,
            "rows": rows,
            "measured": _by_name(measured, names_of(report)),
        }
    finally:
        run.close()


def _by_name(measured: dict[int, dict[int, dict[str, Losses]]], names: dict[str, str]) -> dict[str, Any]:
    """``measure``'s losses as JSON: {round: {size: {miner's name: {"gain", "t"}}}}."""
    return {
        str(r): {
            str(n): {names.get(m, m): {"gain": round(x.gain, 6), "t": round(x.t, 4)} for m, x in row.items()}
            for n, row in by_size.items()
        }
        for r, by_size in measured.items()
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.resample", description=__doc__.split("\n")[0])
    ap.add_argument("run_dir", type=Path, help="one network of benchmarks.adversarial --out")
    ap.add_argument("--sizes", default="48,96,128", help="own and other sequences, comma-separated")
    ap.add_argument("--early", default="2,4,6", help="numbers of first rounds measured at those sizes")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    try:
        sizes = [int(x) for x in args.sizes.split(",")]
        early = [int(x) for x in args.early.split(",")]
    except ValueError:
        ap.error("--sizes and --early take comma-separated whole numbers")
    if min(sizes) < 2 or min(early) < 1:
        ap.error("sizes are at least 2 sequences and early rounds at least 1")
    if not all((args.run_dir / f).exists() for f in ("coordinator.toml", "coordinator", "report.json")):
        ap.error(
            f"{args.run_dir}: not a network of benchmarks.adversarial --out (coordinator.toml, "
            "coordinator/, report.json)"
        )
    with tempfile.TemporaryDirectory(prefix="gradpool-resample-") as tmp:
        result = resample(args.run_dir, Path(tmp), sizes, early)
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    rec = result["recorded"]
    print(f"{result['kind']}: as recorded {rec['honest_outrank_fraction']:.2f} (lost {rec['lost']})")
    for row in result["rows"]:
        fraction, lost, gap = row["honest_outrank_fraction"], row["lost"], row["gap"]
        print(
            f"{row['sequences']:4d} sequences in the first {row['early_rounds']} rounds: {fraction:.2f} "
            f"(lost {lost}, gap {gap:+.3f})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
