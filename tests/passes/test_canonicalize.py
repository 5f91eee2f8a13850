import numpy as np
import onnx
import pytest
from onnx import helper

from helpers.passes import const, ctx_from_onnx, run_ctx, vi
from rwkv2rknn.passes import canonicalize


def _model(nodes, inputs, outputs, inits=(), opset=17):
    m = helper.make_model(
        helper.make_graph(nodes, "g", inputs, outputs, list(inits)),
        opset_imports=[helper.make_opsetid("", opset)],
    )
    m.ir_version = 8
    return m


def _canonical(m):
    """As the loader and the pass do it: opset, Constant forms, then the pass."""
    m = canonicalize.to_opset(m)
    canonicalize.normalize_constant_nodes(m)
    ctx = ctx_from_onnx(m)
    canonicalize.run(ctx)
    return ctx


def _ort(m, feed):
    from rwkv2rknn.runtime.ort import OrtRunner

    return OrtRunner(m.SerializeToString()).infer(feed)


def test_gemm_becomes_matmul_with_trans_alpha_beta():
    from fixtures import gemm

    m = gemm.build()
    ctx = _canonical(m)
    assert "Gemm" not in [n.op for n in ctx.graph.nodes]
    assert sum(n.op == "MatMul" for n in ctx.graph.nodes) == 2
    x = np.random.default_rng(1).standard_normal((1, 64)).astype(np.float32)
    np.testing.assert_allclose(run_ctx(ctx, {"x": x})["y"], gemm.reference(m, x), rtol=1e-5, atol=1e-5)


def test_gemm_of_two_activations_with_trans_a():
    nodes = [helper.make_node("Gemm", ["a", "b", "c"], ["y"], transA=1, transB=1, alpha=2.0, beta=0.5)]
    m = _model(nodes, [vi("a", [3, 2]), vi("b", [4, 3]), vi("c", [4])], [vi("y", [2, 4])])
    rng = np.random.default_rng(2)
    feed = {
        "a": rng.standard_normal((3, 2)).astype(np.float32),
        "b": rng.standard_normal((4, 3)).astype(np.float32),
        "c": rng.standard_normal(4).astype(np.float32),
    }
    ctx = _canonical(m)
    assert "Gemm" not in [n.op for n in ctx.graph.nodes]
    np.testing.assert_allclose(run_ctx(ctx, feed)["y"], _ort(m, feed)["y"], rtol=1e-5)


def test_constant_nodes_in_every_form_fold_with_their_onnx_types():
    nodes = [
        helper.make_node("Constant", [], ["a"], value_float=2.0),
        helper.make_node("Constant", [], ["b"], value_ints=[1, 3]),
        helper.make_node("Cast", ["b"], ["bf"], to=1),
        helper.make_node("Mul", ["x", "a"], ["y0"]),
        helper.make_node("Add", ["y0", "bf"], ["y"]),
        helper.make_node("Constant", [], ["unread"], value_float=-1e30),
    ]
    m = _model(nodes, [vi("x", [2])], [vi("y", [2])])
    canonicalize.normalize_constant_nodes(m)
    assert canonicalize.dangling_constants(m)["unread"] == np.float32(-1e30)
    ctx = _canonical(m)
    assert [n.op for n in ctx.graph.nodes] == ["Mul", "Add"]
    assert all(t.dtype is not None for t in ctx.graph.tensors().values())
    np.testing.assert_array_equal(run_ctx(ctx, {"x": np.array([1, 2], np.float32)})["y"], [3, 7])


def test_shape_arithmetic_folds_once_symbolic_dims_are_pinned():
    # Shape -> Gather -> Unsqueeze -> Concat -> Reshape, with the input's dim symbolic
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "zero"], ["n"], axis=0),
        helper.make_node("Unsqueeze", ["n", "axes0"], ["n1"]),
        helper.make_node("Concat", ["one", "n1"], ["shape"], axis=0),
        helper.make_node("Reshape", ["x", "shape"], ["y"]),
    ]
    m = _model(
        nodes,
        [vi("x", ["width"])],
        [vi("y", [1, "width"])],
        [
            const("zero", np.array(0, np.int64)),
            const("axes0", np.array([0], np.int64)),
            const("one", np.array([1], np.int64)),
        ],
        opset=13,
    )
    ctx = ctx_from_onnx(canonicalize.to_opset(m))
    ctx.graph.inputs[0].shape = [5]  # the loader pins the decode shape
    canonicalize.run(ctx)
    (reshape,) = ctx.graph.nodes
    assert reshape.op == "Reshape" and list(reshape.inputs[1].values) == [1, 5]
    assert list(ctx.graph.outputs[0].shape) == [1, 5]


def test_unpinned_symbolic_dims_become_one():
    m = _model([helper.make_node("Relu", ["x"], ["y"])], [vi("x", ["batch", 4])], [vi("y", ["batch", 4])])
    ctx = _canonical(m)
    assert list(ctx.graph.inputs[0].shape) == [1, 4]
    assert "1 symbolic dim(s) pinned" in ctx.report[-1]


def test_reductions_get_explicit_axes_across_opsets():
    # opset 18: ReduceMean takes axes as an input; absent axes on a vector mean axis -1
    nodes = [
        helper.make_node("ReduceMean", ["x", "ax"], ["m"], keepdims=1),
        helper.make_node("ReduceMean", ["x"], ["m2"]),
        helper.make_node("ReduceSum", ["x"], ["s"]),
        helper.make_node("Add", ["m", "m2"], ["mm"]),
        helper.make_node("Add", ["mm", "s"], ["y"]),
    ]
    m = _model(nodes, [vi("x", [6])], [vi("y", [1])], [const("ax", np.array([0], np.int64))], opset=18)
    x = np.arange(6, dtype=np.float32)
    want = _ort(m, {"x": x})["y"]
    ctx = _canonical(m)
    means = [n for n in ctx.graph.nodes if n.op == "ReduceMean"]
    assert [n.attrs.get("axes") for n in means] == [[0], [-1]]
    (rsum,) = [n for n in ctx.graph.nodes if n.op == "ReduceSum"]
    assert list(rsum.inputs[1].values) == [-1]
    np.testing.assert_allclose(run_ctx(ctx, {"x": x})["y"], want)


def test_layer_normalization_is_decomposed():
    nodes = [helper.make_node("LayerNormalization", ["x", "w", "b"], ["y"], axis=-1, epsilon=1e-5)]
    rng = np.random.default_rng(3)
    m = _model(
        nodes,
        [vi("x", [8])],
        [vi("y", [8])],
        [
            const("w", rng.standard_normal(8).astype(np.float32)),
            const("b", rng.standard_normal(8).astype(np.float32)),
        ],
    )
    x = rng.standard_normal(8).astype(np.float32)
    ctx = _canonical(m)
    ops = [n.op for n in ctx.graph.nodes]
    assert "LayerNormalization" not in ops and ops.count("ReduceMean") == 2
    np.testing.assert_allclose(run_ctx(ctx, {"x": x})["y"], _ort(m, {"x": x})["y"], rtol=1e-5, atol=1e-6)


def test_identity_chains_go_and_output_names_stay():
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("Identity", ["r"], ["i1"]),
        helper.make_node("Identity", ["i1"], ["y"]),
        helper.make_node("Identity", ["x"], ["z"]),
    ]
    m = _model(nodes, [vi("x", [3])], [vi("y", [3]), vi("z", [3])])
    ctx = _canonical(m)
    assert [n.op for n in ctx.graph.nodes] == ["Relu", "Identity"]  # input -> output stays
    assert [t.name for t in ctx.graph.outputs] == ["y", "z"]


def test_opsets_outside_13_to_18_are_refused():
    from rwkv2rknn.errors import UnsupportedModel

    m = _model([helper.make_node("Relu", ["x"], ["y"])], [vi("x", [3])], [vi("y", [3])], opset=9)
    with pytest.raises(UnsupportedModel, match="opset 9"):
        canonicalize.to_opset(m)


def test_torch_export_leaves_every_tensor_typed(tmp_path):
    """A torch.onnx file with dynamic axes: after load and canonicalize nothing is untyped and no
    shape arithmetic is left."""
    from fixtures.torch_layers import export_torch
    from rwkv2rknn.models.checkpoint import random_checkpoint
    from rwkv2rknn.passes import load

    sd = random_checkpoint(layers=1, width=16, vocab=11, seed=0)
    src = export_torch(sd, str(tmp_path / "src"), opset=16, dynamic=True)
    assert "Shape" in [n.op_type for n in onnx.load(str(tmp_path / "src" / "embed.onnx")).graph.node]
    ctx = load.run(src)
    canonicalize.run(ctx)
    assert all(t.dtype is not None for t in ctx.graph.tensors().values())
    from rwkv2rknn.compiler.ir import const_value

    assert "Shape" not in [n.op for n in ctx.graph.nodes]
    assert all(const_value(n.inputs[1]) is not None for n in ctx.graph.nodes if n.op == "Reshape")


def _weighted(opset, op):
    """x[1, 64] @ W[64, 64] (16 KB of weights), then ``op`` with a bias: at ``opset``."""
    rng = np.random.default_rng(3)
    w = onnx.numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), "w")
    b = onnx.numpy_helper.from_array(rng.standard_normal(64).astype(np.float32), "b")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node(op, ["h", "b"], ["y"])]
    return _model(nodes, [vi("x", [1, 64])], [vi("y", [1, 64])], [w, b], opset=opset)


@pytest.mark.parametrize("opset,op", [(13, "Add"), (13, "Pow"), (14, "Pow")])
def test_conversion_with_weights_lifted_out_matches_the_converters(opset, op):
    """An op whose definition changed after ``opset`` (Add 14, Pow 15, ...) goes through
    onnx.version_converter with the weights' bytes taken out and put back: the result is the
    converter's own on the whole model, and the model handed in keeps its weights."""
    from onnx import version_converter

    m = _weighted(opset, op)
    want = version_converter.convert_version(_weighted(opset, op), canonicalize.OPSET)
    got = canonicalize.to_opset(m)
    assert got == want
    assert m == _weighted(opset, op)
    x = np.random.default_rng(4).standard_normal((1, 64)).astype(np.float32)
    np.testing.assert_allclose(_ort(got, {"x": x})["y"], _ort(want, {"x": x})["y"])


def test_unchanged_ops_only_take_the_new_opset_number():
    """No op of the file changed between its opset and ours: the model is kept as it is, with
    our opset number (what the converter would have made of it, without copying its weights)."""
    from onnx import version_converter

    m = _weighted(14, "Mul")
    assert m.opset_import[0].version == 14
    got = canonicalize.to_opset(m)
    want = version_converter.convert_version(_weighted(14, "Mul"), canonicalize.OPSET)
    assert got.opset_import[0].version == canonicalize.OPSET
    assert got.graph.node == want.graph.node and got.graph.initializer == want.graph.initializer
