"""The compiler's shared types and graph helpers (rwkv2rknn/ir.py)."""

import numpy as np
import pytest

from rwkv2rknn.errors import BadInput
from rwkv2rknn.ir import Context, GraphSegment, Options, replace_uses, stages_of


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
    assert seg.name == "" and seg.rknn is None and seg.seq_rows == ()  # filled in by later passes


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
