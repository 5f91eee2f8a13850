"""`rwkv2rknn bench`: decode speed of the ways to run one model, measured in one run.

For a random RWKV-4 (or, with ``version``, RWKV-5.2, 6 or 7) of the given size (default: 430M-sized,
24 x 1024, vocab 50277):

- pure ONNX Runtime over the per-layer files, token by token (the public demo's loop);
- the hybrid executor with every segment on the ``ort`` backend;
- one fused ONNX Runtime session of the whole model (the compiler's graph after ``state``);
  (skipped above 1 GiB of fp32 weights: making it holds about 4x them);
- the ``rwkv`` package, cpu fp32, where installed (the reference implementation, every version,
  in a child process: rwkv2rknn/tools/rwkv_package.py);

loaded side by side and timed in interleaved rounds (each round gives every runner the next
few tokens), each as the median ms/token after a warm-up, their ratios to the per-layer loop and
the hybrid's to the package, the prefill rate of the hybrid executor (T-row segments, chunks of
32, once the others are let go), the peak memory of the process tree (sampled, per phase), the
memory-bandwidth bound (fp32 weight bytes read per token / a measured numpy GEMV bandwidth), the
plan's estimated board figures (from the device profile: estimates, not measurements) and, on a
board, the NPU's per-call cost through both board runners (rknn-rt and rknn-lite, timed on the
``call`` probe of ``rwkv2rknn profile --build-probes``). Figures on a shared machine are noisy:
compare the ratios within one run.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from typing import Callable, Dict, List, Optional

import numpy as np

from rwkv2rknn.fileio import scratch_prefix
from rwkv2rknn.tools.timing import gemv_bandwidth_gbs, time_steps


# the fused session holds about 4x its fp32 weights while it is made (the graph, its protobuf,
# the session and its repacked weights): above this it is skipped, so that no phase of the bench
# holds much more than twice the model
FUSED_LIMIT = 1 << 30


def random_model(version: str, layers: int, width: int, vocab: int, seed: int):
    """A random checkpoint of ``version`` with float16 matrices (half the memory of float32;
    the export reads them as float32, the `rwkv` package's 'cpu fp32' likewise)."""
    from rwkv2rknn.models import checkpoint

    make = {
        "4": checkpoint.random_checkpoint,
        "5": checkpoint.random_rwkv5,
        "6": checkpoint.random_rwkv6,
        "7": checkpoint.random_rwkv7,
    }[version]
    return make(layers=layers, width=width, vocab=vocab, seed=seed, dtype=np.float16)


def run_bench(
    layers: int = 24,
    width: int = 1024,
    vocab: int = 50277,
    tokens: int = 32,
    seed: int = 0,
    workdir: Optional[str] = None,
    echo=print,
    with_rwkv: bool = True,
    version: str = "4",
    probes: Optional[str] = None,
    core_mask: str = "auto",
    busy: int = 0,
    rounds: int = 4,
) -> Dict[str, object]:
    """The runners are loaded side by side (the per-layer sessions, the hybrid executor's, the
    fused session up to FUSED_LIMIT, the `rwkv` package in a child process) and timed in
    ``rounds`` interleaved rounds (``interleave``): on a shared machine the load changes over a
    run, and a runner timed after another would meet another load. Then the others let go and the
    hybrid executor's prefill is timed. Peak memory is the process tree's, sampled, per phase
    (the rounds hold every runner at once). ``busy``: that many single-core busy loops run beside
    the timed phases (the loaded case, on purpose); the load average is printed at the start and
    at the end."""
    from rwkv2rknn.compiler import resources
    from rwkv2rknn.tools import rwkv_package
    from rwkv2rknn.tools.busy import BusyLoops, describe_load, load_average
    from rwkv2rknn.models.export import arch_of, export

    own = workdir is None
    work = workdir or tempfile.mkdtemp(prefix=scratch_prefix("bench"))
    results: Dict[str, object] = {
        "model": f"RWKV-{version} {layers} x {width}, vocab {vocab} (random)",
        "tokens": tokens,
        "busy": busy,
        "load_start": load_average(),
    }
    mem = resources.PeakRss()
    loops = BusyLoops(busy)
    try:
        with mem:
            echo(f"bench: {results['model']}, {tokens} timed tokens")
            echo(
                f"  load average at the start: {describe_load(results['load_start'])}"
                + (f"; {busy} busy loops beside the timed phases" if busy else "")
            )
            t_start = time.perf_counter()
            ids = [int(t) for t in np.random.default_rng(seed).integers(0, vocab, tokens + 2)]
            onnx_dir, art = os.path.join(work, "onnx"), os.path.join(work, "art")
            mem.mark("checkpoint and export")
            t0 = time.perf_counter()
            sd = random_model(version, layers, width, vocab, seed)
            shape = arch_of(sd)[1]
            results["params"] = shape.params()
            export(sd, onnx_dir, fp32=True)
            pth = _save_pth(sd, work) if with_rwkv and rwkv_package.available() else None
            del sd
            resources.give_back_memory()
            echo(
                f"  made the checkpoint (float16) and exported fp32 per-layer files in "
                f"{time.perf_counter() - t0:.1f} s"
            )
            mem.mark("plan compile")
            manifest = _plan(onnx_dir, art, echo)
            results["estimate"] = {p: manifest.estimate_ms(p) for p in ("decode", "prefill")}
            results["segments"] = [
                {
                    "name": s.name,
                    "backend": s.backend,
                    "stages": list(s.stages),
                    "est_ms": s.est_ms,
                    "est_prefill_ms": s.est_prefill_ms,
                }
                for s in manifest.segments
            ]
            loops.start()
            results["busy_pids"] = loops.pids
            systems = {}  # runner -> (run(tokens) -> ms per token, close)
            try:
                mem.mark("per-layer sessions")
                systems[PER_LAYER] = _per_layer(onnx_dir)
                mem.mark("hybrid executor")
                systems[HYBRID], hyb = _hybrid(art)
                mem.mark("fused session")
                weight_bytes = 4 * (shape.params() - shape.vocab * shape.width)  # emb is a row read
                if 4 * shape.params() < FUSED_LIMIT:
                    systems["one fused onnxruntime session"] = _fused(onnx_dir)
                else:
                    echo(
                        f"  one fused onnxruntime session: skipped ({4 * shape.params() / 2**30:.2f} GiB "
                        f"of fp32 weights; making it holds about 4x that; the bench runs it up to "
                        f"{FUSED_LIMIT / 2**30:.0f} GiB)"
                    )
                mem.mark("rwkv package")
                if pth:
                    systems[PACKAGE] = _package(pth, version)
                elif with_rwkv:
                    echo("  rwkv package: not installed (pip install rwkv), not timed")
                mem.mark("interleaved rounds")
                # CPU time per runner: this process's for the in-process ones (nothing else runs
                # in it meanwhile), the child's for the package
                clocks = {k: time.process_time for k in systems if k != PACKAGE}
                if PACKAGE in systems:
                    clocks[PACKAGE] = lambda pid=systems[PACKAGE][2]: process_cpu_s(pid)
                cpu: Dict[str, List[float]] = {}
                ms = interleave({k: v[0] for k, v in systems.items()}, ids, rounds, clocks, cpu)
                results["cpu_ms"] = cpu
                results["rounds"] = rounds
                results["hybrid_execution"] = hyb.execution()
                echo(f"  hybrid executor: {results['hybrid_execution']}")
                results["load_end"] = load_average()
                loops.stop()
            finally:
                for k in [k for k in systems if k != HYBRID]:
                    systems.pop(k)[1]()  # its sessions go before prefill
                if pth and os.path.exists(pth):
                    os.unlink(pth)
                resources.give_back_memory()
            mem.mark("hybrid prefill")
            try:
                results["prefill"] = _prefill(hyb, ms[HYBRID], tokens, vocab, seed)
            finally:
                systems[HYBRID][1]()
                hyb = None
                resources.give_back_memory()
            mem.mark("board per-call costs")
            from rwkv2rknn.tools.measure import call_costs

            results["call_costs"] = call_costs(probes, core_mask, echo=lambda line: None)
            mem.mark("end")
        results["wall_s"] = time.perf_counter() - t_start
        _report(results, ms, weight_bytes, mem, manifest, echo)
        return results
    finally:
        loops.stop()
        if own:
            shutil.rmtree(work, ignore_errors=True)


def _save_pth(sd, work: str) -> str:
    from rwkv2rknn.models.checkpoint import save_checkpoint

    pth = os.path.join(work, "bench.pth")
    save_checkpoint(sd, pth, dtype="float16")
    return pth


def _plan(onnx_dir: str, art: str, echo):
    from rwkv2rknn.compiler import resources
    from rwkv2rknn.compiler.driver import compile_model
    from rwkv2rknn.compiler.ir import Options

    t0 = time.perf_counter()
    manifest = compile_model(onnx_dir, art, Options(plan_only=True))
    resources.give_back_memory()
    echo(
        f"  compiled the plan (--plan-only) in {time.perf_counter() - t0:.1f} s: "
        f"{len(manifest.segments)} segments"
    )
    return manifest


PER_LAYER = "per-layer onnxruntime (public demo loop)"
HYBRID = "hybrid executor, all segments on ort"
PACKAGE = "rwkv package, cpu fp32"


def interleave(
    runs: Dict[str, Callable[[List[int]], List[float]]],
    ids: List[int],
    rounds: int,
    clocks: Optional[Dict[str, Callable[[], float]]] = None,
    cpu: Optional[Dict[str, List[float]]] = None,
):
    """ms per token of each runner, timed in ``rounds`` rounds: each round gives every runner
    the next tokens of ``ids`` (after 2 warm-up tokens each), in an order that turns from round to
    round, so that a load that changes over the run falls on all of them alike. ``clocks``: per
    runner, its CPU seconds so far (its process's, every thread); each round's CPU ms per token
    go into ``cpu``."""
    for run in runs.values():
        run(ids[:2])
    timed = ids[2:]
    rounds = max(1, min(rounds, len(timed)))
    per = [len(timed) * r // rounds for r in range(rounds + 1)]
    names = list(runs)
    out: Dict[str, List[float]] = {k: [] for k in names}
    clocks = clocks or {}
    for r in range(rounds):
        chunk = timed[per[r] : per[r + 1]]
        for k in names[r % len(names) :] + names[: r % len(names)]:
            c0 = clocks[k]() if k in clocks else None
            out[k].extend(runs[k](chunk))
            if c0 is not None and cpu is not None and chunk:
                cpu.setdefault(k, []).extend([1000.0 * (clocks[k]() - c0) / len(chunk)] * len(chunk))
    return out


def process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system, every thread) process ``pid`` has used; NaN if unreadable."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def _steps(step: Callable[[int], object]) -> Callable[[List[int]], List[float]]:
    """A runner of one token a call as a run of several, timed per token."""
    return lambda tokens: time_steps(step, tokens, warmup=0)


def _per_layer(onnx_dir: str):
    from rwkv2rknn.runtime.reference import PerLayerModel

    ref = PerLayerModel(onnx_dir)
    st = ref.init_state()
    return _steps(lambda t: ref.step(t, st)), lambda: None


def _hybrid(art: str):
    from rwkv2rknn.runtime.hybrid import HybridModel

    hyb = HybridModel(art, backend="ort")
    hs = hyb.init_state()
    return (_steps(lambda t: hyb.step(t, hs)), hyb.close), hyb


def _fused(onnx_dir: str):
    return _steps(_fused_session(onnx_dir)), lambda: None


def _package(pth: str, version: str):
    """The `rwkv` package in a child process (torch's default threads) that keeps its model and
    state between the rounds; its ms are its own ``forward`` calls'."""
    from rwkv2rknn.tools.rwkv_package import PackageProcess

    proc = PackageProcess(version, threads=0)
    return (lambda tokens: proc.run([(pth, tokens)], keep=True)[0][1]), proc.close, proc.proc.pid


def _prefill(hyb, decode: List[float], tokens: int, vocab: int, seed: int):
    """Prefill tokens/s (chunks of 32, T-row sessions) once the per-token sessions that prefill
    does not use are closed."""
    from rwkv2rknn.compiler import resources

    n_pre = max(tokens, 64)
    pre_ids = [int(t) for t in np.random.default_rng(seed + 1).integers(0, vocab, n_pre)]
    for seg, runner in zip(hyb.manifest.segments, hyb.runners):
        # prefill runs its T-row session instead: one copy of the weights at a time (own
        # sessions: the token steps' session is the T-row one)
        if seg.seq.onnx and not hyb.own_sessions:
            runner.close()
    resources.give_back_memory()
    hyb.prefill(pre_ids[:40], hyb.init_state(), chunk=32)  # warm-up: loads the T-row sessions
    t0 = time.perf_counter()
    hyb.prefill(pre_ids, hyb.init_state(), chunk=32)
    prefill_tps = n_pre / (time.perf_counter() - t0)
    one_tps = 1000.0 / statistics.median(decode)
    return {
        "tokens": n_pre,
        "chunk": 32,
        "tokens_per_s": prefill_tps,
        "token_by_token_tokens_per_s": one_tps,
        "speedup": prefill_tps / one_tps,
    }


def _report(results, ms, weight_bytes, mem, manifest, echo) -> None:
    from rwkv2rknn.tools.busy import describe_load

    base = statistics.median(ms[PER_LAYER])
    bw = gemv_bandwidth_gbs()
    bound_ms = weight_bytes / (bw * 1e9) * 1000
    rows = []
    cpu = results.get("cpu_ms") or {}
    for name, vals in ms.items():
        med = statistics.median(vals)
        rows.append(
            {
                "runner": name,
                "ms_per_token": med,
                "ratio_to_per_layer": med / base,
                "share_of_bandwidth_bound": bound_ms / med,
                # CPU time per token (median of the rounds) and the cores it had while it ran
                "cpu_ms_per_token": statistics.median(cpu[name]) if cpu.get(name) else None,
                "cores_while_running": (
                    sum(cpu[name]) / sum(vals) if cpu.get(name) and len(cpu[name]) == len(vals) else None
                ),
            }
        )
    fp32 = 4 * results["params"]
    results.update(
        rows=rows,
        bandwidth_gbs=bw,
        weight_mb=weight_bytes / 1e6,
        bandwidth_bound_ms=bound_ms,
        peak_rss_mb=mem.peak / 2**20,
        peak_rss_by_phase_mb={k: v / 2**20 for k, v in mem.phases.items()},
        peak_to_fp32_weights=mem.peak / fp32,
    )
    echo("")
    echo(
        f"load average: {describe_load(results['load_start'])} at the start, "
        f"{describe_load(results.get('load_end'))} at the end of the timed phases"
        + (f" ({results['busy']} busy loops beside them)" if results.get("busy") else "")
    )
    echo(f"{'runner':<42} {'ms/token':>9} {'x per-layer':>11} {'of bound':>9} {'CPU ms':>7} {'cores':>6}")
    for r in rows:
        cpu_ms, cores = r["cpu_ms_per_token"], r["cores_while_running"]
        echo(
            f"{r['runner']:<42} {r['ms_per_token']:>9.2f} {r['ratio_to_per_layer']:>11.2f} "
            f"{100 * r['share_of_bandwidth_bound']:>8.0f}% "
            + (
                f"{cpu_ms:>7.1f} {cores:>6.2f}"
                if cpu_ms is not None and cores is not None
                else f"{'':>7} {'':>6}"
            )
        )
    if PACKAGE in ms:
        results["hybrid_to_package"] = statistics.median(ms[HYBRID]) / statistics.median(ms[PACKAGE])
        echo(
            f"hybrid executor / rwkv package: {results['hybrid_to_package']:.2f} "
            f"(medians of {len(ms[HYBRID])} tokens each, interleaved in {results.get('rounds', 1)} rounds)"
        )
    echo(
        f"memory-bandwidth bound: {weight_bytes / 1e6:.0f} MB of fp32 weights per token / "
        f"{bw:.1f} GB/s (numpy GEMV) = {bound_ms:.1f} ms/token"
    )
    top = max(mem.phases, key=mem.phases.get)
    echo(
        f"peak memory of the process tree: {mem.peak / 2**30:.2f} GiB, {mem.peak / fp32:.1f}x the "
        f"{fp32 / 2**30:.2f} GiB of fp32 weights (in the phase: {top}); wall time "
        f"{results['wall_s']:.0f} s"
    )
    pre = results["prefill"]
    echo(
        f"prefill (hybrid on ort, chunks of {pre['chunk']}): {pre['tokens_per_s']:.1f} tokens/s, "
        f"{pre['speedup']:.1f}x token by token ({pre['token_by_token_tokens_per_s']:.1f} tokens/s)"
    )
    for line in manifest.table().splitlines():
        if line.startswith("estimated"):
            echo(f"plan: {line}")
    for backend, cost in results["call_costs"].items():
        echo(f"NPU per-call cost, {backend}: " + (f"{cost:.3f} ms" if isinstance(cost, float) else cost))


def _fused_session(onnx_dir: str):
    """The whole model as one onnxruntime session: the compiler's graph after load, keep_fp32,
    state and normalize_matmul (the row-form MatMuls onnxruntime runs 10-20x faster than the
    files' MatMul(W, x)), not partitioned."""
    from rwkv2rknn.compiler.driver import whole_graph
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
