"""Range tracing: run the compiler's whole graph on sample tokens with ONNX Runtime (fp32).

The fp16 range guard needs, for every tensor, its shape, dtype and the largest |value| it takes.
``trace`` exposes every variable tensor as a graph output, runs the tokens one step at a time
(feeding each step's state outputs back as the next step's state inputs) and keeps the maxima.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np

from rwkv2rknn.ir import Context, TensorInfo, export


def trace(ctx: Context, tokens: Sequence[int], names: Optional[List[str]] = None,
          tensor_filter=None) -> Dict[str, TensorInfo]:
    """Run ``tokens`` through the whole graph with ONNX Runtime (fp32), threading the state.

    Returns, for every variable tensor, its shape, dtype and the largest |value| seen.
    Needs a graph whose inputs are the token and the state slots.
    """
    import onnx_graphsurgeon as gs
    from rwkv2rknn.runtime.ort import make_session

    graph = ctx.graph.copy()
    wanted = [t for t in graph.tensors().values()
              if isinstance(t, gs.Variable) and t not in graph.inputs and
              (tensor_filter is None or tensor_filter(t))]
    outs = list(graph.outputs)
    for t in wanted:
        if t not in outs:
            t.dtype = t.dtype or None
            outs.append(t)
    graph.outputs = outs
    for t in graph.outputs:
        if t.dtype is None:
            t.dtype = np.float32  # only used as a hint; onnxruntime infers the real type
    model = export(graph)
    del graph
    for o in model.graph.output:
        o.type.tensor_type.ClearField("shape")
    data = model.SerializeToString()
    del model  # peak memory: never the graph, its proto, its bytes and the session at once
    sess, _ = make_session(data, what="the traced graph")
    del data
    in_types = {i.name: i.type for i in sess.get_inputs()}
    out_names = [o.name for o in sess.get_outputs()]
    feeds = {}
    rng = np.random.default_rng(ctx.options.seed)
    for inp in sess.get_inputs():
        if inp.name == ctx.token_input:
            continue
        shape = [int(d) if isinstance(d, int) else 1 for d in inp.shape]
        if ctx.token_input:  # a whole model: states start at zero
            feeds[inp.name] = np.zeros(shape, np.float32)
        else:  # a lone graph: seeded normal samples
            feeds[inp.name] = rng.standard_normal(shape).astype(np.float32)
    state_pairs = [(s.input, s.output) for s in ctx.state] + list(ctx.whole_state.values())
    info: Dict[str, TensorInfo] = {}
    for tok in tokens:
        tok_dtype = np.int64 if in_types.get(ctx.token_input) == "tensor(int64)" else np.int32
        if ctx.token_input:
            feeds[ctx.token_input] = np.array([tok], tok_dtype)
        values = dict(zip(out_names, sess.run(out_names, feeds)))
        values.update(feeds)
        for name, v in values.items():
            v = np.asarray(v)
            m = float(np.max(np.abs(v))) if v.size and v.dtype.kind == "f" else 0.0
            if not np.isfinite(m):
                m = float("inf")
            old = info.get(name)
            info[name] = TensorInfo(tuple(v.shape), str(v.dtype), max(m, old.absmax if old else 0.0))
        for i, o in state_pairs:
            feeds[i] = values[o]
    return info
