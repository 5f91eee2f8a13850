"""stream: a per-layer folder compiled one stage at a time gives the whole-graph compile's
artifact (the same segment files, byte for byte, and the same logits), without ever holding the
model as one graph or tracing it in one session."""

import json

import numpy as np
import pytest

from rwkv2rknn.compiler import stream
from rwkv2rknn.compiler.driver import compile_model
from rwkv2rknn.compiler.ir import Options
from rwkv2rknn.models.checkpoint import random_checkpoint
from helpers import hot_checkpoint
from rwkv2rknn.models.export import export

pytestmark = pytest.mark.slow  # every test here takes more than a few seconds


@pytest.fixture(scope="module")
def hot_fp16(tmp_path_factory):
    """fp16 files whose squared ReLU overflows fp16: the range guard rescales in every layer."""
    sd = hot_checkpoint(300.0, layers=4, width=40, vocab=70, seed=9)
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
    import rwkv2rknn.compiler.trace as trace_mod

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
        assert set(stages) <= set(order[max(k - 1, 0) : k + 1]), (newest, stages)
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


@pytest.mark.parametrize("version,dtype", [("5", "fp32"), ("6", "fp16"), ("7", "fp32"), ("7", "fp16")])
def test_slot_versions_stream_like_the_whole_graph(slot_models, version, dtype, tmp_path, monkeypatch):
    """RWKV-5.2, 6 and 7 folders (named state slots; RWKV-7 hands v_first from layer 0 to the
    later layers within a token) compile streamed to the whole-graph compile's artifact, and run
    as the `rwkv` package does."""
    from rwkv2rknn.runtime.hybrid import HybridModel
    import rwkv2rknn.compiler.trace as trace_mod

    sm = slot_models(version)
    whole, streamed = str(tmp_path / "whole"), str(tmp_path / "streamed")
    compile_model(sm.dirs[dtype], whole, Options(plan_only=True, stream=False))

    def no_whole_trace(*a, **k):
        raise AssertionError("the streaming compile traced the whole model")

    monkeypatch.setattr(trace_mod, "trace", no_whole_trace)
    compile_model(sm.dirs[dtype], streamed, Options(plan_only=True))
    a, b = _manifest(whole), _manifest(streamed)
    assert any("streamed one stage at a time" in r for r in b["report"])
    assert a["segments"] == b["segments"]  # names, bindings, shapes, stages, checksums
    assert a["state"] == b["state"] and a["model"] == b["model"]
    if version == "7":  # layer 0's v_first reaches the later layers' segments
        readers = [s["name"] for s in b["segments"] if "L0/v_first" in s["inputs"]]
        assert len(readers) == 2, readers
    got = [HybridModel(art, backend="ort").logits(sm.tokens) for art in (whole, streamed)]
    np.testing.assert_array_equal(got[0], got[1])
    ref = sm.reference  # the rwkv package, fp32
    tol = 1e-4 if dtype == "fp32" else 0.05
    assert np.abs(got[1] - ref).max() <= tol * np.abs(ref).max()


@pytest.mark.parametrize("opset,fp16", [(18, False), (13, True)])
def test_symbolic_input_sizes_stream(opset, fp16, tmp_path, monkeypatch):
    """Per-layer files torch.onnx wrote with dynamic axes (every input and output dim symbolic):
    each stage is pinned to its decode shape as it is loaded, so they stream too, to the
    whole-graph compile's artifact."""
    import onnx

    from fixtures.torch_layers import export_torch
    from rwkv2rknn.runtime.hybrid import HybridModel
    import rwkv2rknn.compiler.trace as trace_mod

    sd = random_checkpoint(layers=2, width=32, vocab=61, seed=3)
    src = export_torch(sd, str(tmp_path / "src"), opset=opset, dynamic=True, fp16=fp16)
    dims = onnx.load(f"{src}/mixing_1.onnx").graph.input[1].type.tensor_type.shape.dim
    assert [d.dim_param for d in dims] == ["rows", "width"]  # symbolic, as written
    whole, streamed = str(tmp_path / "whole"), str(tmp_path / "streamed")
    compile_model(src, whole, Options(plan_only=True, stream=False))
    monkeypatch.setattr(trace_mod, "trace", lambda *a, **k: pytest.fail("whole-model trace"))
    compile_model(src, streamed, Options(plan_only=True))
    a, b = _manifest(whole), _manifest(streamed)
    assert any("streamed one stage at a time" in r for r in b["report"])
    assert a["state"] == b["state"] and b["model"]["width"] == 32 and b["model"]["vocab"] == 61
    # the same segments, bindings and shapes; the order of a segment's inputs and outputs may
    # differ where two tensors are as deep as each other (these files' node order differs from
    # the passes' sort of one stage and of the whole model)
    same = ("name", "backend", "stages", "ops", "matmuls", "flops", "shapes")
    assert [{k: s[k] for k in same} for s in a["segments"]] == [
        {k: s[k] for k in same} for s in b["segments"]
    ]
    assert [(set(s["inputs"]), set(s["outputs"])) for s in a["segments"]] == [
        (set(s["inputs"]), set(s["outputs"])) for s in b["segments"]
    ]
    tokens = [3, 1, 4, 1, 5, 9, 2, 6]
    got = [HybridModel(art, backend="ort").logits(tokens) for art in (whole, streamed)]
    np.testing.assert_allclose(got[1], got[0], rtol=1e-6, atol=1e-6 * float(np.abs(got[0]).max()))


def test_the_range_trace_feeds_large_weights_in_place(tmp_path, monkeypatch):
    """The trace's onnxruntime sessions get the embedding and head (1.3 MB each here) as inputs
    read from the graph's arrays, not inside the serialised model; the artifact is the one a
    trace with the weights inside the model gives."""
    import rwkv2rknn.runtime.ort as ort
    import rwkv2rknn.compiler.trace as trace_mod

    sd = random_checkpoint(layers=2, width=64, vocab=5000, seed=4)
    model = str(tmp_path / "model")
    export(sd, model, fp32=True, tokenizer="bytes")
    sizes, real = [], ort.make_session

    def make_session(data, *a, **k):
        if isinstance(data, bytes):  # the trace's (the compile's validation opens files)
            sizes.append(len(data))
        return real(data, *a, **k)

    monkeypatch.setattr(ort, "make_session", make_session)
    compile_model(model, str(tmp_path / "fed"), Options(plan_only=True))
    assert len(sizes) == 4 and max(sizes) < 5000 * 64 * 4  # a session per stage, no table inside
    monkeypatch.setattr(trace_mod, "FED_ABOVE", 1 << 62)  # (another cache: traced again)
    compile_model(model, str(tmp_path / "inside"), Options(plan_only=True, cache_dir=str(tmp_path / "c")))
    assert max(sizes[4:]) > 5000 * 64 * 4
    assert _manifest(tmp_path / "fed")["segments"] == _manifest(tmp_path / "inside")["segments"]


def test_each_segment_is_handed_on_as_soon_as_its_files_are_whole(fp16_dir, tmp_path):
    """The build pass gets every segment while later stages are still to come, its ONNX (and
    T-row ONNX) already written, in run order (the compiler starts its build right then)."""
    from rwkv2rknn import passes

    out = tmp_path / "art"
    stages, seen = [], []

    def on_segment(ctx, seg):
        files = [out / "segments" / (seg.name + ".onnx")]
        if seg.seq.model is not None:
            files.append(out / "segments" / (seg.name + ".seq.onnx"))
        seen.append((seg.name, seg.device, len(stages), all(f.stat().st_size > 0 for f in files)))

    ctx = stream.compile_stream(
        passes, fp16_dir, Options(plan_only=True), str(out), on_stage=stages.append, on_segment=on_segment
    )
    assert [s[0] for s in seen] == [s.name for s in ctx.segments]
    assert all(whole for *_, whole in seen)
    npu = [s for s in seen if s[1] == "npu"]
    assert npu and npu[0][2] < len(stages) - 1  # the first NPU segment long before the last stage


def test_streamed_notes_are_made_from_the_stages_notes(fp32_dir, tmp_path):
    """The streamed compile's whole-model notes come from each stage's typed notes: its support
    line sums the stages' counts (the whole-graph compile's line), and the partition notes of
    the windows where pruning moved segments to the CPU are kept, window by window."""
    whole, streamed = str(tmp_path / "whole"), str(tmp_path / "streamed")
    opts = dict(plan_only=True, min_segment_flops=10**12)  # every NPU segment is pruned
    compile_model(fp32_dir, whole, Options(stream=False, **opts))
    compile_model(fp32_dir, streamed, Options(**opts))
    a, b = _manifest(whole), _manifest(streamed)
    support = [r for r in a["report"] if r.startswith("support: ")]
    assert len(support) == 1 and [r for r in b["report"] if r.startswith("support: ")][-1] == support[0]
    windows = [r for r in b["report"] if r.startswith("partition: window up to ")]
    assert windows and all("moved to the CPU" in r for r in windows), b["report"]
