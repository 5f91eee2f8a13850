r"""load: the per-layer RWKV files into one graph, one token step of the whole model.

::

    token -> [embed/] -> [L0/] -> [L1/] ... -> [head/] -> logits
                          ^  |     \___ L0/v_first ___^   (RWKV-7: layer 0 -> later layers)
            L0/state_in --+  +--> L0/state_out        (RWKV-4: per layer, [rows, C])
            L0/wkv, ... --+  +--> L0/wkv_out, ...     (RWKV-5.2/6/7: named slots, [C] or [H, N, N])

Every tensor and node is prefixed with its stage (``embed/``, ``L{i}/``, ``head/``); the stages'
``output`` -> next ``input`` edges are joined. A single ``.onnx`` file is loaded as it is (its
own inputs and outputs), which is enough to compile and inspect one stage.

Precondition: none. Postcondition: a toposorted graph whose inputs are the token and the state
tensors and whose outputs are the logits and the new states; ``Constant`` nodes are lowered to
constant tensors.
"""

from __future__ import annotations

import os
from typing import Optional

import numpy as np

from rwkv2rknn import fileio
from rwkv2rknn.errors import BadInput, UnsupportedModel
from rwkv2rknn.compiler.ir import Context, Options, const_value, is_const, replace_uses
from rwkv2rknn.artifact.plan import StateSlot

NAME = "load"


def import_stage(path: str, prefix: str, ctx_facts: Optional[dict] = None):
    """One file as a graph at the canonical opset, names prefixed. With ``ctx_facts`` (a single
    file), Constant nodes that nothing reads (initial states, in some layouts) are collected
    into it as 'unread', and what the file says of itself as 'dtype' and 'tokenizer'."""
    import onnx_graphsurgeon as gs
    from rwkv2rknn.passes import canonicalize

    model = canonicalize.prepare(fileio.load_onnx(path), os.path.basename(path))
    canonicalize.normalize_constant_nodes(model)
    if ctx_facts is not None:
        ctx_facts.update(canonicalize.file_facts(model))
        ctx_facts["unread"] = canonicalize.dangling_constants(model)
    with fileio.as_bad_input(
        f"'{path}' cannot be read as a graph", "the file is corrupt; export it again", 80
    ):
        graph = gs.import_onnx(model)
    arrays = _raw_arrays(model)
    for t in graph.tensors().values():  # the weights as arrays now, so the file's proto goes:
        if is_const(t):  # (else the folding would load them later with the proto still held)
            t.values = arrays[t.name] if t.name in arrays else np.asarray(t.values)
    # the graph's opset list is a view into the proto, and a view keeps the whole message (every
    # weight of the file) alive: an independent copy lets it go
    graph.import_domains = (
        [_opset_id(d.domain, d.version) for d in graph.import_domains or ()]
        if graph.import_domains is not None
        else None
    )
    del model
    _lower_constants(graph)
    for t in graph.tensors().values():
        t.name = prefix + t.name
    for i, n in enumerate(graph.nodes):
        n.name = prefix + (n.name or f"{n.op}_{i}")
    return graph


_RAW_TYPES = {1: np.float32, 10: np.float16, 11: np.float64, 6: np.int32, 7: np.int64}


def _raw_arrays(model) -> dict:
    """{name: read-only array} of the initializers stored as raw bytes, each a view of one copy
    of its bytes (onnx-graphsurgeon's own loading copies them twice: 0.86 GB more for a 430M
    model's fp16 files). Nothing writes into a constant's array; a pass makes a new one."""
    import sys

    if sys.byteorder != "little":
        return {}
    out = {}
    for t in model.graph.initializer:
        dtype = _RAW_TYPES.get(t.data_type)
        if dtype is not None and t.HasField("raw_data") and t.data_location != 1:  # not EXTERNAL
            raw, dims = t.raw_data, tuple(int(d) for d in t.dims)
            if len(raw) == int(np.prod(dims)) * np.dtype(dtype).itemsize:  # else as before
                out[t.name] = np.frombuffer(raw, dtype).reshape(dims)
    return out


def _opset_id(domain: str, version: int):
    from onnx import helper

    return helper.make_opsetid(domain, version)


def _lower_constants(graph) -> None:
    import onnx_graphsurgeon as gs

    for node in list(graph.nodes):
        if node.op == "Constant" and "value" in node.attrs:
            value = node.attrs["value"]
            arr = np.asarray(value.values if hasattr(value, "values") else value)
            const = gs.Constant(node.outputs[0].name + ".const", arr)
            replace_uses(node.outputs[0], const)
            node.outputs.clear()
    graph.cleanup()


def _io_names(graph):
    return (
        [t.name.split("/", 1)[-1] for t in graph.inputs],
        [t.name.split("/", 1)[-1] for t in graph.outputs],
    )


def expect_io(graph, path: str, ins, outs) -> None:
    got_in, got_out = _io_names(graph)
    if got_in != list(ins) or got_out != list(outs):
        raise UnsupportedModel(
            f"{os.path.basename(path)} has inputs {got_in} and outputs {got_out}, expected "
            f"{list(ins)} and {list(outs)}",
            "this is not the per-layer RWKV ONNX layout",
        )


def load_folder(folder: str, arch_module):
    """One graph of the folder's stages. Returns (graph, layers, width, vocab, slots): ``slots``
    lists the named state slots of a slot layout (RWKV-5.2/6/7: ``att_shift``, ``wkv``, ...) as
    StateSlots; it is empty for the rows layout (RWKV-4's ``state_in [rows, C]``, which the
    state pass unpacks)."""
    import onnx_graphsurgeon as gs
    from rwkv2rknn.runtime.reference import stage_files

    embed_p, block_ps, head_p = stage_files(folder)
    d = arch_module
    embed = import_stage(embed_p, "embed/")
    expect_io(embed, embed_p, *d.EMBED_IO)
    blocks = []
    for i, p in enumerate(block_ps):
        g = import_stage(p, f"L{i}/")
        expect_io(g, p, *d.block_io(i))
        blocks.append(g)
    head = import_stage(head_p, "head/")
    expect_io(head, head_p, *d.HEAD_IO)
    width, vocab = table_shape(embed, embed_p)
    _pin_decode_shapes(embed, blocks, head, width, d)

    nodes = list(embed.nodes)
    x = embed.outputs[0]
    inputs = [embed.inputs[0]]
    outputs, slots, carried = [], [], {}
    for i, g in enumerate(blocks):
        ins = dict(zip(_io_names(g)[0], g.inputs))
        outs = dict(zip(_io_names(g)[1], g.outputs))
        replace_uses(g.inputs[0], x)
        for name in d.INTER_LAYER:  # values a block hands to later blocks of the same token
            if name in ins:
                replace_uses(ins[name], carried[name])
            elif name in outs:
                carried[name] = outs[name]
        nodes += g.nodes
        slots += stage_slots(g, i, d)
        inputs += [ins[name] for name in ins if name not in ("input",) + d.INTER_LAYER]
        outputs += [outs[name] for name in outs if name not in ("output",) + d.INTER_LAYER]
        x = g.outputs[0]
    replace_uses(head.inputs[0], x)
    nodes += head.nodes
    logits = head.outputs[0]
    embed.inputs[0].name = "token"
    logits.name = "logits"
    graph = gs.Graph(
        nodes=nodes,
        inputs=inputs,
        outputs=[logits] + outputs,
        opset=max(embed.opset, head.opset),
        name="rwkv",
    )
    graph.cleanup().toposort()
    return graph, len(blocks), width, vocab, slots


def _pin_decode_shapes(embed, blocks, head, width: int, d) -> None:
    """Every stage's inputs take their decode shape (see ``pin_stage``)."""
    pin_stage(embed, "embed", width, d)
    pin_stage(head, "head", width, d)
    for g in blocks:
        pin_stage(g, "block", width, d)


def pin_stage(g, kind: str, width: int, d) -> None:
    """The inputs of one stage (``kind`` 'embed', 'block' or 'head') take their decode shape:
    symbolic dims, as torch.onnx's dynamic axes write them, become numbers (the token [1], the
    hidden state [C], RWKV-4's state [rows, C], the [C] values a block passes on or keeps as
    state); fixed dims must agree with the embedding's width."""
    if kind != "block":
        pins = [(g.inputs[0], [1] if kind == "embed" else [width])]
    else:
        pins = [(g.inputs[0], [width])]
        ins = dict(zip(_io_names(g)[0], g.inputs))
        rows = getattr(d, "STATE_ROWS", None)
        if rows and "state_in" in ins:  # the rows layout: [rows, C]
            pins.append((ins["state_in"], [len(rows), width]))
        vectors = tuple(d.INTER_LAYER) + tuple(
            name for name, kind_, _ in getattr(d, "STATE_SLOTS", ()) if kind_ == "C"
        )
        pins += [(ins[name], [width]) for name in vectors if name in ins]
    for t, want in pins:
        have = list(t.shape or [])
        if len(have) != len(want) or any(
            isinstance(h, int) and h >= 0 and h != w for h, w in zip(have, want)
        ):
            raise UnsupportedModel(
                f"the per-layer files disagree on the width ('{t.name}' has shape "
                f"{have}, expected {want}: width {width} from the embedding)",
                "all files must come from one export",
            )
        t.shape = want


def stage_slots(g, layer: int, d) -> list:
    """The StateSlots of block ``layer``'s graph in a slot layout (empty for RWKV-4's rows)."""
    ins = dict(zip(_io_names(g)[0], g.inputs))
    outs = dict(zip(_io_names(g)[1], g.outputs))
    return [
        StateSlot(layer, name, ins[name].name, outs[out].name, acc, tuple(int(s) for s in ins[name].shape))
        for name, out, acc in d.STATE_IO
    ]


def table_shape(embed, path: str):
    """(width, vocab) from the embedding table: the 2-D constant the token Gather reads."""
    for node in embed.nodes:
        if (
            node.op == "Gather"
            and const_value(node.inputs[0]) is not None
            and const_value(node.inputs[0]).ndim == 2
        ):
            vocab, width = const_value(node.inputs[0]).shape
            return int(width), int(vocab)
    raise UnsupportedModel(
        f"{os.path.basename(path)} has no embedding table (a Gather from a 2-D constant)",
        "this is not the per-layer RWKV ONNX layout",
    )


def arch_of_folder(folder: str):
    """The model module of a per-layer folder: from our exporter's description, else from the
    blocks' inputs (the public RWKV-4 files have no description)."""
    from rwkv2rknn.models.export import MODULES
    from rwkv2rknn.runtime.reference import stage_files

    by_arch = {m.ARCH: m for m in MODULES.values()}
    arch = fileio.model_facts(folder).get("arch")
    if arch in by_arch:
        return by_arch[arch]
    blocks = stage_files(folder)[1]
    names = [i.name for i in fileio.load_onnx(blocks[-1]).graph.input]
    if names[:1] != ["input"] or "wkv" not in names:
        return MODULES["4"]
    return MODULES["7"] if "v_first" in names else MODULES["6"]


def refuse_checkpoint(path: str) -> None:
    """A checkpoint (a .pth, .safetensors, .bin or a Hugging Face folder) given to compile."""
    from rwkv2rknn.models.hf import CONFIG, sniff

    if os.path.isdir(path):
        names = os.listdir(path)
        weights = [n for n in names if n.endswith((".pth", ".safetensors", ".bin"))]
        if "embed.onnx" in names or not (weights or CONFIG in names):
            return
        what = f"'{path}' is a model folder of weights ({(weights or [CONFIG])[0]}), not ONNX files"
    elif path.endswith(".onnx") or sniff(path) not in ("torch", "safetensors"):
        return
    else:
        what = f"'{path}' is a checkpoint, not ONNX"
    raise BadInput(what, f"export it first: rwkv2rknn export {path} -o model/ (then compile model/)")


def run(path: str, options: Options = None) -> Context:
    """Load a folder of per-layer files (or one .onnx) into a new Context."""
    options = options or Options()
    if not os.path.exists(path):
        raise BadInput(
            f"'{path}' does not exist", "give a folder of per-layer RWKV ONNX files or an .onnx file"
        )
    refuse_checkpoint(path)
    if os.path.isdir(path):
        arch = arch_of_folder(path)
        graph, layers, width, vocab, slots = load_folder(path, arch)
        ctx = Context(
            graph=graph,
            source=os.path.abspath(path),
            arch=arch.ARCH,
            layout="per-layer",
            shape={"layers": layers, "width": width, "vocab": vocab},
        )
        ctx.state = slots
        ctx.cpu_recurrence_inputs = bool(getattr(arch, "CPU_RECURRENCE_INPUTS", False))
        if not slots:
            ctx.whole_state = {i: (f"L{i}/state_in", f"L{i}/state_out") for i in range(layers)}
    else:
        if not path.endswith(".onnx"):
            raise BadInput(
                f"'{path}' is not an .onnx file or a folder",
                "give a folder of per-layer RWKV ONNX files or an .onnx file",
            )
        facts = {}
        graph = import_stage(path, "", facts)
        ctx = Context(graph=graph, source=os.path.abspath(path), arch="onnx")
        ctx.token_input = ""
        ctx.logits_output = ""
        ctx.unread_constants = facts.pop("unread")
        ctx.facts = facts
    ctx.options = options
    ctx.profile  # read --profile now: a bad file fails before any work
    n = len(ctx.graph.nodes)
    if os.path.isdir(path):
        files = (
            f"{arch.EMBED_FILE}, {arch.BLOCK_FILE.format(0)}..{arch.BLOCK_FILE.format(layers - 1)}"
            f", {arch.HEAD_FILE}"
        )
        ctx.note(
            NAME,
            f"recognised per-layer {ctx.arch} files ({files}): {layers} layers, width "
            f"{width}, vocab {vocab}; {n} nodes",
        )
    else:
        ctx.note(NAME, f"{n} nodes from {path}")
    return ctx
