"""SmoothQuant-style per-channel scales folded into an NPU segment before an int8 build.

int8 activations get one scale per tensor, so an input channel with large values costs every
other channel its resolution. RWKV gives two places where a per-channel scale s costs nothing at
run time, because the op in front of the projection is per-channel and linear (or homogeneous):

- the token-shift mix ``x*mix + prev*(1 - mix)`` in front of a projection ``W`` [in, out]: both
  mix vectors are divided by s and row j of W is multiplied by s_j (the two mix vectors are
  separate constants in the graph);
- the channel-mix value input ``relu(k)^2``: column j of the key weight is divided by sqrt(s_j)
  (``relu`` is positively homogeneous, the square makes it s_j) and row j of the value weight is
  multiplied by s_j.

The segment computes the same function in exact arithmetic (fp32 onnxruntime differs in
rounding only); its inputs and outputs, and so its calibration rows, are unchanged. The scale per
channel is ``max|x_j|^alpha / max|W_j,:|^(1 - alpha)`` (SmoothQuant), the activation maximum
measured on the segment's calibration rows.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np

log = logging.getLogger(__name__)

ALPHA = 0.5


@dataclass
class Site:
    """One projection whose input channels can be rescaled for free."""

    weight: str  # the projection's weight initializer [in, out]
    act: str  # the tensor whose per-channel range is smoothed (the MatMul's input before reshapes)
    divide: List[str]  # mix vectors divided by s (mix sites)
    key: str = ""  # relu^2 sites: the key weight [in, hidden] whose columns are divided by sqrt(s)


def _index(model):
    inits = {i.name: i for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    users: Dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            users.setdefault(i, []).append(n)
    return inits, producer, users


def _through_reshape(name: str, producer) -> str:
    n = producer.get(name)
    while n is not None and n.op_type == "Reshape":
        name = n.input[0]
        n = producer.get(name)
    return name


def find_sites(model) -> List[Site]:
    """The projections of ``model`` (onnx ModelProto) whose input is a token-shift mix or relu^2,
    each of whose constants is used by that site alone."""
    from onnx import numpy_helper

    inits, producer, users = _index(model)
    outputs = {o.name for o in model.graph.output}
    sites = []
    for n in model.graph.node:
        if n.op_type != "MatMul" or n.input[1] not in inits or len(inits[n.input[1]].dims) != 2:
            continue
        w = n.input[1]
        if len(users.get(w, [])) != 1:
            continue
        act = _through_reshape(n.input[0], producer)
        if act in outputs or len(users.get(act, [])) != 1:
            continue
        p = producer.get(act)
        if p is None:
            continue
        width = inits[w].dims[0]
        if p.op_type == "Add":
            muls = [producer.get(i) for i in p.input]
            consts = []
            for m in muls:
                if m is None or m.op_type != "Mul" or len(users.get(m.output[0], [])) != 1:
                    break
                c = [i for i in m.input if i in inits]
                if len(c) != 1 or len(users.get(c[0], [])) != 1 or int(np.prod(inits[c[0]].dims)) != width:
                    break
                consts.append(c[0])
            if len(consts) == 2:
                sites.append(Site(w, act, consts))
        elif p.op_type == "Mul" and p.input[0] == p.input[1]:
            r = producer.get(p.input[0])
            if r is None or r.op_type != "Relu" or len({id(u) for u in users.get(r.output[0], [])}) != 1:
                continue
            k = producer.get(_through_reshape(r.input[0], producer))
            if (
                k is None
                or k.op_type != "MatMul"
                or k.input[1] not in inits
                or len(users.get(k.input[1], [])) != 1
            ):
                continue
            kw = numpy_helper.to_array(inits[k.input[1]])
            if kw.ndim == 2 and kw.shape[1] == width:
                sites.append(Site(w, act, [], key=k.input[1]))
    return sites


def channel_max(
    model, sites: Sequence[Site], feeds: Sequence[Dict[str, np.ndarray]]
) -> Dict[str, np.ndarray]:
    """max |activation| per input channel of each site over ``feeds`` (fp32 onnxruntime)."""
    import onnx
    import onnxruntime as ort

    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    for s in sites:
        if s.act not in have:
            m.graph.output.append(onnx.helper.make_empty_tensor_value_info(s.act))
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    names = [s.act for s in sites]
    inputs = [i.name for i in sess.get_inputs()]
    out: Dict[str, np.ndarray] = {}
    for feed in feeds:
        got = sess.run(names, {k: np.asarray(feed[k], np.float32) for k in inputs})
        for name, a in zip(names, got):
            a = np.abs(np.asarray(a, np.float32)).reshape(-1, np.asarray(a).shape[-1]).max(0)
            out[name] = a if name not in out else np.maximum(out[name], a)
    return out


def scales_for(act_max: np.ndarray, w: np.ndarray, alpha: float = ALPHA) -> np.ndarray:
    """SmoothQuant's per-input-channel scale, kept within [1e-2, 1e2] and 1 for dead channels."""
    wmax = np.abs(w).max(1)
    s = np.where(
        (act_max > 0) & (wmax > 0),
        np.power(np.maximum(act_max, 1e-12), alpha) / np.power(np.maximum(wmax, 1e-12), 1 - alpha),
        1.0,
    )
    return np.clip(s, 1e-2, 1e2).astype(np.float64)


def measure(model, feeds, alpha: float = ALPHA, squares: bool = True) -> Dict[str, np.ndarray]:
    """The scale of every smoothable site of ``model`` (by its weight name), from ``feeds``
    (``squares``: the relu^2 sites too, else the mix sites only)."""
    from onnx import numpy_helper

    sites = [s for s in find_sites(model) if squares or not s.key]
    if not sites or not feeds:
        return {}
    inits = {i.name: i for i in model.graph.initializer}
    amax = channel_max(model, sites, feeds)
    return {s.weight: scales_for(amax[s.act], numpy_helper.to_array(inits[s.weight]), alpha) for s in sites}


def apply(model, scales: Dict[str, np.ndarray]) -> int:
    """Fold ``scales`` (weight name -> s) into ``model`` in place; returns the sites folded (a
    site of ``scales`` that this model does not have the same way is left alone)."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    done = 0
    for site in find_sites(model):
        s = scales.get(site.weight)
        if s is None:
            continue

        def put(name: str, f):
            a = numpy_helper.to_array(inits[name])
            inits[name].CopyFrom(numpy_helper.from_array(f(a.astype(np.float64)).astype(a.dtype), name))

        put(site.weight, lambda w: w * s[:, None])
        for c in site.divide:
            put(c, lambda v: (v.reshape(-1) / s).reshape(v.shape))
        if site.key:
            put(site.key, lambda w: w / np.sqrt(s)[None, :])
        done += 1
    return done


def smooth_files(
    paths: Sequence[str], feeds, alpha: float = ALPHA, measured_on: Optional[str] = None, squares: bool = True
) -> int:
    """Measure the scales on ``measured_on`` (default the first of ``paths``: the per-token
    segment, which ``feeds`` fit) and fold them into every file of ``paths`` (rewritten)."""
    import onnx

    first = onnx.load(measured_on or paths[0])
    scales = measure(first, feeds, alpha, squares)
    n = 0
    for p in paths:
        m = onnx.load(p)
        k = apply(m, scales)
        if k:
            onnx.save(m, p)
        n = max(n, k)
    return n
