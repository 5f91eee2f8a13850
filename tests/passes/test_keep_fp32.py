import numpy as np
from onnx import helper

from helpers.passes import const, ctx_from_onnx, model, run_ctx, vi
from rwkv2rknn.passes import canonicalize, keep_fp32


def test_removes_cast_islands_and_fp16_constants():
    # x(fp16) * w(fp16) -> Cast fp32 -> Max(., 0) -> Cast fp16 -> y
    nodes = [
        helper.make_node("Mul", ["x", "w"], ["a"], name="mul"),
        helper.make_node("Cast", ["a"], ["a32"], name="c1", to=1),
        helper.make_node("Max", ["a32", "zero"], ["m"], name="max"),
        helper.make_node("Cast", ["m"], ["y"], name="c2", to=10),
    ]
    m = model(
        nodes,
        [vi("x", [4], 10)],
        [vi("y", [4], 10)],
        [const("w", np.array([1, -2, 3, -4], np.float16)), const("zero", np.float32(0))],
    )
    ctx = ctx_from_onnx(m)
    canonicalize.run(ctx)  # the precondition: every tensor typed
    keep_fp32.run(ctx)
    ops = [n.op for n in ctx.graph.nodes]
    assert ops == ["Mul", "Max"]
    assert ctx.graph.outputs[0].name == "y"
    assert np.dtype(ctx.graph.inputs[0].dtype) == np.float32
    assert "2 Cast nodes removed" in ctx.report[-1] and "1 fp16 constants" in ctx.report[-1]
    y = run_ctx(ctx, {"x": np.array([1, 1, 1, 1], np.float32)})["y"]
    assert y.dtype == np.float32
    np.testing.assert_array_equal(y, [1, 0, 3, 0])


def test_fp32_graph_is_left_alone():
    nodes = [helper.make_node("Relu", ["x"], ["y"], name="r")]
    ctx = ctx_from_onnx(model(nodes, [vi("x", [3])], [vi("y", [3])]))
    keep_fp32.run(ctx)
    assert [n.op for n in ctx.graph.nodes] == ["Relu"]
    assert "nothing to change" in ctx.report[-1]


def test_cast_of_an_integer_to_float_is_kept():
    """Shape -> Gather -> Cast(to=FLOAT) -> Mul: the Cast turns an integer into a float, it stays
    (also when the graph came without intermediate types: canonicalize types them first)."""
    nodes = [
        helper.make_node("Shape", ["x"], ["s"], name="shape"),
        helper.make_node("Gather", ["s", "zero_i"], ["n"], name="gather", axis=0),
        helper.make_node("Cast", ["n"], ["nf"], name="cast", to=1),
        helper.make_node("Mul", ["x", "nf"], ["y"], name="mul"),
    ]
    m = model(nodes, [vi("x", ["width"])], [vi("y", ["width"])], [const("zero_i", np.array(0, np.int64))])
    ctx = ctx_from_onnx(m)
    ctx.graph.inputs[0].shape = [3]  # as a loader pins the decode shape
    canonicalize.run(ctx)
    keep_fp32.run(ctx)
    y = run_ctx(ctx, {"x": np.array([1, 2, 3], np.float32)})["y"]
    np.testing.assert_array_equal(y, [3, 6, 9])
