"""The dataset format: a flat token file cut into fixed-length sequences; the held-out split; assignments.

Sequence ``i`` is tokens ``[i * (L + 1), (i + 1) * (L + 1))`` (inputs plus the shifted target) of
``tokens.bin`` (uint16, or uint32 for a vocabulary above 65,536), described by ``meta.json``. Every
``eval_every``-th sequence (ids 0, e, 2e, ...) is held out and never assigned. An assignment is a pure
function of (run seed, round, miner public key), so anyone can recompute it. The coordinator builds the
files from a corpus (coordinator/data/corpus.py).
"""

from __future__ import annotations

import hashlib
import json
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

TOKEN_DTYPES = {"uint16": np.uint16, "uint32": np.uint32}


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


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
    corpus_signature: str | None = None  # the corpus files' names, sizes and times; None: not recorded
    dtype: str = "uint16"
    tokenizer: str = "byte"
    tokenizer_sha256: str | None = None

    @property
    def num_train(self) -> int:
        return self.num_sequences - num_eval_total(self.num_sequences, self.eval_every)


def num_eval_total(num_sequences: int, eval_every: int) -> int:
    return -(-num_sequences // eval_every)


class Dataset:
    """Read-only view of a built dataset."""

    def __init__(self, root: Path) -> None:
        self.meta = DatasetMeta(**json.loads((root / "meta.json").read_text()))
        self.tokens = np.memmap(root / "tokens.bin", dtype=TOKEN_DTYPES[self.meta.dtype], mode="r")

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
