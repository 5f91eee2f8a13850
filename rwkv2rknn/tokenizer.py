"""Tokenizers for running RWKV models: raw bytes, RWKV World, and Hugging Face ``tokenizer.json``.

This module must import with only numpy and the standard library, because it runs on the board.
The Hugging Face ``tokenizers`` package is imported only when an HF tokenizer is loaded.

Specs accepted by :func:`load_tokenizer`:

* ``"bytes"``: UTF-8 bytes are the token ids (vocabulary 256).
* ``"world"``: the RWKV World tokenizer, with the vocabulary file shipped in the ``rwkv`` pip package.
* ``"world:/path/to/rwkv_vocab_v20230424.txt"``: the RWKV World tokenizer with a given vocabulary file.
* ``"/path/to/tokenizer.json"`` or ``"hf:/path/to/tokenizer.json"``: a Hugging Face tokenizer
  (for example the GPT-NeoX 20B tokenizer of the Pile models). A folder holding a ``tokenizer.json``
  is accepted too.
"""

from __future__ import annotations

import ast
import codecs
import importlib.util
import json
import os
from typing import Iterable, Optional, Sequence

from .errors import BadInput, MissingDependency

WORLD_VOCAB_NAME = "rwkv_vocab_v20230424.txt"
WORLD_VOCAB_SIZE = 65536

__all__ = [
    "Tokenizer",
    "ByteTokenizer",
    "WorldTokenizer",
    "HFTokenizer",
    "StreamDecoder",
    "find_world_vocab",
    "load_tokenizer",
    "tokenizer_for_vocab",
    "WORLD_VOCAB_NAME",
]


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


def _check_id(i: int, vocab_size: int) -> int:
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
        return bytes(_check_id(i, 256) for i in ids)


class WorldTokenizer(Tokenizer):
    """The RWKV World tokenizer: greedy longest match over the bytes of the text.

    Id 0 is end-of-text and has no bytes; ids inside the vocabulary size that have no entry in
    the file decode to nothing as well.
    """

    vocab_size = WORLD_VOCAB_SIZE

    def __init__(self, tokens: dict[int, bytes], name: str = "world"):
        if not tokens:
            raise ValueError("empty vocabulary")
        self.name = name
        self.vocab_size = max(WORLD_VOCAB_SIZE, max(tokens) + 1)
        self._id_to_bytes: list[bytes] = [b""] * self.vocab_size
        self._bytes_to_id: dict[bytes, int] = {}
        # For each first two bytes of a token: the token lengths that start that way, longest first.
        # Tokens of one byte are looked up directly.
        lengths: dict[bytes, set[int]] = {}
        for i, tok in tokens.items():
            if i < 0 or not tok:
                raise ValueError(f"bad vocabulary entry {i}: {tok!r}")
            self._id_to_bytes[i] = tok
            self._bytes_to_id[tok] = i
            if len(tok) >= 2:
                lengths.setdefault(tok[:2], set()).add(len(tok))
        self._lengths: dict[bytes, tuple[int, ...]] = {
            k: tuple(sorted(v, reverse=True)) for k, v in lengths.items()
        }

    @classmethod
    def from_file(cls, path: str) -> "WorldTokenizer":
        """Read a vocabulary file of lines ``<id> <python str or bytes literal> <byte length>``."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise BadInput(
                f"cannot find the RWKV World vocabulary file '{path}'",
                f"give the path of {WORLD_VOCAB_NAME} (it ships with `pip install rwkv`)",
            )
        tokens: dict[int, bytes] = {}
        try:
            with open(path, "r", encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    line = line.rstrip("\r\n")
                    if not line.strip():
                        continue
                    tokens_id, tok = _parse_vocab_line(line, path, lineno)
                    if tokens_id in tokens:
                        raise BadInput(
                            f"token id {tokens_id} appears twice in '{path}' (line {lineno})",
                            f"give an intact {WORLD_VOCAB_NAME}",
                        )
                    tokens[tokens_id] = tok
        except (OSError, UnicodeDecodeError) as e:
            raise BadInput(
                f"cannot read the RWKV World vocabulary file '{path}' ({e})",
                f"give a readable {WORLD_VOCAB_NAME}",
            ) from e
        if not tokens:
            raise BadInput(f"the RWKV World vocabulary file '{path}' is empty", f"give an intact {WORLD_VOCAB_NAME}")
        return cls(tokens, name=f"world:{path}")

    def encode(self, text: str) -> list[int]:
        return self.encode_bytes(text.encode("utf-8"))

    def encode_bytes(self, data: bytes) -> list[int]:
        """Greedy longest match over raw bytes (they need not be valid UTF-8)."""
        data = bytes(data)
        b2i = self._bytes_to_id
        lengths = self._lengths
        out: list[int] = []
        append = out.append
        i = 0
        n = len(data)
        while i < n:
            for length in lengths.get(data[i : i + 2], ()):
                tid = b2i.get(data[i : i + length])
                if tid is not None:
                    append(tid)
                    i += length
                    break
            else:
                tid = b2i.get(data[i : i + 1])
                if tid is None:
                    raise ValueError(f"byte 0x{data[i]:02x} has no token in the vocabulary")
                append(tid)
                i += 1
        return out

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        table = self._id_to_bytes
        n = self.vocab_size
        return b"".join(table[_check_id(i, n)] for i in ids)

    def token_bytes(self, token_id: int) -> bytes:
        return self._id_to_bytes[_check_id(token_id, self.vocab_size)]

    def token_id(self, token: bytes) -> Optional[int]:
        return self._bytes_to_id.get(token)


def _parse_vocab_line(line: str, path: str, lineno: int) -> tuple[int, bytes]:
    def bad(why: str) -> BadInput:
        return BadInput(
            f"line {lineno} of '{path}' is not '<id> <literal> <length>' ({why})",
            f"give an intact {WORLD_VOCAB_NAME}",
        )

    first = line.find(" ")
    last = line.rfind(" ")
    if first < 0 or last <= first:
        raise bad("too few fields")
    try:
        tid = int(line[:first])
        length = int(line[last + 1 :])
    except ValueError:
        raise bad("id or length is not a number") from None
    try:
        value = ast.literal_eval(line[first + 1 : last])
    except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError):
        raise bad("the token is not a Python literal") from None
    if isinstance(value, str):
        value = value.encode("utf-8")
    elif not isinstance(value, bytes):
        raise bad("the token is neither str nor bytes")
    if len(value) != length or tid < 0 or not value:
        raise bad(f"token {value!r} has {len(value)} bytes, the line says {length}")
    return tid, value


def find_world_vocab() -> str:
    """The path of the World vocabulary file inside the installed ``rwkv`` package (not imported)."""
    fix = f"run `pip install rwkv` (it ships {WORLD_VOCAB_NAME}) or give the file as 'world:/path/to/{WORLD_VOCAB_NAME}'"
    try:
        spec = importlib.util.find_spec("rwkv")
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        candidate = os.path.join(loc, WORLD_VOCAB_NAME)
        if os.path.isfile(candidate):
            return candidate
    if spec is None:
        raise MissingDependency(f"cannot find the RWKV World vocabulary {WORLD_VOCAB_NAME}: the rwkv package is not installed", fix)
    raise BadInput(f"the installed rwkv package has no {WORLD_VOCAB_NAME}", fix)


# --- Hugging Face tokenizer.json ------------------------------------------------------------------


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
            raise BadInput(f"cannot read tokenizer '{path}' ({e})", "give a valid Hugging Face tokenizer.json") from e
        if not isinstance(config, dict) or "model" not in config:
            raise BadInput(f"cannot read tokenizer '{path}' (no 'model' section)", "give a valid Hugging Face tokenizer.json")
        try:
            import tokenizers
        except ImportError as e:
            raise MissingDependency(
                f"reading tokenizer '{path}' needs the tokenizers package", "run `pip install tokenizers`"
            ) from e
        try:
            self._tok = tokenizers.Tokenizer.from_file(path)
        except Exception as e:  # tokenizers raises its own Exception subclasses
            raise BadInput(f"cannot read tokenizer '{path}' ({e})", "give a valid Hugging Face tokenizer.json") from e
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
        ids = [_check_id(i, self.vocab_size) for i in ids]
        if self._id_to_bytes is not None:
            return self.decode_bytes(ids).decode("utf-8", errors="replace")
        return self._tok.decode(ids)

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        ids = [_check_id(i, self.vocab_size) for i in ids]
        if self._id_to_bytes is None:
            return self._tok.decode(ids).encode("utf-8")
        table = self._id_to_bytes
        return b"".join(b for b in (table[i] for i in ids) if b)


# --- streaming --------------------------------------------------------------------------------------


class StreamDecoder:
    """Turn token ids, fed one at a time, into text that is complete so far.

    Bytes of a character that is split across tokens are held back until the character is
    complete, so streamed output never shows a replacement character in the middle of a character.
    Bytes that can never become valid UTF-8 come out as U+FFFD. Call :meth:`flush` at the end.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._bytes_mode = bool(getattr(tokenizer, "supports_bytes", True))
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._ids: list[int] = []  # only for tokenizers without bytes
        self._emitted = 0

    def feed(self, token_id: int) -> str:
        if self._bytes_mode:
            return self._utf8.decode(self.tokenizer.decode_bytes([token_id]))
        self._ids.append(int(token_id))
        text = self.tokenizer.decode(self._ids)
        end = len(text)
        while end > self._emitted and text[end - 1] == "\ufffd":
            end -= 1
        out = text[self._emitted : end]
        self._emitted = max(self._emitted, end)
        return out

    def feed_many(self, ids: Sequence[int]) -> str:
        return "".join(self.feed(i) for i in ids)

    def flush(self) -> str:
        if self._bytes_mode:
            out = self._utf8.decode(b"", final=True)
            self._utf8.reset()
            return out
        text = self.tokenizer.decode(self._ids)
        out = text[self._emitted :]
        self._ids = []
        self._emitted = 0
        return out


# --- choosing a tokenizer ---------------------------------------------------------------------------

_SPEC_HELP = "give 'bytes', 'world', 'world:/path/to/" + WORLD_VOCAB_NAME + "' or the path of a tokenizer.json"
_world_cache: dict[str, WorldTokenizer] = {}


def _load_world(path: str) -> WorldTokenizer:
    key = os.path.realpath(path)
    try:
        stamp = os.stat(key).st_mtime_ns
    except OSError:
        stamp = None
    cached = _world_cache.get(key)
    if cached is not None and getattr(cached, "_stamp", None) == stamp and stamp is not None:
        return cached
    tok = WorldTokenizer.from_file(path)
    tok._stamp = stamp  # type: ignore[attr-defined]
    _world_cache[key] = tok
    return tok


def load_tokenizer(spec: str) -> Tokenizer:
    """A tokenizer from a spec: 'bytes', 'world', 'world:/path', '/path/tokenizer.json' or 'hf:/path'."""
    if not isinstance(spec, (str, os.PathLike)):
        raise BadInput(f"cannot read tokenizer {spec!r}", _SPEC_HELP)
    spec = os.fspath(spec)
    s = spec.strip()
    if not s:
        raise BadInput("no tokenizer given", _SPEC_HELP)
    low = s.lower()
    if low in ("bytes", "byte"):
        return ByteTokenizer()
    if low == "world":
        return _load_world(find_world_vocab())
    if low.startswith("world:"):
        path = os.path.expanduser(s[len("world:") :])
        if not path:
            raise BadInput(f"cannot read tokenizer '{spec}' (no path after 'world:')", _SPEC_HELP)
        return _load_world(path)
    if low.startswith("hf:"):
        path = os.path.expanduser(s[len("hf:") :])
        if not path:
            raise BadInput(f"cannot read tokenizer '{spec}' (no path after 'hf:')", _SPEC_HELP)
        return HFTokenizer(path)
    path = os.path.expanduser(s)
    if os.path.exists(path):
        if os.path.basename(path) == WORLD_VOCAB_NAME:
            return _load_world(path)
        return HFTokenizer(path)
    if low.endswith(".json") or os.sep in s or (os.altsep and os.altsep in s):
        raise BadInput(f"cannot find the tokenizer file '{spec}'", _SPEC_HELP)
    raise BadInput(f"unknown tokenizer '{spec}'", _SPEC_HELP)


def tokenizer_for_vocab(vocab_size: int) -> Optional[str]:
    """The default tokenizer spec for a model with this vocabulary size, or None if there is none."""
    return {256: "bytes", WORLD_VOCAB_SIZE: "world"}.get(int(vocab_size))
