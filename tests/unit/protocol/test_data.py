"""The dataset: building it from text, the held-out split, training ids and assignments."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.data import (
    DataError,
    Dataset,
    assignment,
    build_dataset,
    eval_ids,
    num_eval_total,
    train_id,
)

FAST = settings(max_examples=40, deadline=None)
MINER = "ab" * 32


# -- training ids and assignments -------------------------------------------------------------------------
@FAST
@given(eval_every=st.integers(2, 60), extra=st.integers(0, 3000))
def test_train_id_enumerates_every_training_sequence_once(eval_every: int, extra: int) -> None:
    num_sequences = 2 * eval_every + extra
    num_train = num_sequences - num_eval_total(num_sequences, eval_every)
    ids = [train_id(j, eval_every) for j in range(num_train)]
    assert ids == [i for i in range(num_sequences) if i % eval_every != 0]


def test_held_out_ids_are_every_eval_every_th() -> None:
    assert num_eval_total(100, 10) == 10 and num_eval_total(101, 10) == 11
    assert [train_id(j, 3) for j in range(6)] == [1, 2, 4, 5, 7, 8]


@FAST
@given(
    seed=st.integers(0, 2**63),
    round_=st.integers(0, 10**6),
    eval_every=st.integers(2, 60),
    extra=st.integers(0, 5000),
    count=st.integers(0, 64),
)
def test_assignment_is_in_range_and_never_held_out(
    seed: int, round_: int, eval_every: int, extra: int, count: int
) -> None:
    num_sequences = 2 * eval_every + extra
    ids = assignment(seed, round_, MINER, count, num_sequences, eval_every)
    assert len(ids) == count
    assert all(0 < i < num_sequences and i % eval_every != 0 for i in ids)
    assert ids == assignment(seed, round_, MINER, count, num_sequences, eval_every)


def test_assignment_depends_on_seed_round_and_miner() -> None:
    args = {"count": 32, "num_sequences": 100_000, "eval_every": 50}
    base = assignment(1, 7, MINER, **args)
    assert assignment(2, 7, MINER, **args) != base
    assert assignment(1, 8, MINER, **args) != base
    assert assignment(1, 7, "cd" * 32, **args) != base
    # The public key is hex: its case does not change who it is.
    assert assignment(1, 7, MINER.upper(), **args) == base
    # A longer assignment extends a shorter one.
    assert assignment(1, 7, MINER, 40, 100_000, 50)[:32] == base


def test_assignment_pins_its_hash_construction() -> None:
    # Anyone can recompute an assignment: sha256 of "gradpool-assign:seed:round:miner:i", first 8 bytes LE.
    digest = hashlib.sha256(f"gradpool-assign:5:3:{MINER}:0".encode()).digest()
    j = int.from_bytes(digest[:8], "little") % (1000 - 100)
    assert assignment(5, 3, MINER, 1, 1000, 10) == [train_id(j, 10)]


def test_assignment_covers_the_training_set_roughly_uniformly() -> None:
    ids = assignment(0, 0, MINER, 20_000, 1000, 10)
    counts = np.bincount(ids, minlength=1000)
    assert counts[::10].sum() == 0
    trained = counts[np.arange(1000) % 10 != 0]
    assert trained.min() > 0 and trained.max() < 3 * trained.mean()


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
