"""The CPU embedding stored narrow: the token table of a CPU segment (a Gather over a 2-D float32
initializer) kept in fp16 where that loses nothing (its values are fp16 values: a model exported
in fp16, as the public files and our default export are), or in int8 with one scale per row when
the NPU segments are w8a8, and widened to float32 per token as it is gathered (Gather, then Cast,
then for int8 a Mul by the row's gathered scale). A table of fp32 values stays fp32 outside w8a8
(the CPU then computes what the source model computes). The table is most of what a small model's board copy holds (a
0.1B RWKV-7 with 65536 tokens: 201 MB of 497 MB in float32), and a token's row is all that is
ever widened.
"""

from __future__ import annotations

import logging

import numpy as np

from rwkv2rknn.compiler.ir import Context, GraphSegment

log = logging.getLogger(__name__)

NAME = "narrow"


def compact(model, int8: bool = False) -> int:
    """Narrow every Gather table of ``model`` (an onnx ModelProto, changed in place); returns
    the bytes saved."""
    import onnx
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    saved = 0
    nodes = list(graph.node)
    out_nodes = []
    for node in nodes:
        out_nodes.append(node)
        if node.op_type != "Gather" or node.input[0] not in inits:
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        t = inits[node.input[0]]
        if t.data_type != onnx.TensorProto.FLOAT or len(t.dims) != 2 or t.dims[0] < 2 or axis != 0:
            continue
        if sum(1 for n in nodes for x in n.input if x == t.name) != 1:
            continue  # the table has other readers: leave it
        w = numpy_helper.to_array(t).astype(np.float32)
        if not int8 and not np.array_equal(w.astype(np.float16).astype(np.float32), w):
            log.debug("embedding %s holds fp32 values: kept in fp32", t.name)
            continue
        out = node.output[0]
        narrow = out + "/narrow"
        node.output[0] = narrow
        if int8:
            scale = np.maximum(np.abs(w).max(axis=1, keepdims=True), 1e-30) / 127.0
            q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
            t.CopyFrom(numpy_helper.from_array(q, t.name))
            sname = t.name + "/row_scale"
            graph.initializer.append(numpy_helper.from_array(scale.astype(np.float32), sname))
            wide, row = out + "/wide", out + "/scale"
            out_nodes += [
                helper.make_node(
                    "Cast", [narrow], [wide], to=onnx.TensorProto.FLOAT, name=node.name + "/widen"
                ),
                helper.make_node(
                    "Gather", [sname, node.input[1]], [row], axis=0, name=node.name + "/row_scale"
                ),
                helper.make_node("Mul", [wide, row], [out], name=node.name + "/scale"),
            ]
            saved += w.nbytes - q.nbytes - scale.nbytes
        else:
            t.CopyFrom(numpy_helper.from_array(w.astype(np.float16), t.name))
            out_nodes.append(
                helper.make_node(
                    "Cast", [narrow], [out], to=onnx.TensorProto.FLOAT, name=node.name + "/widen"
                )
            )
            saved += w.nbytes // 2
        log.debug("embedding %s %s stored as %s", t.name, list(t.dims), "int8" if int8 else "fp16")
    if saved:
        del graph.node[:]
        graph.node.extend(out_nodes)
    return saved


def narrow_embedding(ctx: Context, seg: GraphSegment, folder: str) -> int:
    """A built compile's CPU segment keeps its token table in fp16 where its values are fp16
    (int8 with per-row scales under --quant w8a8), widened per token (``compact``): its written
    files in ``folder``/segments (the per-token model and its T-row variant) are narrowed and
    written again, their checksums follow. Returns the bytes saved."""
    import os

    from rwkv2rknn import fileio

    if ctx.options.plan_only or seg.device != "cpu" or seg.token.model is None:
        return 0
    int8 = ctx.options.quant == "w8a8"
    saved = 0
    for variant, suffix in ((seg.token, ".onnx"), (seg.seq, ".seq.onnx")):
        if variant.model is None:
            continue
        path = os.path.join(folder, "segments", seg.name + suffix)
        in_memory = not isinstance(variant.model, str)
        model = variant.model if in_memory else fileio.load_onnx(path)
        n = compact(model, int8)
        if n:
            variant.sha256 = fileio.save_onnx(model, path, keep=in_memory)
            saved += n
    if saved:
        ctx.note(
            NAME,
            f"{seg.name}: token table stored as {'int8 with per-row scales' if int8 else 'fp16'}, "
            f"widened per token ({saved / 2**20:.1f} MiB less)",
            segment=seg.name,
        )
    return saved


def narrow_all(ctx: Context, folder: str) -> None:
    """The narrowing step, after the compile has validated itself: what validation compared is
    the model as cut; this step's own change (an int8 table under w8a8, half an int8 step per
    row at most; an fp16 table only where it is exact) is the one difference it adds."""
    for seg in ctx.segments:
        narrow_embedding(ctx, seg, folder)
