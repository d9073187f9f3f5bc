"""Rounds over shaped links: the coordinator in the root network namespace, each miner in a namespace of
its own on a veth pair whose two ends are rate-limited with ``tc qdisc ... tbf`` (the miner's upload on its
end, its download on the coordinator's end). Synchronous and overlapped rounds run the same network; the
output also projects round time and utilisation to larger models.

    python -m benchmarks.network --json > benchmarks/results/network.json
    python -m benchmarks.network --up-mbit 20 --down-mbit 100 --miners 4 --rounds 8 --model small

Needs root and iproute2 (``ip``, ``tc``); it is not part of the test suite. Every namespace and link it
makes is removed when it ends, also when interrupted; a run that was killed outright leaves names starting
with ``gpnet``, which the next run removes first.

Compute: with ``--pin`` (the default, on a machine of two or more cores) the coordinator runs on the first
core and the miners share the others, as a coordinator has a machine of its own; ``--no-pin`` lets every
process share every core.

Latency: this kernel has tbf but no netem, so no propagation delay is added. tbf's queue (``latency``
below) bounds how long a packet may wait for its tokens; the links are otherwise ideal. The projection
counts transfer time from the rate alone, as the shaped runs do.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

PREFIX = "gpnet"
BRIDGE = f"{PREFIX}-br"
SUBNET = "10.213.0"
COORDINATOR_IP = f"{SUBNET}.1"
QUEUE = "latency 200ms"  # tbf's queue: how long a packet may wait for tokens before it is dropped
ROUND_LINE = re.compile(r"round (\d+): version .*\(compute ([\d.]+) s, transfer ([\d.]+) s\)")
MERGE_LINE = re.compile(r"round (\d+): merged version \d+ after (\d+) of (\d+) inner steps")
PROJECTED = {"124m": 124_000_000, "1b": 1_000_000_000, "8b": 8_000_000_000}


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


def preflight() -> str | None:
    """Why this cannot run here, or None."""
    if os.geteuid() != 0:
        return "benchmarks.network needs root (network namespaces, veth pairs and tc)"
    missing = [t for t in ("ip", "tc", "taskset") if shutil.which(t) is None]
    if missing:
        return f"benchmarks.network needs iproute2 and taskset: {', '.join(missing)} not found"
    return None


def remove_leftovers() -> None:
    """Every namespace and link a run of this benchmark made (removing a namespace removes its veth)."""
    for ns in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split("\n"):
        name = ns.split(" ")[0]
        if name.startswith(PREFIX):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    for name in re.findall(rf"^\d+: ({PREFIX}[\w-]*)[@:]", links, flags=re.M):
        subprocess.run(["ip", "link", "del", name], capture_output=True)


@contextlib.contextmanager
def shaped_links(miners: int, up_mbit: float, down_mbit: float) -> Iterator[list[list[str]]]:
    """A bridge for the coordinator and a namespace per miner; yields the command prefix of each
    miner's namespace. Removes everything on the way out."""
    remove_leftovers()
    try:
        sh("ip", "link", "add", BRIDGE, "type", "bridge")
        sh("ip", "addr", "add", f"{COORDINATOR_IP}/24", "dev", BRIDGE)
        sh("ip", "link", "set", BRIDGE, "up")
        prefixes = []
        for i in range(miners):
            ns, host, inner = f"{PREFIX}-m{i}", f"{PREFIX}-h{i}", f"{PREFIX}-n{i}"
            run_in = ["ip", "netns", "exec", ns]
            sh("ip", "netns", "add", ns)
            sh("ip", "link", "add", host, "type", "veth", "peer", "name", inner)
            sh("ip", "link", "set", inner, "netns", ns)
            sh("ip", "link", "set", host, "master", BRIDGE)
            sh("ip", "link", "set", host, "up")
            sh(*run_in, "ip", "addr", "add", f"{SUBNET}.{10 + i}/24", "dev", inner)
            sh(*run_in, "ip", "link", "set", inner, "up")
            sh(*run_in, "ip", "link", "set", "lo", "up")
            # what leaves the coordinator's end is the miner's download; what leaves the miner's, its upload
            sh(
                "tc",
                "qdisc",
                "add",
                "dev",
                host,
                "root",
                "tbf",
                "rate",
                f"{down_mbit}mbit",
                "burst",
                burst(down_mbit),
                *QUEUE.split(),
            )
            sh(
                *run_in,
                "tc",
                "qdisc",
                "add",
                "dev",
                inner,
                "root",
                "tbf",
                "rate",
                f"{up_mbit}mbit",
                "burst",
                burst(up_mbit),
                *QUEUE.split(),
            )
            prefixes.append(run_in)
        yield prefixes
    finally:
        remove_leftovers()


def burst(mbit: float) -> str:
    """The token bucket: 10 ms at the rate, at least 32 KiB (enough for a full-size segment burst)."""
    return f"{max(32 * 1024, int(mbit * 1e6 / 8 / 100))}b"


def cores(pin: bool) -> tuple[set[int], list[str]]:
    """The coordinator's cores (this process's, which it inherits) and the prefix that puts a miner on the
    others: the first core and the rest when pinned, else every core for both."""
    mine = sorted(os.sched_getaffinity(0))
    if not pin or len(mine) < 2:
        return set(mine), []
    return {mine[0]}, ["taskset", "-c", ",".join(map(str, mine[1:]))]


def run_mode(overlap: bool, args: argparse.Namespace, prefixes: list[list[str]]) -> dict[str, Any]:
    from gradpool.simulate import simulate

    out = args.out / ("overlap" if overlap else "sync")
    shutil.rmtree(out, ignore_errors=True)
    report = simulate(
        miners=args.miners,
        rounds=args.rounds,
        out=out,
        model=args.model,
        inner_steps=args.inner_steps,
        max_tokens=args.max_tokens,
        timeout_s=args.timeout_s,
        overlap=overlap,
        host=COORDINATOR_IP,
        wrap=lambda i: [*prefixes[i], *args.miner_prefix],
        echo=lambda line: print(line, file=sys.stderr),
    )
    transfers: dict[int, list[float]] = {}
    merged: dict[int, list[float]] = {}  # overlapped rounds: where in the inner steps the version came
    for i in range(args.miners):
        log = (out / "logs" / f"miner-{i}.log").read_text(errors="replace")
        for m in ROUND_LINE.finditer(log):
            transfers.setdefault(int(m.group(1)), []).append(float(m.group(3)))
        for m in MERGE_LINE.finditer(log):
            merged.setdefault(int(m.group(1)), []).append(int(m.group(2)) / int(m.group(3)))
    rounds = [
        {
            "round": r["round"],
            "wall_s": r["wall_s"],
            "compute_s": r["compute_s"],
            "bytes_up": r["bytes_up"],
            "bytes_down": r["bytes_down"],
            "bytes_down_model": r["bytes_down_model"],
            "transfer_s": round(statistics.fmean(transfers[r["round"]]), 3)
            if r["round"] in transfers
            else None,
            "merged_at": round(statistics.fmean(merged[r["round"]]), 3) if r["round"] in merged else None,
        }
        for r in report["rounds"]
    ]
    return {
        "utilisation": round(report["utilisation"], 4),
        "final_eval_loss": report["final_eval_loss"],
        "rounds": rounds,
    }


def projection(modes: dict[str, Any], params: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Round time and utilisation at other model sizes, from the measured bytes per parameter of what a
    miner uploads and downloads (published updates) per round and a compute time per round the user
    gives."""
    later = modes["sync"]["rounds"][1:] or modes["sync"]["rounds"]  # round 0 also loads the checkpoint
    up_bpp = statistics.fmean(r["bytes_up"] for r in later) / args.miners / params
    down_bpp = statistics.fmean(r["bytes_down_model"] for r in later) / args.miners / params
    compute_s = args.step_s * args.inner_steps_projected
    rows = []
    for name, n in PROJECTED.items():
        up_s = n * up_bpp * 8 / (args.up_mbit * 1e6)
        down_s = n * down_bpp * 8 / (args.down_mbit * 1e6)
        sync = compute_s + up_s + down_s
        overlapped = max(compute_s, up_s + down_s)  # the transfers run while the next round trains
        rows.append(
            {
                "model": name,
                "params": n,
                "compute_s": compute_s,
                "upload_s": round(up_s, 2),
                "download_s": round(down_s, 2),
                "sync": {"round_s": round(sync, 2), "utilisation": round(compute_s / sync, 4)},
                "overlap": {"round_s": round(overlapped, 2), "utilisation": round(compute_s / overlapped, 4)},
            }
        )
    return [
        {
            "label": "projection",
            "upload_bytes_per_param": round(up_bpp, 6),
            "download_bytes_per_param": round(down_bpp, 6),
            "step_s": args.step_s,
            "inner_steps": args.inner_steps_projected,
            "rows": rows,
        }
    ]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.network", description=__doc__.split("\n")[0])
    p.add_argument("--up-mbit", type=float, default=20.0, help="each miner's upload rate")
    p.add_argument("--down-mbit", type=float, default=100.0, help="each miner's download rate")
    p.add_argument("--miners", type=int, default=4)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--model", default="small")
    p.add_argument(
        "--inner-steps", type=int, default=None, help="H of the shaped runs (default: the recipe's)"
    )
    p.add_argument("--max-tokens", type=int, default=2_000_000)
    p.add_argument("--timeout-s", type=float, default=3600.0, help="per mode")
    p.add_argument("--modes", default="sync,overlap", help="comma list of sync, overlap")
    p.add_argument("--step-s", type=float, default=1.0, help="projection: seconds per inner step")
    p.add_argument(
        "--inner-steps-projected",
        dest="inner_steps_projected",
        type=int,
        default=30,
        help="projection: inner steps per round",
    )
    p.add_argument(
        "--pin",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the coordinator on the first core, the miners on the others",
    )
    p.add_argument("--out", type=Path, default=Path("runs/bench-network"))
    p.add_argument("--json", action="store_true", help="print the result as JSON (else a summary)")
    return p.parse_args(argv)


def _interrupted(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    reason = preflight()
    if reason is not None:
        print(reason, file=sys.stderr)
        return 2
    modes = [m for m in args.modes.split(",") if m]
    if not set(modes) <= {"sync", "overlap"} or not modes:
        print(f"--modes: expected sync and/or overlap, got {args.modes!r}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _interrupted)
    from protocol.model import build_model, num_parameters

    params = num_parameters(build_model(args.model))
    coordinator_cores, args.miner_prefix = cores(args.pin)
    os.sched_setaffinity(0, coordinator_cores)  # the coordinator inherits it; miners are moved by taskset
    results: dict[str, Any] = {}
    with shaped_links(args.miners, args.up_mbit, args.down_mbit) as prefixes:
        for mode in modes:
            results[mode] = run_mode(mode == "overlap", args, prefixes)
    out: dict[str, Any] = {
        "up_mbit": args.up_mbit,
        "down_mbit": args.down_mbit,
        "model": args.model,
        "params": params,
        "miners": args.miners,
        "pinned": bool(args.miner_prefix),
        "modes": results,
    }
    if "sync" in results:
        out["projection"] = projection(results, params, args)
    if "sync" in results and "overlap" in results and results["sync"]["utilisation"] > 0:
        out["overlap_vs_sync"] = round(results["overlap"]["utilisation"] / results["sync"]["utilisation"], 3)
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        for mode, m in results.items():
            print(f"{mode}: utilisation {m['utilisation']:.3f}, final loss {m['final_eval_loss']:.4f}")
    return 0 if all(math.isfinite(m["utilisation"]) for m in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
