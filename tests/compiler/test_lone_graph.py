"""A single ONNX file that is not RWKV compiles as a lone graph that computes what it computes;
`run` and `check` refuse it in one line."""

import os

import numpy as np
import pytest

from helpers.robustness import cli, error_line, sha256


@pytest.mark.slow
def test_single_conv_file_compiles_as_a_lone_graph_and_run_refuses_it(bad, tmp_path):
    """A single .onnx is compiled as a lone graph: a conv net may compile; the result must be
    sane (its segments, chained, compute what the model computes) and `run`/`check` refuse it."""
    import onnx
    from rwkv2rknn.runtime.hybrid import load_manifest
    from rwkv2rknn.runtime.ort import OrtRunner

    out = tmp_path / "conv.art"
    r = cli("compile", bad["conv_file"], "-o", out, "--plan-only")
    assert r.returncode == 0, r.err
    assert "Traceback" not in r.err and "segments (" in r.out
    m = load_manifest(out)
    assert m.token_input == "" and m.logits_output == "" and m.model["arch"] == "onnx"
    assert m.segments and {"Conv"} <= {
        n.op_type for s in m.segments for n in onnx.load(os.path.join(out, s.token.onnx)).graph.node
    }
    x = np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)
    env = {"x": x}
    for s in m.segments:
        assert sha256(os.path.join(out, s.token.onnx)) == s.token.sha256
        env.update(OrtRunner(os.path.join(out, s.token.onnx), s.name).infer({k: env[k] for k in s.inputs}))
    want = OrtRunner(bad["conv_file"]).infer({"x": x})["y"]
    np.testing.assert_allclose(env["y"], want, rtol=1e-5, atol=1e-5)
    error_line(
        cli("run", out, "--prompt", "hi", "--backend", "ort"), 1, "single ONNX graph", "compile a whole model"
    )
    error_line(cli("run", out, "--tokens", "1", "--backend", "ort"), 1, "single ONNX graph")
    error_line(cli("check", out, "--backend", "ort"), 1, "single ONNX graph")
