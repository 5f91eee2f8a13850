"""normalise MatMul: ``MatMul(W[out, in], x[in])`` -> a row vector times a transposed weight.

::

    W[out,in] --+                       x -> Reshape[1,in] -> MatMul(., W^T[in,out]) -> Reshape[out]
    x[in] ------+-> MatMul -> y[out] =>

The RKNN compiler lowers a constant-weight MatMul whose activation is a row matrix [M, K] to a
1x1 convolution; the row form is also the one a T-token (prefill) variant uses, with M = T.
Numerics are unchanged (the same products and sums).

Precondition: keep_fp32 has run. Postcondition: every constant-weight MatMul reads [1, K].
"""

from __future__ import annotations

import numpy as np

from rwkv2rknn.ir import Context, const_value

NAME = "normalize_matmul"


def run(ctx: Context) -> None:
    import onnx_graphsurgeon as gs

    graph = ctx.graph
    changed = 0
    for node in list(graph.nodes):
        if node.op != "MatMul":
            continue
        w, x = node.inputs
        wv = const_value(w)
        if wv is None or wv.ndim != 2 or const_value(x) is not None:
            continue
        out = node.outputs[0]
        k, n = wv.shape[1], wv.shape[0]
        base = node.name
        row = gs.Variable(f"{base}.row_in", dtype=np.float32, shape=[1, k])
        y = gs.Variable(f"{base}.row_out", dtype=np.float32, shape=[1, n])
        pre = gs.Node("Reshape", name=f"{base}.to_row",
                      inputs=[x, gs.Constant(f"{base}.row_shape", np.array([1, k], np.int64))],
                      outputs=[row])
        node.inputs = [row, gs.Constant(f"{w.name}.T", np.ascontiguousarray(wv.T))]
        node.outputs = [y]
        post = gs.Node("Reshape", name=f"{base}.to_vec",
                       inputs=[y, gs.Constant(f"{base}.vec_shape", np.array([n], np.int64))],
                       outputs=[out])
        graph.nodes += [pre, post]
        changed += 1
    _fold_reshape_pairs(graph)
    graph.cleanup().toposort()
    ctx.note(NAME, f"{changed} MatMul(W, x) rewritten as row-vector MatMul(x[1,K], W^T)")


def _fold_reshape_pairs(graph) -> None:
    """Reshape -> Reshape chains read the first one's input directly (where the first one is
    read by nothing else: one that other ops also read stays where they are)."""
    outputs = set(id(t) for t in graph.outputs)
    for node in graph.nodes:
        if node.op != "Reshape":
            continue
        src = node.inputs[0]
        prev = src.inputs[0] if src.inputs else None
        if prev is not None and prev.op == "Reshape" and len(src.outputs) == 1 and \
                id(src) not in outputs:
            node.inputs[0] = prev.inputs[0]
