"""How long a round takes to close with M real uploads, evaluation included (``benchmarks.coordinator``'s
``"close"`` rows).

A real coordinator process (``tiny``, default checks, evaluation and ``[validation] max_evaluated``) takes
M uploads in round 0, each a real SparseLoCo payload: M Ed25519 keys, each the base model trained with
AdamW on that key's own assigned sequences (fetched from the coordinator) as an honest miner would. The
round is then closed through the admin endpoint, and ``seconds`` is the coordinator's own measure of the
close, evaluation included: ``gradpool_aggregation_seconds`` (judge, aggregate, publish, evaluate the new
version; in synchronous rounds evaluate every sampled upload first) plus, in overlapped rounds (the
default), ``gradpool_scoring_seconds`` (every sampled upload evaluated once the version is out).
``version_s`` is the first part alone: how long miners wait for the version.

    python -m benchmarks.close --sizes 8,64
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import torch
from safetensors.torch import load as st_load

from gradpool.processes import Processes
from protocol.codec import PAYLOAD_FORMAT_VERSION, PayloadHeader, PayloadStats, SparseLoCoCodec
from protocol.data import assignment, stdlib_dir
from protocol.model import CausalLM, ModelConfig, build_model
from protocol.params import Params, load_checkpoint, param_spec, set_params
from protocol.signing import generate_key, public_key_hex, sign_request
from protocol.wire import HEADER_PROTOCOL, PROTOCOL_VERSION

TOKEN = "close-benchmark"


def write_corpus(path: Path) -> Path:
    """About 400 KB of Python source as one text file: enough sequences, quick to tokenise."""
    names = ["argparse.py", "dataclasses.py", "functools.py", "inspect.py", "textwrap.py", "typing.py"]
    path.write_text("\n\n".join((stdlib_dir() / n).read_text(encoding="utf-8") for n in names))
    return path


def _metric(http: httpx.Client, name: str) -> float:
    for line in http.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def honest_delta(
    model: CausalLM, base: Params, tokens: torch.Tensor, lr: float, batch_size: int
) -> dict[str, torch.Tensor]:
    """What an honest miner sends, without error feedback: base - parameters after AdamW steps on
    ``tokens`` (its assigned sequences), ``batch_size`` at a time."""
    set_params(model, base)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    for batch in tokens.long().split(batch_size):
        model.loss(batch).backward()
        opt.step()
        opt.zero_grad()
    return {n: base[n] - p.detach() for n, p in model.named_parameters()}


def _trained_payloads(http: httpx.Client, keys: list[Any]) -> list[bytes]:
    info = http.get("/v1/info").json()
    r = info["recipe"]
    model = build_model(ModelConfig.model_validate(info["architecture"]), info["seed"])
    spec = param_spec(model)
    base = load_checkpoint(http.get("/v1/checkpoint", params={"version": 0}).content, spec)[0]
    codec = SparseLoCoCodec(k=info["codec"]["k"], tile=info["codec"]["tile"])
    header = PayloadHeader(
        format_version=PAYLOAD_FORMAT_VERSION,
        codec="sparseloco",
        round=0,
        base_version=0,
        stats=PayloadStats(compute_s=1.0),
    )
    out = []
    for key in keys:
        ids = assignment(
            info["seed"],
            0,
            public_key_hex(key),
            r["inner_steps"] * r["batch_size"],
            info["num_sequences"],
            info["eval_every"],
        )
        tokens = st_load(http.get("/v1/data", params={"ids": ",".join(map(str, ids))}).content)["tokens"]
        delta = honest_delta(model, base, tokens, r["lr"], r["batch_size"])
        out.append(codec.encode(delta, spec, header)[0])
    return out


# every key registers from this machine's one address, at once: a load test, not an attack
LOAD_TEST = {
    "GRADPOOL_ADMISSION__PER_ADDRESS_PER_MINUTE": "100000",
    "GRADPOOL_ADMISSION__PER_MINUTE": "100000",
}


def measure_close(m: int, work: Path) -> dict[str, Any]:
    """Round 0 of a fresh coordinator with ``m`` real uploads, closed at once."""
    procs = Processes(work / "logs")
    env = {
        "GRADPOOL_ROUNDS__MIN_QUORUM": str(m + 1),
        "GRADPOOL_ROUNDS__DEADLINE_S": "3600",
        "GRADPOOL_DATA__EVAL_EVERY": "20",
        "GRADPOOL_ADMIN_TOKEN": TOKEN,
        **LOAD_TEST,
    }
    args = [
        "--state-dir",
        str(work / "state"),
        "--corpus",
        str(write_corpus(work / "corpus.txt")),
        "--port",
        "0",
    ]
    try:
        url = procs.start_coordinator(args, work / "ready.json", env=env)
        headers = {HEADER_PROTOCOL: str(PROTOCOL_VERSION)}
        with httpx.Client(base_url=url, timeout=120, headers=headers) as http:
            keys = [generate_key() for _ in range(m)]
            payloads = _trained_payloads(http, keys)
            for key, body in zip(keys, payloads, strict=True):
                signed = sign_request(key, "POST", "/v1/miners", b"")
                assert http.post("/v1/miners", headers=signed).is_success
                path = "/v1/rounds/0/submissions"
                answer = http.post(path, content=body, headers=sign_request(key, "POST", path, body))
                assert answer.status_code == 200, answer.text
            t0 = time.perf_counter()
            admin = {"Authorization": f"Bearer {TOKEN}"}
            http.post("/v1/admin/close-round", headers=admin).raise_for_status()
            http.get("/v1/round", params={"after": 0, "wait_s": 60})
            while True:  # closed, and its evaluation ended
                record = http.get("/v1/rounds/0").json()
                if record["status"] == "closed" and record["scored"]:
                    break
                time.sleep(0.05)
            wall = time.perf_counter() - t0
            version_s = _metric(http, "gradpool_aggregation_seconds_sum")
            seconds = version_s + _metric(http, "gradpool_scoring_seconds_sum")
            evaluation = _metric(http, "gradpool_evaluation_seconds_sum")
    finally:
        procs.stop_all()
    subs = record["submissions"]
    return {
        "uploads": m,
        "seconds": round(seconds, 3),
        "version_s": round(version_s, 3),
        "evaluation_s": round(evaluation, 3),
        "wall_s": round(wall, 3),
        "evaluated": sum(s["evaluated"] for s in subs),
        "accepted": sum(s["status"] == "accepted" for s in subs),
    }


def close_rows(sizes: list[int]) -> list[dict[str, Any]]:
    rows = []
    for m in sizes:
        with tempfile.TemporaryDirectory(prefix="gradpool-close-") as tmp:
            rows.append(measure_close(m, Path(tmp)))
        print(f"close with {m} uploads: {rows[-1]}", file=sys.stderr)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.close", description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="8,64", help="uploads per round, comma-separated")
    args = ap.parse_args(argv)
    try:
        sizes = [int(x) for x in args.sizes.split(",") if x]
    except ValueError:
        ap.error("--sizes: comma-separated positive integers")
    rows = close_rows(sizes)
    print(json.dumps({"close": rows, "close_ratio": rows[-1]["seconds"] / rows[0]["seconds"]}, indent=1))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
