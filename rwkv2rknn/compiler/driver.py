"""Run the pass pipeline and write the artifact.

The artifact folder (written to a temporary folder beside OUT and renamed into place when whole):

    OUT/manifest.json          what the runtime reads: segments in order, backends, bindings,
                               state layout, model facts, tokenizer, toolkit version, target
    OUT/plan.json              the compile report: per-stage segments, FLOP shares, pass notes
    OUT/segments/NAME.onnx     every segment
    OUT/segments/NAME.rknn     beside the ONNX of every NPU segment (not with --plan-only)
    OUT/segments/NAME.seq.onnx the T-token (prefill) variant of a segment that has one (in columns
                               where the columns step wrote it: the file built), and its
    OUT/segments/NAME.seq.rknn NPU build (one graph per row count in --prefill-rows)
    OUT/tokenizer/FILE         the tokenizer file the model was exported with (if it has one)
    OUT/calib/NAME[.seq]/      with --quant w8a8|w16a16i: the calibration dataset of each quantised
                               build (the simulator rebuilds from it; the board does not need it)

The passes work on ``ir.GraphSegment`` s; ``manifest_segment`` turns each into the manifest's
``plan.Segment``.
"""

from __future__ import annotations

import logging
import os
from typing import Callable, Optional

from rwkv2rknn import __version__, fileio
from rwkv2rknn.compiler import resources
from rwkv2rknn.rknn import calibrate, columns
from rwkv2rknn.errors import UsageError
from rwkv2rknn.compiler.ir import Context, GraphSegment, Options, export
from rwkv2rknn.passes.sequence import prefill_rows
from rwkv2rknn.artifact.plan import MANIFEST, PLAN, Build, Manifest, Segment, sha256_file
from rwkv2rknn.runtime.loader import bundle_tokenizer

log = logging.getLogger(__name__)


def segment_line(seg: GraphSegment, status: str, i: int, n: int) -> str:
    """One progress line of the build: '  [3/25] s005_npu_L1-L2: built'."""
    return f"  [{i}/{n}] {seg.name}: {status}"


def manifest_segment(ctx: Context, s: GraphSegment, out_dir: str, plan_only: bool) -> Segment:
    """The manifest's record of one compiled segment; its files are already in ``out_dir``."""

    def rel_sha(rel, written=""):  # a segment ONNX's checksum was taken as it was written
        return (written or sha256_file(os.path.join(out_dir, rel))) if rel else ""

    on_npu = s.device == "npu" and not plan_only
    token, seq = s.token, s.seq
    rknn_rel = token.rknn if on_npu else None
    onnx_rel = f"segments/{s.name}.onnx"
    token_build = Build(
        onnx=onnx_rel,
        sha256=rel_sha(onnx_rel, token.sha256),
        rknn=rknn_rel,
        rknn_sha256=rel_sha(rknn_rel),
        fallback=token.fallback,
        precision=token.precision if on_npu else "fp16",
        calib=token.calib or None if on_npu else None,
        quant=dict(token.quant) if on_npu and token.precision != "fp16" else {},
    )
    seq_rel = f"segments/{s.name}.seq.onnx" if seq.model is not None else None
    seq_rknn = seq.rknn if on_npu else None
    seq_build = Build(
        onnx=seq_rel,
        sha256=rel_sha(seq_rel, seq.sha256),
        rknn=seq_rknn,
        rknn_sha256=rel_sha(seq_rknn),
        fallback=seq.fallback if on_npu else "",
        precision=seq.precision if seq_rknn else "fp16",
        calib=seq.calib or None if seq_rknn else None,
        quant=dict(seq.quant) if seq_rknn and seq.precision != "fp16" else {},
        rows=tuple(seq.rows) if seq_rknn else (),
        layout=seq.layout if seq_rknn else "",
    )
    shapes = {}
    for t in s.inputs + s.outputs:
        info = ctx.tensors.get(t)
        shapes[t] = tuple(info.shape) if info else ()
    return Segment(
        name=s.name,
        backend=s.device,
        inputs=tuple(s.inputs),
        outputs=tuple(s.outputs),
        shapes=shapes,
        stages=tuple(s.stages),
        token=token_build,
        seq=seq_build,
        ops=s.ops,
        matmuls=s.matmuls,
        flops=s.flops,
        est_ms=round(float(s.est_ms), 6),
        est_prefill_ms=round(float(s.est_prefill_ms), 6),
        accuracy=dict(s.accuracy) if on_npu else {},
        precision_note=s.precision_note if on_npu else "",
        decode_rows=s.decode_rows if on_npu else 0,
    )


def make_manifest(ctx: Context, out_dir: str, toolkit: str, plan_only: bool) -> Manifest:
    facts = {**ctx.facts, **fileio.model_facts(ctx.source)}
    model = dict(ctx.shape)
    model.update(
        arch=ctx.arch, source=ctx.source, layout=ctx.layout, source_dtype=facts.get("dtype", "unknown")
    )
    if facts.get("source_state"):  # a whole-model file: how `check` threads its state
        model["source_state"] = facts["source_state"]
    return Manifest(
        model=model,
        segments=tuple(manifest_segment(ctx, s, out_dir, plan_only) for s in ctx.segments),
        state=tuple(ctx.state),
        token_input=ctx.token_input,
        logits_output=ctx.logits_output,
        tokenizer=bundle_tokenizer(facts.get("tokenizer"), ctx.source, out_dir),
        target=ctx.options.target,
        toolkit=toolkit,
        generator=f"rwkv2rknn {__version__}",
        report=tuple(ctx.report),
        profile=ctx.profile.to_dict(),
        prefill_rows=prefill_rows(ctx),
    )


def compile_model(
    model_path: str,
    out_dir: str,
    options: Optional[Options] = None,
    force: bool = False,
    dump_after: Optional[str] = None,
    progress: Optional[Callable[[GraphSegment, str, int, int], None]] = None,
    on_pass: Optional[Callable[[str, list], None]] = None,
) -> Manifest:
    from rwkv2rknn import passes
    from rwkv2rknn.passes import load
    from rwkv2rknn.rknn import build

    options = options or Options()
    pass_names = passes.GRAPH_PASS_NAMES + (build.NAME,)
    if dump_after and dump_after not in pass_names:
        raise UsageError(
            f"unknown pass '{dump_after}' for --dump-after", f"use one of {', '.join(pass_names)}"
        )
    _check_quant_float(options)
    fileio.check_out_dir(os.path.abspath(out_dir), MANIFEST, force)  # before minutes of passes
    if os.path.exists(model_path):
        load.refuse_checkpoint(model_path)  # weights, not ONNX: says to export them first
    toolkit, calib_ids = "", None
    if options.plan_only and options.quant != "fp16":
        raise UsageError(
            f"--quant {options.quant} is measured on .rknn builds, which --plan-only skips",
            "drop --plan-only (or --quant)",
        )
    if not options.plan_only:  # fail before the passes, not after them
        from rwkv2rknn.rknn.toolkit import require_toolkit

        toolkit = require_toolkit()
        calib_ids = _calibration_ids(model_path, options)
    if not os.path.exists(model_path):
        load.run(model_path, options)  # its one-line error for a missing model
    size = resources.check_compile(
        model_path,
        out_dir,
        fileio.cache_root(options.cache_dir),
        options.plan_only,
        _streams(model_path, options, dump_after),
    )
    try:
        return _compile(
            model_path, out_dir, options, toolkit, calib_ids, force, dump_after, progress, on_pass
        )
    except OSError as e:
        if resources.is_disk_full(e):
            raise resources.disk_full(e, os.path.dirname(os.path.abspath(out_dir)), size) from e
        raise


def _streams(model_path: str, options: Options, dump_after) -> bool:
    """A per-layer folder compiles stage by stage, unless a whole-graph dump is asked for; so
    does a one-file model in our exporter's layout, split into its stage files first."""
    from rwkv2rknn.compiler import split

    if not options.stream or dump_after:
        return False
    return os.path.isdir(model_path) or split.stage_layout(model_path) is not None


def _compile(model_path, out_dir, options, toolkit, calib_ids, force, dump_after, progress, on_pass):
    from rwkv2rknn import passes
    from rwkv2rknn.passes import load
    from rwkv2rknn.rknn import build

    if _streams(model_path, options, dump_after):
        return _compile_stream(model_path, out_dir, options, toolkit, calib_ids, force, progress, on_pass)
    ctx = load.run(model_path, options)
    dumps = {}

    def after(name):
        if on_pass:  # the pass's name and what it reported
            on_pass(name, [n.text for n in ctx.said(name)])
        if dump_after == name:
            dumps[name] = export(ctx.graph)

    after(load.NAME)
    for p in passes.GRAPH_PIPELINE:
        p.run(ctx)
        after(p.NAME)
    with fileio.atomic_dir(out_dir, MANIFEST, force=force) as tmp:
        os.makedirs(os.path.join(tmp, "segments"))
        for s in ctx.segments:
            s.token.sha256 = fileio.save_onnx(s.token.model, os.path.join(tmp, "segments", s.name + ".onnx"))
            if s.seq.model is not None:
                s.seq.sha256 = fileio.save_onnx(
                    s.seq.model, os.path.join(tmp, "segments", s.name + ".seq.onnx")
                )
        if not options.plan_only:
            calibration = _calibrate(ctx, tmp, toolkit, calib_ids) if calib_ids else None
            _columns(ctx, tmp, on_pass)
            build.run(ctx, tmp, progress=progress, calibration=calibration)
            calibrate.drop_holdout(tmp)
            columns.drop_rows(tmp)
            after(build.NAME)
        for name, model in dumps.items():
            os.makedirs(os.path.join(tmp, "dump"), exist_ok=True)
            fileio.save_onnx(model, os.path.join(tmp, "dump", f"after_{name}.onnx"))
        _validate(ctx, tmp, toolkit, options, model_path, on_pass)
        _narrow(ctx, tmp, on_pass)
        manifest = _finish(ctx, tmp, toolkit, options)
    return manifest


def _compile_stream(model_path, out_dir, options, toolkit, calib_ids, force, progress, on_pass):
    """A per-layer folder, one stage at a time (rwkv2rknn/compiler/stream.py): segment files are written
    as they are cut, so memory stays near a few layers' weights whatever the model's size."""
    from rwkv2rknn import passes
    from rwkv2rknn.rknn import build
    from rwkv2rknn.compiler import split
    from rwkv2rknn.compiler.stream import compile_stream

    with fileio.atomic_dir(out_dir, MANIFEST, force=force) as tmp:
        one_file = None if os.path.isdir(model_path) else split.stage_layout(model_path)
        folder = model_path
        if one_file is not None:  # its stage files, one stage in memory at a time
            folder = os.path.join(tmp, split.STAGES_DIR)
            split.split(one_file, folder)
            if on_pass:
                on_pass(
                    "split",
                    [
                        f"{model_path}: {split.layers_of(one_file) + 2} stage files, "
                        f"compiled one stage at a time"
                    ],
                )
        early = None if options.plan_only or calib_ids else []  # fp16: build while streaming
        rewritten = []  # the segments the columns step saw while streaming

        def on_segment(sctx, seg):
            if build.shares_rows(sctx, seg):  # the columns step, before the segment's build
                columns.apply(sctx, seg, tmp, build.seq_built_before)
                rewritten.append(seg)
            if not early:
                early.append(
                    build.Builds(sctx, tmp, progress, biggest=resources.model_size(model_path).largest)
                )
            early[0].add(seg)

        try:
            ctx = compile_stream(
                passes,
                folder,
                options,
                tmp,
                on_stage=(lambda line: on_pass("stream", [line])) if on_pass else None,
                on_segment=on_segment if early is not None else None,
            )
        except BaseException:
            if early:
                early[0].stop()
            raise
        if on_pass:
            for name in ("partition", "cut", "sequence"):
                on_pass(name, [n.text for n in ctx.said(name)])
        if early is not None:
            columns.summary(ctx, rewritten)
            if on_pass:
                on_pass(columns.NAME, [n.text for n in ctx.said(columns.NAME)])
        if early:
            early[0].finish()
        elif not options.plan_only:
            calibration = _calibrate(ctx, tmp, toolkit, calib_ids) if calib_ids else None
            if early is None:  # else it ran as the segments were written
                _columns(ctx, tmp, on_pass)
            build.run(ctx, tmp, progress=progress, calibration=calibration)
            calibrate.drop_holdout(tmp)
        columns.drop_rows(tmp)
        if on_pass and not options.plan_only:
            on_pass(build.NAME, [n.text for n in ctx.said(build.NAME)])
        if one_file is not None:  # the artifact's source is the file (check compares with it)
            ctx.facts = {
                "dtype": "float16" if one_file.metadata.get("rwkv2rknn.dtype") == "float16" else "float32",
                "tokenizer": one_file.metadata.get("rwkv2rknn.tokenizer"),
                "source_state": split.source_state(one_file),
            }
        _validate(ctx, tmp, toolkit, options, model_path, on_pass)
        _narrow(ctx, tmp, on_pass)
        if one_file is not None:
            import shutil

            shutil.rmtree(folder)
            ctx.source, ctx.layout = os.path.abspath(model_path), "rwkv2rknn one-file"
            n = split.layers_of(one_file)
            ctx.note(
                "recognize",
                f"recognised the rwkv2rknn one-file layout ({ctx.arch}): {n} "
                f"layers, width {ctx.shape.get('width')}, vocab "
                f"{ctx.shape.get('vocab')}; stages named in the file: split "
                f"into {n + 2} stage files and compiled one stage at a time",
            )
        return _finish(ctx, tmp, toolkit, options)


def _columns(ctx: Context, tmp: str, on_pass) -> None:
    """The columns step (rwkv2rknn/rknn/columns.py): each T-row NPU segment's .seq.onnx in ``tmp``
    rewritten to the columns form the NPU builds, where it has one; after calibration (which
    traces the rows forms) and before the build."""
    from rwkv2rknn.rknn import build

    columns.run(ctx, tmp, [s for s in ctx.segments if build.shares_rows(ctx, s)], build.seq_built_before)
    if on_pass:
        on_pass(columns.NAME, [n.text for n in ctx.said(columns.NAME)])


def _validate(ctx: Context, tmp: str, toolkit: str, options: Options, model_path: str, on_pass):
    """Translation validation (rwkv2rknn/compiler/validate.py): the artifact in ``tmp`` against
    its source; raises CompileRefused (and nothing is written) if they differ."""
    from rwkv2rknn import passes
    from rwkv2rknn.compiler import validate

    ctx.validation = validate.validate(
        ctx, tmp, toolkit, options.plan_only, model_path, passes, make_manifest
    )
    if on_pass:
        on_pass(validate.NAME, [n.text for n in ctx.said(validate.NAME)])


def _narrow(ctx: Context, tmp: str, on_pass) -> None:
    """The CPU token tables stored narrow (compiler/embedding.py), after validation: what it
    compared is the model as cut, within fp32 rounding for fp32 sources whatever the NPU's
    precision."""
    from rwkv2rknn.compiler import embedding

    embedding.narrow_all(ctx, tmp)
    if on_pass:
        on_pass(embedding.NAME, [n.text for n in ctx.notes if n.pass_name == embedding.NAME])


def _finish(ctx: Context, tmp: str, toolkit: str, options: Options) -> Manifest:
    manifest = make_manifest(ctx, tmp, toolkit, options.plan_only)
    manifest.check_bindings()
    if not options.plan_only and manifest.token_input and manifest.logits_output:
        manifest = _golden(ctx, tmp, manifest, options)
    fileio.write_json(os.path.join(tmp, PLAN), plan_report(ctx, manifest))
    fileio.write_json(os.path.join(tmp, MANIFEST), manifest.to_dict())
    return manifest


def _golden(ctx: Context, tmp: str, manifest: Manifest, options: Options) -> Manifest:
    """Record every NPU segment's golden vectors (rwkv2rknn.compiler.golden) from real text."""
    from rwkv2rknn.compiler import golden
    from rwkv2rknn.passes.fp16_guard import sample_tokens

    fileio.write_json(os.path.join(tmp, MANIFEST), manifest.to_dict())  # what the trace runs
    ids = golden.text_ids(
        ctx.source, options.calib_text, int(ctx.shape.get("vocab") or 0), sample_tokens(ctx)
    )
    manifest = golden.record(tmp, manifest, ids)
    n = sum(1 for s in manifest.segments if s.golden)
    ctx.note(
        "build",
        f"golden vectors: {n} NPU segment(s), from {len(ids)} tokens of text, "
        f"fp32 onnxruntime (the board's self-test)",
    )
    return manifest


def _check_quant_float(options: Options) -> None:
    """--quant-float: known groups, w8a8, per-token builds only (one-line errors)."""
    if not options.quant_float:
        return
    from rwkv2rknn.rknn.toolkit import FLOAT_TENSORS

    bad = [g for g in options.quant_float if g not in FLOAT_TENSORS]
    if bad:
        raise UsageError(f"--quant-float '{bad[0]}' is not a tensor group", f"use {', '.join(FLOAT_TENSORS)}")
    if options.quant != "w8a8" or options.plan_only:
        raise UsageError(
            "--quant-float is for w8a8 builds",
            "add --quant w8a8 (without --plan-only), or drop --quant-float",
        )
    if options.prefill_rows:
        raise UsageError(
            "--quant-float needs per-token builds (the toolkit's hybrid quantisation drops the "
            "T-row builds' dynamic_input)",
            "add --prefill-rows none (or drop --quant-float)",
        )


def _calibration_ids(model_path: str, options: Options):
    """(calibration ids, held-out ids, where) for a quantised compile, None for fp16."""
    from rwkv2rknn.artifact.plan import PRECISIONS

    if options.quant not in PRECISIONS:
        raise UsageError(f"unknown precision '{options.quant}'", f"use one of {', '.join(PRECISIONS)}")
    if options.quant == "fp16":
        return None
    return calibrate.calibration_ids(
        model_path,
        options.calib_text,
        options.calib_tokens,
        calibrate.random_count(options.quant, options.calib_tokens),
    )


def _calibrate(ctx: Context, tmp: str, toolkit: str, calib_ids) -> dict:
    """Trace the cut segments on the calibration text (fp32 onnxruntime) and write the datasets;
    the manifest written here lets the executor run them and is replaced when the build is done."""
    from rwkv2rknn.rknn import build

    cal, hold, where = calib_ids
    fileio.write_json(os.path.join(tmp, MANIFEST), make_manifest(ctx, tmp, toolkit, True).to_dict())
    rows = prefill_rows(ctx) if ctx.options.prefill_rows else 0
    out = calibrate.prepare(
        tmp, cal, hold, rows, [s.input for s in ctx.state if not s.accumulator], build.DECODE_ROWS
    )
    n_random = min(calibrate.random_count(ctx.options.quant, ctx.options.calib_tokens), len(cal))
    ctx.note(
        build.NAME,
        f"calibration: {len(cal) - n_random} tokens of {where}"
        + (f" and {n_random} seeded random ids" if n_random else "")
        + f" for the {ctx.options.quant} dataset, the next {len(hold)} held out for accuracy",
    )
    return out


def plan_report(ctx: Context, manifest: Manifest) -> dict:
    from rwkv2rknn.passes.support import reasons, segment_reasons

    nodes = {s.name: s.nodes for s in ctx.segments}
    return {
        "stages": manifest.per_layer(),
        "npu_flop_share": manifest.npu_flop_share(),
        "boundaries_per_token": manifest.boundaries(),
        "segments": [
            {
                "name": s.name,
                "backend": s.backend,
                "ops": s.ops,
                "matmuls": s.matmuls,
                "flops": s.flops,
                "stages": list(s.stages),
                "fallback": s.token.fallback,
                "precision": s.precision_label(),
                "accuracy": dict(s.accuracy),
                "precision_note": s.precision_note,
                "cpu_reasons": segment_reasons(ctx, nodes.get(s.name, ()), s.token.fallback)
                if s.backend == "cpu"
                else {},
            }
            for s in manifest.segments
        ],
        "cpu_reasons": reasons(ctx),
        "validation": ctx.validation,
        "passes": list(ctx.report),
        "table": manifest.table().splitlines(),
    }


def estimate_file(path: str, device: str, profile) -> float:
    """The plan's estimate of one call of the segment in the ONNX file ``path`` on ``device``
    ('npu' or 'cpu') under ``profile``: ``partition.estimate_ms`` on its graph, shapes
    inferred (what ``bench --backtest`` predicts)."""
    import onnx
    import onnx_graphsurgeon as gs
    from rwkv2rknn.passes.partition import estimate_ms

    model = onnx.shape_inference.infer_shapes(onnx.load(path))
    graph = gs.import_onnx(model)
    del model
    return estimate_ms(device, graph.nodes, profile)


def whole_graph(model_path: str):
    """The model as one graph, not partitioned: load, keep_fp32, state, rank_one and
    normalize_matmul. Returns (serialized ONNX, token input, logits output, [(state input,
    state output)])."""
    from rwkv2rknn.passes import canonicalize, keep_fp32, load, normalize_matmul, rank_one, recognize, state

    ctx = load.run(model_path)
    for p in (canonicalize, recognize, keep_fp32, state, rank_one, normalize_matmul):
        p.run(ctx)
    return (
        export(ctx.graph).SerializeToString(),
        ctx.token_input,
        ctx.logits_output,
        [(s.input, s.output) for s in ctx.state],
    )


def build_rknn(
    onnx_path: str, rknn_path: str, target: str = "rk3588", timeout: float = 600.0, rows=()
) -> str:
    """Build one ONNX file into an .rknn in a child process (a T-row file: one graph per row
    count in ``rows``); '' on success, else why not."""
    from rwkv2rknn.rknn.build import build_child

    return build_child(onnx_path, rknn_path, target, False, timeout, rows)
