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

import time

from _rounds import parser, print_medians, timed_rounds, token_ids  # bench/_rounds.py
from rwkv2rknn.runtime.hybrid import HybridModel
from rwkv2rknn.runtime.ortshare import WeightStore


def main():
    args = parser(__doc__, 8).parse_args()
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
    ids = token_ids(next(iter(models.values())).vocab, args)
    states = {k: m.init_state() for k, m in models.items()}
    times = timed_rounds(
        {k: (lambda t, m=m, s=states[k]: m.step(t, s)) for k, m in models.items()}, ids, args
    )
    print_medians(times, "segment by segment, own prepacked weights", 44)
    print(models["fused, threads chosen as it runs"].execution())


if __name__ == "__main__":
    main()
