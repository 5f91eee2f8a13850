"""Export an RWKV checkpoint (RWKV-4, 5.2, 6 or 7) to the per-layer ONNX layout.

Files: ``embed.onnx``, ``mixing_{i}.onnx``, ``head.onnx`` (for RWKV-4 names, shapes and state
rows as the public files; RWKV-5.2/6/7's block I/O is in ``models/slots.py``), plus
``rwkv2rknn-model.json`` describing the model (arch, version, shape, state slots). fp16 by
default, made by onnxconverter-common's ``convert_float_to_float16`` with default arguments,
exactly as the public files were (RWKV-5.2/6/7: the recurrence nodes are kept in fp32 by the
converter's block list); ``fp32=True`` keeps float32. To a name ending in .onnx, ``export`` joins
a model's graphs into one file (the architecture, dtype and tokenizer in its metadata).
"""

from __future__ import annotations

import logging
import os
from typing import Callable, Dict, Optional, Tuple

import numpy as np

from rwkv2rknn import fileio
from rwkv2rknn.errors import MissingDependency, UnsupportedModel
from rwkv2rknn.models import rwkv4, rwkv5, rwkv6, rwkv7
from rwkv2rknn.runtime.onnxwire import encode_varint

log = logging.getLogger(__name__)
MODEL_JSON = fileio.MODEL_JSON  # the record of what was exported, beside the files
MODULES = {"4": rwkv4, "5": rwkv5, "6": rwkv6, "7": rwkv7}  # version -> the module that knows it


def arch_of(sd) -> Tuple[object, object]:
    """(model module, shape) of a checkpoint, validated; a one-line error for other versions."""
    version = rwkv4.detect_version(sd)
    module = MODULES.get(version)
    if module is None:
        raise UnsupportedModel(
            f"RWKV-{version} is not supported yet", "RWKV-4, 5.2, 6 and 7 checkpoints can be exported"
        )
    return module, module.check_state_dict(sd)


def to_fp16(model, keep_fp32=()):
    try:
        from onnxconverter_common import float16
    except ImportError as e:
        raise MissingDependency(
            "fp16 export needs onnxconverter-common", "pip install onnxconverter-common (or pass --fp32)"
        ) from e
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        # the converter warns once per constant it clamps to 1e-7 <= |x| <= 1e4
        warnings.simplefilter("always")
        out = float16.convert_float_to_float16(model, node_block_list=list(keep_fp32) or None)
    clamped = sum("truncated" in str(w.message) for w in caught)
    if clamped:
        log.info("fp16 conversion clamped %d constant value(s) to 1e-7 <= |x| <= 1e4", clamped)
    return out


ONE_FILE_LIMIT = 2 * 1024**3 - 64 * 1024**2  # protobuf's 2 GB, less room for the graph itself


def _stages(arch, sd, layers: int) -> list:
    """(name prefix, file name, graph maker) of every stage in order: embed, L0, ..., head."""
    stages = [("embed/", arch.EMBED_FILE, lambda: arch.embed_graph(sd))]
    stages += [
        (f"L{i}/", arch.BLOCK_FILE.format(i), lambda i=i: arch.block_graph(sd, i)) for i in range(layers)
    ]
    return stages + [("head/", arch.HEAD_FILE, lambda: arch.head_graph(sd))]


def export(
    sd: Dict[str, np.ndarray],
    out: str,
    fp32: bool = False,
    tokenizer: Optional[str] = None,
    force: bool = False,
    progress: Optional[Callable[[str], None]] = None,
    tokenizer_file: Optional[str] = None,
    external_limit: int = ONE_FILE_LIMIT,
):
    """Write ``sd`` (validated), atomically, as the per-layer files of the folder ``out``, or for
    a name ending in .onnx as one whole-model file (weights as external data ``OUT.data`` beside
    it when they pass ``external_limit`` bytes); returns the model's shape. ``tokenizer_file``
    (a folder): a tokenizer.json copied beside the files and recorded as the model's tokenizer
    (a Hugging Face folder's own); ``progress`` (a folder): called with each file's name."""
    if out.endswith(".onnx"):
        arch, shape = _export_file(sd, out, fp32, tokenizer, force, external_limit)
    else:
        arch, shape = _export_folder(sd, out, fp32, tokenizer, force, progress, tokenizer_file)
    log.info(
        "exported %s (%d layers, width %d, vocab %d) to %s",
        arch.ARCH,
        shape.layers,
        shape.width,
        shape.vocab,
        out,
    )
    return shape


def _export_folder(sd, out_dir, fp32, tokenizer, force, progress, tokenizer_file):
    import shutil

    arch, shape = arch_of(sd)
    stages = [(file, make) for _, file, make in _stages(arch, sd, shape.layers)]
    keep = getattr(arch, "fp32_nodes", lambda m: [])
    with fileio.atomic_dir(out_dir, MODEL_JSON, force=force) as tmp:
        for name, build in stages:
            model = build()
            if not fp32:
                model = to_fp16(model, keep(model))
            fileio.save_onnx(model, os.path.join(tmp, name))
            if progress:
                progress(name)
        if tokenizer_file:
            shutil.copyfile(tokenizer_file, os.path.join(tmp, "tokenizer.json"))
            tokenizer = "tokenizer.json"
        fileio.write_json(
            os.path.join(tmp, MODEL_JSON),
            {
                "arch": arch.ARCH,
                "shape": shape.to_dict(),
                "dtype": "float32" if fp32 else "float16",
                "tokenizer": tokenizer,
                **arch.description(shape),
            },
        )
    return arch, shape


# --------------------------------------------------------------------------------------------
# one whole-model file

METADATA_PREFIX = "rwkv2rknn."  # metadata_props keys the compiler reads back


def whole_model(sd: Dict[str, np.ndarray], fp32: bool = True):
    """The per-layer graphs joined into one ModelProto: ``token`` int32 [1] -> ``logits`` [V]
    and the state, per layer: RWKV-4 ``L{i}/state_in`` / ``L{i}/state_out`` [rows, C] (rows as
    the per-layer files); RWKV-5.2/6/7 ``L{i}/SLOT`` / ``L{i}/SLOT_out`` for every named slot
    (``att_shift`` [C], ``wkv`` [H, N, N], ``ffn_shift`` [C]). Values a block hands to later
    blocks (RWKV-7's ``v_first``) stay inside the graph. Node and tensor names carry their stage
    (``embed/``, ``L{i}/``, ``head/``). ``fp32=False``: each stage converted to fp16 first (the
    recurrence kept in fp32, as in the per-layer files)."""
    from onnx import helper

    nodes, inits = [], []
    pieces = _stage_pieces(sd, fp32)
    for stage_nodes, stage_inits in pieces:
        nodes += stage_nodes
        inits += stage_inits
    arch, shape, inputs, outputs, opset = pieces.result
    graph = helper.make_graph(nodes, "rwkv", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=opset, producer_name="rwkv2rknn")
    model.ir_version = 8
    return model, shape, arch


class _Pieces:
    """Iterates the stages of a whole model as (nodes, initializers), one stage built at a
    time; then ``result`` is (arch, shape, inputs, outputs, opset imports)."""

    def __init__(self, sd, fp32: bool):
        self.sd, self.fp32, self.result = sd, fp32, None

    def __iter__(self):
        from onnx import compose, helper

        sd = self.sd
        arch, shape = arch_of(sd)
        keep = getattr(arch, "fp32_nodes", lambda m: [])
        stages = [(prefix, make) for prefix, _, make in _stages(arch, sd, shape.layers)]
        inter = tuple(getattr(arch, "INTER_LAYER", ()))
        inputs, outputs, logits_type, opset = [], [], None, None
        x, carried = None, {}  # the residual stream leaving the previous stage; inter-layer values
        for prefix, build in stages:
            model = build()
            if not self.fp32:
                model = to_fp16(model, keep(model))
            opset = opset or model.opset_import
            g = compose.add_prefix(model, prefix).graph
            del model
            first, last = g.input[0].name, g.output[0].name
            rename = {first: x} if x else {first: "token"}
            if prefix == "head/":
                rename[last] = "logits"
                logits_type = g.output[0].type.tensor_type.elem_type
            for name in inter:  # a later block reads the value an earlier block made
                if prefix + name in {t.name for t in g.input} and name in carried:
                    rename[prefix + name] = carried[name]
                elif prefix + name in {t.name for t in g.output}:
                    carried[name] = prefix + name
            for node in g.node:
                node.input[:] = [rename.get(n, n) for n in node.input]
                node.output[:] = [rename.get(n, n) for n in node.output]
            if x is None:
                inputs.append(
                    helper.make_tensor_value_info("token", g.input[0].type.tensor_type.elem_type, [1])
                )
            # copies: a message taken out of the stage's graph would keep all of it (every
            # weight of the stage) alive
            inputs += [_copy(t) for t in g.input[1:] if t.name not in rename]
            outputs += [_copy(t) for t in g.output[1:] if t.name not in carried.values()]
            x = g.output[0].name
            yield [_copy(n) for n in g.node], list(g.initializer)
            del g
        outputs.insert(0, helper.make_tensor_value_info("logits", logits_type, [shape.vocab]))
        self.result = (arch, shape, inputs, outputs, opset)


def _copy(message):
    out = type(message)()
    out.CopyFrom(message)
    return out


def _stage_pieces(sd, fp32: bool) -> _Pieces:
    return _Pieces(sd, fp32)


def _write_streamed(sd, fp32: bool, path: str, props: Dict[str, str], force: bool):
    """Write what ``whole_model`` makes, byte for byte what onnx.save would write, holding one
    stage at a time: the nodes in memory (small), each stage's weights appended to a scratch
    file, then the graph's length-prefixed record assembled around them. Returns the shape."""
    import shutil
    import onnx
    from onnx import helper

    path, tmp = fileio.partial_folder(path, force)
    try:
        weights = os.path.join(tmp, "weights")
        nodes = []
        pieces = _stage_pieces(sd, fp32)
        with open(weights, "wb") as w:
            for stage_nodes, stage_inits in pieces:
                nodes += stage_nodes
                w.write(onnx.GraphProto(initializer=stage_inits).SerializeToString())
                del stage_inits
        arch, shape, inputs, outputs, opset = pieces.result
        # GraphProto fields in number order: node (1), name (2), initializer (5), input (11),
        # output (12); ModelProto: ir_version (1), producer_name (2), graph (7), opset_import (8),
        # metadata_props (14)
        head = (
            onnx.GraphProto(node=nodes).SerializeToString() + onnx.GraphProto(name="rwkv").SerializeToString()
        )
        tail = onnx.GraphProto(input=inputs, output=outputs).SerializeToString()
        graph_len = len(head) + os.path.getsize(weights) + len(tail)
        before = onnx.ModelProto(ir_version=8, producer_name="rwkv2rknn").SerializeToString()
        after = helper.make_model(onnx.GraphProto(), opset_imports=opset)
        after.ClearField("graph")
        after.ClearField("ir_version")
        helper.set_model_props(after, props)
        out = os.path.join(tmp, os.path.basename(path))
        with open(out, "wb") as f:
            f.write(before + bytes([7 << 3 | 2]) + encode_varint(graph_len) + head)
            with open(weights, "rb") as w:
                shutil.copyfileobj(w, f, 16 << 20)
            f.write(tail + after.SerializeToString())
        os.replace(out, path)
        data = path + ".data"
        if os.path.exists(data) and force:
            os.unlink(data)  # an older export's weights, no longer read
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return shape


def _export_file(sd, path, fp32, tokenizer, force, external_limit):
    from onnx import helper

    arch, _ = arch_of(sd)
    props = {
        METADATA_PREFIX + "arch": arch.ARCH,
        METADATA_PREFIX + "tokenizer": tokenizer or "",
        METADATA_PREFIX + "dtype": "float32" if fp32 else "float16",
    }
    # at most the fp32 bytes of the weights: below the limit, the file is written one stage at
    # a time (a whole ModelProto of a 430M model took more than 12 GB to build and save)
    if sum(np.asarray(v).size * 4 for v in sd.values()) <= external_limit:
        shape = _write_streamed(sd, fp32, path, props, force)
    else:
        model, shape, arch = whole_model(sd, fp32)
        helper.set_model_props(model, props)
        weight_bytes = sum(len(t.raw_data) for t in model.graph.initializer)
        fileio.save_onnx_file(model, path, external=weight_bytes > external_limit, force=force)
    return arch, shape
