"""unstack: one state input that holds every layer's state, split into one input per piece.

Some exporters keep the whole recurrent state in one tensor ``[1, R, C]`` (RWKV_Pytorch: per
layer a channel-mix shift row, a time-mix shift row, then the wkv state as N rows of C), read
pieces of it with ``Gather`` (a row) or ``Slice`` (a block of rows) on axis 1, and write them
back in place with ``ScatterND``::

    input_state -> Gather(1) ....... ScatterND(rows 1) -> ScatterND(rows 2:66) -> ... -> out_state
               \\-> Slice(2:66) ...

Each piece (a row or a block) becomes its own graph input and output (``input_state.r{k}``
[1, C] or [1, rows, C] / ``out_state.r{k}``), read where the pieces were read and taken from
the update that last wrote it, so that each piece can live where it is used; the ScatterND
chain goes. Reads and writes must cover the same pieces, without overlap.

Used by recognize on a state pair whose input is ``[1, R, C]``.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import numpy as np

from rwkv2rknn.errors import UnsupportedModel
from rwkv2rknn.compiler.ir import const_value, replace_uses, reshape_node

Region = Tuple[int, int]


def _region(node, stacked_rank: int) -> Optional[Region]:
    """The rows [a, b) of axis 1 that a Gather / Slice reads or a ScatterND writes, else None."""
    if node.op == "Gather" and int(node.attrs.get("axis", 0)) == 1:
        k = const_value(node.inputs[1])
        return (int(k), int(k) + 1) if k is not None and k.size == 1 and k.ndim == 0 else None
    if node.op == "Slice" and len(node.inputs) >= 4:
        a, b, axes = (const_value(t) for t in node.inputs[1:4])
        steps = const_value(node.inputs[4]) if len(node.inputs) > 4 else np.ones(1)
        if (
            any(v is None or v.size != 1 for v in (a, b, axes, steps))
            or int(axes) % stacked_rank != 1
            or int(steps) != 1
        ):
            return None
        return int(a), int(b)
    if node.op == "ScatterND":
        idx = const_value(node.inputs[1])
        if idx is None or idx.shape[-1] != 2 or np.any(idx[..., 0] != 0):
            return None
        rows = np.sort(idx[..., 1].reshape(-1))
        if not np.array_equal(rows, np.arange(rows[0], rows[0] + rows.size)):
            return None
        return int(rows[0]), int(rows[0]) + int(rows.size)
    return None


def _uses(t, stacked_rank: int, chain: List[object], reads: List[Tuple[object, Region]]) -> str:
    """Walk the ScatterND chain from ``t``, collecting writes and reads; '' or what is wrong."""
    writes = [n for n in t.outputs if n.op == "ScatterND"]
    if len(writes) > 1:
        return f"its in-place writes branch at '{t.name}'"
    for node in t.outputs:
        region = _region(node, stacked_rank)
        if region is None or (node.op == "ScatterND" and node.inputs[0] is not t):
            return f"{node.op} node '{node.name}' uses it in another way"
        if node.op == "ScatterND":
            chain.append((node, region))
            why = _uses(node.outputs[0], stacked_rank, chain, reads)
            if why:
                return why
        else:
            reads.append((node, region))
    return ""


def split(graph, name_in: str, name_out: str) -> List[Tuple[str, str]]:
    """Replace the stacked pair by one pair per piece; returns the new (input, output) names
    in row order. Raises UnsupportedModel naming what was found when it cannot."""
    import onnx_graphsurgeon as gs

    tensors = graph.tensors()
    src, out = tensors[name_in], tensors[name_out]
    shape = list(src.shape or [])
    found = f"one state input '{name_in}' {shape} holding every layer's state"
    chain: List[Tuple[object, Region]] = []
    reads: List[Tuple[object, Region]] = []
    why = _uses(src, len(shape), chain, reads)
    if not why and (not chain or chain[-1][0].outputs[0] is not out):
        why = f"'{name_out}' is not the end of its in-place writes"
    regions = sorted({r for _, r in chain} | {r for _, r in reads})
    if not why and any(a[1] > b[0] for a, b in zip(regions, regions[1:])):
        why = "pieces read or written overlap"
    if why:
        raise UnsupportedModel(f"{found}: {why}", "export one state tensor per layer and kind")
    width = int(shape[-1])
    position = {id(src): -1}
    position.update({id(n.outputs[0]): j for j, (n, _) in enumerate(chain)})
    pairs, new_in, new_out = [], [], []
    for k, (a, b) in enumerate(regions):
        piece = [1, width] if b - a == 1 else [1, b - a, width]
        vin = gs.Variable(f"{name_in}.r{k}", dtype=src.dtype, shape=piece)
        for node, region in reads:
            if region != (a, b):
                continue
            at = position[id(node.inputs[0])]  # the piece as last written before this read
            upd = next((n.inputs[2] for n, r in reversed(chain[: at + 1]) if r == region), vin)
            want = [1, width] if node.op == "Gather" else [1, b - a, width]
            replace_uses(
                node.outputs[0],
                vin if upd is vin and want == piece else _reshaped(graph, upd, want, f"{node.name}.piece"),
            )
        upd = next((n.inputs[2] for n, r in reversed(chain) if r == (a, b)), vin)
        vout = _reshaped(graph, _unexpanded(upd, piece), piece, f"{name_out}.r{k}")
        new_in.append(vin)
        new_out.append(vout)
        pairs.append((vin.name, vout.name))
    pos = graph.inputs.index(src)
    graph.inputs[pos : pos + 1] = new_in
    pos = graph.outputs.index(out)
    graph.outputs[pos : pos + 1] = new_out
    graph.cleanup().toposort()
    return pairs


def _unexpanded(t, piece):
    """The value before the Reshapes and the Expand that only add unit axes (torch writes an
    in-place update expanded to the index shape): the same numbers, and no broadcast to place."""
    size = int(np.prod(piece))
    while t.inputs and t.inputs[0].op in ("Expand", "Reshape"):
        src = t.inputs[0].inputs[0]
        dims = list(src.shape or [])
        if not dims or not all(isinstance(d, int) for d in dims) or int(np.prod(dims)) != size:
            break
        t = src
    return t


def _reshaped(graph, t, shape, name: str):
    import onnx_graphsurgeon as gs

    out = gs.Variable(name, dtype=t.dtype, shape=list(shape))
    graph.nodes.append(reshape_node(t, out, shape, f"{name}.reshape", f"{name}.shape"))
    return out


def stacked_pairs(graph, pairs) -> Tuple[List[Tuple[str, str]], Dict[str, int]]:
    """``pairs`` with every stacked state split (an input ``[1, R, C]`` whose name numbers no
    layer, or that is read only by pieces); and how many pieces each split input became."""
    import re

    tensors = graph.tensors()
    out, split_into = [], {}
    for i, o in pairs:
        shape = list(tensors[i].shape or [])
        if (
            len(shape) == 3
            and shape[0] == 1
            and (
                not re.search(r"\d", i)
                or all(n.op in ("Gather", "Slice", "ScatterND") for n in tensors[i].outputs)
            )
        ):
            new = split(graph, i, o)
            split_into[i] = len(new)
            out += new
        else:
            out.append((i, o))
    return out, split_into
