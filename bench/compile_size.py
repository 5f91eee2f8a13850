#!/usr/bin/env python
"""Compile time and peak memory of `rwkv2rknn compile` on a random RWKV-4 (or RWKV-7) of a given size.

    python bench/compile_size.py                      # 430M-sized: 24 x 1024, vocab 50277, fp16 files
    python bench/compile_size.py --layers 4 --width 256 --vocab 1000
    python bench/compile_size.py --width 2048 --plan-only --once   # 1.5B-sized, plan only
    python bench/compile_size.py --table 2,6,12,24 --plan-only      # peak memory against depth
    python bench/compile_size.py --version 7 --width 2048 --vocab 65536 --plan-only --once  # RWKV-7 1.5B-sized

Exports the per-layer files (fp16, as the public files are), then runs the compile command in a
child process with a fresh build cache and samples the resident memory of it and its children
(the toolkit's build processes) every 0.2 s. Prints wall time and peak memory; a second compile
shows the cache at work. The random model is made cheaply: one random layer, shared by every
layer of the state dict (the files are as large as a real model's; the export holds one layer,
the embedding and the head). Extra compile options follow ``--``.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

from rwkv2rknn.compiler.resources import tree_rss


def timed_compile(model_dir, out_dir, cache, extra=()):
    env = dict(os.environ, RWKV2RKNN_CACHE=cache)
    cmd = [sys.executable, "-m", "rwkv2rknn", "compile", model_dir, "-o", out_dir, "--force", *extra]
    t0, cpu0 = time.perf_counter(), _children_cpu()
    child = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak, loads = 0, []
    while child.poll() is None:
        peak = max(peak, tree_rss(child.pid))
        loads.append(os.getloadavg()[0])
        time.sleep(0.2)
    out = child.stdout.read()
    load = (sum(loads) / len(loads)) if loads else os.getloadavg()[0]  # the machine's, mean
    return time.perf_counter() - t0, peak, child.returncode, out, load, _children_cpu() - cpu0


def _children_cpu() -> float:
    """CPU seconds (user + system) of the finished children and their waited-for descendants
    (the compile and its build processes), which a loaded machine changes less than wall time."""
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


# RWKV-7's LoRA widths at width 2048 (the official 1.5B checkpoint's)
V7_LORA = {"w": 96, "a": 96, "v": 64, "g": 256}


def make_model(model_dir, layers, width, vocab, fp32=False, version="4", head_size=64, one_file=False):
    """Per-layer files in ``model_dir`` (or, ``one_file``, ``model_dir``/model.onnx)."""
    from rwkv2rknn.models.export import export

    sd = make_state_dict(layers, width, vocab, version, head_size)
    if one_file:
        os.makedirs(model_dir, exist_ok=True)
        export(sd, os.path.join(model_dir, "model.onnx"), fp32=fp32, force=True)
    else:
        export(sd, model_dir, fp32=fp32, force=True)


def make_state_dict(layers, width, vocab, version="4", head_size=64):
    """A random checkpoint of that shape, cheaply: one random layer (two for RWKV-7, whose
    layer 0 differs) whose arrays every later layer shares."""
    from rwkv2rknn.models.checkpoint import random_checkpoint, random_rwkv7

    if version == "7":  # layer 0 has no v LoRA: two random layers, the second repeated
        one, src = (
            random_rwkv7(layers=min(layers, 2), width=width, vocab=vocab, head_size=head_size, lora=V7_LORA),
            1,
        )
    else:
        one, src = random_checkpoint(layers=1, width=width, vocab=vocab), 0
    sd = dict(one)
    for i in range(src + 1, layers):  # every later layer the same arrays: no copies
        for k, v in one.items():
            if k.startswith(f"blocks.{src}.") and ".ln0." not in k:
                sd[k.replace(f"blocks.{src}.", f"blocks.{i}.", 1)] = v
    return sd


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=50277)
    ap.add_argument("--fp32", action="store_true", help="export fp32 files instead of fp16")
    ap.add_argument(
        "--version",
        choices=("4", "7"),
        default="4",
        help="RWKV-4 (default) or RWKV-7 (head size --head-size, LoRA as the 1.5B's)",
    )
    ap.add_argument("--head-size", type=int, default=64)
    ap.add_argument(
        "--one-file", action="store_true", help="export one whole-model .onnx instead of per-layer files"
    )
    ap.add_argument("--keep", default=None, help="work folder to keep (default: a temporary one)")
    ap.add_argument("--plan-only", action="store_true", help="compile with --plan-only")
    ap.add_argument("--once", action="store_true", help="one compile (no second, cached one)")
    ap.add_argument("--table", default="", help="layer counts (e.g. 2,6,12,24): one compile each")
    ap.add_argument("extra", nargs="*", help="more compile options (after --)")
    a = ap.parse_args()
    extra = (["--plan-only"] if a.plan_only else []) + a.extra
    work = a.keep or tempfile.mkdtemp(prefix="rwkv2rknn-compile-bench-")
    try:
        if a.table:
            print("| layers | fp16 files | wall time | peak memory (process tree) |\n|---|---|---|---|")
            for n in [int(x) for x in a.table.split(",")]:
                model_dir = os.path.join(work, f"model-{n}")
                make_model(model_dir, n, a.width, a.vocab, a.fp32, a.version, a.head_size)
                size = sum(os.path.getsize(os.path.join(model_dir, f)) for f in os.listdir(model_dir))
                secs, peak, rc, out, _, _ = timed_compile(
                    model_dir, os.path.join(work, "art"), os.path.join(work, "cache"), extra
                )
                print(
                    f"| {n} | {size / 2**30:.2f} GiB | {secs:.1f} s | {peak / 2**30:.2f} GiB |"
                    + ("" if rc == 0 else f" exit {rc}: {out.strip().splitlines()[-1]}"),
                    flush=True,
                )
                shutil.rmtree(model_dir, ignore_errors=True)
            return 0
        model_dir = os.path.join(work, "model")
        source = os.path.join(model_dir, "model.onnx") if a.one_file else model_dir
        if not os.path.exists(os.path.join(model_dir, "model.onnx" if a.one_file else "head.onnx")):
            t0 = time.perf_counter()
            make_model(model_dir, a.layers, a.width, a.vocab, a.fp32, a.version, a.head_size, a.one_file)
            print(
                f"export ({'fp32' if a.fp32 else 'fp16'}{', one file' if a.one_file else ''}): "
                f"{time.perf_counter() - t0:.1f} s",
                flush=True,
            )
        if a.one_file:
            print(f"file: {os.path.getsize(source) / 2**30:.2f} GiB", flush=True)
        cache = os.path.join(work, "cache")
        shutil.rmtree(cache, ignore_errors=True)
        labels = ("first compile (empty cache)", "second compile (cache)")
        for label in labels[:1] if a.once else labels:
            secs, peak, rc, out, load, cpu = timed_compile(source, os.path.join(work, "art"), cache, extra)
            print(
                f"{label}: {secs:.1f} s wall, {cpu:.1f} s CPU, peak memory {peak / 2**30:.2f} GiB, exit {rc} "
                f"(machine load average {load:.1f} on {os.cpu_count()} cores)",
                flush=True,
            )
            print(
                "\n".join(
                    ln
                    for ln in out.splitlines()
                    if ln.strip().startswith(("build: ", "warning:", "range trace", "validate: "))
                ),
                flush=True,
            )
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
