#!/usr/bin/env python
"""The fused token step of an artifact under onnxruntime's threading options, timed in
interleaved rounds in one process (a changing load falls on all alike). Every way is a session
of the same fused graph on one weight store (prepacked ways hold their own packed copy).

    python bench/fused_threads.py ART [--busy 2] [--ways 1,2,2dyn1,2spin,2prepack] [--package PTH]

A way: the intra-op threads, then any of ``spin`` (the pool spins), ``spinN`` (it spins N us,
``session.intra_op.spin_duration_us``), ``prepack`` (MatMul weights prepacked) and ``dynN``
(``session.dynamic_block_base`` N). ART: a compiled artifact (`rwkv2rknn compile ...
--plan-only` is enough). ``--package PTH``: the `rwkv` package on that checkpoint (the
artifact's weights) timed in the same rounds, in a child process. Each way's CPU time per token
(this process's; the package child's) and the cores it held while it ran are printed beside.
"""

import os
import re
import shutil
import tempfile
import time

import numpy as np
import onnxruntime as ort
from _rounds import parser, print_medians, timed_rounds, token_ids  # bench/_rounds.py

from rwkv2rknn.runtime.hybrid import load_manifest
from rwkv2rknn.runtime.ortshare import STUB_FILE, BoundStep, WeightStore, fuse


def main():
    ap = parser(__doc__, 6)
    ap.add_argument("--ways", default="1,2,2dyn1")
    ap.add_argument(
        "--package", default="", help="a .pth of the artifact's weights: time the rwkv package too"
    )
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
        spin = re.search(r"spin(\d+)", way)
        if spin:
            so.add_session_config_entry("session.intra_op.spin_duration_us", spin.group(1))
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
    states = {k: np.zeros(offsets[-1], np.float32) for k in steps}
    fns = {k: (lambda t, s=steps[k], st=states[k]: s.step(t, st)) for k in steps}
    clocks = {k: time.process_time for k in steps}
    runs, package = {}, None
    if a.package:
        from rwkv2rknn.tools.bench import process_cpu_s
        from rwkv2rknn.tools.rwkv_package import PackageProcess

        version = str(m.model.get("arch", "rwkv4"))[4:5] or "4"  # rwkv4 .. rwkv7
        package = PackageProcess(version, threads=0)
        runs["rwkv package"] = lambda tokens: package.run([(a.package, tokens)], keep=True)[0][1]
        clocks["rwkv package"] = lambda: process_cpu_s(package.proc.pid)
    cpu = {}
    try:
        times = timed_rounds(fns, token_ids(m.vocab, a), a, runs, clocks, cpu)
    finally:
        if package is not None:
            package.close()
    print_medians(times, next(iter(steps)), 14, cpu)


if __name__ == "__main__":
    main()
