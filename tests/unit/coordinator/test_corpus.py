"""Building the run's token file from a corpus: text, jsonl, a folder, the standard library, bounds."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from coordinator.data.corpus import build_dataset
from coordinator.data.tokenizer import RunTokenizer, byte_tokenizer, train_bpe
from protocol.data import Dataset, eval_ids, num_eval_total
from protocol.errors import DataError


# -- building -------------------------------------------------------------------------------------------
def test_build_from_a_text_file(tmp_path: Path) -> None:
    text = "".join(f"line {i}: héllo\n" for i in range(2000))
    corpus = tmp_path / "c.txt"
    corpus.write_text(text, encoding="utf-8")
    meta = build_dataset(tmp_path / "ds", corpus, seq_len=31, eval_every=10)
    raw = text.encode() + b"\n\n"
    assert meta.seq_len == 31 and meta.eval_every == 10
    assert meta.num_sequences == len(raw) // 32
    assert meta.num_tokens == meta.num_sequences * 32
    assert meta.num_train == meta.num_sequences - num_eval_total(meta.num_sequences, 10)
    assert meta.source == str(corpus)
    tokens = np.fromfile(tmp_path / "ds" / "tokens.bin", dtype=np.uint16)
    assert bytes(tokens.astype(np.uint8)) == raw[: meta.num_tokens]
    assert meta.sha256 == hashlib.sha256(tokens.tobytes()).hexdigest()
    assert json.loads((tmp_path / "ds" / "meta.json").read_text())["num_sequences"] == meta.num_sequences
    ds = Dataset(tmp_path / "ds")
    seqs = ds.sequences([1, 3])
    assert seqs.shape == (2, 32)
    assert bytes(seqs[1].tolist()) == raw[3 * 32 : 4 * 32]
    assert ds.sequences([]).shape == (0, 32)
    assert ds.is_held_out(0) and ds.is_held_out(20) and not ds.is_held_out(21)
    assert eval_ids(meta, 3) == [0, 10, 20]


def test_build_from_jsonl(tmp_path: Path) -> None:
    corpus = tmp_path / "c.jsonl"
    lines = [json.dumps({"text": f"doc {i} " * 20, "id": i}) for i in range(200)]
    corpus.write_text("\n".join(lines[:100]) + "\n\n" + "\n".join(lines[100:]) + "\n")
    meta = build_dataset(tmp_path / "ds", corpus, seq_len=63, eval_every=5)
    expected = b"".join((f"doc {i} " * 20).encode() + b"\n\n" for i in range(200))
    tokens = np.fromfile(tmp_path / "ds" / "tokens.bin", dtype=np.uint16).astype(np.uint8)
    assert bytes(tokens) == expected[: meta.num_tokens]


@pytest.mark.parametrize(
    ("line", "where"),
    [("not json", ":2:"), ('["text"]', ":2:"), ('{"text": 5}', ":2:"), ('{"body": "x"}', ":2:")],
)
def test_bad_jsonl_is_a_data_error(tmp_path: Path, line: str, where: str) -> None:
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(json.dumps({"text": "x" * 10_000}) + "\n" + line + "\n")
    with pytest.raises(DataError) as e:
        build_dataset(tmp_path / "ds", corpus, seq_len=15, eval_every=2)
    assert where in e.value.message and e.value.code == "bad_data"


def test_build_from_a_folder_reads_text_files_in_order(tmp_path: Path) -> None:
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    (root / "b.txt").write_text("B" * 3000)
    (root / "sub" / "a.md").write_text("A" * 3000)
    (root / "c.jsonl").write_text(json.dumps({"text": "C" * 3000}) + "\n")
    (root / "skip.py").write_text("P" * 3000)
    meta = build_dataset(tmp_path / "ds", root, seq_len=15, eval_every=4)
    tokens = bytes(np.fromfile(tmp_path / "ds" / "tokens.bin", dtype=np.uint16).astype(np.uint8))
    expected = b"B" * 3000 + b"\n\n" + b"C" * 3000 + b"\n\n" + b"A" * 3000 + b"\n\n"
    assert tokens == expected[: meta.num_tokens]
    assert b"P" not in tokens


def test_max_tokens_truncates(tmp_path: Path) -> None:
    corpus = tmp_path / "c.txt"
    corpus.write_text("x" * 50_000)
    meta = build_dataset(tmp_path / "ds", corpus, seq_len=15, max_tokens=1000, eval_every=5)
    assert meta.num_sequences == 1000 // 16


def test_default_corpus_is_the_standard_library(tmp_path: Path) -> None:
    meta = build_dataset(tmp_path / "ds", None, seq_len=63, max_tokens=20_000, eval_every=5)
    assert meta.source.startswith("python-stdlib:")
    assert meta.num_sequences == 20_000 // 64


def test_missing_or_empty_or_tiny_corpus_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError):
        build_dataset(tmp_path / "ds", tmp_path / "nope.txt", seq_len=15)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "x.py").write_text("x" * 10_000)
    with pytest.raises(DataError):
        build_dataset(tmp_path / "ds", tmp_path / "empty", seq_len=15)
    (tmp_path / "small.txt").write_text("x" * 100)
    with pytest.raises(DataError) as e:
        build_dataset(tmp_path / "ds", tmp_path / "small.txt", seq_len=15, eval_every=50)
    assert "too small" in e.value.message
    assert not (tmp_path / "ds" / "meta.json").exists()


def test_build_reuses_a_built_dataset_and_rebuilds_on_new_settings(tmp_path: Path) -> None:
    corpus = tmp_path / "c.txt"
    corpus.write_text("abc" * 5000)
    first = build_dataset(tmp_path / "ds", corpus, seq_len=15, eval_every=5)
    stamp = (tmp_path / "ds" / "tokens.bin").stat().st_mtime_ns
    assert build_dataset(tmp_path / "ds", corpus, seq_len=15, eval_every=5) == first
    assert (tmp_path / "ds" / "tokens.bin").stat().st_mtime_ns == stamp
    second = build_dataset(tmp_path / "ds", corpus, seq_len=31, eval_every=5)
    assert second.seq_len == 31 and second.num_sequences == 15_002 // 32
    assert Dataset(tmp_path / "ds").meta == second


def test_build_rebuilds_when_the_corpus_or_max_tokens_change(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("a" * 20_000)
    (tmp_path / "b.txt").write_text("b" * 10_000)
    build_dataset(tmp_path / "ds", tmp_path / "a.txt", seq_len=15, eval_every=5)
    meta = build_dataset(tmp_path / "ds", tmp_path / "b.txt", seq_len=15, eval_every=5)
    assert meta.source == str(tmp_path / "b.txt") and meta.num_sequences == 10_002 // 16
    meta = build_dataset(tmp_path / "ds", tmp_path / "b.txt", seq_len=15, max_tokens=1600, eval_every=5)
    assert meta.num_sequences == 100
    assert Dataset(tmp_path / "ds").meta == meta


# -- real corpora: parquet, token shards, folders mixing them, BPE tokenizers ------------------------------
def _parquet(path: Path, texts: list[str], **columns: list[object]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"text": texts, **columns}), path, row_group_size=7)
    return path


def _shard(path: Path, tokens: np.ndarray, magic: int = 20240520) -> Path:
    header = np.zeros(256, dtype="<i4")
    header[:3] = (magic, 1, len(tokens))
    path.write_bytes(header.tobytes() + tokens.astype("<u2").tobytes())
    return path


@pytest.fixture
def bpe(tmp_path: Path, corpus_file: Path) -> RunTokenizer:
    path = tmp_path / "tokenizer.json"
    train_bpe(iter([corpus_file.read_text(encoding="utf-8")]), 400, path)
    return RunTokenizer(str(path))


def test_parquet_and_shards_in_one_folder_with_a_bpe_tokenizer(tmp_path: Path, bpe: RunTokenizer) -> None:
    docs = [f"def f{i}(x):\n    return x * {i}\n" for i in range(60)]
    _parquet(tmp_path / "c" / "a.parquet", docs, id=list(range(60)))
    shard = np.arange(3000) % bpe.vocab_size
    _shard(tmp_path / "c" / "b.bin", shard)
    meta = build_dataset(tmp_path / "ds", tmp_path / "c", seq_len=15, eval_every=5, tokenizer=bpe)
    tokens = np.fromfile(tmp_path / "ds" / "tokens.bin", dtype=np.uint16)
    text = np.concatenate([[*bpe.hf.encode(d).ids, bpe.end_of_text] for d in docs])
    expected = np.concatenate([text, shard])
    assert meta.tokenizer_sha256 == bpe.sha256 and meta.dtype == "uint16"
    assert np.array_equal(tokens, expected[: meta.num_tokens])
    assert bpe.decode(tokens[: len(bpe.hf.encode(docs[0]).ids)].tolist()) == docs[0]


def test_a_vocabulary_past_65536_makes_a_uint32_token_file(tmp_path: Path, corpus_file: Path) -> None:
    from tokenizers import AddedToken

    big = byte_tokenizer()
    big.add_tokens([AddedToken(f"<extra{i}>", special=True) for i in range(66000)])
    (tmp_path / "big.json").write_text(big.to_str())
    tok = RunTokenizer(str(tmp_path / "big.json"))
    assert tok.vocab_size > 1 << 16 and tok.dtype == np.uint32
    meta = build_dataset(tmp_path / "ds", corpus_file, 31, max_tokens=5000, eval_every=5, tokenizer=tok)
    assert meta.dtype == "uint32"
    assert bytes(Dataset(tmp_path / "ds").sequences([1])[0].tolist()) == corpus_file.read_bytes()[32:64]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: _write(d / "n.parquet", b"not parquet"), "cannot read"),
        (lambda d: _no_text_column(d / "a.parquet"), "no 'text' column"),
        (lambda d: _shard(d / "a.bin", np.arange(10), magic=7), "not a token shard"),
        (lambda d: _shard(d / "a.bin", np.array([1, 2, 9999])), "beyond the tokenizer's vocabulary"),
    ],
    ids=["not-parquet", "no-text-column", "bad-magic", "id-past-vocab"],
)
def test_a_bad_corpus_is_one_line_and_leaves_nothing_behind(
    tmp_path: Path, bpe: RunTokenizer, corpus_file: Path, make: Any, message: str
) -> None:
    corpus = tmp_path / "c"
    corpus.mkdir()
    (corpus / "0-good.txt").write_text(corpus_file.read_text(encoding="utf-8"), encoding="utf-8")
    make(corpus)
    with pytest.raises(DataError, match=message) as refused:
        build_dataset(tmp_path / "ds", corpus, seq_len=15, eval_every=5, tokenizer=bpe)
    assert "\n" not in str(refused.value)
    assert not (tmp_path / "ds").exists() or list((tmp_path / "ds").iterdir()) == []


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _no_text_column(path: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["x"]}), path)
    return path
