"""Sequence (prefill) mode: T tokens per call give the same logits and state as one at a time."""

import numpy as np
import pytest

from rwkv2rknn.runtime.hybrid import HybridModel


@pytest.mark.parametrize("chunk", [1, 5, 16, 64])
def test_prefill_equals_one_at_a_time(fp32_plan_artifact, tokens, chunk):
    model = HybridModel(fp32_plan_artifact, backend="ort")
    s1, s2 = model.init_state(), model.init_state()
    one = np.stack([model.step(t, s1) for t in tokens])
    many = model.prefill(tokens, s2, chunk=chunk)
    assert many.shape == one.shape
    np.testing.assert_allclose(many, one, rtol=1e-5, atol=1e-5 * np.abs(one).max())
    np.testing.assert_allclose(s2, s1, rtol=1e-5, atol=1e-5)
    # and decoding goes on from the same state
    np.testing.assert_allclose(model.step(3, s2), model.step(3, s1), rtol=1e-5, atol=1e-4)


def test_matmul_segments_take_many_rows(fp32_plan_artifact):
    model = HybridModel(fp32_plan_artifact, backend="ort")
    seq = model._seq_runners()
    segs = model.manifest.segments
    batched = [s.name for s, r in zip(segs, seq) if r is not None]
    assert batched and all(s.matmuls for s in segs if s.name in batched)
    assert sum(s.matmuls for s in segs if s.name in batched) == sum(s.matmuls for s in segs)
    # the embedding and the recurrence run row by row
    assert all(s.matmuls == 0 for s, r in zip(segs, seq) if r is None)


def test_prefill_on_fp16_artifact_with_simulator_backend(fp16_artifact, tokens):
    """On rknn backends the NPU segments have no T-token build yet: prefill steps token by token."""
    model = HybridModel(fp16_artifact, backend="rknn-sim")
    s1, s2 = model.init_state(), model.init_state()
    one = np.stack([model.step(t, s1) for t in tokens[:6]])
    many = model.prefill(tokens[:6], s2)
    np.testing.assert_array_equal(many, one)
    model.close()
