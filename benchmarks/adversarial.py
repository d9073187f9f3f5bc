"""Cheaters against the scores: ``python -m benchmarks.adversarial --json``.

Each run is a real ``gradpool simulate`` network on 127.0.0.1 (a coordinator process and one process per
miner) with the coordinator's default checks, evaluation and aggregation. First ``--miners`` (8) honest
miners alone; then, for each kind in turn, the same 8 honest miners (the same keys, so the same data
assignments) and ``--cheaters`` (2) more that cheat that way (node/adversary.py). The honest work is thus
the same in every run, and the loss compares what the cheaters did to the model. The model, corpus,
recipe and rounds (``--rounds``, 24) are the same in every run.

- ``final_eval_loss``: held-out loss after the last round.
- ``honest_outrank_fraction``: of the rounds after the first 3, the fraction in which every honest miner's
  score (the leaderboard's moving average as of that round's close) was above every cheater's. A cheater
  the coordinator never recorded (no upload got as far as being refused) counts as below everyone.
- ``loss_vs_honest``: final_eval_loss / honest_final_eval_loss.
- ``tail_eval_loss``: the mean held-out loss of the last ``TAIL`` (4) versions, and ``tail_vs_honest`` its
  ratio to the honest-only run's: one version's loss moves by a percent or two from round to round, so
  a single run's last version is a noisy reference; the tail is less so.

``--mixes 8:2,6:3,4:4`` (honest:cheaters) runs all of that for each mix in turn, each with its own
honest-only runs as the loss reference, under ``"mixes"``; the top-level fields are the first mix's.

The loss reference is ``--references`` (3) honest-only runs of the mix, with the same keys:
``honest_final_eval_loss`` is the mean of their final losses (``honest_final_eval_losses``), and
``honest_sd`` their standard deviation. Two overlapped runs of one network end a percent or two apart
(which uploads make which version depends on timing), so one run alone is too noisy a reference for a
2 % band. ``--compare FILE...`` runs no network: it pools every honest-only run of each mix in the given
result files as that mix's reference and measures every cheater run in them against it.

    python -m benchmarks.adversarial --json > benchmarks/results/adversarial.json
    python -m benchmarks.adversarial --kinds noise,lazy --rounds 6
    python -m benchmarks.adversarial --mixes 6:3,4:4 --kinds lazy,freerider --json
    python -m benchmarks.adversarial --sync --json   # synchronous rounds, for comparison
    python -m benchmarks.adversarial --mixes 8:2,6:3,4:4 --kinds '' --json > refs.json  # references only
    python -m benchmarks.adversarial --compare benchmarks/results/adversarial.json refs.json
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, get_args

from gradpool.simulate import simulate
from node.settings import AdversaryKind

KINDS: tuple[str, ...] = get_args(AdversaryKind)
SKIP_ROUNDS = 3
TAIL = 4  # versions whose mean held-out loss is ``tail_eval_loss``


def outrank_fraction(report: dict[str, Any], skip: int = SKIP_ROUNDS, worker: str | None = None) -> float:
    return in_order(gaps(report, skip, worker))


def in_order(counted: dict[int, float]) -> float:
    """The fraction of rounds whose gap (``gaps``) is above 0."""
    return sum(gap > 0 for gap in counted.values()) / len(counted) if counted else float("nan")


def gaps(report: dict[str, Any], skip: int = SKIP_ROUNDS, worker: str | None = None) -> dict[int, float]:
    """Per round from ``skip`` on: the worst honest score less the best cheater's (above 0: in order).
    ``worker``: a sybil operator's key that did the work, which is neither."""
    kinds = {m["name"]: m["kind"] for m in report["miners"] if m["name"] != worker}
    honest = [n for n, k in kinds.items() if k == "honest"]
    cheats = [n for n, k in kinds.items() if k != "honest"]
    out = {}
    for row in report["scores"]:
        if row["round"] >= skip:
            scores = row["scores"]
            worst_honest = min(scores.get(n, -math.inf) for n in honest)
            out[row["round"]] = worst_honest - max(scores.get(n, -math.inf) for n in cheats)
    return out


def tail_loss(report: dict[str, Any], versions: int = TAIL) -> float:
    """The mean held-out loss of the run's last ``versions`` versions."""
    losses = [r["eval_loss"] for r in report["rounds"] if r.get("eval_loss") is not None][-versions:]
    return sum(losses) / len(losses) if losses else float("nan")


COPY_REFUSED, COPY_SCORE = (
    0.9,
    0.05,
)  # a copy is stopped when refused this often, or when it scores this little


def operator_outcome(out: Path, report: dict[str, Any]) -> dict[str, Any]:
    """A sybil operator's keys against the honest miners: how often each copy was refused, what each scored,
    and what the operator earned in all against the best honest miner."""
    miners = {m["name"]: m for m in report["miners"]}
    claim = out / "sybil" / "first-key"
    first = claim.read_text().strip() if claim.exists() else None
    keys = {n: m for n, m in miners.items() if m["kind"] == "sybil"}
    worker = next((n for n, m in keys.items() if m.get("miner") == first), None)
    rounds = max(1, len(report["rounds"]))
    copies = {
        n: {"refused_fraction": m["rounds_refused"] / rounds, "score": m["score"] or 0.0}
        for n, m in keys.items()
        if n != worker
    }
    summed = sum(m["score"] or 0.0 for m in keys.values())
    best_honest = max((m["score"] or 0.0 for m in miners.values() if m["kind"] == "honest"), default=0.0)
    stopped = all(c["refused_fraction"] >= COPY_REFUSED or c["score"] <= COPY_SCORE for c in copies.values())
    return {
        "worker": worker,
        "copies": copies,
        "operator_summed_score": summed,
        "best_honest_score": best_honest,
        "copies_stopped": stopped,
        "operator_at_most_one_honest": summed <= best_honest,
    }


MINER_FIELDS = ("name", "kind", "score", "rounds_contributed", "rounds_refused", "refusals", "flagged")


def run(
    out: Path,
    miners: int,
    rounds: int,
    kind: str | None,
    count: int,
    keys: Path | None = None,
    overlap: bool | None = None,
) -> dict[str, Any]:
    """One network; ``keys``: a folder of honest miners' keys to reuse (simulate keeps existing ones);
    ``overlap``: the rounds' mode (None: the coordinator's default)."""
    t0 = time.perf_counter()
    if keys is not None:
        shutil.copytree(keys, out / "keys", dirs_exist_ok=True)
    adversaries = {} if kind is None else {kind: count}
    report = simulate(
        miners=miners, rounds=rounds, out=out, adversaries=adversaries, echo=lambda _: None, overlap=overlap
    )
    result = {
        "kind": kind or "honest",
        "final_eval_loss": report["final_eval_loss"],
        "tail_eval_loss": tail_loss(report),
        "wall_s": round(time.perf_counter() - t0, 1),
        "miners": [{k: m.get(k) for k in MINER_FIELDS} for m in report["miners"]],
    }
    if kind == "sybil":  # its first key's work is honest; what counts is what its other keys earn
        result["sybil"] = operator_outcome(out, report)
        result["honest_outrank_fraction"] = outrank_fraction(report, worker=result["sybil"]["worker"])
    elif kind is not None:
        result["honest_outrank_fraction"] = outrank_fraction(report)
    line = f"{miners}+{count} {result['kind']}: loss {result['final_eval_loss']:.4f}, {result['wall_s']} s"
    print(line, file=sys.stderr)
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--miners", type=int, default=8, help="honest miners in every run")
    ap.add_argument("--cheaters", type=int, default=2, help="cheating miners added in each kind's run")
    ap.add_argument(
        "--rounds", type=int, default=24, help="rounds in every run (enough to separate lazy miners)"
    )
    ap.add_argument("--kinds", default=",".join(KINDS), help="comma-separated kinds to run")
    ap.add_argument("--out", type=Path, default=None, help="keep the runs here (default: a temporary folder)")
    ap.add_argument("--mixes", type=mix_list, default=None, help="honest:cheaters pairs, e.g. 8:2,6:3,4:4")
    ap.add_argument("--sync", action="store_true", help="synchronous rounds (default: overlapped)")
    ap.add_argument("--references", type=int, default=3, help="honest-only runs per mix (the loss reference)")
    ap.add_argument(
        "--compare",
        type=Path,
        nargs="+",
        default=None,
        metavar="FILE",
        help="run nothing: measure the cheater runs of these result files against all their "
        "honest-only runs, per mix",
    )
    args = ap.parse_args(argv)
    if args.compare is not None:
        return _print(compare(args.compare, ap), args.json)
    kinds = [k for k in args.kinds.split(",") if k]
    if unknown := set(kinds) - set(KINDS):
        ap.error(f"unknown kinds {sorted(unknown)}; choose from {', '.join(KINDS)}")
    if args.references < 1:
        ap.error("--references must be at least 1")
    mixes = args.mixes or [(args.miners, args.cheaters)]
    with tempfile.TemporaryDirectory(prefix="gradpool-adversarial-") as tmp:
        root = args.out or Path(tmp)
        overlap = False if args.sync else None
        done = [
            one_mix(root / f"mix-{h}-{c}", h, c, args.rounds, kinds, overlap, args.references)
            for h, c in mixes
        ]
    result = {
        **{k: v for k, v in done[0].items() if k in ("honest_final_eval_loss", "runs", "honest_run")},
        "config": {
            "miners": mixes[0][0],
            "cheaters": mixes[0][1],
            "rounds": args.rounds,
            "model": "tiny",
            "skip_rounds": SKIP_ROUNDS,
            "overlap": not args.sync,
            "references": args.references,
        },
        "mixes": done,
    }
    return _print(result, args.json)


def _print(result: dict[str, Any], as_json: bool) -> dict[str, Any]:
    if as_json:
        print(json.dumps(result, indent=1))
        return result
    for mix in result["mixes"]:
        losses = ", ".join(f"{x:.4f}" for x in mix["honest_final_eval_losses"])
        print(f"{mix['mix']} honest: {mix['honest_final_eval_loss']:.4f} (runs {losses})")
        for r in mix["runs"]:
            print(
                f"{r['kind']:>10}: loss {r['final_eval_loss']:.4f} ({r['loss_vs_honest']:.3f}x), "
                f"honest outrank {r['honest_outrank_fraction']:.2f}"
            )
    return result


def one_mix(
    root: Path,
    honest: int,
    cheaters: int,
    rounds: int,
    kinds: list[str],
    overlap: bool | None = None,
    references: int = 1,
) -> dict[str, Any]:
    """``references`` honest-only networks, then one per kind with ``cheaters`` of that kind beside the same
    honest miners (all with the first network's keys)."""
    keys = root / "honest" / "keys"
    bases = [run(root / "honest", honest, rounds, None, 0, overlap=overlap)]
    bases += [run(root / f"honest-{i}", honest, rounds, None, 0, keys, overlap) for i in range(1, references)]
    runs = [run(root / k, honest, rounds, k, cheaters, keys, overlap) for k in kinds]
    return referenced({"mix": f"{honest}:{cheaters}", "honest": honest, "cheaters": cheaters}, bases, runs)


def referenced(
    mix: dict[str, Any], bases: list[dict[str, Any]], runs: list[dict[str, Any]]
) -> dict[str, Any]:
    """A mix's entry: its honest-only runs as the loss reference (the mean of each figure), and its
    cheater runs measured against that (a result file older than ``tail_eval_loss`` has no tail)."""
    final = [b["final_eval_loss"] for b in bases]
    tails = [b["tail_eval_loss"] for b in bases if "tail_eval_loss" in b]
    reference, tail = statistics.fmean(final), statistics.fmean(tails) if tails else None
    for r in runs:
        r["loss_vs_honest"] = r["final_eval_loss"] / reference
        r["tail_vs_honest"] = (
            r["tail_eval_loss"] / tail if tail is not None and "tail_eval_loss" in r else None
        )
    return {
        **mix,
        "honest_final_eval_loss": reference,
        "honest_final_eval_losses": final,
        "honest_sd": statistics.stdev(final) if len(final) > 1 else None,
        "honest_tail_eval_loss": tail,
        "runs": runs,
        "honest_run": bases[0],
        "honest_runs": bases,
    }


def compare(files: list[Path], ap: argparse.ArgumentParser) -> dict[str, Any]:
    """The cheater runs of result files, each against all the honest-only runs of its mix in them."""
    heads: dict[str, dict[str, Any]] = {}
    bases: dict[str, list[dict[str, Any]]] = {}
    runs: dict[str, list[dict[str, Any]]] = {}
    for path in files:
        try:
            for entry in json.loads(path.read_text())["mixes"]:
                mix = entry["mix"]
                heads.setdefault(mix, {k: entry[k] for k in ("mix", "honest", "cheaters")})
                found = entry.get("honest_runs") or [entry["honest_run"]]
                cheats = [dict(r, source=path.name) for r in entry["runs"]]
                if any(not isinstance(r["final_eval_loss"], (int, float)) for r in found + cheats):
                    raise TypeError("a final_eval_loss that is no number")
                bases.setdefault(mix, []).extend(found)
                runs.setdefault(mix, []).extend(cheats)
        except (OSError, ValueError, KeyError, TypeError) as e:
            ap.error(f"{path}: not a benchmarks.adversarial result ({type(e).__name__}: {e})")
    done = [referenced(head, bases[mix], runs[mix]) for mix, head in heads.items()]
    return {"compared": [str(f) for f in files], "mixes": done}


def mix_list(text: str) -> list[tuple[int, int]]:
    try:
        pairs = [tuple(int(x) for x in part.split(":")) for part in text.split(",") if part]
    except ValueError:
        pairs = []
    if not pairs or any(len(p) != 2 or p[0] < 1 or p[1] < 1 for p in pairs):
        raise argparse.ArgumentTypeError(f"expected honest:cheaters pairs such as 8:2,6:3, got {text!r}")
    return [(p[0], p[1]) for p in pairs]


if __name__ == "__main__":
    main()
