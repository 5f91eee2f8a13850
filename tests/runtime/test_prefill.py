"""Sequence (prefill) mode: T tokens per call give the same logits and state as one at a time."""

import numpy as np
import pytest

from rwkv2rknn.runtime.hybrid import HybridModel
from conftest import FP16_KL

pytestmark = pytest.mark.slow  # every test here takes more than a few seconds


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


class RecordingRunner:
    """A recording stand-in around a real runner: it notes the rows of every call."""

    def __init__(self, runner):
        self.runner, self.calls = runner, []
        self.rows = getattr(runner, "rows", ())

    def infer(self, feed):
        self.calls.append({k: np.shape(v) for k, v in feed.items()})
        return self.runner.infer(feed)

    def close(self):
        self.runner.close()


def _record_head(model):
    """Put a recording stand-in around the head's runners (per token and T rows)."""
    m = model.manifest
    k = next(i for i, s in enumerate(m.segments) if s.outputs == (m.logits_output,))
    seq = model.prefill_runners()
    model.runners[k] = RecordingRunner(model.runners[k])
    if seq[k] is not None:
        seq[k] = RecordingRunner(seq[k])
    return model.runners[k], seq[k]


@pytest.mark.parametrize("chunk", [5, 16, 64])
def test_a_prompt_runs_the_head_on_its_last_row_only(fp32_plan_artifact, tokens, chunk):
    """`run`'s prefill (last_only): the last token's logits and the state equal token-by-token
    decode's, and the head runs once, on one row; `eval`/`check` still get every row's logits."""
    model = HybridModel(fp32_plan_artifact, backend="ort")
    s1, s2, s3 = model.init_state(), model.init_state(), model.init_state()
    one = np.stack([model.step(t, s1) for t in tokens])
    per_token, t_rows = _record_head(model)
    last = model.prefill(tokens, s2, chunk=chunk, last_only=True)
    assert last.shape == (1, one.shape[1])
    np.testing.assert_allclose(last[0], one[-1], rtol=1e-5, atol=1e-5 * np.abs(one).max())
    np.testing.assert_allclose(s2, s1, rtol=1e-5, atol=1e-5)
    calls = per_token.calls + t_rows.calls
    assert len(calls) == 1 and all(shape[0] == 1 for shape in calls[0].values()), calls
    every = model.prefill(tokens, s3, chunk=chunk)  # every row, the head on T rows per chunk
    np.testing.assert_allclose(every, one, rtol=1e-5, atol=1e-5 * np.abs(one).max())
    assert len(t_rows.calls) == 1 + -(-len(tokens) // chunk)
    model.close()


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
    from rwkv2rknn.tools.compare import compare_logits
    from rwkv2rknn.runtime.reference import PerLayerModel

    model = HybridModel(fp16_artifact, backend="rknn-sim")
    seq = model.prefill_runners()
    for s, r in zip(model.manifest.segments, seq):  # per NPU segment, not a set of row counts
        if s.backend == "npu":  # the head, built for one row, runs on the prompt's last row only
            head = s.outputs == (model.manifest.logits_output,)
            assert (r is None) if head else (r is not None and r.rows == (2, 16, 64)), s.name
    s1, s2, s3 = model.init_state(), model.init_state(), model.init_state()
    one = np.stack([model.step(t, s1) for t in tokens])
    per_token, _ = _record_head(model)
    many = model.prefill(tokens, s2)  # 40 tokens: one chunk, padded to 64 rows
    assert len(per_token.calls) == len(tokens)  # every row's logits: the head row by row
    assert compare_logits(many, one, **FP16_KL, max_rel=0.01).passed
    ref = PerLayerModel(fp16_dir).logits(tokens)
    rep = compare_logits(many, ref, **FP16_KL, max_rel=0.05)
    assert rep.passed, rep.summary()
    np.testing.assert_allclose(s2, s1, atol=0.02 * np.abs(s1).max())
    # a prompt (`run`): the head's one-row build once, on the last row; chunks of 16
    last = model.prefill(tokens, s3, chunk=16, last_only=True)
    assert len(per_token.calls) == len(tokens) + 1
    np.testing.assert_allclose(last[0], many[-1], rtol=1e-5, atol=1e-5 * np.abs(many).max())
    assert compare_logits(last, ref[-1:], min_top1=1.0, max_rel=0.05).passed
    np.testing.assert_allclose(s3, s2, atol=0.02 * np.abs(s1).max())
    model.close()


def test_prefill_rows_in_manifest(fp16_artifact, fp32_plan_artifact):
    from rwkv2rknn.runtime.hybrid import load_manifest

    m = load_manifest(fp16_artifact)
    npu = [s for s in m.segments if s.backend == "npu"]
    *layers, head = npu
    assert head.stages == ("head",) and head.outputs == (m.logits_output,)
    assert all(s.seq.rknn and s.seq.rows == (2, 16, 64) for s in layers)
    # one build per NPU segment serves decode (2 rows, the token in row 0) and prefill
    assert all(s.token.rknn == s.seq.rknn and s.decode_rows == 2 for s in layers)
    # the head is built for one row (a prompt needs its last row's logits only); its T-row ONNX
    # stays for onnxruntime and `eval`
    assert head.token.rknn == f"segments/{head.name}.rknn" and not head.seq.rknn and not head.seq.rows
    assert head.decode_rows == 0 and head.seq.onnx and not head.seq.fallback
    assert all(s.seq.rknn is None for s in load_manifest(fp32_plan_artifact).segments)


def test_a_failed_t_row_build_is_named_with_its_reason(fp16_artifact):
    """The plan marks a segment whose T-row build failed ('~') and gives the toolkit's reason;
    `compile` prints the manifest's warnings as 'warning: ...' lines."""
    import dataclasses

    from rwkv2rknn.runtime.hybrid import load_manifest

    m = load_manifest(fp16_artifact)
    assert not m.warnings() and "~" not in m.table()
    segs = list(m.segments)
    k = next(i for i, s in enumerate(segs) if s.backend == "npu")
    segs[k] = dataclasses.replace(
        segs[k], seq=dataclasses.replace(segs[k].seq, fallback="IndexError: list index out of range")
    )
    bad = dataclasses.replace(m, segments=tuple(segs))
    assert bad.warnings() == [
        f"{segs[k].name}: its T-row build failed (IndexError: list index "
        "out of range); its prefill runs token by token"
    ]
    assert f"{segs[k].name:<28} npu~" in bad.table()
    assert "~ T-row build failed, prefill runs token by token: " in bad.table()
    again = type(m).from_dict(bad.to_dict())  # and the manifest keeps it
    assert again.segments[k].seq.fallback == "IndexError: list index out of range"
