#!/usr/bin/env python
"""A cached compile's cost: wall and CPU time of `rwkv2rknn compile` when every .rknn is already in
the build cache, for this source tree and, optionally, other trees (a git worktree of another
commit), in interleaved rounds on one model and one cache.

    python bench/cached_compile.py --layers 4 --width 1024 --vocab 1000 --rounds 3
    python bench/cached_compile.py --layers 4 --width 1024 --vocab 1000 --other /tmp/base-tree

Makes a random RWKV-4 (as bench/compile_size.py does), compiles it once to fill a fresh cache,
then times --rounds cached compiles of each tree in turn (a child process each; CPU time is the
child's user + system, its build processes included), printing every run with the machine's load
average and the medians, and the part of it the compile's `columns` step took (its calls of
``rwkv2rknn.rknn.columns.apply``, timed inside the child). Each tree's compile runs with PYTHONPATH
set to it, so the trees share this interpreter and its packages; its heap is on huge pages, as
the `rwkv2rknn` command starts itself.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child(record: str, argv) -> None:
    """The compile command in this process, its columns step timed into the file ``record``."""
    from rwkv2rknn.rknn import columns

    real, spent = columns.apply, [0.0, 0.0]

    def timed(*a, **k):
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            return real(*a, **k)
        finally:
            spent[0] += time.perf_counter() - t0
            spent[1] += time.process_time() - c0

    columns.apply = timed
    sys.argv = ["rwkv2rknn", *argv]
    from rwkv2rknn.cli import main as cli_main

    try:
        cli_main()
    finally:
        with open(record, "w") as f:
            json.dump({"wall": spent[0], "cpu": spent[1]}, f)


def compile_once(tree, model_dir, out_dir, cache):
    from rwkv2rknn.compiler.resources import huge_page_env

    env = huge_page_env(dict(os.environ, PYTHONPATH=tree))
    record = os.path.join(os.path.dirname(out_dir), "columns-step.json")
    args = ["compile", model_dir, "-o", out_dir, "--force", "--cache-dir", cache]
    cmd = [sys.executable, os.path.abspath(__file__), "--child", record, *args]
    load0 = os.getloadavg()[0]
    r0 = os.times()
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - t0
    r1 = os.times()
    cpu = (r1.children_user - r0.children_user) + (r1.children_system - r0.children_system)
    if done.returncode:
        raise SystemExit(f"compile failed in {tree}:\n{done.stdout[-2000:]}")
    cached = [ln.strip() for ln in done.stdout.splitlines() if ln.strip().startswith("build: ")][:1]
    with open(record) as f:
        step = json.load(f)
    return wall, cpu, (load0 + os.getloadavg()[0]) / 2, cached, step


def main():
    if sys.argv[1:2] == ["--child"]:
        return child(sys.argv[2], sys.argv[3:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--other", action="append", default=[], help="another source tree to time beside this one"
    )
    ap.add_argument("--keep", default=None, help="work folder to keep (default: a temporary one)")
    a = ap.parse_args()
    sys.path.insert(0, os.path.join(HERE, "bench"))
    from compile_size import make_model

    work = a.keep or tempfile.mkdtemp(prefix="rwkv2rknn-cached-bench-")
    trees = [HERE] + [os.path.abspath(t) for t in a.other]
    try:
        model, cache = os.path.join(work, "model"), os.path.join(work, "cache")
        if not os.path.exists(os.path.join(model, "head.onnx")):
            make_model(model, a.layers, a.width, a.vocab)
        wall, cpu, load, _, _ = compile_once(HERE, model, os.path.join(work, "art"), cache)
        print(f"filling the cache: {wall:.1f} s wall, {cpu:.1f} s CPU (load {load:.1f})", flush=True)
        got = {t: [] for t in trees}
        for r in range(a.rounds):
            for t in trees:
                wall, cpu, load, cached, step = compile_once(t, model, os.path.join(work, "art"), cache)
                got[t].append((wall, cpu, step["wall"], step["cpu"]))
                print(
                    f"round {r + 1} {t}: {wall:.1f} s wall, {cpu:.1f} s CPU; columns step "
                    f"{step['wall']:.2f} s wall, {step['cpu']:.2f} s CPU (load {load:.1f}) {cached}",
                    flush=True,
                )
        for t in trees:
            w, c, sw, sc = (statistics.median(x[k] for x in got[t]) for k in range(4))
            print(
                f"median {t}: {w:.1f} s wall, {c:.1f} s CPU; columns step {sw:.2f} s wall, {sc:.2f} s CPU",
                flush=True,
            )
        return 0
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
