"""The CPU token table stored narrow (rwkv2rknn.compiler.embedding), run by onnxruntime."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from rwkv2rknn.compiler.embedding import compact


def _table_model(table):
    g = helper.make_graph(
        [helper.make_node("Gather", ["emb", "token"], ["x"], name="gather")],
        "embed",
        [helper.make_tensor_value_info("token", TensorProto.INT32, [None])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, table.shape[1]])],
        [numpy_helper.from_array(table, "emb")],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _run(model, ids):
    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, {"token": np.array(ids, np.int32)})[0]


def test_fp16_table_is_half_the_bytes_and_widened_per_token():
    # the values of an fp16 export, held as fp32 by the compile
    table = np.random.default_rng(0).standard_normal((300, 64)).astype(np.float16).astype(np.float32)
    m = _table_model(table)
    assert compact(m) == table.nbytes // 2
    onnx.checker.check_model(m)
    inits = {i.name: i for i in m.graph.initializer}
    assert inits["emb"].data_type == TensorProto.FLOAT16
    assert [n.op_type for n in m.graph.node] == ["Gather", "Cast"]
    got = _run(m, [5, 299, 0])
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, table[[5, 299, 0]])  # nothing lost
    assert compact(m) == 0  # narrow already


def test_a_table_of_fp32_values_stays_fp32_outside_w8a8():
    table = np.random.default_rng(2).standard_normal((300, 64)).astype(np.float32)
    m = _table_model(table)
    assert compact(m) == 0 and m.graph.initializer[0].data_type == TensorProto.FLOAT
    np.testing.assert_array_equal(_run(m, [3]), table[[3]])


def test_int8_table_with_row_scales():
    rng = np.random.default_rng(1)
    table = (rng.standard_normal((300, 64)) * rng.uniform(0.01, 10, (300, 1))).astype(np.float32)
    m = _table_model(table)
    saved = compact(m, int8=True)
    assert saved == table.nbytes - 300 * 64 - 300 * 4
    onnx.checker.check_model(m)
    got = _run(m, [7, 42])
    want = table[[7, 42]]
    # within half a step of each row's own scale (its largest |value| / 127)
    step = np.abs(want).max(axis=1, keepdims=True) / 127
    assert (np.abs(got - want) <= step / 2 + 1e-6).all()


def test_a_table_with_other_readers_is_left_alone():
    table = np.ones((10, 4), np.float32)
    m = _table_model(table)
    m.graph.node.append(helper.make_node("Identity", ["emb"], ["y"]))
    assert compact(m) == 0 and m.graph.initializer[0].data_type == TensorProto.FLOAT


@pytest.mark.slow
def test_a_built_compile_stores_its_token_table_in_fp16(fp16_artifact):
    import os

    from rwkv2rknn.runtime.hybrid import load_manifest

    m = load_manifest(fp16_artifact)
    embed = next(s for s in m.segments if s.backend == "cpu" and "embed" in s.stages)
    model = onnx.load(os.path.join(fp16_artifact, embed.token.onnx))
    tables = [i for i in model.graph.initializer if len(i.dims) == 2]
    assert tables and all(i.data_type == TensorProto.FLOAT16 for i in tables)
