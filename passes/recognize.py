"""recognize: a whole model in one .onnx file: which input is the token, which inputs and outputs
are the recurrent state (paired), which output is the logits.

::

    input_id (int64 [])  -> Cast int32->int64 <- token (int32 [1])   one token input form
    state_{i}_{r} ........................ output_state_{i}_{r}      paired by name
    L{i}/state_in [rows, C] .............. L{i}/state_out            whole per-layer state (unpacked by ``state``)
    L{i}/wkv [H, N, N] ................... L{i}/wkv_out              named slots (RWKV-5.2/6/7)
    state{3i+r}_in ....................... state{3i+r}_out           one flat index across the model
    input_state [1, R, C] ................ out_state                 every layer in one tensor (``unstack``)
    output [V]                                                       the one unpaired output: logits

The token is the one integer input; whatever its form ([1], [] or [1, 1]; int32 or int64) the
compiled graph takes int32 ``[1]`` under the same name and converts it for the nodes that read it.
State inputs pair with outputs whose names are equal once the words in/input/out/output/new are
dropped (``state_0_1`` ~ ``output_state_0_1``, ``L0/state_in`` ~ ``L0/state_out``), else by
position among the rest with equal shapes. A layer number is read from each state name; names
that number every entry once (``state{3i+r}_in``) are split by the repeating pattern of shapes
(one matrix state per layer); one input holding every layer's state is first split into its
pieces (``unstack``). A new state of another shape but the same size as its input is reshaped
to it. Entries are named from their input names (``att_shift``), else by kind (the matrix state
``wkv``, the shifts around it). The graph says which entries are recurrence
accumulators (a new value computed from its own old value: RWKV-4's aa, bb and pp) and which are
token shifts (the new value does not read the old one). Row names come from the model
description where the names match a known layout. Initial values come from Constant nodes that
nothing reads, when the file has one per state input, else from the RWKV defaults. Nodes are
named by stage (``embed/``, ``L{i}/``, ``head/``) from which layer's state they depend on. The
version comes from our export's metadata, else from the state: with a matrix state the ops that
only feed the recurrence stay on the CPU with it (``ctx.cpu_recurrence_inputs``).

A file with no integer input is a single graph, not a whole model: compiled as it is.

Precondition: canonicalize has run (every tensor typed). Postcondition: ``ctx.token_input``,
``ctx.logits_output``, ``ctx.state`` (rows) or ``ctx.whole_state`` (per-layer tensors) set.
"""

from __future__ import annotations

import re
from typing import Dict, List, Tuple

import numpy as np

from rwkv2rknn.errors import UnsupportedModel
from rwkv2rknn.compiler.ir import Context, StateSlot, reshape_node
from rwkv2rknn.passes import unstack

NAME = "recognize"
_IO_WORDS = {"in", "input", "out", "output", "new", "next", "inp", "outp"}


def run(ctx: Context) -> None:
    from rwkv2rknn.models import rwkv4

    if ctx.token_input or ctx.whole_state or ctx.state:
        ctx.note(NAME, "layout already known from the loader")
        return
    graph = ctx.graph
    ints = [t for t in graph.inputs if t.dtype is not None and np.dtype(t.dtype).kind in "iu"]
    if len(ints) != 1:
        ctx.note(
            NAME,
            f"a single graph, not a whole model ({len(ints)} integer inputs, a whole "
            f"model has one token input): compiled as it is; run and check need a whole model",
        )
        return
    token = ints[0]
    pairs, how = _pair(graph, [t for t in graph.inputs if t is not token])
    source_pairs = list(pairs)
    pairs, split_into = unstack.stacked_pairs(graph, pairs)
    rest = [t for t in graph.outputs if t.name not in {o for _, o in pairs}]
    if len(rest) != 1:
        raise UnsupportedModel(
            f"cannot tell the logits among the unpaired outputs {[t.name for t in rest][:4]} "
            f"(state inputs pair with outputs {how})",
            "name each state output after its input (state_X -> output_state_X) and keep one other output",
        )
    logits = rest[0]
    token = _normalize_token(graph, token)
    ctx.token_input, ctx.logits_output = token.name, logits.name
    tensors = graph.tensors()
    _match_state_shapes(graph, pairs)
    tensors = graph.tensors()
    layers = _layers(pairs, tensors)
    layout = next(
        (
            name
            for name, pat in rwkv4.LAYOUT_STATE_NAMES.items()
            if all(re.fullmatch(pat, i) for i, _ in pairs)
        ),
        "",
    )
    width = max([int((tensors[i].shape or [1])[-1]) for i, _ in pairs] or [0])
    for layer, entries in sorted(layers.items()):
        shapes = {tuple(tensors[i].shape or ()) for _, i, _ in entries}
        if len(entries) == 1 and len(next(iter(shapes))) == 2:  # one [rows, C] state tensor
            ctx.whole_state[layer] = entries[0][1:]
            continue
        rows = rwkv4.LAYOUT_ROWS.get(layout) or _row_names([i for _, i, _ in entries], tensors)
        for pos, (r, i, o) in enumerate(entries):
            row = rows[pos] if not layout else rows[r] if r < len(rows) else f"s{r}"
            dims = tuple(int(x) for x in tensors[i].shape or ())
            ctx.state.append(
                StateSlot(
                    layer, row, i, o, _reads_itself(tensors[o], tensors[i]), dims if len(dims) > 1 else ()
                )
            )
    inits = _initial_values(ctx, tensors, rwkv4)
    init_of = {s.input: s.init for s in ctx.state}
    ctx.facts["source_state"] = [[i, o, init_of.get(i, 0.0)] for i, o in source_pairs]
    n_layers = len(layers)
    _name_stages(graph, ctx, n_layers)
    acc = [s for s in ctx.state if s.accumulator]
    rows_per_layer = len(ctx.state) // max(n_layers, 1)
    module = _module_of(ctx.facts.get("arch"))
    matrix_state = any(len(s.shape) > 2 for s in acc)
    arch = (
        module.ARCH
        if module
        else rwkv4.ARCH
        if ctx.whole_state
        or (rows_per_layer == len(rwkv4.STATE_ROWS) and len(acc) == n_layers * len(rwkv4.ACCUMULATOR_ROWS))
        else "rwkv"
    )
    ctx.arch = arch
    # a matrix state (RWKV-5.2/6/7): the ops that only feed the recurrence stay with it on the CPU
    ctx.cpu_recurrence_inputs = bool(getattr(module, "CPU_RECURRENCE_INPUTS", matrix_state and not module))
    ctx.shape = {"layers": n_layers, "width": width, "vocab": int(np.prod(logits.shape or (0,)))}
    ctx.layout = layout or ("rwkv2rknn one-file" if ctx.whole_state or module else "whole model")
    learned = ""
    if ctx.state:
        learned = (
            f"; per layer {rows_per_layer} state entries, {len(acc) // max(n_layers, 1)} "
            f"recurrence accumulator(s) ({', '.join(sorted({s.row for s in acc}))}) and "
            f"{rows_per_layer - len(acc) // max(n_layers, 1)} token shift(s), learned from the graph"
        )
        wrong = [s for s in ctx.state if layout and (s.row in rwkv4.ACCUMULATOR_ROWS) != s.accumulator]
        if wrong:
            learned += f"; {len(wrong)} entr(ies) disagree with the {layout} row names: the graph wins"
    stacked = "".join(
        f"; state '{i}' holds every layer's state: split into {n} pieces" for i, n in split_into.items()
    )
    ctx.note(
        NAME,
        f"recognised the {ctx.layout} layout ({arch}): {n_layers} layers, width "
        f"{width}, vocab {ctx.shape['vocab']}; token '{token.name}', state paired {how}"
        f"{stacked}{learned}; initial state {inits}",
    )


def _module_of(arch):
    """The model module our one-file export names in the file's metadata, or None."""
    from rwkv2rknn.models.export import MODULES

    return next((m for m in MODULES.values() if m.ARCH == arch), None) if arch else None


def _match_state_shapes(graph, pairs) -> None:
    """A new state of another shape but the same size as its input (some exporters' outputs
    keep a unit sequence axis: [1, 1, C] for a [1, C] input) is reshaped to the input's shape."""
    import onnx_graphsurgeon as gs

    tensors = graph.tensors()
    for i, o in pairs:
        tin, tout = tensors[i], tensors[o]
        a, b = list(tin.shape or []), list(tout.shape or [])
        if a == b or not all(isinstance(d, int) for d in a + b) or int(np.prod(a)) != int(np.prod(b)):
            continue
        src = gs.Variable(o + ".unshaped", dtype=tout.dtype, shape=b)
        for node in list(tout.inputs):
            node.outputs = [src if t is tout else t for t in node.outputs]
        for node in list(tout.outputs):
            node.inputs = [src if t is tout else t for t in node.inputs]
        graph.nodes.append(reshape_node(src, tout, a, o + ".reshape", o + ".shape"))
        tout.shape = a
    graph.toposort()


def _layers(pairs, tensors) -> Dict[int, List[Tuple[int, str, str]]]:
    """{layer: [(row, input, output)]} from the layer number in each state input's name. Names
    that number every entry once across the model (``state{3*i+r}_in``) are read as one flat
    index when the entries repeat a per-layer pattern of shapes with one matrix state each."""
    nums = {i: [int(x) for x in re.findall(r"\d+", i)] for i, _ in pairs}
    bad = next((i for i, n in nums.items() if not n), None)
    if bad:
        raise UnsupportedModel(
            f"state input '{bad}' names no layer number",
            "name state inputs with their layer, like state_{layer}_{row}",
        )
    layers: Dict[int, List[Tuple[int, str, str]]] = {}
    flat = sorted(pairs, key=lambda p: nums[p[0]][0])
    matrices = sum(len(tensors[i].shape or ()) > 2 for i, _ in pairs)
    period = len(pairs) // matrices if matrices else 0
    shapes = [tuple(tensors[i].shape or ()) for i, _ in flat]
    if (
        period > 1
        and len(pairs) % matrices == 0
        and all(len(n) == 1 for n in nums.values())
        and len({n[0] for n in nums.values()}) == len(pairs)
        and all(shapes[k] == shapes[k % period] for k in range(len(shapes)))
    ):
        for k, (i, o) in enumerate(flat):
            layers.setdefault(k // period, []).append((k % period, i, o))
        return layers
    for k, (i, o) in enumerate(pairs):
        n = nums[i]
        layers.setdefault(n[0], []).append((n[1] if len(n) > 1 else k, i, o))
    for entries in layers.values():
        entries.sort()
    return layers


def _row_names(inputs, tensors) -> List[str]:
    """A name for each state entry of one layer: its input's name without numbers and the
    in/out words where those differ (``L0/att_shift`` -> att_shift), else by kind: the one
    matrix state is ``wkv``, the vectors around it ``att_shift`` and ``ffn_shift`` (one before,
    one after), else ``shift{k}``."""
    names = ["_".join(w for w in _words(i) if not re.search(r"\d", w)) for i in inputs]
    if all(names) and len(set(names)) == len(names):
        return names
    kinds = [len(tensors[i].shape or ()) > 2 for i in inputs]
    if kinds.count(True) != 1:
        return [f"s{k}" for k in range(len(inputs))]
    at = kinds.index(True)
    if len(kinds) == 3 and at == 1:
        return ["att_shift", "wkv", "ffn_shift"]
    return ["wkv" if m else f"shift{k}" for k, m in enumerate(kinds)]


def _words(name: str) -> Tuple[str, ...]:
    return tuple(w for w in re.split(r"[_./:\-]+", name.lower()) if w and w not in _IO_WORDS)


def _pair(graph, state_ins):
    """[(input name, output name)] and how they were paired."""
    outs = list(graph.outputs)
    by_words: Dict[Tuple[str, ...], list] = {}
    for o in outs:
        by_words.setdefault(_words(o.name), []).append(o)
    pairs, left = [], []
    for i in state_ins:
        match = by_words.get(_words(i.name), [])
        if len(match) == 1 and match[0].name != i.name:
            pairs.append((i.name, match[0].name))
        else:
            left.append(i)
    how = "by name"
    if left:  # by position among the unpaired outputs of the same shape
        taken = {o for _, o in pairs}
        free = [o for o in outs if o.name not in taken]
        for i in left:
            same = [o for o in free if list(o.shape or []) == list(i.shape or [])]
            if not same:
                raise UnsupportedModel(
                    f"state input '{i.name}' has no output of its shape to pair with",
                    "give each state input an output of the same shape",
                )
            pairs.append((i.name, same[0].name))
            free.remove(same[0])
        how = "by name" if len(left) < len(state_ins) else "by position"
        how = f"{how} ({len(left)} by position)" if 0 < len(left) < len(state_ins) else how
    return pairs, how


def _reads_itself(out, inp) -> bool:
    """Does the new value ``out`` depend on the old value ``inp``? (a recurrence accumulator)"""
    stack, seen = [out], set()
    while stack:
        t = stack.pop()
        if t is inp:
            return True
        for node in t.inputs:
            if id(node) in seen:
                continue
            seen.add(id(node))
            stack.extend(node.inputs)
    return False


def _normalize_token(graph, token):
    """The token input becomes int32 [1] (same name); nodes that read it get its old form."""
    import onnx_graphsurgeon as gs
    from onnx import helper

    shape, dtype = list(token.shape or []), np.dtype(token.dtype)
    if shape == [1] and dtype == np.int32:
        return token
    readers = [n for n in graph.nodes if token in n.inputs]
    new = gs.Variable(token.name, dtype=np.int32, shape=[1])
    token.name += ".src"
    x = new
    if dtype != np.int32:
        y = gs.Variable(f"{new.name}.cast", dtype=dtype, shape=[1])
        graph.nodes.append(
            gs.Node(
                "Cast",
                name=f"{new.name}.to_{dtype.name}",
                inputs=[x],
                outputs=[y],
                attrs={"to": helper.np_dtype_to_tensor_dtype(dtype)},
            )
        )
        x = y
    if shape != [1]:
        y = gs.Variable(f"{new.name}.reshaped", dtype=dtype, shape=shape)
        graph.nodes.append(reshape_node(x, y, shape, f"{new.name}.reshape", f"{new.name}.shape"))
        x = y
    for n in readers:
        n.inputs = [x if t is token else t for t in n.inputs]
    graph.inputs[graph.inputs.index(token)] = new
    graph.cleanup().toposort()
    return new


def _initial_values(ctx: Context, tensors, rwkv4) -> str:
    """Set each slot's initial value; say where they came from."""
    dangling = [np.asarray(v) for v in ctx.unread_constants.values()]
    slots = ctx.state
    fits = len(dangling) == len(slots) and all(
        int(d.size) == int(np.prod(tensors[s.input].shape or (1,))) for d, s in zip(dangling, slots)
    )
    if slots and fits and all(np.all(d == d.reshape(-1)[0]) for d in dangling):
        for k, (d, s) in enumerate(zip(dangling, slots)):
            slots[k] = StateSlot(
                s.layer, s.row, s.input, s.output, s.accumulator, s.shape, init=float(d.reshape(-1)[0])
            )
        where = "from the file's unread Constant nodes"
    else:
        for k, s in enumerate(slots):
            slots[k] = StateSlot(
                s.layer,
                s.row,
                s.input,
                s.output,
                s.accumulator,
                s.shape,
                init=float(rwkv4.RWKV_INIT.get(s.row, 0.0)),
            )
        where = "RWKV defaults (the file carries none)"
    if not slots:
        return "all zero (per-layer state tensors)"
    nonzero = sorted({f"{s.row}={s.init:g}" for s in slots if s.init})
    return where + (f": {', '.join(nonzero)}" if nonzero else ", all zero")


def _name_stages(graph, ctx: Context, n_layers: int) -> None:
    """Prefix node names with their stage unless the file already names them so."""
    from rwkv2rknn.compiler.ir import stage_of

    valid = {"embed", "head"} | {f"L{i}" for i in range(n_layers)}
    if all(stage_of(n.name) in valid for n in graph.nodes):
        return
    layer_of_input = {s.input: s.layer for s in ctx.state}
    layer_of_input.update({i: layer for layer, (i, _) in ctx.whole_state.items()})
    state_outs = {s.output for s in ctx.state} | {o for _, o in ctx.whole_state.values()}
    up: Dict[int, int] = {}
    for n in graph.nodes:  # toposorted: the deepest layer whose state reaches the node
        level = max(
            [layer_of_input.get(t.name, -1) for t in n.inputs]
            + [up[id(p)] for t in n.inputs for p in t.inputs],
            default=-1,
        )
        up[id(n)] = level
    feeds_state = set()
    for n in reversed(graph.nodes):
        if any(t.name in state_outs or any(id(c) in feeds_state for c in t.outputs) for t in n.outputs):
            feeds_state.add(id(n))
    for k, n in enumerate(graph.nodes):
        level = up[id(n)]
        stage = (
            "embed"
            if level < 0
            else ("head" if level == n_layers - 1 and id(n) not in feeds_state else f"L{level}")
        )
        n.name = f"{stage}/{n.name or f'{n.op}_{k}'}"
