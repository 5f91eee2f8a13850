"""The hybrid executor against pure ONNX Runtime, per backend."""

import os
import shutil

import numpy as np
import pytest

from rwkv2rknn.tools.compare import compare_logits
from rwkv2rknn.errors import BadInput
from rwkv2rknn.runtime.hybrid import HybridModel
from rwkv2rknn.runtime.reference import PerLayerModel
from conftest import FP16_KL


@pytest.mark.slow
def test_ort_backend_matches_reference_to_fp32_precision(fp32_plan_artifact, fp32_dir, tokens):
    got = HybridModel(fp32_plan_artifact, backend="ort").logits(tokens)
    ref = PerLayerModel(fp32_dir).logits(tokens)
    rep = compare_logits(got, ref, min_top1=1.0, max_rel=1e-5)
    assert rep.passed, rep.summary()


@pytest.mark.slow
def test_rknn_sim_reaches_top1_agreement(fp16_artifact, fp16_dir, tokens):
    """fp16 files, compiled with the real toolkit, run in its simulator: >= 99% top-1 over 40 tokens."""
    assert len(tokens) >= 32
    model = HybridModel(fp16_artifact, backend="rknn-sim")
    assert {r.backend for r in model.runners} == {"ort", "rknn-sim"}
    got = model.logits(tokens)
    ref = PerLayerModel(fp16_dir).logits(tokens)
    rep = compare_logits(got, ref, **FP16_KL, max_rel=0.05)
    assert rep.passed, rep.summary()
    assert rep.max_rel > 0  # the NPU path really computed in reduced precision
    model.close()


@pytest.mark.slow
def test_state_is_threaded_across_segments_and_tokens(fp32_plan_artifact, fp32_dir, tokens):
    model = HybridModel(fp32_plan_artifact)
    ref = PerLayerModel(fp32_dir)
    hs, rs = model.init_state(), ref.init_state()
    rows = ["ffn_xx", "att_xx", "aa", "bb", "pp"]
    for t in tokens[:10]:
        model.step(t, hs)
        ref.step(t, rs)
        np.testing.assert_allclose(model.state_as_layers(hs, rows), rs, rtol=1e-4, atol=1e-4)
    assert np.abs(hs).max() > 0
    # the state carries history: the same token after different histories gives other logits
    a = model.step(5, model.init_state())
    b = model.step(5, hs)
    assert np.abs(a - b).max() > 1e-3


@pytest.mark.slow
def test_each_segment_reads_only_earlier_outputs(fp16_artifact):
    m = HybridModel(fp16_artifact).manifest
    known = {m.token_input} | {s.input for s in m.state}
    for seg in m.segments:
        assert set(seg.inputs) <= known, seg.name
        known |= set(seg.outputs)
    assert m.logits_output in known and all(s.output in known for s in m.state)


@pytest.mark.slow
def test_tampered_segment_is_refused(fp16_artifact, tmp_path):
    art = str(tmp_path / "a")
    shutil.copytree(fp16_artifact, art)
    seg = [f for f in sorted(os.listdir(os.path.join(art, "segments"))) if f.endswith(".onnx")][2]
    with open(os.path.join(art, "segments", seg), "r+b") as f:
        f.seek(200)
        f.write(b"\x00\x01\x02")
    with pytest.raises(BadInput, match="changed since it was compiled"):
        HybridModel(art)


def test_auto_backend_picks_the_simulator_here():
    from rwkv2rknn.runtime.hybrid import resolve_backend

    assert resolve_backend("auto") == "rknn-sim"  # rknn-toolkit2 installed, no rknnlite on x86


@pytest.mark.slow
def test_rknn_lite_off_the_board_names_the_install(fp16_artifact):
    from rwkv2rknn.errors import MissingDependency

    with pytest.raises(MissingDependency, match="rknn-toolkit-lite2"):
        HybridModel(fp16_artifact, backend="rknn-lite")


@pytest.mark.slow
def test_board_import_surface_has_no_heavy_modules(fp32_plan_artifact):
    """What the board imports to run an artifact must not pull torch, onnx-graphsurgeon or rknn."""
    import subprocess
    import sys

    code = (
        "import sys; from rwkv2rknn.runtime.hybrid import HybridModel; "
        "from rwkv2rknn.runtime import board, device, loader, reference, rknn, rknnrt; "
        "from rwkv2rknn.tools import doctor; doctor.doctor(); "
        "from rwkv2rknn.runtime.tokenizer import load_tokenizer; from rwkv2rknn.runtime.generate import generate; "
        f"m = HybridModel({fp32_plan_artifact!r}, backend='ort'); m.logits([1, 2]); "
        f"loader.open_model({fp32_plan_artifact!r}, 'ort'); board.board_soc(); board.lite_available(); "
        "board.rt_available(); "
        "bad = [k for k in ('torch', 'onnx_graphsurgeon', 'rknn', 'onnx', 'rwkv2rknn.rknn.toolkit') "
        "if k in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
