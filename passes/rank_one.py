"""rank_one: a product with a rank-one matrix, as the two thin products it is.

::

    u [.., N, 1] --+                                 S -------+
    v [.., 1, M] --MatMul--> ab [.., N, M]           u -- MatMul --> Su [.., K, 1] --+
    S [.., K, N] ---------------- MatMul --> y   =>  v ------------------------------ MatMul --> y

    (and ab @ S  =>  u @ (v @ S) when ab is the left operand)

RWKV-7's state update as the `rwkv` package writes it, ``state @ ab`` with ``ab = (-kk) (kk a)^T``
(an [H, N, N] x [H, N, N] product: N^3 multiply-adds a head), costs N^2 a head as ``(state @ -kk)
(kk a)^T``: the same sums in another order (fp32 rounding apart). Our own export writes it that
way already; this pass makes the CPU work, and the NPU's share of MatMul FLOPs in the plan, not
depend on how an exporter wrote the recurrence. The product ``ab`` stays where something else
reads it.

Precondition: typed shapes (canonicalize). Postcondition: no MatMul reads a rank-one product
of a column [.., N, 1] and a row [.., 1, M] as either operand.
"""

from __future__ import annotations

from rwkv2rknn.compiler.ir import Context

NAME = "rank_one"


def _outer(t):
    """(u, v) if ``t`` is made by MatMul(u [.., N, 1], v [.., 1, M]) with N, M > 1, else None."""
    if len(t.inputs) != 1 or t.inputs[0].op != "MatMul":
        return None
    u, v = t.inputs[0].inputs
    su, sv = u.shape, v.shape
    if not su or not sv or len(su) < 2 or len(sv) < 2:
        return None
    if (
        su[-1] == 1
        and sv[-2] == 1
        and isinstance(su[-2], int)
        and isinstance(sv[-1], int)
        and su[-2] > 1
        and sv[-1] > 1
    ):
        return u, v
    return None


def _shape(a, b):
    """The shape of MatMul(a, b) from theirs (batch dims broadcast), or None."""
    sa, sb = a.shape, b.shape
    if not sa or not sb or len(sa) < 2 or len(sb) < 2:
        return None
    lead_a, lead_b = list(sa[:-2]), list(sb[:-2])
    n = max(len(lead_a), len(lead_b))
    lead_a, lead_b = [1] * (n - len(lead_a)) + lead_a, [1] * (n - len(lead_b)) + lead_b
    batch = [x if x != 1 else y for x, y in zip(lead_a, lead_b)]
    return batch + [sa[-2], sb[-1]]


def run(ctx: Context) -> None:
    import onnx_graphsurgeon as gs

    graph = ctx.graph
    done = 0
    for node in list(graph.nodes):
        if node.op != "MatMul" or len(node.inputs) != 2:
            continue
        a, b = node.inputs
        right, left = _outer(b), _outer(a)
        if right is None and left is None:
            continue
        base = node.name or node.outputs[0].name
        if right is not None:  # S @ (u v) -> (S @ u) @ v
            u, v = right
            mid = gs.Variable(f"{base}.rank_one", dtype=node.outputs[0].dtype, shape=_shape(a, u))
            graph.nodes.append(gs.Node("MatMul", name=f"{base}.rank_one", inputs=[a, u], outputs=[mid]))
            node.inputs[0], node.inputs[1] = mid, v
        else:  # (u v) @ S -> u @ (v @ S)
            u, v = left
            mid = gs.Variable(f"{base}.rank_one", dtype=node.outputs[0].dtype, shape=_shape(v, b))
            graph.nodes.append(gs.Node("MatMul", name=f"{base}.rank_one", inputs=[v, b], outputs=[mid]))
            node.inputs[0], node.inputs[1] = u, mid
        done += 1
    if done:
        graph.cleanup().toposort()
        ctx.note(
            NAME, f"{done} product(s) with a rank-one matrix ([N, 1] x [1, M]) done as two thin products"
        )
