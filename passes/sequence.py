"""sequence: a T-token (prefill) variant of every segment that can take many tokens at once.

::

    per token:  x[C] -> LN -> mix(., shift_in[C]) -> MatMul(x[1,K], W) -> ...   -> shift_out = LN(x)
    T tokens:   x[T,C] -> LN -> mix(., prev[T,C]) -> MatMul(x[T,K], W) -> ... -> shift_out[T,C]
                prev = Concat(shift_in[1,C], shift_out[0:T-1])

A segment whose rows do not depend on each other except through the token shift can run T tokens
in one call: its MatMuls then take T rows (the NPU's strong case: weights are read once per chunk,
not once per token). Its time-shift state inputs become "the previous row", and the state before
the chunk enters as the first row. Segments that carry a recurrence (they read accumulator state
rows, like the WKV scan) or take token ids stay per-token: the executor runs them row by row.

The variant has a symbolic row count, so one file serves every chunk length on onnxruntime.
For NPU segments the build pass makes it a ``.seq.rknn`` with one graph per row count in
``Options.prefill_rows`` (rknn-toolkit2's ``dynamic_input``); the executor pads a chunk to the
smallest row count that fits.

Precondition: cut has run. Postcondition: eligible segments have ``seq.model`` (ModelProto);
every segment has ``est_prefill_ms``.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from rwkv2rknn.compiler.ir import (
    Context,
    GraphSegment,
    const_value,
    export,
    replace_uses,
    reshape_node,
    toposort_chains,
)
from rwkv2rknn.passes.support import ARITHMETIC

NAME = "sequence"
_ROWWISE = ARITHMETIC | {"Pow", "Identity", "MatMul", "ReduceMean", "Reshape", "Exp", "Max", "Min", "Split"}
_SHAPE_INPUTS = {"Reshape", "Split"}  # their constant inputs are shapes and sizes, not values


def _is_row(shape) -> bool:
    """One token's row: every dimension but the last is 1 ([C], [1, C], [1, 1, C], ...)."""
    return shape is not None and all(isinstance(d, (int, np.integer)) and d == 1 for d in shape[:-1])


def _split_by_rows(reshape) -> int:
    """n if ``reshape`` turns one row [1, n*m] into [1, .., n, .., 1, m] (one axis before the
    last of length n) read only by a Split of that axis into n parts (how exporters split a
    LoRA's output for batched MatMuls): on T rows that is a Split of the last axis. Else 0."""
    shape = const_value(reshape.inputs[1])
    readers = reshape.outputs[0].outputs
    if reshape.inputs[0].shape is not None and not _is_row(reshape.inputs[0].shape):
        return 0  # (a T-row variant's tensors have no shapes: checked on the per-token graph)
    if shape is None or shape.ndim != 1 or shape.size < 2 or len(readers) != 1 or readers[0].op != "Split":
        return 0
    lead = [int(d) for d in shape[:-1]]
    axes = [a for a, d in enumerate(lead) if d != 1]
    if len(axes) != 1 or lead[axes[0]] < 2:
        return 0
    split, n = readers[0], lead[axes[0]]
    sizes = const_value(split.inputs[1]) if len(split.inputs) > 1 else None
    ok = (
        int(split.attrs.get("axis", 0)) in (axes[0], axes[0] - shape.size)
        and len(split.outputs) == n
        and (sizes is None or (sizes.size == n and (sizes == 1).all()))
    )
    return n if ok else 0


def _why_not(ctx: Context, seg: GraphSegment) -> Optional[str]:
    """None if the segment can take T rows, else the reason it cannot."""
    slots = {s.input: s for s in ctx.state}
    produced = {t.name for n in seg.nodes for t in n.outputs}
    for name in seg.inputs:
        if name == ctx.token_input:
            return "reads token ids"
        slot = slots.get(name)
        if slot is not None and (slot.accumulator or slot.output not in produced):
            return "carries a recurrence"
    for n in seg.nodes:
        if n.op not in _ROWWISE:
            return f"{n.op} is not row-wise"
        rank = len(n.inputs[0].shape or ())
        if n.op == "ReduceMean" and (
            [int(a) for a in n.attrs.get("axes", [])] not in ([-1], [rank - 1])
            or not n.attrs.get("keepdims", 1)
        ):
            return "ReduceMean over other axes"
        if n.op == "MatMul" and (const_value(n.inputs[1]) is None or const_value(n.inputs[1]).ndim != 2):
            return "MatMul without a constant right-hand weight"
        if n.op == "Reshape" and not _split_by_rows(n):
            shape = const_value(n.inputs[1])
            if shape is None or shape.ndim != 1 or not shape.size or not _is_row(list(shape)):
                return "Reshape that is not to a vector or a row"
        if (
            n.op == "Split"
            and not (
                n.inputs[0].inputs
                and n.inputs[0].inputs[0].op == "Reshape"
                and _split_by_rows(n.inputs[0].inputs[0])
            )
            and int(n.attrs.get("axis", 0)) not in (-1, rank - 1)
        ):
            return "Split of other than the last axis"
        for t in n.inputs[:1] if n.op in _SHAPE_INPUTS else n.inputs:
            shape = t.shape
            if shape and len(shape) > 2 and not _is_row(shape):
                if const_value(t) is not None or not (
                    t.inputs and t.inputs[0].op == "Reshape" and _split_by_rows(t.inputs[0])
                ):
                    return "tensors of rank > 2"
    return None


def _shape_last(n):
    """The last entry of a Reshape's constant shape (None if it is not constant)."""
    v = const_value(n.inputs[1])
    return int(np.asarray(v).reshape(-1)[-1]) if v is not None and np.asarray(v).size else None


def _rows_form(g, ctx: Context) -> None:
    """Rewrite the per-token graph's shapes for T rows: reshapes to [-1, k], reductions and
    splits over the last axis, constants of rank > 2 (one row) to a vector."""
    import onnx_graphsurgeon as gs

    rows = {}  # one constant per (shape read, k): exporters share a shape between Reshapes
    for n in list(g.nodes):
        if n.op == "Reshape" and _split_by_rows(n):
            split = n.outputs[0].outputs[0]
            src = n.inputs[0]
            split.inputs.clear()
            split.inputs.append(src)  # equal parts of the last axis
            split.attrs["axis"] = -1
            n.outputs.clear()
        elif n.op == "Reshape":
            info = ctx.tensors.get(n.outputs[0].name)
            k = int(np.prod(info.shape)) if info is not None else int(np.asarray(n.inputs[1].values)[-1])
            name = n.inputs[1].name
            n.inputs[1] = rows.setdefault(
                (name, k),
                gs.Constant(
                    f"{name}.rows" if k == _shape_last(n) else f"{name}.rows{k}", np.array([-1, k], np.int64)
                ),
            )
        elif n.op == "ReduceMean":  # over the last axis (checked), whatever the rank was
            n.attrs["axes"] = [-1]
        elif n.op == "Split":
            n.attrs["axis"] = -1
        if n.op not in _SHAPE_INPUTS:
            for i, t in enumerate(n.inputs):
                # the shape first: a weight's values stay unread (the export copies its tensor)
                v = const_value(t) if isinstance(t, gs.Constant) and len(t.shape) > 2 else None
                if v is not None and v.ndim > 2:
                    n.inputs[i] = gs.Constant(f"{t.name}.row", np.ascontiguousarray(v.reshape(v.shape[-1:])))


_STUB_ABOVE = 1 << 16  # bytes: weights the variant takes over from the per-token model


def _stub_weights(model, g) -> set:
    """The names of ``model``'s large weights of rank <= 2 (``g``'s import of it), each made a
    constant without data in ``g`` (a tensor of its name, type and shape): the export then does
    not copy them (twice: onnx's make_graph and make_model). Rank > 2 constants are read."""
    from onnx import TensorProto
    from onnx_graphsurgeon.ir.tensor import LazyValues

    tensors, names = g.tensors(), set()
    for t in model.graph.initializer:
        if len(t.dims) <= 2 and t.ByteSize() >= _STUB_ABOVE and t.name in tensors:
            tensors[t.name].values = LazyValues(TensorProto(name=t.name, dims=t.dims, data_type=t.data_type))
            names.add(t.name)
    return names


def _take_over(model, variant, weights: set) -> None:
    """Make ``model`` the ``variant`` (exported with ``weights`` as stubs) in place: every field
    the variant's, its initializers the variant's in the variant's order, with ``model``'s own
    tensors for ``weights`` (moved, not copied). The same bytes as a full export."""

    def copy_fields(dst, src, skip):
        for fd in dst.DESCRIPTOR.fields:
            if fd.name not in skip:
                dst.ClearField(fd.name)
        for fd, value in src.ListFields():
            if fd.name in skip:
                continue
            if fd.label == fd.LABEL_REPEATED:
                getattr(dst, fd.name).extend(value)
            elif fd.message_type is not None:
                getattr(dst, fd.name).CopyFrom(value)
            else:
                setattr(dst, fd.name, value)

    copy_fields(model, variant, {"graph"})
    copy_fields(model.graph, variant.graph, {"initializer"})
    inits = model.graph.initializer
    for i in reversed(range(len(inits))):
        if inits[i].name not in weights:
            del inits[i]
    inits.extend(t for t in variant.graph.initializer if t.name not in weights)
    order = {t.name: i for i, t in enumerate(variant.graph.initializer)}
    missing = [t.name for t in inits if t.name not in order]
    for name in missing:  # a weight the variant no longer reads
        del inits[[t.name for t in inits].index(name)]
    inits.sort(key=lambda t: order[t.name])


def _variant(ctx: Context, seg: GraphSegment, take: bool = False):
    """The T-row ModelProto of a per-token segment model; ``take``: made of ``seg.token.model``
    itself (its weights moved, not copied; the per-token model is gone)."""
    import onnx_graphsurgeon as gs

    g = gs.import_onnx(seg.token.model)
    weights = _stub_weights(seg.token.model, g) if take else set()
    tensors = g.tensors()
    slots = {s.input: s for s in ctx.state if not s.accumulator}
    _rows_form(g, ctx)
    for t in g.inputs:
        if t.name in slots:
            continue
        k = int(np.prod([d for d in t.shape])) if t.shape else 1
        t.shape = ["T", k]
    for name, slot in slots.items():
        if name not in tensors:
            continue
        cur = tensors[name]
        out = tensors[slot.output]
        width = int(np.prod(cur.shape))
        first = gs.Variable(f"{name}.row", dtype=np.float32)
        earlier = gs.Variable(f"{slot.output}.earlier", dtype=np.float32)
        prev = gs.Variable(f"{name}.prev", dtype=np.float32)
        replace_uses(cur, prev)  # before the nodes below, which read cur itself
        g.nodes += [
            reshape_node(cur, first, [1, width], f"{name}.as_row", f"{name}.row_shape"),
            gs.Node(
                "Slice",
                name=f"{slot.output}.drop_last",
                inputs=[
                    out,
                    gs.Constant(f"{name}.s0", np.array([0], np.int64)),
                    gs.Constant(f"{name}.s1", np.array([-1], np.int64)),
                    gs.Constant(f"{name}.s2", np.array([0], np.int64)),
                ],
                outputs=[earlier],
            ),
            gs.Node(
                "Concat", name=f"{name}.shift", inputs=[first, earlier], outputs=[prev], attrs={"axis": 0}
            ),
        ]
    for t in g.outputs:
        k = int(np.prod([d for d in t.shape])) if t.shape else 1
        t.shape = ["T", k]
    g.cleanup()
    toposort_chains(g)  # the toolkit's LayerNorm fusion wants each LayerNorm in one run
    model = export(g)
    del model.graph.value_info[:]
    if not take:
        return model
    _take_over(seg.token.model, model, weights)
    return seg.token.model


def prefill_rows(ctx: Context) -> int:
    """The chunk length prefill estimates assume: the largest T-row build, else 32."""
    return max(ctx.options.prefill_rows or (32,))


def logits_only(ctx: Context, seg: GraphSegment) -> bool:
    """The segment makes the logits and nothing else (the head, ``partition.split_head``): a
    prompt needs it on its last row only, so its NPU build is for one row (token steps) and
    prefill runs it once per prompt; only ``eval`` and ``check`` ask for every row's logits."""
    return bool(ctx.logits_output) and list(seg.outputs) == [ctx.logits_output]


def prefill_ms(ctx: Context, seg: GraphSegment, precision: str = "fp16") -> float:
    """Estimated ms per token of prefill: a T-row call shared by the chunk's T tokens; a
    logits-only segment one one-row call per chunk (at most: a prompt needs it once)."""
    from rwkv2rknn.passes.partition import estimate_ms

    t = prefill_rows(ctx)
    if logits_only(ctx, seg):
        return estimate_ms(seg.device, seg.nodes, ctx.profile, precision=precision) / t
    return estimate_ms(seg.device, seg.nodes, ctx.profile, rows=t, precision=precision) / t


def run_one(ctx: Context, seg: GraphSegment, take: bool = False) -> Optional[str]:
    """Give one cut segment its T-row variant; None if it has one, else why not. ``take``: the
    variant is made of ``seg.token.model`` (written already; the caller is done with it)."""
    why = _why_not(ctx, seg)
    if why is None:
        seg.seq.model = _variant(ctx, seg, take)
        seg.est_prefill_ms = prefill_ms(ctx, seg)
    else:
        seg.est_prefill_ms = seg.est_ms  # one call per token
    return why


def run(ctx: Context) -> None:
    made, kept = 0, {}
    for seg in ctx.segments:
        why = run_one(ctx, seg)
        if why is None:
            made += 1
        else:
            kept[why] = kept.get(why, 0) + 1
    ctx.note(
        NAME,
        f"{made} segment(s) take T tokens at once; "
        + (", ".join(f"{v} per token ({k})" for k, v in sorted(kept.items())) or "none per token"),
    )
