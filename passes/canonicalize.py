"""canonicalize: one normal form of the graph, whichever exporter wrote the file.

::

    Shape -> Gather -> Unsqueeze -> Concat -+                      const shape -+
    x ------------------------------------- Reshape        =>      x ---------- Reshape
    ONNX local functions (torch: export_modules_as_functions)  => inlined (onnx.inliner)
    GatherND(table, Unsqueeze(i, [-1]))  (dynamo: table[i]) =>    Gather(table, i, axis=0)
    GroupNormalization(x, scale, bias; G)                 =>      Reshape [N, G, -1] -> the LayerNorm
                                                                  form over the last axis -> scale
                                                                  (per group at opset 18-20, per
                                                                  channel at 21) -> Reshape back
    LpNormalization(x; axis, p)                           =>      x / ReduceL{p}(x, axis)
    RMSNormalization(x, scale; axis -1)                   =>      x / Sqrt(ReduceMean(x*x) + eps) * scale
    Gemm(A, B, C; transA, transB, alpha, beta)            =>      MatMul(A', alpha B') -> Add(beta C)
    LayerNormalization(x, w, b)                           =>      ReduceMean/Sub/Mul/ReduceMean/Add/Sqrt/Div/Mul/Add
    ReduceMean(x[C])  (no axes)                           =>      ReduceMean(x, axes=[-1])
    a -> Identity -> Identity -> b                        =>      a (named b when b is a graph output)

The ONNX ecosystem does the work: ``onnx.version_converter`` brings every file to one opset
(``OPSET``; opsets 13 to 18 differ in where ReduceMean, Split, Squeeze and Unsqueeze keep their
axes; opset 18's reductions are brought down by hand), ``onnx.shape_inference`` gives every tensor a dtype and a shape once the graph inputs'
symbolic dimensions are pinned to the decode shape, and onnx-graphsurgeon's ``fold_constants``
(which evaluates with onnxruntime) folds shape arithmetic and every other constant subgraph,
``Constant`` nodes included. What is left is rewritten by hand: Gemm to MatMul, the
LayerNormalization op to the decomposed form the other passes know, reductions with explicit
axes, and Identity nodes.

Precondition: a loaded graph whose inputs have their decode shape where the layout fixes it (the
loader pins those; any other symbolic dimension becomes 1). Postcondition: no Gemm, LayerNormalization or Identity (except an
Identity between a graph input or constant and a graph output), every tensor typed, graph opset
``OPSET``.
"""

from __future__ import annotations

import logging
import os
from typing import Dict

import numpy as np

from rwkv2rknn.errors import BadInput
from rwkv2rknn.compiler.ir import Context, bypass, const_value, replace_uses
from rwkv2rknn.passes.opset import OPSET, to_opset  # noqa: F401 - (to_opset: its old home)

NAME = "canonicalize"
log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# on the ModelProto, file by file (the loader calls these)


def prepare(model, what: str = "the model"):
    """A file's ModelProto as the graph passes take it: local functions inlined, the norm ops
    lowered (at the file's own opset), then at opset ``OPSET`` (``passes/opset.py``)."""
    model = inline_functions(model, what)
    lower_norms(model)
    rows_by_index(model)
    return to_opset(model, what)


def rows_by_index(model) -> int:
    """``GatherND(data, Unsqueeze(i, axes=[-1]))`` with no batch dims (torch's dynamo exporter
    writes ``table[i]`` so) -> ``Gather(data, i, axis=0)``, in place; returns how many."""
    from onnx import helper, numpy_helper

    consts = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    made = {n.output[0]: n for n in model.graph.node if n.output}
    count = 0
    for n in model.graph.node:
        if n.op_type != "GatherND" or any(a.name == "batch_dims" and a.i for a in n.attribute):
            continue
        u = made.get(n.input[1])
        if u is None or u.op_type != "Unsqueeze":
            continue
        axes = consts.get(u.input[1]) if len(u.input) > 1 else None
        if axes is None:
            axes = next((helper.get_attribute_value(a) for a in u.attribute if a.name == "axes"), None)
        if axes is None or [int(a) for a in np.asarray(axes).reshape(-1)] != [-1]:
            continue
        n.op_type = "Gather"
        n.input[1] = u.input[0]
        del n.attribute[:]
        n.attribute.append(helper.make_attribute("axis", 0))
        count += 1
    return count


def inline_functions(model, what: str = "the model"):
    """``model`` with its ONNX local functions inlined by onnx's own inliner (the weights are
    lifted out first, so the inliner's copy of the model does not copy them)."""
    if not len(model.functions):
        return model
    from onnx import inliner

    from rwkv2rknn.passes.opset import _lift_weights, _put_back

    weights = _lift_weights(model)
    try:
        out = inliner.inline_local_functions(model)
    except Exception as e:  # noqa: BLE001 - the inliner raises several kinds
        raise BadInput(
            f"{what}: its ONNX local functions cannot be inlined ({str(e).splitlines()[0][:100]})",
            "export it again without functions (torch: export_modules_as_functions=False)",
        ) from e
    finally:
        _put_back(model, weights)
    _put_back(out, weights)
    log.info("%s: %d local function(s) inlined", what, len(model.functions))
    return out


_NORM_OPS = ("GroupNormalization", "LpNormalization", "RMSNormalization")


def lower_norms(model) -> int:
    """GroupNormalization, LpNormalization and RMSNormalization in ``model`` (in place) written
    with the ops every opset from 13 has, in the file's own opset (reductions' axes as an input
    from opset 18); returns how many were lowered."""
    version = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)
    if not any(n.op_type in _NORM_OPS and n.domain in ("", "ai.onnx") for n in model.graph.node):
        return 0
    out, count = [], 0
    for node in model.graph.node:
        if node.domain in ("", "ai.onnx") and node.op_type in _NORM_OPS:
            out += _Lowering(model, node, version).nodes()
            count += 1
        else:
            out.append(node)
    del model.graph.node[:]
    model.graph.node.extend(out)
    return count


class _Lowering:
    """The nodes that replace one norm node (names start with the node's name)."""

    def __init__(self, model, node, version: int):
        from onnx import helper

        self.model, self.node, self.version = model, node, version
        self.base = (node.name or node.output[0]) + ".lowered"
        self.attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        self.new, self.k = [], 0

    def const(self, value, dtype=np.int64) -> str:
        from onnx import numpy_helper

        name = f"{self.base}.c{self.k}"
        self.k += 1
        self.model.graph.initializer.append(numpy_helper.from_array(np.asarray(value, dtype), name))
        return name

    def op(self, kind, *ins, out=None, **attrs) -> str:
        from onnx import helper

        name = out or f"{self.base}.{kind.lower()}{self.k}"
        self.k += 1
        self.new.append(helper.make_node(kind, list(ins), [name], name=name, **attrs))
        return name

    def reduce(self, kind, x, axes) -> str:
        if self.version >= 18:
            return self.op(kind, x, self.const(axes), keepdims=1)
        return self.op(kind, x, axes=list(axes), keepdims=1)

    def dtype(self):
        """The float type of the node's input (float32 unless an initializer or value says so)."""
        from onnx import helper

        name = self.node.input[0]
        for v in list(self.model.graph.value_info) + list(self.model.graph.input):
            if v.name == name and v.type.tensor_type.elem_type:
                return helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type)
        return np.float32

    def normalized(self, x, axes, eps) -> str:
        """(x - mean) / sqrt(var + eps) over ``axes``: the decomposed LayerNorm's form."""
        d = self.op("Sub", x, self.reduce("ReduceMean", x, axes))
        var = self.reduce("ReduceMean", self.op("Mul", d, d), axes)
        return self.op("Div", d, self.op("Sqrt", self.op("Add", var, self.const(eps, self.dtype()))))

    def nodes(self):
        getattr(self, self.node.op_type)()
        return self.new

    def GroupNormalization(self):  # noqa: N802 - named after the op
        x, scale, bias = self.node.input[:3]
        groups = int(self.attrs["num_groups"])
        shape = self.op("Shape", x)
        batch = self.op("Slice", shape, self.const([0]), self.const([1]))
        grouped = self.op("Reshape", x, self.op("Concat", batch, self.const([groups, -1]), axis=0))
        y = self.normalized(grouped, [-1], float(self.attrs.get("epsilon", 1e-5)))
        column = self.const([-1, 1])
        if self.version < 21:  # scale and bias per group
            y = self.op(
                "Add", self.op("Mul", y, self.op("Reshape", scale, column)), self.op("Reshape", bias, column)
            )
            self.op("Reshape", y, shape, out=self.node.output[0])
            return
        channels = self.op("Slice", shape, self.const([1]), self.const([2]))  # per channel (21)
        y = self.op("Reshape", y, self.op("Concat", batch, channels, self.const([-1]), axis=0))
        y = self.op(
            "Add", self.op("Mul", y, self.op("Reshape", scale, column)), self.op("Reshape", bias, column)
        )
        self.op("Reshape", y, shape, out=self.node.output[0])

    def LpNormalization(self):  # noqa: N802
        p = int(self.attrs.get("p", 2))
        if p not in (1, 2):
            raise BadInput(f"LpNormalization '{self.node.name}' has p={p}", "ONNX allows p 1 or 2 only")
        x = self.node.input[0]
        norm = self.reduce("ReduceL2" if p == 2 else "ReduceL1", x, [int(self.attrs.get("axis", -1))])
        self.op("Div", x, norm, out=self.node.output[0])

    def RMSNormalization(self):  # noqa: N802
        x, scale = self.node.input[:2]
        if int(self.attrs.get("axis", -1)) != -1:
            raise BadInput(
                f"RMSNormalization '{self.node.name}' normalises from axis {self.attrs['axis']}",
                "export it over the last axis only (axis -1)",
            )
        eps = float(self.attrs.get("epsilon", 1e-5))
        ms = self.reduce("ReduceMean", self.op("Mul", x, x), [-1])
        rms = self.op("Sqrt", self.op("Add", ms, self.const(eps, self.dtype())))
        self.op("Mul", self.op("Div", x, rms), scale, out=self.node.output[0])


def normalize_constant_nodes(model) -> None:
    """Every Constant node holds a ``value`` tensor (value_float, value_ints, ... converted in
    place with their ONNX types: float32 and int64)."""
    from onnx import helper, numpy_helper

    forms = {
        "value_float": np.float32,
        "value_floats": np.float32,
        "value_int": np.int64,
        "value_ints": np.int64,
    }
    for node in model.graph.node:
        if node.op_type != "Constant" or len(node.attribute) != 1:
            continue
        attr = node.attribute[0]
        if attr.name in forms:
            arr = np.asarray(helper.get_attribute_value(attr), forms[attr.name])
            del node.attribute[:]
            node.attribute.append(
                helper.make_attribute("value", numpy_helper.from_array(arr, node.output[0]))
            )


def dangling_constants(model) -> Dict[str, np.ndarray]:
    """{output name: value} of Constant nodes that nothing reads (exporters keep initial states
    this way), in node order."""
    from onnx import numpy_helper

    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    out = {}
    for node in model.graph.node:
        if (
            node.op_type == "Constant"
            and node.output[0] not in used
            and node.attribute
            and node.attribute[0].name == "value"
        ):
            out[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return out


def file_facts(model) -> dict:
    """What a file says of itself: 'dtype' (float16 if any graph input or output is) and the
    metadata our one-file export writes ('tokenizer', 'arch')."""
    from onnx import TensorProto

    from rwkv2rknn.models.export import METADATA_PREFIX

    io_types = {v.type.tensor_type.elem_type for v in list(model.graph.input) + list(model.graph.output)}
    facts = {"dtype": "float16" if TensorProto.FLOAT16 in io_types else "float32"}
    for p in model.metadata_props:
        if p.key.startswith(METADATA_PREFIX) and p.value:
            facts[p.key[len(METADATA_PREFIX) :]] = p.value
    return facts


# --------------------------------------------------------------------------------------------
# the pass


def run(ctx: Context) -> None:
    graph = ctx.graph
    pinned = _pin_inputs(graph)
    for n in graph.nodes:  # an omitted optional input at the end (torch: Clip(x, min, "")) goes
        while n.inputs and not n.inputs[-1].name:
            n.inputs.pop()
    _infer_types(graph, os.path.basename(ctx.source) or "the model")
    before = len(graph.nodes)
    from onnx_graphsurgeon.logger import G_LOGGER

    severity, G_LOGGER.severity = G_LOGGER.severity, G_LOGGER.ERROR
    # partitioned: a subgraph onnxruntime refuses (an fp16 converter's mistyped Cast) is
    # skipped, not the whole fold
    partial = ""
    try:
        graph.fold_constants(fold_shapes=True, partitioning="basic", error_ok=True).cleanup()
    except RecursionError:  # onnx-graphsurgeon's partitioning on a graph onnxruntime refuses
        partial = "; constant folding partial (onnxruntime refuses part of the graph)"
        graph.fold_constants(fold_shapes=True, error_ok=True).cleanup()
    finally:
        G_LOGGER.severity = severity
    folded = before - len(graph.nodes)
    gemms = sum(_gemm_to_matmul(graph, n) for n in list(graph.nodes) if n.op == "Gemm")
    norms = sum(_decompose_layer_norm(graph, n) for n in list(graph.nodes) if n.op == "LayerNormalization")
    axes = sum(_explicit_axes(n) for n in graph.nodes if n.op in ("ReduceMean", "ReduceSum"))
    idents = sum(n.op == "Identity" for n in graph.nodes)
    for n in [n for n in graph.nodes if n.op == "Identity" and n.inputs and n.outputs]:
        bypass(graph, n)
    graph.cleanup().toposort()
    idents -= sum(n.op == "Identity" for n in graph.nodes)
    ctx.graph = graph
    untyped = [t.name for t in graph.tensors().values() if t.dtype is None]
    ctx.note(
        NAME,
        f"opset {OPSET}; {folded} nodes folded into constants; {gemms} Gemm -> MatMul; "
        f"{norms} LayerNormalization decomposed; {axes} reduction(s) given explicit axes; "
        f"{idents} Identity removed"
        + (f"; {pinned} symbolic dim(s) pinned" if pinned else "")
        + partial
        + (f"; {len(untyped)} tensor(s) without a type (first: {untyped[0]})" if untyped else ""),
    )


def _infer_types(graph, what: str) -> None:
    """Every variable tensor gets the dtype and shape onnx shape inference gives it. Inference
    runs on the graph exported with its big constants standing in as graph inputs of the same
    type and shape (so the weights are not copied); a graph whose types do not agree is refused,
    as onnxruntime would refuse it."""
    import onnx_graphsurgeon as gs
    from onnx import helper, shape_inference

    from rwkv2rknn.compiler.ir import export

    swaps = []  # (constant, stand-in input): the weights are neither loaded nor copied
    for t in list(graph.tensors().values()):
        if isinstance(t, gs.Constant) and int(np.prod(t.shape)) > 4096:
            v = gs.Variable(t.name, dtype=t.dtype, shape=list(t.shape))
            replace_uses(t, v)
            swaps.append((t, v))
    try:
        model = export(
            gs.Graph(
                nodes=graph.nodes,
                inputs=graph.inputs + [v for _, v in swaps],
                outputs=graph.outputs,
                opset=graph.opset,
            )
        )
    finally:
        for t, v in swaps:
            replace_uses(v, t)
    del model.graph.value_info[:]
    for o in model.graph.output:  # recomputed from the pinned inputs
        o.type.tensor_type.ClearField("shape")
    try:
        model = shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
    except shape_inference.InferenceError as e:
        msg = " ".join(str(e).split())
        raise BadInput(
            f"{what} is not a valid ONNX graph ({msg[-200:]})", "export it again; onnxruntime refuses it too"
        ) from e
    found = {}
    for v in list(model.graph.value_info) + list(model.graph.output):
        tt = v.type.tensor_type
        if tt.elem_type:
            dims = (
                [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]
                if tt.HasField("shape")
                else None
            )
            found[v.name] = (helper.tensor_dtype_to_np_dtype(tt.elem_type), dims)
    inputs = {t.name for t in graph.inputs}
    for t in graph.tensors().values():
        if isinstance(t, gs.Variable) and t.name not in inputs:
            dtype, shape = found.get(t.name, (t.dtype, None))
            t.dtype, t.shape = dtype, shape


def _pin_inputs(graph) -> int:
    """Symbolic dims of graph inputs the loader left open take the decode shape: 1 (one token,
    batch 1)."""
    n = 0
    for t in graph.inputs:
        if t.shape is not None and any(not isinstance(d, int) or d < 0 for d in t.shape):
            n += sum(not isinstance(d, int) or d < 0 for d in t.shape)
            t.shape = [d if isinstance(d, int) and d >= 0 else 1 for d in t.shape]
    return n


def _var(name, like, shape=None):
    import onnx_graphsurgeon as gs

    return gs.Variable(name, dtype=like.dtype, shape=shape if shape is not None else like.shape)


def _gemm_to_matmul(graph, node) -> int:
    """Y = alpha * A' @ B' + beta * C  ->  MatMul(A', alpha B') [+ Add(beta C)]; 1 if rewritten."""
    import onnx_graphsurgeon as gs

    a, b = node.inputs[0], node.inputs[1]
    c = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
    alpha, beta = float(node.attrs.get("alpha", 1.0)), float(node.attrs.get("beta", 1.0))
    out = node.outputs[0]
    base = node.name or out.name
    new = []
    if int(node.attrs.get("transA", 0)):
        av = const_value(a)
        if av is not None:
            a = gs.Constant(f"{a.name}.T", np.ascontiguousarray(av.T))
        else:
            t = _var(f"{base}.a_t", a, list(reversed(a.shape)) if a.shape else None)
            new.append(
                gs.Node("Transpose", name=f"{base}.transA", inputs=[a], outputs=[t], attrs={"perm": [1, 0]})
            )
            a = t
    bv = const_value(b)
    scale_after = 1.0
    if bv is not None:
        bv = bv.T if int(node.attrs.get("transB", 0)) else bv
        b = gs.Constant(
            f"{b.name}.gemm", np.ascontiguousarray((bv * alpha).astype(bv.dtype) if alpha != 1.0 else bv)
        )
    else:
        if int(node.attrs.get("transB", 0)):
            t = _var(f"{base}.b_t", b, list(reversed(b.shape)) if b.shape else None)
            new.append(
                gs.Node("Transpose", name=f"{base}.transB", inputs=[b], outputs=[t], attrs={"perm": [1, 0]})
            )
            b = t
        scale_after = alpha
    y = out if (c is None and scale_after == 1.0) else _var(f"{base}.mm", out)
    new.append(gs.Node("MatMul", name=base, inputs=[a, b], outputs=[y]))
    if scale_after != 1.0:
        y2 = out if c is None else _var(f"{base}.scaled", out)
        new.append(
            gs.Node(
                "Mul", name=f"{base}.alpha", inputs=[y, _scalar(f"{base}.alpha_v", alpha, out)], outputs=[y2]
            )
        )
        y = y2
    if c is not None:
        cv = const_value(c)
        if cv is not None:
            c = gs.Constant(f"{c.name}.gemm", (cv * beta).astype(cv.dtype) if beta != 1.0 else cv)
        elif beta != 1.0:
            cs = _var(f"{base}.c_scaled", c)
            new.append(
                gs.Node(
                    "Mul", name=f"{base}.beta", inputs=[c, _scalar(f"{base}.beta_v", beta, out)], outputs=[cs]
                )
            )
            c = cs
        new.append(gs.Node("Add", name=f"{base}.bias", inputs=[y, c], outputs=[out]))
    node.outputs.clear()
    node.inputs.clear()
    graph.nodes += new
    return 1


def _scalar(name: str, value: float, like):
    import onnx_graphsurgeon as gs

    return gs.Constant(name, np.array(value, like.dtype or np.float32))


def _decompose_layer_norm(graph, node) -> int:
    """LayerNormalization over the last axis -> the decomposed form; 1 if rewritten."""
    import onnx_graphsurgeon as gs

    x, out = node.inputs[0], node.outputs[0]
    rank = len(x.shape) if x.shape is not None else None
    axis = int(node.attrs.get("axis", -1))
    if (
        rank is None
        or axis not in (-1, rank - 1)
        or len(node.outputs) > 1
        and any(o.outputs for o in node.outputs[1:])
    ):
        return 0
    eps = float(node.attrs.get("epsilon", 1e-5))
    base = node.name or out.name
    red = list(x.shape[:-1]) + [1]
    mean, d, sq = _var(f"{base}.mean", x, red), _var(f"{base}.d", x), _var(f"{base}.dd", x)
    var, ve, std = _var(f"{base}.var", x, red), _var(f"{base}.var_eps", x, red), _var(f"{base}.std", x, red)
    y = _var(f"{base}.norm", x)
    new = [
        gs.Node("ReduceMean", name=f"{base}.mean", inputs=[x], outputs=[mean], attrs={"axes": [-1]}),
        gs.Node("Sub", name=f"{base}.sub", inputs=[x, mean], outputs=[d]),
        gs.Node("Mul", name=f"{base}.square", inputs=[d, d], outputs=[sq]),
        gs.Node("ReduceMean", name=f"{base}.var", inputs=[sq], outputs=[var], attrs={"axes": [-1]}),
        gs.Node("Add", name=f"{base}.add_eps", inputs=[var, _scalar(f"{base}.eps", eps, x)], outputs=[ve]),
        gs.Node("Sqrt", name=f"{base}.sqrt", inputs=[ve], outputs=[std]),
        gs.Node("Div", name=f"{base}.div", inputs=[d, std], outputs=[y]),
    ]
    scale = node.inputs[1]
    bias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
    scaled = out if bias is None else _var(f"{base}.scaled", x)
    new.append(gs.Node("Mul", name=f"{base}.scale", inputs=[y, scale], outputs=[scaled]))
    if bias is not None:
        new.append(gs.Node("Add", name=f"{base}.shift", inputs=[scaled, bias], outputs=[out]))
    node.outputs.clear()
    node.inputs.clear()
    graph.nodes += new
    return 1


def _explicit_axes(node) -> int:
    """Reductions name their axes (attribute for ReduceMean, input for ReduceSum at opset 17);
    absent axes mean every axis, which on a vector is axis -1. 1 if changed."""
    import onnx_graphsurgeon as gs

    x = node.inputs[0]
    if "axes" in node.attrs or (len(node.inputs) > 1 and node.inputs[1].name):
        return 0
    if int(node.attrs.get("noop_with_empty_axes", 0)) or x.shape is None:
        return 0
    axes = [-1] if len(x.shape) == 1 else list(range(len(x.shape)))
    if node.op == "ReduceSum":
        node.inputs.append(gs.Constant(f"{node.name}.axes", np.array(axes, np.int64)))
    else:
        node.attrs["axes"] = axes
    return 1
