"""A version's checkpoint written, in memory and in time: ``python -m benchmarks.checkpoint --json``.

For each preset, its parameters (fp32 on the CPU, as the coordinator keeps them) are written into a file
blob store the two ways: ``streamed``, as the coordinator writes every version (``write_checkpoint``
through ``BlobStore.put_written``: safetensors written tensor by tensor from the tensors' own memory, then
hashed and synced), and ``in_memory``, the whole file built as bytes first (``save_checkpoint``, then
``put``). Each in a fresh process; ``*_peak_increase_bytes`` is the resident high-water mark during the
write above the resident size before it (the parameters themselves), so a write that never holds the
checkpoint whole stays near zero. ``same_content``: the two files read back hold the same metadata and
tensors, bit for bit (safetensors orders the metadata's keys differently from one process to the next,
so the files' own bytes may differ in that order alone).

Reading it back and hashing it (every byte read, as the coordinator checks a checkpoint against its version's
hash) is measured the same way: ``streamed_read_*`` as the coordinator reads a kept checkpoint
(``kept_checkpoint``: the blob checked as a file, each tensor read from it straight into its own memory),
``in_memory_read_*`` as it did before (the blob's bytes, then tensors loaded from them). The parameters read
are resident either way, so a read's increase is about the model's fp32 size at least.

Output: ``{"rows": [{"model", "params", "checkpoint_bytes", "streamed_s", "streamed_peak_increase_bytes",
"in_memory_s", "in_memory_peak_increase_bytes", "streamed_read_s", "streamed_read_peak_increase_bytes",
"in_memory_read_s", "in_memory_read_peak_increase_bytes", "same_content"}]}``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from benchmarks.aggregation import in_fresh_process, peak_rss_bytes, settle_memory
from coordinator.storage.blobs import FileBlobStore, kept_checkpoint
from protocol.model import build_model, resolve
from protocol.params import get_params, load_checkpoint, params_hash, save_checkpoint, write_checkpoint


def write_once(name: str, how: str, root: Path) -> dict[str, Any]:
    """In a fresh process: the preset's parameters written one way and read back the same way; the
    seconds and peak increase of each, and the file's content digest."""
    torch.manual_seed(0)
    model = build_model(resolve(name, None))
    params = get_params(model)
    del model
    meta = {"version": "1", "param_hash": "0" * 64}
    blobs = FileBlobStore(root / how)
    before = settle_memory()
    t0 = time.perf_counter()
    if how == "streamed":
        sha, size = blobs.put_written(partial(write_checkpoint, params, meta))
    else:
        data = save_checkpoint(params, meta)
        sha, size = blobs.put(data), len(data)
        del data
    seconds = time.perf_counter() - t0
    peak_increase = max(0, peak_rss_bytes() - before)
    spec, count = [(n, tuple(t.shape)) for n, t in params.items()], sum(t.numel() for t in params.values())
    del params
    before = settle_memory()
    t0 = time.perf_counter()
    if how == "streamed":  # as the coordinator reads a kept checkpoint back
        back = kept_checkpoint(blobs, sha, spec)
    else:
        back = load_checkpoint(blobs.get(sha), spec)[0]
    params_hash(back, spec)  # and checks it against its version's hash: every byte read
    read_s = time.perf_counter() - t0
    read_increase = max(0, peak_rss_bytes() - before)
    del back
    return {
        "params": count,
        "seconds": seconds,
        "peak_increase_bytes": peak_increase,
        "read_s": read_s,
        "read_peak_increase_bytes": read_increase,
        "content": content_digest(blobs.path(sha)),
        "bytes": size,
    }


def content_digest(path: Path) -> str:
    """sha256 over a safetensors file's metadata (keys sorted) and its tensors' bytes in name order."""
    h = hashlib.sha256()
    with safe_open(path, "pt") as f:
        h.update(json.dumps(f.metadata(), sort_keys=True).encode())
        for name in sorted(f.keys()):
            h.update(name.encode())
            h.update(f.get_tensor(name).numpy().tobytes())
    return h.hexdigest()


def measure(name: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="gradpool-checkpoint-") as tmp:
        streamed = in_fresh_process(write_once, name, "streamed", Path(tmp))
        in_memory = in_fresh_process(write_once, name, "in_memory", Path(tmp))
    return {
        "model": name,
        "params": streamed["params"],
        "checkpoint_bytes": streamed["bytes"],
        "streamed_s": round(streamed["seconds"], 3),
        "streamed_peak_increase_bytes": streamed["peak_increase_bytes"],
        "in_memory_s": round(in_memory["seconds"], 3),
        "in_memory_peak_increase_bytes": in_memory["peak_increase_bytes"],
        "streamed_read_s": round(streamed["read_s"], 3),
        "streamed_read_peak_increase_bytes": streamed["read_peak_increase_bytes"],
        "in_memory_read_s": round(in_memory["read_s"], 3),
        "in_memory_read_peak_increase_bytes": in_memory["read_peak_increase_bytes"],
        "same_content": streamed["content"] == in_memory["content"],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.checkpoint", description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="gpt2-124m,llama-150m", help="presets, comma-separated")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    rows = []
    for name in [m for m in args.models.split(",") if m]:
        try:
            resolve(name, None)
        except (KeyError, ValueError) as e:
            ap.error(f"unknown model {name!r} ({e})")
        rows.append(measure(name))
        if not args.json:
            print(json.dumps(rows[-1]), file=sys.stderr)
    result = {"rows": rows}
    if args.json:
        print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
