"""build: every NPU segment becomes a ``.rknn`` for the target, in a child process, cached.

::

    segments/s001_npu_L0.onnx --(child: rknn-toolkit2 build)--> cache/<sha256>.rknn --> segments/s001_npu_L0.rknn
                                 '-- crash / refusal --> the segment falls back to the CPU (reported)
    segments/s003_npu_L0-L1.seq.onnx --(T in 2, 16, 64)--> segments/s003_npu_L0-L1.seq.rknn
                                 (decode runs it with 2 rows; no per-token .rknn: weights once)

A segment with a T-row (prefill) variant gets one build of that variant for the prefill row
counts and for DECODE_ROWS: token steps run it with the token in row 0. The file is built as the
columns step wrote it (``rwkv2rknn.rknn.columns``: in columns where it fits); where a columns build
fails, the step's rows form is put back and built. Where that build fails too, the per-token graph
is built alone and prefill runs token by token.

With ``--quant w8a8`` (or w16a16i) a build is quantised from the segment's calibration dataset
(``rwkv2rknn.rknn.calibrate``); the child also runs it in the simulator on held-out rows (a T-row build:
each row as a token step, in row 0) and the parent scores them against fp32 onnxruntime. A
segment whose smallest cosine is below ``--quant-min-cos`` (or whose quantised build fails) is
built fp16 instead, and the plan says so. The cache key of a quantised build also holds the
precision, the toolkit's quantisation settings and a digest of the calibration rows; its measured
accuracy is cached beside it.

rknn-toolkit2 reports errors three ways (exceptions, return codes, and killing its own process),
so each build runs in a child process with a time limit, in a private scratch folder, and a
failure carries the toolkit's own error line. Builds run side by side, as many as the cores and
the free memory allow, largest first, starting while later segments are still being cut
(``Builds.add``; ``build_queue``). Results are cached by the SHA-256 of the
segment's ONNX bytes, the target and the toolkit version (``rwkv2rknn.rknn.buildcache``): an unchanged
segment is never rebuilt, an entry (fp16 or quantised) is used only after its recorded checksum
matches, and a per-entry lock makes two compiles (or two workers) take turns. A failed build moves the segment
to the CPU and says so, a failed T-row build leaves its prefill token by token and says so; with
``--strict`` either is an error.

Precondition: cut (and sequence) have run and the segment ONNX files are written in
``OUT_DIR/segments``. Postcondition: NPU segments have ``token.rknn`` (and ``seq.rknn``), or moved
to the CPU with a ``token.fallback`` reason.
"""

from __future__ import annotations

import hashlib
import os
from typing import Callable, Dict, NamedTuple, Optional

import numpy as np

from rwkv2rknn.rknn.calibrate import SegmentCalibration
from rwkv2rknn.errors import ToolkitError
from rwkv2rknn.fileio import read_json, remove_quietly, remove_stale_scratch, write_json
from rwkv2rknn.compiler.ir import Context, GraphSegment
from rwkv2rknn.rknn.build_child import build_child, clean_stale_partials, partial_name
from rwkv2rknn.rknn.build_worker import CachedBuilds

NAME = "build"
# Row count a token step runs with on a T-row build. rknn-toolkit2 2.5.0 builds several row counts
# into one .rknn with dynamic_input, but a 1-row shape among them makes the other shapes compute
# wrong results (measured: relative error ~1 at T = 16); with 2 rows every shape is right.
DECODE_ROWS = 2


def cache_key(onnx_bytes: bytes, target: str, toolkit: str, variant: str = "") -> str:
    """The build cache entry of a segment's ONNX bytes; ``variant`` names anything else the build
    depends on (precision, quantisation settings, calibration digest; '' for fp16)."""
    h = hashlib.sha256()
    for part in (target.encode(), b"\0", toolkit.encode(), b"\0", onnx_bytes):
        h.update(part)
    if variant:
        h.update(b"\0" + variant.encode())
    return h.hexdigest()


def file_key(onnx_path: str, target: str, toolkit: str, extra: bytes = b"") -> str:
    """``cache_key`` of a segment file, read in blocks, and of its external weights
    (``NAME.onnx.data``) when it has them, then ``extra``."""
    h = hashlib.sha256()
    for part in (target.encode(), b"\0", toolkit.encode(), b"\0"):
        h.update(part)
    for path in (onnx_path, onnx_path + ".data"):
        if path == onnx_path or os.path.exists(path):
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
    h.update(extra)
    return h.hexdigest()


class Builds:
    """The NPU segments' builds of one compile: ``add`` each segment as soon as its ONNX files
    are written (the builds run side by side meanwhile, largest first), then ``finish``."""

    def __init__(self, ctx: Context, out_dir: str, progress=None, calibration=None, biggest: int = 0):
        from rwkv2rknn.compiler import resources
        from rwkv2rknn.rknn.build_queue import BuildQueue
        from rwkv2rknn.rknn.toolkit import require_toolkit

        self.ctx, self.out_dir, self.progress = ctx, out_dir, progress
        self.calibration = calibration or {}
        self.version = require_toolkit()
        self.builds = CachedBuilds(ctx.options, self.version)
        clean_stale_partials(self.builds.cache.folder)
        remove_stale_scratch()  # what killed compiles left in $TMPDIR
        self.counts = {"built": 0, "cached": 0, "failed": 0}
        self.todo: list = []
        jobs = ctx.options.build_jobs or resources.build_jobs(biggest, 64)
        self.queue = BuildQueue(
            self._one,
            jobs,
            self._bytes,
            lambda seg: resources.build_memory(self._bytes(seg)),
            int(resources.memory_available() * 0.8),
            self._done,
            idle=self.builds.drop_worker,
        )

    def _bytes(self, seg: GraphSegment) -> int:
        folder = os.path.join(self.out_dir, "segments")
        names = [seg.name + ".onnx"] + ([seg.name + ".seq.onnx"] if seg.seq.model is not None else [])
        return max(os.path.getsize(os.path.join(folder, n)) for n in names)

    def _one(self, seg: GraphSegment):
        cal = self.calibration.get(seg.name)
        keep = sorted(set(seg.stages + [seg.name]) & set(self.ctx.options.quant_keep))
        if cal and keep:  # mixed precision chosen by the user (bench/quant_search.py measures it)
            seg.precision_note, cal = f"--quant-keep {','.join(keep)}", None
        return _one(Site(self.ctx, self.out_dir, self.builds, self.version), seg, cal)

    def _done(self, seg: GraphSegment, result, i: int, n: int, eta: str) -> None:
        status, kind = result
        self.counts[kind] += 1
        if self.progress:
            self.progress(seg, status + eta, i, n)

    def add(self, seg: GraphSegment) -> None:
        if seg.device == "npu":
            self.todo.append(seg)
            self.queue.add(seg)

    def stop(self) -> None:
        """Stop: queued builds never start, running children are killed."""
        self.builds.stop()
        self.queue.close()
        self.builds.close()

    def finish(self) -> None:
        try:
            self.queue.finish()  # raises ToolkitError under --strict
        except BaseException:
            self.stop()
            raise
        self.builds.close()
        ctx, opts, todo, counts = self.ctx, self.ctx.options, self.todo, self.counts

        def about(seg, message: str, kind: str = "") -> None:
            ctx.note(NAME, f"{seg.name}: {message}", kind=kind, segment=seg.name)

        for seg in todo:
            if seg.token.fallback:
                about(seg, f"build failed ({seg.token.fallback}); runs on the CPU", "fallback")
        ctx.note(
            NAME,
            f"{counts['built']} built, {counts['cached']} from the cache "
            f"({self.builds.cache.folder}), {counts['failed']} fell back to the CPU "
            f"[rknn-toolkit2 {self.version}, target {opts.target}, "
            f"{min(self.queue.jobs, max(len(todo), 1))} build(s) at a time]",
            kind="summary",
            **counts,
        )
        if self.calibration:
            stages = {st for s in todo for st in s.stages + [s.name]}
            unused = [k for k in opts.quant_keep if k not in stages]
            if unused:
                ctx.note(
                    NAME,
                    f"--quant-keep {','.join(unused)}: no NPU segment holds "
                    f"{'that stage' if len(unused) == 1 else 'those stages'} (or has that name)",
                )
            kept = [f"{s.name} ({s.precision_note})" for s in todo if s.precision_note]
            n_q = sum(s.token.precision == opts.quant for s in todo)
            ctx.note(
                NAME,
                f"{n_q} of {len(todo)} NPU segment(s) {opts.quant} "
                + (
                    f"(min cosine >= {opts.quant_min_cos:g} on held-out rows)"
                    if opts.quant_min_cos > -1
                    else "(no cosine rule)"
                )
                + (f"; kept fp16: {'; '.join(kept)}" if kept else ""),
            )
        from rwkv2rknn.passes.sequence import logits_only  # here: rwkv2rknn.passes imports this module

        for s in todo:
            if s.seq.model is not None and logits_only(ctx, s) and not s.token.fallback:
                about(s, "built for one row only (token steps; a prompt needs the logits of its last row)")
            if s.seq.fallback:
                about(
                    s,
                    f"T-row build failed ({s.seq.fallback}); its prefill runs token by token",
                    "seq_fallback",
                )


def run(
    ctx: Context,
    out_dir: str,
    progress: Optional[Callable[[GraphSegment, str, int, int], None]] = None,
    calibration: Optional[Dict[str, SegmentCalibration]] = None,
) -> None:
    """Build the NPU segments whose ONNX files are in ``out_dir``/segments, copying each .rknn
    beside its ONNX; ``progress(segment, status, i, n)`` after each (builds run side by side).
    ``calibration`` (by segment name) is given for a quantised compile."""
    todo = [seg for seg in ctx.segments if seg.device == "npu"]
    biggest = max(
        (os.path.getsize(os.path.join(out_dir, "segments", s.name + ".onnx")) for s in todo), default=0
    )
    builds = Builds(ctx, out_dir, progress, calibration, biggest)
    try:
        for seg in todo:
            builds.add(seg)
    except BaseException:
        builds.stop()
        raise
    builds.finish()


def seq_rows(ctx: Context) -> tuple:
    """The row counts of a T-row build: DECODE_ROWS and the prefill row counts."""
    return tuple(sorted({DECODE_ROWS, *ctx.options.prefill_rows}))


def shares_rows(ctx: Context, seg: GraphSegment) -> bool:
    """The NPU segment gets one T-row build for token steps and prefill (``_build_shared``):
    the segments the columns step rewrites."""
    from rwkv2rknn.passes.sequence import logits_only  # here: rwkv2rknn.passes imports this module

    return (
        seg.device == "npu"
        and seg.seq.model is not None
        and bool(ctx.options.prefill_rows)
        and not logits_only(ctx, seg)
    )


class Site(NamedTuple):
    """Where a compile's builds happen: its context, the artifact's folder, the build service and
    the toolkit's version."""

    ctx: Context
    out_dir: str
    builds: CachedBuilds
    version: str


def _one(site: Site, seg: GraphSegment, cal: Optional[SegmentCalibration]):
    """Build one NPU segment: (progress status, 'built' / 'cached' / 'failed')."""
    ctx, out_dir, builds, version = site
    opts = ctx.options
    if shares_rows(ctx, seg):
        done = _build_shared(site, seg, cal)
        if done:  # one build serves decode and prefill
            _estimate(ctx, seg)
            return done.label + " (decode and T rows)", "cached" if done.cached else "built"
        if opts.strict:
            raise ToolkitError(
                f"the T-row (prefill) build of segment {seg.name} failed: {seg.seq.fallback}",
                "drop --strict (its prefill then runs token by token), or use --prefill-rows none",
            )
    onnx_path = os.path.join(out_dir, "segments", seg.name + ".onnx")
    dest = os.path.join(out_dir, "segments", seg.name + ".rknn")
    done = ""
    if cal:
        job = _Quant(ctx, seg, onnx_path, (), cal.dataset, cal, builds, out_dir, dest)
        done = _quantised(job, version)
    if done:
        key, cached = seg.cache_key, done == "cached"
        status = f"{seg.token.precision} (cos {seg.accuracy['min_cos']:.4f}), {done}"
    else:
        key = file_key(onnx_path, opts.target, version)
        status, reason = builds.fetch_or_build(onnx_path, key, dest)
        if reason:
            if opts.strict:
                raise ToolkitError(
                    f"building segment {seg.name} failed: {reason}",
                    "drop --strict to let it fall back to the CPU",
                )
            seg.device, seg.token.fallback = "cpu", reason
            return "failed, CPU fallback", "failed"
        cached = status == "cached"
    if seg.precision_note and seg.token.precision == "fp16":
        status = f"fp16 ({seg.precision_note}), {status}"
    seg.token.rknn = f"segments/{seg.name}.rknn"
    seg.cache_key = key
    _estimate(ctx, seg)
    return status + (", T-rows failed" if seg.seq.fallback else ""), "cached" if cached else "built"


class Done(NamedTuple):
    """A build that worked: its progress label ('fp16 (...), built') and whether its .rknn came
    from the cache."""

    label: str
    cached: bool


def _build_shared(site: Site, seg: GraphSegment, cal: Optional[SegmentCalibration] = None) -> Optional[Done]:
    """The T-row variant of an NPU segment built for DECODE_ROWS and the prefill row counts: one
    .rknn, weights once, serving token steps (the token in row 0, padding after it) and prefill;
    quantised when ``cal`` has T-row samples and the build is accurate enough. The file is built
    as written: in columns where the columns step rewrote it (``rwkv2rknn.rknn.columns``: no
    Transposes on the NPU); where that build fails, the step's rows form is put back in its place
    and built instead. Returns what it did, or None when the build failed
    (``seg.seq.fallback`` says why; the caller then builds the per-token graph alone and prefill
    runs token by token)."""
    from rwkv2rknn.rknn.columns import restore_rows

    ctx, out_dir = site.ctx, site.out_dir
    rows = seq_rows(ctx)
    done = _build_seq(site, seg, cal, rows)
    if done or seg.seq.layout != "columns":
        return done
    ctx.note(
        NAME,
        f"{seg.name}: T-row build in columns failed ({seg.seq.fallback}); building it as rows",
        segment=seg.name,
    )
    restore_rows(seg, out_dir)
    return _build_seq(site, seg, cal, rows)


def _build_seq(site: Site, seg: GraphSegment, cal: Optional[SegmentCalibration], rows) -> Optional[Done]:
    """One try of ``_build_shared``: the ``.seq.onnx`` as it is now."""
    ctx, out_dir, builds, version = site
    seg.seq.fallback = ""
    onnx_path = os.path.join(out_dir, "segments", seg.name + ".seq.onnx")
    if cal and cal.seq_dataset:
        dest = os.path.join(out_dir, "segments", seg.name + ".seq.rknn")
        job = _Quant(ctx, seg, onnx_path, rows, cal.seq_dataset, cal, builds, out_dir, dest)
        done = _quantised(job, version)
        if done:
            _copy_shared(seg, out_dir, rows, seg.cache_key)
            seg.seq.precision, seg.token.calib, seg.seq.calib = (
                seg.token.precision,
                cal.seq_dataset,
                cal.seq_dataset,
            )
            seg.seq.quant = dict(seg.token.quant)
            return Done(
                f"{seg.token.precision} (cos {seg.accuracy['min_cos']:.4f}), {done}", done == "cached"
            )
    key = _seq_key(ctx, onnx_path, version, rows)
    status, reason = builds.fetch_or_build(
        onnx_path, key, os.path.join(out_dir, "segments", seg.name + ".seq.rknn"), rows
    )
    if reason:
        seg.seq.fallback = reason
        return None
    _copy_shared(seg, out_dir, rows, key)
    return Done(
        f"fp16 ({seg.precision_note}), {status}" if seg.precision_note else status, status == "cached"
    )


def seq_built_before(ctx: Context, onnx_path: str) -> bool:
    """The build cache holds the fp16 T-row build of exactly this file (recorded and present):
    the columns step checked it when it was built (``rwkv2rknn.rknn.columns.apply``)."""
    from rwkv2rknn.fileio import cache_root
    from rwkv2rknn.rknn.buildcache import BuildCache
    from rwkv2rknn.rknn.toolkit import require_toolkit

    if ctx.options.quant != "fp16":
        return False
    key = _seq_key(ctx, onnx_path, require_toolkit(), seq_rows(ctx))
    cache = BuildCache(os.path.join(cache_root(ctx.options.cache_dir), "rknn"))
    return bool(cache.recorded(key)) and os.path.isfile(cache.entry(key))


def _seq_key(ctx: Context, onnx_path: str, version: str, rows) -> str:
    """The cache key of a T-row build: the bytes of the file built (rows or columns), its row counts."""
    return file_key(onnx_path, ctx.options.target, version, repr(rows).encode())


def _copy_shared(seg: GraphSegment, out_dir: str, rows, key: str) -> None:
    """Record the shared build (already copied into the artifact)."""
    seg.seq.rknn = seg.token.rknn = f"segments/{seg.name}.seq.rknn"
    seg.seq.rows, seg.decode_rows, seg.cache_key = rows, DECODE_ROWS, key


def _quant_variant(precision: str, digest: str, floating=()) -> str:
    from rwkv2rknn.rknn.toolkit import QUANT_DTYPE

    q = quant_settings(floating)
    extra = f"|float {q['float']}" if "float" in q else ""  # the key of builds before it unchanged
    return f"{QUANT_DTYPE[precision]}|{q['algorithm']}|{q['method']}|{digest}{extra}"


def quant_settings(floating=()) -> dict:
    """How this compile quantises (recorded in each quantised build's ``plan.Build.quant``):
    ``floating``, the --quant-float groups (``toolkit.FLOAT_TENSORS``) kept float16 in a
    per-token build, as 'float' (comma-separated; absent when none)."""
    from rwkv2rknn.rknn.toolkit import QUANT_ALGORITHM, QUANT_METHOD

    q = {"algorithm": QUANT_ALGORITHM, "method": QUANT_METHOD}
    if floating:
        q["float"] = ",".join(floating)
    return q


class _Quant(NamedTuple):
    """One quantised build of a segment: its ONNX file as written (``rows``: a T-row build's row
    counts, or ()), the calibration dataset's file name, the build service, the artifact's folder
    and where the .rknn goes."""

    ctx: Context
    seg: GraphSegment
    onnx_path: str
    rows: tuple
    dataset: str
    cal: SegmentCalibration
    builds: CachedBuilds
    out_dir: str
    dest: str


def _quantised(job: _Quant, version: str) -> str:
    """The segment's quantised build copied to ``dest`` if it is accurate enough on the held-out
    rows: 'cached', 'built' or 'rebuilt (...)'; else '' (``dest`` not written) and
    ``seg.precision_note`` says why it is built fp16. ``rows``: a T-row build's row counts (its
    held-out rows run as token steps, in row 0). The file is built as written (rows or columns).

    The entry goes through the build cache as an fp16 one does: its lock held throughout (two
    compiles take turns), its recorded checksum checked as it is copied. Its measured accuracy
    (``KEY.json``) is written after the build; an entry whose ``.rknn`` fails its checksum or
    whose record is unreadable is removed and built again."""
    ctx, seg, onnx_path, rows, dataset, cal, builds, out_dir, dest = job
    opts = ctx.options
    carried = {t for s in ctx.state if s.accumulator for t in (s.input, s.output)}
    if carried & set(seg.inputs + seg.outputs) or any(n.op in ("Exp", "Max") for n in seg.nodes):
        raise RuntimeError(f"segment {seg.name} holds the recurrence, which must never be quantised")
    with open(onnx_path, "rb") as f:
        key = cache_key(
            f.read() + (repr(tuple(rows)).encode() if rows else b""),
            opts.target,
            version,
            _quant_variant(opts.quant, cal.digest, () if rows else opts.quant_float),
        )
    cache = builds.cache
    with cache.locked(key, lambda: builds.stopping):
        status = _quantised_entry(job, key)
    if not status:
        return ""
    seg.token.precision, seg.token.calib, seg.cache_key, seg.precision_note = opts.quant, dataset, key, ""
    seg.token.quant = quant_settings(() if rows else opts.quant_float)
    return status


def _accuracy_record(meta: str):
    """The measured accuracy cached beside a quantised entry, or None (missing or damaged)."""
    from rwkv2rknn.rknn.calibrate import Accuracy

    if not os.path.isfile(meta):
        return None
    try:
        return Accuracy(**read_json(meta, "cached accuracy"))
    except Exception:  # noqa: BLE001 - a damaged record: build again
        return None


def _quantised_entry(job: _Quant, key: str) -> str:
    """``_quantised`` with the key's lock held: its status, or ''."""
    from rwkv2rknn.rknn.calibrate import accuracy

    ctx, seg, onnx_path, rows, dataset, cal, builds, out_dir, dest = job
    opts, cache = ctx.options, builds.cache
    meta = os.path.join(cache.folder, key + ".json")
    acc, problem = _accuracy_record(meta), ""
    if acc is None and (os.path.exists(cache.entry(key)) or os.path.exists(meta)):
        problem = "no readable accuracy record"
    elif acc is not None and acc.min_cos >= opts.quant_min_cos:
        digest, problem = cache.copy_to(key, dest)
        if digest:
            seg.accuracy = acc.to_dict()
            return "cached"
        if not problem:
            problem = "no .rknn"
        acc = None
    elif acc is not None:  # measured too inaccurate before: nothing to copy
        seg.accuracy = acc.to_dict()
        seg.precision_note = f"{opts.quant} cos {acc.min_cos:.4f} < {opts.quant_min_cos:g}"
        return ""
    cache.drop(key)
    remove_quietly(meta)
    outs = partial_name(os.path.join(cache.folder, key + ".holdout.npz"), os.getpid())
    try:
        reason = build_child(
            onnx_path,
            cache.entry(key),
            opts.target,
            opts.verbose,
            opts.build_timeout,
            rows,
            precision=opts.quant,
            floating=() if rows else opts.quant_float,
            dataset=os.path.join(out_dir, dataset),
            holdout=cal.seq_holdout if rows else cal.holdout,
            holdout_out=outs,
            running=builds.running,
            checksum=cache.sum_path(key),
        )
        if reason:
            seg.precision_note = f"{opts.quant} build failed: {reason}"
            return ""
        with np.load(outs) as z:
            flat = [z[f"arr_{j}"] for j in range(len(z.files))]
    finally:
        remove_quietly(outs)
    n = len(seg.outputs)
    got = [
        {
            k: np.asarray(flat[i * n + j]).reshape(DECODE_ROWS if rows else 1, -1)[0]
            for j, k in enumerate(seg.outputs)
        }
        for i in range(len(cal.want))
    ]
    acc = accuracy(got, cal.want)
    write_json(meta, acc.to_dict())
    seg.accuracy = acc.to_dict()
    if not acc.min_cos >= opts.quant_min_cos:
        seg.precision_note = f"{opts.quant} cos {acc.min_cos:.4f} < {opts.quant_min_cos:g}"
        return ""
    if not cache.copy_to(key, dest)[0]:
        seg.precision_note = f"{opts.quant} build changed in the cache before it was copied"
        return ""
    return f"rebuilt (the cache entry had {problem})" if problem else "built"


def _estimate(ctx: Context, seg: GraphSegment) -> None:
    """The segment's estimated ms per call and per prefill token at the precision it was built."""
    from rwkv2rknn.passes.partition import estimate_ms
    from rwkv2rknn.passes.sequence import logits_only, prefill_ms

    if seg.token.precision == "fp16" and seg.seq.precision == "fp16":
        return
    seg.est_ms = estimate_ms("npu", seg.nodes, ctx.profile, precision=seg.token.precision)
    if seg.seq.model is not None:
        seg.est_prefill_ms = prefill_ms(
            ctx, seg, seg.token.precision if logits_only(ctx, seg) else seg.seq.precision
        )
