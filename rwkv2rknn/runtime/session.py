"""One generation path for `run`, `chat` and `serve`: a model, its tokenizer, the current RWKV
state and the token ids that state has consumed.

A :class:`Session` prefills only the tokens it is given (the state carries everything before
them), then samples with a :class:`~rwkv2rknn.runtime.sampler.Sampler`, streaming text that
is whole characters and never part of a stop string. Every sampled token is fed back, so after
a reply the state covers the prompt and the whole reply (the stop string included): the next
turn continues from there. ``snapshot``/``restore`` copy the state in memory; ``save``/``load``
put it in a file checked against the model it came from.

:func:`decode_loop` is the one sampling loop; ``generate.generate`` (step functions, no state)
uses it too.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import numpy as np

from rwkv2rknn.errors import BadInput, UsageError
from rwkv2rknn.runtime import statefile
from rwkv2rknn.runtime.sampler import Sampler

log = logging.getLogger(__name__)

__all__ = ["Session", "Reply", "Snapshot", "StopText", "decode_loop", "model_identity", "end_ids"]


# ---------------------------------------------------------------------------------- the loop


@dataclass
class LoopResult:
    ids: List[int]
    reason: str  # "stop_id", "stop_text", "max_tokens", "cancelled"
    t_first: Optional[float]
    t_end: float


def decode_loop(
    logits,
    step: Callable[[int], np.ndarray],
    sampler: Sampler,
    max_tokens: int,
    stop_ids: Iterable[int] = (),
    on_token: Optional[Callable[[int], bool]] = None,
    cancel: Optional[Callable[[], bool]] = None,
) -> LoopResult:
    """Sample up to ``max_tokens`` ids from ``logits`` on, feeding each to ``step`` (which
    returns the next logits). A sampled stop id ends it (neither fed nor returned).
    ``on_token(id)`` hears each id before it is fed; if it returns True (a stop string is
    complete) the id is still fed and the loop ends. ``cancel()`` is asked before each draw."""
    stops = {int(i) for i in stop_ids}
    ids: List[int] = []
    t_first = None
    reason = "max_tokens"
    for _ in range(int(max_tokens)):
        if cancel is not None and cancel():
            reason = "cancelled"
            break
        tid = sampler.sample(logits)
        if t_first is None:
            t_first = time.perf_counter()
        if tid in stops:
            reason = "stop_id"
            break
        ids.append(tid)
        done = bool(on_token(tid)) if on_token is not None else False
        logits = step(tid)
        if done:
            reason = "stop_text"
            break
    return LoopResult(ids, reason, t_first, time.perf_counter())


class StopText:
    """Text pieces in, text out that is never part of a stop string: a tail that could still
    become one is held back until it cannot; ``stopped`` once one appears (what follows it is
    dropped)."""

    def __init__(self, stops: Iterable[str] = ()):
        self.stops = [s for s in dict.fromkeys(stops) if s]
        self._held = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        if self.stopped:
            return ""
        buf = self._held + piece
        if not self.stops:
            self._held = ""
            return buf
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            self._held = ""
            return buf[: min(hits)]
        hold = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(buf)), hold, -1):
                if buf.endswith(s[:n]):
                    hold = n
                    break
        self._held = buf[len(buf) - hold :] if hold else ""
        return buf[: len(buf) - hold]

    def flush(self) -> str:
        out, self._held = ("" if self.stopped else self._held), ""
        return out


# ---------------------------------------------------------------------------------- identity


def _canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True, default=str)


def model_identity(model) -> tuple:
    """(identity, description) of a loaded model: the identity changes with the weights and the
    state layout, not with where the artifact lies or whether it was packed."""
    m = getattr(model, "manifest", None)
    if m is not None:
        facts = {k: v for k, v in m.model.items() if k != "source"}
        slots = [[s.layer, s.row, s.input, list(s.shape)] for s in m.state]
        cpu = sorted(s.token.sha256 for s in m.segments if s.backend == "cpu" and s.token.sha256)
        key = {"model": facts, "slots": slots, "cpu": cpu, "tokenizer": m.tokenizer}
        desc = f"{facts.get('arch', 'rwkv')} {facts.get('layers')} x {facts.get('width')}, vocab {m.vocab}"
    else:
        folder = getattr(model, "folder", "") or getattr(model, "path", "")
        files = []
        if folder and os.path.isdir(folder):
            files = sorted(
                (n, os.path.getsize(os.path.join(folder, n)))
                for n in os.listdir(folder)
                if n.endswith(".onnx")
            )
        st = model.init_state()
        shape = {k: list(np.shape(v)) for k, v in st.items()} if isinstance(st, dict) else list(np.shape(st))
        key = {"files": files, "vocab": getattr(model, "vocab", None), "state": shape}
        desc = f"{os.path.basename(str(folder).rstrip('/')) or 'model'}, vocab {getattr(model, 'vocab', '?')}"
    return hashlib.sha256(_canonical(key).encode()).hexdigest(), desc


def end_ids(tokenizer) -> List[int]:
    """The end-of-text ids of a tokenizer: 0 for RWKV World, the HF tokenizer's own end token;
    none for raw bytes (0 is the NUL byte there)."""
    name = type(tokenizer).__name__
    if name == "WorldTokenizer":
        return [0]
    inner = getattr(tokenizer, "_tok", None)
    if inner is not None and hasattr(inner, "token_to_id"):
        for t in ("<|endoftext|>", "</s>", "<|end_of_text|>"):
            i = inner.token_to_id(t)
            if i is not None:
                return [int(i)]
    return []


# ---------------------------------------------------------------------------------- the session


def copy_state(state):
    if isinstance(state, dict):
        return {k: np.array(v, copy=True) for k, v in state.items()}
    return np.array(state, copy=True)


def state_nbytes(state) -> int:
    if isinstance(state, dict):
        return int(sum(np.asarray(v).nbytes for v in state.values()))
    return int(np.asarray(state).nbytes)


@dataclass
class Snapshot:
    state: object
    tokens: List[int]
    logits: Optional[np.ndarray]

    @property
    def nbytes(self) -> int:
        return (
            state_nbytes(self.state)
            + 4 * len(self.tokens)
            + (self.logits.nbytes if self.logits is not None else 0)
        )


@dataclass
class Reply:
    """What :meth:`Session.generate` produced. ``finish_reason``: "stop" (a stop string or an
    end-of-text id), "length" (``max_tokens``), "cancelled" or "time" (the deadline passed)."""

    text: str
    ids: List[int]
    finish_reason: str
    prompt_tokens: int  # tokens prefilled by this call
    ttft_s: Optional[float]
    decode_tokens_per_s: float
    total_s: float
    prefill_s: float = 0.0
    stop_id: bool = False
    extra: Dict[str, object] = field(default_factory=dict)


class Session:
    """A model, its tokenizer and the state of one conversation (or one text)."""

    def __init__(
        self,
        model,
        tokenizer,
        identity: Optional[str] = None,
        description: str = "",
        prepare: bool = True,
    ):
        """``prepare``: load the model's T-row runners now (else on the first prompt that
        needs them)."""
        self.model, self.tokenizer = model, tokenizer
        if identity is None:
            identity, description = model_identity(model)
        self.identity, self.description = identity, description
        if prepare and hasattr(model, "prepare_prefill"):
            model.prepare_prefill()  # loading the T-row runners is not part of the first reply
        self._prefill = getattr(model, "prefill", None)
        self.end_ids = end_ids(tokenizer)
        self.reset()

    # ------------------------------------------------------------ state

    def reset(self) -> None:
        self.state = self.model.init_state()
        self.tokens: List[int] = []
        self.logits: Optional[np.ndarray] = None

    def snapshot(self) -> Snapshot:
        return Snapshot(
            copy_state(self.state), list(self.tokens), None if self.logits is None else self.logits.copy()
        )

    def restore(self, snap: Snapshot) -> None:
        self.state = copy_state(snap.state)
        self.tokens = list(snap.tokens)
        self.logits = None if snap.logits is None else snap.logits.copy()

    def encode(self, text: str) -> List[int]:
        ids = [int(i) for i in self.tokenizer.encode(text)]
        vocab = int(getattr(self.model, "vocab", 0) or 0)
        if ids and vocab and max(ids) >= vocab:
            raise UsageError(
                f"the tokenizer makes id {max(ids)}, outside the model's vocabulary ({vocab})",
                "pass the model's own --tokenizer",
            )
        return ids

    def step(self, tid: int) -> np.ndarray:
        self.logits = np.asarray(self.model.step(int(tid), self.state), np.float32).reshape(-1)
        self.tokens.append(int(tid))
        return self.logits

    def feed(self, ids: Sequence[int]) -> Optional[np.ndarray]:
        """Prefill ``ids`` (only these: the state holds what came before); the logits after
        the last one."""
        ids = [int(i) for i in ids]
        if not ids:
            return self.logits
        if self._prefill is not None and len(ids) > 1:
            self.logits = np.asarray(self._prefill(ids, self.state, last_only=True)[-1], np.float32).reshape(
                -1
            )
            self.tokens.extend(ids)
        else:
            for t in ids:
                self.step(t)
        return self.logits

    # ------------------------------------------------------------ generation

    def generate(
        self,
        new_ids: Sequence[int],
        sampler: Sampler,
        max_tokens: int,
        stop: Iterable[str] = (),
        stop_ids: Optional[Iterable[int]] = None,
        on_text: Optional[Callable[[str], None]] = None,
        cancel: Optional[Callable[[], bool]] = None,
        deadline: Optional[float] = None,
        after_prefill: Optional[Callable[["Session"], None]] = None,
    ) -> Reply:
        """Prefill ``new_ids``, then sample up to ``max_tokens`` tokens, streaming text to
        ``on_text``. Ends at a stop string (``stop``; the text before it is the reply), an
        end-of-text id (``stop_ids``, default the tokenizer's), ``max_tokens``, ``cancel()``
        or the ``deadline`` (time.monotonic()). ``after_prefill`` hears the session once the
        prompt is in (before the first draw)."""
        from rwkv2rknn.runtime.tokenizer import StreamDecoder

        max_tokens = int(max_tokens)
        if max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {max_tokens}")
        t0 = time.perf_counter()
        logits = self.feed(new_ids)
        if logits is None:
            raise UsageError("there is nothing to continue from", "give some text")
        t_prefilled = time.perf_counter()
        if after_prefill is not None:
            after_prefill(self)
        sampler.reset()
        dec = StreamDecoder(self.tokenizer)
        stops = StopText(stop)
        pieces: List[str] = []
        emit = on_text or (lambda s: None)
        timed_out = [False]

        def on_token(tid: int) -> bool:
            out = stops.feed(dec.feed(tid))
            if out:
                pieces.append(out)
                emit(out)
            return stops.stopped

        def should_stop() -> bool:
            if deadline is not None and time.monotonic() > deadline:
                timed_out[0] = True
                return True
            return bool(cancel and cancel())

        res = decode_loop(
            logits,
            self.step,
            sampler,
            max_tokens,
            self.end_ids if stop_ids is None else stop_ids,
            on_token,
            should_stop,
        )
        if not stops.stopped:
            tail = stops.feed(dec.flush()) + stops.flush()
            if tail:
                pieces.append(tail)
                emit(tail)
        reason = {
            "stop_id": "stop",
            "stop_text": "stop",
            "max_tokens": "length",
            "cancelled": "time" if timed_out[0] else "cancelled",
        }[res.reason]
        tps = 0.0
        if res.t_first is not None and res.ids:
            tps = len(res.ids) / max(res.t_end - res.t_first, 1e-9)
        return Reply(
            text="".join(pieces),
            ids=res.ids,
            finish_reason=reason,
            prompt_tokens=len(new_ids),
            ttft_s=None if res.t_first is None else res.t_first - t0,
            decode_tokens_per_s=tps,
            total_s=res.t_end - t0,
            prefill_s=t_prefilled - t0,
            stop_id=res.reason == "stop_id",
        )

    # ------------------------------------------------------------ files

    def arrays(self) -> Dict[str, np.ndarray]:
        st = self.state
        out = (
            {f"state.{k}": np.asarray(v) for k, v in sorted(st.items())}
            if isinstance(st, dict)
            else {"state": np.asarray(st)}
        )
        out["tokens"] = np.asarray(self.tokens, dtype=np.int32)
        if self.logits is not None:
            out["logits"] = self.logits
        return out

    def save(self, path: str, meta: Optional[dict] = None) -> None:
        """The state, the consumed ids and the last logits to ``path`` (atomically)."""
        statefile.save(
            path,
            self.identity,
            self.arrays(),
            {"model": self.description, "tokens": len(self.tokens), **(meta or {})},
        )

    def load(self, path: str) -> dict:
        """Replace the state by the one saved in ``path``; BadInput (and the state unchanged)
        if the file is damaged or of another model. Returns the file's meta."""
        arrays, meta = statefile.load(path, self.identity, f" ({meta_model(self)})")
        self.set_arrays(arrays, path)
        return meta

    def set_arrays(self, arrays: Dict[str, np.ndarray], where: str = "state") -> None:
        fresh = self.model.init_state()
        try:
            if isinstance(fresh, dict):
                new = {
                    k: arrays[f"state.{k}"].reshape(np.shape(v)).astype(np.asarray(v).dtype)
                    for k, v in fresh.items()
                }
            else:
                new = arrays["state"].reshape(fresh.shape).astype(fresh.dtype)
            tokens = [int(t) for t in np.asarray(arrays["tokens"]).reshape(-1)]
            logits = arrays.get("logits")
        except (KeyError, ValueError) as e:
            raise BadInput(
                f"'{where}' does not hold a state of this model's shape ({e})",
                "load a state saved from this model",
            ) from None
        self.state, self.tokens = new, tokens
        self.logits = None if logits is None else np.asarray(logits, np.float32).reshape(-1)


def meta_model(session: Session) -> str:
    return f"this is {session.description}"
