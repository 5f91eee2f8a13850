import numpy as np
from onnx import helper

from helpers.passes import const, ctx_from_onnx, model, run_ctx, vi
from rwkv2rknn.passes import normalize_matmul


def test_matmul_becomes_row_form_with_same_numbers():
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((6, 5)).astype(np.float32)
    w2 = rng.standard_normal((3, 6)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["w1", "x"], ["h"], name="mm1"),
        helper.make_node("MatMul", ["w2", "h"], ["y"], name="mm2"),
    ]
    m = model(nodes, [vi("x", [5])], [vi("y", [3])], [const("w1", w1), const("w2", w2)])
    ctx = ctx_from_onnx(m)
    normalize_matmul.run(ctx)
    mms = [n for n in ctx.graph.nodes if n.op == "MatMul"]
    assert len(mms) == 2
    for n in mms:
        assert n.inputs[0].shape[0] == 1  # a row vector first
        assert np.asarray(n.inputs[1].values).ndim == 2  # the transposed weight second
    # the Reshape back to a vector between the two MatMuls is folded away
    assert sum(n.op == "Reshape" for n in ctx.graph.nodes) == 3
    x = rng.standard_normal(5).astype(np.float32)
    y = run_ctx(ctx, {"x": x})["y"]
    np.testing.assert_allclose(y, w2 @ (w1 @ x), rtol=1e-5, atol=1e-5)
    assert y.shape == (3,)


def test_fp16_weights_are_widened_once_for_their_transpose():
    """keep_fp32 widens a weight of MatMul(W, x) column-major, so normalize_matmul's W^T is a
    view of that one fp32 copy, not a second one; a weight also read otherwise stays C-ordered.
    The numbers are those of the fp16 weights, widened."""
    from rwkv2rknn.passes import keep_fp32

    rng = np.random.default_rng(1)
    w1 = rng.standard_normal((40, 33)).astype(np.float16)  # odd sizes: not a multiple of a band
    w2 = rng.standard_normal((7, 40)).astype(np.float16)
    nodes = [
        helper.make_node("MatMul", ["w1", "x"], ["h"], name="mm1"),
        helper.make_node("MatMul", ["w2", "h"], ["y"], name="mm2"),
        helper.make_node("ReduceMax", ["w2"], ["m"], name="other", keepdims=0),
    ]
    m = model(nodes, [vi("x", [33])], [vi("y", [7]), vi("m", [], 1)], [const("w1", w1), const("w2", w2)])
    ctx = ctx_from_onnx(m)
    keep_fp32.run(ctx)
    widened = {t.name: t.values for t in ctx.graph.tensors().values() if t.name in ("w1", "w2")}
    assert widened["w1"].flags.f_contiguous and not widened["w1"].flags.c_contiguous
    assert widened["w2"].flags.c_contiguous  # ReduceMax reads it too
    normalize_matmul.run(ctx)
    mms = {n.name: n for n in ctx.graph.nodes if n.op == "MatMul"}
    t1, t2 = (np.asarray(mms[k].inputs[1].values) for k in ("mm1", "mm2"))
    assert t1.flags.c_contiguous and np.shares_memory(t1, widened["w1"])
    assert t2.flags.c_contiguous and not np.shares_memory(t2, widened["w2"])
    np.testing.assert_array_equal(t1, w1.astype(np.float32).T)
    np.testing.assert_array_equal(t2, w2.astype(np.float32).T)
    x = rng.standard_normal(33).astype(np.float32)
    want = w2.astype(np.float32) @ (w1.astype(np.float32) @ x)
    np.testing.assert_allclose(run_ctx(ctx, {"x": x})["y"], want, rtol=1e-5, atol=1e-5)


def _group_norm_of_heads(shape, allowzero=None):
    """A head-wise result h[4, 16] viewed as one row [1, 64], then the legacy torch exporter's
    GroupNorm of it: Reshape(shape) -> InstanceNormalization -> Reshape [1, 64] (4 groups of 16)."""
    rng = np.random.default_rng(2)
    attrs = {} if allowzero is None else {"allowzero": allowzero}
    nodes = [
        helper.make_node("Reshape", ["h", "row"], ["flat"], name="flat"),
        helper.make_node("Reshape", ["flat", "gshape"], ["g"], name="groups", **attrs),
        helper.make_node("InstanceNormalization", ["g", "scale", "bias"], ["n"], name="norm", epsilon=1e-5),
        helper.make_node("Reshape", ["n", "row"], ["out"], name="ungroup"),
    ]
    inits = [
        const("row", np.array([1, 64], np.int64)),
        const("gshape", np.array(shape, np.int64)),
        const("scale", np.ones(4, np.float32)),
        const("bias", np.zeros(4, np.float32)),
    ]
    m = model(nodes, [vi("h", [4, 16])], [vi("out", [1, 64])], inits)
    h = (rng.standard_normal((4, 16)) * np.arange(1, 17)).astype(np.float32)
    y = h.reshape(4, 16)
    want = ((y - y.mean(1, keepdims=True)) / np.sqrt(y.var(1, keepdims=True) + 1e-5)).reshape(1, 64)
    return m, h, want


def test_reshape_with_a_copied_dimension_is_not_folded_onto_another_input():
    """``Reshape [0, H, -1]`` copies dimension 0 of *its* input ([1, 64]: 1). Folded onto the
    input of the Reshape before it ([4, 16]), the 0 would copy 4 and the norm would run over
    groups of 4 instead of 16 (the legacy exporter's GroupNorm, once miscompiled this way)."""
    m, h, want = _group_norm_of_heads([0, 4, -1])
    np.testing.assert_allclose(run_ctx(ctx_from_onnx(m), {"h": h})["out"], want, rtol=1e-4, atol=1e-4)
    ctx = ctx_from_onnx(m)
    normalize_matmul.run(ctx)
    np.testing.assert_allclose(run_ctx(ctx, {"h": h})["out"], want, rtol=1e-4, atol=1e-4)


def test_reshape_to_plain_sizes_is_still_folded():
    """A shape of plain sizes and -1 (or a 0 that means zero, allowzero=1) does not depend on
    its input's shape: the chain is folded and the numbers stay."""
    for shape, allowzero in (([1, 4, -1], None), ([1, 4, 16], 1)):
        m, h, want = _group_norm_of_heads(shape, allowzero)
        ctx = ctx_from_onnx(m)
        normalize_matmul.run(ctx)
        groups = next(n for n in ctx.graph.nodes if n.name == "groups")
        assert groups.inputs[0].name == "h"
        np.testing.assert_allclose(run_ctx(ctx, {"h": h})["out"], want, rtol=1e-4, atol=1e-4)


def test_matmul_with_a_column_activation_keeps_its_output_shape():
    """MatMul(W[n, k], x[k, 1]) gives [n, 1]: the row form gives the same shape back."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((6, 5)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["w", "x"], ["y"], name="mm")]
    m = model(nodes, [vi("x", [5, 1])], [vi("y", [6, 1])], [const("w", w)])
    ctx = ctx_from_onnx(m)
    normalize_matmul.run(ctx)
    x = rng.standard_normal((5, 1)).astype(np.float32)
    y = run_ctx(ctx, {"x": x})["y"]
    assert y.shape == (6, 1)
    np.testing.assert_allclose(y, w @ x, rtol=1e-5, atol=1e-5)


def test_matmul_with_a_matrix_activation_is_left_alone():
    """MatMul(W[n, k], x[k, 3]) is no matrix-vector product: it is not rewritten."""
    rng = np.random.default_rng(4)
    w = rng.standard_normal((6, 5)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["w", "x"], ["y"], name="mm")]
    m = model(nodes, [vi("x", [5, 3])], [vi("y", [6, 3])], [const("w", w)])
    ctx = ctx_from_onnx(m)
    normalize_matmul.run(ctx)
    x = rng.standard_normal((5, 3)).astype(np.float32)
    np.testing.assert_allclose(run_ctx(ctx, {"x": x})["y"], w @ x, rtol=1e-5, atol=1e-5)
