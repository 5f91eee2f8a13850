"""RWKV-5.2, RWKV-6 and RWKV-7 through the whole toolchain: export, compile, run, prefill, check, against
the `rwkv` package (the reference implementation, in a child process; see tests/helpers/rwkv_package.py).
The models are tests/conftest.py's SLOT_MODELS (3 layers x 192 or 128, head size 64)."""

import json
import os

import numpy as np
import pytest
from click.testing import CliRunner

from rwkv2rknn.cli import cli
from rwkv2rknn.tools.compare import compare_logits
from rwkv2rknn.artifact.plan import Manifest
from rwkv2rknn.runtime.hybrid import HybridModel
from conftest import FP16_KL

pytestmark = pytest.mark.slow  # every test here takes more than a few seconds

# Projections per layer. RWKV-7: R K V O, LoRA pairs w/a/g (and v after layer 0), FFN key/value.
# RWKV-6: R K V G O, five maa LoRA pairs, the decay LoRA pair, FFN receptance/key/value.
# RWKV-5.2: R K V G O, FFN receptance/key/value.
PROJECTIONS = {"7": [12, 14, 14], "6": [20, 20, 20], "5": [8, 8, 8]}
VERSIONS = pytest.mark.parametrize("version", ["5", "6", "7"])


def _manifest(art):
    with open(os.path.join(art, "manifest.json")) as f:
        return Manifest.from_dict(json.load(f))


def _weight_matmuls(path):
    import onnx

    m = onnx.load(path)
    inits = {t.name: len(t.dims) for t in m.graph.initializer}
    nodes = [n for n in m.graph.node if n.op_type == "MatMul"]
    return [n for n in nodes if any(inits.get(i) == 2 for i in n.input)], m


@VERSIONS
def test_plan_puts_every_projection_on_the_npu(slot_models, version):
    art = slot_models(version).plan_artifact
    m = _manifest(art)
    on_npu, recurrence_on_cpu = 0, 0
    for seg in m.segments:
        weights, model = _weight_matmuls(os.path.join(art, seg.token.onnx))
        if seg.backend == "npu":
            on_npu += len(weights)
            assert not [n.name for n in model.graph.node if "/wkv." in n.name], seg.name
            assert not [n for n in model.graph.node if n.op_type == "Exp"]
        else:
            assert not weights, f"{seg.name} has a projection on the CPU"
            recurrence_on_cpu += sum("/wkv." in n.name for n in model.graph.node)
    assert on_npu == sum(PROJECTIONS[version]) + 1  # and the head
    assert recurrence_on_cpu > 3 * 20  # the whole wkv step of each layer
    # every projection is on the NPU (above); the share also counts the recurrence's MatMuls of
    # two activations, which stay on the CPU, so it is honest about them
    assert 0.5 < m.npu_flop_share() < 1.0
    layers = [r for r in m.per_layer() if r["stage"].startswith("L")]
    assert len(layers) == 3
    assert all(len(r["npu"]) <= 2 and len(r["cpu"]) <= 1 for r in layers), layers
    assert "per layer: at most 2 NPU and 1 CPU segment(s) per token" in m.table()


def test_rwkv7_cpu_segments_are_few_ops(slot_models):
    """A layer's CPU segment (its wkv step) after compiling: at most 45 ops, 11 of them Reshapes,
    no Transpose (it was 65 ops with 21 Reshapes: each op is a barrier of onnxruntime's pool)."""
    from collections import Counter

    import onnx

    art = slot_models("7").plan_artifact
    cpu = [s for s in _manifest(art).segments if s.backend == "cpu" and "_cpu_L" in s.name]
    assert len(cpu) == 3, [s.name for s in cpu]
    for seg in cpu:
        ops = Counter(n.op_type for n in onnx.load(os.path.join(art, seg.token.onnx)).graph.node)
        assert sum(ops.values()) <= 45 and ops["Reshape"] <= 11 and not ops["Transpose"], (seg.name, ops)


@VERSIONS
def test_manifest_records_the_state_slots(slot_models, version):
    sm = slot_models(version)
    m = _manifest(sm.plan_artifact)
    c = sm.shape["width"]
    slots = [(s.layer, s.row, s.dims(c), s.accumulator) for s in m.state]
    assert slots == [
        (i, name, shape, acc)
        for i in range(3)
        for name, shape, acc in (
            ("att_shift", (c,), False),
            ("wkv", (c // 64, 64, 64), True),
            ("ffn_shift", (c,), False),
        )
    ]
    assert m.model["arch"] == f"rwkv{version}"
    # RWKV-7's v_first is an activation between segments, not a state slot
    readers = [s.name for s in m.segments if "L0/v_first" in s.inputs]
    assert len(readers) == (2 if version == "7" else 0)
    assert "L0/v_first" not in {s.input for s in m.state}


@VERSIONS
def test_ort_run_equals_the_rwkv_package(slot_models, version):
    sm = slot_models(version)
    got = HybridModel(sm.plan_artifact, backend="ort").logits(sm.tokens)
    assert got.shape == sm.reference.shape
    assert np.abs(got - sm.reference).max() <= 1e-4 * np.abs(sm.reference).max()
    assert len(set(sm.reference.argmax(1))) > 10  # the logits really depend on the tokens


def test_cli_run_logits(slot_models, tmp_path):
    sm = slot_models("7")
    out = tmp_path / "logits.npy"
    r = CliRunner().invoke(
        cli,
        [
            "run",
            sm.plan_artifact,
            "--backend",
            "ort",
            "--tokens",
            ",".join(map(str, sm.tokens)),
            "--logits-out",
            str(out),
        ],
    )
    assert r.exit_code == 0, r.output
    assert np.abs(np.load(out) - sm.reference).max() <= 1e-4 * np.abs(sm.reference).max()


@VERSIONS
@pytest.mark.parametrize("chunk", [5, 16])
def test_prefill_equals_one_at_a_time(slot_models, version, chunk):
    sm = slot_models(version)
    # token steps segment by segment, each session with its own (prepacked) weights, as before
    # the shared weight store: the fused token graph and the shared weights equal these to 1e-6
    # of the scale (tests/runtime/test_ortshare.py)
    model = HybridModel(sm.plan_artifact, backend="ort", fuse=False, share_weights=False)
    seq = model.prefill_runners()
    assert seq is not None
    batched = [s for s, r in zip(model.manifest.segments, seq) if r is not None]
    assert batched and all(s.backend == "npu" for s in batched)
    for s, r in zip(model.manifest.segments, seq):  # each NPU segment, not only some
        assert (r is not None) == (s.backend == "npu"), s.name
    assert sum(s.matmuls for s in batched) == sum(PROJECTIONS[version]) + 1
    s1, s2 = model.init_state(), model.init_state()
    one = np.stack([model.step(t, s1) for t in sm.tokens])
    many = model.prefill(sm.tokens, s2, chunk=chunk)
    np.testing.assert_allclose(many, one, rtol=1e-5, atol=1e-5 * np.abs(one).max())
    np.testing.assert_allclose(s2, s1, rtol=1e-5, atol=1e-5)
    wkv = model.state_by_slot(s2)[(2, "wkv")]
    assert wkv.shape == (sm.shape["width"] // 64, 64, 64) and np.abs(wkv).max() > 0


@VERSIONS
def test_check_passes_on_ort(slot_models, version):
    r = CliRunner().invoke(
        cli, ["check", slot_models(version).plan_artifact, "--backend", "ort", "--tokens", "12"]
    )
    assert r.exit_code == 0, r.output
    assert "PASS" in r.output


@VERSIONS
def test_fp16_on_the_npu_simulator_and_check(slot_models, version):
    sm = slot_models(version)
    m = _manifest(sm.rknn_artifact)
    npu = [s for s in m.segments if s.backend == "npu"]
    assert len(npu) == 5 and all(s.token.rknn and not s.token.fallback for s in npu)
    for s in npu[:-1]:  # every NPU segment but the head has its T-row build (a failed one would
        # say why here); the head is built for one row: a prompt needs its last row's logits only
        assert not s.seq.fallback and s.seq.rknn and s.seq.rows == (2, 16), (s.name, s.seq.fallback)
    assert npu[-1].stages == ("head",) and not npu[-1].seq.rknn
    assert not m.warnings() and "~" not in m.table()
    model = HybridModel(sm.rknn_artifact, backend="rknn-sim")
    got = model.logits(sm.tokens)
    ref = sm.reference
    # check's fp16 KL gate, and a logit error 10x tighter than its fp16 default (measured max
    # rel error 0.0014-0.0029)
    rep = compare_logits(got, ref, **FP16_KL, max_rel=0.005)
    print(f"RWKV-{version} rknn-sim: {rep.summary()}")
    assert rep.passed, rep.summary()
    assert rep.max_rel > 0  # the NPU path really computed in fp16
    # prefill: the NPU segments' T-row builds
    s1, s2 = model.init_state(), model.init_state()
    one = np.stack([model.step(t, s1) for t in sm.tokens[:24]])
    many = model.prefill(sm.tokens[:24], s2)
    for s, r in zip(model.manifest.segments, model.prefill_runners()):  # per segment, not a set
        if s.backend == "npu" and s.stages != ("head",):
            assert r is not None and r.rows == (2, 16), s.name
    assert compare_logits(many, one, **FP16_KL, max_rel=0.01).passed
    model.close()
    # and `rwkv2rknn check` against the fp16 per-layer files passes
    r = CliRunner().invoke(cli, ["check", sm.rknn_artifact, "--backend", "rknn-sim", "--tokens", "16"])
    assert r.exit_code == 0, r.output
    assert "PASS" in r.output


# RWKV-7 as w8a8, teacher-forced on English text (bytes; not in its 96 calibration tokens)
# against the same fp32 files on onnxruntime. Measured here: 95.3% token by token (64 tokens),
# 92.8% in chunks of 16 (399 tokens); RWKV-6 and 5.2 in the README.
MIN_TOP1_W8A8_V7 = 0.88


def test_w8a8_rwkv7_on_the_simulator_keeps_top1_and_the_plan_shows_each_precision(slot_models, tmp_path):
    from rwkv2rknn.rknn import calibrate
    from rwkv2rknn.compiler.driver import compile_model
    from rwkv2rknn.compiler.ir import Options
    from rwkv2rknn.runtime.tokenizer import ByteTokenizer

    sm = slot_models("7")
    out = str(tmp_path / "w8a8")
    m = compile_model(sm.dirs["fp32"], out, Options(quant="w8a8", calib_tokens=96, prefill_rows=(16,)))
    npu = [s for s in m.segments if s.backend == "npu"]
    *layers, head = npu  # the head is built for one row
    assert len(npu) == 5 and all(s.token.precision == "w8a8" for s in npu) and not head.seq.rknn
    assert all(s.seq.precision == "w8a8" and s.seq.layout == "columns" for s in layers)
    table = m.table()
    for s in npu:
        assert 0.99 <= s.accuracy["min_cos"] <= 1.0
        assert f"{s.name}" in table and f"w8a8 cos {s.accuracy['min_cos']:.4f}" in table
    assert all(s.precision_label() == "fp32" for s in m.segments if s.backend == "cpu")
    ids = ByteTokenizer().encode(calibrate.BUILTIN_TEXT[-400:])
    ref = HybridModel(sm.plan_artifact, backend="ort").logits(ids)
    sim = HybridModel(out, backend="rknn-sim")
    try:
        step = sim.logits(ids[:64])
        prefill = sim.prefill(ids, sim.init_state(), chunk=16)
    finally:
        sim.close()
    top1_step = float(np.mean(step.argmax(1) == ref[:64].argmax(1)))
    top1_prefill = float(np.mean(prefill.argmax(1) == ref.argmax(1)))
    print(f"RWKV-7 w8a8 top-1 against fp32: {top1_step:.3f} token by token, {top1_prefill:.3f} in chunks")
    assert min(top1_step, top1_prefill) >= MIN_TOP1_W8A8_V7, (top1_step, top1_prefill)
    assert np.abs(prefill - ref).max() > 1e-3 * np.abs(ref).max()  # really quantised
