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
so each build runs in a child process with a time limit, in a private scratch folder, and a
failure carries the toolkit's own error line. Builds run side by side, as many as the cores and
the free memory allow (``resources.build_jobs``). Results are cached by the SHA-256 of the
segment's ONNX bytes, the target and the toolkit version (``rwkv2rknn.buildcache``): an unchanged
segment is never rebuilt, an entry is used only after its recorded checksum matches, and a
per-entry lock makes two compiles (or two workers) take turns. A failed build moves the segment
to the CPU and says so; with ``--strict`` it is an error.

Precondition: cut (and sequence) have run and the segment ONNX files are written in
``OUT_DIR/segments``. Postcondition: NPU segments have ``rknn`` (and ``seq_rknn``), or moved
to the CPU with a ``fallback`` reason.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
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


def partial_name(rknn_path: str, pid: int) -> str:
    """Where the build child with this pid writes before it renames the result to ``rknn_path``."""
    return f"{rknn_path}.partial-{pid}"


def build_child(onnx_path: str, rknn_path: str, target: str, verbose: bool,
                timeout: float, rows=(), running: Optional[set] = None, checksum: str = "") -> str:
    """Build in a child process; '' on success, else the reason it failed (with the toolkit's
    own error line when it wrote one).

    The child writes ``partial_name(rknn_path, its pid)`` and renames it to ``rknn_path`` itself,
    so the entry is whole even if this process is killed while the child works. If the child
    fails, times out or this process is interrupted, the child is stopped and its partial file
    removed. Each child works in its own empty folder (its cwd and $TMPDIR): rknn-toolkit2 writes
    fixed-name scratch files there (``check_dynshape0.onnx`` ... for a T-row build), which two
    builds side by side would otherwise overwrite for each other. ``running`` (a set) holds the
    child while it runs, so that a caller can stop it. With ``checksum`` the child writes the
    result's SHA-256 to that file before it renames the result into place.
    """
    work = tempfile.mkdtemp(prefix="rwkv2rknn-build-")
    log_path = os.path.join(work, "toolkit.log")
    cmd = [sys.executable, "-m", "rwkv2rknn.passes.build", os.path.abspath(onnx_path),
           os.path.abspath(rknn_path), "--target", target, "--log", log_path]
    if verbose:
        cmd.append("--verbose")
    if rows:
        cmd += ["--rows", ",".join(str(r) for r in rows)]
    if checksum:
        cmd += ["--checksum", os.path.abspath(checksum)]
    env = dict(os.environ, TMPDIR=work, TMP=work, TEMP=work)
    try:
        proc = subprocess.Popen(cmd, stdout=None if verbose else subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, cwd=work, env=env)
        if running is not None:
            running.add(proc)
        tmp = partial_name(os.path.abspath(rknn_path), proc.pid)
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _stop(proc, tmp)
            return f"build took longer than {timeout:g} s"
        except BaseException:  # Ctrl-C or any other error here: leave no child and no partial file
            _stop(proc, tmp)
            raise
        finally:
            if running is not None:
                running.discard(proc)
        remove_quietly(tmp)  # nothing left when the child renamed it
        if proc.returncode == 0 and os.path.isfile(rknn_path) and os.path.getsize(rknn_path) > 0:
            return ""
        said = toolkit_reason(log_path)
        if proc.returncode < 0:
            why = f"the toolkit's process died ({signal.Signals(-proc.returncode).name})"
            return f"{why}; toolkit: {said}" if said else why
        lines = [ln for ln in (err or "").splitlines() if ln.strip()]
        last = said or (lines[-1].strip()[:160] if lines else "no message")
        return f"the toolkit's process exited with {proc.returncode} ({last})"
    finally:
        shutil.rmtree(work, ignore_errors=True)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def toolkit_reason(log_path: str) -> str:
    """The toolkit's last error in its log: the message of an 'E ...' record (for a traceback,
    its last line, the exception), or ''."""
    try:
        with open(log_path, errors="replace") as f:
            lines = [_ANSI.sub("", ln).rstrip() for ln in f]
    except OSError:
        return ""
    records = []
    for ln in lines:
        if re.match(r"^[DIWE] ", ln):
            records.append([ln])
        elif records and ln.strip():
            records[-1].append(ln)
    errors = [r for r in records if r[0].startswith("E ") and "rknn-toolkit2 version" not in r[0]]
    if not errors:
        return ""
    rec = errors[-1]
    body = [ln.strip() for ln in rec[1:] if ln.strip().strip("^~ ")]
    text = body[-1] if "Traceback" in rec[0] and body else rec[0][2:].strip()
    return text[:200]


def _stop(proc, tmp: str) -> None:
    try:
        proc.kill()
        proc.wait()
    finally:
        remove_quietly(tmp)


def clean_stale_partials(cache: str) -> None:
    """Remove partial files left by build children that died (their pid no longer runs)."""
    remove_stale(cache, ".partial-")


def _jobs(ctx: Context, todo, out_dir: str) -> int:
    """How many builds run side by side: the cores, as far as the free memory allows."""
    from rwkv2rknn import resources
    if ctx.options.build_jobs:
        return max(1, min(ctx.options.build_jobs, len(todo)))
    biggest = max((os.path.getsize(os.path.join(out_dir, "segments", s.name + ".onnx"))
                   for s in todo), default=0)
    return resources.build_jobs(biggest, len(todo))


class _Builder:
    """Builds one NPU segment (its T-row variant, or the per-token graph) through the cache."""

    def __init__(self, ctx: Context, out_dir: str, version: str):
        from rwkv2rknn.buildcache import BuildCache
        self.opts, self.out_dir, self.version = ctx.options, out_dir, version
        self.cache = BuildCache(os.path.join(cache_root(self.opts.cache_dir), "rknn"))
        self.running: set = set()
        self.stopping = False

    def fetch_or_build(self, onnx_path: str, key: str, dest: str, rows=()):
        """(status, reason): status 'cached' / 'built', or '' with the reason it failed."""
        cache = self.cache
        with cache.locked(key, lambda: self.stopping):
            digest, problem = cache.copy_to(key, dest)
            if digest:
                return "cached", ""
            reason = build_child(onnx_path, cache.entry(key), self.opts.target, self.opts.verbose,
                                 self.opts.build_timeout, rows, self.running, cache.sum_path(key))
            if reason:
                return "", reason
            if not cache.copy_to(key, dest)[0]:
                return "", "the built entry changed in the cache before it was copied"
            return (f"rebuilt (the cache entry had {problem})" if problem else "built"), ""

    def segment(self, seg: GraphSegment) -> str:
        opts, seg_dir = self.opts, os.path.join(self.out_dir, "segments")
        if seg.seq_model is not None and opts.prefill_rows:
            # the T-row variant for DECODE_ROWS and the prefill rows: one .rknn, weights once
            rows = tuple(sorted({DECODE_ROWS, *opts.prefill_rows}))
            seq_path = os.path.join(seg_dir, seg.name + ".seq.onnx")
            key = file_key(seq_path, opts.target, self.version, repr(rows).encode())
            status, reason = self.fetch_or_build(
                seq_path, key, os.path.join(seg_dir, seg.name + ".seq.rknn"), rows)
            if not reason:
                seg.seq_rknn = seg.rknn = f"segments/{seg.name}.seq.rknn"
                seg.seq_rows, seg.decode_rows, seg.cache_key = rows, DECODE_ROWS, key
                return status + " (decode and T rows)"
            seg.seq_fallback = reason  # the per-token graph alone; prefill token by token
        onnx_path = os.path.join(seg_dir, seg.name + ".onnx")
        key = file_key(onnx_path, opts.target, self.version)
        status, reason = self.fetch_or_build(onnx_path, key, os.path.join(seg_dir, seg.name + ".rknn"))
        if reason:
            if opts.strict:
                raise ToolkitError(f"building segment {seg.name} failed: {reason}",
                                   "drop --strict to let it fall back to the CPU")
            seg.device, seg.fallback = "cpu", reason
            return "failed, CPU fallback"
        seg.rknn = f"segments/{seg.name}.rknn"
        seg.cache_key = key
        return status + (", T-rows failed" if seg.seq_fallback else "")

    def stop(self) -> None:
        self.stopping = True
        for proc in list(self.running):
            try:
                proc.kill()
            except OSError:
                pass


def run(ctx: Context, out_dir: str,
        progress: Optional[Callable[[GraphSegment, str, int, int], None]] = None) -> None:
    """Build the NPU segments whose ONNX files are in ``out_dir``/segments, copying each .rknn
    beside its ONNX; ``progress(segment, status, i, n)`` after each (builds run side by side)."""
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    from rwkv2rknn.toolkit import require_toolkit

    version = require_toolkit()
    builder = _Builder(ctx, out_dir, version)
    clean_stale_partials(builder.cache.folder)
    todo = [seg for seg in ctx.segments if seg.device == "npu"]
    jobs = _jobs(ctx, todo, out_dir) if todo else 1
    counts = {"built": 0, "cached": 0, "failed": 0}
    t0, done = time.monotonic(), 0
    pool = ThreadPoolExecutor(max_workers=jobs)
    try:
        pending = {pool.submit(builder.segment, seg): seg for seg in todo}
        while pending:
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in finished:
                seg = pending.pop(fut)
                status = fut.result()  # raises ToolkitError under --strict
                done += 1
                first = status.split(",")[0].split(" ")[0]
                counts["failed" if first == "failed" else "cached" if first == "cached" else "built"] += 1
                if seg.fallback:
                    ctx.note(NAME, f"{seg.name}: build failed ({seg.fallback}); runs on the CPU")
                if progress:
                    progress(seg, status + _eta(t0, done, len(todo)), done, len(todo))
    except BaseException:
        builder.stop()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    ctx.note(NAME, f"{counts['built']} built, {counts['cached']} from the cache ({builder.cache.folder}), "
                   f"{counts['failed']} fell back to the CPU [rknn-toolkit2 {version}, target "
                   f"{ctx.options.target}, {jobs} build(s) at a time]")
    for s in todo:
        if s.seq_fallback:
            ctx.note(NAME, f"{s.name}: T-row build failed ({s.seq_fallback}); its prefill runs "
                           "token by token")


def _eta(t0: float, done: int, total: int) -> str:
    """' (eta 1:23)' from the time per segment so far; '' when all are done."""
    left = total - done
    if not left or not done:
        return ""
    secs = int((time.monotonic() - t0) / done * left)
    return f" (eta {secs // 60}:{secs % 60:02d})"


def _main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Build one ONNX segment into an .rknn (child process).")
    ap.add_argument("onnx")
    ap.add_argument("rknn")
    ap.add_argument("--target", default="rk3588")
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--checksum", default="", help="write the result's SHA-256 to this file first")
    ap.add_argument("--log", default="", help="append the toolkit's output to this file")
    ap.add_argument("--rows", default="", help="T-row variant: build one graph per row count (e.g. 16,32,64)")
    a = ap.parse_args(argv)
    from rwkv2rknn.errors import Rwkv2RknnError
    from rwkv2rknn.toolkit import build_in_process, dynamic_shapes
    tmp = partial_name(a.rknn, os.getpid())
    rows = [int(r) for r in a.rows.split(",") if r]
    try:
        rk = build_in_process(a.onnx, target=a.target, rknn_out=tmp, verbose=a.verbose, log_to=a.log,
                              float_dtype=os.environ.get("RWKV2RKNN_FLOAT_DTYPE", ""),
                              dynamic_input=dynamic_shapes(a.onnx, rows) if rows else None)
        rk.release()
        if not os.path.isfile(tmp) or os.path.getsize(tmp) == 0:
            print("rknn-toolkit2 wrote no .rknn", file=sys.stderr)
            return 1
        if a.checksum:
            from rwkv2rknn.buildcache import write_checksum
            write_checksum(tmp, a.checksum)
        os.replace(tmp, a.rknn)  # whole, or not there at all
        return 0
    except Rwkv2RknnError as e:
        print(str(e), file=sys.stderr)
        return 1
    finally:
        remove_quietly(tmp)


if __name__ == "__main__":
    sys.exit(_main())
