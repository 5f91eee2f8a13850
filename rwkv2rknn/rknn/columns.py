"""Columns: a T-row segment rewritten for the NPU with rows as columns, so that rknn-toolkit2 puts
no Transpose around its MatMuls.

::

    T-row segment (as run by onnxruntime)        what the .seq.rknn is built from
    x [T, C] -> MatMul(W [C, N]) -> [T, N]       x [C, T] -> Reshape [1, C, 1, T] -> Conv(W^T [N, C, 1, 1])
    LayerNorm over axis -1                       ... ReduceMean over axis 1 (channels)
    Slice / Concat of rows (axis 0)              ... of columns (axis 3)
    y [T, N]                                     y [1, N, 1, T] (NCHW: the bytes of [N, T])

rknn-toolkit2 2.5.0 runs a MatMul of a [T, C] activation as a Conv over [1, C, 1, T] and puts a
Transpose before and after it; for T >= 16 each Transpose costs register commands and, in an int8
build, identity-matrix weights (measured on the bundled model's fused layer segment, built for
T in 2, 16, 32, 64: fp16 5,138,641 bytes, w8a8 6,017,952; the same graph in columns: fp16
2,652,241, w8a8 2,029,600). In columns every op is in the NPU's own NCHW layout and nothing is
transposed. The runners transpose the inputs and outputs on the CPU (``runtime.rows.Columns``).

The outputs stay 4-D: a Squeeze to [N, T] at each output is an op of its own in every shape the
.rknn holds, and in an int8 build a costly one (the bundled model's L0..L1, T in 2, 16, 64: the
7 Squeezes were 32,100 bytes of the fp16 file and 99,172 of the w8a8 one). [1, N, 1, T] in NCHW
order is the same bytes as [N, T], so the runners read both alike.

``to_columns`` handles the ops the T-row variants of RWKV-4, 5.2, 6 and 7 have on the NPU (MatMul
with a constant weight, elementwise ops with per-channel constants, decomposed LayerNorm, the
token shift's Slice/Concat, 2-D Reshapes that keep the shape) and refuses anything else
(``NotColumns``), and ``write_columns`` checks the result against the original on onnxruntime:
a segment it does not fit is built as rows.

The compile's ``columns`` step (``run`` / ``apply``, ordered by rwkv2rknn.compiler.driver, between
the segment files and the build) replaces each T-row NPU segment's ``.seq.onnx`` with its columns
form, marked in the file (``LAYOUT_KEY`` in its metadata): the build builds the file as written and
the artifact holds what was built; onnxruntime runs the same file (``runtime.rows.Columns`` turns
the rows). The segment's per-token ``.onnx``, which the NPU never builds (token steps run on the
T-row build), becomes a view of the columns form (``token_view``: its inputs and outputs, one
column inside), so that onnxruntime's per-token and T-row sessions read the same weights. The
rows forms wait in ``ROWS_DIR`` until the build is done: where the columns build fails,
``restore_rows`` puts them back and the segment is built as rows (``seq_layout`` '').
"""

from __future__ import annotations

import os
from typing import Dict, Set

import numpy as np

from rwkv2rknn.runtime.rows import LAYOUT_KEY  # the file's metadata entry naming its layout

NAME = "columns"
# Beside the artifact's segments while it is built: the rows form of every file rewritten to columns.
ROWS_DIR = ".columns-rows"
ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "Sigmoid", "Relu", "Tanh", "Exp", "Neg", "Abs"}


class NotColumns(ValueError):
    """The segment has an op or shape ``to_columns`` does not rewrite."""


def _dims(value_info) -> list:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def to_columns(model, copy: bool = True):
    """A copy of a T-row segment (row inputs [T, C], every output [T, N]) taking [C, T] inputs
    and giving [N, T] outputs, NCHW [1, C, 1, T] inside. Raises NotColumns when it does not fit.
    ``copy`` False: ``model`` itself is rewritten (a caller done with the rows form saves a copy
    of every weight; after NotColumns it is then half rewritten)."""
    import onnx
    from onnx import helper, numpy_helper

    if copy:
        model = onnx.ModelProto.FromString(model.SerializeToString())
    g = model.graph
    known = {t.name: t for t in g.initializer}
    shapes = _inferred_shapes(model)

    def const(name):
        if name not in known:
            raise NotColumns(f"'{name}' is not a constant")
        return numpy_helper.to_array(known[name])

    def add_const(name, array):
        if name not in known:  # made in place: appending a TensorProto would copy its bytes again
            array = np.asarray(array)  # little-endian numbers: the fields from_array sets
            t = g.initializer.add()
            t.name = name
            t.dims.extend(array.shape)
            t.data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
            t.raw_data = array.tobytes()  # C order, one copy
            known[name] = t
        return name

    cols: Set[str] = set()  # tensors that are [1, C, 1, T] in the rewritten graph
    alias: Dict[str, str] = {}
    nodes = []
    for inp in g.input:
        d = _dims(inp)
        if len(d) == 2 and isinstance(d[0], str) and isinstance(d[1], int):
            _swap_dims(inp)
            shape4 = add_const(f"columns.nchw.{d[1]}", np.array([1, d[1], 1, -1], np.int64))
            nodes.append(helper.make_node("Reshape", [inp.name, shape4], [inp.name + ".nchw"]))
            alias[inp.name] = inp.name + ".nchw"
            cols.add(inp.name + ".nchw")
        elif len(d) == 2 and d[0] == 1 and isinstance(d[1], int):
            _swap_dims(inp)  # a state row [1, C] (one-file layouts) comes in as one column [C, 1]
            shape4 = add_const("columns.vector", np.array([1, -1, 1, 1], np.int64))
            nodes.append(helper.make_node("Reshape", [inp.name, shape4], [inp.name + ".nchw"]))
            alias[inp.name] = inp.name + ".nchw"
            cols.add(inp.name + ".nchw")
        elif not (len(d) == 1 and isinstance(d[0], int)):
            raise NotColumns(f"input '{inp.name}' is {d}, not rows [T, C], a row [1, C] or a vector [C]")
    channel_consts: Dict[str, str] = {}

    def per_channel(name):
        """A constant operand of an op on columns: a scalar stays, [C] / [1, C] -> [1, C, 1, 1]."""
        if name in cols or name not in known:
            return name
        a = const(name)
        if a.size == 1:
            return name
        if a.ndim > 2 or (a.ndim == 2 and a.shape[0] != 1):
            raise NotColumns(f"constant '{name}' of shape {list(a.shape)} is not per channel")
        if name not in channel_consts:
            channel_consts[name] = add_const(name + ".nchw", a.reshape(1, -1, 1, 1))
        return channel_consts[name]

    for node in g.node:
        ins = [alias.get(i, i) for i in node.input]
        op, out = node.op_type, list(node.output)
        on_cols = any(i in cols for i in ins)
        if op == "MatMul" and on_cols:
            if ins[0] not in cols or ins[1] in cols:
                raise NotColumns(f"MatMul '{node.name}' is not an activation times a constant weight")
            w = const(ins[1])
            if w.ndim != 2:
                raise NotColumns(f"MatMul '{node.name}' has a {w.ndim}-D weight")
            weight = add_const(ins[1] + ".conv", w.T.reshape(w.shape[1], w.shape[0], 1, 1))
            nodes.append(helper.make_node("Conv", [ins[0], weight], out, name=node.name))
            cols.add(out[0])
        elif op == "Reshape":
            target = const(ins[1])
            before, after = shapes.get(node.input[0]), shapes.get(out[0])
            if on_cols:
                if before is None or before != after:
                    raise NotColumns(f"Reshape '{node.name}' changes a row's shape ({before} -> {after})")
                alias[out[0]] = ins[0]  # [T, C] -> [T, C]: nothing to do on columns
            elif len(target) == 2 and target[0] == 1 and len(shapes.get(node.input[0]) or ()) == 1:
                shape4 = add_const("columns.vector", np.array([1, -1, 1, 1], np.int64))
                nodes.append(helper.make_node("Reshape", [ins[0], shape4], out, name=node.name))
                cols.add(out[0])  # a state row [C] -> [1, C]: one column
            else:
                raise NotColumns(f"Reshape '{node.name}' to {list(target)} is not a row")
        elif op == "ReduceMean" and on_cols:
            axes = [a for a in node.attribute if a.name == "axes"]
            keep = [a.i for a in node.attribute if a.name == "keepdims"]
            if len(ins) > 1 or not axes or list(axes[0].ints) not in ([-1], [1]) or keep == [0]:
                raise NotColumns(f"ReduceMean '{node.name}' is not over the channels of rows")
            nodes.append(helper.make_node("ReduceMean", [ins[0]], out, name=node.name, axes=[1]))
            cols.add(out[0])
        elif op == "Slice" and on_cols:
            if len(ins) < 4 or list(const(ins[3])) != [0] or (len(ins) > 4 and list(const(ins[4])) != [1]):
                raise NotColumns(f"Slice '{node.name}' is not a slice of rows")
            axis = add_const("columns.axis3", np.array([3], np.int64))
            nodes.append(helper.make_node("Slice", [ins[0], ins[1], ins[2], axis], out, name=node.name))
            cols.add(out[0])
        elif op == "Concat" and on_cols:
            axis = [a.i for a in node.attribute if a.name == "axis"]
            if axis != [0] or not all(i in cols for i in ins):
                raise NotColumns(f"Concat '{node.name}' is not a concatenation of rows")
            nodes.append(helper.make_node("Concat", ins, out, name=node.name, axis=3))
            cols.add(out[0])
        elif op == "Split" and on_cols:
            axis = [a.i for a in node.attribute if a.name == "axis"]
            if (
                axis not in ([-1], [1])
                or len(shapes.get(node.input[0]) or ()) != 2
                or any(i in cols for i in ins[1:])
            ):
                raise NotColumns(f"Split '{node.name}' is not a split of the rows' channels")
            nodes.append(helper.make_node("Split", ins, out, name=node.name, axis=1))
            cols.update(out)
        elif op in ELEMENTWISE and on_cols:
            nodes.append(helper.make_node(op, [per_channel(i) for i in ins], out, name=node.name))
            cols.update(out)
        elif on_cols:
            raise NotColumns(f"{op} '{node.name}' has no columns form")
        else:
            raise NotColumns(f"{op} '{node.name}' does not work on rows")
    taken: Dict[str, str] = {}
    for o in g.output:
        src = alias.get(o.name, o.name)
        d = _dims(o)
        if src not in cols or len(d) != 2:
            raise NotColumns(f"output '{o.name}' is not rows [T, N]")
        if src in taken:
            raise NotColumns(f"outputs '{taken[src]}' and '{o.name}' are one tensor")
        taken[src] = o.name
        for n in nodes:  # the output is the [1, N, 1, T] tensor itself: no Squeeze (see above)
            n.output[:] = [o.name if x == src else x for x in n.output]
            n.input[:] = [o.name if x == src else x for x in n.input]
        _nchw_dims(o)
    del g.node[:]
    g.node.extend(nodes)
    del g.value_info[:]
    used = {i for n in g.node for i in n.input}
    for k in reversed([k for k, t in enumerate(g.initializer) if t.name not in used]):
        del g.initializer[k]  # in place: no copy of the weights kept
    kept_meta = [p for p in model.metadata_props if p.key != LAYOUT_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept_meta)
    model.metadata_props.add(key=LAYOUT_KEY, value="columns")
    return model


def _nchw_dims(value_info) -> None:
    """[T, N] -> [1, N, 1, T] in a graph output's type."""
    from onnx import helper

    t, n = _dims(value_info)
    value_info.CopyFrom(
        helper.make_tensor_value_info(value_info.name, value_info.type.tensor_type.elem_type, [1, n, 1, t])
    )


def _swap_dims(value_info) -> None:
    """[T, C] -> [C, T] in a graph input's type."""
    a, b = value_info.type.tensor_type.shape.dim
    (pa, va), (pb, vb) = (a.dim_param, a.dim_value), (b.dim_param, b.dim_value)
    a.Clear()
    b.Clear()
    if pb:
        a.dim_param = pb
    else:
        a.dim_value = vb
    if pa:
        b.dim_param = pa
    else:
        b.dim_value = va


_SMALL = 1024  # elements: a constant shape inference gets whole in ``_inferred_shapes``


def _inferred_shapes(model, rows: int = 3) -> dict:
    """Every tensor's shape with the row count fixed to ``rows`` (symbolic sizes reshape badly)."""
    import onnx
    from onnx import helper

    # the graph without its weights: each large constant an input of its shape (shape inference
    # reads the values of small ones only: Reshape targets, Slice ends), no copy of the weights
    fixed = onnx.ModelProto()
    fixed.ir_version = model.ir_version
    fixed.opset_import.extend(model.opset_import)
    g = fixed.graph
    g.node.extend(model.graph.node)
    g.input.extend(model.graph.input)
    g.output.extend(model.graph.output)
    inputs = {i.name for i in model.graph.input}
    for t in model.graph.initializer:
        n = 1
        for d in t.dims:
            n *= int(d)
        if n <= _SMALL or t.data_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32):
            g.initializer.append(t)
        elif t.name not in inputs:
            g.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    for inp in fixed.graph.input:
        for d in inp.type.tensor_type.shape.dim:
            if d.dim_param:
                d.Clear()
                d.dim_value = rows
    del fixed.graph.value_info[:]
    g = onnx.shape_inference.infer_shapes(fixed).graph
    return {v.name: _dims(v) for v in list(g.value_info) + list(g.input) + list(g.output)}


def write_columns(onnx_path: str, out_path: str, rows: int = 3, checked: bool = True) -> str:
    """Write the columns form of a T-row segment file to ``out_path`` after checking it against
    the original on onnxruntime (``check``; not with ``checked`` False); '' on success, else why
    not (``out_path`` then not written)."""
    from rwkv2rknn.fileio import remove_quietly

    why, cols, _ = _write_columns(onnx_path, out_path)
    del cols
    if not why and checked:
        why = check(onnx_path, out_path, rows)
    if why:
        remove_quietly(out_path)
        remove_quietly(out_path + ".data")
    return why


def _write_columns(onnx_path: str, out_path: str):
    """``write_columns`` unchecked: ('', the columns model written, or None where it went to
    external data, which empties its tensors; the SHA-256 of the file written, '' with external
    data) or (why not, None, '')."""
    from rwkv2rknn.fileio import load_onnx, save_onnx

    model = load_onnx(onnx_path)
    try:
        cols = to_columns(model, copy=False)  # the rows form read here is not needed after
    except NotColumns as e:
        return str(e), None, ""
    digest = save_onnx(cols, out_path, keep=False)
    return "", None if os.path.exists(out_path + ".data") else cols, digest


def check(onnx_path: str, out_path: str, rows: int = 3) -> str:
    """'' if the columns form ``out_path`` of the T-row file ``onnx_path`` computes the same on
    onnxruntime (random inputs, ``rows`` rows), else why not."""

    def as_rows(x, w):  # a columns output [1, N, 1, T] as the rows output [T, N] it stands for
        t = w.shape[0]
        return x.reshape(-1, t).T if x.shape == (1, w.shape[1], 1, t) else None

    return _same_on_ort(onnx_path, out_path, "columns form", rows, to_cols, as_rows)


def _same_on_ort(ref_path: str, path: str, what: str, rows: int = 1, to_form=None, back=None) -> str:
    """'' if the file ``path`` computes what ``ref_path`` computes on onnxruntime (seeded random
    inputs, symbolic dimensions ``rows``), else why not, naming it ``what``. ``to_form``: a
    reference input as ``path`` takes it; ``back(x, want)``: an output of ``path`` in the
    reference's form (None: not of the form it should have)."""
    import onnxruntime as ort

    try:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        a = ort.InferenceSession(ref_path, opts, providers=["CPUExecutionProvider"])
        b = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        rng = np.random.default_rng(0)
        feed = {
            i.name: rng.standard_normal([rows if isinstance(d, str) else d for d in i.shape]).astype(
                np.float32
            )
            for i in a.get_inputs()
        }
        want = a.run(None, feed)
        got = b.run(
            [o.name for o in a.get_outputs()], {k: to_form(v) if to_form else v for k, v in feed.items()}
        )
    except Exception as e:  # noqa: BLE001 - onnxruntime refused the rewritten graph
        return f"onnxruntime cannot run the {what} ({type(e).__name__})"
    for o, w, x in zip(a.get_outputs(), want, got):
        x = back(x, w) if back else x
        if (
            x is None
            or x.shape != w.shape
            or float(np.abs(x - w).max()) > 1e-4 * max(float(np.abs(w).max()), 1e-6)
        ):
            return f"the {what} computes '{o.name}' differently"
    return ""


def fits(onnx_path: str) -> str:
    """'' if the T-row segment file has a columns form (checked on onnxruntime), else why not."""
    import tempfile
    from rwkv2rknn.fileio import scratch_prefix

    with tempfile.TemporaryDirectory(prefix=scratch_prefix("columns")) as tmp:
        return write_columns(onnx_path, os.path.join(tmp, "columns.onnx"))


def to_cols(a: np.ndarray) -> np.ndarray:
    """A row input [T, C] as columns [C, T] (vectors unchanged)."""
    return np.ascontiguousarray(a.T) if a.ndim == 2 else a


def columns_dataset(dataset: str, folder: str) -> str:
    """A copy of a toolkit dataset (absolute .npy paths, one sample a line) with every row input
    as columns, in ``folder``; returns its path."""
    lines = []
    with open(dataset) as f:
        for k, line in enumerate(ln for ln in f if ln.strip()):
            names = []
            for j, path in enumerate(line.split()):
                name = os.path.join(folder, f"columns_{k:05d}_{j}.npy")
                np.save(name, to_cols(np.load(path)))
                names.append(name)
            lines.append(" ".join(names))
    out = os.path.join(folder, "columns_dataset.txt")
    with open(out, "w") as f:
        f.write("\n".join(lines) + "\n")
    return out


def token_view(cols, token, prefix: str, copy: bool = True):
    """The per-token graph ``token`` (ModelProto) as a view of the columns T-row graph ``cols``:
    its inputs and outputs (names, shapes) as the per-token graph has them, reshaped to and from
    one column inside (T = 1: the token shift's Slice is empty and its Concat gives the state
    column), so that the per-token and T-row sessions of onnxruntime read the same weights (the
    columns form's Conv weights, by name). Tensors made inside take ``prefix`` (the segment's
    name: a fused token step joins every segment's graph). Raises NotColumns when they do not
    match. ``copy`` False: ``cols`` itself becomes the view (for a caller done with it)."""
    import onnx
    from onnx import helper

    model = onnx.ModelProto.FromString(cols.SerializeToString()) if copy else cols
    g = model.graph
    t_in = {i.name: i for i in token.graph.input}
    t_out = {o.name: o for o in token.graph.output}
    if set(t_in) != {i.name for i in g.input} or set(t_out) != {o.name for o in g.output}:
        raise NotColumns("the per-token and T-row graphs have other inputs or outputs")
    ends = set(t_in) | set(t_out)
    rename = {x: f"{prefix}:{x}" for n in g.node for x in n.output if x and x not in ends}
    pre, post, consts = [], [], []

    def shape_const(name, dims):
        consts.append(helper.make_tensor(name, onnx.TensorProto.INT64, [len(dims)], list(dims)))
        return name

    for inp in g.input:
        want = t_in[inp.name]
        if _dims(inp) == _dims(want):
            continue
        d = _dims(inp)
        if len(d) != 2 or not isinstance(d[0], int) or not all(isinstance(x, int) for x in _dims(want)):
            raise NotColumns(f"input '{inp.name}' is {d} in columns, {_dims(want)} per token")
        inner = f"{prefix}:{inp.name}.col"
        rename[inp.name] = inner
        shape = shape_const(f"{prefix}:{inp.name}.col.shape", [d[0], 1])
        pre.append(helper.make_node("Reshape", [inp.name, shape], [inner], name=f"{prefix}:{inp.name}.col"))
        inp.CopyFrom(want)
    for n in g.node:
        n.input[:] = [rename.get(x, x) for x in n.input]
        n.output[:] = [rename.get(x, x) if x not in t_out else x for x in n.output]
    for out in g.output:
        want = t_out[out.name]
        if not all(isinstance(x, int) for x in _dims(want)):
            raise NotColumns(f"output '{out.name}' is {_dims(want)} per token")
        inner = f"{prefix}:{out.name}.col"
        for n in g.node:
            n.output[:] = [inner if x == out.name else x for x in n.output]
            n.input[:] = [inner if x == out.name else x for x in n.input]
        shape = shape_const(f"{prefix}:{out.name}.shape", _dims(want))
        post.append(helper.make_node("Reshape", [inner, shape], [out.name], name=f"{prefix}:{out.name}"))
        out.CopyFrom(want)
    nodes = pre + list(g.node) + post
    del g.node[:]
    g.node.extend(nodes)
    g.initializer.extend(consts)
    return model


def write_token_view(
    token_path: str, cols_path: str, out_path: str, prefix: str, checked: bool = True, cols=None
) -> str:
    """Write ``token_view`` of the per-token file ``token_path`` and the columns file
    ``cols_path`` to ``out_path`` after checking it against ``token_path`` on onnxruntime
    (not with ``checked`` False); '' on success, else why not (``out_path`` then not written).
    ``cols``: the model ``cols_path`` holds, already in memory (not read again; it becomes the
    view)."""
    return _write_token_view(token_path, cols_path, out_path, prefix, checked, cols)[0]


def _write_token_view(token_path, cols_path, out_path, prefix, checked=True, cols=None):
    """``write_token_view``: (why not, '') or ('', the SHA-256 of the file written; '' with
    external data)."""
    from rwkv2rknn.fileio import load_onnx, remove_quietly, save_onnx

    try:
        if cols is None:
            cols = load_onnx(cols_path)
        view = token_view(cols, load_onnx(token_path), prefix, copy=False)
        del cols
    except NotColumns as e:
        return str(e), ""
    digest = save_onnx(view, out_path, keep=False)
    del view
    why = _same_on_ort(token_path, out_path, "per-token view") if checked else ""
    if why:
        remove_quietly(out_path)
        remove_quietly(out_path + ".data")
        return why, ""
    return "", digest


def in_columns(onnx_path: str) -> bool:
    """The ONNX file is a columns form this module wrote (its metadata says so; weights not read)."""
    import onnx

    model = onnx.load(onnx_path, load_external_data=False)
    return any(p.key == LAYOUT_KEY and p.value == "columns" for p in model.metadata_props)


def _files(path: str):
    return [p for p in (path, path + ".data") if os.path.exists(p)]


def apply(ctx, seg, out_dir: str, built_before=None) -> str:
    """The columns step for one T-row NPU segment whose files are written in ``out_dir``/segments:
    its ``.seq.onnx`` becomes the columns form (checked on onnxruntime, unless
    ``built_before(ctx, path)`` says the build cache holds a build of exactly these bytes: it was
    checked then), ``seg.seq.layout`` 'columns', and its per-token ``.onnx`` a ``token_view`` of
    it (which the NPU never builds: token steps run on the T-row build); the rows forms kept in
    ``ROWS_DIR`` for ``restore_rows``. Returns '' or why the segment stays in rows (noted)."""
    from rwkv2rknn.fileio import remove_quietly

    seq = os.path.join(out_dir, "segments", seg.name + ".seq.onnx")
    aside = os.path.join(out_dir, ROWS_DIR, seg.name + ".seq.onnx")
    os.makedirs(os.path.dirname(aside), exist_ok=True)
    for p in _files(seq):
        os.replace(p, aside + p[len(seq) :])
    why, cols, digest = _write_columns(aside, seq)
    cached = not why and bool(built_before and built_before(ctx, seq))
    if not cached:  # the checks read the files: the model is not held meanwhile
        cols = None
    if not why and not cached:
        why = check(aside, seq)
        if why:
            remove_quietly(seq)
            remove_quietly(seq + ".data")
    if why:
        for p in _files(aside):
            os.replace(p, seq + p[len(aside) :])
        ctx.note(NAME, f"{seg.name}: T-row build as rows, not columns ({why})", segment=seg.name)
        return why
    # the checksums of the bytes as they were written (the manifest's; '' with external data:
    # the manifest hashes the file)
    seg.seq.layout, seg.seq.sha256 = "columns", digest
    # the per-token file (onnxruntime's token steps; the NPU runs them on the T-row build) as a
    # view of the columns form: its sessions then share the columns form's weights
    tok = os.path.join(out_dir, "segments", seg.name + ".onnx")
    tok_aside = os.path.join(out_dir, ROWS_DIR, seg.name + ".onnx")
    for p in _files(tok):
        os.replace(p, tok_aside + p[len(tok) :])
    why_tok, tok_digest = _write_token_view(tok_aside, seq, tok, seg.name, checked=not cached, cols=cols)
    del cols
    if why_tok:
        for p in _files(tok_aside):
            os.replace(p, tok + p[len(tok_aside) :])
        ctx.note(
            NAME,
            f"{seg.name}: per-token file kept as rows ({why_tok}); onnxruntime holds its weights twice",
            segment=seg.name,
        )
    else:
        seg.token.sha256 = tok_digest
    return ""


def restore_rows(seg, out_dir: str) -> bool:
    """Put back the rows forms of a segment ``apply`` rewrote (its columns build failed): the
    artifact holds only what was built. False if there are none."""
    back = False
    for suffix in (".seq.onnx", ".onnx"):
        path = os.path.join(out_dir, "segments", seg.name + suffix)
        aside = os.path.join(out_dir, ROWS_DIR, seg.name + suffix)
        if not os.path.exists(aside):
            continue
        for p in _files(path):
            os.remove(p)
        for p in _files(aside):
            os.replace(p, path + p[len(aside) :])
        back = True
    if back:
        seg.seq.layout, seg.seq.sha256, seg.token.sha256 = "", "", ""
    return back


def drop_rows(out_dir: str) -> None:
    """After the build: the rows forms kept for ``restore_rows`` go (the artifact holds the files built)."""
    import shutil

    shutil.rmtree(os.path.join(out_dir, ROWS_DIR), ignore_errors=True)


def summary(ctx, segs) -> None:
    """The step's line: how many T-row NPU segments it wrote in columns."""
    segs = list(segs)
    n = sum(s.seq.layout == "columns" for s in segs)
    ctx.note(
        NAME,
        f"{n} of {len(segs)} T-row NPU segment(s) written in columns [C, T] (what the NPU builds "
        f"and onnxruntime runs: no Transposes on the NPU), {len(segs) - n} as rows",
        kind="summary",
        columns=n,
        rows=len(segs) - n,
    )


def run(ctx, out_dir: str, segs, built_before=None) -> None:
    """The columns step over ``segs`` (the T-row NPU segments that get a shared build)."""
    segs = list(segs)
    for seg in segs:
        apply(ctx, seg, out_dir, built_before)
    summary(ctx, segs)
