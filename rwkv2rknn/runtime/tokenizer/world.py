"""The RWKV World tokenizer: a vocabulary file of byte strings, encoded by greedy longest match."""

from __future__ import annotations

import ast
import importlib.util
import os
from typing import Iterable, Optional

from rwkv2rknn.errors import BadInput, MissingDependency
from rwkv2rknn.runtime.tokenizer.base import Tokenizer, check_id

WORLD_VOCAB_NAME = "rwkv_vocab_v20230424.txt"
WORLD_VOCAB_SIZE = 65536


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
            raise BadInput(
                f"the RWKV World vocabulary file '{path}' is empty", f"give an intact {WORLD_VOCAB_NAME}"
            )
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
        return b"".join(table[check_id(i, n)] for i in ids)

    def token_bytes(self, token_id: int) -> bytes:
        return self._id_to_bytes[check_id(token_id, self.vocab_size)]

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
        raise MissingDependency(
            f"cannot find the RWKV World vocabulary {WORLD_VOCAB_NAME}: the rwkv package is not installed",
            fix,
        )
    raise BadInput(f"the installed rwkv package has no {WORLD_VOCAB_NAME}", fix)
