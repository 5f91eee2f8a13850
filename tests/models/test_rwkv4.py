import numpy as np
import pytest

from rwkv2rknn.errors import UnsupportedModel
from rwkv2rknn.models import rwkv4
from rwkv2rknn.models.checkpoint import random_checkpoint


def test_shape_and_params_of_random_checkpoint():
    sd = random_checkpoint(layers=2, width=40, vocab=50, ffn=96)
    shape = rwkv4.check_state_dict(sd)
    assert shape == rwkv4.Shape(layers=2, width=40, ffn=96, vocab=50)
    assert shape.params() == sum(int(np.prod(v.shape)) for v in sd.values())


def test_random_init_is_realistic():
    sd = random_checkpoint(layers=2, width=64, vocab=50)
    decay = sd["blocks.0.att.time_decay"]
    assert decay.max() - decay.min() > 4  # spread over channels
    for k, v in sd.items():
        if "time_mix" in k:
            assert v.min() >= 0 and v.max() <= 1, k
    w = sd["blocks.1.att.key.weight"]
    assert abs(w.std() - 1 / np.sqrt(64)) < 0.2 / np.sqrt(64)


def test_missing_key_is_one_line_error():
    sd = random_checkpoint(layers=2, width=16, vocab=20)
    del sd["blocks.1.ffn.value.weight"]
    with pytest.raises(UnsupportedModel, match="blocks.1.ffn.value.weight"):
        rwkv4.check_state_dict(sd)


def test_wrong_shape_is_reported():
    sd = random_checkpoint(layers=1, width=16, vocab=20)
    sd["blocks.0.att.key.weight"] = np.zeros((16, 8), np.float32)
    with pytest.raises(UnsupportedModel, match="att.key.weight.*shape"):
        rwkv4.check_state_dict(sd)


def test_not_rwkv_at_all():
    with pytest.raises(UnsupportedModel, match="not an RWKV checkpoint"):
        rwkv4.check_state_dict({"conv1.weight": np.zeros((3, 3))})


@pytest.mark.parametrize("key,version", [("att.time_faaaa", "5"), ("att.time_maa_x", "6"), ("att.x_a", "7")])
def test_later_versions_are_named(key, version):
    sd = random_checkpoint(layers=1, width=16, vocab=20)
    sd[f"blocks.0.{key}"] = np.zeros(16, np.float32)
    with pytest.raises(UnsupportedModel, match=f"RWKV-{version} is not supported yet"):
        rwkv4.check_state_dict(sd)


def test_block_graph_has_the_public_layout():
    import onnx

    sd = random_checkpoint(layers=1, width=16, vocab=20)
    m = rwkv4.block_graph(sd, 0)
    onnx.checker.check_model(m)
    assert m.opset_import[0].version == 16
    assert [i.name for i in m.graph.input] == ["input", "state_in"]
    assert [o.name for o in m.graph.output] == ["output", "state_out"]
    ops = (
        [n.op for n in m.graph.node] if hasattr(m.graph.node[0], "op") else [n.op_type for n in m.graph.node]
    )
    assert "LayerNormalization" not in ops and ops.count("ReduceMean") == 4
    assert ops.count("MatMul") == 7
    inits = {i.name for i in m.graph.initializer}
    for n in m.graph.node:
        if n.op_type == "MatMul":
            assert n.input[0] in inits and n.input[1] not in inits  # MatMul(W[out,in], x[in])
