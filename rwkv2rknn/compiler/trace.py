"""Range tracing: run the compiler's whole graph on sample tokens with ONNX Runtime (fp32).

The fp16 range guard needs, for every tensor, its shape, dtype and the largest |value| it takes.
``trace`` exposes every variable tensor as a graph output, runs the tokens one step at a time
(feeding each step's state outputs back as the next step's state inputs) and keeps the maxima.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from rwkv2rknn.compiler.ir import Context, TensorInfo, export


# Constants of at least this many bytes reach onnxruntime as inputs fed from the graph's own
# arrays (onnxruntime reads a numpy input in place), not inside the serialised model: no proto,
# no bytes and no session copy of the embedding or the head.
FED_ABOVE = 1 << 20


def _session(graph, tensor_filter=None):
    """An onnxruntime session of ``graph`` with every typed variable tensor as an output, and
    the feeds of its large constants (made graph inputs): ``(session, {name: array})``."""
    import onnx_graphsurgeon as gs
    from rwkv2rknn.compiler.ir import is_const
    from rwkv2rknn.runtime.ort import make_session

    graph = graph.copy()  # its constants share the arrays
    weights, fed = {}, {}
    for node in graph.nodes:
        for i, t in enumerate(node.inputs):
            if is_const(t) and np.asarray(t.values).nbytes >= FED_ABOVE:
                if t.name not in fed:
                    arr = np.ascontiguousarray(np.asarray(t.values))
                    weights[t.name] = arr
                    fed[t.name] = gs.Variable(t.name, dtype=arr.dtype, shape=list(arr.shape))
                node.inputs[i] = fed[t.name]
    graph.inputs = list(graph.inputs) + list(fed.values())
    # only typed tensors can be graph outputs (canonicalize types every tensor; an untyped one
    # is not guessed, a wrong guess makes onnxruntime refuse the graph)
    wanted = [
        t
        for t in graph.tensors().values()
        if isinstance(t, gs.Variable)
        and t not in graph.inputs
        and t.dtype is not None
        and (tensor_filter is None or tensor_filter(t))
    ]
    outs = list(graph.outputs)
    for t in wanted:
        if t not in outs:
            outs.append(t)
    graph.outputs = outs
    model = export(graph)
    del graph
    for o in model.graph.output:
        o.type.tensor_type.ClearField("shape")
    data = model.SerializeToString()
    del model  # peak memory: never the graph, its proto, its bytes and the session at once
    sess, _ = make_session(data, what="the traced graph", prepack=False)
    return sess, weights


def _record(info: Dict[str, TensorInfo], values: Dict[str, np.ndarray]) -> None:
    for name, v in values.items():
        v = np.asarray(v)
        m = float(np.max(np.abs(v))) if v.size and v.dtype.kind == "f" else 0.0
        if not np.isfinite(m):
            m = float("inf")
        old = info.get(name)
        info[name] = TensorInfo(tuple(v.shape), str(v.dtype), max(m, old.absmax if old else 0.0))


def trace(
    ctx: Context, tokens: Sequence[int], names: Optional[List[str]] = None, tensor_filter=None
) -> Dict[str, TensorInfo]:
    """Run ``tokens`` through the whole graph with ONNX Runtime (fp32), threading the state.

    Returns, for every variable tensor, its shape, dtype and the largest |value| seen.
    Needs a graph whose inputs are the token and the state slots.
    """
    from rwkv2rknn.runtime.ort import ORT_TYPES

    sess, weights = _session(ctx.graph, tensor_filter)
    out_names = [o.name for o in sess.get_outputs()]
    feeds, token = {}, None
    rng = np.random.default_rng(ctx.options.seed)
    init = {s.input: s.init for s in ctx.state}
    for inp in sess.get_inputs():  # dtype and shape as the graph declares them
        if inp.name in weights:
            continue
        dtype = ORT_TYPES.get(inp.type, np.float32)
        shape = [int(d) if isinstance(d, int) else 1 for d in inp.shape]
        if inp.name == ctx.token_input:
            token = (dtype, shape)
        elif np.dtype(dtype).kind != "f":
            feeds[inp.name] = np.zeros(shape, dtype)
        elif ctx.token_input:  # a whole model: states start at their initial values
            feeds[inp.name] = np.full(shape, init.get(inp.name, 0.0), dtype)
        else:  # a lone graph: seeded normal samples
            feeds[inp.name] = rng.standard_normal(shape).astype(dtype)
    state_pairs = [(s.input, s.output) for s in ctx.state] + list(ctx.whole_state.values())
    info: Dict[str, TensorInfo] = {}
    for tok in tokens:
        if token is not None:
            feeds[ctx.token_input] = np.full(token[1], tok, token[0])
        values = dict(zip(out_names, sess.run(out_names, {**feeds, **weights})))
        values.update(feeds)
        _record(info, values)
        for i, o in state_pairs:
            feeds[i] = values[o]
    return info


def trace_steps(
    graph, steps: Sequence[Dict[str, np.ndarray]], state_pairs, keep: Sequence[str] = ()
) -> Tuple[Dict[str, TensorInfo], Dict[str, list]]:
    """Run one stage of a model (one layer's graph) step by step: ``steps[k]`` feeds the
    inputs that come from before the stage at step k (the token, or the hidden state the
    previous stage made at that step); the stage's own state inputs start at zero and are
    threaded by ``state_pairs`` (input, output). Returns what ``trace`` returns, and the values
    of the ``keep`` tensors at every step (what the next stage is fed)."""
    from rwkv2rknn.runtime.ort import ORT_TYPES

    sess, weights = _session(graph)
    out_names = [o.name for o in sess.get_outputs()]
    feeds = {}
    for inp in sess.get_inputs():
        if inp.name not in weights and (not steps or inp.name not in steps[0]):
            shape = [int(d) if isinstance(d, int) else 1 for d in inp.shape]
            feeds[inp.name] = np.zeros(shape, ORT_TYPES.get(inp.type, np.float32))
    info: Dict[str, TensorInfo] = {}
    kept: Dict[str, list] = {k: [] for k in keep}
    for step in steps:
        feeds.update(step)
        values = dict(zip(out_names, sess.run(out_names, {**feeds, **weights})))
        values.update(feeds)
        _record(info, values)
        for k in keep:
            kept[k].append(values[k])
        for i, o in state_pairs:
            feeds[i] = values[o]
    return info, kept
