#!/usr/bin/env python
"""What the artifact holding the columns form costs onnxruntime: one NPU segment of a
``--plan-only`` compile (its T-row and per-token files in rows, as the passes write them) against
the columns forms the compile's columns step writes (``rwkv2rknn/rknn/columns.py``): file bytes,
T-row calls at T = 16 and 64 (rows turned to columns on the CPU, as ``runtime.rows.Columns``
does), per-token calls, and the memory of the per-token and T-row sessions on one weight store.

    python bench/columns_ort.py ART SEGMENT [--threads 1]

ART: e.g. a random 2-layer, 1024-wide RWKV-4 exported fp32 and compiled with --plan-only;
SEGMENT: one of its NPU segments (s003_npu_L0-L1 there). Times are min and median of 60 calls,
the forms interleaved in rounds (the machine is shared: the minimum is the figure to compare).
"""

import argparse
import os
import statistics
import tempfile
import time

import numpy as np

from rwkv2rknn.rknn.columns import write_columns, write_token_view
from rwkv2rknn.runtime.ort import OrtRunner
from rwkv2rknn.runtime.ortshare import WeightStore
from rwkv2rknn.runtime.rows import Columns
from rwkv2rknn.tools.busy import load_average


def timed(calls, rounds=3, n=20):
    """name -> (min ms, median ms) of each call, interleaved in rounds."""
    out = {k: [] for k in calls}
    for r in range(rounds):
        for name, f in calls.items() if r % 2 == 0 else reversed(list(calls.items())):
            f()
            for _ in range(n):
                t0 = time.perf_counter()
                f()
                out[name].append(time.perf_counter() - t0)
    return {k: (min(v) * 1e3, statistics.median(v) * 1e3) for k, v in out.items()}


def rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def sessions_memory(token, seq):
    """(store MiB, RSS added by the per-token session, by the T-row session) on one store, in a
    fresh process (the allocator of this one has reused memory by now)."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_sessions_memory, (token, seq))


def _sessions_memory(token, seq):
    store = WeightStore()
    r0 = rss_mib()
    a = OrtRunner(token, "token", 1, store, arena=False)
    r1 = rss_mib()
    b = OrtRunner(seq, "seq", 1, store, arena=False)
    r2 = rss_mib()
    del a, b
    return store.nbytes / 2**20, r1 - r0, r2 - r1


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact")
    ap.add_argument("segment")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    seq = os.path.join(a.artifact, "segments", a.segment + ".seq.onnx")
    token = os.path.join(a.artifact, "segments", a.segment + ".onnx")
    print(f"load average at start: {load_average()}")
    with tempfile.TemporaryDirectory(prefix="columns-ort-") as tmp:
        cols, view = os.path.join(tmp, "cols.onnx"), os.path.join(tmp, "view.onnx")
        assert write_columns(seq, cols) == "" and write_token_view(token, cols, view, a.segment) == ""
        print(f"T-row file bytes: rows {os.path.getsize(seq):,}, columns {os.path.getsize(cols):,}")
        print(f"per-token file bytes: rows {os.path.getsize(token):,}, view {os.path.getsize(view):,}")
        rows_r, cols_r = OrtRunner(seq, "rows", a.threads), Columns(OrtRunner(cols, "cols", a.threads))
        shapes = rows_r.input_shapes
        rng = np.random.default_rng(0)
        for t in (16, 64):
            feed = {
                k: rng.standard_normal([t if isinstance(d, str) else d for d in s]).astype(np.float32)
                for k, s in shapes.items()
            }
            got = timed({"rows": lambda: rows_r.infer(feed), "columns": lambda: cols_r.infer(feed)})
            print(
                f"T-row call, T = {t}, {a.threads} thread(s): rows min {got['rows'][0]:.2f} ms (median "
                f"{got['rows'][1]:.2f}), columns min {got['columns'][0]:.2f} ms (median {got['columns'][1]:.2f})"
            )
        tok_r, view_r = OrtRunner(token, "token", a.threads), OrtRunner(view, "view", a.threads)
        feed = {k: rng.standard_normal(s).astype(np.float32) for k, s in tok_r.input_shapes.items()}
        got = timed({"rows": lambda: tok_r.infer(feed), "view": lambda: view_r.infer(feed)})
        print(
            f"per-token call: rows min {got['rows'][0]:.2f} ms (median {got['rows'][1]:.2f}), view of "
            f"the columns form min {got['view'][0]:.2f} ms (median {got['view'][1]:.2f})"
        )
        for label, (tk, sq) in {
            "rows + rows (before)": (token, seq),
            "rows + columns (no view)": (token, cols),
            "view + columns (now)": (view, cols),
        }.items():
            store, t_add, s_add = sessions_memory(tk, sq)
            print(
                f"sessions on one weight store, per-token + T-row = {label}: store {store:.1f} MiB, "
                f"per-token session +{t_add:.1f} MiB, T-row session +{s_add:.1f} MiB"
            )
    print(f"load average at end: {load_average()}")


if __name__ == "__main__":
    main()
