"""`check`'s gates: each one passes on a good artifact and fails on a perturbed segment.

A perturbed segment stands for a miscompiled one: its weights are scaled by 1.25 and the
manifest's checksum is updated, so the artifact loads as if the compiler had written it.
"""

import json
import os
import shutil

import numpy as np
import pytest

from rwkv2rknn.tools.check import Tolerances, run_check
from rwkv2rknn.runtime.hybrid import load_manifest
from rwkv2rknn.tools.weights import rewrite_segment, scaled


def _copy(artifact, tmp_path):
    dst = str(tmp_path / "art")
    shutil.copytree(artifact, dst)
    return dst


def _perturb(art, which: str, npu_index: int = 1, factor: float = 1.25) -> str:
    """Scale every weight matrix of one NPU segment's per-token ('onnx') or T-row ('seq_onnx')
    file (2-D for a MatMul; a 1x1 Conv's weight in the columns forms)."""
    name = [s.name for s in load_manifest(art).segments if s.backend == "npu"][npu_index]
    assert rewrite_segment(art, name, scaled(factor), files=(which,)), "the segment has no weights to perturb"
    return name


@pytest.mark.slow
def test_good_artifact_passes_every_gate(fp32_plan_artifact):
    rep, backend = run_check(fp32_plan_artifact, n_tokens=20, backend="ort", per_segment=True)
    assert backend == "ort"
    assert rep.passed, rep.summary()
    assert rep.prefill is not None and rep.prefill["passed"]
    assert rep.tolerance["max_state_drift"] == 1e-4 and rep.state_drift <= 1e-4
    rows = [s for s in rep.per_segment if s["rows"]]
    assert rows and all(s["max_rel"] <= 1e-5 for s in rep.per_segment)


@pytest.mark.slow
def test_perturbed_token_segment_fails_decode_and_state_gates(fp32_plan_artifact, tmp_path):
    art = _copy(fp32_plan_artifact, tmp_path)
    name = _perturb(art, "onnx")
    rep, _ = run_check(art, n_tokens=20, backend="ort", per_segment=True)
    assert not rep.passed
    text = "; ".join(rep.failures)
    assert "max rel error" in rep.failures[0] or "top-1" in text
    assert any(f.startswith("state drift") for f in rep.failures), text
    # the T-row variant no longer computes what the (perturbed) token step does
    assert any(f.startswith(f"segment {name} (T rows)") for f in rep.failures), text


@pytest.mark.slow
def test_perturbed_t_row_segment_fails_prefill_and_segment_gates(fp32_plan_artifact, tmp_path):
    art = _copy(fp32_plan_artifact, tmp_path)
    name = _perturb(art, "seq_onnx")
    rep, _ = run_check(art, n_tokens=20, backend="ort", per_segment=True)
    assert not rep.passed
    decode = [f for f in rep.failures if not f.startswith(("prefill:", "segment "))]
    assert decode == [], decode  # token steps never touch the T-row files on ort
    assert any(f.startswith("prefill: max rel error") for f in rep.failures), rep.failures
    assert any(f.startswith("prefill: state drift") for f in rep.failures), rep.failures
    assert any(f.startswith(f"segment {name} (T rows)") for f in rep.failures), rep.failures
    # without the prefill gate (as before) this miscompile went unnoticed
    quiet, _ = run_check(art, n_tokens=20, backend="ort", prefill=False)
    assert quiet.passed


def test_tolerances_are_stated_per_backend_and_precision():
    exact = Tolerances.default("ort", "float32")
    npu = Tolerances.default("rknn-sim", "float16")
    assert exact.max_rel < npu.max_rel and exact.max_state_drift < npu.max_state_drift
    assert exact.max_segment_rel < npu.max_segment_rel
    assert Tolerances.default("ort", "float32", max_rel=0.5).max_rel == 0.5


@pytest.mark.slow
def test_npu_simulator_check_covers_prefill(fp16_artifact, tmp_path):
    rep, backend = run_check(fp16_artifact, n_tokens=20, backend="rknn-sim", per_segment=True)
    assert backend == "rknn-sim"
    assert rep.passed, rep.summary()
    assert rep.prefill is not None and rep.prefill["passed"]
    # the NPU's fp16 error is real but small: the gates are not vacuous at their tolerance
    assert 0 < rep.max_rel < rep.tolerance["max_rel"]
    assert all(0 < s["max_rel"] <= rep.tolerance["max_segment_rel"] for s in rep.per_segment)
    # a miscompiled T-row build (decode runs on it too: one .rknn serves both) fails the check
    art = _copy(fp16_artifact, tmp_path)
    _perturb(art, "seq_onnx", npu_index=0)
    bad, _ = run_check(art, n_tokens=20, backend="rknn-sim", per_segment=False)
    assert not bad.passed
    assert any(f.startswith("prefill:") for f in bad.failures), bad.failures


@pytest.mark.slow
@pytest.mark.parametrize("factor", [1.25])
def test_perturbation_changes_the_logits(fp32_plan_artifact, tmp_path, factor):
    """The perturbation used above is not a no-op (else the failing tests would prove nothing)."""
    from rwkv2rknn.runtime.hybrid import HybridModel

    art = _copy(fp32_plan_artifact, tmp_path)
    before = HybridModel(art, backend="ort").logits([1, 2, 3])
    _perturb(art, "onnx", factor=factor)
    after = HybridModel(art, backend="ort").logits([1, 2, 3])
    assert np.abs(after - before).max() > 1e-3 * np.abs(before).max()


@pytest.mark.slow
def test_check_without_text_the_model_knows_uses_random_ids_and_says_so(fp32_plan_artifact, tmp_path):
    """The small model's vocabulary (97) is smaller than its byte tokenizer's: the built-in text
    cannot be fed, so check runs seeded random ids, prints a `warning:` line saying why, records
    it in check.json, and gates the end state (random ids are what that gate is for)."""
    from click.testing import CliRunner

    from rwkv2rknn.cli import cli

    art = _copy(fp32_plan_artifact, tmp_path)
    r = CliRunner().invoke(cli, ["check", art, "--backend", "ort", "--tokens", "12"])
    assert r.exit_code == 0, r.output
    assert "12 tokens of random ids (seed 0)" in r.output and "PASS" in r.output
    warnings = [ln for ln in r.output.splitlines() if ln.startswith("warning: ")]
    assert warnings == [
        "warning: checked on seeded random ids, not text: its tokenizer (bytes) gives "
        "ids beyond the model's vocabulary of 97"
    ], r.output
    with open(os.path.join(art, "check.json")) as f:
        saved = json.load(f)
    assert saved["warnings"] == [warnings[0][len("warning: ") :]]
    assert "max_state_drift" in saved["tolerance"] and saved["quality"]["kl"]["max"] < 1e-6
    assert "bits" not in saved["quality"]  # random ids are not text: nothing to score
