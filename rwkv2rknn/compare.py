"""Compare two runs of a model: per step and overall, with the tolerance each figure needed."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import List, Optional

import numpy as np


@dataclass
class StepError:
    step: int
    max_abs: float
    max_rel: float  # max |a - b| / max |b|
    cosine: float
    top1_match: bool


@dataclass
class Report:
    steps: List[StepError]
    top1_agreement: float
    max_abs: float
    max_rel: float
    min_cosine: float
    state_drift: Optional[float] = None  # max |state_a - state_b| / max |state_b| at the end
    tolerance: dict = field(default_factory=dict)
    passed: bool = True
    failures: List[str] = field(default_factory=list)
    per_segment: list = field(default_factory=list)
    prefill: Optional[dict] = None  # the same comparison for the prompt (T-row) path

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        s = (f"{len(self.steps)} tokens: top-1 agreement {100 * self.top1_agreement:.1f}%, "
             f"max abs error {self.max_abs:.3g}, max rel error {self.max_rel:.3g}, "
             f"min cosine {self.min_cosine:.6f}")
        if self.state_drift is not None:
            s += f", state drift {self.state_drift:.3g}"
        if self.prefill is not None:
            p = self.prefill
            s += (f"; prefill: top-1 {100 * p['top1_agreement']:.1f}%, max rel error "
                  f"{p['max_rel']:.3g}" + (f", state drift {p['state_drift']:.3g}"
                                          if p.get("state_drift") is not None else ""))
        tol = self.tolerance
        if "min_top1" in tol:
            s += (f"; tolerance{' for ' + str(tol['precision']) if tol.get('precision') else ''}: "
                  f"top-1 >= {100 * tol['min_top1']:g}%, max rel <= {tol['max_rel']:g}")
        return s + (" -- PASS" if self.passed else " -- FAIL: " + "; ".join(self.failures))


def rel_error(got, ref) -> float:
    """max |got - ref| / max |ref| over every element (shapes may differ only by size-1 axes)."""
    a = np.asarray(got, np.float64).reshape(-1)
    b = np.asarray(ref, np.float64).reshape(-1)
    return float(np.max(np.abs(a - b))) / max(float(np.max(np.abs(b))), 1e-30) if b.size else 0.0


def compare_logits(got: np.ndarray, ref: np.ndarray, min_top1: float = 0.99,
                   max_rel: float = 0.05, state_got=None, state_ref=None,
                   max_state_drift: Optional[float] = None) -> Report:
    got = np.asarray(got, np.float64)
    ref = np.asarray(ref, np.float64)
    steps = []
    for i, (a, b) in enumerate(zip(got, ref)):
        diff = np.abs(a - b)
        scale = max(float(np.max(np.abs(b))), 1e-30)
        denom = float(np.linalg.norm(a) * np.linalg.norm(b)) or 1e-30
        steps.append(StepError(i, float(diff.max()), float(diff.max()) / scale,
                               float(np.dot(a, b) / denom), bool(np.argmax(a) == np.argmax(b))))
    finite = bool(np.isfinite(got).all())
    rep = Report(steps=steps,
                 top1_agreement=float(np.mean([s.top1_match for s in steps])) if steps else 0.0,
                 max_abs=max((s.max_abs for s in steps), default=0.0),
                 max_rel=max((s.max_rel for s in steps), default=0.0),
                 min_cosine=min((s.cosine for s in steps), default=1.0),
                 tolerance={"min_top1": min_top1, "max_rel": max_rel})
    if state_got is not None and state_ref is not None:
        sg, sr = np.asarray(state_got, np.float64), np.asarray(state_ref, np.float64)
        rep.state_drift = float(np.max(np.abs(sg - sr)) / max(float(np.max(np.abs(sr))), 1e-30))
        if max_state_drift is not None:
            rep.tolerance["max_state_drift"] = max_state_drift
            if not rep.state_drift <= max_state_drift:
                rep.failures.append(f"state drift {rep.state_drift:.3g} > {max_state_drift:g}")
    if not finite:
        rep.failures.append("NaN or inf in the logits")
    if rep.top1_agreement < min_top1:
        rep.failures.append(f"top-1 agreement {100 * rep.top1_agreement:.1f}% < {100 * min_top1:g}%")
    if not rep.max_rel <= max_rel:
        rep.failures.append(f"max rel error {rep.max_rel:.3g} > {max_rel:g}")
    rep.passed = not rep.failures
    return rep
