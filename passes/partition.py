"""partition: find the MatMul subgraphs and group the graph into NPU and CPU segments.

::

        x -> LN1 -> mix -> MatMul k,v,r -> | wkv: max, exp, / (CPU) | -> MatMul o -> + -> LN2 -> ...
        '---------- NPU segment ----------'  '----- CPU segment ----'  '-------- NPU segment ...

1. Placement. Each constant-weight MatMul (an ``anchor``) goes to the NPU and pulls in its
   fusible neighbours: backwards through ``flex`` ops (LayerNorm, the time-shift Mul/Add in
   front), forwards through ``flex`` ops whose every input comes from the NPU (Relu, Square,
   Sigmoid, the residual Add behind). Everything else runs on the CPU.
2. Grouping. A node's stage is the number of NPU<->CPU switches on the longest path that reaches
   it (as soon as possible), then pushed as late as its consumers allow, so work that only feeds
   a later step is not pulled to the front. Nodes of one stage and one device form a segment;
   edges go from lower to higher stages only, so segments have no cycle. Segments of the same
   device are then merged wherever no path between them passes through another segment.
3. Pruning. NPU segments with too few MatMul FLOPs to pay for a call go back to the CPU, and the
   grouping is done again. With ``--placement cost`` "pay for a call" is decided by the device
   profile: the segment's estimated NPU time plus its call and two hand-offs against its
   MatMuls' estimated time on the CPU.
4. The head. An NPU segment holding the head stage's nodes and the last layer's is split in two
   (``split_head``).

The merge also does the cross-layer fusion: the NPU tail of layer i (output MatMul, FFN) and the
NPU head of layer i+1 (LN1, time-shift, k/v/r MatMuls) meet with no CPU op between them, so they
become one segment: a token costs about one NPU call and one CPU call per layer. The head is the
exception (4.): the last layer's NPU tail and the head's LayerNorm and MatMul are two NPU
segments, one more call per token, because prefill needs the head on a prompt's last row only.

Precondition: support has run; toposorted graph. Postcondition: ``ctx.segments`` is a list of
``GraphSegment`` (``device`` and ``nodes`` set) in an order that runs (every input produced
earlier); ``ctx.node_device`` gives every node's device.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np

from rwkv2rknn.compiler.ir import Context, GraphSegment, const_value

NAME = "partition"
MATMUL_LIKE = ("MatMul", "Gemm")


def place(graph, support) -> Dict[str, str]:
    """Device of every node: 'npu' or 'cpu'."""
    kind = {n.name: support[n.name][0] for n in graph.nodes}
    npu = {n.name for n in graph.nodes if kind[n.name] == "anchor"}
    stack = [n for n in graph.nodes if n.name in npu]
    while stack:  # backwards from the anchors
        node = stack.pop()
        for t in node.inputs:
            for p in t.inputs:
                if kind[p.name] == "flex" and p.name not in npu:
                    npu.add(p.name)
                    stack.append(p)
    changed = True
    while changed:  # forwards, through ops fed only by the NPU
        changed = False
        for node in graph.nodes:
            if node.name in npu or kind[node.name] != "flex":
                continue
            srcs = [t for t in node.inputs if const_value(t) is None]
            if srcs and all(t.inputs and t.inputs[0].name in npu for t in srcs):
                npu.add(node.name)
                changed = True
    return {n.name: ("npu" if n.name in npu else "cpu") for n in graph.nodes}


def group(graph, device: Dict[str, str]) -> List[GraphSegment]:
    nodes = list(graph.nodes)  # toposorted
    stage: Dict[str, int] = {}
    for node in nodes:
        s = 0
        for t in node.inputs:
            for p in t.inputs:
                s = max(s, stage[p.name] + (device[p.name] != device[node.name]))
        stage[node.name] = s
    for node in reversed(nodes):  # as late as the consumers allow
        later = [
            stage[c.name] - (device[c.name] != device[node.name]) for t in node.outputs for c in t.outputs
        ]
        if later and min(later) > stage[node.name]:
            stage[node.name] = min(later)
    keys = sorted({(stage[n.name], device[n.name]) for n in nodes})
    index = {k: i for i, k in enumerate(keys)}
    segs = [GraphSegment(device=k[1]) for k in keys]
    for node in nodes:
        segs[index[(stage[node.name], device[node.name])]].nodes.append(node)
    return _merge(segs)


def _edges(segs):
    owner = {n.name: i for i, s in enumerate(segs) for n in s.nodes}
    succ = {i: set() for i in range(len(segs))}
    for i, s in enumerate(segs):
        for n in s.nodes:
            for t in n.outputs:
                for c in t.outputs:
                    j = owner[c.name]
                    if j != i:
                        succ[i].add(j)
    return succ


def _reaches_via_other(succ, a, b) -> bool:
    """Is there a path a -> x -> ... -> b with x not in {a, b}?"""
    stack = [x for x in succ[a] if x != b]
    seen = set(stack)
    while stack:
        x = stack.pop()
        if x == b:
            return True
        for y in succ[x]:
            if y not in seen and y != a:
                seen.add(y)
                stack.append(y)
    return False


def _merge(segs):
    merged = True
    while merged:
        merged = False
        succ = _edges(segs)
        for a in range(len(segs)):
            for b in range(a + 1, len(segs)):
                if segs[a].device != segs[b].device:
                    continue
                if _reaches_via_other(succ, a, b) or _reaches_via_other(succ, b, a):
                    continue
                segs[a].nodes += segs[b].nodes
                del segs[b]
                merged = True
                break
            if merged:
                break
    return _order(segs)


def _order(segs):
    """Segments in an order that runs; nodes inside each in graph (topological) order."""
    succ = _edges(segs)
    indeg = {i: 0 for i in range(len(segs))}
    for i in succ:
        for j in succ[i]:
            indeg[j] += 1
    ready = sorted(i for i, d in indeg.items() if d == 0)
    order = []
    while ready:
        i = ready.pop(0)
        order.append(i)
        for j in sorted(succ[i]):
            indeg[j] -= 1
            if indeg[j] == 0:
                ready.append(j)
        ready.sort()
    if len(order) != len(segs):
        raise AssertionError("partition produced a cycle between segments")
    return [segs[i] for i in order]


def matmul_dims(nodes):
    """(rows, out_features, in_features) of every MatMul-like op among ``nodes``: constant-weight
    MatMuls, and MatMuls of two activations or Gemms (which stay on the CPU) from their shapes,
    so that the plan's share of MatMul FLOPs on the NPU counts every one the compiler saw."""
    dims = []
    for n in nodes:
        if n.op not in MATMUL_LIKE:
            continue
        for t in n.inputs[:2]:
            w = const_value(t)
            if w is not None and w.ndim == 2:
                other = [x for x in n.inputs[:2] if x is not t][0]
                rows = 1
                if other.shape and len(other.shape) == 2 and isinstance(other.shape[0], int):
                    rows = other.shape[0]
                k, m = (w.shape[0], w.shape[1]) if t is n.inputs[1] else (w.shape[1], w.shape[0])
                if n.op == "Gemm" and int(n.attrs.get("transB" if t is n.inputs[1] else "transA", 0)):
                    k, m = m, k
                dims.append((rows, m, k))
                break
        else:
            a, b = (x.shape for x in n.inputs[:2])
            if a and b and all(isinstance(d, int) for d in list(a) + list(b)):
                rows = int(np.prod(a[:-1])) if len(a) > 1 else 1
                dims.append((rows, int(b[-1]) if len(b) > 1 else 1, int(a[-1])))
    return dims


def matmul_flops(nodes) -> int:
    return sum(2 * r * m * k for r, m, k in matmul_dims(nodes))


_VIEWS = {"Reshape", "Squeeze", "Unsqueeze", "Identity", "Flatten"}  # no data moves
_SPECIAL = {"Exp", "Sigmoid", "Tanh", "Log", "Sqrt", "Div", "Pow", "Erf", "Softplus", "Reciprocal"}


def _weighted(n) -> bool:
    """A MatMul-like op with a constant 2-D weight (a projection)."""
    return n.op in MATMUL_LIKE and any(
        (w := const_value(t)) is not None and w.ndim == 2 for t in n.inputs[:2]
    )


def _elems(t) -> int:
    shape = getattr(t, "shape", None)
    if shape is None or not all(isinstance(d, int) for d in shape):
        return 0
    return int(np.prod(shape)) if shape else 1


def op_work(nodes, rows: int = 0):
    """(bytes touched, FLOPs, special) of every op among ``nodes`` but the projections:
    elementwise ops and reductions read their inputs and write their outputs (float32; views
    move nothing; a Gather reads the rows it picks), one FLOP per output element (``special``:
    exp, sigmoid, sqrt, ..., which the profile costs more per element), MatMuls of two
    activations (the WKV state's products) 2 x out x inner. ``rows``: a T-row call moves
    ``rows`` times the one-row bytes."""
    out = []
    for n in nodes:
        if _weighted(n):
            continue
        if getattr(n, "work", None) is not None:  # a written segment's stand-in (stream.py)
            moved, flops, special = n.work
            out.append((moved * max(rows, 1), flops * max(rows, 1), special))
            continue
        outs = sum(_elems(t) for t in n.outputs)
        ins = outs if n.op == "Gather" else sum(_elems(t) for t in n.inputs)  # rows it picks
        moved = 0 if n.op in _VIEWS else 4 * (ins + outs)
        flops = outs
        if n.op in MATMUL_LIKE:
            shape = getattr(n.inputs[0], "shape", None) or [1]
            flops = 2 * outs * (shape[-1] if isinstance(shape[-1], int) else 1)
        elif n.op in _VIEWS:
            flops = 0
        elif n.op.startswith("Reduce"):
            flops = ins
        out.append((moved * max(rows, 1), flops * max(rows, 1), n.op in _SPECIAL))
    return out


def gathers(nodes, rows: int = 0):
    """(table bytes, rows picked) of every Gather from a constant table among ``nodes`` (the
    embedding; ``rows``: a T-row call's row count instead of the indices' own)."""
    out = []
    for n in nodes:
        if n.op != "Gather" or not n.inputs:
            continue
        table = const_value(n.inputs[0])
        if table is None:
            continue
        picked = _elems(n.inputs[1]) if len(n.inputs) > 1 else 0
        out.append((int(table.size) * table.dtype.itemsize, rows or picked or 1))
    return out


def boundary_tensors(nodes) -> int:
    """Inputs and outputs of a segment made of ``nodes``: tensors read from outside (not
    constants) and tensors made for outside (read by another node, or by none: a graph output;
    a graph output also read inside is not seen: ``cut`` counts from the graph)."""
    from rwkv2rknn.compiler.ir import is_const

    held = [n.segment_io for n in nodes if getattr(n, "segment_io", None) is not None]
    if held:  # a written segment's stand-ins (compiler/stream.py) keep the count, not the edges
        return sum(held)
    inside = {id(n) for n in nodes}
    ins, outs = set(), set()
    for n in nodes:
        for t in n.inputs:
            if not is_const(t) and not (t.inputs and id(t.inputs[0]) in inside):
                ins.add(t.name)
        for t in n.outputs:
            if not t.outputs or any(id(c) not in inside for c in t.outputs):
                outs.add(t.name)
    ins.discard("")
    return len(ins) + len(outs)


def estimate_ms(
    device: str, nodes, profile, rows: int = 0, precision: str = "fp16", io: Optional[int] = None
) -> float:
    """Estimated time of one call of a segment under a device profile (``rows``: its T-row
    variant's row count instead of the graph's own; ``precision``: of the NPU build). A CPU
    segment counts its projections and every other op's bytes and FLOPs (``op_work``); an NPU
    segment its call, its MatMuls and its other ops (one NPU task each); both a Gather's rows
    from a table larger than the cache (``gathers``) and the executor's own cost of the run (per call and per input and output tensor: ``io`` of them, where not
    given counted from the nodes, ``boundary_tensors``)."""
    own = profile.executor_ms(boundary_tensors(nodes) if io is None else io)
    own += sum(profile.gather_ms(b, r) for b, r in gathers(nodes, rows))
    if device == "npu":
        return (
            own
            + profile.npu_segment_ms([(rows or r, m, k) for r, m, k in matmul_dims(nodes)], precision)
            + sum(
                profile.npu_op_ms(b, f, special)
                for b, f, special in op_work([n for n in nodes if n.op not in MATMUL_LIKE], rows)
            )
        )
    dims = [(rows or r, m, k) for r, m, k in matmul_dims([n for n in nodes if _weighted(n)])]
    return (
        own
        + sum(profile.cpu_matmul_ms(m, k, r) for r, m, k in dims)
        + sum(profile.cpu_op_ms(b, f, special) for b, f, special in op_work(nodes, rows))
    )


def split_head(segs, min_flops: int, state=()):
    """(segments, whether one was split): an NPU segment holding the head stage's nodes and
    others' (the last layer's NPU tail fused with the head) becomes two, the head's part after
    the rest. The head's part is what of the head stage reads no state (``state``: (input,
    output) names; a state output read as itself or through a reshape: a token shift of the
    last layer's FFN stays with the rest, which would otherwise give the same values out twice,
    as the state and to the head, and rknn-toolkit2 then gives one output too few) and nothing
    of the rest reads; it is split off where each part has a MatMul worth a call. A prompt needs
    the head's logits for its last row only, so its build then covers one row count (``build``)
    and prefill runs it once, not on every row of a chunk."""
    from rwkv2rknn.compiler.ir import stage_of

    out, split = [], False
    for s in segs:
        kept = {i for i, _ in state} | _viewed_as({o for _, o in state}, s.nodes)
        head = {
            id(n) for n in s.nodes if stage_of(n.name) == "head" and not any(t.name in kept for t in n.inputs)
        }
        changed = True
        while changed:  # the rest may not read the head's part
            made = {t.name for n in s.nodes if id(n) in head for t in n.outputs}
            readers = [n for n in s.nodes if id(n) not in head and any(t.name in made for t in n.inputs)]
            keep = {id(p) for r in readers for t in r.inputs for p in t.inputs}
            changed = bool(keep & head)
            head -= keep
        part = [n for n in s.nodes if id(n) in head]
        rest = [n for n in s.nodes if id(n) not in head]
        if (
            s.device != "npu"
            or not part
            or not rest
            or min(matmul_flops(part), matmul_flops(rest)) < max(min_flops, 1)
        ):
            out.append(s)
            continue
        out += [GraphSegment(device="npu", nodes=rest), GraphSegment(device="npu", nodes=part)]
        split = True
    return out, split


def _viewed_as(names, nodes) -> set:
    """``names`` and the tensors among ``nodes`` that become one of them through views only."""
    names, changed = set(names), True
    while changed:
        changed = False
        for n in nodes:
            if n.op in _VIEWS and n.outputs[0].name in names and n.inputs[0].name not in names:
                names.add(n.inputs[0].name)
                changed = True
    return names


def run(ctx: Context) -> None:
    graph = ctx.graph
    order = {n.name: i for i, n in enumerate(graph.nodes)}
    device = place(graph, ctx.support)
    segs = group(graph, device)
    pruned = 0
    profile = ctx.profile
    by_cost = ctx.options.placement == "cost"
    for s in segs:
        if s.device != "npu":
            continue
        if by_cost:  # the call and its two hand-offs must pay for themselves
            small = estimate_ms("npu", s.nodes, profile) + 2 * profile.handoff_ms >= estimate_ms(
                "cpu", s.nodes, profile
            )
        else:
            small = matmul_flops(s.nodes) < ctx.options.min_segment_flops
        if small:
            for n in s.nodes:
                device[n.name] = "cpu"
            pruned += 1
    if pruned:
        segs = group(graph, device)
    segs, split = split_head(
        segs,
        ctx.options.min_segment_flops,
        [(s.input, s.output) for s in ctx.state] + list(ctx.whole_state.values()),
    )
    for s in segs:
        s.nodes.sort(key=lambda n: order[n.name])
    ctx.segments = segs
    ctx.node_device = device
    n_npu = sum(s.device == "npu" for s in segs)
    ctx.note(
        NAME,
        f"{len(segs)} segments: {n_npu} NPU, {len(segs) - n_npu} CPU"
        + (f" ({pruned} NPU segment(s) too small to pay for a call, moved to the CPU)" if pruned else "")
        + (
            " (the head in an NPU segment of its own: prefill needs only the last row's logits)"
            if split
            else ""
        ),
        kind="summary",
        segments=len(segs),
        npu=n_npu,
        cpu=len(segs) - n_npu,
        pruned=pruned,
    )
