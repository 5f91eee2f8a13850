"""keep fp32: undo the fp16 converter's work so the RKNN compiler sees a clean fp32 graph.

::

    fp16 const --------------------------+         fp32 const ---+
    x(fp16) -> Cast(fp32) -> Max -> Cast(fp16)  =>  x(fp32) -> Max

onnxconverter-common's ``convert_float_to_float16`` stores constants as fp16, makes the graph's
float inputs and outputs fp16, and wraps ops it keeps in fp32 (``Max``) in Cast pairs. This pass
turns every fp16 constant back to fp32, removes float-to-float Casts and makes float I/O fp32.
The RKNN compiler makes its own fp16 weights; the CPU segments then run in fp32. Lost for good:
the converter's clamping of constants to 1e-7 <= |x| <= 1e4 and the fp16 rounding itself.

Precondition: a loaded graph. Postcondition: no fp16 tensor and no float-to-float Cast.
"""

from __future__ import annotations

import numpy as np

from rwkv2rknn.compiler.ir import Context, bypass, is_const, transposed

NAME = "keep_fp32"
_FLOAT_TO = {1, 10, 11, 16}  # FLOAT, FLOAT16, DOUBLE, BFLOAT16


def _read_as_mw(t) -> bool:
    """True for a 2-D constant read only as the weight of ``MatMul(W, x)`` (x not constant)."""
    return (
        len(t.shape) == 2
        and bool(t.outputs)
        and all(
            c.op == "MatMul" and len(c.inputs) == 2 and c.inputs[0] is t and not is_const(c.inputs[1])
            for c in t.outputs
        )
    )


def run(ctx: Context) -> None:
    graph = ctx.graph
    consts = casts = io = 0
    for t in graph.tensors().values():
        if is_const(t):
            v = np.asarray(t.values)
            if v.dtype == np.float16:
                # a weight normalize_matmul will transpose is widened column-major (the same
                # values): its transpose is then a C-ordered view, not a second copy
                t.values = transposed(v, np.float32).T if _read_as_mw(t) else v.astype(np.float32)
                consts += 1
        elif t.dtype is not None and np.dtype(t.dtype) == np.float16:
            t.dtype = np.float32
            io += t in graph.inputs or t in graph.outputs
    float_tensors = {
        t.name for t in graph.tensors().values() if t.dtype is not None and np.dtype(t.dtype).kind == "f"
    }
    for node in list(graph.nodes):
        if node.op == "Cast" and int(node.attrs.get("to", 0)) in _FLOAT_TO:
            src = node.inputs[0]
            if src.name in float_tensors and (not is_const(src) or np.asarray(src.values).dtype.kind == "f"):
                node.outputs[0].dtype = np.float32
                bypass(graph, node)
                casts += 1
    graph.cleanup().toposort()
    if consts or casts or io:
        ctx.note(
            NAME,
            f"{consts} fp16 constants -> fp32, {casts} Cast nodes removed, {io} graph inputs/outputs -> fp32",
        )
    else:
        ctx.note(NAME, "already fp32, nothing to change")
