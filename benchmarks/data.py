"""Tokenising a large corpus: ``python -m benchmarks.data --json``.

The benchmark makes a corpus of at least ``--mb`` (512) MB from the Python standard library's sources,
repeated: half as parquet files (a ``text`` column, row groups of about 4 MB), half as text files. It trains
a byte-level BPE (``--vocab-size``, 8192) on a sample, then in fresh processes:

- ``tokens_per_s``: gradpool's ``coordinator.data.corpus.build_dataset`` over the whole corpus (reading,
  encoding in batches, writing the token file, hashing it);
- ``bare_tokens_per_s``: the tokenizer's own batch encoding (``encode_batch_fast``) over the same texts,
  read the same way, nothing written;
- ``peak_rss_increase_bytes``: the build's resident-memory high-water mark minus the memory before it.

Targets: tokens_per_s >= 0.8 x bare_tokens_per_s; peak RSS increase <= 512 MiB.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmarks.aggregation import in_fresh_process, peak_rss_bytes, settle_memory
from protocol.data import stdlib_dir

MiB = 1 << 20
RSS_LIMIT, RATIO = 512 * MiB, 0.8


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def make_corpus(root: Path, total_bytes: int) -> int:
    """Parquet and text files of stdlib sources, repeated until ``total_bytes`` of text; the text's size
    (the parquet files are smaller: compressed)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    sources = [p.read_text(encoding="utf-8", errors="replace") for p in sorted(stdlib_dir().glob("*.py"))]
    per_file, written, i = 64 * MiB, 0, 0
    root.mkdir(parents=True, exist_ok=True)
    while written < total_bytes:
        docs, size = [], 0
        while size < per_file:
            doc = sources[(i * 7 + len(docs)) % len(sources)]
            docs.append(doc)
            size += len(doc.encode())
        if i % 2 == 0:
            rows = max(1, len(docs) * 4 * MiB // size)
            pq.write_table(pa.table({"text": docs}), root / f"part-{i:03d}.parquet", row_group_size=rows)
        else:
            (root / f"part-{i:03d}.txt").write_text("\n\n".join(docs), encoding="utf-8")
        written += size
        i += 1
    return written


def ours(corpus: Path, tokenizer: str, out: Path) -> dict[str, float]:
    from coordinator.data.corpus import build_dataset
    from coordinator.data.tokenizer import RunTokenizer

    tok = RunTokenizer(tokenizer)
    before = settle_memory()
    t0 = time.perf_counter()
    meta = build_dataset(out, corpus, seq_len=1024, eval_every=50, tokenizer=tok)
    seconds = time.perf_counter() - t0
    return {"tokens": meta.num_tokens, "seconds": seconds, "rss": peak_rss_bytes() - before}


def bare(corpus: Path, tokenizer: str) -> dict[str, float]:
    from coordinator.data.corpus import corpus_files, text_batches
    from coordinator.data.tokenizer import RunTokenizer

    hf = RunTokenizer(tokenizer).hf
    t0, tokens = time.perf_counter(), 0
    for path in corpus_files(corpus):
        for pieces in text_batches(path):
            tokens += sum(
                len(e.ids) for e in hf.encode_batch_fast([t for t, _ in pieces], add_special_tokens=False)
            )
    return {"tokens": tokens, "seconds": time.perf_counter() - t0}


def _sample(batches: Iterator[list[tuple[str, bool]]], chars: int) -> Iterator[str]:
    """The first ``chars`` characters' worth of texts: what the tokenizer is trained on."""
    seen = 0
    for batch in batches:
        for text, _ in batch:
            yield text
            seen += len(text)
            if seen >= chars:
                return


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=int, default=512, help="corpus size in MB")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="gradpool-data-") as tmp:
        root = Path(tmp)
        corpus_bytes = make_corpus(root / "corpus", args.mb * MiB)
        files = sum(p.stat().st_size for p in (root / "corpus").iterdir())
        log(f"corpus: {corpus_bytes / MiB:.0f} MiB of text, {files / MiB:.0f} MiB of files")
        from coordinator.data.corpus import text_batches
        from coordinator.data.tokenizer import train_bpe

        first = sorted((root / "corpus").iterdir())[0]
        train_bpe(_sample(text_batches(first), 16 * MiB), args.vocab_size, root / "tok.json")
        b = in_fresh_process(bare, root / "corpus", str(root / "tok.json"))
        log(f"bare: {b['tokens'] / b['seconds']:.0f} tokens/s")
        o = in_fresh_process(ours, root / "corpus", str(root / "tok.json"), root / "data")
        log(f"ours: {o['tokens'] / o['seconds']:.0f} tokens/s, peak RSS +{o['rss'] / MiB:.0f} MiB")
    result = {
        "corpus_bytes": corpus_bytes,
        "file_bytes": files,
        "tokens": o["tokens"],
        "tokens_per_s": o["tokens"] / o["seconds"],
        "bare_tokens": b["tokens"],
        "bare_tokens_per_s": b["tokens"] / b["seconds"],
        "peak_rss_increase_bytes": int(o["rss"]),
        "seconds": o["seconds"],
        "bare_seconds": b["seconds"],
    }
    result["targets"] = [
        {
            "check": f"tokens_per_s >= {RATIO} x bare",
            "met": result["tokens_per_s"] >= RATIO * result["bare_tokens_per_s"],
        },
        {"check": "peak RSS increase <= 512 MiB", "met": result["peak_rss_increase_bytes"] <= RSS_LIMIT},
    ]
    print(json.dumps(result) if args.json else json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
