"""Device profiles: what an NPU call and a MatMul cost on each side, for placement and estimates.

The cost model (every figure below is a field of ``DeviceProfile``):

- NPU call of a segment: ``npu_call_ms`` + its MatMuls, each ``max(stream, compute)``:
  stream = weight bytes (``npu_weight_bytes`` each) / bandwidth of the cores it runs on
  (``npu_gbs`` on one core, ``npu_gbs_all`` over ``npu_cores``), compute = 2 x rows x out x in /
  (``npu_core_gflops`` x cores). A segment holding at least ``npu_multicore_bytes`` of weights
  runs on every core (core mask 0_1_2 on the RK3588), a smaller one on one core. A profile
  measured on a board (``rwkv2rknn profile``) gives ``npu_gflops`` by rows instead: effective
  throughput, used as is.
- CPU MatMul: ``max(weight bytes (cpu_weight_bytes each) / cpu_gemv_gbs, flops / cpu_gflops)``.
- Every other op of a CPU segment (elementwise, reductions, the decay's exp, the WKV state's
  products, GroupNorm): ``cpu_kernel_ms`` + ``max(bytes it reads and writes (float32) /
  cpu_gemv_gbs, flops / cpu_gflops)``, a FLOP per output element (``cpu_special_flops`` for exp,
  sigmoid, tanh, sqrt, division, ...); reshapes move nothing. Every operand is counted as
  coming from DRAM (no cache), an upper bound for small tensors.
- Every other op of an NPU segment (LayerNorm's parts, the time-shift mix, activations, the
  residual adds): ``npu_kernel_ms`` + its bytes at the NPU's bandwidth or its FLOPs at the
  NPU's rate, whichever is slower (``npu_op_ms``): they run inside the segment's call, one NPU
  task each.
- The executor's own cost (``executor_ms``): ``exec_call_ms`` per segment run from Python (the
  feed, the runtime's entry and exit, the outputs) + ``exec_io_ms`` per input and output tensor
  of it; per token beyond its calls (``executor_token_ms``): ``exec_token_ms`` once,
  ``exec_segment_ms`` per segment the step runs (its feed gathered from the step's tensors, its
  outputs kept, an NPU segment's outputs checked for NaN/inf), ``exec_slot_ms`` per state slot
  (its view, its output copied back and let go) and the state's bytes at ``exec_state_gbs``
  (read from the runs' outputs, written into the state).
- A Gather's row from a constant table larger than ``cache_bytes`` (the embedding of a large
  vocabulary): ``table_row_ms`` per row picked beyond the op's bytes (a random row of a table
  that is in no cache: its page walk and its lines from DRAM).
- A w8a8 build (``compile --quant w8a8``): weights of ``npu_weight_bytes / npu_int8_speedup``
  bytes and ``npu_int8_speedup`` times the compute rate (measured profiles: the throughput).
- Every NPU<->CPU switch between segments: ``handoff_ms``.
- Bandwidths are capped at ``dram_gbs``.

Where the published default ``rk3588-published`` comes from (none was measured here):

- ``npu_call_ms`` 0.033: ~33 us fixed cost per call of librknnrt's C matmul API on an RK3588
  (notes of a community llama.cpp RKNPU2 backend fork). It is the C API's cost, which the
  default board runner (``rknn-rt``, ctypes over librknnrt) pays. rknn-toolkit-lite2's Python
  ``inference()`` costs more per call; the only public figure is whole-model (YOLOv8n: about
  300 ms through RKNNLite against about 20 ms through the C API on an RK3588,
  rockchip-linux/rknn-toolkit2 issue #285), so no per-call figure for it is assumed here.
- ``npu_gbs`` 10.8: int8 GEMV M = 1, K = N = 2048 (4 MiB of weights) in 0.39 ms on one NPU core
  (same notes). With fp16 weights (2 bytes) a 1024 x 1024 GEMV is then 0.19 ms on one core,
  the "about 0.2 ms" reported for it on the RK3588.
- ``npu_gbs_all`` 26.6 over ``npu_cores`` 3: the same GEMV split over the RK3588's 3 NPU cores
  (same notes). ASSUMED: the runtime's multi-core mode (core mask 0_1_2) splits a compiled
  model's MatMuls as well as that hand split does; ``npu_multicore_bytes`` (1 MiB) is an
  assumed threshold, not a measured one.
- ``npu_core_gflops`` 900: fp16 MatMul M = 128, K = 1024, N = 8192 at about 0.9 TFLOPS on one
  core (same notes, and the rwkv.cpp-on-RKNN author's blog).
- ``cpu_gemv_gbs`` 25: effective bandwidth of the 4 big (Cortex-A76) cores (llama.cpp runs on
  the RK3588, a whisper.cpp issue); ``cpu_weight_bytes`` 4: onnxruntime reads fp32 weights, so
  a 1024 x 1024 GEMV is 0.17 ms (fp16 weights, as in rwkv.cpp: 0.08 ms, the "about 0.1 ms"
  reported for the CPU).
- ``cpu_gflops`` 40: ASSUMED (about a quarter of the 4 A76 cores' NEON fp32 peak of ~150 GFLOPS;
  at M = 1 fp32 weights need 12.5 GFLOPS at 25 GB/s); it matters for prefill on the CPU.
- ``npu_int8_speedup`` 2: int8 weights are 1 byte against fp16's 2, and the NPU's int8 rate is
  twice its fp16 rate (M = 128: ~1.9 TOPS int8 against ~0.9 TFLOPS fp16 on one core, same notes).
- ``cpu_kernel_ms`` 0.001: ASSUMED, onnxruntime's fixed cost of one kernel on a Cortex-A76
  (measured on the x86 compile machine: 0.26 us per Add/Mul of 64 floats in a 200-op graph on
  one thread; taken 4x slower on the board). ``cpu_special_flops`` 20: ASSUMED, FLOPs of one
  vectorised exp/sigmoid/tanh (a range reduction and a polynomial of about degree 10).
- ``handoff_ms`` 0.03: ASSUMED, of the order of one onnxruntime ``run()`` from Python.
- ``exec_call_ms`` 0.16, ``exec_io_ms`` 0.005, ``exec_segment_ms`` 0.12, ``exec_slot_ms``
  0.003, ``exec_state_gbs`` 5, ``table_row_ms`` 0.1: ASSUMED, 2x what ``rwkv2rknn bench
  --backtest`` measured for this executor on the x86 development machine on 430M-shaped
  artifacts (half for the rate; 2026-12-07, AMD EPYC, one onnxruntime thread, each run after a
  segment's weights went through the caches: 0.07-0.10 ms per run, 2-4 us per tensor; per
  segment of a step beyond its run 0.06 ms, per state slot copied back 1.3-1.5 us, the state's
  bytes at 9-11 GB/s, a random row of a table beyond the caches 0.04-0.06 ms;
  docs/benchmarks.md), taken 2x slower on a 2.4 GHz Cortex-A76 (its single-core speed for
  Python is about half an EPYC core's; 1.5-3x is the plausible range). ``exec_token_ms`` 0:
  the step's fixed part could not be told from its per-segment part here. A 430M step of 51
  segments then costs the executor 6.6 ms (RWKV-4, 0.5 MiB of state) to 7.6 ms (RWKV-7, 6.3
  MiB) beyond its runs, the bundled 4 x 256 model's of 11 segments 1.4 ms (the single 8.0 ms
  assumed before overcharged small models). The per-segment cost measured here is smaller for
  small models (0.015 ms for the bundled one, whose step runs in the caches).
- ``cache_bytes`` 3 MiB: the RK3588's shared L3 (its datasheet); a Gather's table larger than it
  pays ``table_row_ms`` per row.
- ``npu_kernel_ms`` 0.01: ASSUMED (range 0.005-0.05): the NPU runs each op of a compiled graph
  as a task of its own; no public per-op figure for the RK3588 was found (``eval_perf`` on a
  board would give one).
- ``dram_gbs`` 34: LPDDR4x-4266 peak of RK3588 boards (board forums; LPDDR5 boards ~44).

Estimates from these are labelled as such, not measurements of your board: ``rwkv2rknn profile``
(measure.py) measures one, with probes built on the compile machine and timed on the board.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Dict, Iterable, Optional, Tuple

from rwkv2rknn.errors import BadInput

MiB = 1 << 20


def _log_interp(points: Dict[int, float], x: float) -> float:
    """The measured ``points`` ({x: figure}) at ``x``, interpolated linearly in log(x); the
    nearest end outside them."""
    pts = sorted(points.items())
    if x <= pts[0][0]:
        return pts[0][1]
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x <= x1:
            f = (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0))
            return y0 + f * (y1 - y0)
    return pts[-1][1]


@dataclass(frozen=True)
class DeviceProfile:
    name: str = "rk3588-published"
    # an NPU call: its fixed cost, then each MatMul's weights streamed or its FLOPs computed
    npu_call_ms: float = 0.033
    npu_weight_bytes: int = 2
    npu_gbs: float = 10.8  # one core
    npu_gbs_all: float = 26.6  # over npu_cores
    npu_cores: int = 3
    npu_core_gflops: float = 900.0
    npu_multicore_bytes: int = MiB  # a segment with this many weight bytes runs on every core
    npu_int8_speedup: float = 2.0  # w8a8 against fp16
    npu_gflops: Dict[int, float] = field(default_factory=dict)  # measured, by rows (overrides)
    # a CPU MatMul, and every other op of a CPU segment
    cpu_weight_bytes: int = 4
    cpu_gemv_gbs: float = 25.0
    cpu_gflops: float = 40.0
    cpu_kernel_ms: float = 0.001
    cpu_special_flops: float = 20.0  # FLOPs of one exp, sigmoid, tanh, sqrt, division
    npu_kernel_ms: float = 0.01  # every non-MatMul op inside an NPU segment's call
    # between them
    handoff_ms: float = 0.03  # one NPU<->CPU switch
    dram_gbs: float = 34.0  # caps every bandwidth
    # the executor itself
    exec_call_ms: float = 0.16  # the executor's own cost per segment run from Python
    exec_io_ms: float = 0.005  # ... and per input and output tensor of that run
    exec_token_ms: float = 0.0  # ... per token beyond its runs: once,
    exec_segment_ms: float = 0.12  # ... per segment the step runs,
    exec_slot_ms: float = 0.003  # ... per state slot,
    exec_state_gbs: float = 5.0  # ... and the state's bytes copied back at this rate
    # a Gather's row from a table of more than cache_bytes: a random read from DRAM
    table_row_ms: float = 0.1
    cache_bytes: int = 3 * MiB  # the last-level cache (the RK3588's L3)
    # measured: a one-row MatMul's weight bandwidth by its weight bytes, on either side (used
    # as is, interpolated in log(bytes)); empty: the side's own figure. onnxruntime's fp32 GEMV
    # streams a large matrix faster than a small one (10 GB/s at 256 KiB, 25 at 64 MiB here)
    gemv_gbs: Dict[int, float] = field(default_factory=dict)

    # ---------------------------------------------------------------- NPU

    def npu_cores_for(self, weight_bytes: float) -> int:
        """Cores a segment with this many weight bytes runs on (all of them when large)."""
        return self.npu_cores if weight_bytes >= self.npu_multicore_bytes else 1

    def npu_throughput(self, rows: int) -> float:
        """Measured profiles: GFLOPS at ``rows`` rows, interpolated linearly in log(rows)."""
        return _log_interp(self.npu_gflops, rows)

    def _speedup(self, precision: str) -> float:
        return self.npu_int8_speedup if precision == "w8a8" else 1.0

    def npu_matmul_ms(
        self, out_features: int, in_features: int, rows: int = 1, cores: int = 0, precision: str = "fp16"
    ) -> float:
        """One MatMul on ``cores`` NPU cores (0: as many as its own weight bytes call for), built
        at ``precision`` (fp16 and w16a16i: 2-byte weights; w8a8: ``npu_int8_speedup`` faster)."""
        flops = 2.0 * rows * out_features * in_features
        speed = self._speedup(precision)
        if self.npu_gflops:
            return flops / (self.npu_throughput(rows) * speed * 1e6)
        cores = cores or self.npu_cores_for(out_features * in_features * self.npu_weight_bytes)
        weight = out_features * in_features * self.npu_weight_bytes / speed
        gbs = min(self.npu_gbs_all if cores > 1 else self.npu_gbs, self.dram_gbs)
        gbs = self._gemv_rate(weight, gbs)
        return max(weight / (gbs * 1e6), flops / (self.npu_core_gflops * speed * cores * 1e6))

    def npu_segment_ms(self, dims: Iterable[Tuple[int, int, int]], precision: str = "fp16") -> float:
        """One call of an NPU segment whose MatMuls are ``(rows, out, in)``."""
        dims = list(dims)
        # cores as the runtime picks them (runtime/board.core_mask_for: fp16-sized weights)
        cores = self.npu_cores_for(sum(m * k for _, m, k in dims) * self.npu_weight_bytes)
        return self.npu_call_ms + sum(self.npu_matmul_ms(m, k, r, cores, precision) for r, m, k in dims)

    def _gemv_rate(self, weight: float, gbs: float) -> float:
        """The bandwidth of one MatMul's weights: ``gemv_gbs`` at its bytes where measured."""
        return _log_interp(self.gemv_gbs, weight) if self.gemv_gbs else gbs

    def npu_op_ms(self, moved_bytes: float, flops: float, special: bool = False) -> float:
        """One non-MatMul op inside an NPU segment: a task's fixed cost, then its bytes at the
        NPU's one-core bandwidth or its FLOPs at one core's rate, whichever is slower."""
        gbs = min(self.npu_gbs, self.dram_gbs)
        work = flops * (self.cpu_special_flops if special else 1.0)
        return self.npu_kernel_ms + max(moved_bytes / (gbs * 1e6), work / (self.npu_core_gflops * 1e6))

    def executor_ms(self, tensors: int) -> float:
        """The executor's own cost of one segment run with this many inputs and outputs."""
        return self.exec_call_ms + self.exec_io_ms * tensors

    def executor_token_ms(self, segments: int, slots: int, state_bytes: float) -> float:
        """The executor's own cost per token beyond its runs, for a step of ``segments`` runs
        and a state of ``slots`` slots holding ``state_bytes``."""
        return (
            self.exec_token_ms
            + self.exec_segment_ms * segments
            + self.exec_slot_ms * slots
            + state_bytes / (self.exec_state_gbs * 1e6)
        )

    def gather_ms(self, table_bytes: float, rows: int = 1) -> float:
        """The cost beyond its bytes of a Gather picking ``rows`` rows of a constant table."""
        return self.table_row_ms * max(rows, 1) if table_bytes > self.cache_bytes else 0.0

    # ---------------------------------------------------------------- CPU

    def cpu_matmul_ms(self, out_features: int, in_features: int, rows: int = 1) -> float:
        """Weight streaming bound; with many rows the CPU is compute bound."""
        weight = out_features * in_features * self.cpu_weight_bytes
        gbs = self._gemv_rate(weight, min(self.cpu_gemv_gbs, self.dram_gbs))
        stream = weight / (gbs * 1e6)
        compute = 2.0 * rows * out_features * in_features / (self.cpu_gflops * 1e6)
        return max(stream, compute)

    def cpu_op_ms(self, moved_bytes: float, flops: float, special: bool = False) -> float:
        """One op of a CPU segment that is not a projection (elementwise, reduction, the WKV
        state's products): a kernel's fixed cost, then its bytes at the CPU's bandwidth or its
        FLOPs (``cpu_special_flops`` each for exp, sigmoid, sqrt, ...), whichever is slower."""
        gbs = min(self.cpu_gemv_gbs, self.dram_gbs)
        work = flops * (self.cpu_special_flops if special else 1.0)
        return self.cpu_kernel_ms + max(moved_bytes / (gbs * 1e6), work / (self.cpu_gflops * 1e6))

    # ---------------------------------------------------------------- JSON

    def to_dict(self) -> dict:
        d = asdict(self)
        d["npu_gflops"] = {str(k): v for k, v in self.npu_gflops.items()}
        d["gemv_gbs"] = {str(k): v for k, v in self.gemv_gbs.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict, where: str = "profile") -> "DeviceProfile":
        default = cls()
        try:
            kw = {
                "name": str(d.get("name", "custom")),
                "npu_gflops": {int(k): float(v) for k, v in (d.get("npu_gflops") or {}).items()},
                "gemv_gbs": {int(k): float(v) for k, v in (d.get("gemv_gbs") or {}).items()},
            }
            for f in fields(cls):
                if f.name not in kw:
                    typ = type(getattr(default, f.name))
                    kw[f.name] = typ(d.get(f.name, getattr(default, f.name)))
            p = cls(**kw)
        except (TypeError, ValueError, AttributeError) as e:
            raise BadInput(
                f"{where} is not a valid device profile ({e})",
                "see rwkv2rknn/artifact/profile.py for the fields",
            ) from e
        speeds = (
            [
                p.cpu_gemv_gbs,
                p.npu_gbs,
                p.npu_gbs_all,
                p.npu_core_gflops,
                p.cpu_gflops,
                p.dram_gbs,
                p.npu_cores,
                p.npu_int8_speedup,
                p.cpu_special_flops,
                p.exec_state_gbs,
            ]
            + list(p.npu_gflops.values())
            + list(p.gemv_gbs.values())
        )
        if min(speeds) <= 0:
            raise BadInput(f"{where} has a zero or negative throughput", "give positive figures")
        costs = [
            p.npu_call_ms,
            p.handoff_ms,
            p.cpu_kernel_ms,
            p.npu_kernel_ms,
            p.exec_call_ms,
            p.exec_io_ms,
            p.exec_token_ms,
            p.exec_segment_ms,
            p.exec_slot_ms,
            p.table_row_ms,
            p.cache_bytes,
        ]
        if min(costs) < 0:
            raise BadInput(f"{where} has a negative cost", "give costs of zero or more")
        return p


def load_profile(path: Optional[str]) -> DeviceProfile:
    if not path or path == "default":
        return DeviceProfile()
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise BadInput(
            f"cannot read device profile '{path}' ({type(e).__name__})",
            "give a JSON file (see rwkv2rknn/artifact/profile.py)",
        ) from e
    if not isinstance(data, dict):
        raise BadInput(f"device profile '{path}' is not a JSON object", "see rwkv2rknn/artifact/profile.py")
    return DeviceProfile.from_dict(data, where=f"device profile '{path}'")
