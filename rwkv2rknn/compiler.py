"""Run the pass pipeline and write the artifact.

The artifact folder (written to a temporary folder beside OUT and renamed into place when whole):

    OUT/manifest.json          what the runtime reads: segments in order, backends, bindings,
                               state layout, model facts, tokenizer, toolkit version, target
    OUT/plan.json              the compile report: per-stage segments, FLOP shares, pass notes
    OUT/segments/NAME.onnx     every segment
    OUT/segments/NAME.rknn     beside the ONNX of every NPU segment (not with --plan-only)
    OUT/segments/NAME.seq.onnx the T-token (prefill) variant of a segment that has one, and its
    OUT/segments/NAME.seq.rknn NPU build (one graph per row count in --prefill-rows)
    OUT/tokenizer/FILE         the tokenizer file the model was exported with (if it has one)

The passes work on ``ir.GraphSegment`` s; ``manifest_segment`` turns each into the manifest's
``plan.Segment``.
"""

from __future__ import annotations

import logging
import os
from typing import Callable, Optional

from rwkv2rknn import __version__, io
from rwkv2rknn.errors import UsageError
from rwkv2rknn.ir import Context, GraphSegment, Options, export
from rwkv2rknn.passes.sequence import prefill_rows
from rwkv2rknn.plan import MANIFEST, PLAN, Manifest, Segment, sha256_file
from rwkv2rknn.runtime.loader import bundle_tokenizer

log = logging.getLogger(__name__)


def segment_line(seg: GraphSegment, status: str, i: int, n: int) -> str:
    """One progress line of the build: '  [3/25] s005_npu_L1-L2: built'."""
    return f"  [{i}/{n}] {seg.name}: {status}"


def manifest_segment(ctx: Context, s: GraphSegment, out_dir: str, plan_only: bool) -> Segment:
    """The manifest's record of one compiled segment; its files are already in ``out_dir``."""
    def rel_sha(rel):
        return sha256_file(os.path.join(out_dir, rel)) if rel else ""

    onnx_rel = f"segments/{s.name}.onnx"
    on_npu = s.device == "npu" and not plan_only
    rknn_rel, seq_rknn = (s.rknn, s.seq_rknn) if on_npu else (None, None)
    seq_rel = f"segments/{s.name}.seq.onnx" if s.seq_model is not None else None
    shapes = {}
    for t in s.inputs + s.outputs:
        info = ctx.tensors.get(t)
        shapes[t] = tuple(info.shape) if info else ()
    return Segment(
        name=s.name, backend=s.device, onnx=onnx_rel, inputs=tuple(s.inputs),
        outputs=tuple(s.outputs), shapes=shapes, stages=tuple(s.stages), ops=s.ops,
        matmuls=s.matmuls, flops=s.flops, rknn=rknn_rel, sha256=rel_sha(onnx_rel),
        rknn_sha256=rel_sha(rknn_rel), fallback=s.fallback, est_ms=round(float(s.est_ms), 6),
        est_prefill_ms=round(float(s.est_prefill_ms), 6), seq_onnx=seq_rel,
        seq_sha256=rel_sha(seq_rel), seq_rknn=seq_rknn,
        seq_rows=tuple(s.seq_rows) if seq_rknn else (), seq_rknn_sha256=rel_sha(seq_rknn),
        decode_rows=s.decode_rows if on_npu else 0)


def make_manifest(ctx: Context, out_dir: str, toolkit: str, plan_only: bool) -> Manifest:
    facts = {**ctx.facts, **io.model_facts(ctx.source)}
    model = dict(ctx.shape)
    model.update(arch=ctx.arch, source=ctx.source, layout=ctx.layout,
                 source_dtype=facts.get("dtype", "unknown"))
    if facts.get("source_state"):  # a whole-model file: how `check` threads its state
        model["source_state"] = facts["source_state"]
    return Manifest(model=model,
                    segments=tuple(manifest_segment(ctx, s, out_dir, plan_only) for s in ctx.segments),
                    state=tuple(ctx.state),
                    token_input=ctx.token_input, logits_output=ctx.logits_output,
                    tokenizer=bundle_tokenizer(facts.get("tokenizer"), ctx.source, out_dir),
                    target=ctx.options.target, toolkit=toolkit,
                    generator=f"rwkv2rknn {__version__}", report=tuple(ctx.report),
                    profile=ctx.profile.to_dict(),
                    prefill_rows=prefill_rows(ctx))


def compile_model(model_path: str, out_dir: str, options: Optional[Options] = None,
                  force: bool = False, dump_after: Optional[str] = None,
                  progress: Optional[Callable[[GraphSegment, str, int, int], None]] = None,
                  on_pass: Optional[Callable[[str, list], None]] = None) -> Manifest:
    from rwkv2rknn import passes
    from rwkv2rknn.passes import build, load

    options = options or Options()
    if dump_after and dump_after not in passes.PASS_NAMES:
        raise UsageError(f"unknown pass '{dump_after}' for --dump-after",
                         f"use one of {', '.join(passes.PASS_NAMES)}")
    io.check_out_dir(os.path.abspath(out_dir), MANIFEST, force)  # before minutes of passes
    toolkit = ""
    if not options.plan_only:  # fail before the passes, not after them
        from rwkv2rknn.toolkit import require_toolkit
        toolkit = require_toolkit()
    ctx = load.run(model_path, options)
    dumps = {}

    def after(name):
        if on_pass:  # the pass's name and what it reported
            on_pass(name, [r.split(": ", 1)[1] for r in ctx.report if r.startswith(name + ": ")])
        if dump_after == name:
            dumps[name] = export(ctx.graph)

    after(load.NAME)
    for p in passes.GRAPH_PIPELINE:
        p.run(ctx)
        after(p.NAME)
    with io.atomic_dir(out_dir, MANIFEST, force=force) as tmp:
        os.makedirs(os.path.join(tmp, "segments"))
        for s in ctx.segments:
            io.save_onnx(s.model, os.path.join(tmp, "segments", s.name + ".onnx"))
            if s.seq_model is not None:
                io.save_onnx(s.seq_model, os.path.join(tmp, "segments", s.name + ".seq.onnx"))
        if not options.plan_only:
            build.run(ctx, tmp, progress=progress)
            after(build.NAME)
        for name, model in dumps.items():
            os.makedirs(os.path.join(tmp, "dump"), exist_ok=True)
            io.save_onnx(model, os.path.join(tmp, "dump", f"after_{name}.onnx"))
        manifest = make_manifest(ctx, tmp, toolkit, options.plan_only)
        manifest.check_bindings()
        io.write_json(os.path.join(tmp, PLAN), plan_report(ctx, manifest))
        io.write_json(os.path.join(tmp, MANIFEST), manifest.to_dict())
    return manifest


def plan_report(ctx: Context, manifest: Manifest) -> dict:
    from rwkv2rknn.passes.support import reasons, segment_reasons
    nodes = {s.name: s.nodes for s in ctx.segments}
    return {"stages": manifest.per_layer(),
            "npu_flop_share": manifest.npu_flop_share(),
            "boundaries_per_token": manifest.boundaries(),
            "segments": [{"name": s.name, "backend": s.backend, "ops": s.ops, "matmuls": s.matmuls,
                          "flops": s.flops, "stages": list(s.stages), "fallback": s.fallback,
                          "cpu_reasons": segment_reasons(ctx, nodes.get(s.name, ()), s.fallback)
                          if s.backend == "cpu" else {}}
                         for s in manifest.segments],
            "cpu_reasons": reasons(ctx),
            "passes": list(ctx.report),
            "table": manifest.table().splitlines()}


def whole_graph(model_path: str):
    """The model as one graph, not partitioned: load, keep_fp32, state and normalize_matmul.
    Returns (serialized ONNX, token input, logits output, [(state input, state output)])."""
    from rwkv2rknn.passes import canonicalize, keep_fp32, load, normalize_matmul, recognize, state
    ctx = load.run(model_path)
    for p in (canonicalize, recognize, keep_fp32, state, normalize_matmul):
        p.run(ctx)
    return (export(ctx.graph).SerializeToString(), ctx.token_input, ctx.logits_output,
            [(s.input, s.output) for s in ctx.state])


def build_rknn(onnx_path: str, rknn_path: str, target: str = "rk3588", timeout: float = 600.0,
               rows=()) -> str:
    """Build one ONNX file into an .rknn in a child process (a T-row file: one graph per row
    count in ``rows``); '' on success, else why not."""
    from rwkv2rknn.passes.build import build_child
    return build_child(onnx_path, rknn_path, target, False, timeout, rows)
