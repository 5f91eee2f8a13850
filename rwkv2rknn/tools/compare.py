"""Compare two runs of a model: per step and overall, with the tolerance each figure needed.

The quality figures are the ones used to compare a quantised runtime with its full-precision
model (as llama.cpp's ``perplexity --kl-divergence`` reports them): per token, the KL divergence
of the run's next-token distribution from the reference's, KL(P_ref || P_run) in nats, summarised
as mean, median, 99th percentile and maximum plus a small histogram; the share of tokens whose top
token is the same; and, teacher-forced on text, the bits per token (or per byte) of both runs.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import List, Optional, Sequence

import numpy as np

# Histogram of per-token KL: decades from 1e-8 to 1 nat, plus one bin below and one above.
KL_EDGES = tuple(10.0**e for e in range(-8, 1))


@dataclass
class StepError:
    step: int
    max_abs: float
    max_rel: float  # max |a - b| / max |b|
    cosine: float
    top1_match: bool
    kl: float = 0.0  # KL(P_ref || P_run) of this step's next-token distribution, nats


@dataclass
class Report:
    steps: List[StepError]
    top1_agreement: float  # share of tokens with the same top token
    max_abs: float
    max_rel: float
    min_cosine: float
    state_drift: Optional[float] = None  # max |state_a - state_b| / max |state_b| at the end
    tolerance: dict = field(default_factory=dict)
    passed: bool = True
    failures: List[str] = field(default_factory=list)
    per_segment: list = field(default_factory=list)
    prefill: Optional[dict] = None  # the same comparison for the prompt (T-row) path
    quality: dict = field(default_factory=dict)  # quality(): KL distribution, same top, bits
    warnings: List[str] = field(default_factory=list)  # what weakens the verdict (not a failure)
    tokens_from: str = ""  # what was teacher-forced: "text: ..." or "random ids (seed N)"

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        """Several lines: what was compared, the decode and prefill figures, the tolerance, the verdict."""
        lines = [f"{len(self.steps)} tokens" + (f" of {self.tokens_from}" if self.tokens_from else "")]
        lines.append("decode:  " + path_line(self.to_dict()))
        if self.prefill is not None:
            lines.append("prefill: " + path_line(self.prefill))
        tol = self.tolerance
        gates = (
            [f"KL mean <= {tol['max_kl_mean']:g}, p99 <= {tol['max_kl_p99']:g}"]
            if "max_kl_mean" in tol
            else ["KL not gated"]
        )
        gates.append(f"max rel <= {tol['max_rel']:g}")
        if "max_state_drift" in tol:
            gates.append(f"state drift <= {tol['max_state_drift']:g}")
        if tol.get("min_top1") is not None:
            gates.append(f"same top token >= {100 * tol['min_top1']:g}%")
        lines.append(
            f"tolerance{' for ' + str(tol['precision']) if tol.get('precision') else ''}: " + ", ".join(gates)
        )
        lines.append("PASS" if self.passed else "FAIL: " + "; ".join(self.failures))
        return "\n".join(lines)


def path_line(rep: dict) -> str:
    """One path's figures: 'KL mean 1e-06, median .., p99 .., max ..; same top token 100.0%;
    bits per byte 2.10 (reference 2.10); max rel error ..; state drift ..'."""
    q = rep.get("quality") or {}
    parts = []
    if q.get("kl"):
        k = q["kl"]
        parts.append(
            f"KL mean {k['mean']:.3g}, median {k['median']:.3g}, p99 {k['p99']:.3g}, max {k['max']:.3g}"
        )
    parts.append(f"same top token {100 * rep['top1_agreement']:.1f}%")
    b = q.get("bits")
    if b:
        parts.append(
            f"bits per {b['unit']} {b['artifact']:.4f} (reference {b['reference']:.4f}, "
            f"{100 * (b['artifact'] / b['reference'] - 1) if b['reference'] else 0:+.2f}%)"
        )
    parts.append(f"max rel error {rep['max_rel']:.3g}")
    if rep.get("state_drift") is not None:
        parts.append(f"state drift {rep['state_drift']:.3g}")
    return "; ".join(parts)


def rel_error(got, ref) -> float:
    """max |got - ref| / max |ref| over every element (shapes may differ only by size-1 axes)."""
    a = np.asarray(got, np.float64).reshape(-1)
    b = np.asarray(ref, np.float64).reshape(-1)
    return float(np.max(np.abs(a - b))) / max(float(np.max(np.abs(b))), 1e-30) if b.size else 0.0


def log_softmax(logits) -> np.ndarray:
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def kl_per_token(got, ref) -> np.ndarray:
    """KL(P_ref || P_got) in nats for each row of logits [T, V] (never below 0)."""
    lp_ref, lp_got = log_softmax(ref), log_softmax(got)
    kl = (np.exp(lp_ref) * (lp_ref - lp_got)).sum(axis=-1)
    return np.maximum(kl, 0.0)


def histogram(values: Sequence[float], edges: Sequence[float] = KL_EDGES) -> dict:
    """{'edges': [...], 'counts': [...]}: counts[0] below edges[0], counts[i] in
    [edges[i-1], edges[i]), counts[-1] at or above edges[-1]."""
    idx = np.searchsorted(np.asarray(edges), np.asarray(values, np.float64), side="right")
    return {
        "edges": [float(e) for e in edges],
        "counts": [int(c) for c in np.bincount(idx, minlength=len(edges) + 1)],
    }


def quality(
    got,
    ref,
    targets: Optional[Sequence[int]] = None,
    n_bytes: Optional[int] = None,
    kl: Optional[np.ndarray] = None,
) -> dict:
    """The quality figures of logits ``got`` against ``ref`` (both [T, V]): the KL distribution
    (mean, median, p99, max, histogram) and the share with the same top token; with ``targets``
    (the next token of each row: row i predicts targets[i], rows past the targets unscored) the
    bits per token of both runs, or per byte when ``n_bytes`` (the bytes of the targets) is given."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    kl = kl_per_token(got, ref) if kl is None else kl
    out = (
        {
            "tokens": int(len(kl)),
            "same_top": float(np.mean(got.argmax(-1) == ref.argmax(-1))),
            "kl": {
                "mean": float(kl.mean()),
                "median": float(np.median(kl)),
                "p99": float(np.percentile(kl, 99)),
                "max": float(kl.max()),
            },
            "histogram": histogram(kl),
        }
        if len(kl)
        else {}
    )
    if targets is not None and len(targets) and out:
        n = min(len(targets), len(kl))
        t = np.asarray(targets[:n])
        per = n_bytes if n_bytes else n

        def bits(logits):
            nats = -log_softmax(logits[:n])[np.arange(n), t].sum()
            return float(nats / math.log(2) / per)

        out["bits"] = {
            "unit": "byte" if n_bytes else "token",
            "reference": bits(ref),
            "artifact": bits(got),
            "scored": n,
            "bytes": n_bytes,
        }
    return out


def compare_logits(
    got: np.ndarray,
    ref: np.ndarray,
    max_rel: float = 0.05,
    state_got=None,
    state_ref=None,
    max_state_drift: Optional[float] = None,
    max_kl_mean: Optional[float] = None,
    max_kl_p99: Optional[float] = None,
    min_top1: Optional[float] = None,
    targets: Optional[Sequence[int]] = None,
    n_bytes: Optional[int] = None,
) -> Report:
    """Per step and overall. Gates, each where its limit is given: the mean and the 99th
    percentile of the per-token KL divergence, the max logit error relative to each step's logit
    scale (every token), the state drift at the end, and the share of tokens with the same top
    token (over every token; no gate unless ``min_top1`` is given). NaN or inf always fails."""
    got = np.asarray(got, np.float64)
    ref = np.asarray(ref, np.float64)
    finite = bool(np.isfinite(got).all())
    kl = kl_per_token(got, ref) if finite else np.full(len(ref), np.inf)
    steps = []
    for i, (a, b) in enumerate(zip(got, ref)):
        diff = np.abs(a - b)
        scale = max(float(np.max(np.abs(b))), 1e-30)
        denom = float(np.linalg.norm(a) * np.linalg.norm(b)) or 1e-30
        steps.append(
            StepError(
                i,
                float(diff.max()),
                float(diff.max()) / scale,
                float(np.dot(a, b) / denom),
                bool(np.argmax(a) == np.argmax(b)),
                float(kl[i]),
            )
        )
    rep = Report(
        steps=steps,
        top1_agreement=float(np.mean([s.top1_match for s in steps])) if steps else 0.0,
        max_abs=max((s.max_abs for s in steps), default=0.0),
        max_rel=max((s.max_rel for s in steps), default=0.0),
        min_cosine=min((s.cosine for s in steps), default=1.0),
        tolerance={"max_rel": max_rel},
    )
    if finite and steps:
        rep.quality = quality(got, ref, targets, n_bytes, kl)
    if not rep.max_rel <= max_rel:
        rep.failures.append(f"max rel error {rep.max_rel:.3g} > {max_rel:g}")
    if max_kl_mean is not None and max_kl_p99 is not None:
        rep.tolerance.update(max_kl_mean=max_kl_mean, max_kl_p99=max_kl_p99)
        k = rep.quality.get("kl")
        if k and not k["mean"] <= max_kl_mean:
            rep.failures.append(f"KL mean {k['mean']:.3g} > {max_kl_mean:g}")
        if k and not k["p99"] <= max_kl_p99:
            rep.failures.append(f"KL p99 {k['p99']:.3g} > {max_kl_p99:g}")
    if min_top1 is not None:
        rep.tolerance["min_top1"] = min_top1
        if rep.top1_agreement < min_top1:
            rep.failures.append(f"same top token {100 * rep.top1_agreement:.1f}% < {100 * min_top1:g}%")
    if state_got is not None and state_ref is not None:
        sg, sr = np.asarray(state_got, np.float64), np.asarray(state_ref, np.float64)
        rep.state_drift = float(np.max(np.abs(sg - sr)) / max(float(np.max(np.abs(sr))), 1e-30))
        if max_state_drift is not None:
            rep.tolerance["max_state_drift"] = max_state_drift
            if not rep.state_drift <= max_state_drift:
                rep.failures.append(f"state drift {rep.state_drift:.3g} > {max_state_drift:g}")
    if not finite:
        rep.failures.append("NaN or inf in the logits")
    rep.passed = not rep.failures
    return rep
