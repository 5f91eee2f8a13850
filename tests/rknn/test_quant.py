"""compile --quant w8a8: calibrated on real text, measured per segment, run in the simulator."""

import json
import os

import numpy as np
import pytest
from click.testing import CliRunner

from rwkv2rknn.rknn import calibrate
from rwkv2rknn.cli import cli
from rwkv2rknn.compiler.driver import compile_model
from rwkv2rknn.compiler.ir import Options
from rwkv2rknn.rknn.build import cache_key
from rwkv2rknn.runtime.hybrid import load_manifest
from conftest import W8A8_OPTIONS

# What the w8a8 build of conftest's byte_model must keep, teacher-forced on English text (not
# in its calibration rows) against the same model's fp32 ONNX on onnxruntime. Measured here:
# 96.9% token by token (row 0 of the shared T-row build), 96.8% in T-row chunks.
MIN_TOP1_W8A8 = 0.90
QUANT = W8A8_OPTIONS


@pytest.fixture(scope="module")
def w8a8(w8a8_artifact):
    return w8a8_artifact


@pytest.mark.slow
def test_every_npu_segment_is_w8a8_with_its_measured_figure(w8a8):
    m = load_manifest(w8a8)
    npu = [s for s in m.segments if s.backend == "npu"]
    *layers, head = npu  # the head is built for one row (a prompt needs its last row's logits)
    assert npu and all(s.token.precision == "w8a8" for s in npu)
    assert all(s.seq.precision == "w8a8" for s in layers) and not head.seq.rknn
    assert all(s.seq.layout == "columns" for s in layers)  # built without Transposes (rwkv2rknn.rknn.columns)
    for s in npu:
        assert 0.99 <= s.accuracy["min_cos"] <= 1.0 and 0 < s.accuracy["max_rel"] < 1
        assert s.accuracy["rows"] == 24 and os.path.isfile(os.path.join(w8a8, s.token.calib))
        assert f"w8a8 cos {s.accuracy['min_cos']:.4f}" in m.table()
    assert not os.path.exists(os.path.join(w8a8, "calib", ".holdout"))
    plan = json.load(open(os.path.join(w8a8, "plan.json")))
    assert any("calibration: 96 tokens of heldout.txt after byte 20000" in p for p in plan["passes"])
    assert all(s["precision"].startswith("w8a8") for s in plan["segments"] if s["backend"] == "npu")


@pytest.mark.slow
def test_it_validated_at_fp32_rounding_before_its_token_table_went_int8(w8a8):
    """The compile's self-check ran on the model as cut (fp32 source: 1e-4, the NPU's precision
    is check's to measure); the int8 token table came after it, as its own step, and the
    manifest's checksums are those of the narrowed files."""
    import onnx
    from onnx import TensorProto

    from rwkv2rknn.artifact.plan import sha256_file
    from rwkv2rknn.compiler import validate

    plan = json.load(open(os.path.join(w8a8, "plan.json")))
    assert plan["validation"]["passed"] and plan["validation"]["tolerance"] == validate.FP32_TOL
    passes = plan["passes"]
    v = next(i for i, p in enumerate(passes) if p.startswith("validate: "))
    narrow = [i for i, p in enumerate(passes) if p.startswith("narrow: ")]
    assert narrow and min(narrow) > v, passes
    assert "int8 with per-row scales" in passes[narrow[0]]
    m = load_manifest(w8a8)
    embed = next(s for s in m.segments if s.backend == "cpu" and "embed" in s.stages)
    for rel, digest in ((embed.token.onnx, embed.token.sha256), (embed.seq.onnx, embed.seq.sha256)):
        if rel:
            path = os.path.join(w8a8, rel)
            assert sha256_file(path) == digest
            tables = [i for i in onnx.load(path).graph.initializer if len(i.dims) == 2]
            assert any(i.data_type == TensorProto.INT8 for i in tables), rel


@pytest.mark.slow
def test_the_recurrence_and_its_state_stay_on_the_cpu_in_fp32(w8a8):
    m = load_manifest(w8a8)
    carried = {t for s in m.state if s.accumulator for t in (s.input, s.output)}
    for s in m.segments:
        if s.token.precision != "fp16":
            assert s.backend == "npu" and not carried & set(s.inputs + s.outputs)
    assert all(s.precision_label() == "fp32" for s in m.segments if s.backend == "cpu")
    assert any(carried & set(s.inputs) for s in m.segments if s.backend == "cpu")


@pytest.mark.slow
def test_w8a8_runs_in_the_simulator_with_top1_agreement_against_fp32(byte_model, w8a8):
    from rwkv2rknn.tools.evaluate import bits_per_byte
    from rwkv2rknn.runtime.hybrid import HybridModel
    from rwkv2rknn.runtime.reference import PerLayerModel
    from rwkv2rknn.runtime.tokenizer import ByteTokenizer

    text = calibrate.BUILTIN_TEXT[-400:]  # not in the 96 + 24 calibration tokens
    ids = ByteTokenizer().encode(text)
    ref = PerLayerModel(byte_model).logits(ids)
    sim = HybridModel(w8a8, backend="rknn-sim")
    try:
        got_step = sim.logits(ids[:64])
        state = sim.init_state()
        got_prefill = sim.prefill(ids, state, chunk=8)  # the T-row w8a8 builds
        score = bits_per_byte(sim, ByteTokenizer(), text)
    finally:
        sim.close()
    top1_step = float(np.mean(got_step.argmax(1) == ref[:64].argmax(1)))
    top1_prefill = float(np.mean(got_prefill.argmax(1) == ref.argmax(1)))
    print(
        f"w8a8 top-1 agreement with fp32: {top1_step:.3f} token by token, {top1_prefill:.3f} in "
        f"T-row chunks; bits per byte {score.bits_per_byte:.4f}"
    )
    assert top1_step >= MIN_TOP1_W8A8 and top1_prefill >= MIN_TOP1_W8A8, (top1_step, top1_prefill)
    assert np.isfinite(score.bits_per_byte) and score.bytes == len(text.encode()) - 1


@pytest.mark.slow
def test_a_segment_below_the_threshold_is_built_fp16_and_the_plan_says_so(byte_model, w8a8, tmp_path):
    first = load_manifest(w8a8)
    cos = sorted(s.accuracy["min_cos"] for s in first.segments if s.backend == "npu")
    threshold = (cos[0] + cos[1]) / 2  # only the least accurate segment falls below
    out = str(tmp_path / "mixed")
    m = compile_model(byte_model, out, Options(quant_min_cos=threshold, **QUANT))
    kept = [s for s in m.segments if s.backend == "npu" and s.token.precision == "fp16"]
    assert len(kept) == 1 and kept[0].accuracy["min_cos"] == cos[0]
    assert kept[0].precision_note == f"w8a8 cos {cos[0]:.4f} < {threshold:g}"
    assert kept[0].seq.precision == "fp16" and not kept[0].token.calib
    assert all(s.token.precision == "w8a8" for s in m.segments if s.backend == "npu" and s is not kept[0])
    table = m.table()
    assert "fp16!" in table and f"kept fp16 in a quantised compile: {kept[0].name}" in table
    fp16 = load_manifest(w8a8)  # the w8a8 build of the same segment is estimated faster
    same = next(s for s in fp16.segments if s.name == kept[0].name)
    assert same.est_ms < kept[0].est_ms


def test_cache_key_holds_precision_and_calibration():
    keys = {
        cache_key(b"onnx", "rk3588", "2.5.0"),
        cache_key(b"onnx", "rk3588", "2.5.0", "w8a8|normal|channel|digest-a"),
        cache_key(b"onnx", "rk3588", "2.5.0", "w8a8|normal|channel|digest-b"),
        cache_key(b"onnx", "rk3588", "2.5.0", "w16a16i_dfp|normal|channel|digest-a"),
    }
    assert len(keys) == 4


@pytest.mark.slow
def test_check_on_w8a8_states_its_tolerance(w8a8):
    from rwkv2rknn.tools.check import KL_TOLERANCE

    mean, p99 = KL_TOLERANCE["w8a8"]
    r = CliRunner().invoke(cli, ["check", w8a8, "--backend", "rknn-sim", "--tokens", "16"])
    assert f"tolerance for w8a8: KL mean <= {mean:g}, p99 <= {p99:g}, max rel <= 0.25" in r.output, r.output


@pytest.mark.parametrize(
    "content,words",
    [
        (b"", "is empty"),
        (b"\xff\xfe\x00bad" * 40, "is not UTF-8"),
        (b"Too short.", "fewer than 32"),
    ],
)
def test_bad_calibration_text_is_one_clear_line_and_no_artifact(byte_model, tmp_path, content, words):
    text = tmp_path / "calib.txt"
    text.write_bytes(content)
    out = tmp_path / "art"
    r = CliRunner().invoke(
        cli, ["compile", byte_model, "-o", str(out), "--quant", "w8a8", "--calib-text", str(text)]
    )
    assert r.exit_code == 1, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert lines[-1].startswith("error: calibration text") and words in lines[-1], r.output
    assert "Traceback" not in r.output and not out.exists()


def test_calib_text_without_quant_is_a_usage_error(byte_model, tmp_path):
    r = CliRunner().invoke(
        cli, ["compile", byte_model, "-o", str(tmp_path / "a"), "--calib-text", calibrate.bundled_heldout()]
    )
    assert r.exit_code == 2 and "--quant w8a8" in r.output


def test_quant_with_plan_only_is_a_usage_error(byte_model, tmp_path):
    r = CliRunner().invoke(
        cli, ["compile", byte_model, "-o", str(tmp_path / "a"), "--quant", "w8a8", "--plan-only"]
    )
    assert r.exit_code == 2 and "--plan-only" in r.output and not (tmp_path / "a").exists()


def test_check_text_must_be_readable_utf8(tmp_path):
    bad = tmp_path / "t.txt"
    bad.write_bytes(b"\xc3\x28 not utf-8")
    r = CliRunner().invoke(cli, ["check", str(tmp_path), "--text", str(bad)])
    assert r.exit_code == 1 and "text" in r.output and "is not UTF-8" in r.output and "--text" in r.output


@pytest.mark.slow
def test_pack_leaves_the_calibration_datasets_out(w8a8, tmp_path):
    from rwkv2rknn.artifact.pack import pack

    out = tmp_path / "board"
    pack(w8a8, str(out))
    m = load_manifest(str(out))
    assert not (out / "calib").exists()
    assert all(s.token.calib is None and s.seq.calib is None for s in m.segments)
    assert all(s.token.precision == "w8a8" for s in m.segments if s.backend == "npu")


@pytest.mark.slow
def test_compile_w8a8_prints_and_saves_its_kl_on_held_out_tokens(byte_model, w8a8_artifact, tmp_path):
    """The same compile as w8a8_artifact (its builds come from the cache), through the CLI."""
    from rwkv2rknn.tools.check import KL_TOLERANCE

    out = tmp_path / "art"
    r = CliRunner().invoke(
        cli,
        [
            "compile",
            byte_model,
            "-o",
            str(out),
            "--quant",
            "w8a8",
            "--calib-tokens",
            str(QUANT["calib_tokens"]),
            "--prefill-rows",
            "4,8",
        ],
    )
    assert r.exit_code == 0, r.output
    lines = [ln for ln in r.output.splitlines() if " held-out tokens of " in ln]
    assert [ln.split()[:2] for ln in lines] == [["w8a8", "decode"], ["w8a8", "prefill"]], r.output
    plan = json.load(open(out / "plan.json"))
    q = plan["heldout_quality"]
    assert q["tokens"] == 24 and "heldout.txt" in q["text"]
    for path, ln in zip(("decode", "prefill"), lines):
        k = q[path]["kl"]
        assert 0 < k["mean"] < KL_TOLERANCE["w8a8"][0], q  # really quantised, within check's gate
        assert f"KL mean {k['mean']:.3g}," in ln and f"same top token {100 * q[path]['same_top']:.1f}%" in ln


@pytest.mark.slow
def test_quant_keep_builds_the_named_stages_fp16_and_the_rest_w8a8(byte_model, w8a8, tmp_path):
    out = str(tmp_path / "keep")
    m = compile_model(byte_model, out, Options(quant_keep=("head", "L9"), **QUANT))
    npu = [s for s in m.segments if s.backend == "npu"]
    kept = [s for s in npu if s.token.precision == "fp16"]
    assert [s.stages[-1] for s in kept] == ["head"] and kept[0].precision_note == "--quant-keep head"
    assert not kept[0].token.calib and all(s.token.precision == "w8a8" for s in npu if s is not kept[0])
    assert f"kept fp16 in a quantised compile: {kept[0].name}: --quant-keep head" in m.table()
    plan = json.load(open(os.path.join(out, "plan.json")))
    assert any("--quant-keep L9: no NPU segment holds that stage" in n for n in plan["passes"])
    by_name = str(tmp_path / "by-name")
    m = compile_model(byte_model, by_name, Options(quant_keep=(kept[0].name,), **QUANT))
    assert [s.name for s in m.segments if s.backend == "npu" and s.token.precision == "fp16"] == [
        kept[0].name
    ]


@pytest.mark.parametrize(
    "args, words",
    [
        (
            ["--quant", "w8a8", "--quant-keep", "head,layer3"],
            "'layer3' is not a loader stage or NPU segment name",
        ),
        (["--quant-keep", "head"], "--quant-keep is for quantised builds"),
    ],
)
def test_quant_keep_refuses_what_it_cannot_do(byte_model, tmp_path, args, words):
    r = CliRunner().invoke(cli, ["compile", byte_model, "-o", str(tmp_path / "a")] + args)
    assert r.exit_code == 2 and words in r.output and not (tmp_path / "a").exists()
