"""The quality figures of compare: KL divergence per token against distributions whose KL is
known in closed form, its summary and histogram, bits per token and per byte, and the gates."""

import math

import numpy as np
import pytest

from rwkv2rknn.tools.compare import KL_EDGES, compare_logits, histogram, kl_per_token, quality


def _two_way(p: float) -> np.ndarray:
    """Logits of the distribution (p, 1 - p) over two tokens."""
    return np.log(np.array([p, 1 - p]))


def _kl2(p: float, q: float) -> float:
    return p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))


def test_kl_matches_the_closed_form_and_ignores_a_logit_shift():
    ref = np.stack([_two_way(0.5), _two_way(0.9), _two_way(0.2)])
    got = np.stack([_two_way(0.6), _two_way(0.9) + 7.0, _two_way(0.3)])  # +7: the same distribution
    kl = kl_per_token(got, ref)
    assert kl[0] == pytest.approx(_kl2(0.5, 0.6), rel=1e-9)
    assert kl[1] == pytest.approx(0.0, abs=1e-12)
    assert kl[2] == pytest.approx(_kl2(0.2, 0.3), rel=1e-9)
    # KL(P_ref || P_run), not the other way round
    assert _kl2(0.5, 0.6) != pytest.approx(_kl2(0.6, 0.5), rel=1e-3)


def test_summary_statistics_and_histogram():
    rng = np.random.default_rng(0)
    ref = rng.normal(0, 3, (200, 50))
    got = ref + rng.normal(0, 0.05, ref.shape)
    got[7] = ref[7] * 0.5  # one bad token
    q = quality(got, ref)
    kl = kl_per_token(got, ref)
    assert q["tokens"] == 200
    assert q["kl"]["mean"] == pytest.approx(kl.mean()) and q["kl"]["max"] == pytest.approx(kl[7])
    assert q["kl"]["median"] == pytest.approx(np.median(kl))
    assert q["kl"]["median"] < q["kl"]["p99"] < q["kl"]["max"]
    h = q["histogram"]
    assert h["edges"] == list(KL_EDGES) and len(h["counts"]) == len(KL_EDGES) + 1
    assert sum(h["counts"]) == 200
    assert q["same_top"] == pytest.approx(np.mean(got.argmax(1) == ref.argmax(1)))


def test_histogram_bins_by_decade():
    h = histogram([1e-9, 1e-8, 5e-8, 2e-3, 0.5, 1.0, 30.0])
    assert h["counts"][0] == 1  # below 1e-8
    assert h["counts"][1] == 2  # [1e-8, 1e-7)
    assert h["counts"][KL_EDGES.index(1e-3) + 1] == 1
    assert h["counts"][-2] == 1 and h["counts"][-1] == 2  # [0.1, 1) and >= 1


def test_bits_per_byte_and_per_token_teacher_forced():
    """Row i predicts targets[i]: a uniform 256-way model costs 8 bits a byte; the per-byte figure
    divides the same bits by the bytes of the targets."""
    uniform = np.zeros((10, 256))
    targets = list(range(1, 10))  # 9 targets for 10 rows: the last row is not scored
    q = quality(uniform, uniform, targets, n_bytes=9)
    assert q["bits"] == {
        "unit": "byte",
        "reference": pytest.approx(8.0),
        "artifact": pytest.approx(8.0),
        "scored": 9,
        "bytes": 9,
    }
    sure = np.full((10, 256), -50.0)
    sure[np.arange(9), targets] = 50.0  # certain of every target
    q = quality(sure, uniform, targets, n_bytes=18)  # say each target was two bytes
    assert q["bits"]["artifact"] == pytest.approx(0.0, abs=1e-9)
    assert q["bits"]["reference"] == pytest.approx(4.0)
    assert quality(uniform, uniform, targets)["bits"]["unit"] == "token"


def test_kl_gates_fail_on_mean_and_on_p99_and_say_which():
    rng = np.random.default_rng(1)
    ref = rng.normal(0, 3, (100, 40))
    good = ref + rng.normal(0, 1e-3, ref.shape)
    rep = compare_logits(good, ref, max_rel=1.0, max_kl_mean=1e-4, max_kl_p99=1e-3)
    assert rep.passed, rep.summary()
    assert rep.tolerance["max_kl_mean"] == 1e-4 and rep.tolerance["max_kl_p99"] == 1e-3
    # two bad tokens of a hundred: the mean stays small, the 99th percentile does not
    tail = good.copy()
    tail[[3, 50]] = ref[[3, 50]] * 0.3
    rep = compare_logits(tail, ref, max_rel=1.0, max_kl_mean=1.0, max_kl_p99=1e-3)
    assert not rep.passed and [f.split(" ")[:2] for f in rep.failures] == [["KL", "p99"]]
    # every token a little off: the mean fails
    wide = ref * 1.2
    rep = compare_logits(wide, ref, max_rel=1.0, max_kl_mean=1e-3, max_kl_p99=10.0)
    assert not rep.passed and rep.failures[0].startswith("KL mean")


def test_same_top_token_is_reported_and_gated_only_when_asked():
    ref = np.array([[3.0, 2.99, 0.0]] * 10)
    got = ref.copy()
    got[:3] = [2.99, 3.0, 0.0]  # three flips on a near tie, KL tiny
    rep = compare_logits(got, ref, max_rel=0.01, max_kl_mean=1e-3, max_kl_p99=1e-3)
    assert rep.passed and rep.top1_agreement == pytest.approx(0.7)
    assert "same top token 70.0%" in rep.summary()
    rep = compare_logits(got, ref, max_rel=0.01, min_top1=0.9)
    assert not rep.passed and rep.failures == ["same top token 70.0% < 90%"]


def test_nan_logits_fail():
    ref = np.zeros((3, 4))
    got = ref.copy()
    got[1, 2] = np.nan
    rep = compare_logits(got, ref, max_rel=1.0, max_kl_mean=1.0, max_kl_p99=1.0)
    assert not rep.passed and "NaN or inf in the logits" in rep.failures
