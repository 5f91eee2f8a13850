#!/usr/bin/env python
"""The fused token step of an artifact under onnxruntime's threading options, timed in
interleaved rounds in one process (a changing load falls on all alike). Every way is a session
of the same fused graph on one weight store (prepacked ways hold their own packed copy).

    python bench/fused_threads.py ART [--busy 2] [--ways 1,2,2dyn1,2spin,2prepack]

A way: the intra-op threads, then any of ``spin`` (the pool spins), ``prepack`` (MatMul weights
prepacked) and ``dynN`` (``session.dynamic_block_base`` N). ART: a compiled artifact
(`rwkv2rknn compile ... --plan-only` is enough).
"""

import argparse
import os
import re
import shutil
import statistics
import tempfile
import time

import numpy as np
import onnxruntime as ort

from rwkv2rknn.runtime.hybrid import load_manifest
from rwkv2rknn.runtime.ortshare import STUB_FILE, BoundStep, WeightStore, fuse
from rwkv2rknn.tools.busy import BusyLoops, describe_load, load_average


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("artifact")
    ap.add_argument("--busy", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--per-round", type=int, default=3)
    ap.add_argument("--ways", default="1,2,2dyn1")
    a = ap.parse_args()
    m = load_manifest(a.artifact)
    store = WeightStore()
    stubs, names = [], set()
    for seg in m.segments:
        stub, used = store.strip(os.path.join(a.artifact, seg.token.onnx))
        stubs.append(stub)
        names.update(used)
    keep = {s.output for s in m.state} | {m.logits_output}
    width = int(m.model.get("width"))
    offsets = [int(x) for x in np.cumsum([0] + [int(np.prod(s.dims(width))) for s in m.state])]
    folder = tempfile.mkdtemp()
    open(os.path.join(folder, STUB_FILE), "wb").close()
    path = os.path.join(folder, "decode.onnx")
    with open(path, "wb") as f:
        f.write(fuse(stubs, keep, "decode"))

    def session(way):
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.intra_op_num_threads = int(re.match(r"\d+", way).group())
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if "spin" in way else "0")
        if "prepack" not in way:
            so.add_session_config_entry("session.disable_prepacking", "1")
        dyn = re.search(r"dyn(\d+)", way)
        if dyn:
            so.add_session_config_entry("session.dynamic_block_base", dyn.group(1))
        for n in names:
            so.add_initializer(n, store.values[n])
        return ort.InferenceSession(path, sess_options=so, providers=["CPUExecutionProvider"])

    slots = [(s.input, s.output) for s in m.state]
    steps = {
        w: BoundStep(session(w), m.token_input, slots, offsets, m.logits_output) for w in a.ways.split(",")
    }
    shutil.rmtree(folder, ignore_errors=True)
    ids = [int(t) for t in np.random.default_rng(0).integers(0, m.vocab, 2 + a.rounds * a.per_round)]
    states = {k: np.zeros(offsets[-1], np.float32) for k in steps}
    times = {k: [] for k in steps}
    print(f"load average at the start: {describe_load(load_average())}; busy loops: {a.busy}")
    ways = list(steps)
    with BusyLoops(a.busy):
        for k, s in steps.items():
            for t in ids[:2]:
                s.step(t, states[k])
        for r in range(a.rounds):
            for k in ways[r % len(ways) :] + ways[: r % len(ways)]:
                for t in ids[2 + r * a.per_round : 2 + (r + 1) * a.per_round]:
                    t0 = time.perf_counter()
                    steps[k].step(t, states[k])
                    times[k].append(1000 * (time.perf_counter() - t0))
        print(f"load average at the end: {describe_load(load_average())}")
    base = statistics.median(times[ways[0]])
    for k, v in times.items():
        med = statistics.median(v)
        print(f"{k:<12} {med:8.1f} ms/token  {med / base:5.2f}x  (min {min(v):.1f}, max {max(v):.1f})")


if __name__ == "__main__":
    main()
