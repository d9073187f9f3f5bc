"""The run's tokenizer: ``byte`` (UTF-8 bytes, vocabulary 256, nothing to download) or a Hugging Face
``tokenizer.json`` (any the ``tokenizers`` library reads, such as a byte-level BPE from
``gradpool tokenizer train``). Either way the coordinator serves it as a ``tokenizer.json`` whose sha256 it
announces, and an exported model carries it; the byte tokenizer as a 256-entry byte-level BPE without
merges, whose ids are the byte values.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from protocol.errors import DataError

BYTE = "byte"
END_OF_TEXT = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>")  # a document's end, by custom
DOCUMENT_GAP = b"\n\n"  # what the byte tokenizer puts between documents


@functools.cache
def _byte_alphabet() -> tuple[str, ...]:
    """GPT-2's byte-to-character map: the character that stands for each byte in a byte-level vocabulary."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return tuple(chars[b] for b in range(256))


def byte_tokenizer() -> Tokenizer:
    """The byte tokenizer in Hugging Face form: id = byte value, for any text, both ways."""
    vocab = {c: b for b, c in enumerate(_byte_alphabet())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return tok


class RunTokenizer:
    """The run's tokenizer, as the data pipeline and the exporter use it."""

    def __init__(self, spec: str) -> None:
        self.spec = spec
        if spec == BYTE:
            self.hf = byte_tokenizer()
            self.is_byte = True
        else:
            path = Path(spec)
            if not path.is_file():
                raise DataError(f"tokenizer {spec!r} is neither 'byte' nor a tokenizer.json file")
            try:
                self.hf = Tokenizer.from_file(str(path))
            except Exception as e:  # the library raises its own exception types
                raise DataError(f"cannot read tokenizer {path}: {e}") from None
            self.is_byte = False
        self.json = self.hf.to_str().encode() if self.is_byte else Path(spec).read_bytes()
        self.sha256 = hashlib.sha256(self.json).hexdigest()
        self.vocab_size = 256 if self.is_byte else self.hf.get_vocab_size(with_added_tokens=True)
        self.end_of_text = (
            None
            if self.is_byte
            else next((i for t in END_OF_TEXT if (i := self.hf.token_to_id(t)) is not None), None)
        )

    @property
    def dtype(self) -> np.dtype[np.unsignedinteger]:
        """The token file's type: uint16 up to 65,536 entries, uint32 above."""
        return np.dtype(np.uint16 if self.vocab_size <= 1 << 16 else np.uint32)

    def encode_pieces(self, pieces: Sequence[tuple[str, bool]]) -> np.ndarray:
        """The tokens of pieces of text, each (text, whether a document ends with it): a document's end is
        followed by the end-of-text token (the byte tokenizer: a blank line). One flat array."""
        if self.is_byte:  # the first releases' bytes exactly
            raw = b"".join(
                t.encode("utf-8", errors="replace") + (DOCUMENT_GAP if end else b"") for t, end in pieces
            )
            return np.frombuffer(raw, dtype=np.uint8).astype(self.dtype)
        parts = []
        for enc, (_, end) in zip(
            self.hf.encode_batch_fast([t for t, _ in pieces], add_special_tokens=False), pieces, strict=True
        ):
            parts.append(np.asarray(enc.ids, dtype=self.dtype))
            if end and self.end_of_text is not None:
                parts.append(np.asarray([self.end_of_text], dtype=self.dtype))
        return np.concatenate(parts) if parts else np.zeros(0, dtype=self.dtype)

    def encode(self, text: str) -> list[int]:
        if self.is_byte:
            return list(text.encode("utf-8", errors="replace"))
        return list(self.hf.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Iterable[int]) -> str:
        ids = list(ids)
        if self.is_byte:
            return bytes(ids).decode("utf-8", errors="replace")
        return str(self.hf.decode(ids, skip_special_tokens=False))

    def special_tokens(self) -> dict[str, str]:
        """For an exported tokenizer_config.json: the end-of-text token, if it has one."""
        if self.end_of_text is None:
            return {}
        token = str(self.hf.id_to_token(self.end_of_text))
        return {"eos_token": token, "bos_token": token, "unk_token": token}


def train_bpe(texts: Iterator[str], vocab_size: int, out: Path) -> Tokenizer:
    """A byte-level BPE with ``<|endoftext|>``, trained on ``texts`` (offline), written to ``out``."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(tok.to_str())
    tmp.replace(out)
    return tok


def tokenizer_config(tok: RunTokenizer, max_length: int) -> dict[str, object]:
    """The tokenizer_config.json that lets ``AutoTokenizer`` load the exported tokenizer.json."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": max_length,
        "clean_up_tokenization_spaces": False,
        **tok.special_tokens(),
    }
