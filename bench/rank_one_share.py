#!/usr/bin/env python
"""The NPU's share of MatMul FLOPs for one RWKV-7, by how its file writes the state update.

    python bench/rank_one_share.py                          # 0.1B-shaped: 12 x 768, vocab 65536
    python bench/rank_one_share.py --layers 4 --width 256 --vocab 1000

A random RWKV-7 checkpoint of the given shape goes two ways: our per-layer export (the state
update as rank-one products), and one file written by torch.onnx.export of a module that writes
it as the `rwkv` package does, ``state @ ab`` with ``ab = (-kk) (kk a)^T`` (an [H, N, N] x
[H, N, N] product; tests/fixtures/slot_onefile.py). Each is compiled plan-only with the default
pipeline and, for the torch file, once more without the ``rank_one`` pass (the compiler as it
was before that pass); the plan table's summary line is printed for each.
"""

import argparse
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))


def summary(model, out, without_rank_one=False):
    from rwkv2rknn import passes
    from rwkv2rknn.compiler.driver import compile_model
    from rwkv2rknn.compiler.ir import Options

    pipeline = passes.GRAPH_PIPELINE
    if without_rank_one:
        passes.GRAPH_PIPELINE = tuple(p for p in pipeline if p is not passes.rank_one)
    try:
        m = compile_model(model, out, Options(plan_only=True, prefill_rows=()), force=True)
    finally:
        passes.GRAPH_PIPELINE = pipeline
    cpu = sum(s.flops for s in m.segments if s.backend == "cpu")
    line = next(x for x in m.table().splitlines() if "MatMul FLOPs on the NPU" in x)
    return f"{line}; CPU MatMul {cpu / 1e6:.2f} MFLOP/token"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--vocab", type=int, default=65536)
    args = ap.parse_args()
    from fixtures.slot_onefile import export_entries

    from rwkv2rknn.models.checkpoint import random_rwkv7
    from rwkv2rknn.models.export import export

    sd = random_rwkv7(layers=args.layers, width=args.width, vocab=args.vocab, seed=1)
    shape = f"RWKV-7 {args.layers} x {args.width}, vocab {args.vocab}"
    with tempfile.TemporaryDirectory(prefix="rwkv2rknn-bench-") as d:
        ours, theirs = os.path.join(d, "ours"), os.path.join(d, "state_at_ab.onnx")
        export(sd, ours, fp32=True, tokenizer=None)
        export_entries(sd, theirs, "7", opset=17)
        del sd
        print(f"{shape}, our per-layer export:               {summary(ours, os.path.join(d, 'a1'))}")
        print(
            f"{shape}, state @ ab file, without rank_one:  "
            f"{summary(theirs, os.path.join(d, 'a2'), without_rank_one=True)}"
        )
        print(f"{shape}, state @ ab file, with rank_one:     {summary(theirs, os.path.join(d, 'a3'))}")


if __name__ == "__main__":
    main()
