#!/usr/bin/env python
"""The executor's own choice of threading ways against each way held fixed, over a long run:
the hybrid's token steps (``--backend ort``, the load watch and the measured choice on) and each
of its fused sessions alone, timed in interleaved rounds in one process (a changing load falls
on all alike). The chosen way keeps its state and its measurements across the rounds, as in a
chat; the line after the figures says which ways it ran and their medians.

    python bench/chooser.py ART [--busy 2] [--rounds 8] [--per-round 12]

ART: a compiled artifact (`rwkv2rknn compile ... --plan-only` is enough).
"""

import time

import numpy as np
from _rounds import parser, print_medians, timed_rounds, token_ids  # bench/_rounds.py

from rwkv2rknn.runtime.hybrid import HybridModel

CHOSEN = "chosen as it runs"


def main():
    ap = parser(__doc__, 8)
    ap.set_defaults(per_round=12)
    a = ap.parse_args()
    hyb = HybridModel(a.artifact, backend="ort", prepack=False)  # the store and its fused ways
    chooser = getattr(hyb, "_decode", None)
    if not hasattr(chooser, "steps"):
        raise SystemExit(f"{a.artifact}: its token steps are not fused, so there are no ways to choose")
    state = hyb.init_state()
    fixed = dict(chooser.steps)
    states = {k: np.zeros(hyb._offsets[-1], np.float32) for k in fixed}
    fns = {CHOSEN: lambda t: hyb.step(t, state)}
    fns.update({k: (lambda t, s=fixed[k], st=states[k]: s.step(t, st)) for k in fixed})
    clocks = {k: time.process_time for k in fns}
    cpu = {}
    try:
        times = timed_rounds(fns, token_ids(hyb.manifest.vocab, a), a, clocks=clocks, cpu=cpu)
        print_medians(times, CHOSEN, 26, cpu)
        print(hyb.execution())
    finally:
        hyb.close()


if __name__ == "__main__":
    main()
