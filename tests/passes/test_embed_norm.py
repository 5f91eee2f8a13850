"""embed_norm: under w16a16i the LayerNorm after the token lookup is folded into the table (every
row then O(1), untrained rows too); the graph computes what it did for every token."""

import numpy as np
import pytest
from onnx import helper

from helpers.passes import const, ctx_from_onnx, model, run_ctx, vi
from rwkv2rknn.compiler.ir import Options
from rwkv2rknn.passes import embed_norm

V, C = 16, 8


def _graph(also_raw: bool = False):
    rng = np.random.default_rng(3)
    table = rng.standard_normal((V, C)).astype(np.float32) * 0.4
    table[::2] = rng.uniform(-1e-4, 1e-4, (V // 2, C))  # untrained rows, as RWKV-7 leaves them
    nodes = [
        helper.make_node("Gather", ["emb", "token"], ["row"], axis=0, name="embed/gather"),
        helper.make_node("ReduceMean", ["row"], ["mean"], axes=[-1], name="embed/mean"),
        helper.make_node("Sub", ["row", "mean"], ["sub"], name="embed/sub"),
        helper.make_node("Pow", ["sub", "two"], ["sq"], name="embed/pow"),
        helper.make_node("ReduceMean", ["sq"], ["var"], axes=[-1], name="embed/var"),
        helper.make_node("Add", ["var", "eps"], ["ve"], name="embed/eps"),
        helper.make_node("Sqrt", ["ve"], ["sd"], name="embed/sqrt"),
        helper.make_node("Div", ["sub", "sd"], ["norm"], name="embed/div"),
        helper.make_node("Mul", ["norm", "w"], ["scaled"], name="embed/mul"),
        helper.make_node("Add", ["scaled", "b"], ["x"], name="embed/add"),
        helper.make_node("Relu", ["x"], ["y"], name="L0/relu"),
    ]
    outs = [vi("y", [1, C])]
    if also_raw:  # the raw row read by something else too: nothing to fold
        nodes.append(helper.make_node("Neg", ["row"], ["raw"], name="L0/neg"))
        outs.append(vi("raw", [1, C]))
    inits = [
        const("emb", table),
        const("two", np.float32(2)),
        const("eps", np.float32(1e-5)),
        const("w", rng.uniform(0.5, 1.5, C).astype(np.float32)),
        const("b", rng.uniform(-0.1, 0.1, C).astype(np.float32)),
    ]
    return model(nodes, [vi("token", [1], 7)], outs, inits)


def _outputs(ctx):
    return [run_ctx(ctx, {"token": np.array([t], np.int64)}) for t in range(V)]


@pytest.mark.parametrize("quant, folded", [("w16a16i", True), ("fp16", False), ("w8a8", False)])
def test_the_layernorm_after_the_lookup_is_folded_into_the_table_for_w16a16i(quant, folded):
    ctx = ctx_from_onnx(_graph(), options=Options(quant=quant))
    want = _outputs(ctx)
    embed_norm.run(ctx)
    ops = [n.op for n in ctx.graph.nodes]
    assert (ops == ["Gather", "Relu"]) == folded and ("ReduceMean" in ops) != folded
    for g, w in zip(_outputs(ctx), want):
        np.testing.assert_allclose(g["y"], w["y"], rtol=1e-5, atol=1e-6)
    if folded:  # the untrained rows (|e| <= 1e-4) now hold the LayerNorm's output, >= 0.05 here
        table = next(n for n in ctx.graph.nodes if n.op == "Gather").inputs[0].values
        assert np.abs(table).max(axis=1).min() > 0.05
        assert any(embed_norm.NAME in r for r in ctx.report)


def test_a_row_read_elsewhere_too_is_left_as_it_is():
    ctx = ctx_from_onnx(_graph(also_raw=True), options=Options(quant="w16a16i"))
    embed_norm.run(ctx)
    assert "ReduceMean" in [n.op for n in ctx.graph.nodes]
