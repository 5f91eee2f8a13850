"""build: every NPU segment becomes a ``.rknn`` for the target, in a child process, cached.

::

    segments/s001_npu_L0.onnx --(child: rknn-toolkit2 build)--> cache/<sha256>.rknn --> segments/s001_npu_L0.rknn
                                 '-- crash / refusal --> the segment falls back to the CPU (reported)

rknn-toolkit2 reports errors three ways (exceptions, return codes, and killing its own process),
so each build runs in a child process with a time limit. Results are cached by the SHA-256 of
the segment's ONNX bytes, the target and the toolkit version: an unchanged segment is never
rebuilt. Cache entries are written under a temporary name and renamed into place, so a killed
build or two compiles at once never leave a half entry. A failed build moves the segment to the
CPU and says so; with ``--strict`` it is an error.

Precondition: cut has run and the segment ONNX files are written in ``ctx.extra['out_dir']``.
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
from rwkv2rknn.ir import Context

NAME = "build"


def cache_root(explicit: Optional[str] = None) -> str:
    root = explicit or os.environ.get("RWKV2RKNN_CACHE")
    if not root:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(base, "rwkv2rknn")
    return root


def cache_key(onnx_bytes: bytes, target: str, toolkit: str) -> str:
    h = hashlib.sha256()
    for part in (target.encode(), b"\0", toolkit.encode(), b"\0", onnx_bytes):
        h.update(part)
    return h.hexdigest()


def build_child(onnx_path: str, rknn_path: str, target: str, verbose: bool,
                timeout: float) -> str:
    """Build in a child process; '' on success, else the reason it failed."""
    tmp = f"{rknn_path}.partial-{os.getpid()}"
    cmd = [sys.executable, "-m", "rwkv2rknn.passes.build", onnx_path, tmp, "--target", target]
    if verbose:
        cmd.append("--verbose")
    try:
        proc = subprocess.run(cmd, stdout=None if verbose else subprocess.DEVNULL,
                              stderr=subprocess.PIPE, timeout=timeout, text=True)
    except subprocess.TimeoutExpired:
        _unlink(tmp)
        return f"build took longer than {timeout:g} s"
    try:
        if proc.returncode == 0 and os.path.getsize(tmp) > 0:
            os.replace(tmp, rknn_path)
            return ""
    except OSError:
        pass
    _unlink(tmp)
    if proc.returncode < 0:
        return f"the toolkit's process died ({signal.Signals(-proc.returncode).name})"
    lines = [ln for ln in (proc.stderr or "").splitlines() if ln.strip()]
    last = lines[-1].strip()[:160] if lines else "no message"
    return f"the toolkit's process exited with {proc.returncode} ({last})"


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def run(ctx: Context, progress: Optional[Callable[[dict, str, int, int], None]] = None) -> None:
    from rwkv2rknn.runtime.rknn import toolkit_version

    out_dir = ctx.extra["out_dir"]
    opts = ctx.options
    version = toolkit_version()
    if not version:
        from rwkv2rknn.errors import MissingDependency
        from rwkv2rknn.runtime.rknn import TOOLKIT_INSTALL
        raise MissingDependency("building .rknn files needs rknn-toolkit2",
                                f"{TOOLKIT_INSTALL}; or compile with --plan-only")
    cache = os.path.join(cache_root(opts.cache_dir), "rknn")
    os.makedirs(cache, exist_ok=True)
    built = hits = failed = 0
    todo = [seg for seg in ctx.segments if seg["device"] == "npu"]
    for i, seg in enumerate(todo, 1):
        onnx_path = os.path.join(out_dir, "segments", seg["name"] + ".onnx")
        with open(onnx_path, "rb") as f:
            key = cache_key(f.read(), opts.target, version)
        entry = os.path.join(cache, key + ".rknn")
        if os.path.exists(entry):
            hits += 1
            status = "cached"
        else:
            reason = build_child(onnx_path, entry, opts.target, opts.verbose, opts.build_timeout)
            if reason:
                if opts.strict:
                    raise ToolkitError(f"building segment {seg['name']} failed: {reason}",
                                       "drop --strict to let it fall back to the CPU")
                seg["device"], seg["fallback"] = "cpu", reason
                failed += 1
                ctx.note(NAME, f"{seg['name']}: build failed ({reason}); runs on the CPU")
                if progress:
                    progress(seg, "failed, CPU fallback", i, len(todo))
                continue
            built += 1
            status = "built"
        dest = os.path.join(out_dir, "segments", seg["name"] + ".rknn")
        shutil.copyfile(entry, dest)
        seg["rknn"] = f"segments/{seg['name']}.rknn"
        seg["cache_key"] = key
        if progress:
            progress(seg, status, i, len(todo))
    ctx.note(NAME, f"{built} built, {hits} from the cache ({cache}), {failed} fell back to the CPU"
                   f" [rknn-toolkit2 {version}, target {opts.target}]")


def _main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Build one ONNX segment into an .rknn (child process).")
    ap.add_argument("onnx")
    ap.add_argument("rknn")
    ap.add_argument("--target", default="rk3588")
    ap.add_argument("--verbose", action="store_true")
    a = ap.parse_args(argv)
    from rwkv2rknn.runtime.rknn import build_in_process
    try:
        rk = build_in_process(a.onnx, target=a.target, rknn_out=a.rknn, verbose=a.verbose,
                              float_dtype=os.environ.get("RWKV2RKNN_FLOAT_DTYPE", ""))
    except ToolkitError as e:
        print(str(e), file=sys.stderr)
        return 1
    rk.release()
    return 0


if __name__ == "__main__":
    sys.exit(_main())
