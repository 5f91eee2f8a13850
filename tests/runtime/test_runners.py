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


def test_ort_runner_contract(fp16_artifact):
    seg = _npu_segment(fp16_artifact)
    r = OrtRunner(os.path.join(fp16_artifact, seg.onnx), seg.name)
    assert r.inputs == list(seg.inputs) and r.outputs == list(seg.outputs)
    rng = np.random.default_rng(0)
    feed = {k: rng.standard_normal(seg.shapes[k]).astype(np.float32) for k in seg.inputs}
    out = r.infer(feed)
    assert list(out) == list(seg.outputs)
    assert all(out[k].shape == tuple(seg.shapes[k]) for k in seg.outputs)


def test_rknn_sim_runner_matches_ort_on_a_segment(fp16_artifact):
    from rwkv2rknn.runtime.rknn import RknnSimRunner
    seg = _npu_segment(fp16_artifact)
    path = os.path.join(fp16_artifact, seg.onnx)
    sim = RknnSimRunner(path, seg.name, seg.inputs, seg.outputs,
                        {k: list(v) for k, v in seg.shapes.items()})
    ort = OrtRunner(path, seg.name)
    rng = np.random.default_rng(1)
    feed = {k: rng.standard_normal(seg.shapes[k]).astype(np.float32) for k in seg.inputs}
    a, b = sim.infer(feed), ort.infer(feed)
    for k in seg.outputs:
        scale = np.abs(b[k]).max()
        assert a[k].shape == b[k].shape
        assert np.abs(a[k] - b[k]).max() <= 0.01 * scale, k
    sim.close()


def test_session_falls_back_for_public_fp16_files(fp16_dir):
    _, note = make_session(os.path.join(fp16_dir, "mixing_0.onnx"))
    assert "ORT_ENABLE_EXTENDED" in note
    _, note = make_session(os.path.join(fp16_dir, "embed.onnx"))
    assert note == ""


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
