"""Top-1 agreement over decisive tokens: a near-tie flip within the tolerance does not fail the
comparison, a flip beyond the tie margin does, and the max relative error gate covers every token."""

import numpy as np

from rwkv2rknn.tools.check import Tolerances
from rwkv2rknn.tools.compare import compare_logits


def _logits(n=32, vocab=50, seed=0):
    """Reference logits with a clear winner on each token (gap 3 on a scale of about 10)."""
    rng = np.random.default_rng(seed)
    ref = rng.uniform(-5, 5, (n, vocab))
    ref[np.arange(n), rng.integers(0, vocab, n)] = 10.0
    return ref


def _tie(ref, t, gap):
    """Make token t's two best logits differ by ``gap``: (winner, runner-up)."""
    win = int(np.argmax(ref[t]))
    other = (win + 1) % ref.shape[1]
    ref[t, other] = ref[t, win] - gap
    return win, other


def test_near_tie_flip_within_tolerance_passes_and_is_counted():
    ref = _logits()
    win, other = _tie(ref, 7, gap=0.004)  # margin: 2 x 0.05 x 10 = 1.0
    got = ref + np.random.default_rng(1).normal(0, 1e-3, ref.shape)
    got[7, win], got[7, other] = ref[7, win] - 0.01, ref[7, other] + 0.01  # flipped, error 1e-3 rel
    rep = compare_logits(got, ref, min_top1=0.99, max_rel=0.05)
    assert rep.passed, rep.summary()
    assert rep.ties == 1 and not rep.steps[7].decisive and not rep.steps[7].top1_match
    assert rep.top1_decisive == 1.0 and rep.top1_agreement == 31 / 32
    assert rep.tolerance["tie_margin"] == 0.1
    assert "100.0% on 31 decisive tokens (all 32: 96.9%, 1 near-tie left out)" in rep.summary()
    assert rep.to_dict()["ties"] == 1 and rep.to_dict()["top1_decisive"] == 1.0
    # counting every token (margin 0), the same flip fails the top-1 gate
    strict = compare_logits(got, ref, min_top1=0.99, max_rel=0.05, tie_margin=0.0)
    assert not strict.passed and strict.failures[0].startswith("top-1 agreement 96.9% on 32")


def test_flip_with_a_gap_beyond_the_margin_fails():
    ref = _logits()
    win, other = _tie(ref, 3, gap=1.2)  # beyond the margin of 1.0 at this token's scale of 10
    got = ref.copy()
    got[3, win], got[3, other] = ref[3, win] - 0.65, ref[3, other] + 0.65
    rep = compare_logits(got, ref, min_top1=0.99, max_rel=0.05)
    assert rep.ties == 0 and rep.steps[3].decisive
    assert not rep.passed
    assert any(f.startswith("top-1 agreement 96.9% on 32 decisive tokens") for f in rep.failures)
    assert any(f.startswith("max rel error") for f in rep.failures)


def test_a_near_tie_never_hides_a_large_error():
    ref = _logits()
    win, other = _tie(ref, 5, gap=0.004)
    got = ref.copy()
    got[5, other] += 2.0  # a flip on a near-tie, but with an error of 0.2 of the scale
    rep = compare_logits(got, ref, min_top1=0.99, max_rel=0.05)
    assert rep.ties == 1 and rep.top1_decisive == 1.0
    assert not rep.passed and rep.failures == [f"max rel error {rep.max_rel:.3g} > 0.05"]


def test_tie_margin_follows_the_tolerance():
    assert Tolerances.default("ort", "float32").tie_margin == 2e-4
    assert Tolerances.default("rknn-sim", "float16").tie_margin == 0.1
    assert Tolerances.default("ort", "float16", max_rel=0.01).tie_margin == 0.02
    assert Tolerances.default("rknn-sim", "float16", precision="w8a8").tie_margin == 0.0


def test_many_near_ties_make_the_verdict_weak():
    """More than a quarter of the tokens near-ties: the comparison still passes, with a warning
    (in the report and its dict) saying so and what to do; a quarter or fewer: no warning."""
    ref = _logits()
    for t in range(8):  # 8 of 32: exactly a quarter
        _tie(ref, t, gap=0.004)
    rep = compare_logits(ref, ref, min_top1=0.99, max_rel=0.05)
    assert rep.passed and rep.ties == 8 and rep.warnings == []
    _tie(ref, 8, gap=0.004)  # 9 of 32
    rep = compare_logits(ref, ref, min_top1=0.99, max_rel=0.05)
    assert rep.passed and rep.ties == 9
    assert rep.warnings == ["9 of 32 tokens are near-ties (more than 25%): the top-1 verdict rests "
                            "on 23 decisive tokens and is weak; check more tokens (--tokens) or "
                            "others (--seed, --text)"]
    assert rep.to_dict()["warnings"] == rep.warnings
    assert rep.summary().endswith("-- PASS (weak: 9 of 32 tokens near-ties)")  # weak, not failed


def test_w8a8_counts_every_token_and_says_so():
    """w8a8's tie margin is 0: near-ties are counted like any token, the summary says so, and no
    share of near-ties can make the verdict weak."""
    tol = Tolerances.default("rknn-sim", "float16", precision="w8a8")
    ref = _logits()
    for t in range(16):
        _tie(ref, t, gap=0.004)
    rep = compare_logits(ref, ref, min_top1=tol.min_top1, max_rel=tol.max_rel, tie_margin=tol.tie_margin)
    assert rep.ties == 0 and rep.warnings == [] and rep.passed
    assert "every token counts for top-1 (no near-tie margin)" in rep.summary()
    fp16 = compare_logits(ref, ref, min_top1=0.99, max_rel=0.05)
    assert "every token counts" not in fp16.summary() and fp16.warnings
