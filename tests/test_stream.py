"""stream: a per-layer folder compiled one stage at a time gives the whole-graph compile's
artifact (the same segment files, byte for byte, and the same logits), without ever holding the
model as one graph or tracing it in one session."""

import json

import numpy as np
import pytest

from rwkv2rknn import stream
from rwkv2rknn.compiler import compile_model
from rwkv2rknn.ir import Options
from rwkv2rknn.models.checkpoint import random_checkpoint
from rwkv2rknn.models.export import export


@pytest.fixture(scope="module")
def hot_fp16(tmp_path_factory):
    """fp16 files whose squared ReLU overflows fp16: the range guard rescales in every layer."""
    sd = random_checkpoint(layers=4, width=40, vocab=70, seed=9)
    for i in range(4):
        sd[f"blocks.{i}.ffn.key.weight"] *= 300.0
        sd[f"blocks.{i}.ffn.value.weight"] /= 300.0 ** 2
    d = str(tmp_path_factory.mktemp("hot") / "fp16")
    export(sd, d, fp32=False, tokenizer="bytes")
    return d


def _manifest(art):
    with open(f"{art}/manifest.json") as f:
        return json.load(f)


@pytest.mark.parametrize("which", ["fp32_dir", "fp16_dir", "hot_fp16"])
def test_streamed_equals_whole_graph(which, request, tmp_path, monkeypatch):
    from rwkv2rknn.runtime.hybrid import HybridModel
    from rwkv2rknn.runtime.reference import PerLayerModel
    model = request.getfixturevalue(which)
    whole, streamed = str(tmp_path / "whole"), str(tmp_path / "streamed")
    compile_model(model, whole, Options(plan_only=True, stream=False))
    import rwkv2rknn.trace as trace_mod

    def no_whole_trace(*a, **k):
        raise AssertionError("the streaming compile traced the whole model")

    monkeypatch.setattr(trace_mod, "trace", no_whole_trace)
    compile_model(model, streamed, Options(plan_only=True))
    a, b = _manifest(whole), _manifest(streamed)
    assert a["segments"] == b["segments"]  # names, bindings, shapes, stages, checksums
    assert a["state"] == b["state"] and a["model"] == b["model"]
    if which == "hot_fp16":
        assert any("rescaled 1 squared-ReLU" in r for r in b["report"]), b["report"]
    tokens = [3, 1, 4, 1, 5, 9, 2, 6]
    got = [HybridModel(art, backend="ort").logits(tokens) for art in (whole, streamed)]
    np.testing.assert_array_equal(got[0], got[1])
    ref = PerLayerModel(model).logits(tokens)
    np.testing.assert_allclose(got[1], ref, rtol=0.05, atol=0.05 * float(np.abs(ref).max()))


def test_the_window_holds_at_most_two_stages(hot_fp16, tmp_path, monkeypatch):
    """After each stage, the nodes still held (not yet in a written segment) come from the
    newest stage and the one before it, never from further back."""
    held = []
    real = stream._Stream.flush

    def flush(self, last, newest):
        made = real(self, last, newest)
        held.append((newest, sorted({n.name.split("/", 1)[0] for n in self.window})))
        return made

    monkeypatch.setattr(stream._Stream, "flush", flush)
    compile_model(hot_fp16, str(tmp_path / "art"), Options(plan_only=True))
    order = ["embed", "L0", "L1", "L2", "L3", "head"]
    assert [n for n, _ in held] == order
    for k, (newest, stages) in enumerate(held):
        assert set(stages) <= set(order[max(k - 1, 0):k + 1]), (newest, stages)
    assert held[-1][1] == []  # everything written


def test_written_segments_keep_their_estimates_without_weights(fp16_dir, tmp_path):
    """A written segment's nodes are stand-ins without weights; the estimates a later step
    recomputes from them (a quantised build's) equal those made from the real nodes."""
    from rwkv2rknn.passes import partition
    m = compile_model(fp16_dir, str(tmp_path / "art"), Options(plan_only=True))
    from rwkv2rknn import passes
    ctx = stream.compile_stream(passes, fp16_dir, Options(plan_only=True), str(tmp_path / "again"))
    by_name = {s.name: s for s in m.segments}
    for seg in ctx.segments:
        assert all(not getattr(n, "outputs", []) for n in seg.nodes)  # no graph kept
        est = partition.estimate_ms(seg.device, seg.nodes, ctx.profile)
        assert est == pytest.approx(by_name[seg.name].est_ms, abs=1e-6)
        assert partition.matmul_flops(seg.nodes) == by_name[seg.name].flops


def test_each_segment_is_handed_on_as_soon_as_its_files_are_whole(fp16_dir, tmp_path):
    """The build pass gets every segment while later stages are still to come, its ONNX (and
    T-row ONNX) already written, in run order (the compiler starts its build right then)."""
    from rwkv2rknn import passes
    out = tmp_path / "art"
    stages, seen = [], []

    def on_segment(ctx, seg):
        files = [out / "segments" / (seg.name + ".onnx")]
        if seg.seq_model is not None:
            files.append(out / "segments" / (seg.name + ".seq.onnx"))
        seen.append((seg.name, seg.device, len(stages), all(f.stat().st_size > 0 for f in files)))

    ctx = stream.compile_stream(passes, fp16_dir, Options(plan_only=True), str(out),
                                on_stage=stages.append, on_segment=on_segment)
    assert [s[0] for s in seen] == [s.name for s in ctx.segments]
    assert all(whole for *_, whole in seen)
    npu = [s for s in seen if s[1] == "npu"]
    assert npu and npu[0][2] < len(stages) - 1  # the first NPU segment long before the last stage
