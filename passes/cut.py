"""cut: every segment becomes its own ONNX model, with deterministic names and ordered I/O.

::

    [ ... a -> (seg 3: nodes) -> b ... ]   =>   s003_npu_L0-L1.onnx : inputs (a, ...) outputs (b, ...)

A segment's inputs are the tensors its nodes read that are made elsewhere (another segment or a
graph input), in the order of first use; its outputs are the tensors it makes that something
else reads (another segment or a graph output), in the order they are made. Names come from the
segment's position, device and the stages it covers, so the same model cuts to the same files
(and the build cache can key on their content). A segment's nodes are written depth first
(``ir.toposort_chains``): the graph's own order is by depth, which can put an unrelated node
between a decomposed LayerNorm's ReduceMean and Sub (a torch.onnx export of a block that mixes
in the token shift does), and rknn-toolkit2 2.5.0 then fuses an RMS norm plus separate ops
instead of one LayerNorm.

Precondition: partition has run. Postcondition: each segment has ``name``, ``inputs``,
``outputs``, ``model`` (an ONNX ModelProto), its op counts and ``est_ms``.
"""

from __future__ import annotations

import numpy as np

from rwkv2rknn.compiler.ir import Context, GraphSegment, export, is_const, stages_of, toposort_chains
from rwkv2rknn.passes.partition import MATMUL_LIKE, estimate_ms, matmul_flops

NAME = "cut"
MOVE_ABOVE = 1 << 16  # bytes: weights a streaming cut moves into the segment's model


def _stages_label(nodes) -> str:
    stages = stages_of(nodes)
    return stages[0] if len(stages) == 1 else f"{stages[0]}-{stages[-1]}"


def run(ctx: Context) -> None:
    graph = ctx.graph
    graph_outputs = {t.name for t in graph.outputs}
    owner = {n.name: i for i, s in enumerate(ctx.segments) for n in s.nodes}
    width = len(str(max(len(ctx.segments) - 1, 0))) if ctx.segments else 1
    for i, seg in enumerate(ctx.segments):
        cut_one(ctx, seg, i, i, owner, graph_outputs, width)
    ctx.note(NAME, f"{len(ctx.segments)} segment models cut")


def cut_one(
    ctx: Context,
    seg: GraphSegment,
    index: int,
    number: int,
    owner,
    graph_outputs,
    width: int = 3,
    move_weights: bool = False,
) -> None:
    """Cut one segment of ``ctx.graph``: ``index`` is its place in ``owner`` (node name ->
    segment index), ``number`` its place in the model (its name). A streaming compile cuts
    segment by segment as they are final, and ``move_weights`` there: the large weights only
    this segment reads move into its model (the nodes keep zero-strided arrays of their shape),
    so that no weight is held three times (array, its bytes, the model's copy) at once."""
    import onnx_graphsurgeon as gs

    nodes = seg.nodes
    inside = {n.name for n in nodes}
    ins, outs = [], []
    for n in nodes:
        for t in n.inputs:
            if is_const(t) or t in ins:
                continue
            if not t.inputs or t.inputs[0].name not in inside:
                ins.append(t)
    for n in nodes:
        for t in n.outputs:
            used_outside = any(owner[c.name] != index for c in t.outputs)
            if (used_outside or t.name in graph_outputs) and t not in outs:
                outs.append(t)
    for t in ins + outs:
        info = ctx.tensors.get(t.name)
        if info is not None:
            t.dtype, t.shape = np.dtype(info.dtype), list(info.shape)
    sub = gs.Graph(
        nodes=list(nodes),
        inputs=list(ins),
        outputs=list(outs),
        opset=ctx.graph.opset,
        name=f"segment_{number}",
    )
    toposort_chains(sub)  # each LayerNorm in one run of nodes, as rknn-toolkit2 fuses it
    moved = _take_weights(nodes) if move_weights else {}
    model = export(sub)
    del model.graph.value_info[:]
    for tensor in model.graph.initializer:
        if tensor.name in moved:
            const, values = moved.pop(tensor.name)
            tensor.ClearField("dims")
            tensor.dims.extend(values.shape)
            data = values.tobytes()
            const.values = np.broadcast_to(values.dtype.type(0), values.shape)
            del values
            tensor.raw_data = data
            del data
    seg.name = f"s{number:0{max(width, 3)}d}_{seg.device}_{_stages_label(nodes)}"
    seg.inputs, seg.outputs = [t.name for t in ins], [t.name for t in outs]
    seg.token.model = model
    seg.flops, seg.ops = matmul_flops(nodes), len(nodes)
    seg.matmuls = sum(n.op in MATMUL_LIKE for n in nodes)
    seg.est_ms = estimate_ms(seg.device, nodes, ctx.profile, io=len(ins) + len(outs))


def _take_weights(nodes) -> dict:
    """{name: (constant, array)} of the large weights only ``nodes`` read; each constant holds
    an empty array of its dtype until the export has placed the real one."""
    import onnx_graphsurgeon as gs

    inside = {id(n) for n in nodes}
    taken = {}
    for node in nodes:
        for t in node.inputs:
            if (
                isinstance(t, gs.Constant)
                and isinstance(t.values, np.ndarray)
                and t.values.flags.c_contiguous
                and t.values.nbytes >= MOVE_ABOVE
                and t.name not in taken
                and all(id(c) in inside for c in t.outputs)
            ):
                taken[t.name] = (t, t.values)
                t.values = np.empty((0,), t.values.dtype)
    return taken
