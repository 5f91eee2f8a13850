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
(and the values a block hands to later blocks of the same token: RWKV-7's ``v_first`` from
layer 0), while the stage's own state threads from step to step, so no whole-model session (and
no 2 GB protobuf) is ever made; RWKV-4's state rows and RWKV-5.2/6/7's named slots alike.
Partitioning a window of the pending nodes keeps the cross-layer fusion (the NPU tail of layer
i and the NPU head of layer i+1 in one segment). Peak memory is a few
stages' fp32 weights, not the model's: a cut segment's weights move into its model (no third
copy) and it is written before its T-row variant is made.

This module does not import the passes: the compiler hands them in (``passes``), so that imports
still run one way.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import replace
from types import SimpleNamespace
from typing import Callable, List, Optional

import numpy as np

from rwkv2rknn import fileio
from rwkv2rknn.compiler import resources, tracecache
from rwkv2rknn.compiler.ir import Context, GraphSegment, Options, replace_uses

log = logging.getLogger(__name__)


def _stub(node, op_work) -> SimpleNamespace:
    """What a written segment keeps of a node: its name and op, for a MatMul the shapes its
    estimates need (the weight as a zero-strided array of its shape: no memory), for any other
    op its bytes and FLOPs (``op_work``, the partition pass's), not weights (a Gather keeps its
    table's shape as a MatMul its weight's)."""
    import onnx_graphsurgeon as gs
    from rwkv2rknn.compiler.ir import const_value

    inputs = []
    if node.op in ("MatMul", "Gather"):  # a Gather's table: the embedding's cold-row cost
        for t in node.inputs:
            w = const_value(t)
            inputs.append(
                gs.Constant(t.name, np.broadcast_to(np.zeros((), w.dtype), w.shape))
                if w is not None
                else SimpleNamespace(name=t.name, shape=t.shape, inputs=[])
            )
    work = op_work([node])
    return SimpleNamespace(
        name=node.name, op=node.op, inputs=inputs, outputs=[], work=work[0] if work else None
    )


class _Stream:
    def __init__(
        self,
        passes,
        folder: str,
        options: Options,
        out_dir: str,
        on_stage: Optional[Callable[[str], None]],
        on_segment=None,
    ):
        from rwkv2rknn.runtime.reference import stage_files

        self.p, self.out_dir, self.on_stage, self.on_segment = passes, out_dir, on_stage, on_segment
        self.arch = d = passes.load.arch_of_folder(folder)
        embed_p, block_ps, head_p = stage_files(folder)
        self.stages = (
            [("embed", embed_p, d.EMBED_IO)]
            + [(f"L{i}", p, d.block_io(i)) for i, p in enumerate(block_ps)]
            + [("head", head_p, d.HEAD_IO)]
        )
        self.ctx = Context(
            graph=None,
            source=os.path.abspath(folder),
            arch=d.ARCH,
            layout="per-layer",
            options=options,
            shape={"layers": len(block_ps), "width": None, "vocab": None},
        )
        self.ctx.cpu_recurrence_inputs = bool(getattr(d, "CPU_RECURRENCE_INPUTS", False))
        self.ctx.profile  # a bad --profile fails before any work
        self.window: List = []  # nodes not yet in a written segment, in run order
        self.outputs = set()  # names of the model's outputs (state, logits)
        self.opset = 13
        self.x = None  # the newest stage's hidden output tensor
        self.x_values: list = []  # its value at every sample token
        # values a block hands to later blocks of the same token (RWKV-7's v_first, from layer
        # 0): name -> the tensor that makes it, and its value at every sample token
        self.carried: dict = {}
        self.carried_values: dict = {}
        self.written: List[GraphSegment] = []
        self.traces = tracecache.open_cache(os.path.join(fileio.cache_root(options.cache_dir), "trace"))
        self.notes: dict = {}  # pass name -> its notes from each stage and window
        self.levels: dict = {}  # tensor a written segment made -> its producer's depth
        self.depth: dict = {}  # node name -> depth in the model (the window's last sort)

    # ------------------------------------------------------------------------ one stage

    def load(self, stage: str, path: str, io_names):
        """The stage's graph, its tensors named as the whole-model graph names them and its
        inputs pinned to their decode shape. Returns (graph, {io name: tensor})."""
        load = self.p.load
        g = load.import_stage(path, stage + "/")
        load.expect_io(g, path, *io_names)
        io = dict(zip(io_names[0], g.inputs), main=g.inputs[0])
        io.update(("out:" + name, t) for name, t in zip(io_names[1], g.outputs))
        if stage == "embed":
            width, vocab = load.table_shape(g, path)
            self.ctx.shape.update(width=width, vocab=vocab)
        kind = "embed" if stage == "embed" else "head" if stage == "head" else "block"
        load.pin_stage(g, kind, self.ctx.shape["width"], self.arch)
        # the names the whole-model graph gives the joined tensors
        g.inputs[0].name = "token" if stage == "embed" else self.x.name
        for name in self.arch.INTER_LAYER:
            if name in io:
                io[name].name = self.carried[name].name
        if stage == "head":
            g.outputs[0].name = "logits"
        self.opset = max(self.opset, g.opset)
        return g, io

    def context_for(self, graph, **fields) -> Context:
        """A context for part of the model (a stage, a window): the whole model's source, arch,
        shape, options and device profile, and ``fields``."""
        ctx = self.ctx
        part = Context(
            graph=graph, source=ctx.source, arch=ctx.arch, shape=ctx.shape, options=ctx.options, **fields
        )
        part._profile = ctx.profile
        return part

    def stage_passes(self, stage: str, path: str, g, io):
        p, ctx = self.p, self.ctx
        sctx = self.context_for(g, cpu_recurrence_inputs=ctx.cpu_recurrence_inputs)
        if stage.startswith("L"):
            i = int(stage[1:])
            if self.arch.STATE_IO:  # named slots (RWKV-5.2/6/7), as the loader lists them
                sctx.state = p.load.stage_slots(g, i, self.arch)
            else:  # RWKV-4's [rows, C], which the state pass unpacks
                sctx.whole_state = {i: (f"L{i}/state_in", f"L{i}/state_out")}
        for mod in self.before_trace():  # canonicalize ... normalize_matmul, as one graph has them
            mod.run(sctx)
        resources.give_back_memory()  # the replaced weights (fp16, untransposed) before the trace
        g = sctx.graph
        by_name = g.tensors()  # a pass may have replaced an input or output tensor (same name)
        io.update((k, by_name.get(t.name, t)) for k, t in list(io.items()))
        if stage == "embed":
            tok_type = np.int64 if np.dtype(g.inputs[0].dtype or np.int64) == np.int64 else np.int32
            tokens = p.fp16_guard.sample_tokens(sctx)
            steps = [{"token": np.array([t], tok_type)} for t in tokens]
        else:
            steps = [{self.x.name: v} for v in self.x_values]
            for name in self.arch.INTER_LAYER:
                if name in io:  # fed what layer 0 made at each sample token
                    for step, v in zip(steps, self.carried_values[name]):
                        step[io[name].name] = v
        from rwkv2rknn.compiler.trace import trace_steps

        pairs = [(s.input, s.output) for s in sctx.state] + list(sctx.whole_state.values())
        out = g.outputs[0]
        made = {name: io["out:" + name] for name in self.arch.INTER_LAYER if "out:" + name in io}
        keep = [out.name] + [t.name for t in made.values()]

        def run():
            return trace_steps(g, steps, pairs, keep=keep)

        if self.traces is None:
            sctx.tensors, kept = run()
        else:  # the same stage fed the same values: its ranges from the cache
            key = tracecache.stage_key(stage, path, ctx.shape, steps, pairs, keep)
            sctx.tensors, kept = self.traces.get(key, run)
        self.x_values = kept[out.name]
        for name, t in made.items():
            self.carried_values[name] = kept[t.name]
        p.fp16_guard.run(sctx)
        # support sees the stage as part of the model: a value handed to later layers is no
        # output of the model (the later layers read it as recurrence input, as RWKV-7's v_first)
        outputs, g.outputs = (
            g.outputs,
            [t for t in g.outputs if t.name not in {t.name for t in made.values()}],
        )
        p.support.run(sctx)
        g.outputs = outputs
        ctx.state += sctx.state
        ctx.whole_state.update(sctx.whole_state)
        ctx.tensors.update(sctx.tensors)
        ctx.support.update(sctx.support)
        ctx.forced_cpu.update(sctx.forced_cpu)
        for n in sctx.notes:
            self.notes.setdefault(n.pass_name, []).append(replace(n, text=f"{stage}: {n.text}"))
        inter = {t.name for t in made.values()}
        self.outputs |= {t.name for t in g.outputs[1:] if t.name not in inter} | (
            {"logits"} if stage == "head" else set()
        )
        return g, out, made

    def before_trace(self):
        """The pipeline's passes before the range guard (whose trace a stage does itself)."""
        pipeline = list(self.p.GRAPH_PIPELINE)
        return pipeline[: pipeline.index(self.p.fp16_guard)]

    # ------------------------------------------------------------------------ the window

    def add(self, g, io, out, made) -> None:
        if self.x is not None:  # join: the stage reads the previous stage's output
            replace_uses(io["main"], self.x)
        for name in self.arch.INTER_LAYER:
            if name in io:  # and what layer 0 handed on
                replace_uses(io[name], self.carried[name])
        self.carried.update(made)
        self.window += list(g.nodes)
        self.x = out

    def flush(self, last: bool, newest: str) -> int:
        """Partition the window; cut, write and drop every segment that is final."""
        import onnx_graphsurgeon as gs

        p, ctx = self.p, self.ctx
        self.window = self.toposort(self.window)
        wg = gs.Graph(nodes=list(self.window), opset=self.opset, name="window")
        wctx = self.context_for(
            wg, state=ctx.state, tensors=ctx.tensors, support=ctx.support, token_input=ctx.token_input
        )
        p.partition.run(wctx)
        for n in wctx.notes:  # what pruning moved to the CPU, window by window
            if n.counts.get("pruned"):
                self.notes.setdefault(n.pass_name, []).append(
                    replace(n, text=f"window up to {newest}: {n.text}")
                )
        segs = wctx.segments
        final = (
            len(segs)
            if last
            else next(
                (k for k, s in enumerate(segs) if any(n.name.startswith(newest + "/") for n in s.nodes)),
                len(segs),
            )
        )
        owner = {n.name: k for k, s in enumerate(segs) for n in s.nodes}
        gone = set()
        for k in range(final):
            seg = segs[k]
            p.cut.cut_one(wctx, seg, k, len(self.written), owner, self.outputs, move_weights=True)
            self.write(seg, p.sequence)
            gone |= {n.name for n in seg.nodes}
            seg.nodes = [_stub(n, p.partition.op_work) for n in seg.nodes]
            if seg.nodes:  # the stand-ins keep no edges: the segment's inputs and outputs, counted
                seg.nodes[0].segment_io = len(seg.inputs) + len(seg.outputs)
            self.written.append(seg)
            if self.on_segment:  # its files are whole: the build may start
                self.on_segment(ctx, seg)
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

        def renew(t):
            if t.name not in fresh:
                fresh[t.name] = gs.Variable(t.name, dtype=t.dtype, shape=t.shape)
                self.levels[t.name] = self.depth[t.inputs[0].name]
            return fresh[t.name]

        for node in self.window:
            for i, t in enumerate(node.inputs):
                if t.inputs and t.inputs[0].name in gone:
                    node.inputs[i] = renew(t)
        for name, t in self.carried.items():  # later stages join the fresh tensor
            if t.inputs and t.inputs[0].name in gone:
                self.carried[name] = renew(t)

    def write(self, seg: GraphSegment, sequence) -> None:
        """Write the segment's model, make its T-row variant from it and write that: at most two
        copies of the segment's weights at once (the model and the variant, or one of them and
        its serialised bytes)."""
        folder = os.path.join(self.out_dir, "segments")
        path = os.path.join(folder, seg.name + ".onnx")
        seg.token.sha256 = fileio.save_onnx(seg.token.model, path)
        sequence.run_one(self.ctx, seg, take=True)  # (the variant takes the written model's weights)
        seg.token.model = path
        if seg.seq.model is not None:
            seq_path = os.path.join(folder, seg.name + ".seq.onnx")
            seg.seq.sha256 = fileio.save_onnx(seg.seq.model, seq_path, keep=False)
            seg.seq.model = seq_path

    # ------------------------------------------------------------------------ the whole run

    def run(self) -> Context:
        t0 = time.monotonic()
        n = len(self.stages)
        os.makedirs(os.path.join(self.out_dir, "segments"), exist_ok=True)
        for k, (stage, path, io_names) in enumerate(self.stages):
            g, io = self.load(stage, path, io_names)
            g, out, made = self.stage_passes(stage, path, g, io)
            self.add(g, io, out, made)
            del g, io
            made = self.flush(k == n - 1, stage)
            resources.give_back_memory()
            if self.on_stage:
                done = time.monotonic() - t0
                eta = done / (k + 1) * (n - k - 1)
                self.on_stage(
                    f"[{k + 1}/{n}] {stage}: {made} segment(s) written "
                    f"({done:.0f} s, eta {int(eta) // 60}:{int(eta) % 60:02d})"
                )
        self.summarise()
        return self.ctx

    def summarise(self) -> None:
        d = self.arch
        ctx, segs = self.ctx, self.written
        layers = ctx.shape["layers"]
        ctx.note(
            "load",
            f"recognised per-layer {ctx.arch} files ({d.EMBED_FILE}, "
            f"{d.BLOCK_FILE.format(0)}..{d.BLOCK_FILE.format(layers - 1)}, "
            f"{d.HEAD_FILE}): {layers} layers, width {ctx.shape['width']}, vocab "
            f"{ctx.shape['vocab']}; streamed one stage at a time",
        )
        for notes in self.notes.values():  # every stage's note, pass by pass
            for n in notes:
                ctx.add_note(n)
        counts = [n.counts for n in self.notes.get("support", []) if n.kind == "summary"]
        if counts:  # the whole model's line, as one graph's
            total = {k: sum(c[k] for c in counts) for k in counts[0]}
            ctx.note("support", self.p.support.summary(total), kind="summary", **total)
        if self.traces is not None:
            ctx.note(
                "fp16_guard",
                f"range trace: {self.traces.hits} of {len(self.stages)} stages from "
                f"the cache ({self.traces.cache.folder})",
            )
        ctx.segments = segs
        npu = sum(s.device == "npu" or bool(s.token.fallback) for s in segs)  # as partitioned
        ctx.note(
            "partition",
            f"{len(segs)} segments: {npu} NPU, {len(segs) - npu} CPU (streamed, one stage at a time)",
        )
        ctx.note("cut", f"{len(segs)} segment models cut and written as they were final")
        seq = sum(s.seq.model is not None for s in segs)
        ctx.note("sequence", f"{seq} segment(s) take T tokens at once; {len(segs) - seq} per token")


def compile_stream(
    passes,
    folder: str,
    options: Options,
    out_dir: str,
    on_stage: Optional[Callable[[str], None]] = None,
    on_segment: Optional[Callable[[Context, GraphSegment], None]] = None,
) -> Context:
    """Run the graph passes over a per-layer folder stage by stage, writing each segment's ONNX
    (and T-row variant) into ``out_dir``/segments as soon as it is final. Returns a Context
    whose segments are written (their ``token.model`` / ``seq.model`` are the files' paths) and whose
    ``graph`` is None. ``on_segment(context, segment)`` is called as each segment is written."""
    return _Stream(passes, folder, options, out_dir, on_stage, on_segment).run()
