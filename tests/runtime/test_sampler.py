"""The sampler against the `rwkv` package's PIPELINE (the reference RWKV users know)."""

import os

import numpy as np
import pytest

from rwkv2rknn.errors import NumericalError
from rwkv2rknn.runtime.sampler import Sampler, SamplerArgs

V = 128  # World ids 1..127 are the ASCII bytes 0..126: every one decodes on its own


@pytest.fixture(scope="module")
def package():
    os.environ.setdefault("RWKV_JIT_ON", "0")
    return pytest.importorskip("rwkv.utils")


@pytest.fixture(scope="module")
def pipe(package):
    """The package's PIPELINE with its World tokenizer (made once: reading the vocabulary takes
    seconds); tests set its model."""
    return package.PIPELINE(None, "rwkv_vocab_v20230424")


class TableModel:
    """A toy model for the package's PIPELINE: the logits depend on the last token only; it
    records every token it is fed."""

    def __init__(self, table):
        import torch

        self.table = torch.tensor(table, dtype=torch.float32)
        self.fed = []

    def forward(self, tokens, state):
        self.fed.append([int(t) for t in tokens])
        return self.table[int(tokens[-1])].clone(), state


def _table(seed):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(V, V)) * 3).astype(np.float32)


@pytest.mark.slow
@pytest.mark.parametrize(
    "args",
    [
        dict(alpha_presence=0.5, alpha_frequency=0.5, alpha_decay=0.996),
        dict(alpha_presence=0.2, alpha_frequency=1.5, alpha_decay=0.9),
        dict(alpha_presence=0.0, alpha_frequency=0.0, alpha_decay=1.0),
    ],
)
def test_greedy_with_penalties_decay_and_ban_picks_the_packages_tokens(package, pipe, args):
    """Same table, same args, greedy: the package's generate and ours pick the same tokens, so
    the ban, the presence and frequency penalties, their decay and the free weight of spaces
    and digits are the package's."""
    from rwkv2rknn.runtime.tokenizer import load_tokenizer

    table = _table(3)
    table[:, 33] += 2.0  # spaces (World id 33 is " ") often: their weight is 0
    table[:, 49:59] += 1.5  # and digits
    ban = [0, 7, 66]
    model = pipe.model = TableModel(table)
    n = 300
    pipe.generate("a", token_count=n, args=package.PIPELINE_ARGS(temperature=0, token_ban=ban, **args))
    theirs = [f[0] for f in model.fed[1:]]  # the last sampled token is never fed there
    first = model.fed[0][-1]

    sampler = Sampler(
        SamplerArgs(temperature=0, token_ban=tuple(ban), **args), seed=0, tokenizer=load_tokenizer("world")
    )
    logits, ours = table[first], []
    for _ in range(n - 1):
        t = sampler.sample(logits)
        ours.append(t)
        logits = table[t]
    assert ours == theirs
    assert not set(ours) & set(ban)
    if args["alpha_frequency"]:
        assert len(set(ours)) > 20  # the penalties do move it around
        assert 33 in ours  # a free-weight token was drawn


@pytest.mark.slow
@pytest.mark.parametrize(
    "kw",
    [
        dict(temperature=0.7, top_p=0.8),
        dict(temperature=1.6, top_p=0.95),
        dict(temperature=0.5, top_p=1.0, top_k=3),
        dict(temperature=1.0, top_p=0.6, top_k=2),
    ],
)
def test_distribution_is_the_packages(pipe, kw):
    """The package cuts by top-p and top-k before applying the temperature: our probabilities
    are what its sample_logits draws from (8,000 draws)."""
    import torch

    logits = torch.tensor([2.0, 1.6, 1.0, 0.7, 0.0, -0.5, -1.0, -3.0])
    np.random.seed(5)
    n = 8000
    draws = [pipe.sample_logits(logits, **kw) for _ in range(n)]
    freq = np.bincount(draws, minlength=len(logits)) / n
    p = Sampler(SamplerArgs(**kw)).probabilities(logits.numpy())
    np.testing.assert_allclose(freq, p, atol=0.02)
    assert np.count_nonzero(p) < len(logits)  # something was cut


def test_seeded_draws_repeat_and_follow_the_probabilities():
    logits = np.random.default_rng(2).normal(size=300)
    a = Sampler(temperature=1.0, top_p=0.95, seed=7)
    b = Sampler(temperature=1.0, top_p=0.95, seed=7)
    s1 = [a.sample(logits) for _ in range(200)]
    assert s1 == [b.sample(logits) for _ in range(200)]
    assert len(set(s1)) > 5
    p = Sampler(temperature=1.0, top_p=0.95).probabilities(logits)
    assert all(p[t] > 0 for t in s1)


def test_greedy_and_extremes():
    logits = np.array([1.0, 3.0, 2.9, -5.0])
    assert Sampler(temperature=0).sample(logits) == 1
    assert Sampler(temperature=1.0, top_p=0.0).sample(logits) == 1
    assert Sampler(temperature=1e-300, seed=1).sample(logits) == 1
    assert Sampler(temperature=1.0, token_ban=(1,), top_p=0).sample(logits) == 2
    everything = Sampler(temperature=1.0, token_ban=(0, 1, 2, 3), seed=0).sample(logits)
    assert 0 <= everything < 4
    big = np.zeros(70000)
    big[12345] = 30.0
    assert Sampler(temperature=1.0, top_p=0.5, seed=0).sample(big) == 12345  # partial sort path


def test_ids_past_the_tokenizer_are_never_drawn():
    """A model with padded rows (more logits than the tokenizer has ids): the padding cannot be
    decoded, so it is never drawn, however likely, at any temperature."""
    from rwkv2rknn.runtime.tokenizer.base import ByteTokenizer

    logits = np.zeros(300)
    logits[280], logits[65] = 50.0, 5.0
    assert Sampler(temperature=0).sample(logits) == 280  # without a tokenizer: every row
    tok = ByteTokenizer()
    assert Sampler(temperature=0, tokenizer=tok).sample(logits) == 65
    draws = Sampler(temperature=2.0, top_p=1.0, seed=0, tokenizer=tok)
    assert max(draws.sample(logits) for _ in range(200)) < 256


def test_bad_arguments_and_logits():
    for kw in (
        dict(temperature=-1),
        dict(top_p=1.5),
        dict(top_k=-1),
        dict(alpha_decay=2.0),
        dict(alpha_presence=float("nan")),
    ):
        with pytest.raises(ValueError):
            Sampler(**kw)
    with pytest.raises(NumericalError):
        Sampler().sample(np.array([0.0, np.nan]))
    with pytest.raises(ValueError):
        Sampler().sample(np.zeros(0))
