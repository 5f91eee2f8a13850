"""check's KL gate, on real text against onnxruntime on the source files: it passes good
artifacts and fails ones whose NPU segment computes something else. The broken artifacts are
built for real: a copy of a compiled artifact has one NPU segment's weights (its per-token and
T-row ONNX, the files rknn-sim builds from) scaled, by 1.05 for fp16 and 1.25 for w8a8, and
rknn-sim builds and runs them. Figures measured on these models are in docs/quality.md."""

import json
import os
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from rwkv2rknn.tools.check import KL_TOLERANCE, run_check
from rwkv2rknn.cli import cli
from rwkv2rknn.runtime.hybrid import load_manifest
from rwkv2rknn.tools.weights import rewrite_segment, scaled

pytestmark = pytest.mark.slow
TOKENS = 96  # of the built-in English sample


@pytest.fixture(scope="module")
def fp16_bytes(byte_model, tmp_path_factory):
    """conftest's byte_model (fp32 files) compiled with fp16 NPU segments."""
    from rwkv2rknn.compiler.driver import compile_model
    from rwkv2rknn.compiler.ir import Options

    out = str(tmp_path_factory.mktemp("art") / "fp16")
    compile_model(byte_model, out, Options(prefill_rows=(4, 8)))
    return out


def scaled_copy(artifact: str, dst: str, factor: float, npu_index: int = 1) -> str:
    """A copy of ``artifact`` whose ``npu_index``-th NPU segment has every weight matrix (2-D, or
    a 1x1 Conv's weight in the columns forms) scaled by ``factor`` in both its ONNX files, with
    the manifest's checksums updated: a miscompiled segment, as the runtime loads it. Returns the
    segment's name."""
    shutil.copytree(artifact, dst)
    seg = [s for s in load_manifest(dst).segments if s.backend == "npu"][npu_index]
    for key, present in (("onnx", seg.token.onnx), ("seq_onnx", seg.seq.onnx)):
        if present:
            assert rewrite_segment(dst, seg.name, scaled(factor), (key,)), (
                f"{seg.name} has no weights to scale"
            )
    return seg.name


def _kl_failures(rep):
    return [f for f in rep.failures if "KL " in f]


def test_fp16_passes_on_text_and_fails_with_one_segment_scaled_by_1_05(fp16_bytes, tmp_path):
    good, backend = run_check(fp16_bytes, TOKENS, backend="rknn-sim")
    assert backend == "rknn-sim" and good.passed, good.summary()
    assert good.tokens_from.startswith("the built-in English sample")
    mean, p99 = KL_TOLERANCE["fp16"]
    for rep in (good.to_dict(), good.prefill):
        q = rep["quality"]
        assert 0 < q["kl"]["mean"] < mean and q["kl"]["p99"] < p99  # fp16 error is real, and small
        assert q["bits"]["unit"] == "byte" and q["bits"]["bytes"] == TOKENS
        assert abs(q["bits"]["artifact"] / q["bits"]["reference"] - 1) < 1e-3
    # the first NPU segment (embedding LayerNorm and layer 0): the smallest effect measured
    name = scaled_copy(fp16_bytes, str(tmp_path / "bad"), 1.05, npu_index=0)
    bad, _ = run_check(str(tmp_path / "bad"), TOKENS, backend="rknn-sim")
    assert not bad.passed
    kl = _kl_failures(bad)
    assert any(f.startswith("KL mean") for f in kl), (name, bad.failures)
    assert any(f.startswith("prefill: KL mean") for f in kl), (name, bad.failures)
    # the logit-error gate (0.05 of the scale) alone would have let this build through
    assert bad.max_rel < bad.tolerance["max_rel"], bad.summary()


def test_ort_gates_the_same_way(byte_model, tmp_path):
    """On onnxruntime (the compile-side fallback) a plan-only artifact of the fp32 files agrees
    to rounding; the same 1.05 scaling fails its KL gate."""
    from rwkv2rknn.compiler.driver import compile_model
    from rwkv2rknn.compiler.ir import Options

    art = str(tmp_path / "plan")
    compile_model(byte_model, art, Options(plan_only=True))
    good, _ = run_check(art, TOKENS, backend="ort")
    assert good.passed and good.quality["kl"]["max"] < KL_TOLERANCE["exact"][0], good.summary()
    scaled_copy(art, str(tmp_path / "bad"), 1.05)
    bad, _ = run_check(str(tmp_path / "bad"), TOKENS, backend="ort")
    assert any(f.startswith("KL mean") for f in bad.failures), bad.failures


def test_w8a8_passes_on_text_and_fails_with_one_segment_scaled_by_1_25(w8a8_artifact, tmp_path):
    good, _ = run_check(w8a8_artifact, TOKENS, backend="rknn-sim")
    assert good.passed, good.summary()
    assert good.tolerance["precision"] == "w8a8"
    assert good.tolerance["max_kl_mean"] == KL_TOLERANCE["w8a8"][0]
    name = scaled_copy(w8a8_artifact, str(tmp_path / "bad"), 1.25)
    bad, _ = run_check(str(tmp_path / "bad"), TOKENS, backend="rknn-sim")
    assert not bad.passed and _kl_failures(bad), (name, bad.summary())


def test_w16a16i_is_gated_on_random_ids_and_w8a8_says_it_is_not(byte_model, w8a8_artifact, tmp_path):
    """w16a16i calibrates on random ids too: on random ids its KL is gated with its text
    tolerance, and passes. w8a8 is calibrated on text only: its KL there is reported with a
    warning giving the figures, not gated."""
    from rwkv2rknn.compiler.driver import compile_model
    from rwkv2rknn.compiler.ir import Options

    art = str(tmp_path / "w16")
    compile_model(byte_model, art, Options(quant="w16a16i", calib_tokens=96, prefill_rows=()))
    w16, _ = run_check(art, 32, backend="rknn-sim", random_ids=True, prefill=False)
    assert w16.tolerance["precision"] == "w16a16i"
    assert (w16.tolerance["max_kl_mean"], w16.tolerance["max_kl_p99"]) == KL_TOLERANCE["w16a16i"]
    assert w16.passed and not w16.warnings, (w16.summary(), w16.warnings)
    assert w16.quality["kl"]["mean"] > 0  # a real integer build (p99 measured 4.2e-4 here)

    w8, _ = run_check(w8a8_artifact, 32, backend="rknn-sim", random_ids=True, prefill=False)
    assert "max_kl_mean" not in w8.tolerance and "max_kl_p99" not in w8.tolerance
    kl = w8.quality["kl"]
    assert w8.warnings == [
        f"w8a8 segments are calibrated on text only: on random ids their KL is reported, not "
        f"gated (here mean {kl['mean']:.2g}, p99 {kl['p99']:.2g}; within the text gate's 0.1, "
        f"0.6); check on text (the default) for the KL gate"
    ], w8.warnings


def test_cli_prints_both_paths_and_saves_the_histograms(fp16_bytes, tmp_path):
    art = str(tmp_path / "art")
    shutil.copytree(fp16_bytes, art)
    r = CliRunner().invoke(cli, ["check", art, "--backend", "rknn-sim", "--tokens", "32"])
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    decode = next(ln for ln in lines if ln.startswith("decode:  KL mean "))
    prefill = next(ln for ln in lines if ln.startswith("prefill: KL mean "))
    for ln in (decode, prefill):
        assert "same top token" in ln and "bits per byte" in ln and "p99" in ln
    assert "weak" not in r.output and "near-tie" not in r.output
    with open(os.path.join(art, "check.json")) as f:
        saved = json.load(f)
    for rep in (saved, saved["prefill"]):
        h = rep["quality"]["histogram"]
        assert sum(h["counts"]) == 32 and len(h["counts"]) == len(h["edges"]) + 1
        kl = np.array([s["kl"] for s in rep["steps"]])
        assert rep["quality"]["kl"]["max"] == pytest.approx(kl.max())


def test_eval_reports_both_paths_against_the_source(fp16_bytes, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("The rain had stopped by the time the bus reached the village square.")
    r = CliRunner().invoke(cli, ["eval", fp16_bytes, "--text", str(text), "--backend", "rknn-sim"])
    assert r.exit_code == 0, r.output
    n = len(text.read_bytes())
    assert f"{n} tokens of the given text (bytes tokenizer)" in r.output, r.output
    for path in ("decode:  KL mean ", "prefill: KL mean "):
        line = next(ln for ln in r.output.splitlines() if ln.startswith(path))
        assert "bits per byte" in line and "same top token" in line
    alone = CliRunner().invoke(
        cli, ["eval", fp16_bytes, "--text", str(text), "--backend", "rknn-sim", "--no-reference"]
    )
    assert alone.exit_code == 0 and f"bits per byte over {n - 1} bytes" in alone.output, alone.output
