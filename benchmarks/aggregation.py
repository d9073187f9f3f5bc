"""Aggregation memory and time, for ``python -m benchmarks.coordinator``.

Aggregation, for M in ``--sizes`` on each tensor set of ``--sets`` (``small``: the small model; ``124m``:
GPT-2 small's shapes; ``tiny``: the tiny model, for quick checks). M distinct SparseLoCo payloads
(Gaussian deltas, std about 1e-3, a seed each) are encoded in one process and stored in a blob store with
their intake records (norm, sketch, content digest), as the coordinator holds them when a round closes.
Each M is then measured in a fresh process, with the parameters already loaded:

- ``seconds``: the whole aggregation, stored payloads to new parameters: ``judge``, ``aggregate_uploads``
  (reads and decodes one payload at a time into the running sum and count), the outer step (SGD, lr 1.0),
  a copy of the parameters and ``apply_update``;
- ``rss_increase_bytes``: the peak resident memory during that (the kernel's high-water mark, reset just
  before) minus the resident memory just before;
- ``single_decode_seconds``: best of ``--reps`` of decoding one payload and expanding every tensor to a
  freshly allocated dense tensor, as a naive aggregator would for each miner;
- ``seconds_vs_target``: seconds / (0.5 * M * single_decode_seconds); ``rss_ratio``: the increase over the
  model's fp32 size.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import torch

from benchmarks.codec import best_of, gpt2_small_spec
from coordinator.publishing.aggregation import aggregate_uploads
from coordinator.publishing.outer import OuterOptimizer
from coordinator.rounds.checks import RoundChecks, default_pipeline, run_cheap_checks
from coordinator.settings import CheckSettings, ValidationSettings
from coordinator.storage.blobs import FileBlobStore
from coordinator.storage.records import Upload
from gradpool.processes import fresh_context
from protocol.codec import PayloadHeader, SparseLoCoCodec
from protocol.model import ModelConfig, build_model
from protocol.params import apply_update, param_spec

Spec = list[tuple[str, tuple[int, ...]]]
T = TypeVar("T")
SETS = ("tiny", "small", "124m")
HEADER = PayloadHeader(format_version=1, codec="sparseloco", round=0, base_version=0)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def tensor_set(name: str | ModelConfig) -> Spec:
    """The parameter names and shapes of a set (a preset's name, "124m", or a model config); a model's
    taken without allocating (or initialising) it."""
    if name == "124m":
        return gpt2_small_spec()
    with torch.device("meta"):
        return param_spec(build_model(name))


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest rank."""
    return sorted_values[max(0, math.ceil(q * len(sorted_values)) - 1)]


def random_payload(codec: SparseLoCoCodec, spec: Spec, seed: int) -> bytes:
    """One miner's update: Gaussian, std 0.75e-3 to 1.25e-3 (its own per seed), encoded."""
    gen = torch.Generator().manual_seed(seed)
    std = 1e-3 * (0.75 + 0.5 * float(torch.rand((), generator=gen)))
    delta = {n: torch.randn(s, generator=gen).mul_(std) for n, s in spec}
    payload, _ = codec.encode(delta, spec, HEADER)
    return payload


def in_fresh_process(fn: Callable[..., T], *args: Any) -> T:
    """fn(*args) in a new process (``fresh_context``), so that no memory peak or cache carries over; a
    measure resets the high-water mark first (``settle_memory``)."""
    with ProcessPoolExecutor(max_workers=1, mp_context=fresh_context()) as pool:
        return pool.submit(fn, *args).result()


def set_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)


# -- aggregation ------------------------------------------------------------------------------------------
def write_payloads(set_name: str | ModelConfig, count: int, root: Path, threads: int | None) -> None:
    """Encode ``count`` payloads into a blob store under root; record each as intake does (uploads.json)."""
    set_threads(threads)
    spec, codec, blobs = tensor_set(set_name), SparseLoCoCodec(), FileBlobStore(root / "blobs")
    records = []
    for i in range(count):
        payload = random_payload(codec, spec, seed=1000 + i)
        seen = codec.examine(payload, spec)  # what the coordinator does at intake
        records.append(
            {
                "miner": f"miner-{i:03d}",
                "sha256": blobs.put(payload),
                "content_sha256": seen.content_sha256,
                "norm": seen.norm,
                "sketch": seen.sketch.numpy().tobytes().hex(),
                "stored_sha256": blobs.put(seen.stored),
            }
        )
    (root / "uploads.json").write_text(json.dumps(records))


def load_uploads(root: Path, count: int) -> list[Upload]:
    records = json.loads((root / "uploads.json").read_text())[:count]
    return [
        Upload(
            r["miner"],
            r["sha256"],
            r["content_sha256"],
            r["norm"],
            torch.frombuffer(bytearray.fromhex(r["sketch"]), dtype=torch.float32),
            r.get("stored_sha256", r.get("unpacked_sha256")),
        )
        for r in records
    ]


def rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """The kernel's resident high-water mark (VmHWM) of this process."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def settle_memory() -> int:
    """Free what can be freed, reset the high-water mark to the current RSS and return that RSS."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, so the baseline hides nothing
    Path("/proc/self/clear_refs").write_text("5")  # Linux >= 4.0: reset VmHWM
    return rss_bytes()


def decode_to_dense(codec: SparseLoCoCodec, payload: bytes, spec: Spec) -> dict[str, torch.Tensor]:
    _, update = codec.decode(payload, spec)
    return {name: update[name].to_dense(shape) for name, shape in spec}


def measure_aggregation(set_name: str, m: int, root: Path, threads: int | None, reps: int) -> dict[str, Any]:
    """One row: runs in a fresh process, on the first m stored payloads."""
    set_threads(threads)
    spec, codec, blobs = tensor_set(set_name), SparseLoCoCodec(), FileBlobStore(root / "blobs")
    uploads = load_uploads(root, m)
    gen = torch.Generator().manual_seed(0)
    params = {n: torch.randn(s, generator=gen).mul_(0.02) for n, s in spec}
    first = blobs.get(uploads[0].sha256)
    codec.decode(first, spec)  # as at intake: the codec's per-model tables are built
    outer = OuterOptimizer(lr=1.0)
    before = settle_memory()

    t0 = time.perf_counter()
    judging, checks = RoundChecks(0, uploads), CheckSettings()
    _, scales = run_cheap_checks(
        default_pipeline(checks, ValidationSettings()), judging, checks.max_norm_ratio
    )
    judging.reclip(scales)  # the version's clip
    accepted = [(u, scales[u.miner]) for u in judging.remaining()]
    t1 = time.perf_counter()
    agg = aggregate_uploads(accepted, lambda u: (b"", blobs.get(str(u.stored_sha256))), codec, spec)
    t2 = time.perf_counter()
    delta, _ = outer.step(agg)
    new = {n: p.clone() for n, p in params.items()}
    apply_update(new, delta)
    t3 = time.perf_counter()
    peak = peak_rss_bytes()

    if len(accepted) != m:
        raise RuntimeError(f"{set_name}: {m - len(accepted)} of {m} payloads refused: {judging.refused}")
    del new, agg, delta
    single = best_of(lambda: decode_to_dense(codec, first, spec), reps)
    numel = sum(math.prod(s) for _, s in spec)
    seconds = t3 - t0
    return {
        "set": set_name,
        "submissions": m,
        "params": numel,
        "seconds": seconds,
        "single_decode_seconds": single,
        "rss_increase_bytes": peak - before,
        "model_fp32_bytes": 4 * numel,
        "rss_ratio": (peak - before) / (4 * numel),
        "seconds_vs_target": seconds / (0.5 * m * single),
        "judge_s": t1 - t0,
        "aggregate_s": t2 - t1,
        "apply_s": t3 - t2,
        "rss_before_bytes": before,
        "payload_bytes": len(first),
        "threads": torch.get_num_threads(),
    }


def aggregation(sets: list[str], sizes: list[int], threads: int | None, reps: int) -> list[dict[str, Any]]:
    rows = []
    for name in sets:
        with tempfile.TemporaryDirectory(prefix="gradpool-bench-") as tmp:
            log(f"{name}: encoding {max(sizes)} payloads ...")
            in_fresh_process(write_payloads, name, max(sizes), Path(tmp), threads)
            for m in sizes:
                log(f"{name}: aggregating {m} payloads ...")
                rows.append(in_fresh_process(measure_aggregation, name, m, Path(tmp), threads, reps))
    return rows
