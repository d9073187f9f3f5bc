"""From a corpus to the run's token file (protocol/data.py), once, streamed to disk.

A corpus is a file or a folder of them: ``.txt`` / ``.md`` (a document each), ``.jsonl`` (a ``"text"`` per
line), ``.parquet`` (a ``text`` column, FineWeb's layout; read a row group at a time) and pre-tokenized
``.bin`` shards in the llm.c / modded-nanogpt format (256 int32 header words, magic 20240520, then uint16
tokens; taken as they are). Unset: the Python standard library's sources. Text is encoded in batches in
the tokenizer's native code; memory stays bounded whatever the corpus size. Any problem is a DataError
(one line for a person) and leaves nothing half-written behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import BinaryIO, TextIO

import numpy as np

from coordinator.data.tokenizer import RunTokenizer
from protocol.data import DatasetMeta, stdlib_dir
from protocol.errors import DataError

TEXT_SUFFIXES = (".txt", ".md", ".jsonl")
SUFFIXES = (*TEXT_SUFFIXES, ".parquet", ".bin")
SHARD_MAGIC, SHARD_HEADER_WORDS = 20240520, 256
BATCH_CHARS = 4 << 20  # text encoded per batch
PIECE_CHARS = 64 << 10  # text encoded as one sequence, at most (a large document is cut after a line)


def corpus_files(corpus: Path | None) -> list[Path]:
    """The files of the default corpus (the stdlib sources), or of a user's corpus file or folder."""
    if corpus is None:
        root = stdlib_dir()
        return sorted(p for p in root.rglob("*.py") if "site-packages" not in p.relative_to(root).parts)
    if not corpus.exists():
        raise DataError(f"corpus path {corpus} does not exist")
    if corpus.is_file():
        return [corpus]
    files = sorted(p for p in corpus.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
    if not files:
        raise DataError(f"no {'/'.join(SUFFIXES)} files under {corpus}")
    return files


def corpus_signature(files: list[Path]) -> str:
    """A digest of the corpus files' names, sizes and modification times: cheap (no file is read), and
    different whenever a file is added, removed or rewritten."""
    h = hashlib.sha256()
    for path in files:
        st = path.stat()
        h.update(f"{path}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()


# -- reading ------------------------------------------------------------------------------------------------
Piece = tuple[str, bool]  # some text, and whether a document ends with it


def text_batches(path: Path) -> Iterator[list[Piece]]:
    """A text file's documents, a batch of pieces at a time (a large document in several pieces), read as
    the batches are needed: memory does not grow with the file."""
    if path.suffix == ".parquet":
        for docs in _parquet(path):
            yield [(d, True) for d in docs]
        return
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            if path.suffix == ".jsonl":
                yield from _jsonl(path, f)
            else:
                yield from _text(f)
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}") from None


def _text(f: TextIO) -> Iterator[list[Piece]]:
    """One document, BATCH_CHARS at a time, in pieces of about PIECE_CHARS cut after a line end: the
    tokenizer's memory grows with the length of what it encodes at once, not only with the total."""
    pending = ""
    while block := f.read(BATCH_CHARS):
        block = pending + block
        pieces, start = [], 0
        while len(block) - start > PIECE_CHARS:
            cut = block.rfind("\n", start, start + PIECE_CHARS) + 1 or start + PIECE_CHARS
            pieces.append((block[start:cut], False))
            start = cut
        pending = block[start:]
        if pieces:
            yield pieces
    yield [(pending, True)]


def _jsonl(path: Path, f: TextIO) -> Iterator[list[Piece]]:
    batch: list[Piece] = []
    chars = 0
    for lineno, line in enumerate(f, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: not JSON ({e.msg})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise DataError(f'{path}:{lineno}: each line must be an object with a "text" string')
        batch.append((obj["text"], True))
        chars += len(obj["text"])
        if chars >= BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _parquet(path: Path) -> Iterator[list[str]]:
    import pyarrow.parquet as pq

    try:
        f = pq.ParquetFile(path)
    except Exception as e:  # pyarrow's own exception types
        raise DataError(f"cannot read {path} as parquet: {e}") from None
    if "text" not in f.schema_arrow.names:
        raise DataError(f"{path} has no 'text' column (columns: {', '.join(f.schema_arrow.names)})")
    for i in range(f.num_row_groups):
        column = f.read_row_group(i, columns=["text"]).column("text")
        yield [t for t in column.to_pylist() if isinstance(t, str)]


def shard_tokens(path: Path, vocab_size: int, chunk: int = 1 << 22) -> Iterator[np.ndarray]:
    """A pre-tokenized shard's tokens, a chunk at a time, each checked against the vocabulary."""
    with open(path, "rb") as f:
        header = np.frombuffer(f.read(4 * SHARD_HEADER_WORDS), dtype="<i4")
        if len(header) != SHARD_HEADER_WORDS or int(header[0]) != SHARD_MAGIC:
            raise DataError(f"{path} is not a token shard (no magic {SHARD_MAGIC} in its header)")
        declared = int(header[2])
        seen = 0
        while data := f.read(2 * chunk):
            tokens = np.frombuffer(data[: len(data) // 2 * 2], dtype="<u2")
            if tokens.size and int(tokens.max()) >= vocab_size:
                raise DataError(
                    f"{path} holds token id {int(tokens.max())}, beyond the tokenizer's "
                    f"vocabulary of {vocab_size}"
                )
            seen += tokens.size
            yield tokens
        if seen != declared:
            raise DataError(f"{path} declares {declared} tokens and holds {seen}")


# -- writing ------------------------------------------------------------------------------------------------
class _Writer:
    """Appends tokens to a temporary file, up to ``max_tokens``."""

    def __init__(self, f: BinaryIO, dtype: np.dtype[np.unsignedinteger], max_tokens: int | None) -> None:
        self.f, self.dtype, self.max_tokens, self.count = f, dtype, max_tokens, 0

    @property
    def full(self) -> bool:
        return self.max_tokens is not None and self.count >= self.max_tokens

    def write(self, tokens: np.ndarray) -> None:
        if self.max_tokens is not None:
            tokens = tokens[: self.max_tokens - self.count]
        self.f.write(tokens.astype(self.dtype, copy=False).tobytes())
        self.count += len(tokens)


def build_dataset(
    out_dir: Path,
    corpus: Path | None,
    seq_len: int,
    max_tokens: int | None = None,
    eval_every: int = 50,
    tokenizer: RunTokenizer | None = None,
) -> DatasetMeta:
    """Tokenise once (with ``tokenizer``, the byte one by default) into ``out_dir/tokens.bin`` and
    ``meta.json``; reuse them when present. Data built from a corpus that has changed since is refused:
    the run's sequences must stay those its miners were given."""
    tokenizer = tokenizer or RunTokenizer("byte")
    meta_path = out_dir / "meta.json"
    corpus_name = str(corpus) if corpus else None
    wanted = {
        "seq_len": seq_len,
        "eval_every": eval_every,
        "max_tokens": max_tokens,
        "corpus": corpus_name,
        "tokenizer_sha256": tokenizer.sha256,
    }
    files = corpus_files(corpus)
    signature = corpus_signature(files)
    if meta_path.exists():
        meta = DatasetMeta(**json.loads(meta_path.read_text()))
        old = {
            **{k: getattr(meta, k) for k in wanted},
            "tokenizer_sha256": meta.tokenizer_sha256 or RunTokenizer("byte").sha256,
        }
        if old == wanted:
            if meta.corpus_signature not in (None, signature):
                raise DataError(
                    f"the corpus {corpus_name or 'python-stdlib'} changed since the run's data was built in "
                    f"{out_dir}; restore it, or start a new run with a new --state-dir"
                )
            return meta
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / "tokens.bin.tmp"
    try:
        with open(tmp, "wb") as f, _progress(sum(p.stat().st_size for p in files)) as advance:
            writer = _Writer(f, tokenizer.dtype, max_tokens)
            for path in files:
                _ingest(path, tokenizer, writer)
                advance(path.stat().st_size)
                if writer.full:
                    break
        n_seq = writer.count // (seq_len + 1)
        if n_seq < 2 * eval_every:
            raise DataError(
                f"corpus too small: {writer.count} tokens make {n_seq} sequences of "
                f"{seq_len + 1}; need at least {2 * eval_every}"
            )
        size = n_seq * (seq_len + 1) * tokenizer.dtype.itemsize
        os.truncate(tmp, size)
        digest = _sha256(tmp)
        os.replace(tmp, out_dir / "tokens.bin")
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    meta = DatasetMeta(
        seq_len=seq_len,
        num_sequences=n_seq,
        eval_every=eval_every,
        num_tokens=n_seq * (seq_len + 1),
        sha256=digest,
        source=corpus_name or f"python-stdlib:{stdlib_dir()}",
        corpus=corpus_name,
        max_tokens=max_tokens,
        corpus_signature=signature,
        dtype=tokenizer.dtype.name,
        tokenizer=tokenizer.spec,
        tokenizer_sha256=tokenizer.sha256,
    )
    tmp_meta = out_dir / "meta.json.tmp"
    tmp_meta.write_text(json.dumps(asdict(meta), indent=1))
    os.replace(tmp_meta, meta_path)
    return meta


def _ingest(path: Path, tokenizer: RunTokenizer, writer: _Writer) -> None:
    if path.suffix == ".bin":
        for tokens in shard_tokens(path, tokenizer.vocab_size):
            writer.write(tokens)
            if writer.full:
                return
        return
    for pieces in text_batches(path):
        writer.write(tokenizer.encode_pieces(pieces))
        if writer.full:
            return


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def _progress(total: int) -> Iterator[Callable[[int], None]]:
    """A progress bar over the corpus bytes on a terminal; nothing otherwise."""
    if not sys.stderr.isatty():
        yield lambda _: None
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(
        TextColumn("tokenising"), BarColumn(), DownloadColumn(), TimeRemainingColumn(), transient=True
    ) as bar:
        task = bar.add_task("tokenising", total=total)
        yield lambda n: bar.update(task, advance=n)
