"""Streaming compile: a folder of per-layer files, one stage (embed, L0, L1, ..., head) at a time.

::

    embed.onnx -> load, keep_fp32, state, normalize_matmul -> trace (tokens) -> guard, support --+
    mixing_0.onnx -> ...                                    -> trace (x from embed) -> ...  ----+-> window
    mixing_1.onnx -> ...                                    -> trace (x from L0)    -> ...  ----+
                                                                                                 |
    window = the stages' nodes not yet written: partition it; every segment before the first one
    that holds a node of the newest stage is final (nothing later can join it): cut it, make its
    T-row variant, write both, drop them; the rest waits for the next stage.

The graph passes are the whole-graph compile's own, run on one stage's graph; the range trace
runs each stage alone, feeding it the hidden state the stage before made at each sample token
(the stage's own state threads from step to step), so no whole-model session (and no 2 GB
protobuf) is ever made. Partitioning a window of the pending nodes keeps the cross-layer fusion
(the NPU tail of layer i and the NPU head of layer i+1 in one segment). Peak memory is a few
stages' fp32 weights, not the model's.

This module does not import the passes: the compiler hands them in (``passes``), so that imports
still run one way.
"""

from __future__ import annotations

import logging
import os
import re
import time
from types import SimpleNamespace
from typing import Callable, List, Optional

import numpy as np

from rwkv2rknn import io, resources
from rwkv2rknn.ir import Context, GraphSegment, Options, replace_uses

log = logging.getLogger(__name__)


def _vocab(graph) -> int:
    """Rows of the embedding table (the Gather's constant) of the embed stage."""
    from rwkv2rknn.ir import const_value
    for n in graph.nodes:
        if n.op == "Gather":
            table = const_value(n.inputs[0])
            if table is not None and table.ndim == 2:
                return int(table.shape[0])
    return 2


def _stub(node, op_work) -> SimpleNamespace:
    """What a written segment keeps of a node: its name and op, for a MatMul the shapes its
    estimates need (the weight as a zero-strided array of its shape: no memory), for any other
    op its bytes and FLOPs (``op_work``, the partition pass's), not weights."""
    import onnx_graphsurgeon as gs
    from rwkv2rknn.ir import const_value
    inputs = []
    if node.op == "MatMul":
        for t in node.inputs:
            w = const_value(t)
            inputs.append(gs.Constant(t.name, np.broadcast_to(np.float32(0), w.shape))
                          if w is not None else SimpleNamespace(name=t.name, shape=t.shape, inputs=[]))
    work = op_work([node])
    return SimpleNamespace(name=node.name, op=node.op, inputs=inputs, outputs=[],
                           work=work[0] if work else None)


class _Stream:
    def __init__(self, passes, folder: str, options: Options, out_dir: str,
                 on_stage: Optional[Callable[[str], None]]):
        from rwkv2rknn.models import rwkv4
        from rwkv2rknn.runtime.reference import stage_files

        self.p, self.out_dir, self.on_stage = passes, out_dir, on_stage
        embed_p, block_ps, head_p = stage_files(folder)
        self.stages = ([("embed", embed_p, rwkv4.EMBED_IO)] +
                       [(f"L{i}", p, rwkv4.BLOCK_IO) for i, p in enumerate(block_ps)] +
                       [("head", head_p, rwkv4.HEAD_IO)])
        self.ctx = Context(graph=None, source=os.path.abspath(folder), arch=rwkv4.ARCH,
                           layout="per-layer", options=options,
                           shape={"layers": len(block_ps), "width": None, "vocab": None})
        self.ctx.profile  # a bad --profile fails before any work
        self.window: List = []  # nodes not yet in a written segment, in run order
        self.outputs = set()  # names of the model's outputs (state rows, logits)
        self.opset = 13
        self.x = None  # the newest stage's hidden output tensor
        self.x_values: list = []  # its value at every sample token
        self.steps_in: list = []
        self.written: List[GraphSegment] = []
        self.notes: dict = {}
        self.levels: dict = {}  # tensor a written segment made -> its producer's depth
        self.depth: dict = {}  # node name -> depth in the model (the window's last sort)

    # ------------------------------------------------------------------------ one stage

    def load(self, stage: str, path: str, io_names):
        g = self.p.load.import_stage(path, stage + "/")
        self.p.load.expect_io(g, path, *io_names)
        width = int(g.inputs[0].shape[0]) if stage != "embed" else None
        if width is not None:
            if self.ctx.shape["width"] not in (None, width):
                from rwkv2rknn.errors import UnsupportedModel
                raise UnsupportedModel(
                    f"the per-layer files disagree on the width ({self.ctx.shape['width']} and "
                    f"{width} in {os.path.basename(path)})", "all files must come from one export")
            self.ctx.shape["width"] = width
        if stage == "embed":
            g.inputs[0].name = "token"
            self.ctx.shape["vocab"] = _vocab(g)
        else:
            g.inputs[0].name = self.x.name  # the name the whole-model graph gives it
        if stage == "head":
            g.outputs[0].name = "logits"
        self.opset = max(self.opset, g.opset)
        return g

    def stage_passes(self, stage: str, g):
        p, ctx = self.p, self.ctx
        sctx = Context(graph=g, source=ctx.source, arch=ctx.arch, shape=ctx.shape,
                       options=ctx.options)
        sctx._profile = ctx.profile
        if stage.startswith("L"):
            i = int(stage[1:])
            sctx.whole_state = {i: (f"L{i}/state_in", f"L{i}/state_out")}
        for mod in self.before_trace():  # canonicalize ... normalize_matmul, as one graph has them
            mod.run(sctx)
        g = sctx.graph
        if stage == "embed":
            tok_type = np.int64 if np.dtype(g.inputs[0].dtype or np.int64) == np.int64 else np.int32
            tokens = p.fp16_guard.sample_tokens(sctx)
            steps = [{"token": np.array([t], tok_type)} for t in tokens]
        else:
            steps = [{self.x_name_in: v} for v in self.x_values]
        from rwkv2rknn.trace import trace_steps
        pairs = [(s.input, s.output) for s in sctx.state] + list(sctx.whole_state.values())
        out = g.outputs[0]
        sctx.tensors, kept = trace_steps(g, steps, pairs, keep=[out.name])
        self.x_values = kept[out.name]
        for mod in (p.fp16_guard, p.support):
            mod.run(sctx)
        ctx.state += sctx.state
        ctx.whole_state.update(sctx.whole_state)
        ctx.tensors.update(sctx.tensors)
        ctx.support.update(sctx.support)
        ctx.forced_cpu.update(sctx.forced_cpu)
        for line in sctx.report:
            name, _, msg = line.partition(": ")
            self.notes.setdefault(name, []).append(f"{stage}: {msg}")
        self.outputs |= {t.name for t in g.outputs[1:]} | ({"logits"} if stage == "head" else set())
        return g, out

    def before_trace(self):
        """The pipeline's passes before the range guard (whose trace a stage does itself)."""
        pipeline = list(self.p.GRAPH_PIPELINE)
        return pipeline[:pipeline.index(self.p.fp16_guard)]

    # ------------------------------------------------------------------------ the window

    def add(self, g, out) -> None:
        if self.x is not None:
            replace_uses(g.inputs[0], self.x)  # join: the stage reads the previous stage's output
        self.window += list(g.nodes)
        self.x = out
        self.x_name_in = out.name

    def flush(self, last: bool, newest: str) -> int:
        """Partition the window; cut, write and drop every segment that is final."""
        import onnx_graphsurgeon as gs
        p, ctx = self.p, self.ctx
        self.window = self.toposort(self.window)
        wg = gs.Graph(nodes=list(self.window), opset=self.opset, name="window")
        wctx = Context(graph=wg, source=ctx.source, arch=ctx.arch, shape=ctx.shape,
                       options=ctx.options, state=ctx.state, tensors=ctx.tensors,
                       support=ctx.support, token_input=ctx.token_input)
        wctx._profile = ctx.profile
        p.partition.run(wctx)
        for line in wctx.report:  # what pruning moved to the CPU, window by window
            name, _, msg = line.partition(": ")
            if "moved to the CPU" in msg:
                self.notes.setdefault(name, []).append(f"window up to {newest}: {msg}")
        segs = wctx.segments
        final = len(segs) if last else next(
            (k for k, s in enumerate(segs) if any(n.name.startswith(newest + "/") for n in s.nodes)),
            len(segs))
        owner = {n.name: k for k, s in enumerate(segs) for n in s.nodes}
        gone = set()
        for k in range(final):
            seg = segs[k]
            p.cut.cut_one(wctx, seg, k, len(self.written), owner, self.outputs)
            p.sequence.run_one(ctx, seg)
            self.write(seg)
            gone |= {n.name for n in seg.nodes}
            seg.nodes = [_stub(n, p.partition.op_work) for n in seg.nodes]
            self.written.append(seg)
        if gone:
            self.window = [n for n in self.window if n.name not in gone]
            self.detach(gone)
        return final

    def toposort(self, nodes) -> list:
        """onnx-graphsurgeon's toposort (a stable sort by depth, producers first), with the
        depth counted from the model's inputs: a tensor a written segment made keeps its
        producer's depth. So the window's order, and with it every segment's input and output
        order, is the one the whole-model graph has."""
        level = {}
        inside = {id(n) for n in nodes}

        def depth(node) -> int:
            if id(node) in level:
                return level[id(node)]
            top = -1
            for t in node.inputs:
                for p in t.inputs:
                    top = max(top, depth(p) if id(p) in inside else self.levels.get(t.name, -1))
                if not t.inputs:
                    top = max(top, self.levels.get(t.name, -1))
            level[id(node)] = top + 1
            return top + 1

        for node in nodes:
            depth(node)
        by_id = {id(n): n for n in nodes}
        order = sorted(level, key=lambda k: level[k])  # stable: ties keep depth-first order
        self.depth = {by_id[k].name: level[k] for k in order}
        return [by_id[k] for k in order]

    def detach(self, gone) -> None:
        """Pending nodes read what written segments made through fresh tensors of the same
        name, so that the written nodes (and their weights) can be freed."""
        import onnx_graphsurgeon as gs
        fresh = {}
        for node in self.window:
            for i, t in enumerate(node.inputs):
                if t.inputs and t.inputs[0].name in gone:
                    if t.name not in fresh:
                        fresh[t.name] = gs.Variable(t.name, dtype=t.dtype, shape=t.shape)
                        self.levels[t.name] = self.depth[t.inputs[0].name]
                    node.inputs[i] = fresh[t.name]

    def write(self, seg: GraphSegment) -> None:
        folder = os.path.join(self.out_dir, "segments")
        path = os.path.join(folder, seg.name + ".onnx")
        io.save_onnx(seg.model, path, keep=False)
        seg.model = path
        if seg.seq_model is not None:
            io.save_onnx(seg.seq_model, os.path.join(folder, seg.name + ".seq.onnx"), keep=False)
            seg.seq_model = os.path.join(folder, seg.name + ".seq.onnx")

    # ------------------------------------------------------------------------ the whole run

    def run(self) -> Context:
        t0 = time.monotonic()
        n = len(self.stages)
        os.makedirs(os.path.join(self.out_dir, "segments"), exist_ok=True)
        for k, (stage, path, io_names) in enumerate(self.stages):
            g = self.load(stage, path, io_names)
            g, out = self.stage_passes(stage, g)
            self.add(g, out)
            del g
            made = self.flush(k == n - 1, stage)
            resources.give_back_memory()
            if self.on_stage:
                done = time.monotonic() - t0
                eta = done / (k + 1) * (n - k - 1)
                self.on_stage(f"[{k + 1}/{n}] {stage}: {made} segment(s) written "
                              f"({done:.0f} s, eta {int(eta) // 60}:{int(eta) % 60:02d})")
        self.summarise()
        return self.ctx

    def summarise(self) -> None:
        from rwkv2rknn.models import rwkv4
        ctx, segs = self.ctx, self.written
        layers = ctx.shape["layers"]
        ctx.note("load", f"recognised per-layer {ctx.arch} files ({rwkv4.EMBED_FILE}, "
                         f"{rwkv4.BLOCK_FILE.format(0)}..{rwkv4.BLOCK_FILE.format(layers - 1)}, "
                         f"{rwkv4.HEAD_FILE}): {layers} layers, width {ctx.shape['width']}, vocab "
                         f"{ctx.shape['vocab']}; streamed one stage at a time")
        for name, lines in self.notes.items():  # every stage's note, pass by pass
            for line in lines:
                ctx.note(name, line)
        counts = [[int(x) for x in re.findall(r"\d+", line.split(": ", 1)[1])]
                  for line in self.notes.get("support", [])]
        if counts and all(len(c) == 3 for c in counts):  # the whole model's line, as one graph's
            a, f, c = (sum(col) for col in zip(*counts))
            ctx.note("support", f"{a} MatMuls for the NPU, {f} ops that may go either way, "
                                f"{c} kept on the CPU")
        ctx.segments = segs
        npu = sum(s.device == "npu" for s in segs)
        ctx.note("partition", f"{len(segs)} segments: {npu} NPU, {len(segs) - npu} CPU (streamed, "
                              f"one stage at a time)")
        ctx.note("cut", f"{len(segs)} segment models cut and written as they were final")
        seq = sum(s.seq_model is not None for s in segs)
        ctx.note("sequence", f"{seq} segment(s) take T tokens at once; {len(segs) - seq} per token")


def compile_stream(passes, folder: str, options: Options, out_dir: str,
                   on_stage: Optional[Callable[[str], None]] = None) -> Context:
    """Run the graph passes over a per-layer folder stage by stage, writing each segment's ONNX
    (and T-row variant) into ``out_dir``/segments as soon as it is final. Returns a Context
    whose segments are written (their ``model`` / ``seq_model`` are the files' paths) and whose
    ``graph`` is None."""
    return _Stream(passes, folder, options, out_dir, on_stage).run()
