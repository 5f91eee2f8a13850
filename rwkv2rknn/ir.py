"""The compiler's shared state: one onnx-graphsurgeon graph plus what the passes learn about it.

Passes take a ``Context`` and edit ``ctx.graph`` in place (copying only where they need to), then
leave it cleaned up and toposorted. Helpers here are the graph edits more than one pass needs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

log = logging.getLogger(__name__)


@dataclass
class StateSlot:
    """One row of one layer's recurrent state: the graph input it enters by, the output it leaves by."""

    layer: int
    row: str
    input: str
    output: str
    accumulator: bool
    init: float = 0.0  # the value every element starts from


@dataclass
class TensorInfo:
    shape: Tuple[int, ...]
    dtype: str
    absmax: float


@dataclass
class Options:
    target: str = "rk3588"
    strict: bool = False
    verbose: bool = False
    plan_only: bool = False
    calib_tokens: int = 8
    seed: int = 0
    fp16_limit: float = 65504.0 / 4  # headroom: keep NPU tensors 4x below fp16's maximum
    min_segment_flops: int = 2 * 32 * 32
    cache_dir: Optional[str] = None
    build_timeout: float = 900.0
    placement: str = "npu"  # "npu": every constant-weight MatMul on the NPU; "cost": by the profile
    profile: Optional[str] = None  # device profile JSON (default: published RK3588 figures)
    prefill_rows: Tuple[int, ...] = (16, 32, 64)  # T-row NPU builds for prefill (empty: none)


@dataclass
class Context:
    graph: object  # onnx_graphsurgeon.Graph
    source: str = ""
    arch: str = ""
    shape: dict = field(default_factory=dict)
    token_input: str = "token"
    logits_output: str = "logits"
    state: List[StateSlot] = field(default_factory=list)
    # state tensors the loader could not unpack into rows: layer -> (input, output)
    whole_state: Dict[int, Tuple[str, str]] = field(default_factory=dict)
    options: Options = field(default_factory=Options)
    tensors: Dict[str, TensorInfo] = field(default_factory=dict)
    support: Dict[str, Tuple[str, str]] = field(default_factory=dict)  # node -> (kind, reason)
    forced_cpu: Dict[str, str] = field(default_factory=dict)  # node -> reason (range guard)
    segments: list = field(default_factory=list)  # filled by partition, then cut, then build
    report: List[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    @property
    def profile(self):
        """The device profile for placement and estimates (load sets it from --profile; the
        published RK3588 figures otherwise)."""
        if "profile" not in self.extra:
            from rwkv2rknn.profile import load_profile
            self.extra["profile"] = load_profile(self.options.profile)
        return self.extra["profile"]

    def note(self, pass_name: str, message: str) -> None:
        line = f"{pass_name}: {message}"
        self.report.append(line)
        log.info(line)


# --------------------------------------------------------------------------------------------
# graph helpers


def producers(graph) -> Dict[str, object]:
    return {t.name: n for n in graph.nodes for t in n.outputs}


def is_const(t) -> bool:
    import onnx_graphsurgeon as gs
    return isinstance(t, gs.Constant)


def const_value(t) -> Optional[np.ndarray]:
    return np.asarray(t.values) if is_const(t) else None


def bypass(graph, node) -> None:
    """Remove a one-in one-out node, wiring its input to its consumers (keeps graph output names)."""
    src, dst = node.inputs[0], node.outputs[0]
    if dst in graph.outputs:
        if src in graph.inputs or src in graph.outputs or is_const(src):
            node.op, node.attrs = "Identity", {}
            return
        name = dst.name
        graph.outputs[graph.outputs.index(dst)] = src
        dst.name = name + ".bypassed"
        src.name = name
        src.dtype = src.dtype or dst.dtype
        src.shape = src.shape or dst.shape
    for consumer in list(dst.outputs):
        for i, t in enumerate(consumer.inputs):
            if t is dst:
                consumer.inputs[i] = src
    node.outputs.clear()
    node.inputs.clear()


def layer_of(node_name: str) -> Optional[int]:
    """Layer index of a node from the loader's name prefix ('L3/...'); None for embed/head."""
    if node_name.startswith("L") and "/" in node_name:
        head = node_name.split("/", 1)[0][1:]
        if head.isdigit():
            return int(head)
    return None


def stage_of(node_name: str) -> str:
    return node_name.split("/", 1)[0] if "/" in node_name else ""


def export(graph):
    import onnx_graphsurgeon as gs
    model = gs.export_onnx(graph)
    model.ir_version = min(model.ir_version, 8)
    return model


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
