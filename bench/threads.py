#!/usr/bin/env python
"""One onnxruntime MatMul [T, C] x [C, K] on one intra-op thread against a pool of two, over
sizes from a LoRA to a 430M model's FFN: where a pool starts to pay (``POOL_MIN_FLOPS`` in
rwkv2rknn/runtime/ortshare.py), quiet or with busy loops beside it.

    python bench/threads.py            # as the machine is
    python bench/threads.py --busy 2   # with two single-core busy loops
"""

import argparse
import statistics
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from rwkv2rknn.tools.busy import BusyLoops, describe_load, load_average

SIZES = [
    (64, 64, 1),
    (192, 192, 1),
    (256, 256, 1),
    (512, 512, 1),
    (1024, 256, 1),
    (1024, 1024, 1),
    (1024, 4096, 1),
    (1024, 1024, 8),
    (1024, 1024, 32),
]


def session(c, k, t, threads):
    w = np.random.default_rng(0).random((c, k), np.float32)
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [t, c])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [t, k])],
        [numpy_helper.from_array(w, "w")],
    )
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--busy", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    print(f"load average at the start: {describe_load(load_average())}; busy loops: {args.busy}")
    with BusyLoops(args.busy):
        for c, k, t in SIZES:
            s1, s2 = session(c, k, t, 1), session(c, k, t, 2)
            x = np.random.default_rng(1).random((t, c), np.float32)
            n = min(2000, max(20, int(2e8 / (2 * c * k * t))))
            got = {1: [], 2: []}
            for _ in range(args.repeats):  # interleaved: both see the same load
                for threads, s in ((1, s1), (2, s2)):
                    t0 = time.perf_counter()
                    for _ in range(n):
                        s.run(None, {"x": x})
                    got[threads].append((time.perf_counter() - t0) / n * 1e6)
            a, b = statistics.median(got[1]), statistics.median(got[2])
            print(
                f"[{t}, {c}] x [{c}, {k}]: {2 * c * k * t:.1e} FLOPs, 1 thread {a:8.1f} us, "
                f"2 threads {b:8.1f} us, 2/1 = {b / a:.2f}"
            )
    print(f"load average at the end: {describe_load(load_average())}")


if __name__ == "__main__":
    main()
