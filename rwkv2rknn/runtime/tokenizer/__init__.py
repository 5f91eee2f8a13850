"""Tokenizers for running RWKV models: raw bytes, RWKV World, and Hugging Face ``tokenizer.json``.

This package must import with only numpy and the standard library, because it runs on the board.
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

import os
from typing import Optional

from rwkv2rknn.errors import BadInput
from rwkv2rknn.runtime.tokenizer.base import ByteTokenizer, Tokenizer
from rwkv2rknn.runtime.tokenizer.hf import HFTokenizer
from rwkv2rknn.runtime.tokenizer.stream import StreamDecoder
from rwkv2rknn.runtime.tokenizer.world import (
    WORLD_VOCAB_NAME,
    WORLD_VOCAB_SIZE,
    WorldTokenizer,
    find_world_vocab,
)

__all__ = [
    "Tokenizer",
    "ByteTokenizer",
    "WorldTokenizer",
    "HFTokenizer",
    "StreamDecoder",
    "find_world_vocab",
    "load_tokenizer",
    "tokenizer_for_vocab",
    "check_fits",
    "WORLD_VOCAB_NAME",
]


_SPEC_HELP = (
    "give 'bytes', 'world', 'world:/path/to/" + WORLD_VOCAB_NAME + "' or the path of a tokenizer.json"
)
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


def check_fits(tok: Tokenizer, vocab_size: int, spec: str = "") -> None:
    """Refuse a tokenizer whose vocabulary does not fit a model's: more ids than the model has
    rows (ids the model cannot read), or fewer than half of them (the tokenizer of another model:
    a table is padded past its tokenizer by far less)."""
    have, want = int(tok.vocab_size), int(vocab_size)
    if have > want or 2 * have < want:
        raise BadInput(
            f"tokenizer {spec or tok.name} has {have} tokens, the model {want}",
            "give the tokenizer the model was trained with (its tokenizer.json)",
        )
