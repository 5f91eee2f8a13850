"""Streaming: token ids in, one at a time; text out as soon as its characters are complete."""

from __future__ import annotations

import codecs
from typing import Sequence

from rwkv2rknn.runtime.tokenizer.base import Tokenizer


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
