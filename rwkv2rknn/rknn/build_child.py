"""The build pass's child process: one ONNX file in, one ``.rknn`` out, rknn-toolkit2 at arm's length.

::

    parent: build_child(onnx, rknn) --spawn--> python -m rwkv2rknn.rknn.build_child onnx rknn
                                                 (own cwd and $TMPDIR; the toolkit's log to a file)
            <-- '' or the reason, with the toolkit's own error line

rknn-toolkit2 reports errors three ways (exceptions, return codes, and killing its own process),
so every build runs here, in a child process with a time limit.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from typing import Optional

import numpy as np

from rwkv2rknn.errors import ToolkitError
from rwkv2rknn.fileio import remove_quietly, remove_stale, scratch_prefix


def partial_name(rknn_path: str, pid: int) -> str:
    """Where the build child with this pid writes before it renames the result to ``rknn_path``."""
    return f"{rknn_path}.partial-{pid}"


def child_env(**extra) -> dict:
    """The environment of a build child: this process's and ``extra``, its heap on huge pages
    (``resources.huge_page_env``: the toolkit copies a segment's weights many times)."""
    from rwkv2rknn.compiler.resources import huge_page_env

    return huge_page_env(dict(os.environ, **extra))


def build_child(
    onnx_path: str,
    rknn_path: str,
    target: str,
    verbose: bool,
    timeout: float,
    rows=(),
    precision: str = "fp16",
    floating=(),
    dataset: str = "",
    holdout: str = "",
    holdout_out: str = "",
    running: Optional[set] = None,
    checksum: str = "",
    worker=None,
) -> str:
    """Build in a child process; '' on success, else the reason it failed (with the toolkit's
    own error line when it wrote one).

    The child writes ``partial_name(rknn_path, its pid)`` and renames it to ``rknn_path`` itself,
    so the entry is whole even if this process is killed while the child works. If the child
    fails, times out or this process is interrupted, the child is stopped and its partial file
    removed. A quantised build (``precision``, ``dataset``) also runs the ``holdout`` dataset's
    samples in the simulator and saves the outputs to ``holdout_out`` (.npz, sample-major);
    ``floating``: its tensor groups kept float16 (``toolkit.FLOAT_TENSORS``, a per-token build).
    Each child works in its own empty folder (its cwd and $TMPDIR): rknn-toolkit2 writes
    fixed-name scratch files there (``check_dynshape0.onnx`` ... for a T-row build), which two
    builds side by side would otherwise overwrite for each other. ``running`` (a set) holds the
    child while it runs, so that a caller can stop it. With ``checksum`` the child writes the
    result's SHA-256 to that file before it renames the result into place. With ``worker``
    (an fp16 build) the build runs in that kept child instead of a new one (``Worker``).
    The ONNX file is built as written; a columns form (``rwkv2rknn.rknn.columns``, marked in the
    file) takes its dataset's rows turned to columns, and its held-out outputs come back as rows.
    """
    absp = os.path.abspath
    work = tempfile.mkdtemp(prefix=scratch_prefix("build"))
    log_path = os.path.join(work, "toolkit.log")
    cmd = [
        sys.executable,
        "-m",
        "rwkv2rknn.rknn.build_child",
        absp(onnx_path),
        absp(rknn_path),
        "--target",
        target,
        "--log",
        log_path,
    ]
    if verbose:
        cmd.append("--verbose")
    if rows:
        cmd += ["--rows", ",".join(str(r) for r in rows)]
    if precision != "fp16":
        cmd += ["--precision", precision, "--dataset", absp(dataset)]
        if floating:
            cmd += ["--float", ",".join(floating)]
    if holdout:
        cmd += ["--holdout", absp(holdout), "--holdout-out", absp(holdout_out)]
    if checksum:
        cmd += ["--checksum", absp(checksum)]
    env = child_env(TMPDIR=work, TMP=work, TEMP=work)
    try:
        if worker is not None and precision == "fp16" and not holdout:
            returncode, err = worker.run(cmd[3:], rknn_path, timeout, running)
        else:
            returncode, err = _once(cmd, rknn_path, timeout, verbose, work, env, running)
        if returncode is None:
            return err  # the time limit
        if returncode == 0 and os.path.isfile(rknn_path) and os.path.getsize(rknn_path) > 0:
            return ""
        said = toolkit_reason(log_path)
        if returncode < 0:
            why = f"the toolkit's process died ({signal.Signals(-returncode).name})"
            return f"{why}; toolkit: {said}" if said else why
        if returncode == 0:
            return "the toolkit's process exited without writing the .rknn"
        # the child's last line is the toolkit's error; Python's warnings are not the reason
        lines = [ln for ln in (err or "").splitlines() if ln.strip() and "Warning: " not in ln]
        last = lines[-1].strip()[:240] if lines else ""
        if said and said not in last:  # the child's own line and the toolkit log's last error
            last = f"{last}; toolkit: {said}" if last else said
        return f"the toolkit's process exited with {returncode} ({last or 'no message'})"
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _once(cmd, rknn_path: str, timeout: float, verbose: bool, work: str, env, running):
    """One build in a new child: (return code, its stderr), or (None, why) past the time limit."""
    proc = subprocess.Popen(
        cmd,
        stdout=None if verbose else subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=work,
        env=env,
    )
    if running is not None:
        running.add(proc)
    tmp = partial_name(os.path.abspath(rknn_path), proc.pid)
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _stop(proc, tmp)
        return None, f"build took longer than {timeout:g} s"
    except BaseException:  # Ctrl-C or any other error here: leave no child and no partial file
        _stop(proc, tmp)
        raise
    finally:
        if running is not None:
            running.discard(proc)
    remove_quietly(tmp)  # nothing left when the child renamed it
    return proc.returncode, err


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


def _main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Build one ONNX segment into an .rknn (child process).")
    ap.add_argument("onnx")
    ap.add_argument("rknn")
    ap.add_argument("--target", default="rk3588")
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--rows", default="", help="T-row variant: build one graph per row count (e.g. 16,32,64)")
    ap.add_argument("--checksum", default="", help="write the result's SHA-256 to this file first")
    ap.add_argument("--log", default="", help="append the toolkit's output to this file")
    ap.add_argument("--precision", default="fp16")
    ap.add_argument("--dataset", default="", help="calibration dataset of a quantised build")
    ap.add_argument("--float", default="", help="tensor groups kept float16 in a quantised build")
    ap.add_argument("--holdout", default="", help="run these samples in the simulator after the build")
    ap.add_argument("--holdout-out", default="", help="... and save the outputs here (.npz)")
    a = ap.parse_args(argv)
    from rwkv2rknn.errors import Rwkv2RknnError
    from rwkv2rknn.rknn.toolkit import build_in_process

    tmp = partial_name(a.rknn, os.getpid())
    rows = [int(r) for r in a.rows.split(",") if r]
    try:
        rk = build_in_process(
            a.onnx,
            target=a.target,
            rknn_out=tmp,
            verbose=a.verbose,
            float_dtype=os.environ.get("RWKV2RKNN_FLOAT_DTYPE", ""),
            rows=rows,
            precision=a.precision,
            dataset=a.dataset,
            settings={"float": a.float} if a.float else None,
            runtime=bool(a.holdout),
            log_to=a.log,
        )
        try:
            if a.holdout:
                from rwkv2rknn.rknn.columns import in_columns

                _run_holdout(rk, a.holdout, a.holdout_out, in_columns(a.onnx))
        finally:
            rk.release()
        if not os.path.isfile(tmp) or os.path.getsize(tmp) == 0:
            print("rknn-toolkit2 wrote no .rknn", file=sys.stderr)
            return 1
        if a.checksum:
            from rwkv2rknn.rknn.buildcache import write_checksum

            write_checksum(tmp, a.checksum)
        os.replace(tmp, a.rknn)  # whole, or not there at all
        return 0
    except Rwkv2RknnError as e:
        print(e.problem, file=sys.stderr)  # the reason; the fix is the fallback itself
        return 1
    finally:
        remove_quietly(tmp)


def _run_holdout(rk, dataset: str, out: str, columns: bool = False) -> None:
    """The simulator's outputs for every sample of ``dataset``, saved sample-major to ``out``
    (``columns``: the build takes and gives columns; inputs and outputs are turned here)."""
    import contextlib
    import io as _io

    from rwkv2rknn.rknn.calibrate import read_dataset
    from rwkv2rknn.rknn.columns import to_cols

    flat = []
    for sample in read_dataset(dataset):
        args = [np.ascontiguousarray(to_cols(x) if columns else x, np.float32) for x in sample]
        with contextlib.redirect_stdout(_io.StringIO()):
            outs = rk.inference(inputs=args)
        if outs is None:
            raise ToolkitError("the simulator ran no held-out sample", "run with --verbose")
        t = max(x.shape[0] for x in sample if np.ndim(x) == 2) if columns else 0
        flat += [
            np.asarray(o, np.float32).reshape(-1, t).T if columns else np.asarray(o, np.float32) for o in outs
        ]
    with open(out, "wb") as f:
        np.savez(f, *flat)


if __name__ == "__main__":
    sys.exit(_main())
