"""Compare two runs of a model: per step and overall, with the tolerance each figure needed."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import List, Optional

import numpy as np

# When more than this share of the tokens are near-ties, the top-1 gate rests on too few decisive
# tokens to say much: the verdict stands but is marked weak (``Report.warnings``). A quarter is
# well above what a healthy model shows (random test models of every version: 1-4 of 40 near-ties
# at fp16's margin), and what is left still holds three quarters of the tokens.
WEAK_TIE_SHARE = 0.25


@dataclass
class StepError:
    step: int
    max_abs: float
    max_rel: float  # max |a - b| / max |b|
    cosine: float
    top1_match: bool
    gap: float = 0.0  # the reference's top-1 minus top-2 logit
    decisive: bool = True  # gap > the tie margin: a flip here counts against top-1


@dataclass
class Report:
    steps: List[StepError]
    top1_agreement: float  # over every token
    max_abs: float
    max_rel: float
    min_cosine: float
    state_drift: Optional[float] = None  # max |state_a - state_b| / max |state_b| at the end
    tolerance: dict = field(default_factory=dict)
    passed: bool = True
    failures: List[str] = field(default_factory=list)
    per_segment: list = field(default_factory=list)
    prefill: Optional[dict] = None  # the same comparison for the prompt (T-row) path
    top1_decisive: float = 1.0  # over the tokens where the reference decides (the gated figure)
    ties: int = 0  # tokens left out of top1_decisive: gap <= tie margin x the step's logit scale
    warnings: List[str] = field(default_factory=list)  # what weakens the verdict (not a failure)

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        s = (f"{len(self.steps)} tokens: top-1 agreement {_top1(self.to_dict())}, "
             f"max abs error {self.max_abs:.3g}, max rel error {self.max_rel:.3g}, "
             f"min cosine {self.min_cosine:.6f}")
        if self.state_drift is not None:
            s += f", state drift {self.state_drift:.3g}"
        if self.prefill is not None:
            p = self.prefill
            s += (f"; prefill: top-1 {_top1(p)}, max rel error "
                  f"{p['max_rel']:.3g}" + (f", state drift {p['state_drift']:.3g}"
                                          if p.get("state_drift") is not None else ""))
        tol = self.tolerance
        if "min_top1" in tol:
            s += (f"; tolerance{' for ' + str(tol['precision']) if tol.get('precision') else ''}: "
                  f"top-1 >= {100 * tol['min_top1']:g}%, max rel <= {tol['max_rel']:g}")
            if tol.get("tie_margin"):
                s += f", near-tie: gap <= {tol['tie_margin']:g} x logit scale"
            else:
                s += ", every token counts for top-1 (no near-tie margin)"
        s += " -- PASS" if self.passed else " -- FAIL: " + "; ".join(self.failures)
        return s + (f" (weak: {self.ties} of {len(self.steps)} tokens near-ties)" if self.warnings else "")


def _top1(rep: dict) -> str:
    """'97.0% (all 32: 96.9%, 1 near-tie left out)', or the plain figure when nothing is a tie."""
    if not rep.get("ties"):
        return f"{100 * rep['top1_agreement']:.1f}%"
    n = len(rep["steps"])
    return (f"{100 * rep['top1_decisive']:.1f}% on {n - rep['ties']} decisive tokens (all {n}: "
            f"{100 * rep['top1_agreement']:.1f}%, {rep['ties']} near-tie{'s' * (rep['ties'] > 1)} "
            f"left out)")


def rel_error(got, ref) -> float:
    """max |got - ref| / max |ref| over every element (shapes may differ only by size-1 axes)."""
    a = np.asarray(got, np.float64).reshape(-1)
    b = np.asarray(ref, np.float64).reshape(-1)
    return float(np.max(np.abs(a - b))) / max(float(np.max(np.abs(b))), 1e-30) if b.size else 0.0


def compare_logits(got: np.ndarray, ref: np.ndarray, min_top1: float = 0.99,
                   max_rel: float = 0.05, state_got=None, state_ref=None,
                   max_state_drift: Optional[float] = None,
                   tie_margin: Optional[float] = None) -> Report:
    """Per step and overall. Top-1 is gated over the decisive tokens: those where the
    reference's two best logits differ by more than ``tie_margin`` x the step's logit scale
    (max |ref|). The default margin, 2 x ``max_rel``, is the largest gap that two logits each
    within the tolerance can close, so a flip inside it is not an error beyond the tolerance;
    a flip outside it is one, and fails. The max relative error gate covers every token, near-ties
    included. ``tie_margin=0`` counts every token. More than ``WEAK_TIE_SHARE`` of the tokens
    near-ties adds a warning: the verdict is weak."""
    tie_margin = 2 * max_rel if tie_margin is None else tie_margin
    got = np.asarray(got, np.float64)
    ref = np.asarray(ref, np.float64)
    steps = []
    for i, (a, b) in enumerate(zip(got, ref)):
        diff = np.abs(a - b)
        scale = max(float(np.max(np.abs(b))), 1e-30)
        denom = float(np.linalg.norm(a) * np.linalg.norm(b)) or 1e-30
        top2 = np.sort(b)[-2:] if b.size > 1 else np.array([-np.inf, b.max()])
        gap = float(top2[-1] - top2[0])
        steps.append(StepError(i, float(diff.max()), float(diff.max()) / scale,
                               float(np.dot(a, b) / denom), bool(np.argmax(a) == np.argmax(b)),
                               gap, bool(gap > tie_margin * scale)))
    decisive = [s.top1_match for s in steps if s.decisive]
    finite = bool(np.isfinite(got).all())
    rep = Report(steps=steps,
                 top1_agreement=float(np.mean([s.top1_match for s in steps])) if steps else 0.0,
                 max_abs=max((s.max_abs for s in steps), default=0.0),
                 max_rel=max((s.max_rel for s in steps), default=0.0),
                 min_cosine=min((s.cosine for s in steps), default=1.0),
                 tolerance={"min_top1": min_top1, "max_rel": max_rel, "tie_margin": tie_margin},
                 top1_decisive=float(np.mean(decisive)) if decisive else 1.0,
                 ties=len(steps) - len(decisive))
    if state_got is not None and state_ref is not None:
        sg, sr = np.asarray(state_got, np.float64), np.asarray(state_ref, np.float64)
        rep.state_drift = float(np.max(np.abs(sg - sr)) / max(float(np.max(np.abs(sr))), 1e-30))
        if max_state_drift is not None:
            rep.tolerance["max_state_drift"] = max_state_drift
            if not rep.state_drift <= max_state_drift:
                rep.failures.append(f"state drift {rep.state_drift:.3g} > {max_state_drift:g}")
    if not finite:
        rep.failures.append("NaN or inf in the logits")
    if steps and rep.ties > WEAK_TIE_SHARE * len(steps):
        rep.warnings.append(
            f"{rep.ties} of {len(steps)} tokens are near-ties (more than {WEAK_TIE_SHARE:.0%}): the "
            f"top-1 verdict rests on {len(decisive)} decisive tokens and is weak; check more tokens "
            f"(--tokens) or others (--seed, --text)")
    if rep.top1_decisive < min_top1:
        rep.failures.append(f"top-1 agreement {100 * rep.top1_decisive:.1f}% on "
                            f"{len(decisive)} decisive tokens < {100 * min_top1:g}%")
    if not rep.max_rel <= max_rel:
        rep.failures.append(f"max rel error {rep.max_rel:.3g} > {max_rel:g}")
    rep.passed = not rep.failures
    return rep
