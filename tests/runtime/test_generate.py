import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from rwkv2rknn.errors import NumericalError
from rwkv2rknn.runtime.generate import GenerationResult, generate, sample_logits


def softmax(x, t=1.0):
    with np.errstate(over="ignore", invalid="ignore"):  # tiny t overflows: NaN, checked by callers
        z = np.asarray(x, dtype=np.float64) / t
        z -= z.max()
        p = np.exp(z)
        return p / p.sum()


# --- sample_logits --------------------------------------------------------------------------------


def test_greedy_is_argmax():
    rng = np.random.default_rng(0)
    for _ in range(20):
        logits = rng.normal(size=1000).astype(np.float32)
        assert sample_logits(logits, temperature=0.0, rng=rng) == int(np.argmax(logits))


def test_tiny_top_p_is_argmax():
    rng = np.random.default_rng(1)
    for _ in range(20):
        logits = rng.normal(size=500)
        assert sample_logits(logits, temperature=1.0, top_p=1e-9, rng=rng) == int(np.argmax(logits))
        assert sample_logits(logits, temperature=1.0, top_p=0.0, rng=rng) == int(np.argmax(logits))


def test_tiny_temperature_is_argmax():
    logits = np.array([1.0, 3.0, 2.9, -5.0])
    assert all(
        sample_logits(logits, temperature=1e-300, rng=np.random.default_rng(i)) == 1 for i in range(20)
    )


def test_seeded_reproducibility():
    logits = np.random.default_rng(2).normal(size=300)
    a = [sample_logits(logits, 0.8, 0.9, np.random.default_rng(42)) for _ in range(5)]
    r1, r2 = np.random.default_rng(7), np.random.default_rng(7)
    s1 = [sample_logits(logits, 1.0, 0.95, r1) for _ in range(200)]
    s2 = [sample_logits(logits, 1.0, 0.95, r2) for _ in range(200)]
    assert len(set(a)) == 1
    assert s1 == s2
    assert len(set(s1)) > 5  # it does sample


@pytest.mark.slow
@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.5])
def test_distribution_matches_softmax(temperature):
    logits = np.array([2.0, 1.0, 0.5, 0.0, -1.0, -3.0], dtype=np.float32)
    rng = np.random.default_rng(123)
    n = 20_000
    counts = np.bincount(
        [sample_logits(logits, temperature, 1.0, rng) for _ in range(n)], minlength=len(logits)
    )
    p = softmax(logits, temperature)
    np.testing.assert_allclose(counts / n, p, atol=0.015)


@pytest.mark.slow
def test_top_p_distribution():
    # probabilities 0.5, 0.3, 0.15, 0.05: top_p=0.75 keeps the first two (0.5 < 0.75 <= 0.8)
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = np.log(probs)
    rng = np.random.default_rng(5)
    n = 10_000
    counts = np.bincount([sample_logits(logits, 1.0, 0.75, rng) for _ in range(n)], minlength=4)
    assert counts[2] == 0 and counts[3] == 0
    np.testing.assert_allclose(counts[:2] / n, [0.5 / 0.8, 0.3 / 0.8], atol=0.02)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_logits_raise(bad):
    logits = np.zeros(10, dtype=np.float32)
    logits[3] = bad
    with pytest.raises(NumericalError) as e:
        sample_logits(logits, rng=np.random.default_rng(0))
    assert "NaN" in str(e.value)
    with pytest.raises(NumericalError):
        sample_logits(logits, temperature=0.0)


@pytest.mark.parametrize(
    "kwargs",
    [dict(temperature=-1.0), dict(top_p=1.5), dict(top_p=-0.1), dict(temperature=float("nan"))],
)
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        sample_logits(np.zeros(4), **kwargs)


def test_bad_shapes():
    with pytest.raises(ValueError):
        sample_logits(np.zeros(0))
    with pytest.raises(ValueError):
        sample_logits(np.zeros((2, 3)))
    assert sample_logits(np.array([[0.0, 5.0, 1.0]]), temperature=0) == 1  # [1, V] is accepted


def test_extreme_logits_stay_in_range():
    logits = np.array([-1e30, 1e30, 1e30, -1e30, 0.0])
    rng = np.random.default_rng(0)
    seen = {sample_logits(logits, 1.0, 1.0, rng) for _ in range(200)}
    assert seen <= {1, 2} and seen == {1, 2}


@pytest.mark.slow
@settings(max_examples=200, deadline=None)
@given(
    logits=hnp.arrays(
        np.float32,
        st.integers(1, 64),
        elements=st.floats(-1e4, 1e4, width=32),
    ),
    temperature=st.floats(0.0, 5.0),
    top_p=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**32 - 1),
)
def test_always_in_range_and_positive_probability(logits, temperature, top_p, seed):
    tid = sample_logits(logits, temperature, top_p, np.random.default_rng(seed))
    assert isinstance(tid, int)
    assert 0 <= tid < logits.size
    if temperature > 0:
        assert softmax(logits, temperature)[tid] > 0 or tid == int(np.argmax(logits))


# --- generate ----------------------------------------------------------------------------------------


class Counter:
    """Toy model: the logits make next = (prev + 1) % V under greedy sampling."""

    def __init__(self, vocab=10):
        self.vocab = vocab
        self.fed = []

    def step(self, token_id):
        self.fed.append(token_id)
        logits = np.zeros(self.vocab, dtype=np.float32)
        logits[(token_id + 1) % self.vocab] = 10.0
        return logits


def test_generate_greedy_counts():
    m = Counter(10)
    seen = []
    res = generate(m.step, [3, 4], max_tokens=8, temperature=0.0, top_p=1.0, seed=0, on_token=seen.append)
    assert isinstance(res, GenerationResult)
    assert res.ids == [5, 6, 7, 8, 9, 0, 1, 2]
    assert seen == res.ids
    assert m.fed == [3, 4] + res.ids  # prompt one at a time, then every sampled id
    assert res.prompt_tokens == 2 and res.stop_reason == "max_tokens"
    assert res.ttft_s is not None and res.ttft_s >= 0
    assert res.decode_tokens_per_s > 0


def test_generate_stop_ids():
    m = Counter(10)
    seen = []
    res = generate(
        m.step, [0], max_tokens=20, temperature=0.0, top_p=1.0, seed=0, on_token=seen.append, stop_ids=[4]
    )
    assert res.ids == [1, 2, 3]
    assert seen == [1, 2, 3]
    assert res.stop_reason == "stop_id"


def test_generate_prefill_fn():
    m = Counter(7)
    calls = []

    def prefill(ids):
        calls.append(list(ids))
        return m.step(ids[-1])

    res = generate(m.step, [1, 2, 5], max_tokens=3, temperature=0.0, top_p=1.0, seed=0, prefill_fn=prefill)
    assert calls == [[1, 2, 5]]
    assert res.ids == [6, 0, 1]


def test_generate_seeded_sampling_reproducible():
    rng = np.random.default_rng(9)
    table = rng.normal(size=(16, 16))

    def step(t):
        return table[t]

    a = generate(step, [0], max_tokens=30, temperature=1.0, top_p=0.9, seed=1234)
    b = generate(step, [0], max_tokens=30, temperature=1.0, top_p=0.9, seed=1234)
    assert a.ids == b.ids and len(a.ids) == 30
    assert all(0 <= t < 16 for t in a.ids)


def test_generate_zero_tokens_and_errors():
    m = Counter(5)
    res = generate(m.step, [1], max_tokens=0, temperature=0.0, top_p=1.0, seed=0)
    assert res.ids == [] and res.ttft_s is None and res.decode_tokens_per_s == 0.0
    with pytest.raises(ValueError):
        generate(m.step, [], max_tokens=5, temperature=0.0, top_p=1.0, seed=0)
    with pytest.raises(ValueError):
        generate(m.step, [1], max_tokens=-1, temperature=0.0, top_p=1.0, seed=0)


def test_generate_nan_from_model():
    def step(t):
        return np.full(4, np.nan, dtype=np.float32)

    with pytest.raises(NumericalError):
        generate(step, [1], max_tokens=3, temperature=1.0, top_p=1.0, seed=0)
