"""Each runner alone: the same segment through ort and the rknn-toolkit2 simulator."""

import os

import numpy as np
import pytest

from rwkv2rknn.errors import BadInput
from rwkv2rknn.runtime.hybrid import load_manifest
from rwkv2rknn.runtime.ort import OrtRunner, make_session
from rwkv2rknn.runtime.reference import PerLayerModel


def _npu_segment(art):
    m = load_manifest(art)
    return next(s for s in m.segments if s.backend == "npu" and s.matmuls == 7)


@pytest.mark.slow
def test_ort_runner_contract(fp16_artifact):
    seg = _npu_segment(fp16_artifact)
    r = OrtRunner(os.path.join(fp16_artifact, seg.token.onnx), seg.name)
    assert r.inputs == list(seg.inputs) and r.outputs == list(seg.outputs)
    rng = np.random.default_rng(0)
    feed = {k: rng.standard_normal(seg.shapes[k]).astype(np.float32) for k in seg.inputs}
    out = r.infer(feed)
    assert list(out) == list(seg.outputs)
    assert all(out[k].shape == tuple(seg.shapes[k]) for k in seg.outputs)


@pytest.mark.slow
def test_rknn_sim_runner_matches_ort_on_a_segment(fp16_artifact):
    from rwkv2rknn.rknn.sim import RknnSimRunner

    seg = _npu_segment(fp16_artifact)
    path = os.path.join(fp16_artifact, seg.token.onnx)
    sim = RknnSimRunner(path, seg.name, seg.inputs, seg.outputs, {k: list(v) for k, v in seg.shapes.items()})
    ort = OrtRunner(path, seg.name)
    rng = np.random.default_rng(1)
    feed = {k: rng.standard_normal(seg.shapes[k]).astype(np.float32) for k in seg.inputs}
    a, b = sim.infer(feed), ort.infer(feed)
    for k in seg.outputs:
        scale = np.abs(b[k]).max()
        assert a[k].shape == b[k].shape
        assert np.abs(a[k] - b[k]).max() <= 0.01 * scale, k
    sim.close()


@pytest.mark.parametrize("version", ["4", "7"])
def test_fp16_exports_load_at_full_optimisation_without_a_note(version, request, slot_models):
    """Our fp16 export meets onnxruntime's SimplifiedLayerNormFusion fault at ORT_ENABLE_ALL; the
    session is made at that level without the one fusion, with no note, and computes what an
    ORT_ENABLE_EXTENDED session does."""
    import onnxruntime as ort

    folder = request.getfixturevalue("fp16_dir") if version == "4" else slot_models("7").dirs["fp16"]
    path = os.path.join(folder, "mixing_1.onnx")
    so = ort.SessionOptions()
    so.log_severity_level = 4
    with pytest.raises(Exception, match="SimplifiedLayerNormFusion"):  # the fault is still there
        ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    sess, note = make_session(path)
    assert note == ""
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    ext = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(3)
    feed = {
        i.name: rng.standard_normal([d if isinstance(d, int) else 1 for d in i.shape]).astype(
            np.float16 if i.type == "tensor(float16)" else np.float32
        )
        for i in ext.get_inputs()
    }
    for a, b in zip(sess.run(None, feed), ext.run(None, feed)):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert np.abs(a - b).max() <= 2e-3 * max(np.abs(b).max(), 1.0)
    assert PerLayerModel(folder).notes == []


@pytest.mark.parametrize("fault", ["some other fault", "fails in SimplifiedLayerNormFusion too"])
def test_other_full_optimisation_failures_fall_back_with_a_note(fp32_dir, monkeypatch, fault):
    """A failure at ORT_ENABLE_ALL that is not the known fusion fault (or that persists without
    that fusion) still gives a session at ORT_ENABLE_EXTENDED, with a note saying so (the fault
    injected into onnxruntime's session creation)."""
    import onnxruntime as ort

    real = ort.InferenceSession

    def failing(model, sess_options=None, providers=None, **kw):
        if sess_options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL:
            raise RuntimeError(fault)
        return real(model, sess_options=sess_options, providers=providers, **kw)

    monkeypatch.setattr(ort, "InferenceSession", failing)
    sess, note = make_session(os.path.join(fp32_dir, "mixing_0.onnx"), what="mixing_0.onnx")
    assert sess is not None
    assert note == (
        f"onnxruntime's default optimisation failed on mixing_0.onnx ({fault}); using ORT_ENABLE_EXTENDED"
    )


def test_reference_reports_missing_layer(fp32_dir, tmp_path):
    import shutil

    d = tmp_path / "m"
    shutil.copytree(fp32_dir, d)
    os.unlink(d / "mixing_1.onnx")
    with pytest.raises(BadInput, match="missing mixing_1.onnx"):
        PerLayerModel(str(d))


def test_reference_is_deterministic(fp32_dir, tokens):
    m = PerLayerModel(fp32_dir)
    np.testing.assert_array_equal(m.logits(tokens[:5]), m.logits(tokens[:5]))
