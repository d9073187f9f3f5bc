"""Coordinator aggregation and intake: ``python -m benchmarks.coordinator --json``.

Aggregation (``benchmarks/aggregation.py``): for M in ``--sizes`` distinct SparseLoCo payloads on each
tensor set of ``--sets``, the time and peak memory from the stored payloads to the new parameters, against
one naive dense decode per miner (``seconds_vs_target``) and the model's fp32 size (``rss_ratio``).

Ingest: a real coordinator (``python -m gradpool coordinator serve``) on 127.0.0.1; ``--miners`` miners,
each with its own Ed25519 key and HTTP client, register, then all upload a distinct valid payload at once.
Latency is per upload, from sending the signed request to its answer; a failure (per miner) is any answer
but 200, or an exception. ``coordinator_cpu_s`` and ``client_cpu_s`` are the CPU time each side spent
during the uploads: the two share the machine's cores.

Cluster (``benchmarks/cluster_ingest.py``): ``--cluster-miners`` (512) miners upload at once with presigned
uploads straight to an S3-compatible bucket, through ``--replicas`` (2) coordinator processes on one
PostgreSQL: ``"cluster": {"miners", "replicas", "failures", "p50_s", "p99_s", "coordinator_bytes_in",
..., "cpu_s": {"clients", "s3", "leader", "standby-1", "postgres", "other"}, "machine_busy_s", "cores",
"cores_busy", "ms_per_upload", "checked_by_replicas"}`` (where the processor time went while they
uploaded, and how many uploads the leader recorded from a standby's check), beside the single-process
SQLite ``ingest`` of the same run. ``--cluster-entry standbys`` sends the miners to the standbys only.

Close (``benchmarks/close.py``): for M in ``--close-sizes`` (8, 64), a real coordinator closes a round of M
real uploads of ``tiny``, evaluation included: ``"close": [{"uploads": M, "seconds": s, ...}]``.

Targets: at M = 64, rss_ratio <= 2.5 and seconds_vs_target <= 1; ingest and cluster: no failures and
p99 <= 2 s; the M = 64 close takes at most 3x the M = 8 close.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import ssl
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from benchmarks.aggregation import SETS, aggregation, log, percentile, random_payload, tensor_set
from benchmarks.close import LOAD_TEST, close_rows, write_corpus
from benchmarks.cluster_ingest import cluster_ingest
from gradpool.processes import Child, Processes, cpu_seconds
from protocol.codec import SparseLoCoCodec
from protocol.signing import generate_key, sign_request
from protocol.wire import HEADER_PROTOCOL, PROTOCOL_VERSION

RSS_LIMIT, TIME_LIMIT, P99_LIMIT_S = 2.5, 1.0, 2.0  # the targets, checked at the largest M (64)
CLOSE_RATIO_LIMIT = 3.0  # the M = 64 close over the M = 8 close


# -- ingest -----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def coordinator_process(work: Path, model: str, max_payload_bytes: int) -> Iterator[Child]:
    """A coordinator whose round stays open for the whole benchmark; stopped on the way out."""
    env = {
        "GRADPOOL_MODEL": model,
        "GRADPOOL_ROUNDS__MIN_QUORUM": "100000",
        "GRADPOOL_ROUNDS__DEADLINE_S": "3600",
        "GRADPOOL_DATA__EVAL_EVERY": "20",
        "GRADPOOL_DATA__EVAL_SEQUENCES": "16",
        "GRADPOOL_MAX_PAYLOAD_BYTES": str(max_payload_bytes),
        **LOAD_TEST,
    }
    args = ["coordinator", "serve", "--port", "0", "--state-dir", str(work / "state")]
    args += ["--ready-file", str(work / "ready.json"), "--corpus", str(work / "corpus.txt")]
    procs = Processes(work, env)
    try:
        yield procs.start("coordinator", args)
    finally:
        procs.stop_all(grace_s=30)


def wait_ready(proc: Child, work: Path, timeout_s: float = 180.0) -> str:
    ready, end = work / "ready.json", time.monotonic() + timeout_s
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > end:
            tail = (work / "coordinator.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"coordinator did not start (exit code {proc.poll()}):\n{tail}")
        time.sleep(0.05)
    return str(json.loads(ready.read_text())["url"])


async def post(
    client: httpx.AsyncClient, path: str, body: bytes, headers: dict[str, str]
) -> tuple[float, str | None]:
    """(seconds to the answer, None or what went wrong)."""
    t0 = time.perf_counter()
    try:
        r = await client.post(path, content=body, headers=headers)
    except httpx.HTTPError as e:
        return time.perf_counter() - t0, f"{type(e).__name__}: {e}"
    seconds = time.perf_counter() - t0
    return seconds, None if r.status_code == 200 else f"{r.status_code}: {r.text[:200]}"


async def register_and_upload(url: str, payloads: list[bytes], coordinator_pid: int) -> dict[str, Any]:
    """Each miner has its own client (one connection, as separate machines would): one pool of hundreds
    of connections costs the client more CPU than the coordinator spends (httpcore scans its pool)."""
    keys = [generate_key() for _ in payloads]
    tls = ssl.create_default_context()  # unused on http://, but each client would otherwise load its own
    async with contextlib.AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(
                httpx.AsyncClient(
                    base_url=url, timeout=60.0, verify=tls, headers={HEADER_PROTOCOL: str(PROTOCOL_VERSION)}
                )
            )
            for _ in keys
        ]
        signed = [sign_request(key, "POST", "/v1/miners", b"") for key in keys]
        registered = await asyncio.gather(
            *(post(c, "/v1/miners", b"", h) for c, h in zip(clients, signed, strict=True))
        )
        path = "/v1/rounds/0/submissions"
        signed = [sign_request(key, "POST", path, p) for key, p in zip(keys, payloads, strict=True)]
        server0, client0, t0 = cpu_seconds(coordinator_pid), time.process_time(), time.perf_counter()
        uploaded = await asyncio.gather(
            *(post(c, path, p, h) for c, p, h in zip(clients, payloads, signed, strict=True))
        )
        wall = time.perf_counter() - t0
        server, client = cpu_seconds(coordinator_pid) - server0, time.process_time() - client0
        stored = (await clients[0].get("/v1/round")).json()["submissions"]
    errors = [r or u for (_, r), (_, u) in zip(registered, uploaded, strict=True) if r or u]  # per miner
    latencies = sorted(s for s, _ in uploaded)
    return {
        "miners": len(payloads),
        "failures": len(errors),
        "p50_s": percentile(latencies, 0.50),
        "p99_s": percentile(latencies, 0.99),
        "max_s": latencies[-1],
        "wall_s": wall,
        "stored": stored,
        "payload_bytes": len(payloads[0]),
        "coordinator_cpu_s": server,
        "client_cpu_s": client,
        "errors": errors[:5],
    }


def ingest(model: str, miners: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="gradpool-bench-") as tmp:
        work = Path(tmp)
        write_corpus(work / "corpus.txt")
        spec, codec = tensor_set(model), SparseLoCoCodec()
        size = len(random_payload(codec, spec, seed=0))
        with coordinator_process(work, model, max(1 << 20, 4 * size)) as proc:
            log(f"ingest: encoding {miners} payloads of the {model} model while the coordinator starts ...")
            payloads = [random_payload(codec, spec, seed=i) for i in range(1, miners + 1)]
            url = wait_ready(proc, work)
            log(f"ingest: {miners} miners register, then upload at once to {url} ...")
            return asyncio.run(register_and_upload(url, payloads, proc.pid))


# -- report -----------------------------------------------------------------------------------------------
def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    checks = []
    for row in result.get("aggregation", []):
        if row["submissions"] == 64:
            where = f"{row['set']} M=64"
            checks.append({"check": f"{where} rss_ratio", "value": row["rss_ratio"], "limit": RSS_LIMIT})
            checks.append(
                {
                    "check": f"{where} seconds_vs_target",
                    "value": row["seconds_vs_target"],
                    "limit": TIME_LIMIT,
                }
            )
    if "ingest" in result:
        checks.append({"check": "ingest failures", "value": result["ingest"]["failures"], "limit": 0})
        checks.append({"check": "ingest p99_s", "value": result["ingest"]["p99_s"], "limit": P99_LIMIT_S})
    if "cluster" in result:
        checks.append({"check": "cluster failures", "value": result["cluster"]["failures"], "limit": 0})
        checks.append({"check": "cluster p99_s", "value": result["cluster"]["p99_s"], "limit": P99_LIMIT_S})
    close = {row["uploads"]: row["seconds"] for row in result.get("close", [])}
    if 8 in close and 64 in close:
        ratio = close[64] / close[8]
        checks.append({"check": "close M=64 / M=8", "value": ratio, "limit": CLOSE_RATIO_LIMIT})
    return [{**c, "met": c["value"] <= c["limit"]} for c in checks]


def print_table(result: dict[str, Any]) -> None:
    for r in result.get("aggregation", []):
        print(
            f"{r['set']:>5} M={r['submissions']:<3} {r['seconds']:7.3f} s "
            f"(judge {r['judge_s']:.3f}, aggregate {r['aggregate_s']:.3f}, apply {r['apply_s']:.3f}); "
            f"one dense decode {r['single_decode_seconds']:.4f} s -> {r['seconds_vs_target']:.2f}x target; "
            f"+{r['rss_increase_bytes'] / 2**20:.0f} MiB = {r['rss_ratio']:.2f}x fp32 model"
        )
    if "ingest" in result:
        i = result["ingest"]
        print(
            f"ingest: {i['miners']} miners, {i['failures']} failures, p50 {i['p50_s']:.3f} s, "
            f"p99 {i['p99_s']:.3f} s, max {i['max_s']:.3f} s, {i['stored']} stored in {i['wall_s']:.2f} s "
            f"(coordinator CPU {i['coordinator_cpu_s']:.2f} s, client CPU {i['client_cpu_s']:.2f} s)"
        )
    if "cluster" in result:
        c = result["cluster"]
        print(
            f"cluster: {c['miners']} miners through {c['replicas']} replicas, {c['failures']} failures, "
            f"p50 {c['p50_s']:.3f} s, p99 {c['p99_s']:.3f} s, {c['stored']} stored in {c['wall_s']:.2f} s; "
            f"{c['coordinator_bytes_in']} bytes into the coordinators, {c['bucket_bytes_in']} into the bucket"
        )
    for t in result["targets"]:
        print(f"{'met ' if t['met'] else 'MISS'} {t['check']}: {t['value']:.3g} (limit {t['limit']})")


def positive(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return n


def int_list(text: str) -> list[int]:
    sizes = [positive(x) for x in text.split(",") if x]
    if not sizes:
        raise argparse.ArgumentTypeError("give one or more positive integers, comma-separated")
    return sizes


def name_list(text: str) -> list[str]:
    names = [x for x in text.split(",") if x]
    if unknown := set(names) - set(SETS):
        raise argparse.ArgumentTypeError(f"unknown sets {sorted(unknown)}; choose from {SETS}")
    return names


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--sizes", type=int_list, default=[4, 16, 64], help="submissions per aggregation")
    ap.add_argument("--sets", type=name_list, default=["small", "124m"], help=f"tensor sets, of {SETS}")
    ap.add_argument("--miners", type=positive, default=256, help="concurrent uploads to the real coordinator")
    ap.add_argument(
        "--ingest-model",
        default="tiny",
        choices=["tiny", "small"],
        help="the model the ingest coordinator runs",
    )
    ap.add_argument(
        "--reps", type=positive, default=3, help="timed repetitions of the single decode (best kept)"
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads of the aggregation processes (default: all cores)",
    )
    ap.add_argument("--close-sizes", type=int_list, default=[8, 64], help="uploads per closed round")
    ap.add_argument("--skip-aggregation", action="store_true")
    ap.add_argument("--skip-ingest", action="store_true")
    ap.add_argument("--skip-close", action="store_true")
    ap.add_argument("--cluster-miners", type=positive, default=512, help="concurrent presigned uploads")
    ap.add_argument("--replicas", type=positive, default=2, help="coordinator processes of the cluster")
    ap.add_argument(
        "--cluster-entry",
        choices=["each", "standbys"],
        default="each",
        help="miners given each replica in turn, or only the standbys (the leader only records)",
    )
    ap.add_argument("--skip-cluster", action="store_true")
    args = ap.parse_args(argv)
    if args.cluster_entry == "standbys" and args.replicas < 2:
        ap.error("--cluster-entry standbys needs --replicas 2 or more")
    result: dict[str, Any] = {}
    if not args.skip_aggregation:
        result["aggregation"] = aggregation(args.sets, args.sizes, args.threads, args.reps)
    if not args.skip_ingest:
        result["ingest"] = ingest(args.ingest_model, args.miners)
    if not args.skip_cluster:
        result["cluster"] = cluster_ingest(
            args.cluster_miners, args.replicas, args.ingest_model, args.cluster_entry
        )
    if not args.skip_close:
        result["close"] = close_rows(args.close_sizes)
    result["targets"] = targets(result)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print_table(result)
    return result


if __name__ == "__main__":
    main()
