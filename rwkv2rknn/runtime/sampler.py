"""The sampler RWKV users know: the `rwkv` package's PIPELINE_ARGS, in numpy (runs on the board).

Per generated token, in this order:

    logits[banned] = -inf
    logits[t] -= alpha_presence + occurrence[t] * alpha_frequency   (every t seen so far)
    p = softmax(logits)
    keep the most likely tokens whose probabilities add up to top_p (ties at the cut kept)
    keep at most top_k of them (0: no limit)
    sample from p ** (1 / temperature) over what is kept          (temperature 0: greedy)
    occurrence[t] *= alpha_decay for every t seen; occurrence[new] += 1

A token whose text is a space, a tab or digits weighs 0 in ``occurrence`` (it still pays the
presence penalty once seen), as in the package. Top-p and top-k cut the distribution before
the temperature is applied, as the package does; OpenAI's presence and frequency penalties are
``alpha_presence`` and ``alpha_frequency`` with ``alpha_decay`` 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Iterable, Optional

import numpy as np

from rwkv2rknn.errors import NumericalError

__all__ = ["SamplerArgs", "Sampler", "CHAT_DEFAULTS"]

# Characters whose tokens weigh 0 in the frequency count (the package's rule: the token's text
# is a substring of this one).
_FREE_TEXT = " \t0123456789"


@dataclass
class SamplerArgs:
    """What the `rwkv` package calls PIPELINE_ARGS (the same names and meanings)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    alpha_presence: float = 0.0
    alpha_frequency: float = 0.0
    alpha_decay: float = 1.0
    token_ban: tuple = field(default_factory=tuple)

    def check(self) -> "SamplerArgs":
        """Raise ValueError naming the first argument out of range."""
        t, p = float(self.temperature), float(self.top_p)
        if not t >= 0.0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"top_p must be between 0 and 1, got {self.top_p}")
        if int(self.top_k) < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        for name in ("alpha_presence", "alpha_frequency"):
            v = float(getattr(self, name))
            if not np.isfinite(v):
                raise ValueError(f"{name} must be a finite number, got {v}")
        if not 0.0 <= float(self.alpha_decay) <= 1.0:
            raise ValueError(f"alpha_decay must be between 0 and 1, got {self.alpha_decay}")
        return self


# ChatRWKV's chat defaults (its API_DEMO_CHAT.py): what `rwkv2rknn chat` starts with.
CHAT_DEFAULTS = SamplerArgs(
    temperature=1.0, top_p=0.3, alpha_presence=0.5, alpha_frequency=0.5, alpha_decay=0.996
)


class Sampler:
    """Sample token ids with :class:`SamplerArgs`; keeps the penalty counts of one generation
    (``reset`` starts a new one). ``tokenizer`` (optional) tells which tokens weigh 0 in the
    counts, and ids past its vocabulary (a model's padded rows: 50304 logits for a 50277-token
    tokenizer) are never drawn, as they could not be decoded; ``seed`` makes the draws
    reproducible."""

    def __init__(self, args: Optional[SamplerArgs] = None, seed=None, tokenizer=None, **kw):
        self.args = (args or SamplerArgs(**kw)).check()
        self.rng = np.random.default_rng(seed)
        self._tok = tokenizer
        self._weight: Dict[int, float] = {}
        self.occurrence: Dict[int, float] = {}

    def reset(self) -> None:
        self.occurrence = {}

    def _weight_of(self, tid: int) -> float:
        w = self._weight.get(tid)
        if w is None:
            w = 1.0
            if self._tok is not None:
                try:
                    text = self._tok.decode([tid])
                except Exception:  # noqa: BLE001 - a special token without text counts fully
                    text = "\ufffd"
                w = 0.0 if text in _FREE_TEXT else 1.0
            self._weight[tid] = w
        return w

    def adjusted(self, logits) -> np.ndarray:
        """The logits after the ban and the penalties (float64, a copy)."""
        x = np.array(logits, dtype=np.float64).reshape(-1)
        if x.size == 0:
            raise ValueError("logits must be a non-empty vector")
        if not np.all(np.isfinite(x)):
            raise NumericalError(
                f"the model produced logits with {int(np.isnan(x).sum())} NaN and "
                f"{int(np.isinf(x).sum())} inf values",
                "the model overflowed at run time; check the compiled model against the reference "
                "(e.g. keep more layers in fp32 or on the CPU)",
            )
        a = self.args
        ban = [int(t) for t in a.token_ban if 0 <= int(t) < x.size]
        if ban:
            x[ban] = -np.inf
        known = int(getattr(self._tok, "vocab_size", 0) or 0)
        if 0 < known < x.size:
            x[known:] = -np.inf
        if self.occurrence:
            ids = np.fromiter(self.occurrence.keys(), dtype=np.int64, count=len(self.occurrence))
            counts = np.fromiter(self.occurrence.values(), dtype=np.float64, count=len(ids))
            ok = ids < x.size
            x[ids[ok]] -= a.alpha_presence + counts[ok] * a.alpha_frequency
        return x

    def probabilities(self, logits) -> np.ndarray:
        """The distribution the next draw is made from (after ban, penalties, top-p, top-k and
        temperature); one-hot for greedy."""
        x = self.adjusted(logits)
        a = self.args
        finite = np.isfinite(x)
        if not finite.any():  # everything banned: the least banned is still a token
            x = np.zeros_like(x)
            finite[:] = True
        best = int(np.argmax(np.where(finite, x, -np.inf)))
        out = np.zeros_like(x)
        if float(a.temperature) == 0.0 or float(a.top_p) == 0.0 or x.size == 1:
            out[best] = 1.0
            return out
        z = np.where(finite, x - x[best], -np.inf)
        p = np.exp(z)
        p /= p.sum()
        keep = p > 0
        if float(a.top_p) < 1.0:
            order = self._most_likely(p, float(a.top_p))
            cum = np.cumsum(p[order])
            cut = int(np.argmax(cum >= float(a.top_p))) if (cum >= float(a.top_p)).any() else len(cum) - 1
            keep &= p >= p[order[cut]]
        k = int(a.top_k)
        if 0 < k < int(keep.sum()):
            kept = np.flatnonzero(keep)
            top = kept[np.argsort(-p[kept], kind="stable")[:k]]
            keep = np.zeros_like(keep)
            keep[top] = True
        with np.errstate(over="ignore", under="ignore", invalid="ignore"):
            zt = np.where(keep, z / float(a.temperature), -np.inf)
        zt -= zt.max() if np.isfinite(zt.max()) else 0.0
        q = np.exp(zt)
        total = q.sum()
        if not np.isfinite(total) or total <= 0:  # a temperature so small it is greedy in effect
            out[best] = 1.0
            return out
        return q / total

    @staticmethod
    def _most_likely(p: np.ndarray, mass: float) -> np.ndarray:
        """Ids by falling probability, as many as it takes to reach ``mass`` (a partial sort
        of the few hundred most likely first: a full sort of a 65536 vocabulary costs ms)."""
        m = 512
        if p.size > 2 * m:
            idx = np.argpartition(-p, m - 1)[:m]
            order = idx[np.argsort(-p[idx], kind="stable")]
            if p[order].sum() >= mass:
                return order
        return np.argsort(-p, kind="stable")

    def sample(self, logits) -> int:
        """The next token id; counts it for the penalties of the following draws."""
        p = self.probabilities(logits)
        nz = np.flatnonzero(p)
        if len(nz) == 1:
            tid = int(nz[0])
        else:
            cum = np.cumsum(p[nz])
            i = int(np.searchsorted(cum, self.rng.random() * cum[-1], side="right"))
            tid = int(nz[min(i, len(nz) - 1)])
        self.count(tid)
        return tid

    def count(self, tid: int) -> None:
        decay = float(self.args.alpha_decay)
        if decay != 1.0:
            for t in self.occurrence:
                self.occurrence[t] *= decay
        self.occurrence[tid] = self.occurrence.get(tid, 0.0) + self._weight_of(tid)

    def counted(self, ids: Iterable[int]) -> None:
        for t in ids:
            self.count(int(t))
