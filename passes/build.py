"""build: every NPU segment becomes a ``.rknn`` for the target, in a child process, cached.

::

    segments/s001_npu_L0.onnx --(child: rknn-toolkit2 build)--> cache/<sha256>.rknn --> segments/s001_npu_L0.rknn
                                 '-- crash / refusal --> the segment falls back to the CPU (reported)
    segments/s003_npu_L0-L1.seq.onnx --(T in 2, 16, 32, 64)--> segments/s003_npu_L0-L1.seq.rknn
                                 (decode runs it with 2 rows; no per-token .rknn: weights once)

A segment with a T-row (prefill) variant gets one build of that variant for the prefill row
counts and for DECODE_ROWS: token steps run it with the token in row 0. Where that build fails,
the per-token graph is built alone and prefill runs token by token.

With ``--quant w8a8`` (or w16a16i) a build is quantised from the segment's calibration dataset
(``rwkv2rknn.calibrate``); the child also runs it in the simulator on held-out rows (a T-row build:
each row as a token step, in row 0) and the parent scores them against fp32 onnxruntime. A
segment whose smallest cosine is below ``--quant-min-cos`` (or whose quantised build fails) is
built fp16 instead, and the plan says so. The cache key of a quantised build also holds the
precision, the toolkit's quantisation settings and a digest of the calibration rows; its measured
accuracy is cached beside it.

rknn-toolkit2 reports errors three ways (exceptions, return codes, and killing its own process),
so each build runs in a child process with a time limit. Results are cached by the SHA-256 of
the segment's ONNX bytes, the target and the toolkit version: an unchanged segment is never
rebuilt. Cache entries are written under a temporary name and renamed into place, so a killed
build or two compiles at once never leave a half entry. A failed build moves the segment to the
CPU and says so; with ``--strict`` it is an error.

Precondition: cut (and sequence) have run and the segment ONNX files are written in
``OUT_DIR/segments``. Postcondition: NPU segments have ``rknn`` (and ``seq_rknn``), or moved
to the CPU with a ``fallback`` reason.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import signal
import subprocess
import sys
from typing import Callable, Dict, Optional

import numpy as np

from rwkv2rknn.calibrate import SegmentCalibration
from rwkv2rknn.errors import ToolkitError
from rwkv2rknn.io import cache_root, read_json, remove_quietly, remove_stale, write_json
from rwkv2rknn.ir import Context, GraphSegment

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


def partial_name(rknn_path: str, pid: int) -> str:
    """Where the build child with this pid writes before it renames the result to ``rknn_path``."""
    return f"{rknn_path}.partial-{pid}"


def build_child(onnx_path: str, rknn_path: str, target: str, verbose: bool,
                timeout: float, rows=(), precision: str = "fp16", dataset: str = "",
                holdout: str = "", holdout_out: str = "") -> str:
    """Build in a child process; '' on success, else the reason it failed.

    The child writes ``partial_name(rknn_path, its pid)`` and renames it to ``rknn_path`` itself,
    so the entry is whole even if this process is killed while the child works. If the child
    fails, times out or this process is interrupted, the child is stopped and its partial file
    removed. A quantised build (``precision``, ``dataset``) also runs the ``holdout`` dataset's
    samples in the simulator and saves the outputs to ``holdout_out`` (.npz, sample-major).
    """
    cmd = [sys.executable, "-m", "rwkv2rknn.passes.build", onnx_path, rknn_path, "--target", target]
    if verbose:
        cmd.append("--verbose")
    if rows:
        cmd += ["--rows", ",".join(str(r) for r in rows)]
    if precision != "fp16":
        cmd += ["--precision", precision, "--dataset", dataset]
    if holdout:
        cmd += ["--holdout", holdout, "--holdout-out", holdout_out]
    proc = subprocess.Popen(cmd, stdout=None if verbose else subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    tmp = partial_name(rknn_path, proc.pid)
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _stop(proc, tmp)
        return f"build took longer than {timeout:g} s"
    except BaseException:  # Ctrl-C or any other error here: leave no child and no partial file
        _stop(proc, tmp)
        raise
    remove_quietly(tmp)  # nothing left when the child renamed it
    if proc.returncode == 0 and os.path.isfile(rknn_path) and os.path.getsize(rknn_path) > 0:
        return ""
    if proc.returncode < 0:
        return f"the toolkit's process died ({signal.Signals(-proc.returncode).name})"
    # the child's last line is the toolkit's error; Python's warnings are not the reason
    lines = [ln for ln in (err or "").splitlines() if ln.strip() and "Warning: " not in ln]
    last = lines[-1].strip()[:240] if lines else "no message"
    return f"the toolkit's process exited with {proc.returncode} ({last})"


def _stop(proc, tmp: str) -> None:
    try:
        proc.kill()
        proc.wait()
    finally:
        remove_quietly(tmp)


def clean_stale_partials(cache: str) -> None:
    """Remove partial files left by build children that died (their pid no longer runs)."""
    remove_stale(cache, ".partial-")


def run(ctx: Context, out_dir: str,
        progress: Optional[Callable[[GraphSegment, str, int, int], None]] = None,
        calibration: Optional[Dict[str, SegmentCalibration]] = None) -> None:
    """Build the NPU segments whose ONNX files are in ``out_dir``/segments, copying each .rknn
    beside its ONNX; ``progress(segment, status, i, n)`` after each. ``calibration`` (by segment
    name) is given for a quantised compile."""
    from rwkv2rknn.toolkit import require_toolkit

    opts = ctx.options
    version = require_toolkit()
    cache = os.path.join(cache_root(opts.cache_dir), "rknn")
    os.makedirs(cache, exist_ok=True)
    clean_stale_partials(cache)
    built = hits = failed = 0
    todo = [seg for seg in ctx.segments if seg.device == "npu"]
    for i, seg in enumerate(todo, 1):
        cal = (calibration or {}).get(seg.name)
        if seg.seq_model is not None and opts.prefill_rows:
            status = _build_shared(ctx, seg, out_dir, cache, version, cal)
            if status:  # one build serves decode and prefill
                hits += status.endswith("cached")
                built += not status.endswith("cached")
                _estimate(ctx, seg)
                if progress:
                    progress(seg, status + " (decode and T rows)", i, len(todo))
                continue
        onnx_path = os.path.join(out_dir, "segments", seg.name + ".onnx")
        entry, cached = "", False
        if cal:
            entry, cached = _quantised(ctx, seg, onnx_path, (), cal.dataset, cal, cache, version, out_dir)
        if entry:
            key = seg.cache_key
            hits += cached
            built += not cached
            status = f"{seg.precision} (cos {seg.accuracy['min_cos']:.4f}), " + ("cached" if cached else "built")
        else:
            with open(onnx_path, "rb") as f:
                key = cache_key(f.read(), opts.target, version)
            entry = os.path.join(cache, key + ".rknn")
            if os.path.isfile(entry) and os.path.getsize(entry) > 0:
                hits += 1
                status = "cached"
            else:
                reason = build_child(onnx_path, entry, opts.target, opts.verbose, opts.build_timeout)
                if reason:
                    if opts.strict:
                        raise ToolkitError(f"building segment {seg.name} failed: {reason}",
                                           "drop --strict to let it fall back to the CPU")
                    seg.device, seg.fallback = "cpu", reason
                    failed += 1
                    ctx.note(NAME, f"{seg.name}: build failed ({reason}); runs on the CPU")
                    if progress:
                        progress(seg, "failed, CPU fallback", i, len(todo))
                    continue
                built += 1
                status = "built"
        if seg.precision_note and seg.precision == "fp16":
            status = f"fp16 ({seg.precision_note}), {status}"
        dest = os.path.join(out_dir, "segments", seg.name + ".rknn")
        shutil.copyfile(entry, dest)
        seg.rknn = f"segments/{seg.name}.rknn"
        seg.cache_key = key
        _estimate(ctx, seg)
        if progress:
            progress(seg, status, i, len(todo))
    ctx.note(NAME, f"{built} built, {hits} from the cache ({cache}), {failed} fell back to the CPU"
                   f" [rknn-toolkit2 {version}, target {opts.target}]")
    if calibration:
        kept = [f"{s.name} ({s.precision_note})" for s in todo if s.precision_note]
        n_q = sum(s.precision == opts.quant for s in todo)
        ctx.note(NAME, f"{n_q} of {len(todo)} NPU segment(s) {opts.quant} (min cosine >= "
                       f"{opts.quant_min_cos:g} on held-out rows)" +
                       (f"; kept fp16: {'; '.join(kept)}" if kept else ""))
    seq_failed = [s.name for s in todo if s.seq_fallback]
    if seq_failed:
        ctx.note(NAME, f"T-row builds failed for {', '.join(seq_failed)}: their prefill runs token by token")


def _build_shared(ctx: Context, seg: GraphSegment, out_dir: str, cache: str, version: str,
                  cal: Optional[SegmentCalibration] = None) -> str:
    """The T-row variant of an NPU segment built for DECODE_ROWS and the prefill row counts: one
    .rknn, weights once, serving token steps (the token in row 0, padding after it) and prefill;
    quantised when ``cal`` has T-row samples and the build is accurate enough.
    Returns 'built' or 'cached' (after the precision), or '' when the build failed
    (``seg.seq_fallback`` says why; the caller then builds the per-token graph alone and prefill
    runs token by token)."""
    opts = ctx.options
    rows = tuple(sorted({DECODE_ROWS, *opts.prefill_rows}))
    onnx_path = os.path.join(out_dir, "segments", seg.name + ".seq.onnx")
    if cal and cal.seq_dataset:
        entry, cached = _quantised(ctx, seg, onnx_path, rows, cal.seq_dataset, cal, cache, version,
                                   out_dir)
        if entry:
            _copy_shared(seg, entry, out_dir, rows, seg.cache_key)
            seg.seq_precision, seg.calib, seg.seq_calib = seg.precision, cal.seq_dataset, cal.seq_dataset
            return f"{seg.precision} (cos {seg.accuracy['min_cos']:.4f}), " + ("cached" if cached else "built")
    with open(onnx_path, "rb") as f:
        key = cache_key(f.read() + repr(rows).encode(), opts.target, version)
    entry = os.path.join(cache, key + ".rknn")
    status = "cached"
    if not (os.path.isfile(entry) and os.path.getsize(entry) > 0):
        reason = build_child(onnx_path, entry, opts.target, opts.verbose, opts.build_timeout, rows)
        if reason:
            seg.seq_fallback = reason
            return ""
        status = "built"
    _copy_shared(seg, entry, out_dir, rows, key)
    return f"fp16 ({seg.precision_note}), {status}" if seg.precision_note else status


def _copy_shared(seg: GraphSegment, entry: str, out_dir: str, rows, key: str) -> None:
    shutil.copyfile(entry, os.path.join(out_dir, "segments", seg.name + ".seq.rknn"))
    seg.seq_rknn = seg.rknn = f"segments/{seg.name}.seq.rknn"
    seg.seq_rows, seg.decode_rows, seg.cache_key = rows, DECODE_ROWS, key


def _quant_variant(precision: str, digest: str) -> str:
    from rwkv2rknn.toolkit import QUANT_ALGORITHM, QUANT_DTYPE, QUANT_METHOD
    return f"{QUANT_DTYPE[precision]}|{QUANT_ALGORITHM}|{QUANT_METHOD}|{digest}"


def _quantised(ctx: Context, seg: GraphSegment, onnx_path: str, rows, dataset: str,
               cal: SegmentCalibration, cache: str, version: str, out_dir: str):
    """(cache entry of the segment's quantised build, from the cache) if it is accurate enough
    on the held-out rows, else ('', False) and ``seg.precision_note`` says why it is built fp16.
    ``rows``: a T-row build's row counts (its held-out rows run as token steps, in row 0)."""
    from rwkv2rknn.calibrate import Accuracy, accuracy
    opts = ctx.options
    carried = {t for s in ctx.state if s.accumulator for t in (s.input, s.output)}
    if carried & set(seg.inputs + seg.outputs) or any(n.op in ("Exp", "Max") for n in seg.nodes):
        raise RuntimeError(f"segment {seg.name} holds the recurrence, which must never be quantised")
    with open(onnx_path, "rb") as f:
        key = cache_key(f.read() + (repr(tuple(rows)).encode() if rows else b""), opts.target, version,
                        _quant_variant(opts.quant, cal.digest))
    entry, meta = os.path.join(cache, key + ".rknn"), os.path.join(cache, key + ".json")
    acc = None
    if os.path.isfile(entry) and os.path.getsize(entry) > 0 and os.path.isfile(meta):
        try:
            acc = Accuracy(**read_json(meta, "cached accuracy"))
        except Exception:  # noqa: BLE001 - a damaged record: build again
            acc = None
    cached = acc is not None
    if acc is None:
        outs = partial_name(os.path.join(cache, key + ".holdout.npz"), os.getpid())
        try:
            reason = build_child(onnx_path, entry, opts.target, opts.verbose, opts.build_timeout, rows,
                                 precision=opts.quant, dataset=os.path.join(out_dir, dataset),
                                 holdout=cal.seq_holdout if rows else cal.holdout, holdout_out=outs)
            if reason:
                seg.precision_note = f"{opts.quant} build failed: {reason}"
                return "", False
            with np.load(outs) as z:
                flat = [z[f"arr_{j}"] for j in range(len(z.files))]
        finally:
            remove_quietly(outs)
        n = len(seg.outputs)
        got = [{k: np.asarray(flat[i * n + j]).reshape(DECODE_ROWS if rows else 1, -1)[0]
                for j, k in enumerate(seg.outputs)} for i in range(len(cal.want))]
        acc = accuracy(got, cal.want)
        write_json(meta, acc.to_dict())
    seg.accuracy = acc.to_dict()
    if not acc.min_cos >= opts.quant_min_cos:
        seg.precision_note = f"{opts.quant} cos {acc.min_cos:.4f} < {opts.quant_min_cos:g}"
        return "", False
    seg.precision, seg.calib, seg.cache_key, seg.precision_note = opts.quant, dataset, key, ""
    return entry, cached


def _estimate(ctx: Context, seg: GraphSegment) -> None:
    """The segment's estimated ms per call and per prefill token at the precision it was built."""
    from rwkv2rknn.passes.partition import estimate_ms
    from rwkv2rknn.passes.sequence import prefill_rows
    if seg.precision == "fp16" and seg.seq_precision == "fp16":
        return
    seg.est_ms = estimate_ms("npu", seg.nodes, ctx.profile, precision=seg.precision)
    if seg.seq_model is not None:
        t = prefill_rows(ctx)
        seg.est_prefill_ms = estimate_ms("npu", seg.nodes, ctx.profile, rows=t,
                                         precision=seg.seq_precision) / t


def _main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Build one ONNX segment into an .rknn (child process).")
    ap.add_argument("onnx")
    ap.add_argument("rknn")
    ap.add_argument("--target", default="rk3588")
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--rows", default="", help="T-row variant: build one graph per row count (e.g. 16,32,64)")
    ap.add_argument("--precision", default="fp16")
    ap.add_argument("--dataset", default="", help="calibration dataset of a quantised build")
    ap.add_argument("--holdout", default="", help="run these samples in the simulator after the build")
    ap.add_argument("--holdout-out", default="", help="... and save the outputs here (.npz)")
    a = ap.parse_args(argv)
    from rwkv2rknn.errors import Rwkv2RknnError
    from rwkv2rknn.toolkit import build_in_process, dynamic_shapes
    tmp = partial_name(a.rknn, os.getpid())
    rows = [int(r) for r in a.rows.split(",") if r]
    try:
        rk = build_in_process(a.onnx, target=a.target, rknn_out=tmp, verbose=a.verbose,
                              float_dtype=os.environ.get("RWKV2RKNN_FLOAT_DTYPE", ""),
                              dynamic_input=dynamic_shapes(a.onnx, rows) if rows else None,
                              precision=a.precision, dataset=a.dataset, runtime=bool(a.holdout))
        try:
            if a.holdout:
                _run_holdout(rk, a.holdout, a.holdout_out)
        finally:
            rk.release()
        if not os.path.isfile(tmp) or os.path.getsize(tmp) == 0:
            print("rknn-toolkit2 wrote no .rknn", file=sys.stderr)
            return 1
        os.replace(tmp, a.rknn)  # whole, or not there at all
        return 0
    except Rwkv2RknnError as e:
        print(e.problem, file=sys.stderr)  # the reason; the fix is the fallback itself
        return 1
    finally:
        remove_quietly(tmp)


def _run_holdout(rk, dataset: str, out: str) -> None:
    """The simulator's outputs for every sample of ``dataset``, saved sample-major to ``out``."""
    import contextlib
    import io as _io

    from rwkv2rknn.calibrate import read_dataset
    flat = []
    for sample in read_dataset(dataset):
        with contextlib.redirect_stdout(_io.StringIO()):
            outs = rk.inference(inputs=[np.ascontiguousarray(x, np.float32) for x in sample])
        if outs is None:
            raise ToolkitError("the simulator ran no held-out sample", "run with --verbose")
        flat += [np.asarray(o, np.float32) for o in outs]
    with open(out, "wb") as f:
        np.savez(f, *flat)


if __name__ == "__main__":
    sys.exit(_main())
