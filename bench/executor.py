#!/usr/bin/env python
"""The ways the executor can run one artifact's token steps on onnxruntime, timed in interleaved
rounds in one process (each round gives every way the same few tokens, so a changing load falls
on all of them alike): the fused graph (threads chosen as it runs, or fixed at 1), segment by
segment on the shared weights, and segment by segment with each session holding its own
prepacked weights (the executor before the weight store).

    python bench/executor.py ART [--busy 2] [--rounds 8]

ART: a compiled artifact (`rwkv2rknn compile ... --plan-only` is enough). Holds about 2x the
fp32 weights (the shared store once, the own-weights model once).
"""

import argparse
import statistics
import time

import numpy as np

from rwkv2rknn.runtime.hybrid import HybridModel
from rwkv2rknn.runtime.ortshare import WeightStore
from rwkv2rknn.tools.busy import BusyLoops, describe_load, load_average


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("artifact")
    ap.add_argument("--busy", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--per-round", type=int, default=3)
    args = ap.parse_args()
    store = WeightStore()
    ways = {
        "fused, threads chosen as it runs": dict(store=store),
        "fused, 1 thread": dict(store=store, threads=1),
        "segment by segment, shared weights": dict(store=store, fuse=False),
        "segment by segment, own prepacked weights": dict(share_weights=False, fuse=False),
    }
    models = {}
    for name, kw in ways.items():
        t0 = time.perf_counter()
        models[name] = HybridModel(args.artifact, backend="ort", **kw)
        print(f"loaded {name} in {time.perf_counter() - t0:.1f} s")
    vocab = next(iter(models.values())).vocab
    ids = [int(t) for t in np.random.default_rng(0).integers(0, vocab, 2 + args.rounds * args.per_round)]
    print(f"load average at the start: {describe_load(load_average())}; busy loops: {args.busy}")
    times = {k: [] for k in models}
    with BusyLoops(args.busy):
        states = {k: m.init_state() for k, m in models.items()}
        for k, m in models.items():
            for t in ids[:2]:
                m.step(t, states[k])
        for r in range(args.rounds):
            for k, m in models.items():
                for t in ids[2 + r * args.per_round : 2 + (r + 1) * args.per_round]:
                    t0 = time.perf_counter()
                    m.step(t, states[k])
                    times[k].append(1000 * (time.perf_counter() - t0))
        print(f"load average at the end: {describe_load(load_average())}")
    base = statistics.median(times["segment by segment, own prepacked weights"])
    for k, v in times.items():
        med = statistics.median(v)
        print(f"{k:<44} {med:8.1f} ms/token  {med / base:5.2f}x  (min {min(v):.1f}, max {max(v):.1f})")
    print(models["fused, threads chosen as it runs"].execution())


if __name__ == "__main__":
    main()
