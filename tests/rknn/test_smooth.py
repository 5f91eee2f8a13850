"""SmoothQuant scales folded into a segment: the projections after a token-shift mix and after
relu^2 are found, and the folded graph computes what it did (fp32 onnxruntime)."""

import glob
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from rwkv2rknn.compiler.driver import compile_model
from rwkv2rknn.compiler.ir import Options
from rwkv2rknn.rknn import smooth
from helpers import random_model


@pytest.fixture(scope="module")
def layer_file(tmp_path_factory):
    d = random_model(tmp_path_factory, "smooth", fp32=True, layers=2, width=32, vocab=64, seed=3)
    art = str(tmp_path_factory.mktemp("smooth") / "art")
    compile_model(d, art, Options(plan_only=True))  # the segments as the builds get them
    (path,) = glob.glob(os.path.join(art, "segments", "s003_npu_L0-L1.onnx"))
    return path


def feeds(model, n, seed):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        f = {}
        for i in model.graph.input:
            shape = [d.dim_value or 1 for d in i.type.tensor_type.shape.dim]
            f[i.name] = rng.normal(size=shape).astype(np.float32) * rng.uniform(0.1, 5)
        out.append(f)
    return out


def run(model, feed):
    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, feed)


def test_folded_scales_keep_the_function_and_even_the_ranges(layer_file):
    model = onnx.load(layer_file)
    sites = smooth.find_sites(model)
    mixes = [s for s in sites if s.divide]
    squares = [s for s in sites if s.key]
    # L0's ffn key/receptance, L1's att key/value/receptance; L0's ffn value
    assert len(mixes) == 5 and len(squares) == 1
    calib = feeds(model, 8, 0)
    scales = smooth.measure(model, calib)
    assert set(scales) == {s.weight for s in sites}
    assert any(np.ptp(np.log(v)) > 0.5 for v in scales.values())  # not all 1: something was done
    before = smooth.channel_max(model, sites, calib)
    folded = onnx.ModelProto()
    folded.CopyFrom(model)
    assert smooth.apply(folded, scales) == len(sites)
    for feed in feeds(model, 3, 1):
        for a, b in zip(run(folded, feed), run(model, feed)):
            np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-4 * float(np.abs(b).max()))
    after = smooth.channel_max(folded, sites, calib)
    for s in sites:  # the smoothed activations' channels are closer to one another
        spread = lambda a: float(np.log(a.max() / max(a.min(), 1e-12)))  # noqa: E731
        assert spread(after[s.act]) < spread(before[s.act])


def test_a_model_without_such_projections_is_left_alone(layer_file):
    model = onnx.load(layer_file)
    assert smooth.apply(model, {}) == 0
    assert smooth.apply(model, {"no such weight": np.ones(3)}) == 0
