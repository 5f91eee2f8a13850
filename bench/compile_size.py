#!/usr/bin/env python
"""Compile time and peak memory of `rwkv2rknn compile` on a random RWKV-4 of a given size.

    python bench/compile_size.py                      # 430M-sized: 24 x 1024, vocab 50277, fp16 files
    python bench/compile_size.py --layers 4 --width 256 --vocab 1000

Exports the per-layer files (fp16, as the public files are), then runs the compile command in a
child process with a fresh build cache and samples the resident memory of it and its children
(the toolkit's build processes) every 0.2 s. Prints wall time and peak memory; a second compile
shows the cache at work.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

import psutil


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc] + proc.children(recursive=True):
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def timed_compile(model_dir, out_dir, cache, extra=()):
    env = dict(os.environ, RWKV2RKNN_CACHE=cache)
    cmd = [sys.executable, "-m", "rwkv2rknn", "compile", model_dir, "-o", out_dir, "--force", *extra]
    t0 = time.perf_counter()
    child = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ps = psutil.Process(child.pid)
    peak = 0
    while child.poll() is None:
        peak = max(peak, tree_rss(ps))
        time.sleep(0.2)
    out = child.stdout.read()
    return time.perf_counter() - t0, peak, child.returncode, out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=50277)
    ap.add_argument("--fp32", action="store_true", help="export fp32 files instead of fp16")
    ap.add_argument("--keep", default=None, help="work folder to keep (default: a temporary one)")
    a = ap.parse_args()
    from rwkv2rknn.models.checkpoint import random_checkpoint
    from rwkv2rknn.models.export import export

    work = a.keep or tempfile.mkdtemp(prefix="rwkv2rknn-compile-bench-")
    try:
        model_dir = os.path.join(work, "model")
        if not os.path.exists(os.path.join(model_dir, "head.onnx")):
            t0 = time.perf_counter()
            sd = random_checkpoint(layers=a.layers, width=a.width, vocab=a.vocab)
            export(sd, model_dir, fp32=a.fp32, force=True)
            del sd
            print(f"export ({'fp32' if a.fp32 else 'fp16'}): {time.perf_counter() - t0:.1f} s")
        cache = os.path.join(work, "cache")
        shutil.rmtree(cache, ignore_errors=True)
        for label in ("first compile (empty cache)", "second compile (cache)"):
            secs, peak, rc, out = timed_compile(model_dir, os.path.join(work, "art"), cache)
            print(f"{label}: {secs:.1f} s wall, peak memory {peak / 2**30:.2f} GiB, exit {rc}")
            if rc != 0:
                print(out[-2000:])
                return rc
        print("\n".join(out.strip().splitlines()[-4:]))
        return 0
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
