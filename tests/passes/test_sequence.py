"""The sequence pass: which segments take T rows, and T-row variants equal to their per-token
graph row by row (passes/sequence.py)."""

import numpy as np
from onnx import helper, shape_inference

from helpers.passes import const, ctx_from_onnx, model, vi

RNG = np.random.default_rng(0)


def _segment(nodes, inputs, outputs, inits):
    """A context whose graph is one NPU segment of the given per-token nodes."""
    from rwkv2rknn.compiler.ir import GraphSegment, Variant, export

    m = shape_inference.infer_shapes(model(nodes, inputs, outputs, inits))
    ctx = ctx_from_onnx(m)
    seg = GraphSegment(
        device="npu",
        nodes=list(ctx.graph.nodes),
        name="s001_npu_L0",
        inputs=[t.name for t in ctx.graph.inputs],
        outputs=[t.name for t in ctx.graph.outputs],
        token=Variant(export(ctx.graph)),
    )
    return ctx, seg


def _lora_split(shape, axis):
    """x [1, 1, 8] (an exporter's [batch, sequence, C] row) -> scale by a [1, 1, 8] constant ->
    mean over the last axis -> a [8, 6] projection -> Reshape to ``shape`` -> Split on ``axis``
    into 3 -> each piece back to a row, summed."""
    parts = [f"p{i}" for i in range(3)]
    nodes = [
        helper.make_node("Mul", ["x", "scale"], ["xs"]),
        helper.make_node("ReduceMean", ["xs"], ["mu"], axes=[2]),
        helper.make_node("Sub", ["xs", "mu"], ["xc"]),
        helper.make_node("Reshape", ["xc", "flat"], ["x2"]),
        helper.make_node("MatMul", ["x2", "W"], ["h"]),
        helper.make_node("Reshape", ["h", "heads"], ["h3"]),
        helper.make_node("Split", ["h3"], parts, axis=axis),
    ]
    nodes += [helper.make_node("Reshape", [p, "row"], [p + "r"]) for p in parts]
    nodes += [
        helper.make_node("Add", ["p0r", "p1r"], ["s01"]),
        helper.make_node("Add", ["s01", "p2r"], ["y"]),
    ]
    inits = [
        const("scale", RNG.standard_normal((1, 1, 8)).astype(np.float32)),
        const("flat", np.array([1, 8])),
        const("W", RNG.standard_normal((8, 6)).astype(np.float32)),
        const("heads", np.array(shape)),
        const("row", np.array([1, 2])),
    ]
    return _segment(nodes, [vi("x", [1, 1, 8])], [vi("y", [1, 2]), vi("xc", [1, 1, 8])], inits)


def test_a_split_lora_and_rank_3_rows_take_t_rows():
    from rwkv2rknn.passes import sequence
    from rwkv2rknn.runtime.ort import OrtRunner

    for shape, axis in (([3, 1, 2], 0), ([1, 3, 2], 1), ([3, 2], 0)):
        ctx, seg = _lora_split(shape, axis)
        assert sequence.run_one(ctx, seg) is None, shape
        assert [n.op_type for n in seg.seq.model.graph.node].count("Split") == 1
        x = RNG.standard_normal((5, 8)).astype(np.float32)
        one = OrtRunner(seg.token.model.SerializeToString())
        many = OrtRunner(seg.seq.model.SerializeToString()).infer({"x": x})
        for t in range(5):
            row = one.infer({"x": x[t].reshape(1, 1, 8)})
            np.testing.assert_allclose(many["y"][t], row["y"].reshape(-1), rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(many["xc"][t], row["xc"].reshape(-1), rtol=1e-5, atol=1e-6)


def test_splits_across_rows_stay_per_token():
    from rwkv2rknn.passes import sequence

    ctx, seg = _lora_split([2, 3], 1)  # [2, 3] split on its last axis: not one row's pieces
    assert sequence.run_one(ctx, seg) == "Reshape that is not to a vector or a row"
    assert seg.seq.model is None


def test_a_variant_made_of_the_per_token_model_is_the_copied_one():
    """``take=True`` (the streamed compile, which has written the per-token model) builds the
    T-row variant in the per-token ModelProto itself, its two large weights moved rather than
    copied: the bytes are those of the variant exported whole."""
    from rwkv2rknn.passes import sequence

    nodes = [
        helper.make_node("Mul", ["x", "scale"], ["xs"]),
        helper.make_node("Reshape", ["xs", "flat"], ["x2"]),
        helper.make_node("MatMul", ["x2", "W1"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("MatMul", ["r", "W2"], ["y"]),
    ]
    inits = [
        const("scale", RNG.standard_normal((1, 1, 96)).astype(np.float32)),  # rank 3: read
        const("flat", np.array([1, 96])),
        const("W1", RNG.standard_normal((96, 200)).astype(np.float32)),  # 75 KB each
        const("W2", RNG.standard_normal((200, 96)).astype(np.float32)),
    ]
    ctx, seg = _segment(nodes, [vi("x", [1, 1, 96])], [vi("y", [1, 96])], inits)
    copied = sequence._variant(ctx, seg).SerializeToString()
    per_token = seg.token.model
    assert sequence.run_one(ctx, seg, take=True) is None
    assert seg.seq.model is per_token  # the same message, now the variant
    assert seg.seq.model.SerializeToString() == copied
    assert sorted(t.name for t in seg.seq.model.graph.initializer if t.ByteSize() > 1 << 16) == ["W1", "W2"]
