"""build: every NPU segment becomes a ``.rknn`` for the target, in a child process, cached.

::

    segments/s001_npu_L0.onnx --(child: rknn-toolkit2 build)--> cache/<sha256>.rknn --> segments/s001_npu_L0.rknn
                                 '-- crash / refusal --> the segment falls back to the CPU (reported)
    segments/s003_npu_L0-L1.seq.onnx --(T in 2, 16, 32, 64)--> segments/s003_npu_L0-L1.seq.rknn
                                 (decode runs it with 2 rows; no per-token .rknn: weights once)

A segment with a T-row (prefill) variant gets one build of that variant for the prefill row
counts and for DECODE_ROWS: token steps run it with the token in row 0. Where that build fails,
the per-token graph is built alone and prefill runs token by token.

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
from typing import Callable, Optional

from rwkv2rknn.errors import ToolkitError
from rwkv2rknn.io import cache_root, remove_quietly, remove_stale
from rwkv2rknn.ir import Context, GraphSegment

NAME = "build"
# Row count a token step runs with on a T-row build. rknn-toolkit2 2.5.0 builds several row counts
# into one .rknn with dynamic_input, but a 1-row shape among them makes the other shapes compute
# wrong results (measured: relative error ~1 at T = 16); with 2 rows every shape is right.
DECODE_ROWS = 2


def cache_key(onnx_bytes: bytes, target: str, toolkit: str) -> str:
    h = hashlib.sha256()
    for part in (target.encode(), b"\0", toolkit.encode(), b"\0", onnx_bytes):
        h.update(part)
    return h.hexdigest()


def partial_name(rknn_path: str, pid: int) -> str:
    """Where the build child with this pid writes before it renames the result to ``rknn_path``."""
    return f"{rknn_path}.partial-{pid}"


def build_child(onnx_path: str, rknn_path: str, target: str, verbose: bool,
                timeout: float, rows=()) -> str:
    """Build in a child process; '' on success, else the reason it failed.

    The child writes ``partial_name(rknn_path, its pid)`` and renames it to ``rknn_path`` itself,
    so the entry is whole even if this process is killed while the child works. If the child
    fails, times out or this process is interrupted, the child is stopped and its partial file
    removed.
    """
    cmd = [sys.executable, "-m", "rwkv2rknn.passes.build", onnx_path, rknn_path, "--target", target]
    if verbose:
        cmd.append("--verbose")
    if rows:
        cmd += ["--rows", ",".join(str(r) for r in rows)]
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
        progress: Optional[Callable[[GraphSegment, str, int, int], None]] = None) -> None:
    """Build the NPU segments whose ONNX files are in ``out_dir``/segments, copying each .rknn
    beside its ONNX; ``progress(segment, status, i, n)`` after each."""
    from rwkv2rknn.toolkit import require_toolkit

    opts = ctx.options
    version = require_toolkit()
    cache = os.path.join(cache_root(opts.cache_dir), "rknn")
    os.makedirs(cache, exist_ok=True)
    clean_stale_partials(cache)
    built = hits = failed = 0
    todo = [seg for seg in ctx.segments if seg.device == "npu"]
    for i, seg in enumerate(todo, 1):
        if seg.seq_model is not None and opts.prefill_rows:
            status = _build_shared(seg, out_dir, cache, version, opts)
            if status:  # one build serves decode and prefill
                hits += status == "cached"
                built += status != "cached"
                if progress:
                    progress(seg, status + " (decode and T rows)", i, len(todo))
                continue
        onnx_path = os.path.join(out_dir, "segments", seg.name + ".onnx")
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
        dest = os.path.join(out_dir, "segments", seg.name + ".rknn")
        shutil.copyfile(entry, dest)
        seg.rknn = f"segments/{seg.name}.rknn"
        seg.cache_key = key
        if progress:
            progress(seg, status, i, len(todo))
    ctx.note(NAME, f"{built} built, {hits} from the cache ({cache}), {failed} fell back to the CPU"
                   f" [rknn-toolkit2 {version}, target {opts.target}]")
    seq_failed = [s.name for s in todo if s.seq_fallback]
    if seq_failed:
        ctx.note(NAME, f"T-row builds failed for {', '.join(seq_failed)}: their prefill runs token by token")


def _build_shared(seg: GraphSegment, out_dir: str, cache: str, version: str, opts) -> str:
    """The T-row variant of an NPU segment built for DECODE_ROWS and the prefill row counts: one
    .rknn, weights once, serving token steps (the token in row 0, padding after it) and prefill.
    Returns 'built' or 'cached', or '' when the build failed (``seg.seq_fallback`` says why; the
    caller then builds the per-token graph alone and prefill runs token by token)."""
    rows = tuple(sorted({DECODE_ROWS, *opts.prefill_rows}))
    onnx_path = os.path.join(out_dir, "segments", seg.name + ".seq.onnx")
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
    shutil.copyfile(entry, os.path.join(out_dir, "segments", seg.name + ".seq.rknn"))
    seg.seq_rknn = seg.rknn = f"segments/{seg.name}.seq.rknn"
    seg.seq_rows, seg.decode_rows, seg.cache_key = rows, DECODE_ROWS, key
    return status


def _main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Build one ONNX segment into an .rknn (child process).")
    ap.add_argument("onnx")
    ap.add_argument("rknn")
    ap.add_argument("--target", default="rk3588")
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--rows", default="", help="T-row variant: build one graph per row count (e.g. 16,32,64)")
    a = ap.parse_args(argv)
    from rwkv2rknn.errors import Rwkv2RknnError
    from rwkv2rknn.toolkit import build_in_process, dynamic_shapes
    tmp = partial_name(a.rknn, os.getpid())
    rows = [int(r) for r in a.rows.split(",") if r]
    try:
        rk = build_in_process(a.onnx, target=a.target, rknn_out=tmp, verbose=a.verbose,
                              float_dtype=os.environ.get("RWKV2RKNN_FLOAT_DTYPE", ""),
                              dynamic_input=dynamic_shapes(a.onnx, rows) if rows else None)
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


if __name__ == "__main__":
    sys.exit(_main())
