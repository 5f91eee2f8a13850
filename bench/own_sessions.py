#!/usr/bin/env python
"""The two ways the ``ort`` backend loads an artifact, token steps timed in interleaved rounds in
one process, and a prompt fed to each:

- ``own sessions`` (the default for large artifacts): one session per segment that owns and
  prepacks its weights, a segment's T-row graph serving its token steps (one row) and its
  prompts;
- ``fused, weight store`` (``HybridModel(..., prepack=False)``): the weights held once, unpacked,
  in a store every session reads, token steps in one fused graph on bound buffers, the way that
  runs them chosen as they run.

    python bench/own_sessions.py ART [--busy 2] [--rounds 6] [--per-round 4] [--prompt 64]
                                 [--plain-pool]

``--plain-pool``: a third, own sessions whose pools hand out their work in one block a thread
(the default own sessions' pools hand it out in small blocks, ``session.dynamic_block_base`` 1).
"""

import time

import numpy as np
from _rounds import parser, print_medians, timed_rounds, token_ids  # bench/_rounds.py

from rwkv2rknn.runtime import hybrid
from rwkv2rknn.runtime.hybrid import HybridModel

OWN, STORE = "own sessions", "fused, weight store"


def main():
    ap = parser(__doc__, 6)
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens fed to each (0: none)")
    ap.add_argument("--plain-pool", action="store_true", help="also own sessions on plain pools")
    a = ap.parse_args()
    models = {OWN: HybridModel(a.artifact, backend="ort", prepack=True)}
    if a.plain_pool:
        kept, hybrid.OWN_POOL_CONFIG = hybrid.OWN_POOL_CONFIG, {}
        models[OWN + ", plain pool"] = HybridModel(a.artifact, backend="ort", prepack=True)
        hybrid.OWN_POOL_CONFIG = kept
    models[STORE] = HybridModel(a.artifact, backend="ort", prepack=False)
    for k, m in models.items():
        print(f"{k}: {m.execution()}")
    ids = token_ids(models[OWN].manifest.vocab, a)
    if a.prompt:
        prompt = [int(t) for t in np.random.default_rng(1).integers(0, models[OWN].manifest.vocab, a.prompt)]
        for k, m in models.items():
            m.prefill(prompt[:2], m.init_state())  # the T-row sessions' first run
            t0 = time.perf_counter()
            m.prefill(prompt, m.init_state(), last_only=True)
            print(f"{k}: a {a.prompt}-token prompt at {a.prompt / (time.perf_counter() - t0):.1f} tokens/s")
    states = {k: m.init_state() for k, m in models.items()}
    last = {}

    def stepper(k):
        def step(t):
            last[k] = models[k].step(t, states[k])

        return step

    times = timed_rounds({k: stepper(k) for k in models}, ids, a)
    print_medians(times, STORE, 24)
    a_, b_ = (np.asarray(last[k]) for k in (OWN, STORE))
    print(
        f"logits after the same tokens: max abs difference {np.abs(a_ - b_).max():.2e} (max {np.abs(a_).max():.2f})"
    )
    for m in models.values():
        m.close()


if __name__ == "__main__":
    main()
