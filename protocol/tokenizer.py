"""The default tokenizer: UTF-8 bytes, vocabulary 256. Nothing to download."""

from __future__ import annotations


class ByteTokenizer:
    vocab_size = 256

    def encode(self, text: str) -> bytes:
        return text.encode("utf-8", errors="replace")

    def decode(self, ids: bytes | list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")
