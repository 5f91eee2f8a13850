"""Translation validation: every compile compares what it cut with its source and refuses to
write a different model, naming the pass that made it differ."""

import json
import os

import numpy as np
import pytest

from fixtures import slot_onefile
from rwkv2rknn.compiler import validate
from rwkv2rknn.compiler.driver import compile_model
from rwkv2rknn.compiler.ir import Options
from rwkv2rknn.errors import CompileRefused

# RWKV-7 with two heads of 64: the legacy GroupNorm's Reshape [0, H, -1], folded onto the
# heads' [H, N] view, normalises over 32 values instead of 64 (valid shapes, wrong numbers)
V7 = dict(layers=2, width=128, vocab=83, seed=11)


@pytest.fixture(scope="module")
def group_norm_file(tmp_path_factory):
    """A one-file RWKV-7 whose ln_x is F.group_norm, exported by torch's legacy exporter."""
    from rwkv2rknn.models.checkpoint import random_rwkv7

    path = str(tmp_path_factory.mktemp("gn") / "rwkv7_gn.onnx")
    return slot_onefile.export_entries(random_rwkv7(**V7), path, "7", opset=17, group_norm=True)


def _old_fold(monkeypatch):
    """normalize_matmul as it was before the fix: every Reshape -> Reshape pair is folded, a
    Reshape whose shape copies an input dimension (0) included."""
    from rwkv2rknn.passes import normalize_matmul

    monkeypatch.setattr(normalize_matmul, "_fixed_shape", lambda reshape: True)


@pytest.mark.slow
def test_a_wrong_rewrite_is_refused_naming_the_pass(group_norm_file, tmp_path, monkeypatch):
    _old_fold(monkeypatch)
    out = tmp_path / "art"
    with pytest.raises(CompileRefused) as e:
        compile_model(group_norm_file, str(out), Options(plan_only=True))
    msg = str(e.value)
    assert "\n" not in msg
    assert "pass normalize_matmul first made the graph differ" in msg
    assert "nothing was written" in msg
    assert not out.exists()
    assert not [p for p in os.listdir(tmp_path) if p != "art"]  # no temporary folder left


@pytest.mark.slow
def test_the_command_refuses_in_one_line_with_exit_code_1(group_norm_file, tmp_path, monkeypatch):
    from click.testing import CliRunner
    from rwkv2rknn.cli.app import cli

    _old_fold(monkeypatch)
    out = tmp_path / "art"
    r = CliRunner().invoke(
        cli, ["compile", group_norm_file, "-o", str(out), "--plan-only"], catch_exceptions=False
    )
    assert r.exit_code == 1 and "Traceback" not in r.output
    errors = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "pass normalize_matmul" in errors[0]
    assert not out.exists()


@pytest.mark.slow
def test_the_same_model_compiles_and_records_its_validation(group_norm_file, tmp_path):
    out = tmp_path / "art"
    manifest = compile_model(group_norm_file, str(out), Options(plan_only=True, verify_passes=True))
    plan = json.loads((out / "plan.json").read_text())
    v = plan["validation"]
    assert v["passed"] and v["source_dtype"] == "float32" and v["tolerance"] == validate.FP32_TOL
    assert v["max_rel"] <= validate.FP32_TOL and v["state_drift"] <= validate.FP32_TOL
    assert v["prefill_max_rel"] is not None and v["prefill_max_rel"] <= validate.FP32_TOL
    # --verify-passes: every rewriting pass compared, each within rounding
    names = [p["pass"] for p in v["passes"]]
    assert names[-1] == "normalize_matmul" and "state" in names
    assert all(p["max_rel"] <= validate.FP32_TOL for p in v["passes"])
    assert any(line.startswith("validate: the cut model equals the source") for line in manifest.report)


@pytest.mark.slow
def test_verify_passes_reports_each_pass_of_the_wrong_rewrite(group_norm_file, monkeypatch):
    """The per-pass comparison on its own: before normalize_matmul the graph is the source's
    (fp32 rounding), after the old fold it is not."""
    from rwkv2rknn import passes
    from rwkv2rknn.passes import load

    _old_fold(monkeypatch)
    ctx = load.run(group_norm_file, Options(plan_only=True))
    for p in passes.GRAPH_PIPELINE[: passes.GRAPH_PIPELINE.index(passes.fp16_guard)]:
        p.run(ctx)  # the final context: the names the per-pass graphs are stepped by
    errors = dict(validate.pass_errors(group_norm_file, ctx, validate.FP32_TOL, passes))
    assert errors["state"] <= validate.FP32_TOL
    assert errors["normalize_matmul"] > 0.01


@pytest.mark.slow
def test_a_per_layer_folder_validates_while_streaming(fp32_dir, fp16_dir, tmp_path):
    for name, src, tol in (("fp32", fp32_dir, validate.FP32_TOL), ("fp16", fp16_dir, validate.FP16_TOL)):
        out = tmp_path / name
        compile_model(src, str(out), Options(plan_only=True))
        v = json.loads((out / "plan.json").read_text())["validation"]
        assert v["passed"] and v["tolerance"] == tol
        assert 0 <= v["max_rel"] <= tol and v["prefill_max_rel"] <= tol
        manifest = json.loads((out / "manifest.json").read_text())
        assert any(r.startswith("validate: ") for r in manifest["report"])


@pytest.mark.slow
def test_a_cut_that_differs_is_refused_and_names_the_cut(fp32_dir, tmp_path, monkeypatch):
    """A fault after the graph passes (here: one NPU segment's weight scaled as it is written)
    is found too: the graph passes agree with the source, so the message names the cut."""
    from onnx import numpy_helper
    from rwkv2rknn.compiler import stream

    write, spoiled = stream._Stream.write, []

    def write_wrong(self, seg, sequence):
        if seg.device == "npu" and not spoiled:
            spoiled.append(seg.name)
            init = next(t for t in seg.token.model.graph.initializer if len(t.dims) == 2)
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * np.float32(1.5), init.name))
        return write(self, seg, sequence)

    monkeypatch.setattr(stream._Stream, "write", write_wrong)
    out = tmp_path / "art"
    with pytest.raises(CompileRefused) as e:
        compile_model(fp32_dir, str(out), Options(plan_only=True))
    assert spoiled and "the graph passes agree with the source; the cut segments" in str(e.value)
    assert not out.exists()
