"""The self-test: golden vectors recorded at compile time, checked on each runner.

Pass cases run the real compiled artifact on onnxruntime and on rknn-toolkit2's simulator. The
fail cases need a runtime that computes something wrong: the RECORDING STAND-IN librknnrt
(tests/runtime/standin_librknnrt.c, ``mangle``) transposes, scales or zero-fills an output of a
segment whose golden vectors are the stand-in's own arithmetic, on either io path; the
artifact-level ones use the rknn-lite stand-in of test_board_runners.py.
"""

import json
import os

import numpy as np
import pytest

from rwkv2rknn.artifact.plan import Build, Segment
from rwkv2rknn.runtime import rknnrt, selftest
from rwkv2rknn.runtime.hybrid import HybridModel, load_manifest

W = 48
SHAPES = {"x": (1, W), "s": (W,), "y": (1, W), "s_out": (W,)}


def _seg(name="s003_npu_L1"):
    return Segment(
        name=name,
        backend="npu",
        inputs=("x", "s"),
        outputs=("y", "s_out"),
        shapes=SHAPES,
        stages=("L1",),
        token=Build(onnx="", rknn=f"{name}.rknn"),
        seq=Build(rknn=f"{name}.seq.rknn", rows=(2, 16)),
    )


def _golden():
    """The stand-in's arithmetic (out_j = 1000 (j + 1) + in_0 + 10 in_1) on real-looking values."""
    rng = np.random.default_rng(3)
    x, s = rng.standard_normal((1, W)).astype(np.float32), rng.standard_normal(W).astype(np.float32)
    rows = rng.standard_normal((4, W)).astype(np.float32)
    return {
        "token_in_0": x,
        "token_in_1": s,
        "token_out_0": 1000 + x + 10 * s,
        "token_out_1": (2000 + x + 10 * s).reshape(W),
        "rows_in_0": rows,
        "rows_in_1": s,
        "rows_out_0": 1000 + rows + 10 * s,
        "rows_out_1": 2000 + rows + 10 * s,
    }


def _check(standin, tmp_path, extra="", paths=("copy", "zero-copy")):
    token = tmp_path / "seg.rknn"
    token.write_text(f"in x 1,{W}\nin s {W}\nout y 1,{W}\nout s_out {W}\n{extra}")
    seq = tmp_path / "seg.seq.rknn"
    seq.write_text(f"in x T,{W}\nin s {W}\nout y T,{W}\nout s_out T,{W}\n{extra}")
    seg = _seg()

    def token_runner(io):
        return rknnrt.RknnRtRunner(
            str(token), seg.name, seg.inputs, seg.outputs, SHAPES, lib=standin, io=io
        ), True

    def seq_runner(io):
        return rknnrt.RknnRtRunner(
            str(seq), seg.name + ".seq", seg.inputs, seg.outputs, None, rows=seg.seq.rows, lib=standin, io=io
        ), True

    return selftest.check_segment(seg, _golden(), {"s"}, paths, token_runner, seq_runner)


@pytest.fixture(scope="module")
def standin(standin_lib):
    return standin_lib()


def test_a_right_runtime_passes_on_both_io_paths(standin, tmp_path):
    checks, best = _check(standin, tmp_path)
    assert [(c.shape, c.io) for c in checks] == [
        (s, io) for io in ("copy", "zero-copy") for s in ("token", "2 rows", "16 rows")
    ]
    assert all(c.ok for c in checks), [c.line() for c in checks]
    assert all(c.cos > 0.99999 and c.rel < 1e-6 for c in checks)
    assert best in ("copy", "zero-copy")


@pytest.mark.parametrize("how", ["transpose", "scale", "zero"])
def test_a_wrong_output_fails_naming_the_segment(standin, tmp_path, how):
    checks, best = _check(standin, tmp_path, f"mangle y {how}\n")
    bad = [c for c in checks if not c.ok]
    assert len(bad) == len(checks) == 6  # every shape, both io paths
    assert all(c.output == "y" for c in bad)
    line = bad[0].line()
    assert line.startswith("FAIL s003_npu_L1 (token, copy): output 'y'") and "tolerance cos >= 0.999" in line
    report = selftest.Report("rknn-rt: test", checks, {"s003_npu_L1": best}, [])
    assert not report.ok
    err = selftest.failure(report)
    assert "segment s003_npu_L1 (token, copy)" in str(err) and "--rknn-io copy" in err.fix


def test_auto_io_picks_the_path_that_passes(standin, tmp_path):
    """A runtime whose zero-copy path returns wrong values (no Rockchip sample binds FLOAT32
    that way): auto chooses copy for the segment, and the report passes."""
    checks, best = _check(standin, tmp_path, "mangle s_out scale zero-copy\n")
    assert best == "copy"
    assert all(c.ok for c in checks if c.io == "copy")
    assert not any(c.ok for c in checks if c.io == "zero-copy")
    assert selftest.Report("k", checks, {"s003_npu_L1": best}, []).ok
    checks, best = _check(standin, tmp_path, "mangle s_out scale copy\n")
    assert best == "zero-copy"


def test_compare_and_tolerances():
    w = np.arange(1, 9, dtype=np.float32)
    assert selftest.compare(w, w) == (1.0, 0.0)
    assert selftest.compare(np.zeros(8), w)[0] == 0.0
    assert selftest.compare(2 * w, w)[1] == pytest.approx(1.0)
    assert selftest.compare(np.full(8, np.nan), w) == (-1.0, float("inf"))
    assert selftest.compare(w[:4], w) == (-1.0, float("inf"))
    seg = Segment(
        name="a",
        backend="npu",
        inputs=(),
        outputs=(),
        shapes={},
        stages=("L0",),
        token=Build(onnx="", precision="w8a8"),
        accuracy={"min_cos": 0.97, "max_rel": 0.2},
    )
    assert selftest.tolerance(seg, "fp16") == (0.999, 0.05)
    assert selftest.tolerance(seg, "w8a8") == (pytest.approx(0.96), pytest.approx(0.4))


@pytest.mark.slow
def test_golden_vectors_are_recorded_at_compile_and_pass_on_ort(fp16_artifact, tmp_path):
    m = load_manifest(fp16_artifact)
    with open(os.path.join(fp16_artifact, "manifest.json")) as f:
        assert json.load(f)["format_version"] == 5  # golden vectors and a .seq.onnx in columns
    npu = [s for s in m.segments if s.backend == "npu"]
    assert npu and all(s.golden == f"golden/{s.name}.npz" and len(s.golden_sha256) == 64 for s in npu)
    assert not any(s.golden for s in m.segments if s.backend == "cpu")
    with np.load(os.path.join(fp16_artifact, npu[0].golden)) as g:
        # real activations: not zero, not random noise around zero, all inputs and outputs
        assert {f"rows_in_{i}" for i in range(len(npu[0].inputs))} <= set(g.files)
        assert g["rows_out_0"].shape[0] == 4 and np.abs(g["rows_out_0"]).max() > 0
    # sessions that hold their own weights, as the compile's golden trace runs them
    model = HybridModel(fp16_artifact, backend="ort", share_weights=False)
    try:
        report = selftest.run(model)
    finally:
        model.close()
    assert report.ok and report.key.startswith("ort: onnxruntime ")
    assert {c.segment for c in report.checks} == {s.name for s in npu}
    assert all(c.rel == 0 for c in report.checks)  # the same fp32 computation


@pytest.mark.slow
def test_the_simulator_passes_every_built_shape(fp16_artifact):
    model = HybridModel(fp16_artifact, backend="rknn-sim")
    try:
        report = selftest.run(model)
    finally:
        model.close()
    assert report.ok, [c.line() for c in report.checks]
    m = load_manifest(fp16_artifact)
    want = {(s.name, f"{t} rows") for s in m.segments if s.backend == "npu" for t in s.seq.rows}
    assert want <= {(c.segment, c.shape) for c in report.checks}
    assert all(c.rel > 0 for c in report.checks)  # fp16 on the simulator, not the fp32 numbers


@pytest.mark.slow
def test_doctor_runs_the_self_test_and_records_it(fp16_artifact, tmp_path):
    import shutil

    from click.testing import CliRunner

    from rwkv2rknn.cli import cli

    art = str(tmp_path / "art")
    shutil.copytree(fp16_artifact, art)
    r = CliRunner().invoke(cli, ["doctor", art, "--backend", "ort"])
    assert "ok   self-test: 9 check(s) of 5 NPU segment(s) within tolerance on ort" in r.output, r.output
    assert "     ok   s001_npu_embed-L0 (token)" in r.output
    rec = json.load(open(os.path.join(art, selftest.VERDICT_FILE)))["runs"]
    assert list(rec) == [selftest.runtime_key("ort")] and rec[selftest.runtime_key("ort")]["ok"]
    # a golden file that changed is named, in one line
    g = load_manifest(art).segments[1].golden
    with open(os.path.join(art, g), "ab") as f:
        f.write(b"x")
    r = CliRunner().invoke(cli, ["doctor", art, "--backend", "ort"])
    assert r.exit_code == 1 and "FIX  self-test: golden vectors" in r.output and "checksum" in r.output


@pytest.mark.slow
def test_golden_trace_one_segment_at_a_time_is_the_whole_model_trace(fp16_artifact):
    """The compile's segment-major trace gives what running the model token by token gives."""
    from rwkv2rknn.compiler import golden
    from rwkv2rknn.rknn.calibrate import capture

    m = load_manifest(fp16_artifact)
    ids = [5, 17, 30, 2, 64, 9]
    a, b = golden.trace(fp16_artifact, m, ids), capture(fp16_artifact, ids)
    assert a is not None and set(a) == set(b) == {s.name for s in m.segments if s.backend == "npu"}
    for name in a:
        assert len(a[name].feeds) == len(ids)
        for x, y in zip(a[name].feeds + a[name].results, b[name].feeds + b[name].results):
            assert set(x) == set(y)
            for k in x:
                assert x[k].shape == y[k].shape
                np.testing.assert_allclose(x[k], y[k], rtol=1e-6, atol=1e-6)
