"""`rwkv2rknn bench`: decode speed of the ways to run one model, measured in one run.

For a random RWKV-4 (or, with ``version``, RWKV-5.2, 6 or 7) of the given size (default: 430M-sized,
24 x 1024, vocab 50277):

- pure ONNX Runtime over the per-layer files, token by token (the public demo's loop);
- the hybrid executor with every segment on the ``ort`` backend;
- one fused ONNX Runtime session of the whole model (the compiler's graph after ``state``);
- the ``rwkv`` package, cpu fp32, where installed (the reference implementation; RWKV-4 only:
  the package runs RWKV-7 only in a process of its own, so it is timed for RWKV-4 only);

each as the median ms/token over many tokens after a warm-up, their ratios to the per-layer loop,
the process's peak memory, and the memory-bandwidth bound: fp32 weight bytes read per token
divided by a measured numpy GEMV bandwidth, and the plan's estimated board figures (from the
device profile: estimates, not measurements). Figures on a shared machine are noisy: compare the
ratios within one run.
"""

from __future__ import annotations

import os
import resource
import shutil
import statistics
import tempfile
import time
from typing import Callable, Dict, List, Optional

import numpy as np


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def time_steps(step: Callable[[int], object], tokens: List[int], warmup: int = 2) -> List[float]:
    for t in tokens[:warmup]:
        step(t)
    out = []
    for t in tokens[warmup:]:
        t0 = time.perf_counter()
        step(t)
        out.append(1000.0 * (time.perf_counter() - t0))
    return out


def gemv_bandwidth_gbs(mb: int = 256, repeats: int = 5) -> float:
    """Bytes of a float32 matrix read per second by a matrix-vector product (best of repeats)."""
    n = int(np.sqrt(mb * 1024 * 1024 / 4))
    a = np.ones((n, n), np.float32)
    x = np.ones(n, np.float32)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ x
        best = min(best, time.perf_counter() - t0)
    return a.nbytes / best / 1e9


def run_bench(layers: int = 24, width: int = 1024, vocab: int = 50277, tokens: int = 32,
              seed: int = 0, workdir: Optional[str] = None, echo=print,
              with_rwkv: bool = True, version: str = "4") -> Dict[str, object]:
    from rwkv2rknn.compiler import compile_model
    from rwkv2rknn.ir import Options
    from rwkv2rknn.models import checkpoint
    from rwkv2rknn.models.export import arch_of, export
    from rwkv2rknn.runtime.hybrid import HybridModel
    from rwkv2rknn.runtime.reference import PerLayerModel

    own = workdir is None
    work = workdir or tempfile.mkdtemp(prefix="rwkv2rknn-bench-")
    results: Dict[str, object] = {"model": f"RWKV-{version} {layers} x {width}, vocab {vocab} (random)",
                                  "tokens": tokens}
    try:
        echo(f"bench: {results['model']}, {tokens} timed tokens")
        make = {"4": checkpoint.random_checkpoint, "5": checkpoint.random_rwkv5,
                "6": checkpoint.random_rwkv6, "7": checkpoint.random_rwkv7}[version]
        sd = make(layers=layers, width=width, vocab=vocab, seed=seed)
        shape = arch_of(sd)[1]
        results["params"] = shape.params()
        ids = [int(t) for t in np.random.default_rng(seed).integers(0, vocab, tokens + 2)]
        onnx_dir, art = os.path.join(work, "onnx"), os.path.join(work, "art")
        t0 = time.perf_counter()
        export(sd, onnx_dir, fp32=True)
        echo(f"  exported fp32 per-layer files in {time.perf_counter() - t0:.1f} s")
        t0 = time.perf_counter()
        manifest = compile_model(onnx_dir, art, Options(plan_only=True))
        echo(f"  compiled the plan (--plan-only) in {time.perf_counter() - t0:.1f} s: "
             f"{len(manifest.segments)} segments")
        results["estimate"] = {p: manifest.estimate_ms(p) for p in ("decode", "prefill")}
        results["segments"] = [{"name": s.name, "backend": s.backend, "stages": list(s.stages),
                                "est_ms": s.est_ms, "est_prefill_ms": s.est_prefill_ms}
                               for s in manifest.segments]
        ms: Dict[str, List[float]] = {}

        ref = PerLayerModel(onnx_dir)
        st = ref.init_state()
        ms["per-layer onnxruntime (public demo loop)"] = time_steps(lambda t: ref.step(t, st), ids)
        del ref

        hyb = HybridModel(art, backend="ort")
        hs = hyb.init_state()
        ms["hybrid executor, all segments on ort"] = time_steps(lambda t: hyb.step(t, hs), ids)
        n_pre = max(tokens, 64)
        pre_ids = [int(t) for t in np.random.default_rng(seed + 1).integers(0, vocab, n_pre)]
        hyb.prefill(pre_ids[:40], hyb.init_state(), chunk=32)  # warm-up: loads the T-row sessions
        t0 = time.perf_counter()
        hyb.prefill(pre_ids, hyb.init_state(), chunk=32)
        prefill_tps = n_pre / (time.perf_counter() - t0)
        one_tps = 1000.0 / statistics.median(ms["hybrid executor, all segments on ort"])
        results["prefill"] = {"tokens": n_pre, "chunk": 32, "tokens_per_s": prefill_tps,
                              "token_by_token_tokens_per_s": one_tps, "speedup": prefill_tps / one_tps}
        hyb.close()
        del hyb

        fused = _fused_session(onnx_dir)
        ms["one fused onnxruntime session"] = time_steps(fused, ids)
        del fused

        if with_rwkv and version == "4":
            rw = _rwkv_package_step(sd, work)
            if rw is not None:
                ms["rwkv package, cpu fp32"] = time_steps(rw, ids)
        del sd

        base = statistics.median(ms["per-layer onnxruntime (public demo loop)"])
        bw = gemv_bandwidth_gbs()
        weight_bytes = 4 * (shape.params() - shape.vocab * shape.width)  # emb is a row read
        bound_ms = weight_bytes / (bw * 1e9) * 1000
        rows = []
        for name, vals in ms.items():
            med = statistics.median(vals)
            rows.append({"runner": name, "ms_per_token": med, "ratio_to_per_layer": med / base,
                         "share_of_bandwidth_bound": bound_ms / med})
        results.update(rows=rows, bandwidth_gbs=bw, weight_mb=weight_bytes / 1e6,
                       bandwidth_bound_ms=bound_ms, peak_rss_mb=peak_rss_mb())
        echo("")
        echo(f"{'runner':<42} {'ms/token':>9} {'x per-layer':>11} {'of bound':>9}")
        for r in rows:
            echo(f"{r['runner']:<42} {r['ms_per_token']:>9.2f} {r['ratio_to_per_layer']:>11.2f} "
                 f"{100 * r['share_of_bandwidth_bound']:>8.0f}%")
        echo(f"memory-bandwidth bound: {weight_bytes / 1e6:.0f} MB of fp32 weights per token / "
             f"{bw:.1f} GB/s (numpy GEMV) = {bound_ms:.1f} ms/token")
        echo(f"peak memory of this process: {results['peak_rss_mb']:.0f} MB")
        pre = results["prefill"]
        echo(f"prefill (hybrid on ort, chunks of {pre['chunk']}): {pre['tokens_per_s']:.1f} tokens/s, "
             f"{pre['speedup']:.1f}x token by token ({pre['token_by_token_tokens_per_s']:.1f} tokens/s)")
        for line in manifest.table().splitlines():
            if line.startswith("estimated"):
                echo(f"plan: {line}")
        return results
    finally:
        if own:
            shutil.rmtree(work, ignore_errors=True)


def _fused_session(onnx_dir: str):
    """The whole model as one onnxruntime session: the compiler's graph after load, keep_fp32,
    state and normalize_matmul (the row-form MatMuls onnxruntime runs 10-20x faster than the
    files' MatMul(W, x)), not partitioned."""
    from rwkv2rknn.compiler import whole_graph
    from rwkv2rknn.runtime.ort import OrtRunner

    data, token, logits, slots = whole_graph(onnx_dir)
    runner = OrtRunner(data, "fused")
    feed = {i: np.zeros(runner.input_shapes[i], np.float32) for i, _ in slots}

    def step(tok):
        feed[token] = np.array([tok], np.int32)
        out = runner.infer(feed)
        for i, o in slots:
            feed[i] = out[o]
        return out[logits]
    return step


def _rwkv_package_step(sd, work: str):
    try:
        os.environ.setdefault("RWKV_JIT_ON", "0")
        os.environ.setdefault("RWKV_CUDA_ON", "0")
        from rwkv.model import RWKV
    except Exception:  # noqa: BLE001 - optional comparison
        return None
    from rwkv2rknn.models.checkpoint import save_checkpoint
    pth = os.path.join(work, "bench.pth")
    save_checkpoint(sd, pth)
    model = RWKV(model=pth, strategy="cpu fp32", verbose=False)
    os.unlink(pth)
    holder = {"state": None}

    def step(tok):
        out, holder["state"] = model.forward([tok], holder["state"])
        return out
    return step
