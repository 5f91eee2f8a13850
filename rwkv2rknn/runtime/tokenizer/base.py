"""What every tokenizer offers, and the simplest one: raw UTF-8 bytes."""

from __future__ import annotations

from typing import Iterable


class Tokenizer:
    """What every tokenizer offers.

    ``decode_bytes`` returns the raw bytes of the tokens; it is what makes streaming output
    possible without replacement characters in the middle of a multi-byte character.
    ``supports_bytes`` is False for tokenizers where ``decode_bytes`` is only ``decode(...).encode()``.
    """

    name: str = "tokenizer"
    vocab_size: int = 0
    supports_bytes: bool = True

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} vocab_size={self.vocab_size}>"


def check_id(i: int, vocab_size: int) -> int:
    i = int(i)
    if not 0 <= i < vocab_size:
        raise ValueError(f"token id {i} is outside the vocabulary (0..{vocab_size - 1})")
    return i


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes are the ids (vocabulary 256)."""

    name = "bytes"
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_bytes(self, data: bytes) -> list[int]:
        return list(bytes(data))

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return bytes(check_id(i, 256) for i in ids)
