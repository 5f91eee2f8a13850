"""The compiler's shared types and graph helpers (rwkv2rknn/compiler/ir.py)."""

import numpy as np
import pytest

from rwkv2rknn.errors import BadInput
from rwkv2rknn.compiler.ir import Context, GraphSegment, Options, replace_uses, stages_of


def _graph():
    import onnx_graphsurgeon as gs

    a = gs.Variable("a", np.float32, [4])
    b = gs.Variable("b", np.float32, [4])
    c = gs.Variable("c", np.float32, [4])
    d = gs.Variable("d", np.float32, [4])
    relu = gs.Node("Relu", "relu", inputs=[a], outputs=[b])
    square = gs.Node("Mul", "L1/square", inputs=[b, b], outputs=[c])
    add = gs.Node("Add", "L0/add", inputs=[b, c], outputs=[d])
    return gs.Graph(nodes=[relu, square, add], inputs=[a], outputs=[b, d], opset=16), a, b


def test_replace_uses_rewires_every_reader_but_not_graph_outputs():
    graph, a, b = _graph()
    replace_uses(b, a)
    by_name = {n.name: n for n in graph.nodes}
    assert [t.name for t in by_name["L1/square"].inputs] == ["a", "a"]  # both uses of one node
    assert [t.name for t in by_name["L0/add"].inputs] == ["a", "c"]
    assert not b.outputs and b in graph.outputs  # graph outputs are the caller's business
    assert {n.name for n in a.outputs} == {"relu", "L1/square", "L0/add"}


def test_graph_segment_stages_in_model_order():
    graph, _, _ = _graph()
    head = type(graph.nodes[0])("Identity", "head/id")
    embed = type(graph.nodes[0])("Identity", "embed/id")
    l10 = type(graph.nodes[0])("Identity", "L10/id")
    seg = GraphSegment(device="npu", nodes=[head, l10] + list(graph.nodes) + [embed])
    assert seg.stages == ["embed", "L0", "L1", "L10", "head", "graph"]
    assert stages_of([]) == []
    assert seg.name == "" and seg.token.rknn is None and seg.seq.rows == ()  # filled in by later passes


def test_context_reads_its_profile_once_and_fails_on_a_bad_file(tmp_path):
    good = tmp_path / "p.json"
    good.write_text('{"name": "board-x", "handoff_ms": 0.5}')
    ctx = Context(graph=None, options=Options(profile=str(good)))
    assert ctx.profile.name == "board-x" and ctx.profile.handoff_ms == 0.5
    good.write_text("not json")
    assert ctx.profile.name == "board-x"  # read once
    assert Context(graph=None).profile.name == "rk3588-published"
    with pytest.raises(BadInput, match="device profile"):
        Context(graph=None, options=Options(profile=str(good))).profile


def test_toposort_chains_keeps_a_layernorm_in_one_run():
    """rknn-toolkit2 2.5.0 fuses a decomposed LayerNorm only when its nodes are neighbours; a
    source node placed between its ReduceMean and Sub made the toolkit fuse an RMS norm instead,
    and a T-row build of RWKV-5.2/6/7's embed..L0 segment then failed inside the toolkit."""
    import onnx_graphsurgeon as gs

    from rwkv2rknn.compiler.ir import toposort_chains

    def v(name):
        return gs.Variable(name, np.float32, [4])

    def c(name):
        return gs.Constant(name, np.ones(4, np.float32))

    x, s = v("x"), v("s")
    mean, sub, pw, var, sq, div, y = (v(n) for n in ("mean", "sub", "pw", "var", "sq", "div", "y"))
    row, z = v("row"), v("z")
    ln = [
        gs.Node("ReduceMean", "ln.mean", {"axes": [-1]}, [x], [mean]),
        gs.Node("Sub", "ln.sub", inputs=[x, mean], outputs=[sub]),
        gs.Node("Mul", "ln.pow", inputs=[sub, sub], outputs=[pw]),
        gs.Node("ReduceMean", "ln.var", {"axes": [-1]}, [pw], [var]),
        gs.Node("Sqrt", "ln.sqrt", inputs=[var], outputs=[sq]),
        gs.Node("Div", "ln.div", inputs=[sub, sq], outputs=[div]),
        gs.Node("Mul", "ln.scale", inputs=[div, c("w")], outputs=[y]),
    ]
    other = gs.Node("Neg", "as_row", inputs=[s], outputs=[row])
    mix = gs.Node("Add", "mix", inputs=[y, row], outputs=[z])
    # the order a breadth-first toposort gave: the unrelated source node second
    graph = gs.Graph(nodes=[ln[0], other] + ln[1:] + [mix], inputs=[x, s], outputs=[z, y], opset=17)
    toposort_chains(graph)
    names = [n.name for n in graph.nodes]
    start = names.index("ln.mean")
    assert names[start : start + len(ln)] == [n.name for n in ln]  # one run, in chain order
    seen = set()
    for n in graph.nodes:  # still topological
        assert all(t.name in ("x", "s", "w") or t.name in seen for t in n.inputs), n.name
        seen.update(t.name for t in n.outputs)
    assert len(graph.nodes) == len(ln) + 2
    graph.nodes.reverse()
    toposort_chains(graph)  # any starting order comes out producer first
    assert names.index("mix") == len(names) - 1 and [n.name for n in graph.nodes][-1] == "mix"


def test_toposort_chains_refuses_a_cycle():
    import onnx_graphsurgeon as gs

    from rwkv2rknn.compiler.ir import toposort_chains

    a, b = gs.Variable("a", np.float32, [4]), gs.Variable("b", np.float32, [4])
    graph = gs.Graph(
        nodes=[gs.Node("Neg", "n1", inputs=[b], outputs=[a]), gs.Node("Neg", "n2", inputs=[a], outputs=[b])],
        inputs=[],
        outputs=[a],
    )
    with pytest.raises(ValueError, match="cycle"):
        toposort_chains(graph)


def test_notes_are_read_by_their_fields_and_shown_as_lines():
    """A pass's note: code reads its kind and counts (``said``); people read ``report``."""
    ctx = Context(graph=None)
    first = ctx.note("support", "2 MatMuls for the NPU", kind="summary", anchor=2, flex=0, cpu=1)
    ctx.note("support", "L0: a remark")
    ctx.note("cut", "1 segment models cut", segment="s000_npu_L0")
    assert ctx.report == [
        "support: 2 MatMuls for the NPU",
        "support: L0: a remark",
        "cut: 1 segment models cut",
    ]
    assert ctx.said("support", "summary") == [first] and first.counts["cpu"] == 1
    assert [n.text for n in ctx.said("support")] == ["2 MatMuls for the NPU", "L0: a remark"]
    assert ctx.said("cut")[0].segment == "s000_npu_L0" and not ctx.said("build")
