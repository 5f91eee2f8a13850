import numpy as np
from onnx import helper

from helpers import const, ctx_from_onnx, model, run_ctx, vi
from rwkv2rknn.passes import normalize_matmul


def test_matmul_becomes_row_form_with_same_numbers():
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((6, 5)).astype(np.float32)
    w2 = rng.standard_normal((3, 6)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["w1", "x"], ["h"], name="mm1"),
             helper.make_node("MatMul", ["w2", "h"], ["y"], name="mm2")]
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
