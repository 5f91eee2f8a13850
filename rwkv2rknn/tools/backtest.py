"""`rwkv2rknn bench --backtest ARTIFACT`: the plan's estimator checked against this machine.

In one run, with one onnxruntime thread everywhere (steadier than a pool on a shared machine):

1. a device profile of this machine (``measure_host``), from probes that are not the model,
   each timed after a run through a token's weights (``_Sweep``): GEMV chains of matrices of
   0.25 to 64 MiB (the bandwidth by a matrix's bytes), a 64-row MatMul (FLOP rate), chains of
   small ops (an op's fixed cost), tiny graphs run through the executor's own runner (its cost
   per run and per input and output tensor), a Gather of a random row of a table beyond the
   caches (the embedding's cold row), the copy back of a state from outputs onnxruntime made
   (per slot and per byte), and the executor's token step with every run replaced by a replay
   of its outputs (its own cost per segment of a step). The NPU's fields are this
   CPU's: "as if this CPU were the device", every segment runs on onnxruntime;
2. per segment, the estimator's time for one call under that profile (``partition.estimate_ms``
   on the segment's ONNX graph, through ``driver.estimate_file``, at the device it was planned for);
3. the artifact run segment by segment on onnxruntime (``--backend ort``, not fused), each
   segment's run timed, and the whole token step;
4. predicted / measured per segment kind (NPU-planned, CPU, embedding, head, the executor's own
   cost per token) and per token.

Tokens are run in rounds beside the probes' re-measurement so that a changing load falls on
both alike; compare the ratios, not the milliseconds.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Callable, Dict, List, Tuple

import numpy as np

from rwkv2rknn.artifact.plan import token_file_bytes
from rwkv2rknn.artifact.profile import DeviceProfile

WIDTH = 1024  # of the op-cost probes: an RWKV row of the 430M shape


def _model(nodes, inputs, outputs, inits=()):
    from onnx import helper

    g = helper.make_graph(nodes, "probe", inputs, outputs, list(inits))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m.SerializeToString()


def _vec(name, shape):
    from onnx import TensorProto, helper

    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))


def _runner(model: bytes):
    """The executor's own runner on one thread, without prepacking (as sessions on the weight
    store run)."""
    from rwkv2rknn.runtime.ort import OrtRunner

    return OrtRunner(model, "probe", threads=1, prepack=False)


def _store_runner(model: bytes):
    """The executor's runner on one thread with the weights of ``model`` taken from a weight
    store, as the segments' sessions take theirs (a 1024 x 4096 GEMV chain read 18.4-19.5 GB/s
    so against 16.5-18.0 with the same weights held in the graph, measured here; 1024 x 1024
    about the same either way)."""
    import tempfile

    from rwkv2rknn.fileio import scratch_prefix
    from rwkv2rknn.runtime.ort import OrtRunner
    from rwkv2rknn.runtime.ortshare import WeightStore

    folder = tempfile.mkdtemp(prefix=scratch_prefix("probe"))
    try:
        path = os.path.join(folder, "probe.onnx")
        with open(path, "wb") as f:
            f.write(model)
        return OrtRunner(path, "probe", threads=1, store=WeightStore())  # (the runner keeps it)
    finally:
        import shutil

        shutil.rmtree(folder, ignore_errors=True)


def _median_ms(fn, n: int, before=None) -> float:
    """Median ms of this thread's CPU time per call of ``fn`` (one onnxruntime thread runs on
    the caller's: time waiting for a core on a loaded machine is not counted), ``before`` run
    untimed ahead of each call."""
    fn()
    out = []
    for _ in range(n):
        if before is not None:
            before()
        t0 = time.thread_time()
        fn()
        out.append(time.thread_time() - t0)
    return 1000.0 * statistics.median(out)


def _interleaved_ms(fns, n: int, before) -> List[float]:
    """Median ms (this thread's CPU time) of each of ``fns``, run in turns (a changing load
    falls on all alike), ``before`` untimed ahead of each call."""
    for fn in fns:
        fn()
    out: List[List[float]] = [[] for _ in fns]
    for _ in range(n):
        for fn, times in zip(fns, out):
            before()
            t0 = time.thread_time()
            fn()
            times.append(time.thread_time() - t0)
    return [1000.0 * statistics.median(t) for t in out]


class _Sweep:
    """What runs between two runs of one segment in a token step: the other segments, here one
    onnxruntime run through ``nbytes`` of float32 weights (the data they stream evicts the
    caches; the code they run, the executor's and onnxruntime's, stays warm, as in a step)."""

    def __init__(self, nbytes: int):
        from onnx import numpy_helper, helper

        n = max(16, int(nbytes / 4 / 1024))
        w = numpy_helper.from_array(np.full((1024, n), 0.5, np.float32), "w")
        self.runner = _runner(
            _model(
                [helper.make_node("MatMul", ["x", "w"], ["y"])],
                [_vec("x", [1, 1024])],
                [_vec("y", [1, n])],
                [w],
            )
        )
        self.feed = {"x": np.ones((1, 1024), np.float32)}

    def __call__(self):
        self.runner.infer(self.feed)


def _chain(n: int, width: int = WIDTH) -> bytes:
    """``n`` small ops in a row on a [1, width] row, the mix of an RWKV block's CPU work:
    elementwise with a constant row, exp / sigmoid / tanh, views to heads and back, a reduction."""
    from onnx import helper, numpy_helper

    c = numpy_helper.from_array(np.full(width, 0.5, np.float32), "c")
    heads = numpy_helper.from_array(np.array([width // 64, 64], np.int64), "heads")
    row = numpy_helper.from_array(np.array([1, width], np.int64), "row")
    cycle = ["Mul", "Add", "Sigmoid", "Sub", "Exp", "Reshape", "Mul", "ReduceMean", "Add", "Tanh", "Reshape"]
    nodes, x, shaped = [], "x", False
    for i in range(n):
        op, y = cycle[i % len(cycle)], f"t{i}"
        if op == "Reshape":
            nodes.append(helper.make_node("Reshape", [x, "row" if shaped else "heads"], [y]))
            shaped = not shaped
        elif op == "ReduceMean":  # over each head's row, kept, and taken off (a norm's centring)
            r = f"r{i}"
            nodes.append(helper.make_node("ReduceMean", [x], [r], axes=[-1], keepdims=1))
            nodes.append(helper.make_node("Sub", [x, r], [y]))
        elif op in ("Mul", "Add", "Sub"):
            other = "c" if not shaped else x
            nodes.append(helper.make_node(op, [x, other], [y]))
        else:
            nodes.append(helper.make_node(op, [x], [y]))
        x = y
    if shaped:
        nodes.append(helper.make_node("Reshape", [x, "row"], ["y"]))
    else:
        nodes.append(helper.make_node("Identity", [x], ["y"]))
    return _model(nodes, [_vec("x", [1, width])], [_vec("y", [1, width])], [c, heads, row])


def _ops_in(n: int) -> int:
    """Nodes of ``_chain(n)`` (a reduction step is two ops), not counting the last view."""
    cycle_ops = [1, 1, 1, 1, 1, 1, 1, 2, 1, 1, 1]
    return sum(cycle_ops[i % len(cycle_ops)] for i in range(n))


def _wide(n_in: int) -> bytes:
    """``n_in`` inputs, one Relu each, ``n_in`` outputs."""
    from onnx import helper

    nodes = [helper.make_node("Relu", [f"x{i}"], [f"y{i}"]) for i in range(n_in)]
    return _model(
        nodes, [_vec(f"x{i}", [1, 16]) for i in range(n_in)], [_vec(f"y{i}", [1, 16]) for i in range(n_in)]
    )


# one MatMul's weights of 0.25, 4, 16, 64 and 256 MiB (a 430M model's head, 1024 x 65536, is 256:
# the bandwidth still grows from 64 MiB, and the nearest probe was taken for it, 10-20% low)
GEMV_PROBES = ((256, 256, 16), (1024, 1024, 4), (1024, 4096, 4), (1024, 16384, 1), (1024, 65536, 1))


def _gemv_chain(k: int, n: int, count: int):
    """[1, k] through ``count`` MatMuls of [k, n] and [n, k] fp32 weights in turn, and their
    bytes."""
    from onnx import numpy_helper, helper

    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for i in range(count):
        shape = (k, n) if i % 2 == 0 else (n, k)
        inits.append(numpy_helper.from_array((rng.standard_normal(shape) / 64).astype(np.float32), f"w{i}"))
        y = "y" if i == count - 1 else f"h{i}"
        nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [y]))
        x = y
    out = k if count % 2 == 0 else n
    return _model(nodes, [_vec("x", [1, k])], [_vec("y", [1, out])], inits), count * k * n * 4


def _gemm(rows: int = 64, k: int = 1024) -> bytes:
    from onnx import numpy_helper, helper

    w = numpy_helper.from_array(np.full((k, k), 0.01, np.float32), "w")
    return _model(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], [_vec("x", [rows, k])], [_vec("y", [rows, k])], [w]
    )


TABLE_PROBE_BYTES = 64 << 20  # the Gather probe's table (256 MiB cost the same, measured)


def _table(rows: int, width: int = WIDTH) -> bytes:
    """One Gather of a row of a [rows, width] float32 table by an int32 index, as the embedding."""
    from onnx import TensorProto, helper, numpy_helper

    table = numpy_helper.from_array(np.full((rows, width), 0.5, np.float32), "table")
    return _model(
        [helper.make_node("Gather", ["table", "i"], ["y"])],
        [helper.make_tensor_value_info("i", TensorProto.INT32, [1])],
        [_vec("y", [1, width])],
        [table],
    )


def _identity(shapes) -> bytes:
    """One Identity per shape: outputs made by onnxruntime, as a segment run's are."""
    from onnx import helper

    return _model(
        [helper.make_node("Identity", [f"x{i}"], [f"y{i}"]) for i in range(len(shapes))],
        [_vec(f"x{i}", s) for i, s in enumerate(shapes)],
        [_vec(f"y{i}", s) for i, s in enumerate(shapes)],
    )


def copy_back_ms(sweep, repeats: int) -> Tuple[float, float]:
    """(ms per slot, GB/s) of the executor's copy of a token's state back into its buffer:
    each slot ``view[...] = output.reshape(view.shape)`` from an output onnxruntime made (after
    ``sweep``: as cold as a step's), then the outputs let go; from 96 rows of 1024 floats
    (per-slot bound) and 24 [16, 64, 64] slots (byte bound): the two equations of
    ``slots x per_slot + bytes / rate``."""
    shapes_a, shapes_b = [(WIDTH,)] * 96, [(16, 64, 64)] * 24

    def case(shapes):
        buf = [np.zeros(s, np.float32) for s in shapes]
        maker = _runner(_identity(shapes))
        feed = {f"x{i}": np.ones(s, np.float32) for i, s in enumerate(shapes)}
        made = [list(maker.infer(feed).values())]

        def before():
            made[0] = list(maker.infer(feed).values())
            sweep()

        def run():
            outs = made.pop()
            for view, out in zip(buf, outs):
                view[...] = np.asarray(out, np.float32).reshape(view.shape)
            del outs  # the outputs let go, as at a step's end
            made.append([])

        return before, run, sum(4 * int(np.prod(s)) for s in shapes)

    (before_a, run_a, bytes_a), (before_b, run_b, bytes_b) = case(shapes_a), case(shapes_b)
    t_a = _interleaved_ms([run_a], repeats, before_a)[0]
    t_b = _interleaved_ms([run_b], repeats, before_b)[0]
    n_a, n_b = len(shapes_a), len(shapes_b)
    # t = n x slot + bytes x inv, solved for slot and inv (ms per byte)
    det = n_a * bytes_b - n_b * bytes_a
    slot = max((t_a * bytes_b - t_b * bytes_a) / det, 0.0)
    inv = max((t_b * n_a - t_a * n_b) / det, 1e-12)
    return slot, 1.0 / inv / 1e6


def cache_bytes() -> int:
    """This CPU's last-level cache (Linux's sysfs; 32 MiB where it does not say)."""
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for index in os.listdir(base):
            with open(os.path.join(base, index, "size")) as f:
                text = f.read().strip()
            mult = {"K": 1 << 10, "M": 1 << 20}.get(text[-1:], 1)
            best = max(best, int(text.rstrip("KM")) * mult)
    except (OSError, ValueError):
        pass
    return best or 32 << 20


def measure_host(
    evict_bytes: int = 16 << 20, echo: Callable[[str], None] = print, repeats: int = 160
) -> DeviceProfile:
    """This machine as a device profile for onnxruntime on one thread (every field measured but
    ``cpu_special_flops``, kept from the defaults; the NPU's fields are the CPU's; the
    executor's fixed and per-segment costs per token, ``exec_token_ms`` and
    ``exec_segment_ms``, are left 0: ``run_backtest`` measures them on the artifact's step).
    The per-run, per-tensor and per-op costs are timed right after ``evict_bytes`` of weights
    went through the caches, as in a token step, where every run follows another segment's
    weights (a run from warm caches costs several times less)."""
    sweep = _Sweep(evict_bytes)
    feed1 = {"x0": np.ones((1, 16), np.float32)}
    feed8 = {f"x{i}": np.ones((1, 16), np.float32) for i in range(8)}
    one, eight = _runner(_wide(1)), _runner(_wide(8))
    short, long_ = _runner(_chain(11)), _runner(_chain(99))
    xrow = {"x": np.ones((1, WIDTH), np.float32)}
    # a Gather's random row of a table beyond the caches (the embedding): its run against the
    # one-op run above, in the same turns (a Gather's run with the same row again cost 0.02-0.03
    # ms less than with a random one here, but the embedding's first run in a step 0.05-0.1
    # more than the one-op run's: the cold row and the session's own first touches)
    rows = TABLE_PROBE_BYTES // (4 * WIDTH)
    gather = _store_runner(_table(rows))
    pick = np.random.default_rng(1)
    probes = [
        lambda: one.infer(feed1),
        lambda: eight.infer(feed8),
        lambda: short.infer(xrow),
        lambda: long_.infer(xrow),
        lambda: gather.infer({"i": np.array([pick.integers(0, rows)], np.int32)}),
    ]
    t_one, t_eight, t_short, t_long, t_gather = _interleaved_ms(probes, repeats, sweep)
    kernel = max((t_long - t_short) / (_ops_in(99) - _ops_in(11)), 1e-5)
    io = max((t_eight - t_one - 7 * kernel) / 14, 0.0)
    call = max(t_one - 2 * io - kernel, 1e-4)
    row = max(t_gather - t_one, 0.0)
    slot, state_gbs = copy_back_ms(sweep, max(repeats // 8, 5))
    gemv_gbs = {}
    for k, n, count in GEMV_PROBES:  # the bandwidth by a matrix's bytes
        model, nbytes = _gemv_chain(k, n, count)
        gemv = _store_runner(model)
        del model
        feed = {"x": np.ones((1, k), np.float32)}
        t = min(_median_ms(lambda: gemv.infer(feed), 5, sweep) for _ in range(2))
        gemv_gbs[k * n * 4] = nbytes / max(t - call, 1e-3) / 1e6
    gbs = statistics.median(gemv_gbs.values())
    mm = _runner(_gemm())
    x64 = {"x": np.ones((64, 1024), np.float32)}
    t_mm = _median_ms(lambda: mm.infer(x64), 20)
    gflops = 2.0 * 64 * 1024 * 1024 / max(t_mm - call, 1e-3) / 1e6
    echo(
        f"  this machine on one onnxruntime thread, after {evict_bytes / 2**20:.1f} MiB of weights: "
        f"{call * 1000:.1f} us per run from Python + {io * 1000:.2f} us per tensor; "
        f"{kernel * 1000:.2f} us per small op; GEMV "
        + ", ".join(f"{g:.1f} GB/s at {b / 2**20:g} MiB" for b, g in gemv_gbs.items())
        + f" (fp32 weights of one MatMul); {gflops:.1f} GFLOPS at 64 rows; a table's random row "
        f"{row * 1000:.1f} us; the state's copy back {slot * 1000:.2f} us per slot + {state_gbs:.1f} GB/s"
    )
    return DeviceProfile(
        name="this-machine-onnxruntime-1-thread",
        npu_call_ms=0.0,
        cpu_gemv_gbs=gbs,
        cpu_weight_bytes=4,
        handoff_ms=0.0,
        npu_gbs=gbs,
        npu_gbs_all=gbs,
        npu_cores=1,
        npu_core_gflops=gflops,
        npu_weight_bytes=4,
        npu_multicore_bytes=1 << 62,
        cpu_gflops=gflops,
        dram_gbs=max(gbs, DeviceProfile().dram_gbs),
        cpu_kernel_ms=kernel,
        npu_kernel_ms=kernel,
        exec_call_ms=call,
        exec_io_ms=io,
        exec_token_ms=0.0,
        exec_segment_ms=0.0,
        exec_slot_ms=slot,
        exec_state_gbs=state_gbs,
        table_row_ms=row,
        cache_bytes=cache_bytes(),
        gemv_gbs=gemv_gbs,
    )


# ------------------------------------------------------------------------------------ the plan


def segment_kind(seg, manifest) -> str:
    if list(seg.outputs) == [manifest.logits_output]:
        return "head"
    if "embed" in seg.stages and seg.flops == 0:
        return "embedding"
    return "NPU-planned" if seg.backend == "npu" else "CPU"


KINDS = ("embedding", "NPU-planned", "CPU", "head")


def predict(artifact: str, manifest, profile: DeviceProfile) -> List[float]:
    """The estimator's ms per call of each segment under ``profile``, from its ONNX graph."""
    from rwkv2rknn.compiler.driver import estimate_file

    return [
        estimate_file(os.path.join(artifact, seg.token.onnx), seg.backend, profile)
        for seg in manifest.segments
    ]


# ------------------------------------------------------------------------------------ the run


class _Timed:
    """A segment's runner whose runs are timed (ms of this thread's CPU time, into ``times``)."""

    def __init__(self, runner, times: List[float]):
        self.runner, self.times = runner, times

    def infer(self, feed):
        t0 = time.thread_time()
        out = self.runner.infer(feed)
        self.times.append(1000.0 * (time.thread_time() - t0))
        return out

    def close(self):
        self.runner.close()


class _Replay:
    """Gives back one run's outputs again as an onnxruntime run gives them (new arrays from an
    Identity session: letting them go costs what a run's do; copies made by numpy cost half as
    much, measured), after a segment's weights went through the caches (``sweep``); the thread
    time at its entry and exit goes to ``marks`` (the executor's own time is between them)."""

    def __init__(self, outs: Dict[str, np.ndarray], sweep, marks: List[float]):
        from onnx import helper

        self.names = list(outs)
        io = [
            helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(v.dtype), list(v.shape))
            for n, v in outs.items()
        ]
        inputs = [
            helper.make_tensor_value_info("in_" + n, helper.np_dtype_to_tensor_dtype(v.dtype), list(v.shape))
            for n, v in outs.items()
        ]
        nodes = [helper.make_node("Identity", ["in_" + n], [n]) for n in self.names]
        self.runner = _runner(_model(nodes, inputs, io))
        self.feed = {"in_" + n: v for n, v in outs.items()}
        self.sweep, self.marks = sweep, marks

    def infer(self, feed):
        self.marks.append(time.thread_time())
        outs = self.runner.infer(self.feed)
        self.sweep()  # after them: they are as cold as a run's outputs are when read later
        self.marks.append(time.thread_time())
        return outs

    def close(self):
        pass


def run_backtest(
    artifact: str, tokens: int = 24, rounds: int = 3, echo: Callable[[str], None] = print, seed: int = 0
) -> Dict[str, object]:
    """Predicted / measured per segment kind and per token; see the module's docstring."""
    from rwkv2rknn.runtime.hybrid import HybridModel, load_manifest
    from rwkv2rknn.tools.busy import describe_load, load_average

    manifest = load_manifest(artifact)
    res: Dict[str, object] = {"artifact": artifact, "load_start": load_average()}
    total = token_file_bytes(artifact, manifest)
    # what goes through the caches between two runs of a segment: a token's weights (beyond
    # twice the last-level cache the same as all of them); the probes are timed after as many
    # (after a segment's weights only, a small model's probes ran from warm caches: the bundled
    # model's token 0.3x what it measured), and at least the last-level cache (the bundled
    # model's 13.6 MiB left a 256 KiB GEMV probe's chain in a 32 MiB cache in some rounds: 8 to
    # 27 GB/s, while its step's GEMVs ran cold, the other work on the machine sharing the cache)
    evict = min(max(total, cache_bytes(), 1 << 20), 64 << 20)
    # what goes through the caches between two runs of the executor: a segment's weights (on
    # average); the probes of its costs are timed after as many
    between = min(max(total // len(manifest.segments), 1 << 20), 64 << 20)
    echo(
        f"back-test of the estimator on {artifact}: {len(manifest.segments)} segments, "
        f"{tokens} tokens in {rounds} rounds, one onnxruntime thread, times in this thread's "
        f"CPU time"
    )
    echo(f"  load average at the start: {describe_load(res['load_start'])}")
    model = HybridModel(artifact, backend="ort", fuse=False, threads=1)
    n_seg = len(manifest.segments)
    times: List[List[float]] = [[] for _ in range(n_seg)]
    real = list(model.runners)
    model.runners = [_Timed(r, t) for r, t in zip(real, times)]
    ids = [int(t) for t in np.random.default_rng(seed).integers(0, max(manifest.vocab, 1), tokens + 2)]
    state = model.init_state()
    for t in ids[:2]:
        model.step(t, state)
    for t in times:
        t.clear()
    steps: List[float] = []
    walls: List[float] = []
    profiles: List[DeviceProfile] = []
    per_round = max(1, tokens // rounds)
    done = 0
    for r in range(rounds):  # the probes between the rounds: the same load on both
        profiles.append(measure_host(evict, echo=echo))
        n = per_round if r < rounds - 1 else tokens - done
        for t in ids[2 + done : 2 + done + n]:
            w0, t0 = time.perf_counter(), time.thread_time()
            model.step(t, state)
            steps.append(1000.0 * (time.thread_time() - t0))
            walls.append(1000.0 * (time.perf_counter() - w0))
        done += n
    # the executor's own cost per token: the same steps with every run a replay of its outputs,
    # each after a segment's weights went through the caches (as in a real step: a segment's
    # weights on average, not a token's split into as many parts; the replay's sweep was the
    # latter, 1.25 MiB for a 430M RWKV-7, and its steps ran on caches a real step never has:
    # 0.4x the executor's real cost per token, measured). Its time outside its runs, less the
    # state's copy back (which the probes cost per slot and byte), is its cost per segment
    trace: Dict[str, np.ndarray] = {}
    model.runners = real
    model.step(ids[0], model.init_state(), trace=trace)
    sweep = _Sweep(between)
    marks: List[float] = []
    model.runners = [_Replay({k: trace[k] for k in seg.outputs}, sweep, marks) for seg in manifest.segments]
    replay_state = model.init_state()
    ends, betweens = [], []  # ms per step: before the first run and after the last; between runs
    for _ in range(max(10, 2 * tokens)):
        marks.clear()
        t0 = time.thread_time()
        model.step(ids[0], replay_state)
        t1 = time.thread_time()
        ends.append(1000.0 * ((marks[0] - t0) + (t1 - marks[-1])))
        betweens.append(1000.0 * sum(b - a for a, b in zip(marks[1:-1:2], marks[2::2])))
    del sweep
    model.runners = real
    model.close()
    res["load_end"] = load_average()
    slots, state_bytes = len(manifest.state), manifest.state_bytes()
    prof = _median_profile(
        profiles, statistics.median(ends), statistics.median(betweens), n_seg, slots, state_bytes
    )
    own = prof.executor_token_ms(n_seg, slots, state_bytes)
    res["profile"] = prof.to_dict()
    est = predict(artifact, manifest, prof)
    kinds = [segment_kind(s, manifest) for s in manifest.segments]
    table = []
    for kind in KINDS:
        idx = [i for i, k in enumerate(kinds) if k == kind]
        if idx:  # per token: the kind's calls summed, then the median over tokens
            p = sum(est[i] for i in idx)
            m = statistics.median(sum(times[i][j] for i in idx) for j in range(tokens))
            table.append(
                {
                    "kind": kind,
                    "segments": len(idx),
                    "predicted_ms": p,
                    "measured_ms": m,
                    "ratio": p / m if m > 0 else float("nan"),
                }
            )
    measured_own = statistics.median(steps[j] - sum(times[i][j] for i in range(n_seg)) for j in range(tokens))
    table.append(
        {
            "kind": "executor (per token)",
            "segments": 0,
            "predicted_ms": own,
            "measured_ms": measured_own,
            "ratio": own / measured_own if measured_own > 0 else float("nan"),
        }
    )
    predicted_token = sum(est) + own
    token_ms = statistics.median(steps)
    table.append(
        {
            "kind": "token",
            "segments": n_seg,
            "predicted_ms": predicted_token,
            "measured_ms": token_ms,
            "ratio": predicted_token / token_ms,
        }
    )
    res["table"] = table
    res["wall_ms_per_token"] = statistics.median(walls)
    res["segments"] = [
        {"name": s.name, "kind": k, "predicted_ms": p, "measured_ms": statistics.median(t)}
        for s, k, p, t in zip(manifest.segments, kinds, est, times)
    ]
    echo(f"  load average at the end: {describe_load(res['load_end'])}")
    echo("")
    echo(f"{'segment kind':<22} {'segments':>8} {'predicted ms':>13} {'measured ms':>12} {'pred/meas':>10}")
    for row in table:
        echo(
            f"{row['kind']:<22} {row['segments']:>8} {row['predicted_ms']:>13.3f} "
            f"{row['measured_ms']:>12.3f} {row['ratio']:>10.2f}"
        )
    board = board_estimate(artifact, manifest)
    res["board_estimate_ms"] = board
    echo(
        f"the same plan on the published RK3588 profile (an estimate, not a measurement): "
        f"{board['expected']:.1f} ms/token ({board['low']:.1f}-{board['high']:.1f} over the "
        f"assumed figures' ranges)"
    )
    echo(
        f"(ms per token of this thread's CPU time, medians over {tokens} tokens; wall time "
        f"{res['wall_ms_per_token']:.3f} ms per token. The executor's own cost: measured with "
        f"its runs replayed, against a step's time outside its runs)"
    )
    return res


def board_estimate(artifact: str, manifest) -> Dict[str, float]:
    """ms/token of the plan on the published RK3588 profile (today's estimator, every cost
    counted), and a low and a high case over its assumed figures' ranges (profile.py): the
    executor at 1.5x and 3x this machine's cost instead of 2x, an NPU op 0.005 and 0.05 ms
    instead of 0.01."""
    from dataclasses import replace

    base = DeviceProfile()

    def case(call: float, token: float, npu_kernel_ms: float) -> DeviceProfile:
        """The executor's per-call and per-io costs times ``call``, its per-token costs times
        ``token`` (its copy rate divided by it)."""
        return replace(
            base,
            exec_call_ms=base.exec_call_ms * call,
            exec_io_ms=base.exec_io_ms * call,
            exec_token_ms=base.exec_token_ms * token,
            exec_segment_ms=base.exec_segment_ms * token,
            exec_slot_ms=base.exec_slot_ms * token,
            exec_state_gbs=base.exec_state_gbs / token,
            table_row_ms=base.table_row_ms * call,
            npu_kernel_ms=npu_kernel_ms,
        )

    cases = {"expected": base, "low": case(0.75, 0.75, 0.005), "high": case(1.5, 1.5, 0.05)}
    out = {}
    for name, prof in cases.items():
        per = predict(artifact, manifest, prof)
        own = prof.executor_token_ms(len(manifest.segments), len(manifest.state), manifest.state_bytes())
        out[name] = sum(per) + manifest.boundaries() * prof.handoff_ms + own
    return out


def _median_profile(
    profiles: List[DeviceProfile], ends: float, betweens: float, segments: int, slots: int, state_bytes: int
) -> DeviceProfile:
    """Each measured field's median over the rounds' profiles, and the executor's cost per
    segment from its replayed step: its time between runs (``betweens``) and before the first
    and after the last (``ends``: the state's views, its copy back, every run's outputs let go)
    less the state's copy back as the probes cost it (per slot and byte), over its
    ``segments``. The fixed cost per token, ``exec_token_ms``, is 0: it could not be told from
    the per-segment part (the step's ends grew with its segments' outputs: 0.07 ms for 11
    segments, 0.5 for 51)."""
    from dataclasses import replace

    keys = (
        "cpu_gemv_gbs",
        "cpu_gflops",
        "cpu_kernel_ms",
        "exec_call_ms",
        "exec_io_ms",
        "exec_slot_ms",
        "exec_state_gbs",
        "table_row_ms",
    )
    med = {k: statistics.median(getattr(p, k) for p in profiles) for k in keys}
    med["gemv_gbs"] = {b: statistics.median(p.gemv_gbs[b] for p in profiles) for b in profiles[0].gemv_gbs}
    copy = med["exec_slot_ms"] * slots + state_bytes / (med["exec_state_gbs"] * 1e6)
    return replace(
        profiles[0],
        npu_gbs=med["cpu_gemv_gbs"],
        npu_gbs_all=med["cpu_gemv_gbs"],
        npu_core_gflops=med["cpu_gflops"],
        npu_kernel_ms=med["cpu_kernel_ms"],
        dram_gbs=max(med["cpu_gemv_gbs"], profiles[0].dram_gbs),
        exec_token_ms=0.0,
        exec_segment_ms=max(betweens + ends - copy, 0.0) / max(segments, 1),
        **med,
    )
