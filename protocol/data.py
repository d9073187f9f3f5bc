"""The dataset: text -> a flat token file -> fixed-length sequences; the held-out split; assignments.

Sequence ``i`` is tokens ``[i * (L + 1), (i + 1) * (L + 1))`` (inputs plus the shifted target). Every
``eval_every``-th sequence (ids 0, e, 2e, ...) is held out and never assigned. An assignment is a pure
function of (run seed, round, miner public key), so anyone can recompute it.
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from protocol.errors import DataError
from protocol.tokenizer import ByteTokenizer

TEXT_SUFFIXES = (".txt", ".md", ".jsonl")


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def corpus_files(corpus: Path | None) -> list[Path]:
    """The files of the default corpus (the stdlib sources), or of a user's .txt/.md/.jsonl file or folder."""
    if corpus is None:
        root = stdlib_dir()
        return sorted(p for p in root.rglob("*.py") if "site-packages" not in p.relative_to(root).parts)
    if not corpus.exists():
        raise DataError(f"corpus path {corpus} does not exist")
    if corpus.is_file():
        return [corpus]
    files = sorted(p for p in corpus.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
    if not files:
        raise DataError(f"no {'/'.join(TEXT_SUFFIXES)} files under {corpus}")
    return files


def corpus_signature(files: list[Path]) -> str:
    """A digest of the corpus files' names, sizes and modification times: cheap (no file is read), and
    different whenever a file is added, removed or rewritten."""
    h = hashlib.sha256()
    for path in files:
        st = path.stat()
        h.update(f"{path}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()


def iter_documents(corpus: Path | None) -> Iterator[str]:
    """The documents of the corpus (see ``corpus_files``)."""
    for path in corpus_files(corpus):
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError as e:
            raise DataError(f"cannot read {path}: {e}") from None
        if path.suffix == ".jsonl":
            yield from _jsonl_texts(path, text)
        else:
            yield text


def _jsonl_texts(path: Path, text: str) -> Iterator[str]:
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: not JSON ({e.msg})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise DataError(f'{path}:{lineno}: each line must be an object with a "text" string')
        yield obj["text"]


@dataclass(frozen=True)
class DatasetMeta:
    seq_len: int
    num_sequences: int
    eval_every: int
    num_tokens: int
    sha256: str
    source: str
    corpus: str | None = None
    max_tokens: int | None = None
    corpus_signature: str | None = None  # corpus_signature() when the data was built; None: not recorded

    @property
    def num_train(self) -> int:
        return self.num_sequences - num_eval_total(self.num_sequences, self.eval_every)


def num_eval_total(num_sequences: int, eval_every: int) -> int:
    return -(-num_sequences // eval_every)


def build_dataset(
    out_dir: Path, corpus: Path | None, seq_len: int, max_tokens: int | None = None, eval_every: int = 50
) -> DatasetMeta:
    """Tokenise once into ``out_dir/tokens.bin`` (uint16) and ``meta.json``; reuse them when present. Data
    built from a corpus that has changed since is refused (DataError): the run's sequences must stay the
    sequences its miners were assigned."""
    meta_path = out_dir / "meta.json"
    corpus_name = str(corpus) if corpus else None
    wanted = {"seq_len": seq_len, "eval_every": eval_every, "max_tokens": max_tokens, "corpus": corpus_name}
    signature = corpus_signature(corpus_files(corpus))
    if meta_path.exists():
        meta = DatasetMeta(**json.loads(meta_path.read_text()))
        if {k: getattr(meta, k) for k in wanted} == wanted:
            if meta.corpus_signature not in (None, signature):
                raise DataError(
                    f"the corpus {corpus_name or 'python-stdlib'} changed since the run's data was built in "
                    f"{out_dir}; restore it, or start a new run with a new --state-dir"
                )
            return meta
    tok = ByteTokenizer()
    parts: list[bytes] = []
    total = 0
    for doc in iter_documents(corpus):
        ids = tok.encode(doc) + b"\n\n"
        if max_tokens is not None and total + len(ids) > max_tokens:
            parts.append(ids[: max_tokens - total])
            total = max_tokens
            break
        parts.append(ids)
        total += len(ids)
    tokens = np.frombuffer(b"".join(parts), dtype=np.uint8).astype(np.uint16)
    n_seq = len(tokens) // (seq_len + 1)
    if n_seq < 2 * eval_every:
        raise DataError(
            f"corpus too small: {len(tokens)} tokens make {n_seq} sequences of {seq_len + 1}; "
            f"need at least {2 * eval_every}"
        )
    tokens = tokens[: n_seq * (seq_len + 1)]
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / "tokens.bin.tmp"
    tokens.tofile(tmp)
    os.replace(tmp, out_dir / "tokens.bin")
    meta = DatasetMeta(
        seq_len=seq_len,
        num_sequences=n_seq,
        eval_every=eval_every,
        num_tokens=len(tokens),
        sha256=hashlib.sha256(tokens.tobytes()).hexdigest(),
        source=str(corpus) if corpus else f"python-stdlib:{stdlib_dir()}",
        corpus=corpus_name,
        max_tokens=max_tokens,
        corpus_signature=signature,
    )
    tmp = out_dir / "meta.json.tmp"
    tmp.write_text(json.dumps(asdict(meta), indent=1))
    os.replace(tmp, meta_path)
    return meta


class Dataset:
    """Read-only view of a built dataset."""

    def __init__(self, root: Path) -> None:
        self.meta = DatasetMeta(**json.loads((root / "meta.json").read_text()))
        self.tokens = np.memmap(root / "tokens.bin", dtype=np.uint16, mode="r")

    def sequences(self, ids: list[int]) -> torch.Tensor:
        """(len(ids), seq_len + 1) int64."""
        L = self.meta.seq_len + 1
        rows = [np.asarray(self.tokens[i * L : (i + 1) * L]) for i in ids]
        return (
            torch.from_numpy(np.stack(rows).astype(np.int64))
            if rows
            else torch.zeros(0, L, dtype=torch.int64)
        )

    def is_held_out(self, i: int) -> bool:
        return i % self.meta.eval_every == 0


def eval_ids(meta: DatasetMeta, limit: int) -> list[int]:
    """The fixed held-out set: the first ``limit`` held-out sequences."""
    return list(range(0, meta.num_sequences, meta.eval_every))[:limit]


def train_id(j: int, eval_every: int) -> int:
    """The j-th training sequence id, skipping every held-out id."""
    return j + j // (eval_every - 1) + 1


def assignment(
    seed: int, round_: int, miner: str, count: int, num_sequences: int, eval_every: int
) -> list[int]:
    """The training sequence ids miner ``miner`` (public key hex) must use in round ``round_``."""
    num_train = num_sequences - num_eval_total(num_sequences, eval_every)
    out = []
    for i in range(count):
        digest = hashlib.sha256(f"gradpool-assign:{seed}:{round_}:{miner.lower()}:{i}".encode()).digest()
        j = int.from_bytes(digest[:8], "little") % num_train
        out.append(train_id(j, eval_every))
    return out
