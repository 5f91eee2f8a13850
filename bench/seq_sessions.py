#!/usr/bin/env python
"""A way the ``ort`` backend does not take (yet): every NPU-planned segment's token steps on its
rows-form T-row graph (``.seq.onnx``, a symbolic row count) run with one row, in a session that
owns and prepacks its weights, so that one session per segment could serve both token steps and
prompts at one copy of the weights. Against the hybrid's fused token step (its weight store, no
prepacking), timed in interleaved rounds in one process; the logits of both are compared, and
the memory held after the steps is printed (the "own" model is made after the store, which is
then let go, so its peak is not its own).

    python bench/seq_sessions.py ART [--busy 2] [--rounds 6] [--per-round 3]

ART: a compiled artifact whose T-row graphs are in rows form (`--plan-only`); a columns-form
graph (an artifact built for the NPU) takes its weight as the left operand, which onnxruntime
does not prepack, and is refused here. RWKV-7's T-row graphs take the token step's tensors as
they are; RWKV-4's do not all (a [1, C] row where the T-row graph wants [C]): such an artifact
stops with onnxruntime's message.
"""

import ctypes
import gc
import os

import numpy as np
from _rounds import parser, print_medians, timed_rounds, token_ids  # bench/_rounds.py
from memory import proc_status  # bench/memory.py

from rwkv2rknn.runtime.hybrid import HybridModel
from rwkv2rknn.runtime.ort import OrtRunner
from rwkv2rknn.runtime.ortshare import WeightStore
from rwkv2rknn.tools.backtest import weight_bytes


def own_sessions(art: str) -> HybridModel:
    """The artifact run segment by segment, every segment in a session of its own file (the
    T-row graph where there is one), weights owned and prepacked by onnxruntime."""
    model = HybridModel(art, backend="ort", fuse=False)
    for i, seg in enumerate(model.manifest.segments):
        if seg.seq.onnx and seg.seq.layout == "columns":
            raise SystemExit(f"{seg.name}: its T-row graph is in columns form (see the docstring)")
        path = os.path.join(art, seg.seq.onnx or seg.token.onnx)
        old = model.runners[i]
        model.runners[i] = OrtRunner(path, seg.name, 0 if seg.seq.onnx else model.threads_for(seg))
        old.close()
    model._store = WeightStore()  # the store's arrays go: nothing reads them now
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return model


def main():
    ap = parser(__doc__, 6)
    a = ap.parse_args()
    own = own_sessions(a.artifact)
    weights = weight_bytes(a.artifact, own.manifest)
    print(
        f"own prepacked sessions: {proc_status()['VmRSS'] / 2**30:.2f} GiB resident "
        f"({weights / 2**30:.2f} GiB of segment files)"
    )
    fused = HybridModel(a.artifact, backend="ort")
    states = {"fused (weight store)": fused.init_state(), "own prepacked sessions": own.init_state()}
    models = {"fused (weight store)": fused, "own prepacked sessions": own}
    last = {}

    def stepper(k):
        def step(t):
            last[k] = models[k].step(t, states[k])

        return step

    times = timed_rounds({k: stepper(k) for k in models}, token_ids(fused.manifest.vocab, a), a)
    print_medians(times, "fused (weight store)", 24)
    a_, b_ = (np.asarray(last[k]) for k in models)
    print(
        f"logits after the same tokens: max abs difference {np.abs(a_ - b_).max():.2e} (max {np.abs(a_).max():.2f})"
    )
    fused.close()
    own.close()


if __name__ == "__main__":
    main()
