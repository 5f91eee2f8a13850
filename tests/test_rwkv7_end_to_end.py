"""RWKV-7 through the whole toolchain: export, compile, run, prefill, check, against the `rwkv`
package (the reference implementation, in a child process; see tests/rwkv_package.py)."""

import json
import os

import numpy as np
import pytest
from click.testing import CliRunner

from rwkv2rknn.cli import cli
from rwkv2rknn.compare import compare_logits
from rwkv2rknn.plan import Manifest
from rwkv2rknn.runtime.hybrid import HybridModel

PROJECTIONS_PER_LAYER = [12, 14, 14]  # R K V O, LoRA w/a/g (+ v after layer 0), FFN key/value


def _manifest(art):
    with open(os.path.join(art, "manifest.json")) as f:
        return Manifest.from_dict(json.load(f))


def _weight_matmuls(path):
    import onnx
    m = onnx.load(path)
    inits = {t.name: len(t.dims) for t in m.graph.initializer}
    nodes = [n for n in m.graph.node if n.op_type == "MatMul"]
    return [n for n in nodes if any(inits.get(i) == 2 for i in n.input)], m


def test_plan_puts_every_projection_on_the_npu(v7_plan_artifact):
    m = _manifest(v7_plan_artifact)
    on_npu, recurrence_on_cpu = 0, 0
    for seg in m.segments:
        weights, model = _weight_matmuls(os.path.join(v7_plan_artifact, seg.onnx))
        if seg.backend == "npu":
            on_npu += len(weights)
            assert not [n.name for n in model.graph.node if "/wkv." in n.name], seg.name
            assert not [n for n in model.graph.node if n.op_type == "Exp"]
        else:
            assert not weights, f"{seg.name} has a projection on the CPU"
            recurrence_on_cpu += sum("/wkv." in n.name for n in model.graph.node)
    assert on_npu == sum(PROJECTIONS_PER_LAYER) + 1  # and the head
    assert recurrence_on_cpu > 3 * 50  # the whole wkv step of each layer
    assert m.npu_flop_share() == 1.0
    layers = [r for r in m.per_layer() if r["stage"].startswith("L")]
    assert len(layers) == 3
    assert all(len(r["npu"]) <= 2 and len(r["cpu"]) <= 1 for r in layers), layers
    assert "per layer: at most 2 NPU and 1 CPU segment(s) per token" in m.table()


def test_manifest_records_the_state_slots(v7_plan_artifact):
    m = _manifest(v7_plan_artifact)
    slots = [(s.layer, s.row, s.dims(192), s.accumulator) for s in m.state]
    assert slots == [(i, name, shape, acc) for i in range(3) for name, shape, acc in
                     (("att_shift", (192,), False), ("wkv", (3, 64, 64), True),
                      ("ffn_shift", (192,), False))]
    assert m.model["arch"] == "rwkv7"
    # v_first is an activation between segments, not a state slot
    readers = [s.name for s in m.segments if "L0/v_first" in s.inputs]
    assert len(readers) == 2 and "L0/v_first" not in {s.input for s in m.state}


def test_ort_run_equals_the_rwkv_package(v7_plan_artifact, v7_tokens, v7_reference):
    got = HybridModel(v7_plan_artifact, backend="ort").logits(v7_tokens)
    scale = np.abs(v7_reference).max()
    assert np.abs(got - v7_reference).max() <= 1e-4 * scale


def test_cli_run_logits(v7_plan_artifact, v7_tokens, v7_reference, tmp_path):
    out = tmp_path / "logits.npy"
    r = CliRunner().invoke(cli, ["run", v7_plan_artifact, "--backend", "ort", "--tokens",
                                 ",".join(map(str, v7_tokens)), "--logits-out", str(out)])
    assert r.exit_code == 0, r.output
    got = np.load(out)
    assert np.abs(got - v7_reference).max() <= 1e-4 * np.abs(v7_reference).max()


@pytest.mark.parametrize("chunk", [5, 16])
def test_prefill_equals_one_at_a_time(v7_plan_artifact, v7_tokens, chunk):
    model = HybridModel(v7_plan_artifact, backend="ort")
    seq = model._seq_runners()
    assert seq is not None
    batched = [s for s, r in zip(model.manifest.segments, seq) if r is not None]
    assert batched and all(s.backend == "npu" for s in batched)
    assert sum(s.matmuls for s in batched) == sum(PROJECTIONS_PER_LAYER) + 1
    s1, s2 = model.init_state(), model.init_state()
    one = np.stack([model.step(t, s1) for t in v7_tokens])
    many = model.prefill(v7_tokens, s2, chunk=chunk)
    np.testing.assert_allclose(many, one, rtol=1e-5, atol=1e-5 * np.abs(one).max())
    np.testing.assert_allclose(s2, s1, rtol=1e-5, atol=1e-5)
    wkv = model.state_by_slot(s2)[(2, "wkv")]
    assert wkv.shape == (3, 64, 64) and np.abs(wkv).max() > 0


def test_check_passes_on_ort(v7_plan_artifact):
    r = CliRunner().invoke(cli, ["check", v7_plan_artifact, "--backend", "ort", "--tokens", "12"])
    assert r.exit_code == 0, r.output
    assert "PASS" in r.output


def test_fp16_on_the_npu_simulator(v7_rknn_artifact, v7_tokens, v7_reference):
    m = _manifest(v7_rknn_artifact)
    npu = [s for s in m.segments if s.backend == "npu"]
    assert len(npu) == 4 and all(s.rknn and not s.fallback for s in npu)
    model = HybridModel(v7_rknn_artifact, backend="rknn-sim")
    got = model.logits(v7_tokens)
    rep = compare_logits(got, v7_reference, min_top1=0.99, max_rel=0.05)
    assert rep.passed, rep.summary()
    assert rep.max_rel > 0  # the NPU path really computed in fp16
    # prefill: the NPU segments' T-row builds
    s1, s2 = model.init_state(), model.init_state()
    one = np.stack([model.step(t, s1) for t in v7_tokens[:24]])
    many = model.prefill(v7_tokens[:24], s2)
    assert {r.rows for r in model._seq_runners() if r is not None} == {(16, 32)}
    assert compare_logits(many, one, min_top1=0.99, max_rel=0.01).passed
    model.close()


def test_check_passes_on_the_npu_simulator(v7_rknn_artifact):
    r = CliRunner().invoke(cli, ["check", v7_rknn_artifact, "--backend", "rknn-sim",
                                 "--tokens", "16"])
    assert r.exit_code == 0, r.output
    assert "PASS" in r.output
