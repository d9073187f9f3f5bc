"""Ingest beyond one process, the ``cluster`` object of ``python -m benchmarks.coordinator --json``.

``replicas`` real ``coordinator serve`` processes (``tiny``) on one real PostgreSQL, their blobs in a real
S3-compatible server (moto, a process of its own) with direct uploads: the first leads, the others pass
what they are asked on to it. ``miners`` miners, each with its own key and HTTP client and each given one
replica (in turn), register, then all upload at once as a miner does with direct uploads: a signed
request for a presigned form, the payload posted with it to the bucket, the signed commit. Latency is per
miner, over the three steps; a failure is any answer but 200 (204 from the bucket), or an exception.
``coordinator_bytes_in`` counts the request bodies the replicas received during the uploads (the tickets'
and commits' JSON): the payloads' bytes go to the bucket (``bucket_bytes_in``). ``cpu_s`` is where the
machine's processor time went while the miners uploaded, part by part (``clients``: this process, which
plays every miner; ``postgres``: the server's processes; ``other``: the rest of the machine), beside
``machine_busy_s``, the time all cores were busy, ``cores``, the machine's, and ``cores_busy``, how many
of them were busy on average; ``ms_per_upload``: each part's processor time per upload.

``entry``: ``each`` (the default) gives each miner one replica in turn, as a load balancer would;
``standbys`` sends every miner to the replicas that do not lead, so that the leader only records what they
checked (``checked_by_replicas``: the uploads the leader recorded from a standby's check, read from its
``/metrics``), which measures what recording an upload costs the leader alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import ssl
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import tomli_w

from benchmarks.aggregation import log, percentile, random_payload, tensor_set
from benchmarks.close import LOAD_TEST, write_corpus
from benchmarks.cluster import S3_ENV, free_port, shared_settings, wait_for
from benchmarks.postgres import Postgres, pg_bin
from gradpool.processes import Processes, cpu_seconds, tree_cpu_seconds
from protocol.codec import SparseLoCoCodec
from protocol.signing import generate_key, sign_request
from protocol.wire import HEADER_PROTOCOL, PROTOCOL_VERSION, UploadCommit, UploadIntent, UploadTicket

ROUND_OPEN = {  # the round stays open for the whole benchmark
    "GRADPOOL_ROUNDS__MIN_QUORUM": "100000",
    "GRADPOOL_ROUNDS__DEADLINE_S": "3600",
    "GRADPOOL_DATA__EVAL_EVERY": "20",
    "GRADPOOL_DATA__EVAL_SEQUENCES": "16",
}


@contextlib.contextmanager
def s3_server(work: Path) -> Any:
    """moto's S3 server in a process of its own (it would share the clients' interpreter lock otherwise),
    keeping connections alive as an S3 service does (benchmarks/s3_server.py), with a fresh bucket:
    (endpoint, bucket, its process id)."""
    import boto3

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    out = (work / "s3.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.s3_server", "--port", str(port)],
        stdout=out,
        stderr=subprocess.STDOUT,
        env={**os.environ, **S3_ENV},
    )
    try:
        if not wait_for(lambda: _answers(endpoint), 60):
            raise RuntimeError(f"the S3 server did not start:\n{(work / 's3.log').read_text()[-2000:]}")
        bucket = f"gradpool-{uuid.uuid4().hex[:12]}"
        os.environ.update(S3_ENV)
        boto3.session.Session().client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
        yield endpoint, bucket, proc.pid
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        out.close()


def _answers(url: str) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        httpx.get(url, timeout=2)
        return True
    return False


def replicas_up(procs: Processes, work: Path, settings: dict[str, Any], n: int) -> list[str]:
    """``n`` coordinator processes on the shared store: the first leading, the others standing by."""
    urls = []
    for i in range(n):
        name = f"replica-{i}"
        mine = {**settings, "state_dir": str(work / name), "cluster": {"name": name, "lease_s": 10.0}}
        (work / f"{name}.toml").write_text(tomli_w.dumps(mine))
        port = free_port()
        args = ["--config", str(work / f"{name}.toml"), "--port", str(port)]
        if i == 0:
            urls.append(procs.start_coordinator(args, work / f"{name}.json", name=name))
            continue
        procs.start(name, ["coordinator", "serve", *args])
        if not wait_for(lambda n=name: "standing by on port" in procs.log(n), 120):  # type: ignore[misc]
            raise RuntimeError(f"{name} did not stand by:\n{procs.log(name)[-2000:]}")
        urls.append(f"http://127.0.0.1:{port}")
    return urls


def _machine_busy_s() -> float:
    """Seconds the machine's cores were busy, all together: user, nice, system, irq and softirq (not idle,
    waiting on the disk, stolen by the host, or a guest's, which user already counts)."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (ticks[0] + ticks[1] + ticks[2] + ticks[5] + ticks[6]) / os.sysconf("SC_CLK_TCK")


def cpu_meter(parts: dict[str, int], postmaster: int) -> Callable[[], dict[str, float]]:
    """A reading of every part's processor seconds so far: ``parts`` names the processes."""

    def read() -> dict[str, float]:
        return {
            "clients": time.process_time(),
            **{name: cpu_seconds(pid) for name, pid in parts.items()},
            "postgres": tree_cpu_seconds(postmaster),  # the backends that ended, and those that run
            "machine_busy_s": _machine_busy_s(),
        }

    return read


def cpu_used(before: dict[str, float], after: dict[str, float], wall_s: float) -> dict[str, Any]:
    used = {name: round(after[name] - before[name], 2) for name in before}
    busy = used.pop("machine_busy_s")
    parts = sum(used.values())
    return {
        "cpu_s": used | {"other": round(max(0.0, busy - parts), 2)},
        "machine_busy_s": busy,
        "cores": os.cpu_count(),
        "cores_busy": round(busy / wall_s, 2),
    }


async def upload_all(
    urls: list[str],
    payloads: list[bytes],
    meter: Callable[[], dict[str, float]] | None = None,
    leader: str | None = None,
) -> dict[str, Any]:
    """``urls``: the replicas miners are given in turn; ``leader``: the leader's URL, whose ``/metrics``
    say how many uploads it recorded from a standby's check."""
    keys = [generate_key() for _ in payloads]
    tls = ssl.create_default_context()  # unused on http://, but each client would otherwise load its own
    headers = {HEADER_PROTOCOL: str(PROTOCOL_VERSION)}
    sent = [0]  # request bodies to the coordinators during the uploads

    async def signed(
        client: httpx.AsyncClient, key: Any, path: str, body: bytes, count: bool
    ) -> httpx.Response:
        if count:
            sent[0] += len(body)
        return await client.post(path, content=body, headers=sign_request(key, "POST", path, body))

    async def one(client: httpx.AsyncClient, key: Any, payload: bytes) -> tuple[float, str | None]:
        t0, step = time.perf_counter(), "ticket"
        try:
            sha = hashlib.sha256(payload).hexdigest()
            intent = UploadIntent(sha256=sha, bytes=len(payload)).model_dump_json().encode()
            r = await signed(client, key, "/v1/rounds/0/uploads", intent, True)
            if r.status_code != 200:
                return time.perf_counter() - t0, f"ticket {r.status_code}: {r.text[:200]}"
            ticket = UploadTicket.model_validate_json(r.content)
            files = {"file": ("payload", payload, "application/octet-stream")}
            step = "bucket"
            stored = await client.post(ticket.url, data=ticket.fields, files=files)
            if stored.status_code >= 300:
                return time.perf_counter() - t0, f"bucket {stored.status_code}: {stored.text[:200]}"
            commit = UploadCommit(sha256=sha).model_dump_json().encode()
            step = "commit"
            r = await signed(client, key, "/v1/rounds/0/commits", commit, True)
        except httpx.HTTPError as e:
            return time.perf_counter() - t0, f"{step} {type(e).__name__}: {e}"
        seconds = time.perf_counter() - t0
        return seconds, None if r.status_code == 200 else f"commit {r.status_code}: {r.text[:200]}"

    async with contextlib.AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(
                httpx.AsyncClient(base_url=urls[i % len(urls)], timeout=120.0, verify=tls, headers=headers)
            )
            for i in range(len(keys))
        ]
        registered = await asyncio.gather(
            *(signed(c, k, "/v1/miners", b"", False) for c, k in zip(clients, keys, strict=True))
        )
        if bad := [r for r in registered if r.status_code not in (200, 201)]:
            raise RuntimeError(f"{len(bad)} registrations failed: {bad[0].status_code} {bad[0].text[:200]}")
        t0, before = time.perf_counter(), meter() if meter else {}
        done = await asyncio.gather(*(one(c, k, p) for c, k, p in zip(clients, keys, payloads, strict=True)))
        wall = time.perf_counter() - t0
        cpu = cpu_used(before, meter(), wall) if meter else {}
        stored = (await clients[0].get("/v1/round")).json()["submissions"]
        counted = {} if leader is None else await leader_counts(leader)
    errors = [e for _, e in done if e]
    latencies = sorted(s for s, _ in done)
    return {
        "miners": len(payloads),
        "replicas": len(urls),
        "failures": len(errors),
        "p50_s": percentile(latencies, 0.50),
        "p99_s": percentile(latencies, 0.99),
        "max_s": latencies[-1],
        "wall_s": wall,
        "stored": stored,
        "coordinator_bytes_in": sent[0],
        "bucket_bytes_in": sum(len(p) for p in payloads),
        "payload_bytes": len(payloads[0]),
        "checked_by_replicas": counted.get("gradpool_replica_checked_uploads_total"),
        "passed_batches": counted.get("gradpool_passed_commit_batches_total"),
        "passed_commits": counted.get("gradpool_passed_commits_total"),
        "errors": errors[:5],
        **cpu,
        **per_upload(cpu, len(payloads)),
    }


def per_upload(cpu: dict[str, Any], uploads: int) -> dict[str, Any]:
    if "cpu_s" not in cpu:
        return {}
    return {"ms_per_upload": {k: round(v * 1000 / uploads, 2) for k, v in cpu["cpu_s"].items()}}


LEADER_COUNTS = (
    "gradpool_replica_checked_uploads_total",  # recorded from a standby's check
    "gradpool_passed_commit_batches_total",  # batches of checked commits the standbys passed on
    "gradpool_passed_commits_total",  # the commits in them
)


async def leader_counts(leader: str) -> dict[str, int]:
    """The leader's counts of the uploads the standbys checked, from its ``/metrics``."""
    async with httpx.AsyncClient(base_url=leader, timeout=30) as client:
        lines = (await client.get("/metrics")).text.splitlines()
    found = {
        name: int(float(line.split()[1]))
        for line in lines
        for name in LEADER_COUNTS
        if line.startswith(name + " ")
    }
    if missing := set(LEADER_COUNTS) - set(found):
        raise RuntimeError(f"the leader at {leader} gives no {', '.join(sorted(missing))}")
    return found


def cluster_ingest(
    miners: int, replicas: int = 2, model: str = "tiny", entry: str = "each"
) -> dict[str, Any]:
    if entry == "standbys" and replicas < 2:
        raise ValueError("miners sent only to the standbys need 2 replicas or more")
    bin_dir = pg_bin()
    if bin_dir is None:
        raise RuntimeError("PostgreSQL is not installed (apt-get install postgresql)")
    with tempfile.TemporaryDirectory(prefix="gradpool-cluster-") as tmp:
        work = Path(tmp)
        postgres = Postgres(bin_dir)
        try:
            with s3_server(work) as (endpoint, bucket, s3_pid):
                settings = shared_settings(work, postgres.database(), endpoint, bucket)
                settings |= {"model": model, "data": {"corpus": str(write_corpus(work / "corpus.txt"))}}
                procs = Processes(work, {**ROUND_OPEN, **LOAD_TEST, **S3_ENV})
                try:
                    spec, codec = tensor_set(model), SparseLoCoCodec()
                    log(f"cluster: {replicas} replicas on PostgreSQL and S3 starting ...")
                    urls = replicas_up(procs, work, settings, replicas)
                    log(f"cluster: encoding {miners} payloads ...")
                    payloads = [random_payload(codec, spec, seed=i) for i in range(1, miners + 1)]
                    log(f"cluster: {miners} miners register, then upload at once through {urls} ...")
                    names = ["leader", *(f"standby-{i}" for i in range(1, replicas))]
                    pids = {n: procs.procs[f"replica-{i}"].pid for i, n in enumerate(names)}
                    postmaster = int((postgres.data / "postmaster.pid").read_text().split()[0])
                    meter = cpu_meter({"s3": s3_pid, **pids}, postmaster)
                    given = urls if entry == "each" else urls[1:]
                    done = asyncio.run(upload_all(given, payloads, meter, urls[0]))
                    return {"entry": entry, **done, "replicas": replicas}
                finally:
                    procs.stop_all(grace_s=30)
        finally:
            postgres.close()
