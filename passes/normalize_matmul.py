"""normalise MatMul: ``MatMul(W[out, in], x[in])`` -> a row vector times a transposed weight.

::

    W[out,in] --+                       x -> Reshape[1,in] -> MatMul(., W^T[in,out]) -> Reshape[out]
    x[in] ------+-> MatMul -> y[out] =>

The RKNN compiler lowers a constant-weight MatMul whose activation is a row matrix [M, K] to a
1x1 convolution; the row form is also the one a T-token (prefill) variant uses, with M = T.
Numerics are unchanged (the same products and sums).

A batched MatMul with a 3-D constant weight (``x[.., B, M, K] @ W[B, K, N]``, as torch writes
``tanh(x @ maa_w1).view(B, 1, D) @ maa_w2``) becomes B row-form MatMuls, one per weight slice
(x split along B); where the result is only read one slice at a time (``Gather`` on the B
axis), each reader takes its slice's MatMul directly.

Precondition: keep_fp32 has run. Postcondition: every constant-weight MatMul reads [1, K] or
[M, K].
"""

from __future__ import annotations

import numpy as np

from rwkv2rknn.compiler.ir import Context, const_value, reshape_node, transposed

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
        out_shape = _vector_out(x, k, n)
        if out_shape is None:
            continue
        base = node.name
        row = gs.Variable(f"{base}.row_in", dtype=np.float32, shape=[1, k])
        y = gs.Variable(f"{base}.row_out", dtype=np.float32, shape=[1, n])
        pre = reshape_node(x, row, [1, k], f"{base}.to_row", f"{base}.row_shape")
        node.inputs = [row, gs.Constant(f"{w.name}.T", transposed(wv))]
        node.outputs = [y]
        post = reshape_node(y, out, out_shape, f"{base}.to_vec", f"{base}.vec_shape")
        graph.nodes += [pre, post]
        changed += 1
    batched = sum(_unbatch(graph, n) for n in list(graph.nodes) if n.op == "MatMul")
    _fold_reshape_pairs(graph)
    graph.cleanup().toposort()
    ctx.note(
        NAME,
        f"{changed} MatMul(W, x) rewritten as row-vector MatMul(x[1,K], W^T)"
        + (f"; {batched} batched MatMul(s) with a 3-D weight split per slice" if batched else ""),
    )


def _unbatch(graph, node) -> bool:
    """``x[.., B, M, K] @ W[B, K, N]`` (leading dims of x all 1) -> B MatMuls x_j[M, K] @ W[j],
    joined by Concat; Gathers of one slice along B read their MatMul instead."""
    import onnx_graphsurgeon as gs

    x, w = node.inputs
    wv, shape = const_value(w), list(x.shape or [])
    if (
        wv is None
        or wv.ndim != 3
        or const_value(x) is not None
        or len(shape) < 3
        or not all(isinstance(d, int) for d in shape)
        or int(np.prod(shape[:-3] or [1])) != 1
        or shape[-3] != wv.shape[0]
        or shape[-1] != wv.shape[1]
    ):
        return False
    b, m, (_, k, n) = shape[-3], shape[-2], wv.shape
    base, out = node.name, node.outputs[0]

    def var(name, dims):
        return gs.Variable(f"{base}.{name}", dtype=np.float32, shape=list(dims))

    def reshape(t, dims, name):
        y = var(name, dims)
        graph.nodes.append(reshape_node(t, y, dims, f"{base}.{name}", f"{base}.{name}.shape"))
        return y

    parts = [var(f"part{j}", [1, m, k]) for j in range(b)]
    graph.nodes.append(
        gs.Node(
            "Split",
            name=f"{base}.split",
            attrs={"axis": 0},
            outputs=parts,
            inputs=[reshape(x, [b, m, k], "batched")],
        )
    )
    ys = []
    for j, part in enumerate(parts):
        y = var(f"slice{j}", [m, n])
        graph.nodes.append(
            gs.Node(
                "MatMul",
                name=f"{base}.slice{j}",
                outputs=[y],
                inputs=[
                    reshape(part, [m, k], f"row{j}"),
                    gs.Constant(f"{w.name}.{j}", np.ascontiguousarray(wv[j])),
                ],
            )
        )
        ys.append(y)
    joined = var("joined", [b, m, n])
    graph.nodes.append(
        gs.Node(
            "Concat",
            name=f"{base}.concat",
            attrs={"axis": 0},
            outputs=[joined],
            inputs=[reshape(y, [1, m, n], f"slice{j}.3d") for j, y in enumerate(ys)],
        )
    )
    node.inputs, node.outputs = [], []
    graph.nodes.append(reshape_node(joined, out, out.shape, f"{base}.joined", f"{base}.out_shape"))
    for t in [out] + [r.outputs[0] for r in out.outputs if r.op == "Reshape"]:
        dims = list(t.shape or [])
        for reader in list(t.outputs):
            axis = int(reader.attrs.get("axis", 0)) % max(len(dims), 1) if reader.op == "Gather" else -1
            idx = const_value(reader.inputs[1]) if reader.op == "Gather" else None
            if (
                idx is None
                or idx.ndim
                or not dims
                or dims[axis] != b
                or int(np.prod(dims[:axis] or [1])) != 1
            ):
                continue
            got = reader.outputs[0]
            reader.outputs = []
            graph.nodes.append(
                reshape_node(
                    ys[int(idx)], got, got.shape, f"{reader.name}.slice", f"{reader.name}.slice_shape"
                )
            )
    return True


def _vector_out(x, k: int, n: int):
    """The output shape of MatMul(W[n, k], x) if x is one vector ([k] -> [n], [k, 1] -> [n, 1]),
    else None: a matrix product (x[k, m], m > 1) or an x of unknown shape is no row-vector
    MatMul, and a Reshape to [1, k] would be wrong for it."""
    shape = list(x.shape) if x.shape is not None else None
    if shape == [k]:
        return [n]
    if shape == [k, 1]:
        return [n, 1]
    return None


def _fixed_shape(reshape) -> bool:
    """True if ``reshape``'s target shape does not depend on its input's shape: a constant
    without ``0`` ("copy this input dimension") unless ``allowzero`` makes 0 a size. A ``-1``
    is fine: it follows from the element count, which a chain of Reshapes keeps."""
    shape = const_value(reshape.inputs[1]) if len(reshape.inputs) > 1 else None
    if shape is None:
        return False
    return bool(reshape.attrs.get("allowzero", 0)) or not (np.asarray(shape) == 0).any()


def _fold_reshape_pairs(graph) -> None:
    """Reshape -> Reshape chains read the first one's input directly (where the first one is
    read by nothing else: one that other ops also read stays where they are), when the second
    one's shape does not depend on its input's shape (``_fixed_shape``: a ``0`` copies a
    dimension of the tensor it reads, which folding would change)."""
    outputs = set(id(t) for t in graph.outputs)
    for node in graph.nodes:
        if node.op != "Reshape" or not _fixed_shape(node):
            continue
        src = node.inputs[0]
        prev = src.inputs[0] if src.inputs else None
        if prev is not None and prev.op == "Reshape" and len(src.outputs) == 1 and id(src) not in outputs:
            node.inputs[0] = prev.inputs[0]
