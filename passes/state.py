"""state: unpack each layer's [rows, C] state tensor into one graph input and output per row.

::

    state_in -> Gather(0) -> ...          state_in.ffn_xx -> ...
             -> Gather(1) -> ...    =>    state_in.att_xx -> ...
    a -> Unsqueeze -+                     a -> state_out.ffn_xx
    b -> Unsqueeze -+-> Concat -> state_out   b -> state_out.att_xx

Rows become separate tensors so that each can live where it is used (the shift rows beside the
NPU's LayerNorm, the accumulators in fp32 on the CPU) with no Gather or Concat around them. The
row names and which rows are accumulators come from the model description. A layer whose state
is used in any other way is left whole (and then runs on the CPU).

Precondition: keep_fp32 has run. Postcondition: ``ctx.state`` lists every unpacked row.
"""

from __future__ import annotations

import numpy as np

from rwkv2rknn.compiler.ir import Context, const_value, replace_uses
from rwkv2rknn.artifact.plan import StateSlot

NAME = "state"


def _rows_read(state_in):
    """{row index: Gather output} if every use of ``state_in`` is Gather(axis 0, scalar index)."""
    rows = {}
    for node in state_in.outputs:
        idx = const_value(node.inputs[1]) if node.op == "Gather" and len(node.inputs) == 2 else None
        if idx is None or idx.ndim != 0 or int(node.attrs.get("axis", 0)) != 0:
            return None
        rows.setdefault(int(idx), []).append(node.outputs[0])
    return rows


def _rows_written(state_out):
    """[row tensor] if ``state_out`` = Concat(axis 0) of Unsqueeze(axes [0]) of rows."""
    cat = state_out.inputs[0] if state_out.inputs else None
    if cat is None or cat.op != "Concat" or int(cat.attrs.get("axis", 0)) != 0:
        return None
    rows = []
    for t in cat.inputs:
        unsq = t.inputs[0] if t.inputs else None
        if unsq is None or unsq.op != "Unsqueeze":
            return None
        axes = const_value(unsq.inputs[1]) if len(unsq.inputs) > 1 else unsq.attrs.get("axes")
        if axes is None or [int(a) for a in np.atleast_1d(axes)] != [0]:
            return None
        rows.append(unsq.inputs[0])
    return rows


def run(ctx: Context) -> None:
    import onnx_graphsurgeon as gs
    from rwkv2rknn.models import rwkv4

    graph = ctx.graph
    if not ctx.whole_state:
        ctx.note(NAME, "no per-layer state to unpack")
        return
    by_name = graph.tensors()
    row_names = rwkv4.STATE_ROWS
    done = 0
    for layer, (in_name, out_name) in sorted(ctx.whole_state.items()):
        state_in, state_out = by_name[in_name], by_name[out_name]
        read, written = _rows_read(state_in), _rows_written(state_out)
        width = int(state_in.shape[-1])
        if (
            read is None
            or written is None
            or len(written) != len(row_names)
            or any(r >= len(row_names) for r in read)
        ):
            ctx.note(NAME, f"layer {layer}: state used in an unknown way, left whole")
            continue
        new_inputs, new_outputs = [], []
        for r, row in enumerate(row_names):
            vin = gs.Variable(f"{in_name}.{row}", dtype=np.float32, shape=[width])
            for gathered in read.get(r, []):
                replace_uses(gathered, vin)
                if gathered in graph.outputs:  # a row passed straight through
                    graph.outputs[graph.outputs.index(gathered)] = vin
            src = written[r]
            if src in graph.inputs or src.name.startswith(in_name):
                ident = gs.Node(
                    "Identity",
                    name=f"{out_name}.{row}.copy",
                    inputs=[src],
                    outputs=[gs.Variable(f"{out_name}.{row}", dtype=np.float32, shape=[width])],
                )
                graph.nodes.append(ident)
                src = ident.outputs[0]
            else:
                src.name = f"{out_name}.{row}"
            src.dtype, src.shape = np.float32, [width]
            new_inputs.append(vin)
            new_outputs.append(src)
            ctx.state.append(StateSlot(layer, row, vin.name, src.name, row in rwkv4.ACCUMULATOR_ROWS))
        pos = graph.inputs.index(state_in)
        graph.inputs[pos : pos + 1] = new_inputs
        pos = graph.outputs.index(state_out)
        graph.outputs[pos : pos + 1] = new_outputs
        del ctx.whole_state[layer]
        done += 1
    graph.cleanup().toposort()
    ctx.note(NAME, f"{done} layer state(s) unpacked into rows {', '.join(row_names)}")
