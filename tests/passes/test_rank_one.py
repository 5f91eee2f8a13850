"""rank_one: ``S @ (u v)`` -> ``(S @ u) @ v`` and ``(u v) @ S`` -> ``u @ (v @ S)`` for a column u
[.., N, 1] and a row v [.., 1, M]; the graph's outputs stay those of the original on onnxruntime,
and RWKV-7 written as the `rwkv` package writes its state update (``state @ ab``) gets the NPU
share of our own export."""

import numpy as np
import pytest
from onnx import helper

from helpers.passes import ctx_from_onnx, run_ctx, vi
from rwkv2rknn.passes import rank_one


def _graph(left: bool, shared: bool = False):
    h, n = 2, 8
    nodes = [
        helper.make_node("MatMul", ["u", "v"], ["ab"], name="outer"),
        helper.make_node("MatMul", ["ab", "s"] if left else ["s", "ab"], ["y"], name="mm"),
    ]
    outs = [vi("y", [h, n, n])]
    if shared:  # ab read by another node too: it stays
        nodes.append(helper.make_node("Relu", ["ab"], ["z"], name="relu"))
        outs.append(vi("z", [h, n, n]))
    m = helper.make_model(
        helper.make_graph(nodes, "g", [vi("s", [h, n, n]), vi("u", [h, n, 1]), vi("v", [h, 1, n])], outs),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    m.ir_version = 8
    return m


@pytest.mark.parametrize("left", [False, True], ids=["state_at_ab", "ab_at_state"])
@pytest.mark.parametrize("shared", [False, True], ids=["alone", "ab_read_elsewhere"])
def test_product_with_a_rank_one_matrix_becomes_two_thin_products(left, shared):
    rng = np.random.default_rng(0)
    feed = {
        "s": rng.standard_normal((2, 8, 8)).astype(np.float32),
        "u": rng.standard_normal((2, 8, 1)).astype(np.float32),
        "v": rng.standard_normal((2, 1, 8)).astype(np.float32),
    }
    ctx = ctx_from_onnx(_graph(left, shared))
    want = run_ctx(ctx, feed)
    rank_one.run(ctx)
    mms = [n for n in ctx.graph.nodes if n.op == "MatMul"]
    shapes = sorted(tuple(n.outputs[0].shape) for n in mms)
    # the [2, 8, 8] x [2, 8, 8] product is gone: two thin ones (+ the outer product if still read)
    assert all(
        1 in (n.inputs[0].shape[-1], n.inputs[1].shape[-2])
        or 1 in (n.inputs[0].shape[-2], n.inputs[1].shape[-1])
        for n in mms
    ), shapes
    assert len(mms) == (3 if shared else 2)
    assert any("rank_one" in r for r in ctx.report)
    got = run_ctx(ctx, feed)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-5)


def test_a_product_of_two_full_matrices_is_left_alone():
    m = helper.make_model(
        helper.make_graph(
            [helper.make_node("MatMul", ["a", "b"], ["ab"]), helper.make_node("MatMul", ["s", "ab"], ["y"])],
            "g",
            [vi("s", [2, 8, 8]), vi("a", [2, 8, 2]), vi("b", [2, 2, 8])],
            [vi("y", [2, 8, 8])],
        ),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    m.ir_version = 8
    ctx = ctx_from_onnx(m)
    rank_one.run(ctx)
    assert len(ctx.graph.nodes) == 2 and not ctx.report


@pytest.mark.slow
def test_state_at_ab_gets_the_npu_share_of_our_own_export(tmp_path):
    """The same RWKV-7 checkpoint: our per-layer export and a torch file with ``state @ ab``."""
    from fixtures.slot_onefile import export_entries
    from rwkv2rknn.compiler.driver import compile_model
    from rwkv2rknn.compiler.ir import Options
    from rwkv2rknn.models.checkpoint import random_rwkv7
    from rwkv2rknn.models.export import export
    from rwkv2rknn.runtime.hybrid import HybridModel

    sd = random_rwkv7(layers=2, width=128, vocab=101, seed=3)
    export(sd, str(tmp_path / "ours"), fp32=True)
    src = export_entries(sd, str(tmp_path / "m.onnx"), "7", opset=17)
    plan = Options(plan_only=True, prefill_rows=())
    ours = compile_model(str(tmp_path / "ours"), str(tmp_path / "a1"), plan)
    theirs = compile_model(src, str(tmp_path / "a2"), plan)
    assert any(r.startswith("rank_one: 2 product(s)") for r in theirs.report)
    assert theirs.npu_flop_share() == pytest.approx(ours.npu_flop_share(), abs=1e-3)
    assert theirs.npu_flop_share() > 0.85  # 30% before the pass
    tokens = [1, 5, 9, 2]
    np.testing.assert_allclose(
        HybridModel(str(tmp_path / "a2")).logits(tokens),
        HybridModel(str(tmp_path / "a1")).logits(tokens),
        rtol=1e-4,
        atol=1e-4,
    )
