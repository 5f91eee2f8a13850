"""Files of today's exporters: opsets 19 to 23 brought down to the project's opset, ONNX local
functions inlined, and the norm ops newer opsets have (GroupNormalization at 18 and at 21,
LpNormalization, RMSNormalization) lowered. Each lowered graph is run on onnxruntime against
onnxruntime's own kernel for the op in the original file."""

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from rwkv2rknn.errors import UnsupportedModel
from rwkv2rknn.passes import canonicalize
from rwkv2rknn.passes.opset import OPSET


def _model(nodes, inputs, outputs, inits=(), opset=17, ir=9):
    m = helper.make_model(
        helper.make_graph(nodes, "g", inputs, outputs, list(inits)),
        opset_imports=[helper.make_opsetid("", opset)],
    )
    m.ir_version = ir
    return m


def _vi(name, shape):
    return helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, shape)


def _run(m, feed):
    import onnxruntime as ort

    s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, feed)[0]


def _lowered_equals_the_op(m, feed, rtol=1e-5):
    want = _run(m, feed)
    before = {n.op_type for n in m.graph.node}
    got_model = canonicalize.prepare(onnx.ModelProto.FromString(m.SerializeToString()))
    assert next(o.version for o in got_model.opset_import if o.domain == "") == OPSET
    ops = {n.op_type for n in got_model.graph.node}
    assert not ops & set(canonicalize._NORM_OPS), ops
    assert before - ops, "nothing was lowered"
    got = _run(got_model, feed)
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * np.abs(want).max())
    return got_model


def _x(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * 3 + 1


@pytest.mark.parametrize("opset", [18, 20, 21])
@pytest.mark.parametrize("shape", [[1, 64], [2, 12, 5]], ids=["vector", "spatial"])
def test_group_normalization_is_lowered_at_its_opsets_meaning(opset, shape):
    """At 18-20 scale and bias are per group, at 21 per channel."""
    groups, c = 4, shape[1]
    n = groups if opset < 21 else c
    rng = np.random.default_rng(1)
    inits = [
        numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), "s"),
        numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), "b"),
    ]
    node = helper.make_node(
        "GroupNormalization", ["x", "s", "b"], ["y"], name="gn", num_groups=groups, epsilon=64e-5
    )
    m = _model([node], [_vi("x", shape)], [_vi("y", shape)], inits, opset=opset, ir=10 if opset >= 21 else 9)
    _lowered_equals_the_op(m, {"x": _x(*shape)})


@pytest.mark.parametrize("opset", [17, 18, 22])
@pytest.mark.parametrize("p", [1, 2])
def test_lp_normalization_is_lowered(opset, p):
    node = helper.make_node("LpNormalization", ["x"], ["y"], name="l2", axis=-1, p=p)
    m = _model([node], [_vi("x", [3, 64])], [_vi("y", [3, 64])], opset=opset, ir=10 if opset >= 21 else 9)
    _lowered_equals_the_op(m, {"x": _x(3, 64)})


def test_rms_normalization_at_opset_23_is_lowered():
    rng = np.random.default_rng(2)
    node = helper.make_node("RMSNormalization", ["x", "s"], ["y"], name="rms", epsilon=1e-6)
    m = _model(
        [node],
        [_vi("x", [2, 48])],
        [_vi("y", [2, 48])],
        [numpy_helper.from_array(rng.standard_normal(48).astype(np.float32), "s")],
        opset=23,
        ir=11,
    )
    _lowered_equals_the_op(m, {"x": _x(2, 48)})


def test_an_op_whose_meaning_changed_after_18_is_refused_in_one_line():
    node = helper.make_node("Pad", ["x", "pads"], ["y"], name="pad", mode="wrap")
    m = _model(
        [node],
        [_vi("x", [4])],
        [_vi("y", [6])],
        [numpy_helper.from_array(np.array([1, 1], np.int64), "pads")],
        opset=19,
    )
    with pytest.raises(
        UnsupportedModel,
        match=r"\(opset 19\) uses Pad in its opset 19 form.*"
        r"export it again with opset 18 or older",
    ):
        canonicalize.prepare(m, "m.onnx")
    gelu = _model([helper.make_node("Gelu", ["x"], ["y"])], [_vi("x", [4])], [_vi("y", [4])], opset=20)
    with pytest.raises(UnsupportedModel, match="uses Gelu in its opset 20 form"):
        canonicalize.prepare(gelu, "m.onnx")


def test_opset_24_is_refused_naming_the_opsets_read():
    m = _model([helper.make_node("Relu", ["x"], ["y"])], [_vi("x", [4])], [_vi("y", [4])], opset=24)
    with pytest.raises(
        UnsupportedModel,
        match=r"uses ONNX opset 24: export it again with an opset "
        r"from 13 to 23",
    ):
        canonicalize.prepare(m, "m.onnx")


def test_local_functions_are_inlined_with_their_weights_kept(tmp_path):
    """torch's legacy exporter with export_modules_as_functions: each module a local function."""
    import warnings

    import torch

    class Mix(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(48, 48)

        def forward(self, x):
            return torch.nn.functional.layer_norm(self.lin(x), (48,))

    class Top(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = Mix(), Mix()

        def forward(self, x):
            return self.b(self.a(x)) + x

    torch.manual_seed(0)
    path = str(tmp_path / "f.onnx")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            Top(),
            (torch.zeros(1, 48),),
            path,
            opset_version=18,
            dynamo=False,
            input_names=["x"],
            output_names=["y"],
            export_modules_as_functions={Mix},
        )
    m = onnx.load(path)
    assert len(m.functions) >= 1
    x = _x(1, 48)
    want = _run(m, {"x": x})
    got_model = canonicalize.prepare(m, "f.onnx")
    assert not len(got_model.functions)
    assert all(n.domain in ("", "ai.onnx") for n in got_model.graph.node)
    np.testing.assert_allclose(_run(got_model, {"x": x}), want, rtol=1e-5, atol=1e-5)


def test_dynamo_row_lookup_becomes_a_gather():
    """torch's dynamo exporter writes table[token] as GatherND(table, Unsqueeze(token, [-1]))."""
    table = np.random.default_rng(3).standard_normal((7, 5)).astype(np.float32)
    nodes = [
        helper.make_node("Unsqueeze", ["token", "axes"], ["idx"]),
        helper.make_node("GatherND", ["table", "idx"], ["y"]),
    ]
    inits = [
        numpy_helper.from_array(table, "table"),
        numpy_helper.from_array(np.array([-1], np.int64), "axes"),
    ]
    m = _model(
        nodes,
        [helper.make_tensor_value_info("token", onnx.TensorProto.INT64, [1])],
        [_vi("y", [1, 5])],
        inits,
        opset=20,
        ir=10,
    )
    feed = {"token": np.array([4], np.int64)}
    want = _run(m, feed)
    got = canonicalize.prepare(onnx.ModelProto.FromString(m.SerializeToString()))
    assert [n.op_type for n in got.graph.node if n.op_type in ("Gather", "GatherND")] == ["Gather"]
    np.testing.assert_array_equal(_run(got, feed), want)
    np.testing.assert_array_equal(want[0], table[4])
