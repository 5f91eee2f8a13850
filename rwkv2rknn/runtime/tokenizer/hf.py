"""A Hugging Face ``tokenizer.json``, through the ``tokenizers`` package (imported lazily).

Byte-level BPE vocabularies (GPT-2 style, e.g. the GPT-NeoX 20B tokenizer of the Pile models)
also decode to raw bytes, so that streamed output never splits a character.
"""

from __future__ import annotations

import json
import os
from typing import Iterable, Optional

from rwkv2rknn.errors import BadInput, MissingDependency
from rwkv2rknn.runtime.tokenizer.base import Tokenizer, check_id


def _byte_level_alphabet() -> dict[str, int]:
    """The printable stand-in character of each byte used by byte-level BPE (GPT-2 style)."""
    kept = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    kept_set = set(kept)
    char_of_byte: dict[int, str] = {b: chr(b) for b in kept}
    extra = 0
    for b in range(256):
        if b not in kept_set:
            char_of_byte[b] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in char_of_byte.items()}


def _is_byte_level_decoder(decoder) -> bool:
    if not isinstance(decoder, dict):
        return False
    kind = decoder.get("type")
    if kind == "ByteLevel":
        return True
    if kind == "Sequence":
        parts = decoder.get("decoders") or []
        return bool(parts) and all(isinstance(p, dict) and p.get("type") == "ByteLevel" for p in parts)
    return False


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizer.json``, through the ``tokenizers`` package (imported here, lazily)."""

    def __init__(self, path: str):
        path = os.fspath(path)
        if os.path.isdir(path) and os.path.isfile(os.path.join(path, "tokenizer.json")):
            path = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(path):
            raise BadInput(
                f"cannot find the tokenizer file '{path}'",
                "give the path of an existing tokenizer.json, or 'bytes' or 'world'",
            )
        try:
            with open(path, "r", encoding="utf-8") as f:
                config = json.load(f)
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise BadInput(
                f"cannot read tokenizer '{path}' ({e})", "give a valid Hugging Face tokenizer.json"
            ) from e
        if not isinstance(config, dict) or "model" not in config:
            raise BadInput(
                f"cannot read tokenizer '{path}' (no 'model' section)",
                "give a valid Hugging Face tokenizer.json",
            )
        try:
            import tokenizers
        except ImportError as e:
            raise MissingDependency(
                f"reading tokenizer '{path}' needs the tokenizers package", "run `pip install tokenizers`"
            ) from e
        try:
            self._tok = tokenizers.Tokenizer.from_file(path)
        except Exception as e:  # tokenizers raises its own Exception subclasses
            raise BadInput(
                f"cannot read tokenizer '{path}' ({e})", "give a valid Hugging Face tokenizer.json"
            ) from e
        self.name = f"hf:{path}"
        self.path = path
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        self._id_to_bytes: Optional[list[Optional[bytes]]] = None
        self.supports_bytes = _is_byte_level_decoder(config.get("decoder"))
        if self.supports_bytes:
            self._id_to_bytes = self._byte_table()
            if self._id_to_bytes is None:
                self.supports_bytes = False

    def _byte_table(self) -> Optional[list[Optional[bytes]]]:
        """Bytes of every id (None for special tokens, which decode() skips); None if not byte-level."""
        alphabet = _byte_level_alphabet()
        table: list[Optional[bytes]] = [b""] * self.vocab_size
        special = set()
        for i, added in self._tok.get_added_tokens_decoder().items():
            if i < self.vocab_size:
                if added.special:
                    special.add(i)
                    table[i] = None
                else:
                    table[i] = added.content.encode("utf-8")
        added_ids = set(self._tok.get_added_tokens_decoder())
        for token, i in self._tok.get_vocab(with_added_tokens=False).items():
            if i in added_ids or i >= self.vocab_size:
                continue
            try:
                table[i] = bytes(alphabet[c] for c in token)
            except KeyError:
                return None  # not a byte-level vocabulary after all
        return table

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Iterable[int]) -> str:
        ids = [check_id(i, self.vocab_size) for i in ids]
        if self._id_to_bytes is not None:
            return self.decode_bytes(ids).decode("utf-8", errors="replace")
        return self._tok.decode(ids)

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        ids = [check_id(i, self.vocab_size) for i in ids]
        if self._id_to_bytes is None:
            return self._tok.decode(ids).encode("utf-8")
        table = self._id_to_bytes
        return b"".join(b for b in (table[i] for i in ids) if b)
