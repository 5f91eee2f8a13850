"""The partitioner on graphs small enough to reason about, and on a whole exported model."""

import numpy as np
import onnx_graphsurgeon as gs

from rwkv2rknn.compiler.ir import Context
from rwkv2rknn.passes import partition


def _chain(spec):
    """spec: list of (name, kind) in a line x -> n0 -> n1 -> ...; MatMuls get a weight."""
    x = gs.Variable("x", dtype=np.float32, shape=[1, 8])
    nodes, t = [], x
    for name, op in spec:
        out = gs.Variable(name + "_out", dtype=np.float32, shape=[1, 8])
        ins = [t, gs.Constant(name + "_w", np.eye(8, dtype=np.float32))] if op == "MatMul" else [t]
        nodes.append(gs.Node(op, name=name, inputs=ins, outputs=[out]))
        t = out
    g = gs.Graph(nodes=nodes, inputs=[x], outputs=[t])
    return g


def _support(graph):
    from rwkv2rknn.passes.support import classify

    return {n.name: classify(n, False) for n in graph.nodes}


def test_neighbours_join_their_matmul_and_exp_splits():
    g = _chain(
        [
            ("ln", "Sigmoid"),
            ("mm1", "MatMul"),
            ("act", "Relu"),
            ("e", "Exp"),
            ("after", "Sigmoid"),
            ("mm2", "MatMul"),
            ("tail", "Relu"),
        ]
    )
    ctx = Context(graph=g)
    ctx.support = _support(g)
    ctx.options.min_segment_flops = 0
    partition.run(ctx)
    got = [(s.device, [n.name for n in s.nodes]) for s in ctx.segments]
    assert got == [("npu", ["ln", "mm1", "act"]), ("cpu", ["e"]), ("npu", ["after", "mm2", "tail"])]


def test_small_npu_segment_is_pruned_to_cpu():
    g = _chain([("mm1", "MatMul"), ("e", "Exp"), ("mm2", "MatMul")])
    ctx = Context(graph=g)
    ctx.support = _support(g)
    ctx.options.min_segment_flops = 10**9
    partition.run(ctx)
    assert [s.device for s in ctx.segments] == ["cpu"]
    assert "too small" in ctx.report[-1]
    # what the streamed compile reads: the note's count, not its words
    (note,) = ctx.said("partition", "summary")
    assert note.counts == {"segments": 1, "npu": 0, "cpu": 1, "pruned": 2}  # mm1 and mm2


def test_parallel_branches_merge_without_cycle():
    # x -> mmA -> e(Exp) -> mmB ; x -> mmC (independent): mmC can join either NPU group, no cycle
    x = gs.Variable("x", dtype=np.float32, shape=[1, 4])
    w = lambda n: gs.Constant(n, np.eye(4, dtype=np.float32))  # noqa: E731
    a, e, b, c = (gs.Variable(n, dtype=np.float32, shape=[1, 4]) for n in "aebc")
    nodes = [
        gs.Node("MatMul", "mmA", inputs=[x, w("wa")], outputs=[a]),
        gs.Node("Exp", "exp", inputs=[a], outputs=[e]),
        gs.Node("MatMul", "mmB", inputs=[e, w("wb")], outputs=[b]),
        gs.Node("MatMul", "mmC", inputs=[x, w("wc")], outputs=[c]),
    ]
    g = gs.Graph(nodes=nodes, inputs=[x], outputs=[b, c])
    g.toposort()
    ctx = Context(graph=g)
    ctx.support = _support(g)
    ctx.options.min_segment_flops = 0
    partition.run(ctx)
    assert [s.device for s in ctx.segments] == ["npu", "cpu", "npu"]
    seen = set()
    for s in ctx.segments:  # every input is made earlier or is a graph input
        for n in s.nodes:
            for t in n.inputs:
                if isinstance(t, gs.Variable) and t.inputs:
                    assert t.inputs[0].name in seen or t.inputs[0] in s.nodes
        seen |= {n.name for n in s.nodes}


def test_the_head_gets_an_npu_segment_of_its_own():
    """The last layer's NPU tail and the head's MatMul would be one segment; the head is split
    off (a prompt needs its logits on the last row only), after the rest."""
    g = _chain(
        [
            ("L0/e", "Exp"),
            ("L0/mm", "MatMul"),
            ("L0/act", "Relu"),
            ("head/ln", "Sigmoid"),
            ("head/mm", "MatMul"),
        ]
    )
    ctx = Context(graph=g)
    ctx.support = _support(g)
    ctx.options.min_segment_flops = 0
    partition.run(ctx)
    got = [(s.device, [n.name for n in s.nodes]) for s in ctx.segments]
    assert got == [("cpu", ["L0/e"]), ("npu", ["L0/mm", "L0/act"]), ("npu", ["head/ln", "head/mm"])]
    assert "the head in an NPU segment of its own" in ctx.report[-1]


def test_the_head_stays_fused_where_a_part_would_not_pay_for_a_call():
    # the rest has no MatMul: one segment, as before
    g = _chain([("L0/e", "Exp"), ("L0/act", "Relu"), ("head/mm", "MatMul")])
    ctx = Context(graph=g)
    ctx.support = _support(g)
    ctx.options.min_segment_flops = 0
    partition.run(ctx)
    assert [[n.name for n in s.nodes] for s in ctx.segments if s.device == "npu"] == [["L0/act", "head/mm"]]
    # a head MatMul below the smallest segment worth a call: not split either
    g = _chain([("L0/mm", "MatMul"), ("head/mm", "MatMul")])
    segs, split = partition.split_head(
        partition.group(g, {"L0/mm": "npu", "head/mm": "npu"}), min_flops=2 * 8 * 8 + 1
    )
    assert not split and len(segs) == 1
    segs, split = partition.split_head(
        partition.group(g, {"L0/mm": "npu", "head/mm": "npu"}), min_flops=2 * 8 * 8
    )
    assert split and [[n.name for n in s.nodes] for s in segs] == [["L0/mm"], ["head/mm"]]
