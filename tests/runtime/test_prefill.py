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
    seq = model.prefill_runners()
    segs = model.manifest.segments
    batched = [s.name for s, r in zip(segs, seq) if r is not None]
    assert batched and all(s.matmuls for s in segs if s.name in batched)
    assert sum(s.matmuls for s in segs if s.name in batched) == sum(s.matmuls for s in segs)
    # the embedding and the recurrence run row by row
    assert all(s.matmuls == 0 for s, r in zip(segs, seq) if r is None)


def test_prefill_on_the_npu_simulator(fp16_artifact, fp16_dir, tokens):
    """fp16 files, NPU segments built with T in (2, 16, 64) rows, run in the simulator."""
    from rwkv2rknn.compare import compare_logits
    from rwkv2rknn.runtime.reference import PerLayerModel
    model = HybridModel(fp16_artifact, backend="rknn-sim")
    seq = model.prefill_runners()
    assert {r.rows for r in seq if r is not None} == {(2, 16, 64)}
    s1, s2 = model.init_state(), model.init_state()
    one = np.stack([model.step(t, s1) for t in tokens])
    many = model.prefill(tokens, s2)  # 40 tokens: one chunk, padded to 64 rows
    assert compare_logits(many, one, min_top1=0.99, max_rel=0.01).passed
    ref = PerLayerModel(fp16_dir).logits(tokens)
    rep = compare_logits(many, ref, min_top1=0.99, max_rel=0.05)
    assert rep.passed, rep.summary()
    np.testing.assert_allclose(s2, s1, atol=0.02 * np.abs(s1).max())
    model.close()


def test_prefill_rows_in_manifest(fp16_artifact, fp32_plan_artifact):
    from rwkv2rknn.runtime.hybrid import load_manifest
    npu = [s for s in load_manifest(fp16_artifact).segments if s.backend == "npu"]
    assert all(s.seq_rknn and s.seq_rows == (2, 16, 64) for s in npu)
    # one build per NPU segment serves decode (2 rows, the token in row 0) and prefill
    assert all(s.rknn == s.seq_rknn and s.decode_rows == 2 for s in npu)
    assert all(s.seq_rknn is None for s in load_manifest(fp32_plan_artifact).segments)
