"""`rwkv2rknn profile`: measure a device profile (see profile.py) on this machine.

On the board: ``rwkv2rknn profile --probes DIR --backend rknn-lite`` times probe ``.rknn`` files
(MatMuls of K = N = 1024 at M = 1, 16, 128, and a tiny model for the call floor) on the NPU, and
a numpy matrix-vector product for the CPU's weight bandwidth. The probes are built on the compile
machine with ``rwkv2rknn profile --build-probes DIR`` (rknn-toolkit2 does not run on the board).
With ``--backend rknn-sim`` the same code runs against the x86 simulator: that checks the flow,
but its timings say nothing about a board, and the profile is named so.
"""

from __future__ import annotations

import os
import platform
import statistics
from typing import Callable, Dict, Optional

import numpy as np

from rwkv2rknn.artifact.profile import DeviceProfile

SIZE = 1024
ROWS = (1, 16, 128)


def _probe_models() -> Dict[str, object]:
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    out = {}
    for m in ROWS:
        w = (rng.standard_normal((SIZE, SIZE)) / 32).astype(np.float32)
        g = helper.make_graph(
            [helper.make_node("MatMul", ["x", "w"], ["y"])],
            f"mm{m}",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, SIZE])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, SIZE])],
            [numpy_helper.from_array(w, "w")],
        )
        out[f"mm{m}"] = g
    g = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "call",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16])],
    )
    out["call"] = g
    models = {}
    for name, graph in out.items():
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 16)])
        model.ir_version = 8
        models[name] = model
    return models


def build_probes(folder: str, target: str = "rk3588", echo: Callable[[str], None] = print) -> None:
    """Write probe .onnx files and their .rknn builds into ``folder`` (compile machine)."""
    from rwkv2rknn import fileio
    from rwkv2rknn.compiler.driver import build_rknn

    os.makedirs(folder, exist_ok=True)
    for name, model in _probe_models().items():
        onnx_path = os.path.join(folder, name + ".onnx")
        fileio.save_onnx(model, onnx_path)
        reason = build_rknn(onnx_path, os.path.join(folder, name + ".rknn"), target)
        if reason:
            from rwkv2rknn.errors import ToolkitError

            raise ToolkitError(f"building probe {name} failed: {reason}", "check the rknn-toolkit2 install")
        echo(f"  built {name}.rknn")


def time_probe(folder: str, name: str, backend: str, core_mask: str = "auto") -> float:
    """Median ms per call of probe ``name`` (``call`` or ``mm{rows}``) on ``backend``:
    rknn-rt / rknn-lite time its .rknn on the board, rknn-sim its .onnx in the simulator."""
    from rwkv2rknn.tools.timing import time_steps
    from rwkv2rknn.errors import BadInput
    from rwkv2rknn.rknn.sim import RknnSimRunner
    from rwkv2rknn.runtime.rknn import RknnLiteRunner
    from rwkv2rknn.runtime.rknnrt import RknnRtRunner

    m = 1 if name == "call" else int(name[2:])
    k = 16 if name == "call" else SIZE
    shapes = {"x": [m, k], "y": [m, k]}
    if backend in BOARD:
        path = os.path.join(folder, name + ".rknn")
        if not os.path.exists(path):
            raise BadInput(
                f"probe '{path}' is missing",
                "build the probes on the compile machine: rwkv2rknn profile --build-probes DIR",
            )
        runner = (RknnRtRunner if backend == "rknn-rt" else RknnLiteRunner)(
            path, name, ["x"], ["y"], shapes, core_mask
        )
    else:
        path = os.path.join(folder, name + ".onnx")
        if not os.path.exists(path):
            raise BadInput(f"probe '{path}' is missing", "run rwkv2rknn profile --build-probes DIR first")
        runner = RknnSimRunner(path, name, ["x"], ["y"], shapes)
    x = {"x": np.ones((m, k), np.float32)}
    try:
        return statistics.median(time_steps(lambda _: runner.infer(x), [0] * 22))
    finally:
        runner.close()


BOARD = ("rknn-rt", "rknn-lite")  # the board's runners: librknnrt's C API, rknn-toolkit-lite2


def call_costs(
    folder: Optional[str], core_mask: str = "auto", echo: Callable[[str], None] = print
) -> Dict[str, object]:
    """The NPU's fixed cost per call through each board runner (the ``call`` probe: a tiny
    model), in ms; for a runner that cannot be timed here, the one-line reason instead."""
    from rwkv2rknn.errors import Rwkv2RknnError
    from rwkv2rknn.runtime import board

    where = {"rknn-rt": board.rt_available, "rknn-lite": board.lite_available}
    missing = {
        "rknn-rt": "librknnrt.so is not found (the board's runtime library)",
        "rknn-lite": "rknn-toolkit-lite2 is not installed",
    }
    soc = board.board_soc()
    out: Dict[str, object] = {}
    for backend in BOARD:
        if not soc:
            out[backend] = "not measured: this machine is not a Rockchip board"
        elif not where[backend]():
            out[backend] = f"not measured: {missing[backend]}"
        elif not folder:
            out[backend] = (
                "not measured: give --probes DIR (built on the compile machine with "
                "`rwkv2rknn profile --build-probes DIR`)"
            )
        else:
            try:
                out[backend] = time_probe(folder, "call", backend, core_mask)
            except Rwkv2RknnError as e:
                out[backend] = f"not measured: {e}"
        echo(
            f"  NPU per-call cost, {backend}: "
            + (f"{out[backend]:.3f} ms" if isinstance(out[backend], float) else out[backend])
        )
    return out


def measure(
    folder: str, backend: str, core_mask: str = "auto", echo: Callable[[str], None] = print
) -> DeviceProfile:
    from rwkv2rknn.tools.timing import gemv_bandwidth_gbs

    ms = {}
    for name in ["call"] + [f"mm{m}" for m in ROWS]:
        ms[name] = time_probe(folder, name, backend, core_mask)
        echo(f"  {name}: {ms[name]:.3f} ms per call")
    call = ms["call"]
    gflops = {m: 2.0 * m * SIZE * SIZE / max(ms[f"mm{m}"] - call, 1e-3) / 1e6 for m in ROWS}
    bw = gemv_bandwidth_gbs(mb=64)
    label = f"measured-{backend}" if backend != "rknn-sim" else "simulator-timings-not-a-board"
    return DeviceProfile(
        name=f"{label}-{platform.node() or 'host'}",
        npu_call_ms=call,
        npu_gflops=gflops,
        cpu_gemv_gbs=bw,
        cpu_weight_bytes=4,
        handoff_ms=call,
    )
