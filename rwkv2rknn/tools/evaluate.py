"""Language-model quality on a text: bits per byte, teacher-forced from the zero state."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from rwkv2rknn.errors import BadInput


@dataclass
class Score:
    tokens: int
    bytes: int
    bits_per_byte: float
    top1: float  # share of next tokens predicted exactly


def read_text(path: str, max_bytes: int) -> str:
    """The first ``max_bytes`` bytes of a UTF-8 text file (a character cut at the end is dropped)."""
    try:
        with open(path, "rb") as f:
            return f.read(max_bytes).decode("utf-8", errors="ignore")
    except OSError as e:
        raise BadInput(f"cannot read '{path}' ({e.strerror})", "give a readable text file") from e


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def bits_per_byte(model, tokenizer, text: str, chunk: int = 64) -> Score:
    """Score ``text``: the model reads token i and is charged -log2 p(token i+1)."""
    ids = tokenizer.encode(text)
    if len(ids) < 2:
        raise BadInput(f"the text is too short to score ({len(ids)} token(s), at least 2 needed)",
                       "give a longer text file")
    state = model.init_state()
    if hasattr(model, "prefill"):
        logits = model.prefill(ids[:-1], state, chunk=chunk)
    else:
        logits = np.stack([model.step(int(t), state) for t in ids[:-1]])
    lp = log_softmax(logits)
    targets = np.asarray(ids[1:])
    nats = -lp[np.arange(len(targets)), targets].sum()
    scored = tokenizer.decode_bytes(ids[1:]) if hasattr(tokenizer, "decode_bytes") else text.encode()
    n_bytes = max(len(scored), 1)
    return Score(tokens=len(targets), bytes=n_bytes, bits_per_byte=float(nats / math.log(2) / n_bytes),
                 top1=float((logits.argmax(1) == targets).mean()))
