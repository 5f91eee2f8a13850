"""Sampling, a generic generation loop, and text in / text out over a model (numpy only, runs on
the board)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence

import numpy as np

from rwkv2rknn.errors import NumericalError, UsageError

__all__ = ["sample_logits", "generate", "generate_text", "model_tokenizer", "GenerationResult"]


def _check_finite(x: np.ndarray) -> None:
    if not np.all(np.isfinite(x)):
        n_nan = int(np.isnan(x).sum())
        n_inf = int(np.isinf(x).sum())
        raise NumericalError(
            f"the model produced logits with {n_nan} NaN and {n_inf} inf values",
            "the model overflowed at run time; check the compiled model against the reference "
            "(e.g. keep more layers in fp32 or on the CPU)",
        )


def sample_logits(
    logits,
    temperature: float = 1.0,
    top_p: float = 1.0,
    rng: Optional[np.random.Generator] = None,
) -> int:
    """Sample one token id from a vector of logits.

    ``temperature`` 0 is greedy (argmax). ``top_p`` keeps the smallest set of most likely tokens
    whose probability adds up to at least ``top_p`` (always at least one token; 0 is greedy).
    Raises NumericalError if the logits contain NaN or inf.
    """
    x = np.asarray(logits)
    if x.ndim > 1 and x.size and x.size == max(x.shape):
        x = x.reshape(-1)  # e.g. [1, V] or [1, 1, V]
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"logits must be a non-empty vector, got shape {np.shape(logits)}")
    if not np.issubdtype(x.dtype, np.number) or np.iscomplexobj(x):
        raise ValueError(f"logits must be real numbers, got dtype {x.dtype}")
    x = x.astype(np.float64, copy=False)
    _check_finite(x)
    temperature = float(temperature)
    top_p = float(top_p)
    if not temperature >= 0.0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0.0 <= top_p <= 1.0:
        raise ValueError(f"top_p must be between 0 and 1, got {top_p}")

    best = int(np.argmax(x))
    if temperature == 0.0 or top_p == 0.0 or x.size == 1:
        return best

    with np.errstate(over="ignore", under="ignore"):
        z = x / temperature
    if not np.all(np.isfinite(z)):  # temperature so small that it is greedy in effect
        return best
    z -= z[best]
    p = np.exp(z)
    p /= p.sum()

    if top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        cum = np.cumsum(p[order])
        keep = int(np.searchsorted(cum, top_p * cum[-1], side="left")) + 1
        keep = min(max(keep, 1), x.size)
        ids = order[:keep]
        probs = p[ids]
    else:
        ids = None
        probs = p

    if rng is None:
        rng = np.random.default_rng()
    cum = np.cumsum(probs)
    u = rng.random() * cum[-1]
    k = int(np.searchsorted(cum, u, side="right"))
    k = min(k, probs.size - 1)
    # Never land on a zero-probability token because of rounding at the top end.
    while k > 0 and probs[k] == 0.0:
        k -= 1
    return int(ids[k]) if ids is not None else k


@dataclass
class GenerationResult:
    """What :func:`generate` produced.

    ``ids``: the sampled ids (without a stop id). ``ttft_s``: seconds from the start of the call to
    the first sampled token (None if nothing was sampled). ``decode_tokens_per_s``: tokens per
    second from the first sampled token to the end (one step_fn call per generated id; 0.0 if
    none). ``stop_reason``: "stop_id" or "max_tokens".
    """

    ids: list
    ttft_s: Optional[float]
    decode_tokens_per_s: float
    prompt_tokens: int
    stop_reason: str
    total_s: float = 0.0

    @property
    def n_tokens(self) -> int:
        return len(self.ids)


def generate(
    step_fn: Callable[[int], np.ndarray],
    prompt_ids: Sequence[int],
    max_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed=None,
    on_token: Optional[Callable[[int], None]] = None,
    stop_ids: Iterable[int] = (),
    prefill_fn: Optional[Callable[[Sequence[int]], np.ndarray]] = None,
) -> GenerationResult:
    """Feed the prompt, then sample and feed up to ``max_tokens`` new ids.

    ``step_fn(token_id)`` advances the model by one token and returns the logits for the next
    token. ``prefill_fn(ids)``, if given, feeds the whole prompt at once and returns the logits
    after its last token. ``on_token(id)`` is called for each sampled id. Sampling a stop id ends
    the generation; the stop id is neither returned nor passed to ``on_token``. The last sampled
    id is fed to the model too, so its state covers everything generated. Sampling is the
    `rwkv` package's (``runtime.sampler``); the loop is the one `run`, `chat` and `serve` use
    (``runtime.session.decode_loop``).
    """
    from rwkv2rknn.runtime.sampler import Sampler
    from rwkv2rknn.runtime.session import decode_loop

    prompt = [int(i) for i in prompt_ids]
    if not prompt:
        raise ValueError("prompt_ids is empty: give at least one token to start from")
    max_tokens = int(max_tokens)
    if max_tokens < 0:
        raise ValueError(f"max_tokens must be >= 0, got {max_tokens}")
    sampler = Sampler(temperature=temperature, top_p=top_p, seed=seed)

    t0 = time.perf_counter()
    if prefill_fn is not None:
        logits = prefill_fn(prompt)
    else:
        logits = None
        for tid in prompt:
            logits = step_fn(tid)

    def heard(tid):
        if on_token is not None:
            on_token(tid)

    res = decode_loop(logits, step_fn, sampler, max_tokens, stop_ids, heard)
    # Decode phase: from the first sampled token on, each generated id costs one step_fn call.
    tps = 0.0
    if res.t_first is not None and res.ids:
        tps = len(res.ids) / max(res.t_end - res.t_first, 1e-9)
    return GenerationResult(
        ids=res.ids,
        ttft_s=None if res.t_first is None else res.t_first - t0,
        decode_tokens_per_s=tps,
        prompt_tokens=len(prompt),
        stop_reason="stop_id" if res.reason == "stop_id" else "max_tokens",
        total_s=res.t_end - t0,
    )


def model_tokenizer(spec: Optional[str]):
    """The tokenizer for ``spec`` (given by the user or recorded with the model), or a UsageError
    if there is none."""
    from .tokenizer import load_tokenizer

    if not spec:
        raise UsageError("the model has no tokenizer recorded", "pass --tokenizer bytes|world|PATH")
    return load_tokenizer(spec)


def generate_text(
    model,
    tokenizer_spec: Optional[str],
    prompt: str,
    max_tokens: int,
    temperature: float = 0.8,
    top_p: float = 0.9,
    seed=None,
    on_text: Optional[Callable[[str], None]] = None,
) -> GenerationResult:
    """Continue ``prompt`` with ``model`` (``step``/``init_state``/``vocab``, and ``prefill``
    where it has one): encode it, feed it, sample ``max_tokens`` ids and stream the decoded text
    (complete characters only) to ``on_text``, which hears the prompt first. A session
    (``runtime.session``) does the work, as for `chat` and `serve`."""
    from rwkv2rknn.runtime.sampler import Sampler
    from rwkv2rknn.runtime.session import Session

    tok = model_tokenizer(tokenizer_spec)
    session = Session(model, tok, identity="", description="", prepare=False)
    ids = session.encode(prompt)
    if not ids:
        raise UsageError("the prompt encodes to no tokens", "give some text")
    if len(ids) > 1 and hasattr(model, "prepare_prefill"):
        model.prepare_prefill()  # only a prompt of two or more tokens needs the T-row runners
    emit = on_text or (lambda text: None)
    emit(prompt)
    reply = session.generate(
        ids,
        Sampler(temperature=temperature, top_p=top_p, seed=seed, tokenizer=tok),
        max_tokens,
        stop_ids=(),
        on_text=emit,
    )
    return GenerationResult(
        ids=reply.ids,
        ttft_s=reply.ttft_s,
        decode_tokens_per_s=reply.decode_tokens_per_s,
        prompt_tokens=len(ids),
        stop_reason="max_tokens",
        total_s=reply.total_s,
    )
