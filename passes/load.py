"""load: the per-layer RWKV files into one graph, one token step of the whole model.

::

    token -> [embed/] -> [L0/] -> [L1/] ... -> [head/] -> logits
                          ^  |
            L0/state_in --+  +--> L0/state_out        (per layer, [rows, C])

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

from rwkv2rknn import io
from rwkv2rknn.errors import BadInput, UnsupportedModel
from rwkv2rknn.ir import Context, Options, const_value, is_const, replace_uses

NAME = "load"


def _import(path: str, prefix: str, ctx_facts: Optional[dict] = None):
    """One file as a graph at the canonical opset, names prefixed. With ``ctx_facts`` (a single
    file), Constant nodes that nothing reads (initial states, in some layouts) are collected
    into it as 'unread', and what the file says of itself as 'dtype' and 'tokenizer'."""
    import onnx_graphsurgeon as gs
    from rwkv2rknn.passes import canonicalize
    model = canonicalize.to_opset(io.load_onnx(path), os.path.basename(path))
    canonicalize.normalize_constant_nodes(model)
    if ctx_facts is not None:
        ctx_facts.update(canonicalize.file_facts(model))
        ctx_facts["unread"] = canonicalize.dangling_constants(model)
    try:
        graph = gs.import_onnx(model)
    except Exception as e:
        raise BadInput(f"'{path}' cannot be read as a graph ({type(e).__name__}: {str(e)[:80]})",
                       "the file is corrupt; export it again") from e
    for t in graph.tensors().values():  # the weights as arrays now, so the file's proto goes:
        if is_const(t):  # (else the folding would load them later with the proto still held)
            t.values = np.asarray(t.values)
    del model
    _lower_constants(graph)
    for t in graph.tensors().values():
        t.name = prefix + t.name
    for i, n in enumerate(graph.nodes):
        n.name = prefix + (n.name or f"{n.op}_{i}")
    return graph


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
    return ([t.name.split("/", 1)[-1] for t in graph.inputs],
            [t.name.split("/", 1)[-1] for t in graph.outputs])


def _expect(graph, path: str, ins, outs) -> None:
    got_in, got_out = _io_names(graph)
    if got_in != list(ins) or got_out != list(outs):
        raise UnsupportedModel(
            f"{os.path.basename(path)} has inputs {got_in} and outputs {got_out}, expected "
            f"{list(ins)} and {list(outs)}", "this is not the per-layer RWKV ONNX layout")


def load_folder(folder: str, arch_module):
    import onnx_graphsurgeon as gs
    from rwkv2rknn.runtime.reference import stage_files

    embed_p, block_ps, head_p = stage_files(folder)
    d = arch_module
    embed = _import(embed_p, "embed/")
    _expect(embed, embed_p, *d.EMBED_IO)
    blocks = []
    for i, p in enumerate(block_ps):
        g = _import(p, f"L{i}/")
        _expect(g, p, *d.BLOCK_IO)
        blocks.append(g)
    head = _import(head_p, "head/")
    _expect(head, head_p, *d.HEAD_IO)

    width, vocab = _table_shape(embed, embed_p)
    rows = len(d.STATE_ROWS)
    pins = [(embed.inputs[0], [1]), (head.inputs[0], [width])]
    for g in blocks:
        pins += [(g.inputs[0], [width]), (g.inputs[1], [rows, width])]
    for t, want in pins:  # symbolic dims take the decode shape; fixed ones must agree
        have = list(t.shape or [])
        if len(have) != len(want) or any(isinstance(h, int) and h >= 0 and h != w
                                         for h, w in zip(have, want)):
            raise UnsupportedModel(f"the per-layer files disagree on the width ('{t.name}' has shape "
                                   f"{have}, expected {want}: width {width} from the embedding)",
                                   "all files must come from one export")
        t.shape = want

    nodes = list(embed.nodes)
    x = embed.outputs[0]
    inputs = [embed.inputs[0]]
    outputs = []
    for g in blocks:
        replace_uses(g.inputs[0], x)
        nodes += g.nodes
        inputs.append(g.inputs[1])
        outputs.append(g.outputs[1])
        x = g.outputs[0]
    replace_uses(head.inputs[0], x)
    nodes += head.nodes
    logits = head.outputs[0]
    embed.inputs[0].name = "token"
    logits.name = "logits"
    graph = gs.Graph(nodes=nodes, inputs=inputs, outputs=[logits] + outputs,
                     opset=max(embed.opset, head.opset), name="rwkv")
    graph.cleanup().toposort()
    return graph, len(blocks), width, vocab


def _table_shape(embed, path: str):
    """(width, vocab) from the embedding table: the 2-D constant the token Gather reads."""
    for node in embed.nodes:
        if node.op == "Gather" and const_value(node.inputs[0]) is not None and \
                const_value(node.inputs[0]).ndim == 2:
            vocab, width = const_value(node.inputs[0]).shape
            return int(width), int(vocab)
    raise UnsupportedModel(f"{os.path.basename(path)} has no embedding table (a Gather from a 2-D "
                           f"constant)", "this is not the per-layer RWKV ONNX layout")


def run(path: str, options: Options = None) -> Context:
    """Load a folder of per-layer files (or one .onnx) into a new Context."""
    from rwkv2rknn.models import rwkv4

    options = options or Options()
    if not os.path.exists(path):
        raise BadInput(f"'{path}' does not exist",
                       "give a folder of per-layer RWKV ONNX files or an .onnx file")
    if os.path.isdir(path):
        graph, layers, width, vocab = load_folder(path, rwkv4)
        ctx = Context(graph=graph, source=os.path.abspath(path), arch=rwkv4.ARCH, layout="per-layer",
                      shape={"layers": layers, "width": width, "vocab": vocab})
        ctx.whole_state = {i: (f"L{i}/state_in", f"L{i}/state_out") for i in range(layers)}
    else:
        if not path.endswith(".onnx"):
            raise BadInput(f"'{path}' is not an .onnx file or a folder",
                           "give a folder of per-layer RWKV ONNX files or an .onnx file")
        facts = {}
        graph = _import(path, "", facts)
        ctx = Context(graph=graph, source=os.path.abspath(path), arch="onnx")
        ctx.token_input = ""
        ctx.logits_output = ""
        ctx.unread_constants = facts.pop("unread")
        ctx.facts = facts
    ctx.options = options
    ctx.profile  # read --profile now: a bad file fails before any work
    n = len(ctx.graph.nodes)
    if os.path.isdir(path):
        files = (f"{rwkv4.EMBED_FILE}, {rwkv4.BLOCK_FILE.format(0)}..{rwkv4.BLOCK_FILE.format(layers - 1)}"
                 f", {rwkv4.HEAD_FILE}")
        ctx.note(NAME, f"recognised per-layer {ctx.arch} files ({files}): {layers} layers, width "
                       f"{width}, vocab {vocab}; {n} nodes")
    else:
        ctx.note(NAME, f"{n} nodes from {path}")
    return ctx
