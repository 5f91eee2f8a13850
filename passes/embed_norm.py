"""embed_norm: the LayerNorm after the token lookup folded into the token table (w16a16i).

::

    table [V, C] -- Gather(token) -- ReduceMean/Sub/Pow/.../Mul/Add (ln0) --> x
    =>  LN0(table) [V, C] -- Gather(token) --> x

The nodes between the Gather and the first tensor read by anything else depend on the token's
row alone (elementwise with constants, ReduceMean over the last axis): their result for every
row is computed here once (float64, stored float32) and the table replaced by it. Exact up to
fp32 rounding. Why: an untrained token row of a trained model keeps its initial values (RWKV-7:
|e| <= 1e-4; trained rows up to 0.46 in the 4 x 256 byte model), and the first NPU segment's
input range, one 16-bit fixed-point range under w16a16i, leaves such rows a few steps of
resolution that the LayerNorm then scales up: random ids lost KL 0.046 there (docs/quality.md);
with the rows normalised first every row is O(1). Run for w16a16i compiles only (FOLD_FOR): the
fp16 table of an fp16 export would be stored fp32 once it holds the folded values, and w8a8's
int8 table (one scale per row) was not measured with it.

Precondition: keep_fp32 has run (fp32 constants). Postcondition: under FOLD_FOR, no row-wise
chain follows a constant table's Gather.
"""

from __future__ import annotations

import numpy as np

from rwkv2rknn.compiler.ir import Context, const_value, is_const, replace_uses

NAME = "embed_norm"
FOLD_FOR = ("w16a16i",)
_ELEMENTWISE = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide, "Pow": np.power}


def _axes(node):
    axes = node.attrs.get("axes")
    if axes is None and len(node.inputs) > 1 and is_const(node.inputs[1]):
        axes = const_value(node.inputs[1]).tolist()
    return list(axes) if axes is not None else None


def _rowwise(node, rank: int) -> bool:
    if node.op in _ELEMENTWISE or node.op == "Sqrt":
        return all(
            is_const(t) and np.ndim(const_value(t)) <= 1 for t in node.inputs if is_const(t)
        )  # constants per channel or scalars: they broadcast over a block of rows
    if node.op == "ReduceMean":
        axes = _axes(node)
        return axes in ([-1], [rank - 1]) and int(node.attrs.get("keepdims", 1)) == 1
    return False


def _chain(gather):
    """The row-wise nodes after ``gather`` up to the one tensor that leaves them, or None."""
    out = gather.outputs[0]
    rank = len(out.shape or ())
    derived, chain = {id(out)}, []
    grew = True
    while grew:
        grew = False
        for n in _readers(chain, gather):
            if n in chain or not _rowwise(n, rank):
                continue
            if all(is_const(t) or id(t) in derived for t in n.inputs):
                chain.append(n)
                derived |= {id(t) for t in n.outputs}
                grew = True
    if not chain:
        return None
    inside = {id(n) for n in chain}
    leaving = [
        t for n in chain for t in n.outputs if any(id(c) not in inside for c in t.outputs) or not t.outputs
    ]
    if len(leaving) != 1 or any(id(c) not in inside for c in out.outputs):
        return None
    return chain, leaving[0]


def _readers(chain, gather):
    seen = []
    for n in [gather] + chain:
        for t in n.outputs:
            for c in t.outputs:
                if c not in seen:
                    seen.append(c)
    return seen


def _evaluate(chain, start, table: np.ndarray, want) -> np.ndarray:
    vals = {id(start): table.astype(np.float64)}

    def v(t):
        return vals[id(t)] if id(t) in vals else np.asarray(const_value(t), np.float64)

    for n in chain:  # in the order found: every input is ready
        if n.op == "Sqrt":
            r = np.sqrt(v(n.inputs[0]))
        elif n.op == "ReduceMean":
            r = v(n.inputs[0]).mean(axis=-1, keepdims=True)
        else:
            r = _ELEMENTWISE[n.op](v(n.inputs[0]), v(n.inputs[1]))
        vals[id(n.outputs[0])] = r
    return vals[id(want)]


def run(ctx: Context) -> None:
    if ctx.options.quant not in FOLD_FOR:
        return
    graph = ctx.graph
    for gather in [n for n in graph.nodes if n.op == "Gather"]:
        table = gather.inputs[0]
        if not is_const(table) or int(gather.attrs.get("axis", 0)) != 0 or len(table.outputs) != 1:
            continue
        w = const_value(table)
        if w.ndim != 2 or w.dtype != np.float32:
            continue
        found = _chain(gather)
        if found is None:
            continue
        chain, leaving = found
        out = gather.outputs[0]
        if list(leaving.shape or ()) != list(out.shape or ()):
            continue
        folded = _evaluate(chain, out, w, leaving)
        if folded.shape != w.shape or not np.isfinite(folded).all():
            continue
        table.values = folded.astype(np.float32)
        if leaving in graph.outputs:
            graph.outputs[graph.outputs.index(leaving)] = out
            name, leaving.name = leaving.name, leaving.name + ".folded"
            out.name = name
        replace_uses(leaving, out)
        for n in chain:
            n.inputs.clear()
            n.outputs.clear()
        ctx.note(
            NAME, f"{gather.name}: {len(chain)} row-wise node(s) after the token lookup folded into its table"
        )
    graph.cleanup().toposort()
