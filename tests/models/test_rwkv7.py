"""RWKV-7: checkpoint reading, the per-layer export, and parity with the `rwkv` package."""

import json
import os

import numpy as np
import pytest

from rwkv2rknn.errors import UnsupportedModel
from rwkv2rknn.models import rwkv7
from rwkv2rknn.models.checkpoint import random_rwkv7
from rwkv2rknn.models.export import MODEL_JSON, arch_of


def test_shape_is_read_from_the_tensors(slot_models):
    sd = slot_models("7").sd
    shape = rwkv7.check_state_dict(sd)
    assert (shape.layers, shape.width, shape.ffn, shape.vocab) == (3, 192, 768, 301)
    assert (shape.heads, shape.head_size) == (3, 64)
    assert shape.lora == {"w": 40, "a": 36, "v": 20, "g": 56}
    assert "blocks.0.att.v1" not in sd and "blocks.1.att.v1" in sd
    assert arch_of(sd)[0] is rwkv7
    assert shape.params() == sum(a.size for a in sd.values())


def test_head_size_comes_from_r_k():
    sd = random_rwkv7(layers=2, width=128, vocab=50, head_size=32, seed=2)
    shape = rwkv7.check_state_dict(sd)
    assert (shape.heads, shape.head_size) == (4, 32)


@pytest.mark.parametrize(
    "damage,match",
    [
        (lambda sd: sd.pop("blocks.1.att.v0"), "blocks.1.att.v0' missing"),
        (lambda sd: sd.__setitem__("blocks.0.att.r_k", np.zeros((5, 7), np.float32)), "r_k"),
        (lambda sd: sd.__setitem__("blocks.1.att.a2", np.zeros((36, 100), np.float32)), "att.a2.*shape"),
    ],
)
def test_damaged_checkpoints_are_named(damage, match):
    sd = random_rwkv7(layers=2, width=128, vocab=50, seed=4)
    damage(sd)
    with pytest.raises(UnsupportedModel, match=match):
        rwkv7.check_state_dict(sd)


def test_other_versions_are_told_apart():
    sd = random_rwkv7(layers=2, width=128, vocab=50, seed=4)
    sd = {k: v for k, v in sd.items() if ".att.x_a" not in k and ".att.w0" not in k}
    sd["blocks.0.att.time_faaaa"] = np.zeros((2, 64), np.float32)
    with pytest.raises(UnsupportedModel, match="not an RWKV-5.2 checkpoint"):
        arch_of(sd)


def test_per_layer_layout(slot_models):
    import onnx

    folder = slot_models("7").dirs["fp16"]
    assert sorted(os.listdir(folder)) == sorted(
        ["embed.onnx", "head.onnx", "mixing_0.onnx", "mixing_1.onnx", "mixing_2.onnx", MODEL_JSON]
    )
    desc = json.load(open(os.path.join(folder, MODEL_JSON)))
    assert desc["arch"] == "rwkv7" and desc["version"] == "7" and desc["inter_layer"] == ["v_first"]
    assert [(s["name"], s["shape"], s["accumulator"]) for s in desc["state_slots"]] == [
        ("att_shift", [192], False),
        ("wkv", [3, 64, 64], True),
        ("ffn_shift", [192], False),
    ]

    def io(m):
        return (
            {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in m.graph.input},
            {o.name: [d.dim_value for d in o.type.tensor_type.shape.dim] for o in m.graph.output},
        )

    m0, m1 = (onnx.load(os.path.join(folder, f"mixing_{i}.onnx")) for i in (0, 1))
    assert io(m0) == (
        {"input": [192], "att_shift": [192], "wkv": [3, 64, 64], "ffn_shift": [192]},
        {
            "output": [192],
            "v_first": [192],
            "att_shift_out": [192],
            "wkv_out": [3, 64, 64],
            "ffn_shift_out": [192],
        },
    )
    assert io(m1)[0] == {
        "input": [192],
        "v_first": [192],
        "att_shift": [192],
        "wkv": [3, 64, 64],
        "ffn_shift": [192],
    }
    # the recurrence stays in fp32 inside the fp16 file
    exp = [n for n in m1.graph.node if n.op_type == "Exp"]
    assert exp and exp[0].name.startswith("wkv.")
    casts = [n for n in m1.graph.node if n.op_type == "Cast" and n.name.startswith("wkv.")]
    assert casts


@pytest.mark.parametrize("layer,count", [(0, 12), (1, 14)])
def test_projections_are_row_form_constant_matmuls(slot_models, layer, count):
    """R, K, V, O, LoRA pairs w/a/g (and v after layer 0), channel-mix key/value: x[1, K] @ W."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(os.path.join(slot_models("7").dirs["fp32"], f"mixing_{layer}.onnx"))
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    const = [n for n in m.graph.node if n.op_type == "MatMul" and n.input[1] in inits]
    assert len(const) == count
    assert all(inits[n.input[1]].ndim == 2 and n.input[0] not in inits for n in const)
    others = [n for n in m.graph.node if n.op_type == "MatMul" and n not in const]
    assert others and all(n.name.startswith("wkv.") for n in others)  # S kk, [S kk, v] [kk a; -k], S r, r k


def test_cli_exports_an_rwkv7_pth(slot_models, tmp_path):
    from click.testing import CliRunner

    from rwkv2rknn.cli import cli

    out = tmp_path / "cli"
    r = CliRunner().invoke(cli, ["export", slot_models("7").dirs["pth"], "-o", str(out), "--fp32"])
    assert r.exit_code == 0, r.output
    assert "exported RWKV-7 3 x 192, vocab 301 (fp32)" in r.output
    assert json.load(open(out / MODEL_JSON))["tokenizer"] is None  # vocab 301: no default tokenizer


def _ops(nodes):
    from collections import Counter

    return Counter(n.op_type for n in nodes)


def test_the_wkv_step_is_few_large_ops(slot_models):
    """The per-token recurrence of a later layer (every ``wkv.*`` node) in at most 40 ops, 5 of
    them Reshapes and none a Transpose: the vectors come from their projections in the layout the
    state products want (it was 58 ops, 14 Reshapes). The whole block has at most 20 Reshapes
    (was 32), and its logits still equal the `rwkv` package's."""
    import onnx

    from rwkv2rknn.runtime.reference import PerLayerModel

    sm = slot_models("7")
    for layer, most in ((0, 34), (1, 40)):
        m = onnx.load(os.path.join(sm.dirs["fp32"], f"mixing_{layer}.onnx"))
        wkv = _ops(n for n in m.graph.node if n.name.startswith("wkv."))
        assert sum(wkv.values()) <= most, wkv
        assert wkv["Reshape"] <= 5 and wkv["Transpose"] == 0, wkv
        # S kk, the rank-two update, S r, the bonus's per-head sum; the GroupNorm is one op
        assert wkv["MatMul"] == 4 and wkv["InstanceNormalization"] == 1, wkv
        assert _ops(m.graph.node)["Reshape"] <= 20
    got = PerLayerModel(sm.dirs["fp32"]).logits(sm.tokens)
    assert np.abs(got - sm.reference).max() <= 1e-5 * np.abs(sm.reference).max()
