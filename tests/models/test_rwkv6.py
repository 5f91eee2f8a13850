"""RWKV-6: checkpoint reading, the per-layer export, and parity with the `rwkv` package."""

import json
import os

import numpy as np
import pytest

from rwkv2rknn.errors import UnsupportedModel
from rwkv2rknn.models import rwkv6
from rwkv2rknn.models.checkpoint import random_rwkv6
from rwkv2rknn.models.export import MODEL_JSON, arch_of


def test_shape_is_read_from_the_tensors(slot_models):
    sd = slot_models("6").sd
    shape = rwkv6.check_state_dict(sd)
    assert (shape.layers, shape.width, shape.ffn, shape.vocab) == (3, 192, 672, 263)
    assert (shape.heads, shape.head_size) == (3, 64)
    assert shape.lora == {"maa": 20, "decay": 44}
    assert shape.params() == sum(a.size for a in sd.values())
    assert arch_of(sd)[0] is rwkv6


@pytest.mark.parametrize(
    "damage,match",
    [
        (lambda sd: sd.pop("blocks.1.att.gate.weight"), "blocks.1.att.gate.weight' missing"),
        (
            lambda sd: sd.__setitem__("blocks.0.att.time_maa_w2", np.zeros((4, 20, 128), np.float32)),
            "time_maa_w2.*shape",
        ),
    ],
)
def test_damaged_checkpoints_are_named(damage, match):
    sd = random_rwkv6(layers=2, width=128, vocab=50, seed=4)
    damage(sd)
    with pytest.raises(UnsupportedModel, match=match):
        rwkv6.check_state_dict(sd)


def test_per_layer_layout(slot_models):
    import onnx

    folder = slot_models("6").dirs["fp16"]
    desc = json.load(open(os.path.join(folder, MODEL_JSON)))
    assert desc["arch"] == "rwkv6" and desc["inter_layer"] == []
    m1 = onnx.load(os.path.join(folder, "mixing_1.onnx"))
    assert [i.name for i in m1.graph.input] == ["input", "att_shift", "wkv", "ffn_shift"]
    assert [o.name for o in m1.graph.output] == ["output", "att_shift_out", "wkv_out", "ffn_shift_out"]
    exp = [n for n in m1.graph.node if n.op_type == "Exp"]
    assert len(exp) == 2 and all(n.name.startswith("wkv.") for n in exp)  # exp(-exp(.)) in fp32
