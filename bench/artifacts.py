#!/usr/bin/env python
"""The hybrid executor's token steps on several artifacts of one model, timed in interleaved
rounds in one process: e.g. one checkpoint exported and compiled before and after a change to
its graph (each artifact holds its own weights, so the process holds each model's once). Before
the rounds, each artifact's CPU segments are counted: ops per token, and Reshapes among them.

    python bench/artifacts.py BEFORE_ART AFTER_ART [--busy 2] [--rounds 8] [--per-round 3]
    python bench/artifacts.py BEFORE_ART AFTER_ART --cpu-only [--threads 1]

The first artifact is the base of the ratios. The artifacts must share a vocabulary (the same
token ids are fed to each). ``--cpu-only``: instead of whole token steps, time only the CPU
segments (for RWKV-5.2/6/7 the wkv steps), each an onnxruntime session of its own on
``--threads`` intra-op threads, fed seeded random inputs of their shapes, all of them in turn
as one "token": what a change to the recurrence's graph saves, without the weight streaming
around it.
"""

import argparse
import collections
import json
import os
import time

from _rounds import print_medians, timed_rounds, token_ids  # bench/_rounds.py
from rwkv2rknn.runtime.hybrid import HybridModel


def cpu_ops(art: str) -> collections.Counter:
    """Op types of the artifact's CPU segments' token graphs, summed."""
    import onnx

    with open(os.path.join(art, "manifest.json")) as f:
        manifest = json.load(f)
    ops = collections.Counter()
    for seg in manifest["segments"]:
        if seg.get("backend") == "cpu" and seg.get("onnx"):
            m = onnx.load(os.path.join(art, seg["onnx"]), load_external_data=False)
            ops.update(n.op_type for n in m.graph.node)
    return ops


def cpu_step(art: str, threads: int):
    """A function running every CPU segment of ``art`` once, in order, on random inputs."""
    import numpy as np
    import onnxruntime as ort

    with open(os.path.join(art, "manifest.json")) as f:
        manifest = json.load(f)
    rng = np.random.default_rng(0)
    runs = []
    for seg in manifest["segments"]:
        if seg.get("backend") != "cpu" or not seg.get("onnx"):
            continue
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        sess = ort.InferenceSession(os.path.join(art, seg["onnx"]), opts, providers=["CPUExecutionProvider"])
        feed = {}
        for i in sess.get_inputs():
            shape = [d if isinstance(d, int) else 1 for d in i.shape]
            dtype = np.float32 if "float" in i.type else np.int32
            feed[i.name] = (
                (0.1 * rng.standard_normal(shape)).astype(dtype)
                if dtype is np.float32
                else np.zeros(shape, dtype)
            )
        runs.append((sess, feed))

    def step(_token):
        for sess, feed in runs:
            sess.run(None, feed)

    return step


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifacts", nargs="+")
    ap.add_argument("--busy", type=int, default=0, help="single-core busy loops beside the rounds")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--per-round", type=int, default=3, help="tokens each artifact steps in a round")
    ap.add_argument("--cpu-only", action="store_true", help="time only the CPU segments (see above)")
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="intra-op threads (default: as the executor chooses; --cpu-only: 1)",
    )
    args = ap.parse_args()
    names = [
        f"{i}: {os.path.basename(os.path.dirname(os.path.abspath(a)))}" for i, a in enumerate(args.artifacts)
    ]
    models = {}
    for name, art in zip(names, args.artifacts):
        ops = cpu_ops(art)
        print(
            f"{name}: CPU segments {sum(ops.values())} ops, {ops['Reshape']} Reshape, "
            f"{ops['MatMul']} MatMul, {ops['Transpose']} Transpose"
        )
        if args.cpu_only:
            models[name] = cpu_step(art, args.threads or 1)
            continue
        t0 = time.perf_counter()
        models[name] = HybridModel(art, backend="ort", threads=args.threads)
        print(f"  loaded in {time.perf_counter() - t0:.1f} s; {models[name].execution()}")
    if args.cpu_only:
        steps, ids = models, token_ids(2, args)
    else:
        ids = token_ids(next(iter(models.values())).vocab, args)
        states = {k: m.init_state() for k, m in models.items()}
        steps = {k: (lambda t, m=m, s=states[k]: m.step(t, s)) for k, m in models.items()}
    times = timed_rounds(steps, ids, args)
    print_medians(times, names[0], max(len(n) for n in names) + 2)
    if not args.cpu_only:
        for name, m in models.items():
            print(f"{name}: {m.execution()}")


if __name__ == "__main__":
    main()
